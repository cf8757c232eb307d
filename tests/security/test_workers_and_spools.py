"""Several worker processes (issue 18, point 9): without Redis every worker would keep its
own limits, so such a configuration is refused; each process spools usage to its own file,
and the spool files of processes that are gone are adopted, each by exactly one process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from sluice.observability.metrics import GatewayMetrics
from sluice.services import build_services
from sluice.settings import ConfigError, Settings, load_settings
from sluice.store.spools import adopt_orphans, spool_path
from sluice.store.usage import UsageRecord, UsageStore, now_micros

MASTER = {"auth": {"master_key": "os.environ/SLUICE_TEST_WORKERS_MASTER"}}


def config(tmp_path: Path, **values: object) -> Path:
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_several_workers_without_redis_are_refused_when_limits_apply(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(config(tmp_path, server={"workers": 3}, **MASTER))
    message = str(refused.value)
    assert "set redis_url to share limits across workers, or run workers: 1" in message.lower()
    # The same through the command line's override.
    with pytest.raises(ConfigError):
        load_settings(config(tmp_path, **MASTER), workers=2)


def test_several_workers_are_fine_with_redis_or_without_limits(tmp_path: Path) -> None:
    with_redis = {"redis_url": "redis://127.0.0.1:6379/0", **MASTER}
    assert load_settings(config(tmp_path, **with_redis), workers=4).server.workers == 4
    assert load_settings(config(tmp_path), workers=4).server.workers == 4  # open mode
    assert load_settings(config(tmp_path, **MASTER)).server.workers == 1


def test_sluice_serve_names_the_fix(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sluice", "serve", "--config", str(config(tmp_path, **MASTER)),
         "--workers", "2", "--port", "0"],
        capture_output=True, text=True, timeout=60,
        env={"SLUICE_TEST_WORKERS_MASTER": "sk-test-master", "PATH": "/usr/bin:/bin",
             "PYTHONPATH": ":".join(sys.path)},
    )  # fmt: skip
    assert result.returncode == 1
    assert "Set redis_url to share limits across workers, or run workers: 1" in result.stderr


def gone_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def spooled(path: Path, *ids: str) -> None:
    record = UsageRecord(request_id="", model="m", created_us=now_micros())
    path.write_text(
        "".join(json.dumps(record._replace(request_id=i).to_json()) + "\n" for i in ids)
    )


def ids_in(paths: list[Path]) -> list[str]:
    return sorted(
        json.loads(line)["request_id"] for path in paths for line in path.read_text().splitlines()
    )


def test_each_process_spools_to_its_own_file(tmp_path: Path) -> None:
    assert spool_path(tmp_path, 101) != spool_path(tmp_path, 102)
    assert spool_path(tmp_path).name.startswith("usage-spool.")


def test_only_the_spools_of_stopped_processes_are_adopted(tmp_path: Path) -> None:
    dead, live = gone_pid(), 1  # pid 1 always runs
    spooled(tmp_path / f"usage-spool.{dead}.jsonl", "dead-1", "dead-2")
    spooled(tmp_path / f"usage-spool.{dead}.jsonl.replay", "dead-3")
    spooled(tmp_path / "usage-spool.jsonl", "legacy-1")  # an earlier version's single spool
    spooled(tmp_path / f"usage-spool.{live}.jsonl", "live-1")
    spooled(tmp_path / "usage-dead-letter.jsonl", "not-a-spool")
    own = spool_path(tmp_path, 4242)
    spooled(own, "own-1")

    adopted = adopt_orphans(own, 4242)
    assert ids_in(adopted) == ["dead-1", "dead-2", "dead-3", "legacy-1"]
    assert all(path.name.startswith(own.name + ".adopted-") for path in adopted)
    assert (tmp_path / f"usage-spool.{live}.jsonl").exists()  # a running process's file
    assert own.read_text().count("\n") == 1
    # Adopted but not yet merged (this process died meanwhile): its next life under the same
    # pid takes them again, and so does any process once this pid has stopped.
    assert sorted(adopt_orphans(own, 4242)) == sorted(adopted)


def test_workers_starting_together_adopt_each_file_once(tmp_path: Path) -> None:
    dead = gone_pid()
    for n in range(200):
        spooled(tmp_path / f"usage-spool.{dead}.jsonl.adopted-{n:04x}", f"r{n}")
    results: dict[int, list[Path]] = {}
    start = threading.Barrier(4)

    def worker(pid: int) -> None:
        start.wait()
        results[pid] = adopt_orphans(spool_path(tmp_path, pid), pid)

    # Four running processes stand for the workers (a worker's adopted files are its own
    # while it runs).
    alive = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
             for _ in range(4)]  # fmt: skip
    try:
        threads = [threading.Thread(target=worker, args=(p.pid,)) for p in alive]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for process in alive:
            process.kill()
            process.wait()
    claimed = [path for paths in results.values() for path in paths]
    assert ids_in(claimed) == sorted(f"r{n}" for n in range(200))  # each once, none lost


def test_a_restarted_worker_replays_a_stopped_workers_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's recorder, built as a worker builds it, writes what a worker that
    stopped (another pid) left in its spool."""
    monkeypatch.setenv("SLUICE_TEST_WORKERS_MASTER", "sk-test-master")
    spooled(tmp_path / f"usage-spool.{gone_pid()}.jsonl", "left-1", "left-2", "left-3")
    settings = Settings(data_dir=str(tmp_path), **MASTER)  # type: ignore[arg-type]

    async def run() -> int:
        services = build_services(settings, GatewayMetrics(CollectorRegistry()))
        await services.start()
        try:
            assert services.usage is not None
            return await UsageStore(services.database).count()  # type: ignore[arg-type]
        finally:
            await services.close()

    assert asyncio.run(run()) == 3
    assert not list(tmp_path.glob("usage-spool.*"))
