"""The harness every benchmark in bench/ is written on.

It owns what each benchmark would otherwise repeat: starting processes (each in its own
process group, pinned to cores, all killed when the run ends), load from wrk, the CPU
that processes outside the benchmark take during a measurement (waiting for quiet,
repeating a disturbed run), rounds that alternate A and B, the machine's facts, and the
result: a JSON file under bench/results/, a compact markdown table on stdout and the
command that reproduces it. The prose around the figures lives in docs/benchmarks.md.

A benchmark is a short script (bench/soak.py and bench/slowloris.py are real ones)::

    import harness
    import mock_upstream as mock  # the nginx mock, for gateway benchmarks

    parser = harness.parser(__doc__)  # the shared options: --nice, the noise budget, ...
    parser.add_argument("--conns", type=int, default=32)
    args = harness.parse(parser)
    with harness.Bench("mine", args) as bench:  # everything it starts is stopped at the end
        mock.start(bench)
        argv = [harness.venv_bin("sluice"), "serve", "--config", "bench/sluice-bench.yaml"]
        env = {"BENCH_UPSTREAM_KEY": "sk-upstream"}
        bench.start("sluice", argv, cores=harness.GATEWAY, env=env, ready=URL + "/readyz")
        load = lambda: bench.wrk(URL + "/v1/chat/completions", args.conns, 5, body=BODY)
        run, cpu = bench.measure("sluice c=32", load)  # repeated while others disturb it
        bench.finish({"run": run, "cpu": cpu}, [harness.table("req/s", [[run.rps]])])

Core 0 (GATEWAY) is for the system under test; core 1 (AUX) for the mock upstream, the
load generator and this script.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
WORK = BENCH / ".work"  # logs and rendered configs, per benchmark
RESULTS = BENCH / "results"  # one JSON file per run
HOST = "127.0.0.1"
GATEWAY = "0"
AUX = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


class BenchError(RuntimeError):
    """A benchmark cannot go on; the message says why."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark shares; a script adds its own and may change defaults."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nice", type=int, default=0, help="nice value of every process (root: <0)")
    p.add_argument("--tries", type=int, default=3, help="tries of a disturbed measurement")
    p.add_argument("--noisy-pct", type=float, default=5.0, help="others' CPU that disturbs")
    p.add_argument("--quiet-pct", type=float, default=10.0, help="others' CPU that is quiet")
    p.add_argument("--quiet-wait", type=float, default=20.0, help="s to wait for quiet")
    p.add_argument("--noise-budget", type=float, default=180.0, help="s of waiting in all")
    p.add_argument("--start-wait", type=float, default=60.0, help="s to wait before starting")
    p.add_argument("--max-load", type=float, default=99.0, help="1-min load to start under")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, with the parser's defaults kept beside them for `reproduce`."""
    args = p.parse_args()
    args._defaults = {name: p.get_default(name) for name in vars(args)}
    return args


