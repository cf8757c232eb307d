"""Schemathesis over the whole OpenAPI document (admin and /v1) with the master key: no 5xx.

The gateway runs with auth on (a master key, keys and usage in SQLite under tmp_path) in
front of the mock upstream, which is never asked to fail: any 5xx is the gateway's own.
Every operation of the document is fuzzed, with data that fits the schema and data that
does not (Schemathesis' positive and negative modes, its coverage phase's boundary values,
then random cases). ``SLUICE_FUZZ_EXAMPLES`` sets the examples per operation (default 30,
bounded for CI); docs/security/fuzz.md has the longer run's figures.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

from sluice.app import build_app
from sluice.settings import Settings
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway
from tests.services import fresh_postgres_database, require_redis

MASTER = "sk-master-for-fuzzing-0123456789"
MASTER_ENV = "SLUICE_FUZZ_MASTER_KEY"
EXAMPLES = int(os.environ.get("SLUICE_FUZZ_EXAMPLES", "30"))
SERVED = ("gpt-4o-mini", "text-embedding-3-small")


def gateway_config(upstream_url: str, data_dir: Path) -> dict[str, Any]:
    config = config_for(upstream_url)
    config["models"][0]["pricing"] = {"prompt_per_million": 1000, "completion_per_million": 2000}
    config.update(
        auth={"master_key": f"os.environ/{MASTER_ENV}", "key_cache_ttl": 0},
        usage={"enabled": True, "flush_interval": 0.05},
        data_dir=str(data_dir),
    )
    return config


def served_document() -> dict[str, Any]:
    """The document such a gateway serves, read from an app that is built and never
    started (nothing opens before the lifespan): Schemathesis needs the operations when
    pytest collects the tests, before any fixture runs. (Its fixture loader,
    ``schemathesis.pytest.from_fixture``, fails on pytest 9: it sets ``Function._nodeid``.)
    `test_the_fuzzed_document_is_the_served_one` holds it to the running gateway's."""
    os.environ[MASTER_ENV] = MASTER
    os.environ.setdefault("SLUICE_TEST_UPSTREAM_KEY", "sk-upstream-secret")  # as running_gateway
    app = build_app(Settings(**gateway_config("http://127.0.0.1:9", Path("unused"))))
    return app.state.api.openapi()  # type: ignore[no-any-return]


DOCUMENT = served_document()
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=SchemathesisConfig.from_dict(
        {"headers": {"Authorization": f"Bearer {MASTER}"}, "request-timeout": 10}
    ),
)


class Target:
    """The running gateway: its URL and a key that exists."""

    def __init__(self, url: str, key_id: str) -> None:
        self.url = url
        self.key_id = key_id


