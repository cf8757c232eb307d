"""Reaching an upstream through an HTTP proxy: which proxy, and the CONNECT tunnel for TLS.

The proxy comes from the deployment's ``proxy`` setting when it names one (a URL, or
``none`` for a direct connection), else from the environment, read once when the backend
starts: ``HTTPS_PROXY`` for https upstreams, ``HTTP_PROXY`` for plain ones, ``NO_PROXY``
for exceptions, lower-case names first (``urllib.request``'s own rules, so Sluice agrees
with curl, pip and requests). Credentials in the proxy URL are sent as
``Proxy-Authorization: Basic``. Only ``http://`` proxies are spoken to; a TLS upstream is
reached by ``CONNECT host:port`` and TLS over the tunnel, a plain one by absolute-form
requests (``POST http://host:port/path``), the way every HTTP/1.1 proxy expects.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from sluice.errors import UpstreamConnectError
from sluice.settings import ConfigError

log = logging.getLogger("sluice.upstream")

DIRECT = "none"
_MAX_CONNECT_HEAD = 16 * 1024  # bytes of a proxy's CONNECT answer before it is refused


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    authorization: bytes | None = None
    """The whole ``Proxy-Authorization: Basic …\\r\\n`` line, when the URL has credentials."""


def parse_proxy(url: str) -> Proxy:
    """A proxy URL (``http://[user:password@]host[:port]``) as a `Proxy`."""
    if "://" not in url:
        url = "http://" + url  # curl and requests accept a bare host:port
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(
            f"proxy {parts.scheme}://{parts.hostname or ''}: only http:// proxies are supported "
            "(TLS upstreams still get end-to-end TLS through a CONNECT tunnel)"
        )
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ConfigError(f"proxy {parts.hostname}: bad port") from exc
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = b"Proxy-Authorization: Basic " + base64.b64encode(pair) + b"\r\n"
    return Proxy(parts.hostname, port, authorization)


def choose_proxy(api_base: str, setting: str | None) -> Proxy | None:
    """The proxy to reach ``api_base`` through, or None for a direct connection.

    ``setting`` is the deployment's resolved ``proxy``: None defers to the environment.
    """
    if setting is not None:
        return None if setting.strip().lower() == DIRECT else parse_proxy(setting)
    parts = urlsplit(api_base)
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(parts.scheme)
    if not url:
        return None
    host = parts.hostname or ""
    target = f"{host}:{parts.port}" if parts.port else host
    # proxy_bypass_environment is public in the module but missing from typeshed.
    if urllib.request.proxy_bypass_environment(target, proxies):  # type: ignore[attr-defined]
        return None
    return parse_proxy(url)


class _ConnectReply(asyncio.Protocol):
    """Collects a proxy's answer to CONNECT; nothing else may arrive before TLS starts."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head = bytearray()
        self.done: asyncio.Future[bytes] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.head += data
        if self.done.done():
            return
        if b"\r\n\r\n" in self.head:
            self.done.set_result(bytes(self.head))
        elif len(self.head) > _MAX_CONNECT_HEAD:
            self.done.set_exception(_tunnel_error("answered CONNECT with an oversized head"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(_tunnel_error("closed the connection during CONNECT"))


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, proxy: Proxy, host: str, port: int, name: str
) -> asyncio.Transport:
    """A TCP connection through ``proxy`` to ``host:port`` (CONNECT), ready for TLS.

    The caller bounds the time; on failure the connection is closed and an
    `UpstreamConnectError` raised whose message names the deployment, not the proxy.
    """
    transport, reply = await loop.create_connection(
        lambda: _ConnectReply(loop), proxy.host, proxy.port
    )
    try:
        authority = f"[{host}]" if ":" in host else host
        transport.write(
            b"".join(
                (
                    f"CONNECT {authority}:{port} HTTP/1.1\r\nHost: {authority}:{port}\r\n".encode(),
                    proxy.authorization or b"",
                    b"\r\n",
                )
            )
        )
        head = await reply.done
        status_line = head.partition(b"\r\n")[0]
        fields = status_line.split(b" ", 2)
        status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
        if not status_line.startswith(b"HTTP/1.") or not 200 <= status < 300:
            log.warning(
                "proxy %s:%d refused CONNECT for deployment %s: %r",
                proxy.host,
                proxy.port,
                name,
                status_line[:200],
            )
            code = "upstream_proxy_auth_failed" if status == 407 else "upstream_proxy_error"
            raise UpstreamConnectError(
                f"upstream {name}: the HTTP proxy refused the connection", code=code
            )
        if head.index(b"\r\n\r\n") + 4 != len(head):
            raise _tunnel_error("sent bytes after its CONNECT answer")
    except BaseException:
        transport.close()
        raise
    return transport


def _tunnel_error(what: str) -> UpstreamConnectError:
    return UpstreamConnectError(f"the HTTP proxy {what}", code="upstream_proxy_error")
