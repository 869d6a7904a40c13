"""machinery/offline_llm.py, the offline model: deterministic, topic-aware, a critic that a reviser can satisfy,
and topic markers that make the critic fail on purpose."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

import pipeline
from machinery import offline_llm
from machinery.inputs import validate_batch

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


# ----------------------------------------------------------------------------------------- the critic's markers


def critic_reply(topic: str, repair: bool = False) -> dict:
    """The offline critic's reply (parsed) to a first critique or to pipeline.critique_draft's repair request."""
    draft = offline_llm.write_draft(topic)
    lead = f"{offline_llm.REPAIR_REQUEST}: score: ...\nReply again with one JSON object.\n\n" if repair else ""
    body = chat(pipeline.CRITIC_PROMPT, f"Topic: {topic}\n\n{lead}Report to review:\n\n{draft}", json_mode=True)
    return json.loads(offline_llm.complete(body)["choices"][0]["message"]["content"])


@pytest.mark.parametrize("topic", ["Why cats purr (needs repair)", "Dogs (unreviewable)", "Birds (Needs Repair)"])
def test_topics_with_a_marker_are_valid_batch_topics(topic):
    assert validate_batch([topic], 3, 8) == [topic]


def test_an_unreviewable_topic_gets_a_critique_scored_0_every_time():
    topic = "Dogs (unreviewable)"
    expected = offline_llm.critique(offline_llm.write_draft(topic), topic)
    for repair in (False, True):
        reply = critic_reply(topic, repair)
        assert reply == {**expected, "score": 0}, "only the score is unusable"
        with pytest.raises(ValidationError, match="greater than or equal to 1"):
            pipeline.Critique.model_validate(reply)


def test_a_needs_repair_topic_gets_a_score_of_11_first_and_a_valid_critique_on_repair():
    topic = "Why cats purr (needs repair)"
    expected = offline_llm.critique(offline_llm.write_draft(topic), topic)
    first = critic_reply(topic)
    assert first == {**expected, "score": 11}
    with pytest.raises(ValidationError, match="less than or equal to 10"):
        pipeline.Critique.model_validate(first)
    assert critic_reply(topic, repair=True) == expected
    assert pipeline.Critique.model_validate(expected).score == expected["score"]


def test_markers_are_found_in_any_letter_case_and_unreviewable_wins():
    assert critic_reply("Birds (Needs Repair)")["score"] == 11
    assert critic_reply("Birds (UNREVIEWABLE)", repair=True)["score"] == 0
    assert critic_reply("Birds (needs repair) (unreviewable)")["score"] == 0
    assert critic_reply("Birds (needs repair) (unreviewable)", repair=True)["score"] == 0


def test_a_topic_without_a_marker_is_critiqued_as_before():
    for topic in ("Cats", "Needs repair", "Why reviews are unreviewable"):
        expected = offline_llm.critique(offline_llm.write_draft(topic), topic)
        assert critic_reply(topic) == expected == critic_reply(topic, repair=True)


@pytest.mark.parametrize("topic", ["Dogs (unreviewable)", "Why cats purr (needs repair)"])
def test_markers_change_only_the_critic(topic):
    draft = offline_llm.write_draft(topic)
    writer = offline_llm.complete(chat(pipeline.WRITER_PROMPT, f"Topic: {topic}\n\nWrite the report."))
    assert writer["choices"][0]["message"]["content"] == draft
    reviser_prompt = f"Topic: {topic}\n\nImprovements to make:\n- Add a Conclusion.\n\nCurrent report:\n\n{draft}"
    reviser = offline_llm.complete(chat(pipeline.REVISER_PROMPT, reviser_prompt))
    assert reviser["choices"][0]["message"]["content"] == offline_llm.revise(
        draft, topic, ("Add a Conclusion.",))
    summary = offline_llm.complete(chat(pipeline.SUMMARY_PROMPT, f"Topic: {topic}\n\nReport to summarize:\n\n{draft}"))
    assert summary["choices"][0]["message"]["content"] == offline_llm.summarize(draft)


def test_markers_work_over_the_loopback_server_too():
    import urllib.request

    topic = "Why cats purr (needs repair)"
    body = chat(pipeline.CRITIC_PROMPT, f"Topic: {topic}\n\nReport to review:\n\n# {topic}\n", json_mode=True)
    with offline_llm.OfflineServer() as server:
        request = urllib.request.Request(f"{server.base_url}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            reply = json.load(response)
    assert json.loads(reply["choices"][0]["message"]["content"])["score"] == 11