# ------------------------------------------------------------------ processes


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_bytes()[-20_000:].decode("utf-8", "replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def cpu_seconds(self) -> float:
        """utime + stime of the process, all its threads."""
        return _stat(self.pid)[2] / CLK_TCK


def _stat(pid: int) -> tuple[int, int, int, str]:
    """(parent pid, process group, utime + stime jiffies, comm) of a process, from /proc."""
    text = Path(f"/proc/{pid}/stat").read_text()
    f = text[text.rindex(")") + 2 :].split()
    return (
        int(f[1]),
        int(f[2]),
        int(f[11]) + int(f[12]),
        text[text.index("(") + 1 : text.rindex(")")],
    )


def http(
    method: str,
    url: str,
    body: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request, no proxy; (status, lower-cased headers, body), errors included."""
    req = urllib.request.Request(url, body.encode() if body is not None else None, method=method)
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def together(*fns: Callable[[], T]) -> list[T]:
    """Run the callables at the same time (threads), results in order."""
    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


# ------------------------------------------------------------------ CPU accounting


@dataclass
class Cpu:
    """What the CPUs did during a measurement, in % of one core."""

    seconds: float
    others_pct: float  # processes outside the benchmark (and not `apart`)
    others_top: list[str]
    apart_pct: float  # processes counted apart: services under test (Redis, PostgreSQL)
    steal_pct: float  # the hypervisor gave the time to someone else
    cores_pct: list[float]  # busy share of each core
    ours_pct: dict[int, float]  # by process group of ours


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (process group, CPU jiffies, comm) of every user-space process."""
    snap = {}
    for d in os.scandir("/proc"):
        if d.name.isdigit() and d.name != "2":
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid, pgid, jiffies, comm = _stat(int(d.name))
                if ppid != 2:  # kernel threads
                    snap[int(d.name)] = (pgid, jiffies, comm)
    return snap


def _cores() -> tuple[list[tuple[int, int]], int]:
    """(busy, total) jiffies per core and the steal jiffies of all, from /proc/stat."""
    per, steal = [], 0
    for line in Path("/proc/stat").read_text().splitlines():
        if re.match(r"cpu\d+ ", line):
            v = [int(x) for x in line.split()[1:]]
            busy = v[0] + v[1] + v[2] + v[5] + v[6]
            per.append((busy, busy + v[3] + v[4] + v[7]))
            steal += v[7]
    return per, steal


class CpuWindow:
    """Opened before a measurement, closed after it. Processes that start and end inside
    the window are missed, so `others_pct` is a lower bound. `ours` (the benchmark's process
    groups) is asked at close, so that processes started inside the window count as ours."""

    def __init__(self, ours: Callable[[], set[int]], apart: frozenset[str]) -> None:
        self.ours, self.apart = ours, apart
        self.t0, self.procs0, (self.cores0, self.steal0) = time.monotonic(), _processes(), _cores()

    def close(self) -> Cpu:
        procs, (cores, steal), mine = _processes(), _cores(), self.ours()
        seconds = time.monotonic() - self.t0
        others: Counter[str] = Counter()
        apart = 0
        ours: Counter[int] = Counter()
        for pid, (pgid, jiffies, comm) in procs.items():
            before = self.procs0.get(pid)
            used = jiffies - (before[1] if before and before[2] == comm else 0)
            if used <= 0:
                continue
            if pgid in mine:
                ours[pgid] += used
            elif comm in self.apart:
                apart += used
            else:
                others[f"{comm}[{pid}]"] += used

        def pct(jiffies: float) -> float:
            return round(100.0 * jiffies / CLK_TCK / seconds, 1) if seconds > 0 else 0.0

        return Cpu(
            seconds=round(seconds, 2),
            others_pct=pct(sum(others.values())),
            others_top=[f"{n} {pct(j):.0f}%" for n, j in others.most_common(3)],
            apart_pct=pct(apart),
            steal_pct=pct(steal - self.steal0),
            cores_pct=[
                round(100.0 * (b1 - b0) / (t1 - t0)) if t1 > t0 else 0.0
                for (b0, t0), (b1, t1) in zip(self.cores0, cores, strict=False)
            ],
            ours_pct={g: pct(j) for g, j in ours.items()},
        )


# ------------------------------------------------------------------ wrk


@dataclass
class Wrk:
    url: str
    conns: int
    duration: int
    requests: int
    rps: float
    non2xx: int
    socket_errors: int
    latency_ms: dict[str, float]  # avg, max and, with --latency, 50, 75, 90, 99

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise BenchError(f"cannot read wrk's time {text!r}")
    return float(m[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[m[2]]


def parse_wrk(out: str, url: str, conns: int, duration: int) -> Wrk:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    requests = re.search(r"(\d+) requests in", out)
    if not rps or not requests:
        raise BenchError(f"wrk printed no result:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    latency = {}
    if m := re.search(r"Latency\s+(\S+)\s+\S+\s+(\S+)", out):
        latency = {"avg": _ms(m[1]), "max": _ms(m[2])}
    latency |= {p: _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M)}
    return Wrk(
        url,
        conns,
        duration,
        int(requests[1]),
        float(rps[1]),
        int(non2xx[1]) if non2xx else 0,
        sum(map(int, sock.groups())) if sock else 0,
        latency,
    )


# ------------------------------------------------------------------ the run


class Bench:
    """One run of one benchmark: its processes, its noise budget, its result."""

    def __init__(self, name: str, args: argparse.Namespace, apart: Iterable[str] = ()) -> None:
        self.name, self.args = name, args
        self.work = WORK / name
        self.apart = frozenset(apart)
        self.procs: list[Proc] = []
        self.commands: dict[str, str] = {}  # every process started, for the JSON
        self.notes: list[str] = []
        self.noise_left = args.noise_budget
        self.started = time.monotonic()
        self.machine: dict[str, Any] = {}

    def __enter__(self) -> Bench:
        self.work.mkdir(parents=True, exist_ok=True)
        self.machine = machine()  # before pinning: nproc reads this process's affinity
        if len(os.sched_getaffinity(0)) < 2:
            raise BenchError("needs two cores (0 and 1)")
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
        os.sched_setaffinity(0, {int(AUX)})
        if self.args.nice:
            os.setpriority(os.PRIO_PROCESS, 0, self.args.nice)
            self.renice_session(os.getpid())
        self.wait_quiet("start", self.args.start_wait, self.args.max_load)
        self.machine["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop_all()

    # processes

    def pin(self, cores: str) -> list[str]:
        nice = ["nice", "-n", str(self.args.nice)] if self.args.nice else []
        return ["taskset", "-c", cores, *nice]

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cores: str | None,
        env: dict[str, str] | None = None,
        ready: str | int | None = None,
        timeout: float = 60.0,
    ) -> Proc:
        """Start argv (pinned to `cores`) in a process group of its own, output to a log in
        the work folder; with `ready` (a URL answering 200, or a port), check that its port
        is free (another process would answer in its place), then wait for it."""
        port = ready if isinstance(ready, int) else urllib.parse.urlsplit(ready or "").port
        if port and not port_free(port):
            raise BenchError(f"{name}: port {port} is taken (another benchmark?)")
        argv = [*(self.pin(cores) if cores is not None else []), *argv]
        log_path = self.work / f"{name}.log"
        with open(log_path, "wb") as out:
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})},
                    cwd=REPO,
                    start_new_session=True,
                )
            except FileNotFoundError as e:
                raise BenchError(f"{name}: cannot start {argv[0]}: {e}") from e
        proc = Proc(name, argv, log_path, popen)
        self.procs.append(proc)
        self.renice_session(proc.pid)
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        self.commands[name] = f"{shown} {shlex.join(argv)}".strip()
        log(f"started {name} (pid {proc.pid}): {self.commands[name]}")
        if ready is not None:
            waited = self.wait_ready(proc, ready, timeout)
            log(f"{name} ready after {waited:.1f} s")
        return proc

    def renice_session(self, pid: int) -> None:
        """With autogroups on (Linux's default for desktops and many VMs), the scheduler
        shares a core between sessions first and looks at a process's nice value only
        within its session; a session's own nice value is set through /proc."""
        if self.args.nice:
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/autogroup").write_text(str(self.args.nice))

    def wait_ready(self, proc: Proc, ready: str | int, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not proc.alive():
                raise BenchError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
            with contextlib.suppress(OSError):
                if isinstance(ready, int):
                    socket.create_connection((HOST, ready), timeout=1).close()
                    return time.monotonic() - t0
                if http("GET", ready, timeout=2)[0] == 200:
                    return time.monotonic() - t0
            time.sleep(0.1)
        raise BenchError(f"{proc.name} not ready after {timeout:.0f} s ({ready}):\n{proc.tail()}")

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        """SIGTERM to the group, then SIGKILL to whatever is left of it (workers)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def ours(self) -> set[int]:
        return {os.getpgrp(), *(p.pid for p in self.procs)}

    # noise

    def window(self) -> CpuWindow:
        return CpuWindow(self.ours, self.apart)

    def wait_quiet(self, label: str, max_wait: float | None = None, max_load: float = 99.0) -> None:
        """Wait (within the noise budget) until others use under --quiet-pct of a core."""
        limit = min(self.args.quiet_wait if max_wait is None else max_wait, max(self.noise_left, 0))
        t0, said = time.monotonic(), False
        while True:
            win = self.window()
            time.sleep(1.0)
            cpu = win.close()
            waited = time.monotonic() - t0
            load = os.getloadavg()[0]
            if cpu.others_pct + cpu.steal_pct < self.args.quiet_pct and load < max_load:
                break
            if waited >= limit:
                log(f"{label}: not quiet after {waited:.0f} s ({cpu.others_top}); going ahead")
                if label == "start":
                    self.notes.append(f"others took {cpu.others_pct:.0f}% of a core at the start")
                break
            if not said:
                log(f"{label}: waiting for quiet ({', '.join(cpu.others_top)}; load {load:.2f})")
                said = True
        self.noise_left -= time.monotonic() - t0

    def measure(self, label: str, fn: Callable[[], T]) -> tuple[T, Cpu]:
        """Run fn up to --tries times while others disturb it (within the noise budget);
        keep the least disturbed try."""
        tries: list[tuple[T, Cpu]] = []
        while True:
            self.wait_quiet(label)
            win = self.window()
            value = fn()
            tries.append((value, cpu := win.close()))
            last = len(tries) >= self.args.tries or self.noise_left < cpu.seconds
            if cpu.others_pct < self.args.noisy_pct or last:
                break
            self.noise_left -= cpu.seconds
            log(f"{label}: others took {cpu.others_pct:.0f}% of a core; again")
        value, cpu = min(tries, key=lambda t: t[1].others_pct)
        if len(tries) > 1:
            self.notes.append(
                f"{label}: {len(tries)} tries, others' CPU "
                + ", ".join(f"{c.others_pct:.0f}%" for _, c in tries)
                + f"; kept {cpu.others_pct:.0f}%"
            )
        if cpu.others_pct >= self.args.noisy_pct:
            self.notes.append(f"NOISY {label}: others {cpu.others_pct:.0f}% ({cpu.others_top})")
        return value, cpu

    # load

    def wrk_argv(
        self, url: str, conns: int, duration: int, latency: bool = False, script: str = "post.lua"
    ) -> list[str]:
        argv = [*self.pin(AUX), "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "10s"]
        return [*argv, "-s", str(BENCH / script), *(["--latency"] if latency else []), url]

    def wrk(
        self,
        url: str,
        conns: int,
        duration: int,
        *,
        body: str,
        auth: str | None = None,
        latency: bool = False,
        script: str = "post.lua",
    ) -> Wrk:
        """wrk (one thread, on AUX) posting `body`, with `auth` as a bearer key; `script`
        (under bench/, or a path) may make the requests differ from one another."""
        argv = self.wrk_argv(url, conns, duration, latency, script)
        env = {**os.environ, "BENCH_BODY": body, "BENCH_AUTH": auth or ""}
        try:
            cp = subprocess.run(
                argv, capture_output=True, text=True, env=env, timeout=duration + 60
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"wrk did not finish: {shlex.join(argv)}") from e
        if cp.returncode != 0:
            raise BenchError(f"wrk failed ({cp.returncode}): {shlex.join(argv)}\n{cp.stderr}")
        return parse_wrk(cp.stdout, url, conns, duration)

    # the result

    def finish(self, results: dict[str, Any], tables: Sequence[str]) -> Path:
        """Write the JSON, print the tables, the notes and the command that reproduces them."""
        path, command = write_results(
            self.name,
            self.args,
            self.started,
            results,
            machine=self.machine,
            processes=self.commands,
            notes=self.notes,
        )
        print("\n\n".join(tables))
        for note in self.notes:
            print(f"- {note}")
        print(f"\nresults: {path.relative_to(REPO)}\nreproduce: {command}")
        return path


def write_results(
    name: str,
    args: argparse.Namespace,
    started: float,
    results: Any,
    *,
    machine: dict[str, Any],
    **fields: Any,
) -> tuple[Path, str]:
    """Write one run to bench/results/NAME-TIME.json (its command, when it finished, how
    long it ran since `started` (time.monotonic), the machine, the arguments, `fields`, the
    results); return the file and the command that reproduces the run."""
    command = reproduce(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    doc = {
        "benchmark": name,
        "command": command,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "runtime_s": round(time.monotonic() - started, 1),
        "machine": machine,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        **fields,
        "results": results,
    }
    path.write_text(json.dumps(doc, indent=1, default=_plain, ensure_ascii=False))
    return path, command


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def reproduce(args: argparse.Namespace) -> str:
    """The command line of this run: the script and every option not at its default."""
    words = ["python", os.path.relpath(sys.argv[0], REPO)]
    defaults = getattr(args, "_defaults", {})
    for name, value in vars(args).items():
        if name.startswith("_") or value is None or value == defaults.get(name, not value):
            continue
        if isinstance(value, list):
            words += [str(v) for v in value]  # the positional arguments
        else:
            words += ["--" + name.replace("_", "-"), *([] if value is True else [str(value)])]
    return shlex.join(words)


def main(run: Callable[[], int]) -> None:
    """Exit with run()'s code; a BenchError or an interrupt ends it with a message."""
    try:
        code = run()
    except BenchError as e:
        log(f"FAILED: {e}")
        code = 1
    except KeyboardInterrupt as e:
        log(f"interrupted ({e})")
        code = 130
    sys.exit(code)


# ------------------------------------------------------------------ facts and figures


def venv_bin(name: str) -> str:
    """An executable beside this interpreter (the project's venv: `sluice`), else on PATH."""
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else shutil.which(name) or name


def command_output(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        return (cp.stdout + cp.stderr).strip()
    return "n/a"


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of Python packages (of this interpreter)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def proxy_versions() -> dict[str, str]:
    """The versions a gateway-against-nginx benchmark depends on: the server's packages,
    nginx and wrk."""
    return versions("sluice-gateway", "uvicorn", "uvloop", "httptools", "aiohttp", "orjson") | {
        "nginx": command_output(["nginx", "-v"]),
        "wrk": command_output(["wrk", "-v"]).split(" Copyright")[0],
    }


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text()
    cpu = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    mem = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
    osr = re.search(r'^PRETTY_NAME="?([^"\n]+)', Path("/etc/os-release").read_text(), re.M)
    commit = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(REPO), "status", "--porcelain", "--", "src", "bench"])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu[1] if cpu else platform.processor(),
        "memory_gib": round(int(mem[1]) / 2**20, 1) if mem else None,
        "os": osr[1] if osr else platform.platform(),
        "kernel": platform.release(),
        "commit": commit + (" (uncommitted changes in src/ or bench/)" if dirty else ""),
    }


def pct(values: Sequence[float], p: float) -> float | None:
    """Percentile with linear interpolation between the two nearest values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (k - lo)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, lowest and highest of a series (per-round ratios, say)."""
    return {"median": statistics.median(values), "low": min(values), "high": max(values)}


def rotation(names: Sequence[str], round_no: int) -> list[str]:
    """The order of round `round_no`: each name leads in turn, so none always runs first."""
    k = round_no % len(names)
    return [*names[k:], *names[:k]]


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def table(header: str | Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table (header: a list, or one string of cells split by "|"); the first
    column left-aligned, the others right."""
    cells = [h.strip() for h in header.split("|")] if isinstance(header, str) else header
    lines = ["| " + " | ".join(cells) + " |", "|---" + "|---:" * (len(cells) - 1) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
