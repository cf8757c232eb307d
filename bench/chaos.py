"""Chaos: two deployments of one model, one of them failing, through Sluice and LiteLLM.

Two mock upstreams (`sluice mock-upstream`, on core 1) serve one model. In the chaos
scenario the "bad" one fails 30% of its requests (500) and stalls another 5% for longer
than the gateway's timeout, while --requests requests at concurrency --conns, paced at
--rate, go through the gateway (alone on core 0); once --recover-after of them have been
sent, the bad deployment's faults are switched off (`DELETE /mock/faults`). Reported:
client success, upstream calls per request (the mocks' /mock/stats), latency, when the
bad deployment left the rotation and how long after its recovery it was back (from the
deployment each answer names; for Sluice also from the sluice_deployment_ejected gauge).
Then every deployment is down: the status and latency of --down-requests requests. Each
gateway meets the same fault sequence (seeded). Sluice's settings and LiteLLM's comparable
router settings are below; figures and discussion: docs/benchmarks.md.

    python bench/chaos.py [--requests 5000] [--conns 32] [--rate 250] [--skip-litellm]
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import harness
import uvloop
import yaml
from gateway_bench import litellm
from harness import AUX, GATEWAY, HOST, Bench, BenchError, fmt

MODEL = "gpt-4o-mini"
UPSTREAM_KEY = "sk-upstream"
LITELLM_KEY = "sk-bench-master"
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]})
TIMEOUT_S = 1.0  # the gateways' first-byte (LiteLLM: request) timeout
FAULTS = {"error_rate": 0.3, "error_status": 500, "stall_rate": 0.05, "stall_seconds": 10.0}
EJECTION_WINDOW_S = 5.0  # Sluice's health window; LiteLLM's cooldown lasts as long
TARGET_SUCCESS_PCT, TARGET_CALLS_PER_REQUEST, TARGET_DOWN_P99_MS = 99.9, 1.25, 50.0


def sluice_config(ports: dict[str, int], backoff_initial: float | None = None) -> dict[str, Any]:
    def deployment(name: str) -> dict[str, Any]:
        return {
            "provider": "openai",
            "id": name,
            "api_base": f"http://{HOST}:{ports[name]}/v1",
            "api_key": "os.environ/BENCH_UPSTREAM_KEY",
            "timeout": {"connect": 1, "first_byte": TIMEOUT_S, "total": 30},
        }

    retries: dict[str, Any] = {"attempts": 3}
    if backoff_initial is not None:
        retries["backoff_initial"] = backoff_initial
    return {
        "logging": {"level": "info", "access_log": True},
        "usage": {"enabled": False},
        "models": [{"name": MODEL, "deployments": [deployment("good"), deployment("bad")]}],
        "resilience": {
            "retries": retries,
            # A 35% failure share ejects (the default, 50%, would not).
            "health": {"window": EJECTION_WINDOW_S, "min_requests": 20, "error_rate": 0.25},
        },
    }


def litellm_config(ports: dict[str, int]) -> dict[str, Any]:
    def deployment(name: str) -> dict[str, Any]:
        params = {
            "model": f"openai/{MODEL}",
            "api_base": f"http://{HOST}:{ports[name]}/v1",
            "api_key": "os.environ/BENCH_UPSTREAM_KEY",
            "timeout": TIMEOUT_S,
        }
        return {"model_name": MODEL, "litellm_params": params, "model_info": {"id": name}}

    return {
        "model_list": [deployment("good"), deployment("bad")],
        # Three calls per request at most, as Sluice's attempts: 3; a deployment failing
        # more than allowed_fails times in a minute cools down for cooldown_time seconds.
        "router_settings": {"num_retries": 2, "allowed_fails": 3, "cooldown_time": 5},
        "litellm_settings": {"telemetry": False, "drop_params": True},
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str  # the chat completions URL
    auth: str | None
    deployment: Callable[[Mapping[str, str]], str | None]
    metrics: str | None = None  # a /metrics URL with sluice_deployment_ejected


@dataclass(frozen=True, slots=True)
class Answer:
    start: float  # seconds since the load began
    seconds: float
    status: int  # 0: no HTTP answer (a transport error or the client's timeout)
    ok: bool
    deployment: str | None


# ------------------------------------------------------------------ load


@dataclass
class Run:
    answers: list[Answer]
    gauge: list[tuple[float, float]]
    """(time, value) samples of the bad deployment's sluice_deployment_ejected."""
    recovered_at: float | None = None
    """When the bad deployment's faults were switched off."""


