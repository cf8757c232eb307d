"""The per-request pipeline: an ordered list of steps, each wrapping the next.

    identify → read → admit (settles at the end) → plan → cache → attempts → backend

A step is an object with one job; `compose` links each to the one after it (``next``), so
running a request is one call per step and no step knows which others exist. The app
chooses the list once, at start-up (`sluice.app.build_app`): a gateway without keys has no
identify or admit step, and pays nothing for them.

A step is called with the context and returns an awaitable of the reply. One that has work
after the rest of the pipeline (admission settles, attempts retry) is a coroutine; one that
only prepares the request (planning, a recognised key) is a plain method that returns
``self.next(ctx)`` itself, so it adds no coroutine to the chain: every coroutine in it is
passed through again each time the upstream call waits.

With tracing on (`sluice.observability.tracing`) `compose` puts a span around each step and
each upstream call; off, it links the steps exactly as they are, so the untraced pipeline
pays nothing for the feature.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from sluice.backends.base import UpstreamReply
from sluice.pipeline.context import RequestContext
from sluice.pipeline.reply import StreamReply

Reply = UpstreamReply | StreamReply
Handler = Callable[[RequestContext], Awaitable[Reply]]


class Step(Protocol):
    next: Handler
    """The rest of the pipeline; set by `compose`."""

    def __call__(self, ctx: RequestContext) -> Awaitable[Reply]: ...


class StepTracer(Protocol):
    """Wraps handlers in spans (`sluice.observability.tracing.Tracing`)."""

    def step(self, step: Step) -> Handler:
        """``step`` run inside a span of its own."""

    def upstream(self, last: Handler) -> Handler:
        """The upstream call, one span per attempt."""


def compose(steps: Sequence[Step], last: Handler, tracer: StepTracer | None = None) -> Handler:
    """Link ``steps`` in order in front of ``last``; the returned handler runs them all.

    With a ``tracer`` each step's ``next`` is the traced handler of the one after it, while
    the steps themselves stay what they are: whoever relinks a step later (the shadow link)
    still finds it in the list."""
    handler = last if tracer is None else tracer.upstream(last)
    for step in reversed(steps):
        step.next = handler
        handler = step if tracer is None else tracer.step(step)
    return handler
