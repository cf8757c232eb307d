"""Outages through the real gateway: a deployment that dies and comes back, every
deployment down, an outage that retries must not make worse, and a fallback model that
serves while a model cannot (faults from the mock upstream, `sluice.testing.faults`)."""

from __future__ import annotations

import httpx
import pytest

from sluice.testing import MockUpstream
from tests.gateway import free_port, running_gateway
from tests.resilience.helpers import MODEL, calls, chat, config, deployment, metric, until


def test_a_deployment_that_dies_and_comes_back(
    a: MockUpstream, b: MockUpstream, client: httpx.Client
) -> None:
    a.set_faults(down=True)
    health = {"consecutive_failures": 3, "ejection_base": 0.5}
    with running_gateway(config(deployment(a, "a"), deployment(b, "b"), health=health)) as base:
        answers = [chat(client, base) for _ in range(20)]
        assert [x.status for x in answers] == [200] * 20
        assert {x.deployment for x in answers} == {"b"}
        assert a.stats.faults == {"down": 3}
        labels = {"model": MODEL, "deployment": "a", "reason": "consecutive"}
        assert metric(base, "sluice_deployment_ejections_total", **labels) == 1

        a.set_faults(down=False)

        def a_serves() -> bool:
            answer = chat(client, base)
            assert answer.status == 200
            return answer.deployment == "a"

        # Its ejection (0.5 s) ends, a half-open probe succeeds, and it is back.
        assert until(a_serves, timeout=3.0, what="the deployment's return") < 2.0
        answers = [chat(client, base) for _ in range(40)]
        assert [x.status for x in answers] == [200] * 40
        assert sum(x.deployment == "a" for x in answers) >= 10
        assert a.stats.faults == {"down": 3}  # never called while it was out


def test_every_deployment_down_gets_a_fast_503(a: MockUpstream, client: httpx.Client) -> None:
    a.set_faults(down=True)  # "a" resets every request; nothing listens at "gone"'s address
    gone = f"http://127.0.0.1:{free_port()}/v1"
    with running_gateway(config(deployment(a, "a"), deployment(gone, "gone"))) as base:
        answers = [chat(client, base) for _ in range(30)]
    assert [x.status for x in answers] == [503] * 30
    assert max(x.seconds for x in answers) < 0.5
    assert all(x.attempts is None or x.attempts <= 3 for x in answers)
    assert calls(a) <= 30 * 3


def test_retries_cannot_amplify_an_outage(
    a: MockUpstream, b: MockUpstream, client: httpx.Client
) -> None:
    for upstream in (a, b):
        upstream.set_faults(error_rate=1.0)
    retries = {"budget_ratio": 0.2, "budget_min_per_second": 0}
    with running_gateway(config(deployment(a, "a"), deployment(b, "b"), retries=retries)) as base:
        answers = [chat(client, base) for _ in range(50)]
    assert [x.status for x in answers] == [500] * 50
    # Retries are at most a fifth of the requests (one retry may round up).
    assert calls(a, b) <= 50 * 1.2 + 1
    assert all(x.attempts is not None and x.attempts <= 3 for x in answers)
    assert any(x.headers.get("x-should-retry") == "false" for x in answers if x.attempts != 1)


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_fallback_model_serves_while_every_deployment_fails(
    a: MockUpstream, b: MockUpstream, client: httpx.Client, stream: bool
) -> None:
    a.set_faults(error_rate=1.0)
    b.set_faults(down=True)
    with MockUpstream() as backup:
        settings = config(
            deployment(a, "a"),
            deployment(b, "b"),
            model={"fallbacks": ["backup"]},
            extra_models=[{"name": "backup", "deployments": [deployment(backup, "c")]}],
        )
        with running_gateway(settings) as base:
            answers = [chat(client, base, stream=stream) for _ in range(10)]
        assert calls(backup) == 10
    for answer in answers:
        assert answer.status == 200
        assert answer.headers["x-sluice-model"] == "backup"
        assert answer.deployment == "c"
        if stream:
            assert answer.events is not None
            assert answer.events[-1] == "[DONE]"