@pytest.fixture(
    scope="module",
    params=[
        "sqlite+memory",
        pytest.param("postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis]),
    ],
)
def target(
    request: pytest.FixtureRequest, upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    os.environ[MASTER_ENV] = MASTER
    config = gateway_config(upstream.url, tmp_path_factory.mktemp("fuzz"))
    with ExitStack() as stack:
        if request.param == "postgres+redis":
            config["redis_url"] = require_redis()
            config["database_url"] = stack.enter_context(fresh_postgres_database())
        url = stack.enter_context(running_gateway(config))
        base = url.removesuffix("/v1")
        created = httpx.post(
            f"{base}/admin/keys", json={"rpm": 1000}, headers={"Authorization": f"Bearer {MASTER}"}
        )
        assert created.status_code == 201, created.text
        yield Target(base, created.json()["id"])


def _pick(value: object, choices: int) -> int:
    """A stable choice from a generated value, so a failing case replays the same way."""
    return hashlib.sha256(repr(value).encode()).digest()[0] % choices


def steer(case: Any, key_id: str) -> None:
    """Point two thirds of the cases at things that exist (a served model, a real key), so
    the fuzzer reaches past the 404s into the upstream call and the key store; and drop
    the mock upstream's own control field, which could ask it to fail or stall."""
    body = case.body
    if isinstance(body, dict):
        body.pop("mock", None)
        if isinstance(body.get("model"), str) and _pick(body["model"], 3):
            body["model"] = SERVED[_pick(body, 2)]
    params = case.path_parameters or {}
    if "key_id" in params and _pick(params["key_id"], 3):
        params["key_id"] = key_id
    if "model" in params and _pick(params["model"], 3):
        params["model"] = SERVED[0]


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_no_operation_answers_a_server_error(case: Any, target: Target) -> None:
    steer(case, target.key_id)
    case.call_and_validate(base_url=target.url, checks=[not_a_server_error])


def test_the_fuzzed_document_is_the_served_one(target: Target) -> None:
    operations = {
        f"{method.upper()} {path}" for path, item in DOCUMENT["paths"].items() for method in item
    }
    assert {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/embeddings",
        "GET /v1/models",
        "GET /v1/models/{model}",
        "POST /admin/keys",
        "PATCH /admin/keys/{key_id}",
        "GET /admin/usage",
    } <= operations
    served = httpx.get(f"{target.url}/openapi.json", headers={"Authorization": f"Bearer {MASTER}"})
    assert served.json() == DOCUMENT


# What Schemathesis' generators leave out (they write UTF-8 text, dates near today and
# shallow values): the cases below each answered 500 before their fix, and a Hypothesis
# test over the same kinds of value keeps looking.

SURROGATE = b'"\\ud800"'  # a lone surrogate, as JSON's \u escape carries it
DEEP = b"[" * 40 + b"]" * 40


def _admin(target: Target) -> httpx.Client:
    return httpx.Client(
        base_url=target.url, headers={"Authorization": f"Bearer {MASTER}"}, timeout=10
    )


def _key_count(admin: httpx.Client) -> int:
    return len(admin.get("/admin/keys", params={"include_revoked": True}).json()["data"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"expires_at": "9999-12-31T23:59:59-05:00"}', "expires_at"),  # OverflowError
        (b'{"expires_at": "0001-01-01T00:00:00+05:00"}', "expires_at"),
        (b'{"metadata": {"user": ' + SURROGATE + b"}}", "metadata"),  # stored, then a 500
        (b'{"metadata": {' + SURROGATE + b": 1}}", "metadata"),
        (b'{"models": [' + SURROGATE + b"]}", "models"),
        (b'{"model_limits": {' + SURROGATE + b': {"rpm": 1}}}', "model_limits"),
        (b'{"metadata": {"a": ' + DEEP + b"}}", "metadata"),  # too deep to serialise
        (b'{"metadata": {"a": 1e400}}', "metadata"),  # Infinity: PostgreSQL's JSON refuses it
        (b'{"budget_usd": "Infinity"}', "budget_usd"),
    ],
)
def test_hostile_key_settings_are_a_400_that_changes_nothing(
    target: Target, body: bytes, param: str
) -> None:
    with _admin(target) as admin:
        before = _key_count(admin)
        for method, path in (("POST", "/admin/keys"), ("PATCH", f"/admin/keys/{target.key_id}")):
            response = admin.request(
                method, path, content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == param
        assert _key_count(admin) == before


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/admin/usage", {"since": "9999-12-31T23:59:59-05:00"}),  # OverflowError
        ("/admin/usage", {"until": "0001-01-01T00:00:00+05:00"}),
        ("/admin/usage", {"since": "2024-01-01T00:00:00"}),  # naive: as_utc's ValueError
        ("/admin/usage", {"key_id": "\x00"}),  # PostgreSQL: text cannot hold NUL
        ("/admin/usage", {"model": "a\x00b"}),
        ("/admin/keys/key_%00", {}),
    ],
)
def test_hostile_queries_are_not_server_errors(
    target: Target, path: str, params: dict[str, str]
) -> None:
    with _admin(target) as admin:
        response = admin.get(path, params=params)
        assert response.status_code < 500, response.text
        if "%00" in path:
            assert response.status_code == 404
            assert admin.patch(path, json={"rpm": 5}).status_code == 404
            assert admin.delete(path).status_code == 404


timezones = st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
moments = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59)).map(
        datetime.isoformat
    ),
    st.builds(
        lambda moment, offset: moment.replace(tzinfo=timezone(offset)).isoformat(),
        st.sampled_from([datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59)]),
        timezones,
    ),
)
texts = st.text(st.characters(codec=None), max_size=6)  # lone surrogates and NUL included
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts, moments),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=10,
)
nested = st.integers(min_value=1, max_value=60).map(lambda n: json.loads("[" * n + "]" * n))
settings_fields = st.sampled_from(
    ["models", "model_limits", "metadata", "expires_at", "budget_usd", "rpm", "priority"]
)


def _json(value: Any) -> bytes:
    """JSON as stdlib json writes it: lone surrogates as \\u escapes, inf as Infinity."""
    return json.dumps(value).encode()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    change=st.dictionaries(settings_fields, st.one_of(json_values, moments), max_size=3),
    deep=st.one_of(st.none(), nested),
    query=st.dictionaries(st.sampled_from(["key_id", "model", "since", "until"]), moments | texts),
)
def test_hostile_admin_values_never_answer_a_server_error(
    target: Target, change: dict[str, Any], deep: str | None, query: dict[str, str]
) -> None:
    if deep is not None:
        change["metadata"] = {"x": deep}
    body = _json(change)
    headers = {"content-type": "application/json"}
    with _admin(target) as admin:
        before = _key_count(admin)
        created = admin.post("/admin/keys", content=body, headers=headers)
        assert created.status_code in (201, 400), created.text
        assert _key_count(admin) == before + (created.status_code == 201)
        patched = admin.patch(f"/admin/keys/{target.key_id}", content=body, headers=headers)
        assert patched.status_code in (200, 400), patched.text
        # Lone surrogates go as their raw (invalid UTF-8) bytes, as a hostile client may send.
        wire = {k: v.encode("utf-8", "surrogatepass") for k, v in query.items() if v}
        usage = admin.get("/admin/usage?" + urlencode(wire))
        assert usage.status_code in (200, 400), usage.text
