"""Checks at the door, before any route runs: which ``Host`` is served, which bodies are JSON.

Open mode (no master key) serves anyone who can reach the port, and a web browser on the
same machine can reach 127.0.0.1. Two browser tricks are shut here:

- **Cross-site POSTs.** A page on any site may POST ``text/plain`` (or a form, or a Blob
  with no type at all) to another origin without a CORS preflight; the browser hides the
  answer, but the request runs and spends the operator's upstream keys. A POST/PUT/PATCH
  with a body must say ``application/json`` (or ``application/*+json``), which a browser
  only sends cross-origin after a preflight that CORS (off unless configured) refuses:
  anything else gets 415. A body-less request passes: it carries no prompt. The one
  exception is a file upload (``POST /v1/files``, `sluice.batches.files_api`), which must be
  ``multipart/form-data``, a type a browser may send cross-origin unasked: it passes only
  with an ``Authorization`` or ``api-key`` header, which no browser adds to a cross-origin
  request without a preflight. An upload spends no tokens in any case; a batch that would
  is created by a JSON POST.
- **DNS rebinding.** A page on ``evil.example`` whose name then resolves to 127.0.0.1 is
  same-origin with the gateway and may read its answers; its requests still say
  ``Host: evil.example``. Only the names in ``server.allowed_hosts`` are served (by
  default the loopback names on a loopback bind): others get 421.

Both checks look up bytes in the headers the request middleware has already read; a Host
value once found good is remembered, so a client's repeated requests cost one set look-up
(measured in docs/security/edge.md).
"""

from __future__ import annotations

import ipaddress

from sluice.errors import MisdirectedRequestError, SluiceError, UnsupportedMediaTypeError
from sluice.settings import ServerSettings

_LOOPBACK_NAMES = frozenset({b"localhost", b"127.0.0.1", b"[::1]"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_JSON = b"application/json"
_MULTIPART = b"multipart/form-data"
_UPLOAD_PATHS = frozenset({"/v1/files", "/files"})
_REMEMBERED_HOSTS = 64


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


def served_hosts(server: ServerSettings) -> frozenset[bytes] | None:
    """The Host names (lower case, without port; IPv6 in brackets) that are served;
    None for any."""
    configured = server.allowed_hosts
    if configured is not None:
        if "*" in configured:
            return None
        return frozenset(_bracketed(name).lower().encode("idna") for name in configured)
    if is_loopback(server.host):
        return _LOOPBACK_NAMES | {_bracketed(server.host).encode()}
    if _is_wildcard(server.host):
        return None
    return frozenset({_bracketed(server.host).lower().encode("idna")})


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def host_name(value: bytes) -> bytes:
    """``Host`` without its port, lower case: ``[::1]:8080`` → ``[::1]``."""
    if value.startswith(b"["):
        end = value.find(b"]")
        return value[: end + 1].lower() if end > 0 else value.lower()
    return value.partition(b":")[0].lower()


def is_json(content_type: bytes) -> bool:
    if content_type == _JSON:
        return True
    media = content_type.partition(b";")[0].strip().lower()
    return media == _JSON or (media.startswith(b"application/") and media.endswith(b"+json"))


def is_upload(method: str, path: str, content_type: bytes, headers: dict[bytes, bytes]) -> bool:
    """A file upload a browser could not have sent cross-origin without a preflight."""
    return (
        method == "POST"
        and path in _UPLOAD_PATHS
        and content_type.partition(b";")[0].strip().lower() == _MULTIPART
        and (b"authorization" in headers or b"api-key" in headers)
    )


class EdgeChecks:
    """421 for a Host not served, 415 for a non-JSON body: called by the request middleware
    (`sluice.api.middleware.ObserveRequests`) with the headers it has already read, so
    the checks cost no ASGI layer of their own."""

    def __init__(self, hosts: frozenset[bytes] | None) -> None:
        self.hosts = hosts
        self._good_hosts: set[bytes] = set()

    def refusal(
        self, method: str, headers: dict[bytes, bytes], path: str = ""
    ) -> SluiceError | None:
        host = headers.get(b"host")
        if self.hosts is not None and host is not None and host not in self._good_hosts:
            if host_name(host) not in self.hosts:
                return MisdirectedRequestError(
                    "This server does not serve that host name; add it to "
                    "server.allowed_hosts if it is yours.",
                    param="Host",
                )
            if len(self._good_hosts) < _REMEMBERED_HOSTS:
                self._good_hosts.add(host)
        if method in _BODY_METHODS and (
            headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        ):
            content_type = headers.get(b"content-type")
            if content_type is None or not (
                is_json(content_type) or is_upload(method, path, content_type, headers)
            ):
                return UnsupportedMediaTypeError(
                    "Request bodies must be JSON: send 'Content-Type: application/json'.",
                    param="Content-Type",
                )
        return None
