"""Pacing: how many model requests go out at once, and when they wait, set by what the server says.

One ``Pace`` per process (``runtime.pace``), applied to every HTTP attempt the ``openai`` client
makes (its own retries included) by ``PacedTransport``, an ``httpx2`` transport wrapped around the
real one, the in-process offline model or a test double.

* **An adaptive window of requests in flight**, never above the ceiling
  (``REPORT_MAX_CONCURRENCY``). It starts at ``INITIAL_WINDOW`` (or the ceiling, if lower) and, while
  replies succeed and the window is full, grows: by one per success until the first 429 (slow start:
  it doubles every window of replies), then by one per window of replies. A 429, a 503 or a timeout
  halves it (at least 1), once per episode: the answers to requests sent before the cut do not cut
  it again. The window is an ``InflightLimit``, so it holds across event loops and threads.
* **A shared pause.** A 429 (or a 503 that names a time) stops *every* new request until the time
  the server named (``retry-after-ms``, ``retry-after`` in seconds or as an HTTP date; without one, a
  backoff of 0.5 s doubling per repeated 429, at most 30 s, with jitter). The transport then sends
  the 429'd request again itself, so the client never sees a 429 and nobody retries in a herd.
  A 503 is passed on to the client (its retries, and the task's, decide as for any 5xx).
* **Pre-emptive pauses.** Replies carrying ``x-ratelimit-remaining-requests`` (or ``-tokens``) and
  ``x-ratelimit-reset-requests`` (``-tokens``; ``1s``, ``6m0s``, ``59.5ms``) tell what is left of the
  server's budget. What remains, less what was sent after that request, is what may still go; below
  one request's worth, new requests pause. With ``x-ratelimit-limit-*`` (per minute, as OpenAI sends
  it) the pace keeps a copy of the server's bucket (``_Bucket``: it refills at limit/60 per second up
  to the size the reset implies), so a spent budget spaces requests at the server's rate instead of
  bursting into 429s. Requests sent together overtake one another on the way (measured: of four sent
  at once, the last one was counted first), so a reply's remainder may not count the requests sent up
  to ``OVERTAKING_SECONDS`` before it and still unanswered then: a reply sets the copy between what
  it says and that less those, keeping the copy's own level if it lies between (the copy took every
  request as it went out). A reply to an earlier request that shows more room for requests raises
  it (not for tokens: what was sent since is only our estimate). Without a limit, new requests pause
  until the reset, too long a wait to spend on such doubts: there, the requests sent before a reply
  are taken as counted. Otherwise the latest-sent reply's numbers count.
* **Patience.** A 429 means *wait*, as long as the server keeps making progress: the pace gives up
  only when no request has succeeded for ``rate_limit_patience`` seconds (``REPORT_RATE_LIMIT_PATIENCE``),
  counted from the batch's start or its last successful reply, or when the server names a wait that
  would go beyond that. (Not the batch's total wait: a large batch that the server serves steadily at
  its limit spends most of its time paused, and must not fail for being large.) Then the 429 goes back
  to the client marked ``x-should-retry: false`` (the client does not retry it) and
  ``x-report-pace: gave-up``; ``model_client.complete`` turns it into a per-topic error that Flyte
  does not retry, worded by ``Pace.explain``. A 429 that says the account has no credit
  (``insufficient_quota``) is never waited for: it is marked ``quota`` and fails at once.
* **Counters** per batch (``start_batch``, ``stats`` -> ``PaceStats``): 429s and 503s, pauses and the
  wall time new requests were held by them, the peak in flight and the window.

``on_pause(seconds, reason)`` is called once per pause longer than ``ANNOUNCE_PAUSES_OVER`` seconds
(``runtime`` turns it into a progress event).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import email.utils
import math
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx2
import openai

from machinery.concurrency import InflightLimit, bound

INITIAL_WINDOW = 8  # the first guess at what a server accepts at once: the project's former fixed cap
ANNOUNCE_PAUSES_OVER = 1.0  # seconds; shorter pauses are routine and not worth a progress event
MIN_PAUSE = 0.01  # seconds; a server that says "retry after 0" must not be asked again in a hot loop
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0  # seconds, for a 429 that names no time
CHARS_PER_TOKEN = 4  # a rough estimate of a request's tokens, for pre-emptive pacing by tokens
# Requests sent this close together may reach the server in either order (one waits for a new connection, the
# other has one): about the time to open a connection (TCP and TLS, two round trips) to a distant server.
OVERTAKING_SECONDS = 0.25
MARK = "x-report-pace"  # response header: "gave-up" or "quota" on a 429 handed back to the client

PauseListener = Callable[[float, str], None]


# --------------------------------------------------------------------------- what the server says


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | None) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` value: ``1s``, ``6m0s``, ``59.5ms``, ``2h1m``, or a bare number
    of seconds; None when absent or unreadable."""
    if text is None:
        return None
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            return None
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def parse_retry_after(headers: httpx2.Headers, now: Callable[[], float] = time.time) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, else ``retry-after`` (seconds or an HTTP
    date), as the openai client reads them; None when it names no time."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now())


