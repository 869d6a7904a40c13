"""machinery/concurrency.py: a cap on work in flight that holds across event loops, and a thread-safe count."""

from __future__ import annotations

import asyncio
import threading

import pytest

from machinery.concurrency import InflightLimit, Tally


def test_inflight_limit_holds_across_event_loops():
    limit = InflightLimit(3)
    active, peak, lock = [0], [0], threading.Lock()

    async def work():
        async with limit:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            await asyncio.sleep(0.01)
            with lock:
                active[0] -= 1

    async def many():
        await asyncio.gather(*(work() for _ in range(20)))

    threads = [threading.Thread(target=asyncio.run, args=(many(),)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert peak[0] == 3 and limit.peak == 3
    assert limit.in_flight == 0


def test_inflight_limit_survives_cancelled_waiters():
    limit = InflightLimit(1)

    async def scenario():
        async with limit:
            waiter = asyncio.ensure_future(limit.__aenter__())
            await asyncio.sleep(0)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        async with limit:  # the slot is free again
            return limit.in_flight

    assert asyncio.run(scenario()) == 1
    assert limit.in_flight == 0


@pytest.mark.parametrize(
    "cancelled",
    [
        "while-waiting",
        "handed-over-not-yet-granted",
        "after-the-grant",
    ],
)
def test_a_cancelled_waiter_never_leaks_or_double_releases_a_slot(cancelled):
    limit = InflightLimit(1)

    async def scenario():
        await limit.__aenter__()
        waiter = asyncio.ensure_future(limit.__aenter__())
        await asyncio.sleep(0)
        if cancelled == "while-waiting":
            waiter.cancel()
        await limit.__aexit__(None, None, None)  # hands the slot to the waiter, granted on the loop's next turn
        if cancelled == "handed-over-not-yet-granted":
            waiter.cancel()
        elif cancelled == "after-the-grant":
            await asyncio.sleep(0)
            waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0)
        return limit.in_flight

    assert asyncio.run(scenario()) == 0


def test_waiters_are_served_first_come_first_served():
    limit = InflightLimit(1)
    order = []

    async def work(number):
        async with limit:
            order.append(number)
            await asyncio.sleep(0.001)

    async def scenario():
        await asyncio.gather(*(work(n) for n in range(10)))

    asyncio.run(scenario())
    assert order == list(range(10))


def test_a_waiter_on_a_closed_loop_is_skipped():
    limit = InflightLimit(1)
    dead = asyncio.new_event_loop()
    dead_waiter = dead.create_future()
    dead.close()

    async def scenario():
        async with limit:
            limit._waiters.append((dead, dead_waiter))  # a loop that ended while waiting
            waiter = asyncio.ensure_future(limit.__aenter__())
            await asyncio.sleep(0)
        await asyncio.wait_for(waiter, 5)
        await limit.__aexit__(None, None, None)

    asyncio.run(scenario())
    assert limit.in_flight == 0


@pytest.mark.parametrize("bad", [0, -1])
def test_a_limit_below_one_is_refused(bad):
    with pytest.raises(ValueError, match=f"limit must be at least 1, got {bad}"):
        InflightLimit(bad)


def test_tally_counts_from_many_threads():
    tally = Tally()

    def add_many():
        for _ in range(10_000):
            tally.add()

    threads = [threading.Thread(target=add_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tally.value == 40_000