async def _load(
    target: Target, n: int, conns: int, rate: float, recover: tuple[int, str] | None = None
) -> Run:
    """n requests from `conns` clients, request i not before i / rate seconds (0: at once);
    `recover` (i, url): DELETE url as request i starts (the faults of a mock). With
    target.metrics, the bad deployment's ejected gauge is read every 0.25 s."""
    headers = {"Content-Type": "application/json"}
    if target.auth:
        headers["Authorization"] = f"Bearer {target.auth}"
    body = BODY.encode()
    run = Run([], [])
    answers, side = run.answers, []
    loop = asyncio.get_running_loop()
    counter = itertools.count()
    connector = aiohttp.TCPConnector(limit=conns + 4)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        t0 = loop.time()

        async def client() -> None:
            while (i := next(counter)) < n:
                if rate and (wait := t0 + i / rate - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if recover is not None and i == recover[0]:
                    run.recovered_at = loop.time() - t0
                    side.append(asyncio.create_task(act("DELETE", recover[1])))
                start = loop.time()
                status, ok, deployment = 0, False, None
                try:
                    async with session.post(target.url, data=body, headers=headers) as resp:
                        data = await resp.read()
                        status, deployment = resp.status, target.deployment(resp.headers)
                        ok = status == 200 and b'"choices"' in data
                except (TimeoutError, aiohttp.ClientError):
                    pass
                answers.append(Answer(start - t0, loop.time() - start, status, ok, deployment))

        async def act(method: str, url: str) -> None:
            async with session.request(method, url) as resp:
                if resp.status != 200:
                    raise BenchError(f"{method} {url} -> {resp.status}: {await resp.text()}")

        async def watch() -> None:
            assert target.metrics is not None
            pattern = re.compile(r'^sluice_deployment_ejected\{[^}]*"bad"[^}]*\} (\S+)', re.M)
            while True:
                async with session.get(target.metrics) as resp:
                    if found := pattern.search(await resp.text()):
                        run.gauge.append((loop.time() - t0, float(found[1])))
                await asyncio.sleep(0.25)

        if target.metrics:
            side.append(asyncio.create_task(watch()))
        await asyncio.gather(*(client() for _ in range(conns)))
        failed = [t.exception() for t in side if t.done() and not t.cancelled()]
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        if error := next((e for e in failed if e is not None), None):
            raise error
    return run


# ------------------------------------------------------------------ figures


def rotation(
    answers: list[Answer], recover_at: float | None, window: float = 1.0
) -> dict[str, Any]:
    """From the deployment each answer names: when the bad one first served nothing for
    `window` seconds while others served at least 10 answers (out of rotation), and the
    first answer it served after `recover_at` with a share of at least 20% in the next
    `window` seconds (back in rotation)."""
    served = sorted((a.start + a.seconds, a.deployment == "bad") for a in answers if a.deployment)
    recover_at = float("inf") if recover_at is None else recover_at
    ends = [t for t, _ in served]
    bad = [t for t, is_bad in served if is_bad]
    out = back = None
    for i, t in enumerate(bad):
        following = bad[i + 1] if i + 1 < len(bad) else float("inf")
        others = bisect.bisect(ends, t + window) - bisect.bisect(ends, t)
        if out is None and t < recover_at and following > t + window and others >= 10:
            out = t
        if back is None and t >= recover_at:
            lo, hi = bisect.bisect_left(ends, t), bisect.bisect(ends, t + window)
            share = sum(is_bad for _, is_bad in served[lo:hi]) / max(hi - lo, 1)
            if share >= 0.2:
                back = t - recover_at
    return {"out_s": out, "back_after_recovery_s": back, "served_by_bad": len(bad)}


def timeline(answers: list[Answer], step: float = 0.5) -> list[list[float]]:
    """Per `step` seconds of answers' end times: [start, answers, served by bad, failed]."""
    buckets: dict[int, list[int]] = {}
    for a in answers:
        b = buckets.setdefault(int((a.start + a.seconds) / step), [0, 0, 0])
        b[0] += 1
        b[1] += a.deployment == "bad"
        b[2] += not a.ok
    return [[k * step, *buckets[k]] for k in sorted(buckets)]


def from_gauge(run: Run) -> dict[str, Any]:
    out = next((t for t, v in run.gauge if v == 1.0), None)
    back, recovered = None, run.recovered_at
    if recovered is not None:
        back = next((t - recovered for t, v in run.gauge if t >= recovered and v == 0.0), None)
    return {"out_s": out, "back_after_recovery_s": back}


def summary(answers: list[Answer], upstreams: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ms = [a.seconds * 1000 for a in answers]
    calls = sum(u["requests"] for u in upstreams.values())
    return {
        "requests": len(answers),
        "success_pct": 100.0 * sum(a.ok for a in answers) / len(answers),
        "statuses": dict(Counter(a.status for a in answers)),
        "upstream_calls": calls,
        "upstreams": upstreams,
        "calls_per_request": calls / len(answers),
        "p50_ms": harness.pct(ms, 50),
        "p99_ms": harness.pct(ms, 99),
        "max_ms": max(ms),
    }


# ------------------------------------------------------------------ the scenarios


class Mocks:
    """The two mock upstreams: their faults and their request counts."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.base = {name: f"http://{HOST}:{port}" for name, port in ports.items()}

    def call(self, method: str, name: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload)
        status, _, data = harness.http(method, self.base[name] + path, body)
        if status != 200:
            raise BenchError(f"{method} {self.base[name]}{path} -> {status}: {data[:300]!r}")
        return json.loads(data)

    def reset(self) -> None:
        for name in self.base:
            self.call("DELETE", name, "/mock/faults")
            self.call("POST", name, "/mock/reset")

    def calls(self) -> dict[str, dict[str, Any]]:
        """Each mock's requests and the faults it injected."""
        stats = {n: self.call("GET", n, "/mock/stats") for n in self.base}
        return {n: {"requests": s["requests"], "faults": s["faults"]} for n, s in stats.items()}


def scenarios(bench: Bench, target: Target, mocks: Mocks) -> dict[str, Any]:
    args = bench.args
    mocks.reset()
    warm = uvloop.run(_load(target, 200, 8, 0)).answers
    if sum(a.ok for a in warm) < 200:
        raise BenchError(f"{target.name}: warm-up failed: {Counter(a.status for a in warm)}")
    mocks.reset()
    mocks.call("POST", "bad", "/mock/faults", {**FAULTS, "seed": args.seed})
    recover = (int(args.requests * args.recover_after), mocks.base["bad"] + "/mock/faults")

    def chaos() -> Run:
        return uvloop.run(_load(target, args.requests, args.conns, args.rate, recover))

    run, cpu = bench.measure(f"{target.name} chaos", chaos)
    out = {"chaos": summary(run.answers, mocks.calls()) | {"cpu": cpu}}
    out["chaos"]["recovered_at_s"] = run.recovered_at
    out["chaos"]["rotation"] = rotation(run.answers, run.recovered_at)
    out["chaos"]["timeline"] = timeline(run.answers)
    if target.metrics:
        out["chaos"]["ejected_gauge"] = from_gauge(run)
    mocks.reset()
    for name in mocks.base:
        mocks.call("POST", name, "/mock/faults", {"down": True})

    def down() -> list[Answer]:
        return uvloop.run(_load(target, args.down_requests, args.conns, 0)).answers

    answers, cpu = bench.measure(f"{target.name} all down", down)
    out["down"] = summary(answers, mocks.calls()) | {"cpu": cpu}
    failed = [a.seconds * 1000 for a in answers if a.status == 503]
    out["down"]["p99_503_ms"] = harness.pct(failed, 99)
    mocks.reset()
    c, d = out["chaos"], out["down"]
    harness.log(
        f"{target.name}: {c['success_pct']:.2f}% ok, {c['calls_per_request']:.3f} calls/request, "
        f"out at {c['rotation']['out_s']}, back {c['rotation']['back_after_recovery_s']} s "
        f"after recovery; all down: {d['statuses']}, p99 {d['p99_ms']:.1f} ms"
    )
    return out


# ------------------------------------------------------------------ report


def report(res: dict[str, dict[str, Any]], args: Any) -> list[str]:
    names = list(res)

    def secs(value: float | None) -> str:
        return "not seen" if value is None else f"{value:.1f}"

    def row(label: str, goal: str, cell: Callable[[dict[str, Any]], str]) -> list[str]:
        return [label, goal, *(cell(res[n]) for n in names)]

    def latency(part: dict[str, Any]) -> str:
        return f"{fmt(part['p50_ms'], 1)} / {fmt(part['p99_ms'], 1)}"

    def statuses(part: dict[str, Any]) -> str:
        return ", ".join(f"{code}: {n}" for code, n in sorted(part["statuses"].items()))

    rows = [
        row("client success", f">= {TARGET_SUCCESS_PCT}%",
            lambda r: f"{r['chaos']['success_pct']:.2f}%"),
        row("upstream calls / request", f"<= {TARGET_CALLS_PER_REQUEST}",
            lambda r: f"{r['chaos']['calls_per_request']:.3f}"),
        row("p50 / p99 latency (ms)", "", lambda r: latency(r["chaos"])),
        row("bad deployment out of rotation at (s)", f"<= {EJECTION_WINDOW_S:g}",
            lambda r: secs(r["chaos"]["rotation"]["out_s"])),
        row("back in rotation after its recovery (s)", "",
            lambda r: secs(r["chaos"]["rotation"]["back_after_recovery_s"])),
        row("all down: statuses", "503", lambda r: statuses(r["down"])),
        row("all down: p50 / p99 latency (ms)", f"p99 < {TARGET_DOWN_P99_MS:g}",
            lambda r: latency(r["down"])),
        row("all down: upstream calls / request", "",
            lambda r: f"{r['down']['calls_per_request']:.2f}"),
    ]  # fmt: skip
    if any("ejected_gauge" in r["chaos"] for r in res.values()):
        rows.append(row("the same, from sluice_deployment_ejected: out at / back after (s)", "",
            lambda r: " / ".join(secs(v) for v in r["chaos"]["ejected_gauge"].values())
            if "ejected_gauge" in r["chaos"] else "n/a"))  # fmt: skip
    heads = {"sluice": "Sluice", "litellm": "LiteLLM"}
    return [harness.table(["Metric", "Goal", *(heads[n] for n in names)], rows)]


def main() -> int:
    parser = harness.parser(__doc__)
    parser.set_defaults(tries=1)  # outcomes, not speed: a disturbed run is noted, not repeated
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--rate", type=float, default=250.0, help="req/s at most (0: no pacing)")
    parser.add_argument(
        "--recover-after", type=float, default=0.6, help="share of requests sent: faults off"
    )
    parser.add_argument("--down-requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1, help="of the bad deployment's faults")
    parser.add_argument(
        "--backoff-initial", type=float, help="Sluice's resilience.retries.backoff_initial"
    )
    parser.add_argument("--skip-sluice", action="store_true")
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--litellm-venv", default="bench/.work/litellm-venv")
    parser.add_argument("--mock-port", type=int, default=9100, help="good; bad: the next one")
    parser.add_argument("--port", type=int, default=8080, help="Sluice's")
    parser.add_argument("--litellm-port", type=int, default=4000)
    args = harness.parse(parser)
    ports = {"good": args.mock_port, "bad": args.mock_port + 1}
    env = {"BENCH_UPSTREAM_KEY": UPSTREAM_KEY, "PYTHONPATH": str(harness.REPO / "src")}
    res: dict[str, dict[str, Any]] = {}
    sluice = harness.venv_bin("sluice")
    with Bench("chaos", args) as bench:
        exe = None if args.skip_litellm else litellm(harness.REPO / args.litellm_venv)
        for name, port in ports.items():
            argv = [sluice, "mock-upstream", "--port", str(port)]
            ready = f"http://{HOST}:{port}/mock/faults"
            bench.start(f"mock-{name}", argv, cores=AUX, env=env, ready=ready)
        mocks = Mocks(ports)
        configs = {
            "sluice": sluice_config(ports, args.backoff_initial),
            "litellm": litellm_config(ports),
        }
        paths = {}
        for name, settings in configs.items():
            paths[name] = bench.work / f"{name}.yaml"
            paths[name].write_text(yaml.safe_dump(settings, sort_keys=False))
        if not args.skip_sluice:
            base = f"http://{HOST}:{args.port}"
            argv = [sluice, "serve", "--config", str(paths["sluice"]), "--port", str(args.port)]
            proc = bench.start("sluice", argv, cores=GATEWAY, env=env, ready=base + "/readyz")
            target = Target(
                "sluice", base + "/v1/chat/completions", None,
                lambda h: h.get("x-sluice-deployment"), base + "/metrics",
            )  # fmt: skip
            try:
                res["sluice"] = scenarios(bench, target, mocks)
            finally:
                bench.stop(proc)
        if exe:
            base = f"http://{HOST}:{args.litellm_port}"
            argv = [exe, "--config", str(paths["litellm"]), "--host", HOST]
            argv += ["--port", str(args.litellm_port), "--num_workers", "1"]
            # no network here: LiteLLM reads its bundled model cost map
            lite_env = env | {
                "LITELLM_MASTER_KEY": LITELLM_KEY,
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            }
            proc = bench.start(
                "litellm", argv, cores=GATEWAY, env=lite_env,
                ready=base + "/health/liveliness", timeout=300,
            )  # fmt: skip
            by_base = {f"http://{HOST}:{port}/v1": name for name, port in ports.items()}
            target = Target(
                "litellm", base + "/v1/chat/completions", LITELLM_KEY,
                lambda h: by_base.get(h.get("x-litellm-model-api-base", "")),
            )  # fmt: skip
            try:
                res["litellm"] = scenarios(bench, target, mocks)
            finally:
                bench.stop(proc)
            python = str(Path(exe).parent / "python")
            code = "import importlib.metadata as m; print(m.version('litellm'))"
            bench.machine["litellm"] = harness.command_output([python, "-c", code])
        bench.machine["versions"] = harness.versions("sluice-gateway", "aiohttp", "uvloop")
        bench.finish({"configs": configs, "faults": FAULTS, **res}, report(res, args))
    return 0


if __name__ == "__main__":
    harness.main(main)
