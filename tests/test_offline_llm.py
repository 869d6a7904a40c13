"""machinery/offline_llm.py, the offline model: deterministic, topic-aware, and a critic that a reviser can satisfy."""

from __future__ import annotations

import json

import pytest

import pipeline
from machinery import offline_llm

TOPICS = ["Quantum computing", "Why cats purr", "Remote work and small businesses", "critique", "日本の茶道"]


def chat(system: str, user: str, json_mode: bool = False) -> dict:
    body = {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    if json_mode:
        body["response_format"] = {"type": "json_object"}
    return body


def refine(topic: str, rounds: int) -> list[dict]:
    draft = offline_llm.write_draft(topic)
    history = []
    for _ in range(rounds):
        critique = offline_llm.critique(draft, topic)
        history.append({"draft": draft, **critique})
        draft = offline_llm.revise(draft, topic, tuple(critique["improvements"]))
    return history


def test_same_request_same_reply():
    body = chat(pipeline.WRITER_PROMPT, "Topic: Quantum computing\n\nWrite the report.")
    assert offline_llm.complete(body) == offline_llm.complete(json.loads(json.dumps(body)))


def test_different_topics_get_different_drafts():
    drafts = {offline_llm.write_draft(topic) for topic in TOPICS}
    assert len(drafts) == len(TOPICS)
    # not just the title: the body wording differs too
    bodies = {offline_llm.write_draft(t).split("\n", 1)[1].replace(t, "X") for t in TOPICS}
    assert len(bodies) > 1


def test_a_topic_named_like_a_role_still_gets_a_report():
    reply = offline_llm.complete(chat(pipeline.WRITER_PROMPT, "Topic: critique\n\nWrite the report."))
    content = reply["choices"][0]["message"]["content"]
    assert content.startswith("# critique\n")


@pytest.mark.parametrize("topic", TOPICS)
def test_scores_rise_until_the_report_is_complete(topic):
    scores = [round_["score"] for round_ in refine(topic, 5)]
    scores = scores[: scores.index(10) + 1] if 10 in scores else scores
    assert scores[0] <= 6, "a first draft should leave room to improve"
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] == 10 and len(scores) <= 5


def test_topics_take_different_paths():
    paths = {tuple(round_["score"] for round_ in refine(topic, 4)) for topic in TOPICS}
    assert len(paths) >= 2, "a chart of several topics should not show one line"


@pytest.mark.parametrize("topic", TOPICS)
def test_each_named_improvement_is_addressed_in_a_later_round(topic):
    history = refine(topic, 5)
    for index, round_ in enumerate(history):
        for improvement in round_["improvements"]:
            later = [r["improvements"] for r in history[index + 1 :]]
            assert any(improvement not in imps for imps in later), f"never addressed: {improvement}"


def test_critique_names_what_is_missing():
    draft = "# Cats\n\n## Introduction\n\nCats purr.\n"
    result = offline_llm.critique(draft, "Cats")
    assert result["score"] < 5
    assert any("Conclusion" in item for item in result["improvements"])
    assert any("examples" in item for item in result["improvements"])
    assert 1 <= result["score"] <= 10


def test_json_mode_needs_the_word_json_like_openai():
    status, payload = offline_llm.route(
        "POST", "/v1/chat/completions", json.dumps(chat("Be brief.", "Topic: x", json_mode=True)).encode()
    )
    assert status == 400
    assert "json" in payload["error"]["message"]


def test_critic_reply_is_json_with_the_critique_keys():
    body = chat(pipeline.CRITIC_PROMPT, "Topic: Cats\n\nReport to review:\n\n# Cats\n", json_mode=True)
    content = offline_llm.complete(body)["choices"][0]["message"]["content"]
    assert set(json.loads(content)) == {"score", "strengths", "improvements", "summary"}


def test_summary_is_extractive_and_short():
    report = refine("Why cats purr", 4)[-1]["draft"]
    summary = offline_llm.summarize(report)
    sentences = [s for s in summary.split(". ") if s]
    assert 1 <= len(sentences) <= 3
    for sentence in sentences:
        assert sentence.rstrip(".") in report


def test_usage_is_reported():
    reply = offline_llm.complete(chat(pipeline.WRITER_PROMPT, "Topic: Cats\n\nWrite the report."))
    usage = reply["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_loopback_server_speaks_the_openai_protocol():
    import asyncio

    from openai import AsyncOpenAI

    async def ask(base_url: str) -> tuple[str, list[str]]:
        client = AsyncOpenAI(base_url=base_url, api_key="anything")
        models = [m.id async for m in client.models.list()]
        reply = await client.chat.completions.create(
            model="whatever",
            messages=[{"role": "system", "content": pipeline.WRITER_PROMPT},
                      {"role": "user", "content": "Topic: Cats"}],
        )
        await client.close()
        return reply.choices[0].message.content, models

    with offline_llm.OfflineServer() as server:
        content, models = asyncio.run(ask(server.base_url))
    assert content == offline_llm.write_draft("Cats")
    assert models == [offline_llm.MODEL_VERSION]


def test_unknown_routes_and_bad_bodies_are_http_errors():
    status, payload = offline_llm.route("GET", "/v1/nothing", b"")
    assert status == 404 and "no route for GET /v1/nothing" in payload["error"]["message"]
    status, payload = offline_llm.route("POST", "/v1/chat/completions", b"not json")
    assert status == 400 and payload["error"]["type"] == "invalid_request_error"
    status, payload = offline_llm.route("POST", "/v1/chat/completions", json.dumps({"messages": []}).encode())
    assert status == 400 and "'messages' must be a non-empty list" in payload["error"]["message"]


def test_simulated_latency_is_fixed_plus_per_token():
    payload = offline_llm.complete(chat(pipeline.WRITER_PROMPT, "Topic: Cats"))
    tokens = payload["usage"]["completion_tokens"]
    assert offline_llm.simulated_latency(payload, 0.5, 0.01) == pytest.approx(0.5 + 0.01 * tokens)
    assert offline_llm.simulated_latency({"error": {}}, 0.5, 0.01) == 0.0, "errors come back at once"


def test_the_in_process_transport_waits_without_blocking_the_loop():
    import asyncio
    import time

    client = offline_llm.openai_client(offline_llm.OfflineTransport(latency=0.2))

    async def many():
        body = chat(pipeline.WRITER_PROMPT, "Topic: Cats")
        await asyncio.gather(*(client.chat.completions.create(**body) for _ in range(5)))
        await client.close()

    started = time.perf_counter()
    asyncio.run(many())
    assert time.perf_counter() - started < 0.2 * 5 * 0.6, "five replies overlap their waits"
