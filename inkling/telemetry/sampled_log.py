"""Logging in bounded volume: what can repeat once per call (a refused request, a
failing dependency) is logged at most once per interval per key, with how many
occurrences the interval held, so that hostile or broken traffic cannot flood the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

MAX_KEYS = 1024
"""The most keys remembered; past it the oldest is forgotten (keys may be caller-chosen)."""


class SampledLog:
    """`log(key, level, message)` writes the first occurrence of `key` in each
    `every_s` window, suffixed with the occurrences it stands for since the last one."""

    def __init__(
        self,
        logger: logging.Logger,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.every_s = every_s
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}  # key: (logged at, since then)

    def log(self, key: str, level: int, message: str, *, exc_info: bool = False) -> bool:
        """Log `message` if `key`'s window is over; True when it was written."""
        now = self._clock()
        logged_at, seen = self._windows.get(key, (float("-inf"), 0))
        if now - logged_at < self.every_s:
            self._windows[key] = (logged_at, seen + 1)
            return False
        if key not in self._windows and len(self._windows) >= MAX_KEYS:
            del self._windows[next(iter(self._windows))]
        self._windows[key] = (now, 0)
        suffix = f" ({seen + 1} times in the last {now - logged_at:.0f} s)" if seen else ""
        self.logger.log(level, "%s%s", message, suffix, exc_info=exc_info)
        return True
