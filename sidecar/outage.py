"""Log a Redis outage in a few lines, not one per refused request.

A warning when the first request is refused (with the cause), then at most one summary every
`SUMMARY_EVERY` seconds while requests keep being refused (how many, by kind), and one info
line when Redis answers again (how long the outage lasted, how many requests it refused).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from sidecar.metrics import REDIS_ERROR_KINDS

#: Seconds between two summaries of one outage.
SUMMARY_EVERY = 5.0


class OutageLog:
    """Tell *logger* about Redis outages, reading the time from *clock* (seconds)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        every: float = SUMMARY_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = logger
        self.every = every
        self.clock = clock
        #: Whether an outage is under way: a request was refused and Redis has not answered since.
        self.active = False
        self._started = self._summarised = 0.0
        self._total = 0
        self._since: Counter[str] = Counter()  # refusals since the last line, by kind

    def refused(self, kind: str, cause: str) -> None:
        """Note a request refused because Redis failed (*kind*: timeout, connection, reply)."""
        now = self.clock()
        if not self.active:
            self.active = True
            self._started = self._summarised = now
            self._total = 0
            self._since.clear()
            self.log.warning("redis unavailable (%s: %s); refusing requests", kind, cause)
        self._total += 1
        self._since[kind] += 1
        if now - self._summarised >= self.every:
            counts = ", ".join(f"{k} {self._since[k]}" for k in REDIS_ERROR_KINDS)
            self.log.warning(
                "redis still unavailable after %.1f s: %d requests refused in the last %.1f s (%s)",
                now - self._started,
                self._since.total(),
                now - self._summarised,
                counts,
            )
            self._summarised = now
            self._since.clear()

    def answered(self) -> None:
        """Note that Redis answered: end the outage under way, if any."""
        if self.active:
            self.active = False
            self.log.info(
                "redis answers again after %.1f s; %d requests refused during the outage",
                self.clock() - self._started,
                self._total,
            )
