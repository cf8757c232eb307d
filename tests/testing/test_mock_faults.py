"""The mock upstream's random faults (`sluice.testing.faults`), over a real loopback socket."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import make_mocked_request

from sluice.testing import MockFaults, MockUpstream
from sluice.testing.faults import Fault, FaultInjector
from sluice.testing.mock_upstream import _from_loopback

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


def outcome(client: httpx.Client, url: str, **body: Any) -> int | str:
    """The status of one chat request, or "reset" when the connection broke."""
    try:
        return client.post(f"{url}/chat/completions", json={**CHAT, **body}).status_code
    except httpx.TransportError:
        return "reset"


def test_a_mock_without_faults_injects_none(client: httpx.Client) -> None:
    with MockUpstream() as mock:
        assert client.get(f"{mock.base_url}/mock/faults").json() == MockFaults().model_dump()
        assert [outcome(client, mock.url) for _ in range(5)] == [200] * 5
        assert mock.stats.faults == {}


def test_shares_are_disjoint_and_seeded_draws_repeat(client: httpx.Client) -> None:
    faults = MockFaults(error_rate=0.3, error_status=503, reset_rate=0.1, seed=7)
    runs = []
    for _ in range(2):
        with MockUpstream(faults=faults) as mock:
            runs.append([outcome(client, mock.url) for _ in range(100)])
            assert mock.stats.requests == 100
            assert mock.stats.faults == {
                "error": runs[-1].count(503),
                "reset": runs[-1].count("reset"),
            }
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 503, "reset"}
    assert 15 <= runs[0].count(503) <= 45
    assert 2 <= runs[0].count("reset") <= 20


def test_shares_that_fill_one_leave_no_request_unharmed(client: httpx.Client) -> None:
    faults = MockFaults(error_rate=0.5, throttle_rate=0.5, retry_after=0.25, seed=1)
    with MockUpstream(faults=faults) as mock:
        replies = [client.post(f"{mock.url}/chat/completions", json=CHAT) for _ in range(20)]
    assert {r.status_code for r in replies} == {500, 429}
    throttled = next(r for r in replies if r.status_code == 429)
    assert throttled.headers["retry-after"] == "1"  # whole seconds, rounded up
    assert throttled.headers["retry-after-ms"] == "250"
    assert throttled.json()["error"]["type"] == "rate_limit_error"
    failed = next(r for r in replies if r.status_code == 500)
    assert failed.json()["error"] == {
        "message": "mock injected fault: status 500",
        "type": "api_error",
        "param": None,
        "code": "mock_fault",
    }
    assert "retry-after" not in failed.headers


def test_stall_before_the_first_byte_then_the_answer(client: httpx.Client) -> None:
    with MockUpstream(faults=MockFaults(stall_rate=1.0, stall_seconds=0.3)) as mock:
        start = time.monotonic()
        reply = client.post(f"{mock.url}/chat/completions", json=CHAT)
        assert reply.status_code == 200
        assert time.monotonic() - start >= 0.3
        with httpx.Client(timeout=0.1) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post(f"{mock.url}/chat/completions", json=CHAT)
        assert mock.stats.faults == {"stall": 2}


def test_stream_stall_after_the_first_event(client: httpx.Client) -> None:
    faults = MockFaults(stream_stall_rate=1.0, stream_stall_seconds=0.4)
    with MockUpstream(faults=faults) as mock:
        start = time.monotonic()
        body = {**CHAT, "stream": True}
        with client.stream("POST", f"{mock.url}/chat/completions", json=body) as r:
            lines = (line for line in r.iter_lines() if line)
            assert '"role":"assistant"' in next(lines)
            first = time.monotonic() - start
            rest = list(lines)
        whole = time.monotonic() - start
        assert first < 0.3
        assert whole >= 0.4
        assert rest[-1] == "data: [DONE]"
        # A complete (non-stream) answer has no stream to stall.
        start = time.monotonic()
        assert client.post(f"{mock.url}/chat/completions", json=CHAT).status_code == 200
        assert time.monotonic() - start < 0.3
        assert mock.stats.faults == {"stream_stall": 1}


def test_added_latency_and_jitter(client: httpx.Client) -> None:
    faults = MockFaults(added_latency_ms=100, latency_jitter_ms=50, seed=3)
    with MockUpstream(faults=faults) as mock:
        for _ in range(3):
            start = time.monotonic()
            assert outcome(client, mock.url) == 200
            assert time.monotonic() - start >= 0.1
        assert mock.stats.faults == {}  # latency is not counted as a fault


def test_down_and_back_through_the_control_endpoint(client: httpx.Client) -> None:
    with MockUpstream() as mock:
        control = f"{mock.base_url}/mock/faults"
        changed = client.post(control, json={"down": True})
        assert changed.status_code == 200
        assert changed.json()["down"] is True
        assert [outcome(client, mock.url) for _ in range(3)] == ["reset"] * 3
        with pytest.raises(httpx.TransportError):
            client.get(f"{mock.url}/models")
        stats = client.get(f"{mock.base_url}/mock/stats").json()
        assert stats["requests"] == 4  # received, then refused
        assert stats["faults"] == {"down": 4}

        # A change merges over what is in force.
        assert client.post(control, json={"error_rate": 1.0}).json()["down"] is True
        assert client.post(control, json={"down": False}).json()["error_rate"] == 1.0
        assert outcome(client, mock.url) == 500
        assert client.delete(control).json() == MockFaults().model_dump()
        assert outcome(client, mock.url) == 200
        assert mock.faults == MockFaults()


def test_a_seed_set_at_run_time_restarts_the_draws(client: httpx.Client) -> None:
    with MockUpstream() as mock:
        control = f"{mock.base_url}/mock/faults"
        runs = []
        for _ in range(2):
            client.post(control, json={"error_rate": 0.5, "seed": 11})
            runs.append([outcome(client, mock.url) for _ in range(30)])
        assert runs[0] == runs[1]
        assert set(runs[0]) == {200, 500}
        # A change without a seed goes on with the same sequence, not from its start.
        mock.set_faults(error_status=502)
        assert [outcome(client, mock.url) for _ in range(30)] != [
            502 if o == 500 else o for o in runs[0]
        ]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b'{"latency": 5}', "latency: Extra inputs are not permitted"),
        (b'{"error_rate": 1.5}', "error_rate: Input should be less than or equal to 1"),
        (b'{"error_rate": "0.5"}', "error_rate: Input should be a valid number"),
        (b'{"down": 1}', "down: Input should be a valid boolean"),
        (b'{"error_status": 200}', "error_status: Input should be greater than or equal to 400"),
        (b'{"stall_seconds": -1}', "stall_seconds: Input should be greater than or equal to 0"),
        (b'{"error_rate": 0.6, "stall_rate": 0.5}', "exceeds 1"),
    ],
)
def test_invalid_fault_changes_are_refused(client: httpx.Client, body: bytes, problem: str) -> None:
    with MockUpstream() as mock:
        reply = client.post(f"{mock.base_url}/mock/faults", content=body)
        assert reply.status_code == 400
        assert problem in reply.json()["error"]["message"]
        assert mock.faults == MockFaults()  # nothing changed
    with pytest.raises(ValueError, match="exceeds 1"):
        MockFaults(reset_rate=0.7, throttle_rate=0.7)


class _Transport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


@pytest.mark.parametrize(
    ("peer", "allowed"), [("127.0.0.1", True), ("::1", True), ("10.1.2.3", False)]
)
def test_faults_are_changed_from_loopback_only(peer: str, allowed: bool) -> None:
    request = make_mocked_request("POST", "/mock/faults", transport=_Transport((peer, 4000)))
    assert _from_loopback(request) is allowed


def test_the_draw_of_a_request() -> None:
    injector = FaultInjector(MockFaults(stall_rate=1.0, stall_seconds=2.0, added_latency_ms=5))
    draw = injector.draw()
    assert draw.fault is Fault.STALL
    assert (draw.stall_s, draw.latency_s, draw.stream_stall_s) == (2.0, 0.005, 0.0)
    injector.set(MockFaults(down=True, error_rate=1.0))
    assert injector.draw().fault is Fault.DOWN  # down wins over every share


def test_cli_flags_set_the_faults() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "sluice", "mock-upstream", "--port", str(port)]
    bad = subprocess.run(
        [*argv, "--error-rate", "0.8", "--stall-rate", "0.5"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "exceeds 1" in bad.stderr
    proc = subprocess.Popen(
        [*argv, "--error-rate", "1", "--error-status", "503", "--seed", "5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                faults = httpx.get(f"{url}/mock/faults", timeout=1).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the mock did not start"
                time.sleep(0.05)
        assert (faults["error_rate"], faults["error_status"], faults["seed"]) == (1.0, 503, 5)
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 503
    finally:
        proc.terminate()
        proc.wait(10)
