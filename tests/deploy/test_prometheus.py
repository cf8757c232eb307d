"""The monitoring rules and dashboard against a real Prometheus (issue 21).

`promtool` checks deploy/monitoring/rules.yaml and runs its unit tests (rules-test.yaml).
Then a real Prometheus scrapes ``sluice serve --workers 2`` (the supervisor's metrics port,
which aggregates the workers) in front of mock upstreams, under a little traffic of every
kind the rules and panels look at, loads the rules, and every PromQL expression of the
rules, the alerts and the dashboard is evaluated through ``/api/v1/query``: each must return
series with a number in them. An alert whose condition is not met must still evaluate, and
the expressions it compares must return numbers.

Needs the Debian package ``prometheus`` (``apt-get install -y prometheus``), Redis (several
workers share their limits there) and the embedded model (the engine's metrics).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sluice.testing.faults import MockFaults
from sluice.testing.mock_upstream import MockUpstream
from tests.deploy.test_kubernetes import TARGET_LABELS, named_autoscaler_queries
from tests.gateway import free_port

pytestmark = [pytest.mark.slow, pytest.mark.redis]

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RULES = MONITORING / "rules.yaml"
RULES_TEST = MONITORING / "rules-test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
MASTER_KEY = "sk-monitoring-test-master"
SCRAPE_INTERVAL = 1.0
# What Grafana would put in place of the dashboard's variables: one job, every model and
# deployment (the variables' "All" is ".*").
VARIABLES = {"$job": "sluice", "$model": ".*", "$deployment": ".*", "$__rate_interval": "1m"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install -y prometheus)")
    return path


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_runs_the_alerts_unit_tests() -> None:
    result = subprocess.run(
        [tool("promtool"), "test", "rules", str(RULES_TEST)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_unit_tests() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", ())
    }
    assert {str(rule["alert"]) for rule in rules_of("alert")} <= tested


def rules_of(kind: str) -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if kind in rule]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL with the variables filled in) for every panel's query."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", ()):
            found.append((panel["title"], fill(target["expr"])))
    return found


def fill(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    return expr


_SPLIT = re.compile(r"\s+(and|or|unless)\s+")
_COMPARISON = re.compile(r"(>=|<=|==|!=|>|<)(\s*bool)?")
_MATCHING = re.compile(r"^(on|ignoring)\s*\([^)]*\)\s*")


def compared(expr: str) -> list[str]:
    """The expressions an alert compares with its thresholds: ``a > 1 and b > 1`` gives
    ``a`` and ``b``, so an alert that does not fire can still be shown to see its data."""
    expr = expr.strip()
    parts = top_level(expr, _SPLIT)
    if len(parts) > 1:
        # ``a and on (job) b``: the vector matching belongs to the operator, not to ``b``.
        parts = [_MATCHING.sub("", part.strip()) for part in parts]
        return [inner for part in parts for inner in compared(part)]
    if expr.startswith("(") and closing(expr, 0) == len(expr) - 1:
        return compared(expr[1:-1])
    left = top_level(expr, _COMPARISON)
    return [left[0].strip()]


def top_level(expr: str, pattern: re.Pattern[str]) -> list[str]:
    """``expr`` cut where ``pattern`` matches outside brackets and quotes."""
    depth, quoted, cuts, i = 0, False, [], 0
    while i < len(expr):
        char = expr[i]
        if char == '"' and (i == 0 or expr[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and char in "([{":
            depth += 1
        elif not quoted and char in ")]}":
            depth -= 1
        elif not quoted and depth == 0:
            match = pattern.match(expr, i)
            if match and (pattern is not _SPLIT or expr[i].isspace()):
                cuts.append((i, match.end()))
                i = match.end()
                continue
        i += 1
    pieces, start = [], 0
    for begin, end in cuts:
        pieces.append(expr[start:begin])
        start = end
    pieces.append(expr[start:])
    return pieces


def closing(expr: str, opening: int) -> int:
    depth = 0
    for i in range(opening, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        if depth == 0:
            return i
    return -1


def test_compared_takes_the_left_side_of_each_comparison() -> None:
    expr = '(a{x=~"1|2"} > (14.4 * 0.001) and on (job) b > 1) or (c[5m] >= 2 unless d == 0)'
    assert compared(expr) == ['a{x=~"1|2"}', "b", "c[5m]", "d"]
    assert compared("sum by (job) (rate(x[5m])) / y > 0.01") == ["sum by (job) (rate(x[5m])) / y"]


# ------------------------------------------------------------------------------------------
# The stack: mock upstreams, `sluice serve --workers 2`, Prometheus.


@dataclass
class Stack:
    prometheus: str
    gateway: str
    metrics: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200, (expr, body)
        assert body["status"] == "success", (expr, body)
        assert body["data"]["resultType"] == "vector", expr
        return list(body["data"]["result"])

    def numbers(self, expr: str) -> list[float]:
        """The finite values ``expr`` returns now."""
        return [v for v in (float(s["value"][1]) for s in self.query(expr)) if math.isfinite(v)]


def redis_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


def wait_for(what: str, check: Any, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            detail = log.read_text(errors="replace")[-4000:] if log is not None else ""
            raise AssertionError(f"{what} did not happen within {timeout} s\n{detail}")
        time.sleep(0.1)


def gateway_config(
    good: MockUpstream, flaky: MockUpstream, data_dir: Path, metrics_port: int
) -> Any:
    def remote(upstream: MockUpstream, name: str, **extra: Any) -> dict[str, Any]:
        return {
            "provider": "openai",
            "id": name,
            "api_base": upstream.url,
            "api_key": "os.environ/SLUICE_TEST_UPSTREAM_KEY",
            "model": "mock-chat",
            **extra,
        }

    local = {"provider": "local", "id": "tiny-0", "parallel": 2, "context_size": 512,
             "batch_size": 64, "threads": 1}  # fmt: skip

    return {
        "server": {"metrics_port": metrics_port, "metrics_host": "127.0.0.1"},
        "logging": {"level": "warning"},
        "auth": {"master_key": "os.environ/SLUICE_TEST_MONITORING_MASTER"},
        "redis_url": "redis://127.0.0.1:6379/0",
        "data_dir": str(data_dir),
        "cache": {"enabled": True},
        # A queue of one per deployment: the burst at "slow" both waits and is shed.
        "resilience": {"queue": {"deployment_max_waiting": 1, "reserved_share": 0}},
        "models": [
            # Two deployments: balancing gauges and the time-to-first-byte EWMA.
            {"name": "gpt-4o-mini",
             "deployments": [remote(good, "good-a"), remote(good, "good-b")]},
            {"name": "flaky", "deployments": [remote(flaky, "flaky-0")]},
            {"name": "slow", "deployments": [remote(good, "slow-0", max_concurrency=1)]},
            {"name": "tiny", "deployments": [local]},
        ],
    }  # fmt: skip


def traffic(base: str, limited_key: str) -> None:
    """One round of every kind of request the rules and panels look at."""
    master = {"Authorization": f"Bearer {MASTER_KEY}"}

    def chat(model: str, headers: dict[str, str] = master, **body: Any) -> int:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
        url = f"{base}/v1/chat/completions"
        return httpx.post(url, headers=headers, json=payload, timeout=30).status_code

    assert [chat("gpt-4o-mini", temperature=0) for _ in range(3)] == [200] * 3  # miss, hits
    assert chat("gpt-4o-mini") == 200  # not deterministic: bypass
    statuses = [chat("gpt-4o-mini", {"Authorization": f"Bearer {limited_key}"}) for _ in range(3)]
    assert 429 in statuses  # the key's RPM
    assert chat("no-such-model") == 404
    assert chat("gpt-4o-mini", {"Authorization": "Bearer sk-wrong"}) == 401
    for _ in range(4):
        assert chat("flaky") in (200, 500, 502)  # 5xx and resets, retried
    assert chat("flaky", mock={"reset": True}) in (502, 503)  # reset each time (or ejected)
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "s"}]}
    with httpx.stream("POST", f"{base}/v1/chat/completions", headers=master, json=body) as s:
        assert s.status_code == 200
        s.read()
    assert chat("tiny", max_tokens=3) == 200

    async def burst() -> list[int]:
        async with httpx.AsyncClient(headers=master, timeout=30) as client:
            payload = {"model": "slow", "messages": [{"role": "user", "content": "q"}],
                       "mock": {"latency_ms": 300}}  # fmt: skip
            answers = await asyncio.gather(
                *(client.post(f"{base}/v1/chat/completions", json=payload) for _ in range(6))
            )
            return [answer.status_code for answer in answers]

    assert 503 in asyncio.run(burst())  # one in the slot, one waiting, the rest shed


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = tool("prometheus")
    if not redis_reachable():
        pytest.skip("Redis not reachable at 127.0.0.1:6379")
    # Looked up, not imported: the workers import it, and importing it here leaves a file open.
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (extra: local): the engine's metrics")
    tmp = tmp_path_factory.mktemp("monitoring")
    port, metrics_port, prometheus_port = free_port(), free_port(), free_port()
    env = {**os.environ, "SLUICE_TEST_UPSTREAM_KEY": "sk-upstream",
           "SLUICE_TEST_MONITORING_MASTER": MASTER_KEY}  # fmt: skip
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    faults = MockFaults(error_rate=0.4, reset_rate=0.2, seed=21)
    with MockUpstream() as good, MockUpstream(faults=faults) as flaky:
        config = tmp / "sluice.yaml"
        config.write_text(yaml.safe_dump(gateway_config(good, flaky, tmp / "data", metrics_port)))
        sluice_log = tmp / "sluice.log"
        prometheus_log = tmp / "prometheus.log"
        (tmp / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {
                            "job_name": "sluice",
                            # The labels Prometheus's Kubernetes discovery would give a
                            # pod: the autoscalers' queries select by them.
                            "static_configs": [
                                {
                                    "targets": [f"127.0.0.1:{metrics_port}"],
                                    "labels": TARGET_LABELS,
                                }
                            ],
                        }
                    ],
                }
            )
        )
        with sluice_log.open("wb") as out, prometheus_log.open("wb") as prom_out:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "sluice", "serve", "--config", str(config),
                 "--port", str(port), "--workers", "2"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
            prometheus = subprocess.Popen(
                [prometheus_bin, f"--config.file={tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
                stdout=prom_out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            the = Stack(
                prometheus=f"http://127.0.0.1:{prometheus_port}",
                gateway=f"http://127.0.0.1:{port}",
                metrics=f"http://127.0.0.1:{metrics_port}/metrics",
            )
            try:
                yield run_traffic(the, gateway, sluice_log, prometheus_log)
            finally:
                gateway.terminate()
                prometheus.terminate()
                assert gateway.wait(30) == 0, sluice_log.read_text(errors="replace")[-4000:]
                prometheus.wait(30)


def run_traffic(the: Stack, gateway: subprocess.Popen[bytes], log: Path, prom_log: Path) -> Stack:
    def ready() -> bool:
        assert gateway.poll() is None, log.read_text(errors="replace")[-4000:]
        return httpx.get(f"{the.gateway}/readyz", timeout=1).status_code == 200

    wait_for("sluice ready", ready, 60, log)
    wait_for(
        "Prometheus ready", lambda: httpx.get(f"{the.prometheus}/-/ready").is_success, 30, prom_log
    )
    wait_for("a first scrape", lambda: the.numbers('up{job="sluice"} == 1'), 30, prom_log)
    admin = {"Authorization": f"Bearer {MASTER_KEY}"}
    created = httpx.post(f"{the.gateway}/admin/keys", headers=admin, json={"rpm": 2})
    assert created.status_code == 201, created.text
    limited = created.json()["key"]
    # Two rounds with scrapes between them, so every counter is seen to grow.
    traffic(the.gateway, limited)
    time.sleep(2 * SCRAPE_INTERVAL)
    traffic(the.gateway, limited)
    # The last scrape, then a round of the rules after it.
    time.sleep(3 * SCRAPE_INTERVAL)
    return the


def test_prometheus_scrapes_the_supervisors_aggregated_metrics(stack: Stack) -> None:
    targets = httpx.get(f"{stack.prometheus}/api/v1/targets").json()["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [("sluice", "up")]
    # Both workers served; the scrape sees their sum, not one worker's share.
    assert stack.numbers('sum(sluice_requests_total{job="sluice", model="gpt-4o-mini"})')[0] >= 14


def test_the_rules_loaded_and_evaluate_without_errors(stack: Stack) -> None:
    groups = httpx.get(f"{stack.prometheus}/api/v1/rules").json()["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    expected = {str(r["record"]) for r in rules_of("record")} | {
        str(r["alert"]) for r in rules_of("alert")
    }
    assert loaded == expected
    broken = [
        (rule["name"], rule.get("lastError"))
        for group in groups
        for rule in group["rules"]
        if rule["health"] != "ok"
    ]
    assert broken == []


def test_every_recording_rule_returns_series(stack: Stack) -> None:
    empty = []
    for rule in rules_of("record"):
        # The rule's expression now, and what Prometheus recorded from it.
        for expr in (rule["expr"], f'{{__name__="{rule["record"]}"}}'):
            if not stack.numbers(expr):
                empty.append(f"{rule['record']}: {expr}")
    assert empty == []


def test_every_alert_evaluates_and_its_compared_expressions_return_series(stack: Stack) -> None:
    empty = []
    for rule in rules_of("alert"):
        stack.query(rule["expr"])  # parses and evaluates (firing or not)
        for expr in compared(rule["expr"]):
            if not stack.numbers(expr):
                empty.append(f"{rule['alert']}: {expr}")
    assert empty == []


def test_the_traffic_starts_the_alerts_it_should_and_only_those(stack: Stack) -> None:
    # The `for` of every alert is longer than this test: the ones whose condition holds are
    # pending. The flaky model's 5xx and the burst's 503s are real burns, and the burst is
    # shed. Nothing touched Redis's or the database's health, the engine's queue or the
    # targets, so those stay quiet. Latency and ejection alerts may start or not, as the
    # machine's load decides (a busy CI box adds milliseconds of overhead).
    pending = {
        alert["labels"]["alertname"]
        for alert in httpx.get(f"{stack.prometheus}/api/v1/alerts").json()["data"]["alerts"]
    }
    assert {"SluiceErrorBudgetBurnFast", "SluiceRequestsShed"} <= pending
    quiet = {
        "SluiceUsageWritesFailing",
        "SluiceUsageWriterStalled",
        "SluiceUsageWriterRestarting",
        "SluiceUsageRecordsDeadLettered",
        "SluiceLimiterFailing",
        "SluiceEngineQueueing",
        "SluiceEngineRejecting",
        "SluiceTargetDown",
    }
    assert pending & quiet == set()


def test_every_autoscaler_query_returns_series(stack: Stack) -> None:
    """prometheus-adapter's series and metrics queries (as it fills them in for the HPA) and
    KEDA's triggers (deploy/kubernetes): each returns a number for the scraped pod."""
    queries = named_autoscaler_queries()
    assert len(queries) >= 5
    empty = [f"{name}: {expr}" for name, expr in queries.items() if not stack.numbers(expr)]
    assert empty == []


def test_every_dashboard_query_returns_series(stack: Stack) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 40
    empty = [f"{title}: {expr}" for title, expr in expressions if not stack.numbers(expr)]
    assert empty == []


def test_every_dashboard_variable_has_values(stack: Stack) -> None:
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    queries = [v["query"]["query"] for v in variables if v["type"] == "query"]
    assert len(queries) == 3
    for query in queries:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", fill(query))
        assert match is not None, query
        selector, label = match.groups()
        response = httpx.get(
            f"{stack.prometheus}/api/v1/label/{label}/values", params={"match[]": selector}
        )
        assert response.json()["data"], query
