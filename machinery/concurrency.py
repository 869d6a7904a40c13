"""Concurrency helpers for the model client layer.

* ``InflightLimit``: a cap on concurrent work that holds across event loops, and can be resized
  while work is in flight (``machinery.pacing`` moves it with what the server says).
* ``Tally``: a thread-safe counter.
* ``bound``: a context variable set to a value for a ``with`` block (what the block and the tasks it
  starts see), then reset.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def bound(variable: contextvars.ContextVar[T | None], value: T) -> Iterator[T]:
    """``variable`` is ``value`` inside the block, for the block and every task it starts; then as before."""
    token = variable.set(value)
    try:
        yield value
    finally:
        variable.reset(token)


class InflightLimit:
    """At most ``limit`` holders at once, process-wide.

    ``asyncio.Semaphore`` belongs to one event loop, but a notebook awaits on
    the kernel's loop while Flyte runs tasks on a loop of its own: this limit
    is shared by every loop (and thread) in the process. Waiters are served
    first come, first served. ``resize`` changes the limit at any time: a larger
    one lets waiters in at once; a smaller one lets current holders finish and
    admits no one until fewer than the new limit hold a slot.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._holders = 0
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = (
            collections.deque()
        )
        self.peak = 0

    @property
    def in_flight(self) -> int:
        return self._holders

    def resize(self, limit: int) -> None:
        """From now on at most ``limit`` holders (waiters are let in at once if it grew)."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        with self._lock:
            self.limit = limit
            self._admit_waiters()

    def reset_peak(self) -> None:
        """Start counting the peak again from the holders of now (a new batch)."""
        with self._lock:
            self.peak = self._holders

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._holders < self.limit and not self._waiters:
                self._take()
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            with self._lock:
                if (loop, waiter) in self._waiters:
                    self._waiters.remove((loop, waiter))
                    raise
            # The slot was handed over just as we were cancelled: give it back.
            self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def release(self) -> None:
        """Give back a slot taken with ``async with`` / ``__aenter__`` (for code that cannot await)."""
        self._release()

    def _take(self) -> None:
        self._holders += 1
        self.peak = max(self.peak, self._holders)

    def _release(self) -> None:
        with self._lock:
            self._holders -= 1
            self._admit_waiters()

    def _admit_waiters(self) -> None:
        """Hand free slots to the first waiters; under the lock."""
        while self._waiters and self._holders < self.limit:
            loop, waiter = self._waiters.popleft()
            if loop.is_closed():
                continue
            self._take()
            try:
                loop.call_soon_threadsafe(self._grant, waiter)
            except RuntimeError:  # the loop closed just now: nobody will take the slot
                self._holders -= 1

    def _grant(self, waiter: asyncio.Future[None]) -> None:
        # A waiter cancelled after the handover gives its slot back itself (in __aenter__).
        if not waiter.cancelled():
            waiter.set_result(None)


class Tally:
    """A thread-safe running count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def add(self) -> None:
        with self._lock:
            self._value += 1

    @property
    def value(self) -> int:
        return self._value
