"""machinery/pacing.py: the window of requests in flight, pauses shared by every request, patience, counters.

Requests go through ``PacedTransport`` to a scripted ``Server`` (a transport that answers in-process and
notes when each attempt arrived and how many were in flight there). Pauses are real but short (0.05-0.3 s).
How ``complete`` turns a 429 past patience into a per-topic error is in test_model_client.py.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from machinery import offline_llm, pacing
from machinery.pacing import Budget, Pace, PacedHttpClient, PacedTransport, PaceStats, parse_duration, parse_retry_after

Answer = Callable[[int, httpx2.Request], "httpx2.Response | Exception"]


def ok(headers: dict[str, str] | None = None) -> httpx2.Response:
    return httpx2.Response(200, headers=headers or {}, json={"ok": True})


def too_many(headers: dict[str, str] | None = None, body: dict[str, Any] | None = None) -> httpx2.Response:
    return httpx2.Response(429, headers=headers or {},
                           json=body or {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}})


class Server(httpx2.AsyncBaseTransport):
    """Answers attempt number n (0, 1, ...) with ``answer(n, request)`` after ``latency`` seconds;
    records each attempt's arrival time and body, and the peak number in flight."""

    def __init__(self, answer: Answer = lambda n, request: ok(), latency: float = 0.0) -> None:
        self.answer, self.latency = answer, latency
        self.lock = threading.Lock()
        self.arrivals: list[float] = []
        self.bodies: list[bytes] = []
        self.in_flight_at: list[int] = []  # at the server when each attempt arrived, itself included
        self.in_flight = self.peak = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        with self.lock:
            number = len(self.arrivals)
            self.arrivals.append(time.monotonic())
            self.bodies.append(await request.aread())
            self.in_flight += 1
            self.in_flight_at.append(self.in_flight)
            self.peak = max(self.peak, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            result = self.answer(number, request)
            if asyncio.iscoroutine(result):
                result = await result
            if isinstance(result, Exception):
                raise result
            return result
        finally:
            with self.lock:
                self.in_flight -= 1

    def count(self, body: bytes) -> int:
        return self.bodies.count(body)


async def send(pace: Pace, server: Server, *bodies: bytes) -> list[httpx2.Response]:
    """POST each body through the pace at once; the responses in order."""
    async with httpx2.AsyncClient(transport=PacedTransport(server, pace), base_url="http://server.invalid") as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", content=body) for body in bodies))


def bodies(count: int, prefix: str = "request") -> list[bytes]:
    return [f"{prefix} {i}".encode() for i in range(count)]


# ----------------------------------------------------------------------------------------- what the server says


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0), ("6m0s", 360.0), ("59.5ms", 0.0595), ("2h1m", 7260.0), ("1m30.5s", 90.5), ("12ms", 0.012),
        ("0s", 0.0), ("20", 20.0), ("0.5", 0.5), (" 1S ", 1.0), ("250us", 0.00025), ("1d", 86400.0),
        ("", None), (None, None), ("soon", None), ("1x", None), ("-1s", None), ("1s and more", None), ("nan", None),
        ("-3", None), ("inf", None),
    ],
)
def test_reset_durations_are_read_as_openai_writes_them(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds) if seconds is not None else parse_duration(text) is None


def test_retry_after_prefers_milliseconds_then_seconds_then_a_date():
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 5, usegmt=True)
    cases = [
        ({"retry-after-ms": "300"}, 0.3),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
        ({"retry-after": date}, 5.0),
        ({"retry-after": email.utils.formatdate(now - 60, usegmt=True)}, 0.0),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "later"}, None),
        ({}, None),
    ]
    for headers, expected in cases:
        got = parse_retry_after(httpx2.Headers(headers), now=lambda: now)
        assert got == (pytest.approx(expected) if expected is not None else None), headers


def test_a_budget_is_read_from_the_ratelimit_headers_and_described():
    headers = httpx2.Headers({"x-ratelimit-limit-requests": "300", "x-ratelimit-remaining-requests": "0",
                              "x-ratelimit-reset-requests": "6m0s", "x-ratelimit-remaining-tokens": "1200"})
    requests, tokens = Budget.read(headers, "requests"), Budget.read(headers, "tokens")
    assert (requests.limit, requests.remaining, requests.reset) == (300, 0, 360.0)
    assert requests.describe() == "300 requests (0 left, full again in 6m0s)"
    assert (tokens.limit, tokens.remaining, tokens.reset) == (None, 1200, None)
    assert tokens.describe() == "? tokens (1200 left)"
    assert Budget.read(httpx2.Headers({}), "requests") is None