def _whole(text: str | None) -> int | None:
    try:
        return int(float(text)) if text is not None else None
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class Budget:
    """One of the server's ``x-ratelimit-*`` budgets (requests or tokens), as its last reply told it."""

    kind: str  # "requests" or "tokens"
    limit: int | None
    remaining: int | None
    reset: float | None  # seconds until it is full again
    reset_text: str  # as the server wrote it

    @classmethod
    def read(cls, headers: httpx2.Headers, kind: str) -> Budget | None:
        remaining = _whole(headers.get(f"x-ratelimit-remaining-{kind}"))
        limit = _whole(headers.get(f"x-ratelimit-limit-{kind}"))
        reset_text = headers.get(f"x-ratelimit-reset-{kind}") or ""
        if remaining is None and limit is None:
            return None
        return cls(kind, limit, remaining, parse_duration(reset_text), reset_text)

    def describe(self) -> str:
        parts = [f"{self.limit} {self.kind}" if self.limit is not None else f"? {self.kind}"]
        if self.remaining is not None:
            parts.append(f"{self.remaining} left")
        if self.reset_text:
            parts.append(f"full again in {self.reset_text}")
        return f"{parts[0]} ({', '.join(parts[1:])})" if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------- the counters


@dataclasses.dataclass(frozen=True)
class PaceStats:
    """What pacing did during a batch (``summary.json``: ``totals.pacing``)."""

    rate_limited: int = 0  # 429 answers received (each attempt counts)
    unavailable: int = 0  # 503 answers received
    gave_up: int = 0  # 429s handed to the client because patience ran out (or no credit left)
    pauses: int = 0  # pauses started: after a 429 or 503, or while the server's budget was spent
    paused_seconds: float = 0.0  # wall time during which new requests were held by a pause
    peak_in_flight: int = 0  # the most HTTP requests at the server at once
    window: int = 0  # the window at the end: what the server seemed to accept at once
    ceiling: int = 0  # REPORT_MAX_CONCURRENCY

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- the pace


