"""Timers for device models: interrupt moderation and other "after N microseconds" rules.

A device model starts no thread and knows no event loop (DESIGN.md), yet some hardware
behaviour is timed: the e1000's interrupt throttling and delay timers, xHCI interrupter
moderation. Such a model takes a :class:`TimerService` from the board and asks it to call
back at a deadline; the callback takes the model's own lock and re-checks its state, so a
callback that arrives after its reason went away (a reset, a register rewrite) does
nothing. That is why the service has no cancel: models never need one.

* :class:`TimerThread`: the board's service, one thread with a deadline heap. Not the
  asyncio loop: uvloop rounds its timers to milliseconds, and moderation intervals are
  tens of microseconds.
* :class:`ManualClock`: a clock that moves only when a test (or the fuzzer) advances it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

_MAX_ERRORS_LOGGED = 10


class TimerService(Protocol):
    """A monotonic clock (seconds) and callbacks at deadlines on it."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, at ``when`` or soon after (immediately if it is past).
        Thread-safe. Callbacks run on the service's thread, never on the caller's."""
        ...


class TimerThread:
    """:class:`TimerService` on a dedicated daemon thread, started by the first
    :meth:`call_at`. A callback that raises is logged (rate-limited) and the thread goes on."""

    def __init__(self, name: str = "iovirt-timers") -> None:
        self._name = name
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()  # ties keep call order; callbacks never compared
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.errors = 0

    def now(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        with self._cond:
            if self._closed:
                return
            entry = (when, next(self._order), callback)
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()  # the new deadline is the earliest: wake up sooner

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap:
                        delay = self._heap[0][0] - time.monotonic()
                        if delay <= 0:
                            break
                        self._cond.wait(delay)
                    else:
                        self._cond.wait()
                if self._closed:
                    return
                _, _, callback = heapq.heappop(self._heap)
            try:
                callback()
            except Exception:
                self.errors += 1
                if self.errors <= _MAX_ERRORS_LOGGED:
                    log.exception("timer callback %r failed", callback)

    def close(self) -> None:
        """Stop the thread; pending callbacks are dropped."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)


class ManualClock:
    """A :class:`TimerService` whose time moves only in :meth:`advance`; due callbacks run
    there, on the caller's thread, in deadline order. For unit tests and the fuzzer."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._order), callback))

    @property
    def pending(self) -> int:
        """Callbacks not run yet."""
        return len(self._heap)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, running every callback that falls due (those
        scheduled by a callback, too, if they fall inside the step)."""
        target = self._now + seconds
        while self._heap and self._heap[0][0] <= target:
            when, _, callback = heapq.heappop(self._heap)
            self._now = max(self._now, when)
            callback()
        self._now = target