# ----------------------------------------------------------------------------------------- the shared pause


def test_one_429_pauses_every_request_and_the_server_sees_no_burst_of_retries():
    pace = Pace(ceiling=16, patience=30)
    server = Server(lambda n, request: too_many({"retry-after-ms": "300"}) if n == 0 else ok(), latency=0.01)

    async def scenario():
        first = asyncio.ensure_future(send(pace, server, b"first"))
        while not server.arrivals or server.in_flight:  # until the 429 is back
            await asyncio.sleep(0.001)
        others = await send(pace, server, *bodies(6))  # sent while the pause lasts
        return (await first) + others

    started = time.monotonic()
    responses = asyncio.run(scenario())
    limited_at = server.arrivals[0]
    assert [r.status_code for r in responses] == [200] * 7, "nobody saw the 429"
    assert server.count(b"first") == 2, "the transport sent the 429'd request again, once"
    assert all(t >= limited_at + 0.29 for t in server.arrivals[1:]), "nothing reached the server during the pause"
    assert server.peak <= 4, "after the pause, at most the halved window goes at once"
    assert pace.window >= 4 and time.monotonic() - started < 3.0  # one 0.3 s pause, not seven; loose for busy CI
    stats = pace.stats()
    assert (stats.rate_limited, stats.pauses, stats.gave_up) == (1, 1, 0)
    assert 0.25 <= stats.paused_seconds <= 1.0, "wall time held, not a sum over the 7 waiting requests (2.1 s)"


def test_a_429_without_a_time_backs_off_with_jitter_and_further_each_time(monkeypatch):
    assert (pacing.BACKOFF_FIRST, pacing.BACKOFF_MAX) == (0.5, 30.0), "the openai client's first wait; a cap"
    monkeypatch.setattr(pacing, "BACKOFF_FIRST", 0.1)  # 0.5 s in earnest
    pace = Pace(ceiling=4, patience=30)
    server = Server(lambda n, request: too_many() if n < 2 else ok())
    (response,) = asyncio.run(send(pace, server, b"one"))
    waited = [b - a for a, b in zip(server.arrivals, server.arrivals[1:])]
    assert response.status_code == 200 and len(server.arrivals) == 3
    assert 0.074 <= waited[0] <= 0.14 and 0.149 <= waited[1] <= 0.28, "x1, then x2, each +-25%"
    assert pace.stats().pauses == 2


def test_a_503_that_names_a_time_pauses_everyone_but_goes_back_to_the_client():
    pace = Pace(ceiling=8, patience=30)
    server = Server(lambda n, request: httpx2.Response(503, headers={"retry-after-ms": "200"}) if n == 0 else ok())

    async def scenario():
        (unavailable,) = await send(pace, server, b"first")
        return unavailable, await send(pace, server, b"second")

    unavailable, (second,) = asyncio.run(scenario())
    assert unavailable.status_code == 503 and "x-should-retry" not in unavailable.headers, "the client decides"
    assert second.status_code == 200 and server.arrivals[1] - server.arrivals[0] >= 0.19
    stats = pace.stats()
    assert (stats.unavailable, stats.rate_limited, stats.pauses, stats.window) == (1, 0, 1, 4)


def test_a_waiter_cancelled_during_a_pause_leaves_nothing_behind():
    pace = Pace(ceiling=2, patience=30)
    server = Server()

    async def scenario():
        pace._pause(0.3, "as after a 429")
        waiting = asyncio.ensure_future(send(pace, server, b"cancelled"))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(scenario())
    assert server.count(b"cancelled") == 0
    assert pace.limit.in_flight == 0 and pace._held == 0


# ----------------------------------------------------------------------------------------- the window


def test_the_window_grows_while_replies_succeed_and_never_passes_the_ceiling():
    pace = Pace(ceiling=12, patience=30, initial_window=2)
    server = Server(latency=0.005)
    responses = asyncio.run(send(pace, server, *bodies(80)))
    assert {r.status_code for r in responses} == {200}
    assert pace.window == 12 and server.peak == 12 == pace.limit.peak, "slow start reached the ceiling, no further"
    assert pace.stats().peak_in_flight == 12