class Pace:
    """The process's pace: an adaptive window, a shared pause, patience and counters (module docstring).

    Thread-safe: every event loop of the process sends through the same pace.
    """

    def __init__(self, ceiling: int, patience: float, on_pause: PauseListener | None = None,
                 initial_window: int = INITIAL_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling must be at least 1, got {ceiling}")
        self.ceiling, self.patience, self.on_pause, self.clock = ceiling, patience, on_pause, clock
        self._lock = threading.Lock()
        self._window = float(max(1, min(initial_window, ceiling)))
        self.limit = InflightLimit(int(self._window))
        self._slow_start = True  # until the first cut
        self._episode = 0  # bumped by every cut; attempts sent before it do not cut again
        self._paused_until = 0.0
        self._pause_announced = False
        self._backoffs = 0  # 429s naming no time since the last success, for the backoff
        self._sent = {"requests": 0, "tokens": 0}  # attempts dispatched, and their estimated tokens
        self._unanswered: dict[int, tuple[float, int]] = {}  # attempts with no reply yet: mark -> (sent, tokens)
        self._freshest = -1  # the latest-sent attempt whose reply told us a budget
        self._budgets: dict[str, Budget] = {}  # the last x-ratelimit-* budgets seen
        self._buckets: dict[str, _Bucket] = {}  # our copy of the server's budgets, when it names its limit
        self._last_progress = clock()  # the batch's start, or its last successful reply
        self._held = 0  # requests waiting in a pause right now
        self._held_since = 0.0
        self._held_total = 0.0
        self._counts: dict[str, int] = {"rate_limited": 0, "unavailable": 0, "gave_up": 0, "pauses": 0}

    # ------------------------------------------------------------------ batches and counters

    def start_batch(self) -> None:
        """Count from now: a batch's 429s, pauses, paused seconds and peak in flight; patience starts now.
        The window and a pause the server asked for carry over: they describe the server, not the batch."""
        with self._lock:
            self._counts = dict.fromkeys(self._counts, 0)
            now = self.clock()
            self._held_total = 0.0
            self._held_since = now
            self._last_progress = now
        self.limit.reset_peak()

    def stats(self) -> PaceStats:
        with self._lock:
            return PaceStats(**self._counts, paused_seconds=round(self._waited(self.clock()), 2),
                             peak_in_flight=self.limit.peak, window=int(self._window), ceiling=self.ceiling)

    @property
    def window(self) -> int:
        return int(self._window)

    def _waited(self, now: float) -> float:
        """Wall seconds requests were held by pauses since the batch began; under the lock."""
        return self._held_total + (now - self._held_since if self._held else 0.0)

    # ------------------------------------------------------------------ sending

    async def send(self, request: httpx2.Request,
                   send: Callable[[httpx2.Request], Awaitable[httpx2.Response]]) -> httpx2.Response:
        """Send ``request`` with ``send`` (the wrapped transport) at the pace; retry it after a 429.

        An attempt holds its place in the window until its reply has been read (or closed): the server
        counts a request as in flight until it has sent the whole reply."""
        await request.aread()  # the body, kept: a 429'd request is sent again
        tokens = len(request.content) // CHARS_PER_TOKEN
        while True:
            queued_from = time.monotonic()  # the real clock: a deadline is real time, whatever self.clock is
            attempt = await self._admit(tokens)
            if (measure := _queue_time.get()) is not None:
                measure.seconds += time.monotonic() - queued_from
            done = _Once(self.limit.release)
            try:
                response = await send(request)
            except httpx2.TimeoutException:
                done()
                self._cut(attempt.episode)  # a server that queues instead of refusing (a busy local model)
                raise
            except BaseException:
                done()
                raise
            finally:
                self._answered(attempt)
            try:
                if response.status_code == 429:
                    again = await self._rate_limited(response, attempt)  # reads (and closes) the reply
                    done()
                    if again:
                        continue  # paused; send it again
                    return response
                if response.status_code == 503:
                    self._unavailable(response, attempt.episode)
                elif response.is_success:
                    self._succeeded()
                self._read_budgets(response, attempt)
            except BaseException:
                done()
                raise
            if response.is_closed:  # read already (an in-process reply)
                done()
            else:
                response.stream = _HeldUntilClosed(response.stream, done)
            return response

    async def _admit(self, tokens: int) -> _Attempt:
        """Wait out any pause, take a slot in the window and what the request costs from the server's budget."""
        cost = {"requests": 1.0, "tokens": float(tokens)}
        heed_budget = True
        while True:
            await self._wait_out_pause()
            await self.limit.__aenter__()
            short: tuple[float, str] | None = None
            try:
                with self._lock:
                    now = self.clock()
                    if self._paused_until <= now:  # else a pause began while we waited for the slot
                        short = self._shortfall(cost, now) if heed_budget else None
                        if short is None:
                            return self._dispatch(cost, tokens, now)
            except BaseException:
                self.limit.release()
                raise
            self.limit.release()
            if short is not None and not self._pause(*short, floor=0.0):  # spacing: a fast server's gaps are ms
                heed_budget = False  # past patience: let the server's answer decide

    def _dispatch(self, cost: dict[str, float], tokens: int, now: float) -> _Attempt:
        """Count an attempt as sent now: from our copy of the budget, and in what is sent and unanswered."""
        for kind, bucket in self._buckets.items():
            bucket.take(cost[kind], now)
        close = [spent for sent, spent in self._unanswered.values() if now - sent <= OVERTAKING_SECONDS]
        self._sent["requests"] += 1
        self._sent["tokens"] += tokens
        mark = self._sent["requests"]
        self._unanswered[mark] = (now, tokens)
        return _Attempt(self._episode, mark, self._sent["tokens"], {"requests": len(close), "tokens": sum(close)})

    def _shortfall(self, cost: dict[str, float], now: float) -> tuple[float, str] | None:
        """Seconds until the server's budget (as we copy it) has room for ``cost``, and why; None: it has."""
        waits = [(bucket.wait(cost[kind], now), kind) for kind, bucket in self._buckets.items()]
        seconds, kind = max(waits, default=(0.0, ""))
        if seconds < 1e-6:  # rounding: the clock has moved on enough
            return None
        budget = self._budgets[kind]
        return seconds, (f"the server's {kind} budget of {budget.limit} a minute is spent (its last reply said "
                         f"{budget.remaining} left, before the requests sent since): the next request in "
                         f"{_duration(seconds)}")

    async def _wait_out_pause(self) -> None:
        held = False
        try:
            while True:
                with self._lock:
                    now = self.clock()
                    remaining = self._paused_until - now
                    if remaining <= 0:
                        return
                    if not held:
                        held = True
                        if self._held == 0:
                            self._held_since = now
                        self._held += 1
                await asyncio.sleep(remaining)
        finally:
            if held:
                with self._lock:
                    self._held -= 1
                    if self._held == 0:
                        self._held_total += self.clock() - self._held_since

    # ------------------------------------------------------------------ what the answers change

    def _answered(self, attempt: _Attempt) -> None:
        """An attempt's reply has come (or it failed): the server has counted it, if it ever will."""
        with self._lock:
            del self._unanswered[attempt.requests_mark]

    # The window changes under the pace's lock, and the limit with it (the limit's own lock is only ever
    # taken inside the pace's, never the other way round), so two answers cannot apply out of order.

    def _succeeded(self) -> None:
        with self._lock:
            self._backoffs = 0
            self._last_progress = self.clock()
            if self.limit.in_flight < int(self._window) or self._window >= self.ceiling:
                return  # grow only a window that is in use, and never past the ceiling
            self._window = min(float(self.ceiling), self._window + (1.0 if self._slow_start else 1.0 / self._window))
            if int(self._window) != self.limit.limit:
                self.limit.resize(int(self._window))

    def _cut(self, episode: int) -> None:
        """Halve the window, once per episode."""
        with self._lock:
            if episode != self._episode:
                return
            self._episode += 1
            self._slow_start = False
            self._window = max(1.0, float(int(self._window) // 2))
            self.limit.resize(int(self._window))

    async def _rate_limited(self, response: httpx2.Response, attempt: _Attempt) -> bool:
        """A 429: True when the pace paused and the request should be sent again, False to hand it back."""
        await response.aread()
        self._count("rate_limited")
        if "insufficient_quota" in response.text:  # no credit: waiting will not help
            self._give_up(response, "quota")
            return False
        self._read_budgets(response, attempt)
        self._cut(attempt.episode)
        named = parse_retry_after(response.headers)
        if self._pause(named, f"HTTP 429 from the server{_named(named)}"):
            await response.aclose()
            return True
        self._give_up(response, "gave-up")
        return False

    def _unavailable(self, response: httpx2.Response, episode: int) -> None:
        """A 503: overloaded. Fewer at once, and a pause if it names a time; the client retries it."""
        self._count("unavailable")
        self._cut(episode)
        named = parse_retry_after(response.headers)
        if named is not None:
            self._pause(named, f"HTTP 503 from the server{_named(named)}")

    def _read_budgets(self, response: httpx2.Response, attempt: _Attempt) -> None:
        """Pause before the server's budget runs out (``x-ratelimit-remaining-*`` / ``-reset-*``)."""
        budgets = {kind: budget for kind in ("requests", "tokens") if (budget := Budget.read(response.headers, kind))}
        if not budgets:
            return
        pauses = []
        with self._lock:
            fresh = attempt.requests_mark > self._freshest  # else a later request's reply has told us more
            if fresh:
                self._freshest = attempt.requests_mark
                self._budgets.update(budgets)
            if response.status_code == 429:
                return  # its retry-after rules; and a 429'd request took nothing from the budget
            now = self.clock()
            # What was sent after this attempt: the server may not have counted it in this reply's remainder.
            sent_since = {"requests": self._sent["requests"] - attempt.requests_mark,
                          "tokens": self._sent["tokens"] - attempt.tokens_mark}
            # What the next request needs: one request, and about as many tokens as requests so far took.
            need = {"requests": 1.0, "tokens": self._sent["tokens"] / self._sent["requests"]}
            for kind, budget in budgets.items():
                if budget.remaining is None:
                    continue
                left = budget.remaining - sent_since[kind]
                if budget.limit and budget.reset is not None:  # a bucket we can copy: _admit spaces requests
                    # At most `left` remain; at least `left` less what was sent shortly before this attempt and
                    # still in flight (it may have reached the server after this one).
                    at_least = left - attempt.in_flight[kind]
                    held = self._buckets.get(kind)
                    if fresh:  # between the two, what the copy holds: it took every request as it went out
                        level = at_least if held is None else min(left, max(held.level_at(now), at_least))
                        self._buckets[kind] = _Bucket.copy(budget, level, now)
                    elif kind == "requests" and held is not None:
                        # An older reply is a lower bound too, so it can only show more room; not for tokens,
                        # where what was sent since is our estimate and the server counted its own.
                        held.raise_to(at_least, now)
                elif not fresh:
                    continue
                elif budget.reset and left < need[kind]:
                    pauses.append((budget.reset, f"the server's {kind} budget is used up (x-ratelimit-remaining-"
                                                 f"{kind}: {budget.remaining}) until it resets "
                                                 f"(x-ratelimit-reset-{kind}: {budget.reset_text})"))
        for seconds, reason in pauses:
            self._pause(seconds, reason)

    def _pause(self, seconds: float | None, reason: str, floor: float = MIN_PAUSE) -> bool:
        """Hold new requests for ``seconds`` (None: a growing backoff), at least ``floor``. False, and no
        pause, when it would end more than ``patience`` seconds after the last progress (the batch's start
        or its last success)."""
        with self._lock:
            now = self.clock()
            if seconds is None:
                if self._paused_until <= now:  # a new 429 after the last pause ended: back off further
                    self._backoffs += 1
                backoff = BACKOFF_FIRST * 2 ** (max(1, self._backoffs) - 1)
                seconds = min(backoff, BACKOFF_MAX) * random.uniform(0.75, 1.25)
            until = now + max(floor, seconds)
            if until <= self._paused_until:
                return True  # already paused for longer
            if until - self._last_progress > self.patience:
                return False
            if self._paused_until <= now:
                self._counts["pauses"] += 1
                self._pause_announced = False
            self._paused_until = until
            announce = self.on_pause is not None and not self._pause_announced and until - now > ANNOUNCE_PAUSES_OVER
            self._pause_announced = self._pause_announced or announce
        if announce:
            self.on_pause(until - now, reason)  # type: ignore[misc]
        return True

    def _give_up(self, response: httpx2.Response, mark: str) -> None:
        self._count("gave_up")
        response.headers["x-should-retry"] = "false"
        response.headers[MARK] = mark

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    # ------------------------------------------------------------------ words for people

    def explain(self, response: httpx2.Response, where: str) -> str:
        """Why a 429 became an error, and what to change: for the per-topic error message."""
        if response.headers.get(MARK) == "quota":
            return (f"The server at {where} answered 429 insufficient_quota: the account behind the API key "
                    "has no credit or quota left. Waiting will not help: check its billing and limits.")
        with self._lock:
            budgets = dict(self._budgets)
            now = self.clock()
            waited, stalled = self._waited(now), now - self._last_progress
        for kind in ("requests", "tokens"):
            if (budget := Budget.read(response.headers, kind)) is not None:
                budgets[kind] = budget
        limit = ("its limit: " + "; ".join(b.describe() for b in budgets.values())
                 if budgets else "it sent no x-ratelimit-* headers, so its limit is unknown")
        named = parse_retry_after(response.headers)
        asked = f" (the server asks for {_duration(named)} more)" if named is not None else ""
        return (f"The server at {where} kept answering 429 (rate limited); {limit}. No request has succeeded "
                f"for {_duration(stalled)}{asked} and REPORT_RATE_LIMIT_PATIENCE is {self.patience:g} s, so "
                f"this call gives up (the batch was paused {_duration(waited)} in all). Completed calls are "
                "kept in the reply cache: running the batch again resumes. To get through: raise "
                "REPORT_RATE_LIMIT_PATIENCE, lower REPORT_MAX_CONCURRENCY, or use a key on a higher "
                "rate-limit tier.")


def _named(seconds: float | None) -> str:
    return f", retry after {_duration(seconds)}" if seconds is not None else ", no retry-after: backing off"


def _duration(seconds: float) -> str:
    """0.25 -> '0.2 s', 42.4 -> '42 s', 3600 -> '3600 s'."""
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


# --------------------------------------------------------------------------- the transport


@dataclasses.dataclass
class _Bucket:
    """Our copy of one of the server's budgets: ``level`` units at time ``at``, refilled at ``rate`` per
    second up to ``size``. Read from a reply: limit per minute, what remains, and the time until full."""

    level: float
    size: float
    rate: float
    at: float

    @classmethod
    def copy(cls, budget: Budget, left: float, now: float) -> _Bucket:
        rate = budget.limit / 60  # type: ignore[operator]
        size = max(1.0, budget.remaining + rate * budget.reset)  # type: ignore[operator]
        return cls(level=left, size=size, rate=rate, at=now)

    def level_at(self, now: float) -> float:
        return min(self.size, self.level + self.rate * max(0.0, now - self.at))

    def wait(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` fits (a cost larger than the bucket waits only for a full one)."""
        return max(0.0, (min(cost, self.size) - self.level_at(now)) / self.rate)

    def take(self, cost: float, now: float) -> None:
        self.level, self.at = self.level_at(now) - cost, now

    def raise_to(self, level: float, now: float) -> None:
        """The higher of two lower bounds on the server's level now: this copy's, and ``level``."""
        self.level, self.at = max(self.level_at(now), level), now


@dataclasses.dataclass(frozen=True)
class _Attempt:
    """One HTTP attempt: the episode it was sent in, what had been sent up to it (itself included), and
    what was sent shortly before it and still in flight when it went out (requests and tokens)."""

    episode: int
    requests_mark: int
    tokens_mark: int
    in_flight: dict[str, int]


class _Once:
    """Calls ``action`` the first time it is called, never again."""

    def __init__(self, action: Callable[[], None]) -> None:
        self._action: Callable[[], None] | None = action

    def __call__(self) -> None:
        action, self._action = self._action, None
        if action is not None:
            action()


class _HeldUntilClosed(httpx2.AsyncByteStream):
    """A reply's body that gives the attempt's place in the window back when it is closed (httpx closes
    it once read, or on an error; the openai client closes what it streams)."""

    def __init__(self, stream: httpx2.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream, self._release = stream, release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._release()


class QueueTime:
    """Seconds requests spent queued in the pace (for a slot in the window, or out a pause): ``queue_time``."""

    def __init__(self) -> None:
        self.seconds = 0.0


# A context variable: httpx calls the transport in the caller's task, so the pace adds a request's queueing
# to the measure of the call that sent it, and concurrent calls never mix theirs.
_queue_time: contextvars.ContextVar[QueueTime | None] = contextvars.ContextVar("queue_time", default=None)


def queue_time() -> contextlib.AbstractContextManager[QueueTime]:
    """Measure the time the requests sent inside the block wait in the pace before they go out
    (``model_client``'s deadline counts the server's time, not the project's own queue)."""
    return bound(_queue_time, QueueTime())


class PacedTransport(httpx2.AsyncBaseTransport):
    """Sends every request through ``inner`` at the pace of ``pace``."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, pace: Pace) -> None:
        self.inner, self.pace = inner, pace

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return await self.pace.send(request, self.inner.handle_async_request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class PacedHttpClient(openai.DefaultAsyncHttpxClient):
    """The ``openai`` client's own HTTP client (its limits, timeouts, proxies from the environment), with
    every transport it would use wrapped in ``PacedTransport``."""

    def __init__(self, pace: Pace, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._transport = PacedTransport(self._transport, pace)
        self._mounts = {pattern: None if transport is None else PacedTransport(transport, pace)
                        for pattern, transport in self._mounts.items()}
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def __del__(self) -> None:
        # As the openai client closes the HTTP client it makes itself, but only on the loop that owns its
        # connections (runtime makes one client per loop): on another loop, closing fails noisily.
        if self.is_closed:
            return
        with contextlib.suppress(Exception):
            loop = asyncio.get_running_loop()
            if loop is self._loop:
                loop.create_task(self.aclose())
