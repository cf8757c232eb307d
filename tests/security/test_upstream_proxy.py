"""Upstreams behind an HTTP proxy: the environment's and a deployment's own, CONNECT for TLS.

The proxy is a tiny asyncio one on 127.0.0.1 that records what it was asked; the upstream
behind it is a raw loopback server (TLS with a throw-away self-signed certificate made by
the openssl command).
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pydantic
import pytest

from sluice.backends.base import UpstreamCall
from sluice.backends.http1 import HTTP1Pool
from sluice.backends.openai_http import OpenAIHTTPBackend
from sluice.backends.proxy import Proxy, choose_proxy, parse_proxy
from sluice.errors import UpstreamConnectError
from sluice.settings import ConfigError, OpenAIDeployment
from tests.backends.test_http1 import HEAD, _self_signed, read_request, response, server

CALL = UpstreamCall("chat/completions", {"model": "m"}, None, "rid")
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "REQUEST_METHOD")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


# -- which proxy ---------------------------------------------------------------------------


def test_the_environment_picks_the_proxy_by_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_proxy("https://api.example.com/v1", None) is None
    monkeypatch.setenv("HTTPS_PROXY", "http://secure-proxy:3128")
    monkeypatch.setenv("HTTP_PROXY", "plain-proxy:8080")
    assert choose_proxy("https://api.example.com/v1", None) == Proxy("secure-proxy", 3128)
    assert choose_proxy("http://vllm:8000/v1", None) == Proxy("plain-proxy", 8080)
    monkeypatch.setenv("https_proxy", "http://lower:1")  # lower case wins, as in curl
    assert choose_proxy("https://api.example.com/v1", None) == Proxy("lower", 1)


def test_no_proxy_and_the_deployment_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://corp:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://corp:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal,10.1.2.3")
    assert choose_proxy("http://vllm.internal:8000/v1", None) is None
    assert choose_proxy("http://10.1.2.3:8000/v1", None) is None
    assert choose_proxy("https://api.openai.com/v1", None) == Proxy("corp", 3128)
    # The deployment's own setting overrides the environment, both ways.
    assert choose_proxy("https://api.openai.com/v1", "none") is None
    assert choose_proxy("http://vllm.internal:8000/v1", "http://other:9") == Proxy("other", 9)


def test_credentials_become_proxy_authorization() -> None:
    proxy = parse_proxy("http://al%40ice:s3cr%3At@corp:3128")
    assert (proxy.host, proxy.port) == ("corp", 3128)
    token = base64.b64encode(b"al@ice:s3cr:t")
    assert proxy.authorization == b"Proxy-Authorization: Basic " + token + b"\r\n"
    assert "s3cr" not in repr(Proxy("corp", 3128))


def test_unsupported_proxies_and_inline_secrets_are_refused() -> None:
    with pytest.raises(ConfigError, match="only http://"):
        parse_proxy("socks5://corp:1080")
    base = {"provider": "openai", "api_base": "https://api.example.com/v1"}
    with pytest.raises(pydantic.ValidationError, match=r"os\.environ/NAME"):
        OpenAIDeployment(**base, proxy="http://user:password@corp:3128")
    with pytest.raises(pydantic.ValidationError, match="http:// proxy URL"):
        OpenAIDeployment(**base, proxy="ftp://corp")
    for value in ("none", "http://corp:3128", "os.environ/CORP_PROXY"):
        assert OpenAIDeployment(**base, proxy=value).proxy == value


# -- through a real proxy -------------------------------------------------------------------


@dataclass
class ProxyLog:
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    """The head of every request the proxy received (CONNECT or absolute-form)."""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with suppress(ConnectionError, OSError):
        writer.close()


@asynccontextmanager
async def tiny_proxy(refuse: bool = False) -> AsyncIterator[ProxyLog]:
    """An HTTP proxy: CONNECT tunnels, and absolute-form requests forwarded as they are."""
    log = ProxyLog()
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await serve(reader, writer)
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return
        log.requests.append(head)
        method, target, _ = head.split(b" ", 2)
        if refuse:
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            return
        if method == b"CONNECT":
            host, port = target.decode().rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = urlsplit(target.decode())
            up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port)
            up_writer.write(head)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    log.port = srv.sockets[0].getsockname()[1]
    async with srv:
        yield log
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            request = await read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        writer.write(response(b"seen: " + request.split(b"\r\n", 1)[0]))
        await writer.drain()


async def test_plain_http_goes_through_the_deployments_proxy_in_absolute_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with server(_answer) as (url, _), tiny_proxy() as proxy:
        monkeypatch.setenv("CORP_PROXY", f"http://ann:pa55@127.0.0.1:{proxy.port}")
        spec = OpenAIDeployment(provider="openai", api_base=url, proxy="os.environ/CORP_PROXY")
        backend = OpenAIHTTPBackend("dep-1", spec, None)
        await backend.start()
        for _ in range(2):
            reply = await backend.send(CALL)
            assert reply.body == f"seen: POST {url}/chat/completions HTTP/1.1".encode()
        await backend.close()
    assert len(proxy.requests) == 1  # one kept-alive connection to the proxy for both
    assert proxy.requests[0].startswith(f"POST {url}/chat/completions HTTP/1.1\r\n".encode())
    assert b"\r\nProxy-Authorization: Basic " + base64.b64encode(b"ann:pa55") in proxy.requests[0]


async def test_the_environment_proxy_and_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async with server(_answer) as (url, connections), tiny_proxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        via_env = OpenAIHTTPBackend("a", OpenAIDeployment(provider="openai", api_base=url), None)
        await via_env.start()  # the environment is read here, once
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        bypassed = OpenAIHTTPBackend("b", OpenAIDeployment(provider="openai", api_base=url), None)
        await bypassed.start()
        await via_env.send(CALL)
        assert len(proxy.requests) == 1
        await bypassed.send(CALL)
        assert len(proxy.requests) == 1  # NO_PROXY: straight to the upstream
        for backend in (via_env, bypassed):
            await backend.close()
    assert len(connections) == 2


async def test_a_proxy_that_refuses_is_a_502_that_does_not_name_it() -> None:
    async with tiny_proxy(refuse=True) as proxy:
        via = Proxy("127.0.0.1", proxy.port)
        client = HTTP1Pool("https://api.example.com/v1", 2, 2, 2, name="dep-1", proxy=via)
        with pytest.raises(UpstreamConnectError) as caught:
            await client.post("/x", HEAD, b"{}")
    assert caught.value.code == "upstream_proxy_auth_failed"
    assert str(proxy.port) not in caught.value.message
    assert proxy.requests[0].startswith(b"CONNECT api.example.com:443 HTTP/1.1\r\n")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_https_goes_through_a_connect_tunnel_and_is_verified_end_to_end(
    tmp_path: Path,
) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def tls_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(ssl.SSLError, ConnectionError):
            await _answer(reader, writer)
        writer.close()

    upstream = await asyncio.start_server(tls_answer, "127.0.0.1", 0, ssl=context)
    port = upstream.sockets[0].getsockname()[1]
    async with upstream, tiny_proxy() as proxy:
        url = f"https://localhost:{port}/v1"
        via = Proxy("127.0.0.1", proxy.port, parse_proxy("http://u:p@x").authorization)
        client = HTTP1Pool(url, 2, 2, 2, ca_file=str(cert), name="dep-1", proxy=via)
        for _ in range(2):
            reply = await client.post("/chat/completions", HEAD, b"{}")
            assert reply.body == b"seen: POST /v1/chat/completions HTTP/1.1"  # origin form
        await client.close()
        untrusted = HTTP1Pool(url, 2, 2, 2, name="dep-1", proxy=via)
        with pytest.raises(UpstreamConnectError, match="TLS handshake failed"):
            await untrusted.post("/chat/completions", HEAD, b"{}")
    assert len(proxy.requests) == 2  # one tunnel kept alive, one refused handshake
    assert proxy.requests[0].startswith(f"CONNECT localhost:{port} HTTP/1.1\r\n".encode())
    assert b"Proxy-Authorization: Basic " + base64.b64encode(b"u:p") in proxy.requests[0]
