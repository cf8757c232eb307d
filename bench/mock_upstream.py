"""The mock OpenAI upstream of the gateway benchmarks: nginx answering fixed bodies.

    POST /v1/chat/completions         -> a fixed chat.completion JSON
    POST /stream/v1/chat/completions  -> a fixed SSE body: 11 chunks, then data: [DONE]

The configs in bench/ name two models, `gpt-4o-mini` (JSON) and `gpt-4o-mini-stream`
(SSE), because nginx cannot branch on the request's `stream` flag. They point at
127.0.0.1:9100; `config()` rewrites the port when a benchmark runs the mock elsewhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from harness import AUX, BENCH, HOST, Bench, BenchError, Proc

PORT = 9100
MODEL = "gpt-4o-mini"
REPLY_WORDS = ["Hello", "!", " This", " is", " a", " fixed", " benchmark", " reply", "."]
REPLY_TEXT = "".join(REPLY_WORDS)
_MESSAGES = [{"role": "user", "content": "Say hello."}]
_COMPACT = (",", ":")
REQUEST_BODY = json.dumps(
    {"model": MODEL, "messages": _MESSAGES, "max_tokens": 16}, separators=_COMPACT
)
STREAM_REQUEST_BODY = json.dumps(
    {"model": MODEL + "-stream", "messages": _MESSAGES, "max_tokens": 16, "stream": True},
    separators=_COMPACT,
)


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=_COMPACT)


def chat_body() -> str:
    message = {"role": "assistant", "content": REPLY_TEXT, "refusal": None}
    return _dump(
        {
            "id": "chatcmpl-bench0000000000000000000001",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20},
        }
    )


def sse_body() -> str:
    def chunk(delta: dict[str, Any], finish: str | None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        event = {
            "id": "chatcmpl-bench0000000000000000000002",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [choice],
        }
        return f"data: {_dump(event)}\n\n"

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": word}, None) for word in REPLY_WORDS]
    return "".join([*events, chunk({}, "stop"), "data: [DONE]\n\n"])


def _quote(text: str) -> str:
    """A single-quoted nginx parameter."""
    if "$" in text:
        raise ValueError("nginx would read '$' as a variable")
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def start(bench: Bench, port: int = PORT, cores: str = AUX) -> Proc:
    """nginx from bench/nginx.conf (rendered into the work folder), ready on `port`."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise BenchError("nginx not found (Debian package nginx)")
    folder = bench.work / f"nginx-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    conf = (BENCH / "nginx.conf").read_text()
    for name, value in {
        "WORKDIR": str(folder),
        "PORT": str(port),
        "CHAT_BODY": _quote(chat_body()),
        "SSE_BODY": _quote(sse_body()),
    }.items():
        conf = conf.replace(f"@@{name}@@", value)
    (folder / "nginx.conf").write_text(conf)
    argv = [nginx, "-p", str(folder), "-c", str(folder / "nginx.conf")]
    return bench.start(f"nginx-{port}", argv, cores=cores, ready=f"http://{HOST}:{port}/healthz")


def config(bench: Bench, path: str, name: str, port: int = PORT, **changes: Any) -> str:
    """The config to serve: `path` itself, or a copy (work folder, `name`.yaml) with the
    mock's port rewritten and top-level `changes` applied (a value of None removes a key)."""
    if port == PORT and not changes:
        return path
    text = (BENCH.parent / path).read_text().replace(f"{HOST}:{PORT}/", f"{HOST}:{port}/")
    settings = yaml.safe_load(text)
    for key, value in changes.items():
        if value is None:
            settings.pop(key, None)
        elif isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    out = bench.work / f"{name}.yaml"
    out.write_text(yaml.safe_dump(settings, sort_keys=False))
    return str(out.relative_to(BENCH.parent))