def test_the_window_grows_only_when_it_is_full():
    pace = Pace(ceiling=64, patience=30)
    server = Server()

    async def one_at_a_time():
        for body in bodies(20):
            await send(pace, server, body)

    asyncio.run(one_at_a_time())
    assert pace.window == pacing.INITIAL_WINDOW, "20 replies, never more than one in flight: no reason to grow"


def test_a_burst_of_429s_halves_the_window_once_then_it_grows_by_one_per_window():
    pace = Pace(ceiling=16, patience=30)  # starts at 8

    def answer(n, request):
        return too_many({"retry-after-ms": "50"}) if n < 8 else ok()

    server = Server(answer, latency=0.02)
    asyncio.run(send(pace, server, *bodies(8)))
    assert pace.stats().rate_limited == 8
    assert server.peak == 8 and max(server.in_flight_at[8:]) <= 4, "the eight retries went four at a time"
    assert 4 <= pace.window <= 5, "halved once (not eight times), then +1/window per success"
    asyncio.run(send(pace, server, *bodies(40, "more")))
    assert 5 <= pace.window <= 10, "additive increase after the first 429: no more doubling"


def test_the_window_never_goes_below_one():
    pace = Pace(ceiling=1, patience=30)
    server = Server(lambda n, request: too_many({"retry-after-ms": "20"}) if n < 3 else ok())
    (response,) = asyncio.run(send(pace, server, b"one"))
    assert response.status_code == 200 and pace.window == 1 and pace.limit.limit == 1


def test_a_timeout_halves_the_window_and_is_left_to_the_client():
    pace = Pace(ceiling=16, patience=30)
    server = Server(lambda n, request: httpx2.ReadTimeout("slow", request=request))
    with pytest.raises(httpx2.ReadTimeout):
        asyncio.run(send(pace, server, b"slow"))
    assert pace.window == 4 and len(server.arrivals) == 1 and pace.stats().pauses == 0
    assert pace.limit.in_flight == 0


def test_the_window_holds_across_event_loops():
    """A notebook's loop and Flyte's loop share the pace: the server never sees more than the window."""
    pace = Pace(ceiling=3, patience=30)
    server = Server(latency=0.01)
    threads = [threading.Thread(target=asyncio.run, args=(send(pace, server, *bodies(15, f"loop {n}")),))
               for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(server.arrivals) == 45 and server.peak == 3 == pace.stats().peak_in_flight
    assert pace.limit.in_flight == 0


# ----------------------------------------------------------------------------------------- pre-emptive pauses


@pytest.mark.parametrize("kind", ["requests", "tokens"])
def test_a_spent_budget_without_a_limit_pauses_new_requests_until_its_reset(kind):
    spent = {f"x-ratelimit-remaining-{kind}": "0", f"x-ratelimit-reset-{kind}": "200ms"}
    pace = Pace(ceiling=8, patience=30)
    server = Server(lambda n, request: ok(spent) if n == 0 else ok())

    async def scenario():
        await send(pace, server, b"spends the last of it")
        return await send(pace, server, *bodies(3))

    assert [r.status_code for r in asyncio.run(scenario())] == [200] * 3
    assert all(t - server.arrivals[0] >= 0.19 for t in server.arrivals[1:])
    stats = pace.stats()
    assert (stats.pauses, stats.rate_limited) == (1, 0), "paused before any 429"


def test_a_spent_budget_with_a_limit_spaces_requests_at_the_servers_rate():
    """600 requests a minute, none left: the next ones go one every 0.1 s, not in a burst after a pause."""
    spent = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0",
             "x-ratelimit-reset-requests": "100ms"}
    pace = Pace(ceiling=8, patience=30)
    server = Server(lambda n, request: ok(spent))

    async def scenario():
        await send(pace, server, b"spends the last of it")
        return await send(pace, server, *bodies(4))

    assert [r.status_code for r in asyncio.run(scenario())] == [200] * 4
    gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:])]
    assert all(0.09 <= gap <= 0.5 for gap in gaps), gaps  # spaced at the rate; loose above for busy machines
    stats = pace.stats()
    assert stats.rate_limited == 0 and stats.pauses == 4


