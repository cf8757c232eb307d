"""Every failure a client can meet arrives in OpenAI's envelope with the right status."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette

from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, free_port, running_gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def envelope(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]  # type: ignore[no-any-return]


@pytest.fixture
def http(gateway: str) -> Iterator[httpx.Client]:
    json_type = {"content-type": "application/json"}  # raw bodies too: others get 415
    with httpx.Client(base_url=gateway, timeout=10, headers=json_type) as client:
        yield client


def test_malformed_json_is_400(http: httpx.Client) -> None:
    response = http.post("/chat/completions", content=b'{"model": "gpt-4o-mini", ')
    assert response.status_code == 400
    error = envelope(response)
    assert error["type"] == "invalid_request_error"
    assert "could not parse the JSON body" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": 5, "messages": [{"role": "user"}]}, "model"),
        ({"model": "gpt-4o-mini"}, "messages"),
        (
            {"model": "gpt-4o-mini", "messages": [{"role": "user"}, {"content": "x"}]},
            "messages[1].role",
        ),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "n": "2"}, "n"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**CHAT, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ],
)
def test_schema_violations_name_the_field(
    http: httpx.Client, upstream: MockUpstream, body: dict[str, Any], param: str
) -> None:
    before = upstream.stats.requests
    response = http.post("/chat/completions", json=body)
    assert response.status_code == 400
    assert envelope(response)["param"] == param
    assert upstream.stats.requests == before  # bad input changes nothing upstream


def test_json_that_is_not_an_object_is_400(http: httpx.Client) -> None:
    response = http.post("/embeddings", content=b"[1, 2]")
    assert response.status_code == 400
    assert "JSON object" in envelope(response)["message"]


def test_embeddings_input_is_checked(http: httpx.Client) -> None:
    response = http.post("/embeddings", json={"model": "text-embedding-3-small", "input": []})
    assert response.status_code == 400
    assert envelope(response)["param"] == "input"


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    big = {**CHAT, "padding": "x" * (4 * 1024 * 1024)}
    response = http.post("/chat/completions", json=big)
    assert response.status_code == 413
    assert envelope(response)["code"] == "request_too_large"


def test_chunked_body_over_the_limit_is_413(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "gpt-4o-mini", "padding": "'
        for _ in range(80):
            yield b"x" * 65536
        yield b'"}'

    response = http.post("/chat/completions", content=chunks())
    assert response.status_code == 413


def test_unknown_route_and_wrong_method(http: httpx.Client) -> None:
    response = http.get("/nowhere")
    assert response.status_code == 404
    assert envelope(response)["type"] == "not_found_error"
    response = http.get("/chat/completions")
    assert response.status_code == 405
    assert envelope(response)["code"] == "method_not_allowed"


def test_upstream_4xx_is_relayed_byte_for_byte(http: httpx.Client, upstream: MockUpstream) -> None:
    response = http.post("/chat/completions", json={**CHAT, "mock": {"status": 404}})
    assert response.status_code == 404
    assert envelope(response)["message"] == "mock injected status 404"
    direct = httpx.post(f"{upstream.url}/chat/completions", json={**CHAT, "mock": {"status": 404}})
    assert response.content == direct.content


def test_an_upstream_that_resets_every_call_is_down_503(http: httpx.Client) -> None:
    response = http.post("/chat/completions", json={**CHAT, "mock": {"reset": True}})
    assert response.status_code == 503
    assert envelope(response)["code"] == "upstream_unreachable"
    assert response.headers["x-sluice-attempts"] == "3"  # each call retried, none answered


def test_unreachable_upstream_is_503() -> None:
    with running_gateway(config_for(f"http://127.0.0.1:{free_port()}/v1")) as url:
        response = httpx.post(f"{url}/chat/completions", json=CHAT, timeout=10)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    error = envelope(response)
    assert error["code"] == "upstream_unreachable"
    assert "sk-upstream" not in response.text


@pytest.fixture(scope="module")
def impatient_gateway(upstream: MockUpstream) -> Iterator[str]:
    config = config_for(upstream.url, timeout={"connect": 1, "first_byte": 0.3, "total": 2})
    with running_gateway(config) as url:
        yield url


def test_upstream_first_byte_timeout_is_504(impatient_gateway: str) -> None:
    response = httpx.post(
        f"{impatient_gateway}/chat/completions", json={**CHAT, "mock": {"stall": True}}, timeout=10
    )
    assert response.status_code == 504
    assert envelope(response)["code"] == "upstream_read_timeout"


def test_upstream_total_timeout_ends_a_stream_with_an_error_event(impatient_gateway: str) -> None:
    # Each chunk arrives within first_byte (0.3 s), but the whole stream would take 5 s > 2 s.
    body = {**CHAT, "stream": True, "mock": {"tokens_per_second": 5, "completion_tokens": 25}}
    with httpx.stream("POST", f"{impatient_gateway}/chat/completions", json=body) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert orjson.loads(events[-2].removeprefix("data: "))["error"]["code"] == "upstream_timeout"
    assert 3 < len(events) < 20


def test_stalled_stream_ends_with_an_error_event(impatient_gateway: str) -> None:
    body = {**CHAT, "stream": True, "mock": {"stall_after_chunks": 1}}
    with httpx.stream("POST", f"{impatient_gateway}/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = orjson.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "upstream_read_timeout"


class ExplodingBackend:
    name = "exploding"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, call: Any) -> Any:
        raise RuntimeError("secret internal detail")


def test_unexpected_exceptions_become_a_bare_500(upstream: MockUpstream) -> None:
    def break_backend(app: Starlette) -> None:
        app.state.router.deployments("gpt-4o-mini")[0].backend = ExplodingBackend()

    with running_gateway(config_for(upstream.url), prepare=break_backend) as url:
        response = httpx.post(f"{url}/chat/completions", json=CHAT)
    assert response.status_code == 500
    error = envelope(response)
    assert error["message"] == "The server had an error while processing your request."
    assert "secret internal detail" not in response.text


def test_a_client_leaving_mid_body_is_not_an_error(
    gateway: str, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = gateway.removeprefix("http://").removesuffix("/v1").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"mo'
        )
    time.sleep(0.3)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
