"""Log lines for a dependency that fails on every request, at a rate a log can hold.

While Redis is down, every request's limiter call fails: at thousands of requests a second
a warning per failure floods the log (and costs the CPU the gateway needs to keep serving).
`OutageLog` writes the first failure at once, then at most one line per ``interval``
saying how many failures happened since the previous line and the last error; the failure
count is never lost (a line is scheduled for the end of the interval). The metric that
goes with it (``sluice_limiter_failures_total``) still counts every failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable


class OutageLog:
    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        *,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._message = message  # what failed and what the gateway does about it
        self._interval = interval
        self._clock = clock
        self._last_line = float("-inf")  # when the last line was written
        self._suppressed = 0  # failures since the last line
        self._last_error: BaseException | None = None
        self._scheduled: asyncio.TimerHandle | None = None

    def failed(self, exc: BaseException) -> None:
        """One failure: logged now if no line was written within ``interval``, else
        counted into the next line (written at the end of the interval at the latest)."""
        now = self._clock()
        self._suppressed += 1
        self._last_error = exc
        next_line = self._last_line + self._interval
        if now >= next_line:
            self.flush()
            return
        if self._scheduled is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): the next failure writes it
                return
            self._scheduled = loop.call_later(next_line - now, self.flush)

    def flush(self) -> None:
        """Write the failures counted since the last line, if any."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        exc, failures = self._last_error, self._suppressed
        if exc is None:
            return
        now = self._clock()
        self._suppressed = 0
        self._last_error = None
        if failures == 1:
            self._log.warning("%s: %s", self._message, exc)
        else:
            self._log.warning(
                "%s: %d failures in %.1f s, the last: %s",
                self._message,
                failures,
                now - self._last_line,
                exc,
            )
        self._last_line = now