def test_spacing_keeps_up_with_a_fast_servers_rate():
    """6,000 requests a minute (one per 10 ms), none left: 40 requests take about 0.4 s, not 40 pauses of 50 ms."""
    spent = {"x-ratelimit-limit-requests": "6000", "x-ratelimit-remaining-requests": "0",
             "x-ratelimit-reset-requests": "10ms"}
    pace = Pace(ceiling=8, patience=30)
    server = Server(lambda n, request: ok(spent) if n == 0 else ok())

    async def scenario():
        await send(pace, server, b"spends the last of it")
        await send(pace, server, *bodies(40))

    asyncio.run(scenario())
    spread = server.arrivals[-1] - server.arrivals[0]
    assert 0.35 <= spread <= 1.0, spread


def test_a_pause_for_a_spent_budget_says_what_the_server_said_and_why_it_is_spent():
    """A reply said 1 left; the three sent since spend it: the reason names both, not a contradiction."""
    reasons = []
    one_left = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "1",
                "x-ratelimit-reset-requests": "4s"}
    pace = Pace(ceiling=8, patience=30, on_pause=lambda seconds, reason: reasons.append(reason))
    server = Server(lambda n, request: ok(one_left) if n == 0 else ok(), latency=0.02)

    async def scenario():
        first = asyncio.ensure_future(send(pace, server, b"first"))
        await asyncio.sleep(0.005)  # sent after the first, before its reply
        await send(pace, server, *bodies(3))
        await first
        waiting = asyncio.ensure_future(send(pace, server, b"next"))
        await asyncio.sleep(0.1)
        waiting.cancel()

    asyncio.run(scenario())
    said = ("the server's requests budget of 60 a minute is spent (its last reply said 1 left, before the requests "
            "sent since): the next request in ")
    assert reasons and reasons[0].startswith(said), reasons


def test_a_token_budget_with_a_limit_waits_for_the_tokens_a_request_needs():
    """6,000 tokens a minute (100 a second), 0 left: a request of about 10 tokens waits about 0.1 s."""
    spent = {"x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "0",
             "x-ratelimit-reset-tokens": "1s"}
    pace = Pace(ceiling=8, patience=30)
    server = Server(lambda n, request: ok(spent) if n == 0 else ok())

    async def scenario():
        await send(pace, server, b"spends the last of it")
        await send(pace, server, b"x" * 40)  # 40 characters: about 10 tokens

    asyncio.run(scenario())
    assert 0.09 <= server.arrivals[1] - server.arrivals[0] <= 0.5 and pace.stats().pauses == 1


def test_a_budget_with_room_for_the_requests_in_flight_does_not_pause():
    pace = Pace(ceiling=8, patience=30)
    plenty = {"x-ratelimit-remaining-requests": "50", "x-ratelimit-reset-requests": "10s",
              "x-ratelimit-remaining-tokens": "100000", "x-ratelimit-reset-tokens": "1m0s"}
    server = Server(lambda n, request: ok(plenty), latency=0.005)
    started = time.monotonic()
    asyncio.run(send(pace, server, *bodies(10)))
    assert pace.stats().pauses == 0 and time.monotonic() - started < 5  # no 10 s / 1 s wait for a reset


def test_a_budget_that_the_requests_sent_since_will_spend_pauses():
    """Two left when the first request arrived, three sent after it: the next would be over the budget."""
    pace = Pace(ceiling=8, patience=30)

    def answer(n, request):
        return ok({"x-ratelimit-remaining-requests": "2", "x-ratelimit-reset-requests": "150ms"} if n == 0 else {})

    server = Server(answer, latency=0.03)

    async def scenario():
        await send(pace, server, *bodies(4))
        return await send(pace, server, b"later")

    asyncio.run(scenario())
    assert server.arrivals[-1] - server.arrivals[0] >= 0.17 and pace.stats().pauses == 1


