"""The timer services device models use for interrupt moderation (iovirt/timer.py)."""

from __future__ import annotations

import threading
import time

from iovirt.timer import ManualClock, TimerThread


def test_timer_thread_runs_callbacks_in_deadline_order() -> None:
    timers = TimerThread()
    try:
        done = threading.Event()
        order: list[str] = []
        now = timers.now()
        timers.call_at(now + 0.20, lambda: (order.append("late"), done.set()))
        timers.call_at(now + 0.05, lambda: order.append("early"))  # wakes the thread sooner
        timers.call_at(now - 1.0, lambda: order.append("past"))
        assert done.wait(5)
        assert order == ["past", "early", "late"]
        assert timers.now() >= now + 0.20
    finally:
        timers.close()


def test_timer_thread_survives_a_failing_callback() -> None:
    timers = TimerThread()
    try:
        done = threading.Event()

        def boom() -> None:
            raise RuntimeError("model bug")

        timers.call_at(timers.now(), boom)
        timers.call_at(timers.now() + 0.01, done.set)
        assert done.wait(5)
        assert timers.errors == 1
    finally:
        timers.close()


def test_timer_thread_close_drops_pending_callbacks() -> None:
    timers = TimerThread()
    ran: list[int] = []
    timers.call_at(timers.now() + 0.05, lambda: ran.append(1))
    timers.close()
    timers.call_at(timers.now(), lambda: ran.append(2))  # after close: ignored
    time.sleep(0.1)
    assert ran == []


def test_manual_clock_runs_due_callbacks_and_their_followers() -> None:
    clock = ManualClock(start=10.0)
    seen: list[tuple[str, float]] = []

    def first() -> None:
        seen.append(("first", clock.now()))
        clock.call_at(clock.now() + 1.0, lambda: seen.append(("second", clock.now())))

    clock.call_at(11.0, first)
    clock.call_at(20.0, lambda: seen.append(("far", clock.now())))
    clock.advance(0.5)
    assert seen == [] and clock.pending == 2
    clock.advance(2.0)
    assert seen == [("first", 11.0), ("second", 12.0)]
    assert clock.now() == 12.5 and clock.pending == 1
