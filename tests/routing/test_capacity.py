"""Load shedding: a deployment's concurrency cap, its bounded FIFO queue, the process's bound
on waiting requests, the maximum wait, and the share kept for priority keys."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from sluice.errors import DeploymentBusyError, ReservedCapacityError
from sluice.observability.metrics import GatewayMetrics
from sluice.routing.capacity import Capacity, LoadShedding
from sluice.routing.settings import QueueSettings

HIGH, LOW = True, False


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def shedding(
    *,
    max_waiting: int = 1024,
    deployment_max_waiting: int = 2,
    max_wait: float = 10.0,
    reserved_share: float = 0.0,
    priorities: bool = True,
    clock: Callable[[], float] = time.monotonic,
    registry: CollectorRegistry | None = None,
) -> LoadShedding:
    settings = QueueSettings(
        max_waiting=max_waiting,
        deployment_max_waiting=deployment_max_waiting,
        max_wait=max_wait,
        reserved_share=reserved_share,
    )
    metrics = GatewayMetrics(registry or CollectorRegistry())
    return LoadShedding(settings, metrics, priorities=priorities, clock=clock)


def capacity(limit: int = 1, *, name: str = "d0", **options: object) -> Capacity:
    built = shedding(**options).capacity("m", name, limit)  # type: ignore[arg-type]
    assert built is not None
    return built


async def settle() -> None:
    """Let every task that can run do so (a few loop turns)."""
    for _ in range(5):
        await asyncio.sleep(0)


def waiter(cap: Capacity, high: bool, log: list[object], label: object) -> asyncio.Task[None]:
    async def run() -> None:
        try:
            await cap.wait(high)
        except DeploymentBusyError as exc:
            log.append((label, exc))
            return
        log.append(label)

    return asyncio.create_task(run())


async def queue_up(cap: Capacity, count: int) -> tuple[list[object], list[asyncio.Task[None]]]:
    """``count`` low-class waiters, queued in order; what they log, and their tasks."""
    log: list[object] = []
    tasks = [waiter(cap, LOW, log, i) for i in range(count)]
    await settle()
    return log, tasks


async def serve(cap: Capacity, clock: FakeClock, times: int, every: float) -> None:
    """Finish a request every ``every`` seconds, ``times`` times."""
    for _ in range(times):
        clock.now += every
        cap.release()
        await settle()


async def dismiss(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await settle()


def test_take_up_to_the_cap_then_release() -> None:
    cap = capacity(2)
    assert cap.take(LOW)
    assert cap.take(LOW)
    assert not cap.take(LOW)
    assert not cap.take(HIGH)
    cap.release()
    assert cap.take(LOW)
    assert cap.active == 2


async def test_waiters_are_served_first_come_first_served() -> None:
    cap = capacity(1, deployment_max_waiting=3)
    assert cap.take(LOW)
    served: list[object] = []
    tasks = [waiter(cap, LOW, served, i) for i in range(3)]
    await settle()
    assert cap.waiting == 3
    assert served == []
    for expected in ([0], [0, 1], [0, 1, 2]):
        cap.release()  # the slot goes straight to the next waiter: never free in between
        assert cap.active == 1
        assert not cap.take(HIGH)
        await settle()
        assert served == expected
    await asyncio.gather(*tasks)
    assert cap.waiting == 0
    assert cap._room.waiting == 0


async def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    registry = CollectorRegistry()
    cap = capacity(1, deployment_max_waiting=2, registry=registry)
    assert cap.take(LOW)
    _log, tasks = await queue_up(cap, 2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeploymentBusyError) as refused:
        await cap.wait(LOW)
    assert loop.time() - started < 0.005  # decided on arrival, no wait at all
    error = refused.value
    assert type(error) is DeploymentBusyError
    assert error.http_status == 503
    assert error.code == "deployment_busy"
    assert error.headers == {"Retry-After": "1"}  # nothing measured yet
    assert "queue is full" in error.message
    assert _shed(registry, "queue_full") == 1
    await dismiss(tasks)


async def test_max_wait_refuses_at_the_bound_not_later() -> None:
    registry = CollectorRegistry()
    cap = capacity(1, max_wait=0.1, registry=registry)
    assert cap.take(LOW)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeploymentBusyError) as refused:
        await cap.wait(LOW)
    waited = loop.time() - started
    assert 0.099 <= waited < 0.2  # the timer fires at the bound: nothing waits longer
    assert "within 0.1 s" in refused.value.message
    assert refused.value.headers["Retry-After"] == "1"
    assert cap.waiting == 0
    assert cap._room.waiting == 0
    assert _shed(registry, "wait_timeout") == 1
    cap.release()  # nobody left to hand it to
    assert cap.active == 0
    assert _wait_count(registry) == 1


async def test_the_process_wide_bound_covers_every_deployment() -> None:
    registry = CollectorRegistry()
    shared = shedding(max_waiting=1, deployment_max_waiting=5, registry=registry)
    first, second = shared.capacity("m", "a", 1), shared.capacity("m", "b", 1)
    assert first is not None
    assert second is not None
    assert first.take(LOW)
    assert second.take(LOW)
    log: list[object] = []
    task = waiter(first, LOW, log, "a")
    await settle()
    assert shared.room.waiting == 1
    with pytest.raises(DeploymentBusyError):
        await second.wait(LOW)  # its own queue is empty; the process's is full
    assert _shed(registry, "queue_full", "b") == 1
    first.release()
    await task
    assert log == ["a"]
    assert shared.room.waiting == 0


async def test_low_class_may_not_take_the_reserved_slots() -> None:
    registry = CollectorRegistry()
    cap = capacity(5, reserved_share=0.2, deployment_max_waiting=0, registry=registry)
    assert all(cap.take(LOW) for _ in range(4))
    assert not cap.take(LOW)
    with pytest.raises(ReservedCapacityError) as refused:
        await cap.wait(LOW)
    error = refused.value
    assert error.http_status == 429
    assert error.type == "rate_limit_error"
    assert error.code == "priority_capacity_reserved"
    assert error.headers == {"Retry-After": "1"}
    assert _shed(registry, "reserved") == 1
    assert cap.take(HIGH)  # the reserved slot is there for a priority key
    with pytest.raises(DeploymentBusyError) as full:
        await cap.wait(LOW)  # now a priority key would be refused too: 503, not 429
    assert type(full.value) is DeploymentBusyError
    assert _shed(registry, "queue_full") == 1


async def test_low_class_may_not_take_the_reserved_queue_places() -> None:
    cap = capacity(1, reserved_share=0.2, deployment_max_waiting=5)  # 4 places for low
    assert cap.take(LOW)
    log, tasks = await queue_up(cap, 4)
    with pytest.raises(ReservedCapacityError):
        await cap.wait(LOW)
    high = waiter(cap, HIGH, log, "high")
    await settle()
    assert cap.waiting == 5
    assert log == []
    with pytest.raises(DeploymentBusyError) as full:
        await cap.wait(HIGH)
    assert type(full.value) is DeploymentBusyError
    cap.release()
    await settle()
    assert log == ["high"]  # first, though it came last
    for task in [*tasks, high]:
        task.cancel()
    await settle()


async def test_the_process_wide_bound_keeps_its_share_too() -> None:
    shared = shedding(max_waiting=5, deployment_max_waiting=10, reserved_share=0.2)
    cap = shared.capacity("m", "a", 1)
    assert cap is not None
    assert cap.take(LOW)
    log, tasks = await queue_up(cap, 4)
    with pytest.raises(ReservedCapacityError):
        await cap.wait(LOW)
    tasks.append(waiter(cap, HIGH, log, "high"))
    await settle()
    assert shared.room.waiting == 5
    await dismiss(tasks)
    assert shared.room.waiting == 0


async def test_high_class_waiters_are_served_before_low() -> None:
    cap = capacity(1, deployment_max_waiting=4)
    assert cap.take(LOW)
    served: list[object] = []
    tasks = [
        waiter(cap, LOW, served, "low-1"),
        waiter(cap, HIGH, served, "high-1"),
        waiter(cap, LOW, served, "low-2"),
        waiter(cap, HIGH, served, "high-2"),
    ]
    await settle()
    for _ in tasks:
        cap.release()
        await settle()
    assert served == ["high-1", "high-2", "low-1", "low-2"]


async def test_a_released_reserved_slot_is_not_handed_to_the_low_class() -> None:
    cap = capacity(5, reserved_share=0.2, deployment_max_waiting=5)
    assert all(cap.take(LOW) for _ in range(4))
    assert cap.take(HIGH)
    served: list[object] = []
    task = waiter(cap, LOW, served, "low")
    await settle()
    cap.release()  # four still taken: the free one is the reserved one
    await settle()
    assert served == []
    assert cap.active == 4
    cap.release()
    await task
    assert served == ["low"]
    assert cap.active == 4


async def test_retry_after_follows_the_measured_drain_rate() -> None:
    clock = FakeClock()
    cap = capacity(1, deployment_max_waiting=10, max_wait=8, clock=clock)
    assert cap.take(LOW)
    _log, tasks = await queue_up(cap, 6)
    assert cap.retry_after() == 1  # no rate measured yet
    await serve(cap, clock, 3, every=2)  # one request done every 2 s
    assert cap.waiting == 3
    assert cap.retry_after() == 8  # (3 ahead + 1) x 2 s
    await serve(cap, clock, 1, every=2)
    assert cap.retry_after() == 6
    await dismiss(tasks)


async def test_retry_after_is_bounded_by_max_wait() -> None:
    clock = FakeClock()
    cap = capacity(1, deployment_max_waiting=10, max_wait=3, clock=clock)
    assert cap.take(LOW)
    _log, tasks = await queue_up(cap, 3)
    await serve(cap, clock, 2, every=60)
    assert cap.retry_after() == 3
    await dismiss(tasks)


async def test_refused_at_once_when_the_queue_cannot_drain_within_max_wait() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    cap = capacity(1, deployment_max_waiting=10, max_wait=5, clock=clock, registry=registry)
    assert cap.take(LOW)
    log, tasks = await queue_up(cap, 4)
    await serve(cap, clock, 2, every=2)  # 2 s a request
    assert cap.waiting == 2
    # Two ahead and itself at 2 s each: 6 s > max_wait. Refused now, not in 5 s.
    with pytest.raises(DeploymentBusyError) as refused:
        await cap.wait(LOW)
    assert "within 5 s" in refused.value.message
    assert refused.value.headers == {"Retry-After": "5"}
    assert _shed(registry, "wait_timeout") == 1
    # A priority key has nobody ahead of it: one gap, well within max_wait.
    tasks.append(waiter(cap, HIGH, log, "high"))
    await settle()
    assert cap.waiting == 3
    await dismiss(tasks)


async def test_a_new_busy_spell_forgets_the_old_rate() -> None:
    clock = FakeClock()
    cap = capacity(1, deployment_max_waiting=10, max_wait=5, clock=clock)
    assert cap.take(LOW)
    log, tasks = await queue_up(cap, 2)
    await serve(cap, clock, 2, every=30)  # a slow spell
    assert cap.waiting == 0
    task = waiter(cap, LOW, log, "later")  # would be refused on the old rate
    await settle()
    assert cap.waiting == 1
    cap.release()
    await asyncio.gather(*tasks, task)
    assert log == [0, 1, "later"]


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    cap = capacity(1, deployment_max_waiting=2)
    assert cap.take(LOW)
    log: list[object] = []
    leaving = waiter(cap, LOW, log, "leaving")
    staying = waiter(cap, LOW, log, "staying")
    await settle()
    leaving.cancel()
    await settle()
    assert cap.waiting == 1
    assert cap._room.waiting == 1
    cap.release()
    await staying
    assert log == ["staying"]
    assert cap.active == 1


async def test_a_slot_handed_to_a_waiter_cancelled_meanwhile_is_passed_on() -> None:
    cap = capacity(1, deployment_max_waiting=2)
    assert cap.take(LOW)
    log: list[object] = []
    first = waiter(cap, LOW, log, "first")
    second = waiter(cap, LOW, log, "second")
    await settle()
    cap.release()  # handed to the first...
    first.cancel()  # ...which leaves before it runs again
    await settle()
    assert first.cancelled()
    assert log == ["second"]
    assert cap.active == 1
    assert cap.waiting == 0
    await second


async def test_queue_metrics() -> None:
    registry = CollectorRegistry()
    cap = capacity(1, deployment_max_waiting=1, registry=registry)
    assert cap.take(LOW)
    log: list[object] = []
    task = waiter(cap, LOW, log, "w")
    await settle()
    assert _gauge(registry) == 1
    cap.release()
    await task
    assert _gauge(registry) == 0
    assert _wait_count(registry) == 1


def test_no_cap_for_a_deployment_without_one_and_no_reserve_without_keys() -> None:
    plain = shedding(reserved_share=0.5, priorities=False)
    assert plain.capacity("m", "local", None) is None
    cap = plain.capacity("m", "d", 2)
    assert cap is not None
    assert cap.take(LOW)
    assert cap.take(LOW)
    with_keys = shedding(reserved_share=0.5).capacity("m", "d", 2)
    assert with_keys is not None
    assert with_keys.take(LOW)
    assert not with_keys.take(LOW)


def _value(registry: CollectorRegistry, sample: str, deployment: str, **labels: str) -> float:
    value = registry.get_sample_value(sample, {"model": "m", "deployment": deployment, **labels})
    return value or 0.0


def _shed(registry: CollectorRegistry, reason: str, deployment: str = "d0") -> float:
    return _value(registry, "sluice_shed_requests_total", deployment, reason=reason)


def _gauge(registry: CollectorRegistry) -> float:
    return _value(registry, "sluice_queue_waiting_requests", "d0")


def _wait_count(registry: CollectorRegistry) -> float:
    return _value(registry, "sluice_queue_wait_seconds_count", "d0")