def test_requests_sent_before_a_reply_are_already_in_its_remainder():
    """The last of four, answered first with one left: the three sent before it were counted already."""
    pace = Pace(ceiling=8, patience=30)

    async def answer(n, request):
        if request.content == b"later":
            return ok()
        last = request.content == b"request 3"
        await asyncio.sleep(0.0 if last else 0.05)
        return ok({"x-ratelimit-remaining-requests": "1" if last else "9", "x-ratelimit-reset-requests": "1s"})

    server = Server(answer)

    async def scenario():
        await send(pace, server, *bodies(4))
        await send(pace, server, b"later")

    started = time.monotonic()
    asyncio.run(scenario())
    assert pace.stats().pauses == 0 and time.monotonic() - started < 5  # no 10 s / 1 s wait for a reset
    assert pace._budgets["requests"].remaining == 1, "the older replies' 9 did not replace the fresher 1"


class BucketServer(Server):
    """A server with a real budget (offline_llm's token bucket) that sends OpenAI's x-ratelimit-* headers.
    ``delays`` maps a request's body to (seconds before the budget counts it, seconds after, before its
    reply): requests sent at the same moment can overtake one another on the way, and come back in any order."""

    def __init__(self, per_minute: int, burst: int, delays: dict[bytes, tuple[float, float]]) -> None:
        self.per_minute, self.delays = per_minute, delays
        self.bucket = offline_llm.TokenBucket(rate=per_minute / 60, capacity=burst)
        super().__init__(self.take)

    async def take(self, n: int, request: httpx2.Request) -> httpx2.Response:
        before, after = self.delays.get(request.content, (0.0, 0.0))
        await asyncio.sleep(before)
        admission = self.bucket.take()
        await asyncio.sleep(after)
        headers = {"x-ratelimit-limit-requests": str(self.per_minute),
                   "x-ratelimit-remaining-requests": str(admission.remaining),
                   "x-ratelimit-reset-requests": offline_llm.format_duration(admission.reset)}
        if not admission.allowed:
            return too_many({**headers, "retry-after-ms": str(math.ceil(admission.retry_after * 1000))})
        return ok(headers)


def test_requests_in_flight_when_one_was_sent_may_reach_the_server_after_it():
    """Four sent at once, the last one counted first (4 of 5 left) and answered first: the three in flight
    when it was sent may not be in its remainder (here they are not), so 1 is left, not 4."""
    late = (0.02, 0.0)
    server = BucketServer(600, burst=5, delays={b"request 0": late, b"request 1": late, b"request 2": late})
    pace = Pace(ceiling=8, patience=30)

    async def scenario():
        await send(pace, server, *bodies(4))
        await send(pace, server, *bodies(4, "later"))

    asyncio.run(scenario())
    assert pace.stats().rate_limited == 0, "the four later ones were spaced, not sent into a spent budget"


def test_a_reply_older_than_the_freshest_can_show_more_room():
    """Three sent at once (60 a minute, a burst of 5): the last one is counted last but answered first, so
    its reply (2 left, two in flight when it was sent) can only promise 0. The first one's reply, later,
    says 4 were left when it was counted: less the two sent after it, room for 2, so the next goes at once
    instead of waiting a second for the budget to refill."""
    slow_reply = (0.0, 0.05)
    server = BucketServer(60, burst=5, delays={b"request 0": slow_reply, b"request 1": slow_reply,
                                               b"request 2": (0.01, 0.0)})
    pace = Pace(ceiling=8, patience=30)

    async def scenario():
        await send(pace, server, *bodies(3))
        started = time.monotonic()
        await send(pace, server, b"later")
        return time.monotonic() - started

    waited = asyncio.run(scenario())
    assert pace.stats().rate_limited == 0 and waited < 0.5, waited



