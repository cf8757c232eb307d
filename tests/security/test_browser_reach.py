"""Open mode in a browser's reach: cross-site simple POSTs, DNS rebinding and CORS
(issue 18, point 4)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from sluice.api.edge import host_name, is_json, served_hosts
from sluice.settings import ServerSettings
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BODY = orjson.dumps(CHAT)


@pytest.fixture(scope="module")
def open_gateway(upstream: MockUpstream) -> Iterator[str]:
    """Open mode (no master key) on 127.0.0.1, as ``sluice serve`` starts by default."""
    with running_gateway(config_for(upstream.url)) as url:
        yield url


def post(url: str, headers: dict[str, str], body: bytes = BODY) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", content=body, headers=headers)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",  # fetch(url, {method: "POST", body: "..."}) from any page
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",  # an HTML form, or curl -d
        "multipart/form-data; boundary=x",
        None,  # fetch with a Blob or ArrayBuffer body sends no type at all
    ],
)
def test_a_body_that_is_not_declared_json_is_415_and_goes_nowhere(
    open_gateway: str, upstream: MockUpstream, content_type: str | None
) -> None:
    before = upstream.stats.requests
    headers = {} if content_type is None else {"content-type": content_type}
    response = post(open_gateway, headers)
    assert response.status_code == 415
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "unsupported_media_type")
    assert upstream.stats.requests == before


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/x+json",
    ],
)
def test_json_bodies_are_served(open_gateway: str, content_type: str) -> None:
    assert post(open_gateway, {"content-type": content_type}).status_code == 200


def test_body_less_requests_need_no_content_type(open_gateway: str) -> None:
    assert httpx.get(f"{open_gateway}/models").status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example"])
def test_a_rebound_host_name_is_421(open_gateway: str, upstream: MockUpstream, host: str) -> None:
    before = upstream.stats.requests
    response = post(open_gateway, {"content-type": "application/json", "host": host})
    assert response.status_code == 421
    assert response.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{open_gateway}/models", headers={"host": host}).status_code == 421
    assert upstream.stats.requests == before


@pytest.mark.parametrize("host", ["localhost:8080", "LOCALHOST", "127.0.0.1:1", "[::1]:8080"])
def test_loopback_names_are_served_on_a_loopback_bind(open_gateway: str, host: str) -> None:
    assert httpx.get(f"{open_gateway}/models", headers={"host": host}).status_code == 200


def test_cors_is_off_unless_configured(open_gateway: str) -> None:
    preflight = httpx.options(
        f"{open_gateway}/chat/completions",
        headers={
            "origin": "https://evil.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )
    assert "access-control-allow-origin" not in preflight.headers
    simple = httpx.get(f"{open_gateway}/models", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


def test_configured_cors_origins(upstream: MockUpstream) -> None:
    config: dict[str, Any] = config_for(upstream.url)
    config["server"] = {"cors_origins": ["https://app.example"]}
    with running_gateway(config) as url:
        ask = {"access-control-request-method": "POST", "access-control-request-headers": "x"}
        allowed = httpx.options(
            f"{url}/chat/completions", headers={"origin": "https://app.example", **ask}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(
            f"{url}/chat/completions", headers={"origin": "https://evil.example", **ask}
        )
        assert other.status_code == 400
        reply = post(url, {"content-type": "application/json", "origin": "https://app.example"})
        assert reply.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in reply.headers["access-control-expose-headers"]


def test_configured_allowed_hosts(upstream: MockUpstream) -> None:
    config: dict[str, Any] = config_for(upstream.url)
    config["server"] = {"allowed_hosts": ["gateway.internal"]}
    with running_gateway(config) as url:
        models = f"{url}/models"
        assert httpx.get(models, headers={"host": "gateway.internal:443"}).status_code == 200
        assert httpx.get(models, headers={"host": "localhost"}).status_code == 421
        # Probes come by address (a kubelet sends the pod's IP): served whatever the Host;
        # the main port's /metrics keeps the check.
        base = url.removesuffix("/v1")
        probe = {"host": "10.1.2.3:8080"}
        assert httpx.get(f"{base}/healthz", headers=probe).status_code == 200
        assert httpx.get(f"{base}/readyz", headers=probe).status_code == 200
        assert httpx.get(f"{base}/metrics", headers=probe).status_code == 421


def test_served_hosts_follow_the_bind() -> None:
    loopback = served_hosts(ServerSettings(host="127.0.0.1"))
    assert loopback == {b"localhost", b"127.0.0.1", b"[::1]"}
    assert served_hosts(ServerSettings(host="::1")) == {b"localhost", b"127.0.0.1", b"[::1]"}
    assert served_hosts(ServerSettings(host="0.0.0.0")) is None
    assert served_hosts(ServerSettings(host="::")) is None
    assert served_hosts(ServerSettings(host="10.1.2.3")) == {b"10.1.2.3"}
    assert served_hosts(ServerSettings(host="0.0.0.0", allowed_hosts=["A.example"])) == {
        b"a.example"
    }
    assert served_hosts(ServerSettings(allowed_hosts=["*"])) is None


def test_header_parsing() -> None:
    assert host_name(b"Example.COM:80") == b"example.com"
    assert host_name(b"[::1]:8080") == b"[::1]"
    assert host_name(b"[::1]") == b"[::1]"
    assert is_json(b"application/json")
    assert is_json(b"application/problem+json; charset=utf-8")
    assert not is_json(b"text/plain")
    assert not is_json(b"application/jsonx")
    assert not is_json(b"")
