"""The traced LLM call and steps: repair of bad critiques, one client per loop, the in-flight cap."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from helpers import ScriptedTransport, install_transport

import offline_llm
import pipeline
from plumbing import InflightLimit

DRAFT = offline_llm.write_draft("Cats")
VALID = json.dumps({"score": 6, "strengths": ["clear"], "improvements": ["Add a conclusion."], "summary": "ok"})


def run_metered(step, *args):
    """Run one traced step on a fresh loop; return its result and the usage it recorded."""

    async def go():
        with pipeline.metering() as meter:
            return await step(*args), meter.total

    return asyncio.run(go())


def critic_replies(*replies: str):
    """A rewrite hook that answers successive critique requests with ``replies``."""
    queue = list(replies)

    def rewrite(role: str, topic: str, content: str) -> str | None:
        return queue.pop(0) if role == "critic" and queue else None

    return rewrite


@pytest.mark.parametrize(
    ("bad_reply", "quoted"),
    [
        ("not json at all", "Invalid JSON"),
        ('{"score": 7, "strengths": [], "improvements": []', "EOF while parsing"),
        (json.dumps({"score": 11, "strengths": [], "improvements": [], "summary": "s"}), "less than or equal to 10"),
        (json.dumps({"score": 0, "strengths": [], "improvements": [], "summary": "s"}), "greater than or equal to 1"),
        (json.dumps({"strengths": [], "improvements": [], "summary": "s"}), "score: Field required"),
        ("[1, 2, 3]", "Input should be an object"),
    ],
)
def test_a_bad_critique_gets_one_repair_request_that_quotes_the_error(bad_reply, quoted, monkeypatch):
    transport = ScriptedTransport(critic_replies(bad_reply))
    install_transport(monkeypatch, transport)
    prompts = []
    real_call = pipeline.call_llm

    async def spy(system, prompt, json_mode=False):
        prompts.append(prompt)
        return await real_call(system, prompt, json_mode)

    monkeypatch.setattr(pipeline, "call_llm", spy)
    critique, usage = run_metered(pipeline.critique_draft, "Cats", DRAFT)
    assert transport.count("critic") == 2
    assert usage.requests == 2
    assert quoted in prompts[1], prompts[1][:300]
    assert critique == pipeline.Critique.model_validate(offline_llm.critique(DRAFT, "Cats"))


def test_an_empty_reply_is_asked_again_not_repaired(monkeypatch):
    transport = ScriptedTransport(critic_replies("", "  \n"))
    install_transport(monkeypatch, transport)
    critique, usage = run_metered(pipeline.critique_draft, "Cats", DRAFT)
    assert transport.count("critic") == 3, "two empty replies, then the same request once more"
    assert usage.requests == 3
    assert critique.score == offline_llm.critique(DRAFT, "Cats")["score"]


def test_empty_replies_beyond_the_budget_are_a_clear_error(monkeypatch):
    install_transport(monkeypatch, ScriptedTransport(lambda role, topic, content: ""))
    with pytest.raises(pipeline.EmptyReplyError, match="empty reply 3 times in a row"):
        asyncio.run(pipeline.write_draft("Cats"))


def test_a_critique_invalid_twice_is_a_clear_error(monkeypatch):
    transport = ScriptedTransport(critic_replies('{"score": "high"}', '{"score": 12}'))
    install_transport(monkeypatch, transport)
    with pytest.raises(pipeline.CritiqueError) as caught:
        asyncio.run(pipeline.critique_draft("Cats", DRAFT))
    message = str(caught.value)
    assert "'Cats'" in message and "invalid twice" in message and "score" in message
    assert transport.count("critic") == 2, "exactly one repair request, no more"


def test_a_score_given_as_a_string_is_accepted(monkeypatch):
    install_transport(monkeypatch, ScriptedTransport(critic_replies(VALID.replace("6", '"6"', 1))))
    assert asyncio.run(pipeline.critique_draft("Cats", DRAFT)).score == 6


def test_usage_adds_up_over_the_steps(monkeypatch):
    async def steps():
        draft = await pipeline.write_draft("Cats")
        return await pipeline.critique_draft("Cats", draft)

    _, usage = run_metered(steps)
    assert usage.requests == 2
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_concurrent_meters_count_only_their_own_calls():
    """Topics share one event loop; each task's meter must see its own calls, gathered ones included."""

    async def topic(name: str, calls: int):
        with pipeline.metering() as meter:
            await asyncio.gather(*(pipeline.write_draft(f"{name} {i}") for i in range(calls)))
            return meter.total

    async def both():
        return await asyncio.gather(topic("Cats", 1), topic("Dogs", 3))

    cats, dogs = asyncio.run(both())
    assert (cats.requests, dogs.requests) == (1, 3)


def test_a_reply_cache_hit_is_counted_as_a_hit_not_a_request(tmp_path):
    pipeline.configure(llm_cache=tmp_path / "replies.sqlite3")
    first, spent = run_metered(pipeline.write_draft, "Cats")
    again, reused = run_metered(pipeline.write_draft, "Cats")
    assert first == again
    assert (spent.requests, spent.cache_hits) == (1, 0)
    assert (reused.requests, reused.cache_hits, reused.total_tokens) == (0, 1, 0)


def test_one_client_per_event_loop_across_notebook_and_flyte_loops(tmp_path):
    """A direct await, then a Flyte run, then a direct await on a new loop: all work."""
    first = asyncio.run(pipeline.write_draft("Cats"))
    batch = pipeline.run_batch(["Cats"], max_iterations=1, output_dir=tmp_path, run_id="loops", use_cache=False)
    again = asyncio.run(pipeline.write_draft("Cats"))
    assert first == again == offline_llm.write_draft("Cats")
    assert batch.reports[0].ok, batch.reports[0].error

    async def client_id() -> int:
        return id(pipeline.get_client())

    async def two_calls_same_loop() -> tuple[int, int]:
        return await client_id(), await client_id()

    a, b = asyncio.run(two_calls_same_loop())
    assert a == b


def test_clients_on_different_loops_are_different_objects():
    seen = []

    async def grab():
        seen.append(pipeline.get_client())

    loop_a, loop_b = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        loop_a.run_until_complete(grab())
        loop_b.run_until_complete(grab())
        loop_a.run_until_complete(grab())
    finally:
        loop_a.close()
        loop_b.close()
    assert seen[0] is seen[2] and seen[0] is not seen[1]


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


def test_the_pipeline_never_exceeds_its_concurrency_cap(tmp_path, monkeypatch):
    pipeline.configure(max_concurrency=2, offline_latency=0.01)
    try:
        batch = pipeline.run_batch([f"Topic {i}" for i in range(6)], max_iterations=2, output_dir=tmp_path,
                                   run_id="cap", use_cache=False)
        assert pipeline._limit.peak == 2
    finally:
        pipeline.configure(max_concurrency=pipeline.Settings.max_concurrency, offline_latency=0.0)
    assert all(report.ok for report in batch.reports)


def test_a_records_schema_is_built_once_but_every_caller_gets_its_own_copy():
    from flyte.types._type_engine import CustomPydanticJsonSchemaGenerator
    from pydantic import BaseModel

    for generator in ({}, {"schema_generator": CustomPydanticJsonSchemaGenerator}):
        fresh = BaseModel.model_json_schema.__func__(pipeline.RefineResult, **generator)
        first = pipeline.RefineResult.model_json_schema(**generator)
        assert first == fresh
        first["properties"].clear()  # a caller that edits its copy must not change the next one
        assert pipeline.RefineResult.model_json_schema(**generator) == fresh