class InOrder(dict):
    """Every request's delays: counted at once, answered ``seconds`` later (replies come back in send order)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def get(self, key, default=None):
        return (0.0, self.seconds)


def test_replies_in_send_order_use_the_whole_budget():
    """1,200 a minute, a burst of 10, eight at a time, replies after 0.1 s in send order: each reply was sent while
    others were in flight, but the copy took those as they went out, so no room is held back for them. The server
    has about two left whenever the pace sends (one per 50 ms; less is a 429, more is throughput lost)."""
    server = BucketServer(1200, burst=10, delays=InOrder(0.1))
    left_when_counted = []
    take = server.bucket.take

    def counted():
        admission = take()
        left_when_counted.append(admission.remaining)
        return admission

    server.bucket.take = counted
    pace = Pace(ceiling=8, patience=30)
    asyncio.run(send(pace, server, *bodies(24)))
    later = left_when_counted[10:]  # after the burst
    assert pace.stats().rate_limited == 0 and sum(later) / len(later) <= 3, later


def test_an_older_reply_naming_a_budget_the_freshest_did_not_changes_nothing():
    """The first one sent, answered last, names a tokens budget; the freshest named only requests. No copy of
    the tokens budget comes of it (nothing would say what it is), and every request goes out."""
    both = {"x-ratelimit-limit-tokens": "600", "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6s",
            "x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "100",
            "x-ratelimit-reset-requests": "1s"}

    async def answer(n, request):
        if request.content == b"request 0":
            await asyncio.sleep(0.05)
            return ok(both)
        return ok({name: value for name, value in both.items() if name.endswith("-requests")})

    pace = Pace(ceiling=4, patience=30)

    async def scenario():
        await send(pace, Server(answer), *bodies(2))
        return await asyncio.wait_for(send(pace, Server(answer), *bodies(4, "later")), 5)

    assert [r.status_code for r in asyncio.run(scenario())] == [200] * 4
    assert sorted(pace._buckets) == sorted(pace._budgets) == ["requests"] and pace.limit.in_flight == 0


def test_an_older_reply_gives_back_no_tokens():
    """A server that counts more tokens than the pace estimates (say, the reply's max_tokens): the older reply's
    remainder, less our estimates of what was sent since, would promise room the freshest reply says is gone."""
    def body(i: int, prefix: str = "request") -> bytes:
        return f"{prefix} {i} ".ljust(400, "x").encode()  # 100 estimated tokens

    bucket = offline_llm.TokenBucket(rate=10.0, capacity=4000)  # 600 tokens a minute

    async def answer(n, request):
        with bucket._lock:  # a cost of 1,000: the estimate and 900 more
            bucket._refill()
            allowed = bucket._tokens >= 1000
            bucket._tokens -= 1000 * allowed
            remaining = int(bucket._tokens)
        if request.content.startswith(b"request"):  # counted in send order; the first one answered last
            await asyncio.sleep(0.1 if request.content == body(0) else 0.01)
        headers = {"x-ratelimit-limit-tokens": "600", "x-ratelimit-remaining-tokens": str(remaining),
                   "x-ratelimit-reset-tokens": offline_llm.format_duration((4000 - remaining) / 10)}
        return ok(headers) if allowed else too_many({**headers, "retry-after-ms": "50"})

    pace = Pace(ceiling=8, patience=300)
    server = Server(answer)

    async def scenario():
        await send(pace, server, *[body(i) for i in range(4)])
        later = asyncio.ensure_future(send(pace, server, body(0, "later")))
        await asyncio.sleep(0.3)
        later.cancel()

    asyncio.run(scenario())
    assert len(server.arrivals) == 4 and pace.stats().rate_limited == 0, "the next one waits for the budget"

# ----------------------------------------------------------------------------------------- patience


def test_past_patience_the_429_goes_back_to_the_client_marked_not_to_retry():
    pace = Pace(ceiling=4, patience=0.25)
    server = Server(lambda n, request: too_many({"retry-after-ms": "100", "x-ratelimit-limit-requests": "3"}))
    started = time.monotonic()
    (response,) = asyncio.run(send(pace, server, b"doomed"))
    assert response.status_code == 429
    assert response.headers["x-should-retry"] == "false" and response.headers[pacing.MARK] == "gave-up"
    assert len(server.arrivals) == 3, "sent, paused 0.1 s twice, then gave up rather than pass 0.25 s"
    assert time.monotonic() - started < 3  # gave up; did not keep waiting
    stats = pace.stats()
    assert (stats.rate_limited, stats.gave_up, stats.pauses) == (3, 1, 2)
    message = pace.explain(response, "http://api.example/v1")
    assert "The server at http://api.example/v1 kept answering 429" in message
    assert "3 requests" in message and "REPORT_RATE_LIMIT_PATIENCE is 0.25 s" in message
    assert "REPORT_MAX_CONCURRENCY" in message and "higher rate-limit tier" in message


def test_a_batch_the_server_serves_steadily_never_runs_out_of_patience():
    """Patience is time without progress, not the batch's total wait: paused far longer than it, yet fine."""
    pace = Pace(ceiling=1, patience=0.15)
    server = Server(lambda n, request: too_many({"retry-after-ms": "100"}) if n % 2 == 0 else ok())

    async def one_by_one():
        return [(await send(pace, server, body))[0] for body in bodies(5)]

    assert [r.status_code for r in asyncio.run(one_by_one())] == [200] * 5
    stats = pace.stats()
    assert stats.gave_up == 0 and stats.rate_limited == 5 and stats.paused_seconds >= 0.45


def test_a_wait_longer_than_the_patience_left_gives_up_at_once():
    pace = Pace(ceiling=4, patience=60)
    server = Server(lambda n, request: too_many({"retry-after": "3600"}))
    started = time.monotonic()
    (response,) = asyncio.run(send(pace, server, b"tomorrow"))
    assert response.headers[pacing.MARK] == "gave-up" and len(server.arrivals) == 1
    assert time.monotonic() - started < 5, "no point waiting 60 s for a server that asks for an hour"
    assert "the server asks for 3600 s more" in pace.explain(response, "x")


def test_zero_patience_fails_on_the_first_429():
    pace = Pace(ceiling=4, patience=0)
    server = Server(lambda n, request: too_many({"retry-after-ms": "10"}))
    (response,) = asyncio.run(send(pace, server, b"now"))
    assert response.headers[pacing.MARK] == "gave-up" and len(server.arrivals) == 1


def test_no_credit_is_not_a_rate_limit_and_is_never_waited_for():
    pace = Pace(ceiling=4, patience=60)
    body = {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                      "code": "insufficient_quota"}}
    server = Server(lambda n, request: too_many({"retry-after": "1"}, body))
    (response,) = asyncio.run(send(pace, server, b"broke"))
    assert response.headers[pacing.MARK] == "quota" and response.headers["x-should-retry"] == "false"
    assert len(server.arrivals) == 1 and pace.stats().pauses == 0
    assert "no credit or quota left" in pace.explain(response, "x")


