"""machinery/concurrency.py: a cap on work in flight that holds across event loops (and can be resized), and a
thread-safe count."""

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
    with pytest.raises(ValueError, match=f"limit must be at least 1, got {bad}"):
        InflightLimit(3).resize(bad)


def test_a_larger_limit_lets_waiters_in_at_once():
    limit = InflightLimit(1)

    async def scenario():
        await limit.__aenter__()
        waiters = [asyncio.ensure_future(limit.__aenter__()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        limit.resize(3)  # two more slots: the first two waiters, in order
        for _ in range(3):  # the handover, then the waiters' tasks resume
            await asyncio.sleep(0)
        assert [w.done() for w in waiters] == [True, True, False] and limit.in_flight == 3
        limit.resize(4)
        await asyncio.wait_for(waiters[2], 5)
        for _ in range(4):
            limit.release()
        return limit.in_flight, limit.peak

    assert asyncio.run(scenario()) == (0, 4)


def test_a_smaller_limit_lets_holders_finish_and_admits_no_one_until_below_it():
    limit = InflightLimit(4)

    async def scenario():
        for _ in range(4):
            await limit.__aenter__()
        limit.resize(2)
        waiter = asyncio.ensure_future(limit.__aenter__())
        for expected_in_flight in (3, 2):  # two holders finish: still not below the new limit
            limit.release()
            for _ in range(3):
                await asyncio.sleep(0)
            assert not waiter.done() and limit.in_flight == expected_in_flight
        limit.release()  # one holder left: the waiter gets the second slot
        await asyncio.wait_for(waiter, 5)
        assert limit.in_flight == 2
        limit.release()
        limit.release()

    asyncio.run(scenario())
    assert limit.in_flight == 0


def test_resizing_holds_across_event_loops():
    """Shrunk from another thread while three loops compete: the new limit holds for all of them."""
    limit = InflightLimit(6)
    active, peak_after, lock, shrunk = [0], [0], threading.Lock(), threading.Event()

    async def work():
        async with limit:
            with lock:
                active[0] += 1
                if shrunk.is_set() and limit.in_flight <= 2:  # once the old holders have drained
                    peak_after[0] = max(peak_after[0], active[0])
            await asyncio.sleep(0.005)
            with lock:
                active[0] -= 1

    async def many():
        await asyncio.gather(*(work() for _ in range(30)))

    threads = [threading.Thread(target=asyncio.run, args=(many(),)) for _ in range(3)]
    for thread in threads:
        thread.start()
    limit.resize(2)
    shrunk.set()
    for thread in threads:
        thread.join(30)
    assert limit.peak == 6 and 1 <= peak_after[0] <= 2
    assert limit.in_flight == 0


def test_reset_peak_counts_from_the_holders_of_now():
    limit = InflightLimit(3)

    async def scenario():
        async with limit, limit:
            limit.reset_peak()
            assert limit.peak == 2
        limit.reset_peak()
        async with limit:
            return limit.peak

    assert asyncio.run(scenario()) == 1


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
