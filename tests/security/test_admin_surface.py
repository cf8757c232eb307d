"""The admin surface: the master key before any body, capped admin bodies, the docs and
metrics policies (issue 18, point 3)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sluice.api.admin import docs_access
from sluice.settings import ConfigError
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, free_port, running_gateway

MASTER = "sk-master-for-edge-tests-0123456789"
ADMIN = {"Authorization": f"Bearer {MASTER}"}


def gateway_config(upstream: MockUpstream, tmp_path: Path, **server: Any) -> dict[str, Any]:
    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    config = config_for(upstream.url)
    config.update(
        auth={"master_key": "os.environ/SLUICE_TEST_MASTER_KEY"},
        data_dir=str(tmp_path),
        server=server,
    )
    return config


@pytest.fixture
def base(upstream: MockUpstream, tmp_path: Path) -> Iterator[str]:
    with running_gateway(gateway_config(upstream, tmp_path)) as url:
        yield url.removesuffix("/v1")


def first_answer(base: str, head: bytes, timeout: float = 3) -> bytes:
    """Send only ``head`` (headers announcing a body that never comes); the answer."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        sock.sendall(b'{"rpm": 1, "padding": "')
        received = b""
        try:
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except TimeoutError:
            pass
        return received


def huge_admin_post(authorization: str = "") -> bytes:
    return (
        b"POST /admin/keys HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + authorization.encode()
        + b"Content-Length: 100000000\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("authorization", "status"),
    [("", b"401"), ("Authorization: Bearer sk-not-the-master-key-0000000\r\n", b"403")],
)
def test_a_stranger_is_refused_before_the_body_is_read(
    base: str, authorization: str, status: bytes
) -> None:
    # 100 MB announced, a few bytes sent: the answer must not wait for the rest.
    started = time.monotonic()
    answer = first_answer(base, huge_admin_post(authorization))
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert b"connection: close" in answer.lower()
    assert time.monotonic() - started < 2


def test_the_master_key_s_bodies_are_capped_by_their_declared_length(base: str) -> None:
    answer = first_answer(base, huge_admin_post(f"Authorization: Bearer {MASTER}\r\n"))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request_too_large" in answer or b"content-length" in answer


def test_the_master_key_s_chunked_bodies_are_capped_as_they_arrive(base: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"metadata": {"padding": "'
        for _ in range(4):
            yield b"x" * 32768
        yield b'"}}'

    response = httpx.post(
        f"{base}/admin/keys",
        content=chunks(),
        headers={**ADMIN, "content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    # A body under the cap still works.
    assert httpx.post(f"{base}/admin/keys", json={"rpm": 5}, headers=ADMIN).status_code == 201


def test_docs_are_behind_the_master_key_when_there_is_one(base: str) -> None:
    for path in ("/openapi.json", "/docs"):
        assert httpx.get(f"{base}{path}").status_code == 401
        assert httpx.get(f"{base}{path}", headers=ADMIN).status_code == 200


def test_docs_policies(upstream: MockUpstream, tmp_path: Path) -> None:
    with running_gateway(gateway_config(upstream, tmp_path, docs="public")) as url:
        assert httpx.get(url.replace("/v1", "/openapi.json")).status_code == 200
    with running_gateway(gateway_config(upstream, tmp_path, docs="off")) as url:
        assert httpx.get(url.replace("/v1", "/openapi.json"), headers=ADMIN).status_code == 404
        assert httpx.get(url.replace("/v1", "/docs"), headers=ADMIN).status_code == 404


def test_docs_access_defaults() -> None:
    assert docs_access("auto", "sk-master", "0.0.0.0") == "master_key"
    assert docs_access("auto", None, "127.0.0.1") == "public"  # open mode on loopback
    assert docs_access("auto", None, "::1") == "public"
    assert docs_access("auto", None, "0.0.0.0") == "off"  # open mode facing a network
    assert docs_access("public", None, "0.0.0.0") == "public"
    with pytest.raises(ConfigError, match="master_key"):
        docs_access("master_key", None, "127.0.0.1")


def test_metrics_on_a_port_of_their_own(upstream: MockUpstream, tmp_path: Path) -> None:
    port = free_port()
    with running_gateway(gateway_config(upstream, tmp_path, metrics_port=port)) as url:
        base = url.removesuffix("/v1")
        assert httpx.get(f"{base}/metrics").status_code == 404
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert scraped.status_code == 200
        assert "sluice_" in scraped.text
    with pytest.raises(httpx.TransportError):  # closed with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_metrics_stay_on_the_main_port_by_default(base: str) -> None:
    assert httpx.get(f"{base}/metrics").status_code == 200