def test_patience_and_counters_start_again_with_each_batch():
    pace = Pace(ceiling=4, patience=0.25)
    server = Server(lambda n, request: too_many({"retry-after-ms": "100"}) if n < 2 else ok())
    asyncio.run(send(pace, server, b"first batch"))
    first = pace.stats()
    assert first.rate_limited == 2 and first.paused_seconds >= 0.19
    pace.start_batch()
    assert pace.stats() == PaceStats(window=pace.window, ceiling=4)
    server.answer = lambda n, request: too_many({"retry-after-ms": "100"}) if n < 4 else ok()
    (response,) = asyncio.run(send(pace, server, b"second batch"))
    assert response.status_code == 200, "a new batch waits afresh: the first one's 0.2 s do not count"


# ----------------------------------------------------------------------------------------- announcing pauses


def test_a_long_pause_is_announced_once(monkeypatch):
    monkeypatch.setattr(pacing, "ANNOUNCE_PAUSES_OVER", 0.1)
    announced: list[tuple[float, str]] = []
    pace = Pace(ceiling=8, patience=30, on_pause=lambda seconds, reason: announced.append((seconds, reason)))
    server = Server(lambda n, request: too_many({"retry-after-ms": "200"}) if n < 5 else ok(), latency=0.01)
    asyncio.run(send(pace, server, *bodies(5)))
    assert len(announced) == 1, "five 429s, one pause, one event"
    seconds, reason = announced[0]
    assert 0.15 <= seconds <= 0.2 + 1e-6 and reason == "HTTP 429 from the server, retry after 0.2 s"  # float clock
    pace._pause(0.05, "short")
    assert len(announced) == 1, "a short pause is not announced"


# ----------------------------------------------------------------------------------------- the HTTP client


def test_the_real_http_client_paces_every_transport_it_would_use(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # the openai client honours proxies from the environment
    pace = Pace(ceiling=4, patience=1)
    client = PacedHttpClient(pace)
    try:
        assert isinstance(client._transport, PacedTransport) and client._transport.pace is pace
        proxied = [t for t in client._mounts.values() if t is not None]
        assert proxied and all(isinstance(t, PacedTransport) for t in proxied)
        assert client.timeout == httpx2.Timeout(timeout=600, connect=5.0), "the openai client's own defaults"
    finally:
        asyncio.run(client.aclose())
