"""machinery/offline_llm.py, the offline model: deterministic, topic-aware, a critic that a reviser can satisfy,
and topic markers that make the critic fail on purpose."""

from __future__ import annotations

import json
import math
import re
import statistics

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


# ----------------------------------------------------------------------------------------- a server with limits


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


WRITER_BODY = chat(pipeline.WRITER_PROMPT, "Topic: Cats\n\nWrite the report.")


def post(client, body: dict | None = None):
    return client.post("/chat/completions", json=body or WRITER_BODY)


def limited_server(clock: FakeClock, **options):
    options = {"requests_per_minute": 60, "burst": 2, "ratelimit_headers": True, "clock": clock, **options}
    return offline_llm.OfflineServer(**options)


def http_client(server):
    import httpx2

    return httpx2.Client(base_url=server.base_url, timeout=10)


def test_the_bucket_admits_a_burst_then_refills_at_rpm_over_60_per_second():
    clock = FakeClock()
    bucket = offline_llm.TokenBucket(rate=120 / 60, capacity=3, clock=clock)
    taken = [bucket.take() for _ in range(4)]
    assert [a.allowed for a in taken] == [True, True, True, False]
    assert [a.remaining for a in taken] == [2, 1, 0, 0]
    assert [a.reset for a in taken] == pytest.approx([0.5, 1.0, 1.5, 1.5]), "until the bucket is full again"
    assert taken[3].retry_after == pytest.approx(0.5), "two tokens a second: the next one in 0.5 s"
    clock.advance(0.25)
    refused = bucket.take()
    assert not refused.allowed and refused.retry_after == pytest.approx(0.25), "a refused request takes nothing"
    clock.advance(0.25)
    assert bucket.take().allowed and not bucket.take().allowed
    clock.advance(3600)
    assert bucket.peek().remaining == 3, "the bucket never holds more than its capacity"
    assert [bucket.take().allowed for _ in range(4)] == [True, True, True, False]


def test_the_bucket_counts_float_refills_as_whole_tokens():
    clock = FakeClock()
    bucket = offline_llm.TokenBucket(rate=600 / 60, capacity=1, clock=clock)
    for _ in range(50):
        assert bucket.take().allowed
        clock.advance(0.1)  # exactly one token at 10 per second, whatever the float noise


def test_the_bucket_is_thread_safe():
    import threading

    bucket = offline_llm.TokenBucket(rate=1e-9, capacity=500)  # no refill to speak of
    admitted = []

    def take_many() -> None:
        admitted.append(sum(bucket.take().allowed for _ in range(100)))

    threads = [threading.Thread(target=take_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 500


def test_the_default_burst_is_ten_seconds_of_budget():
    assert offline_llm.default_burst(300) == 50
    assert offline_llm.default_burst(60) == 10
    assert offline_llm.default_burst(5) == 1
    server = offline_llm.OfflineServer(requests_per_minute=300)
    try:
        assert server.burst == 50 and server.bucket.rate == 5
    finally:
        server.httpd.server_close()


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.0004, "1ms"), (0.012, "12ms"), (0.999, "999ms"), (1, "1s"), (1.5, "1.5s"), (8.64, "8.64s"),
    (59.9999, "1m0s"), (90.5, "1m30.5s"), (360, "6m0s"), (3600, "1h0m0s"), (3725.25, "1h2m5.25s"),
])
def test_durations_are_written_as_openai_does(seconds, text):
    assert offline_llm.format_duration(seconds) == text


def test_options_that_need_a_budget_are_refused_without_one():
    for options in ({"burst": 3}, {"ratelimit_headers": True}, {"requests_per_minute": 0}, {"jitter": -1}):
        with pytest.raises(ValueError):
            offline_llm.OfflineServer(**options)


def test_over_the_budget_a_429_with_retry_after_and_openais_error_body():
    clock = FakeClock()
    with limited_server(clock, ratelimit_headers=False) as server, http_client(server) as client:
        assert [post(client).status_code for _ in range(2)] == [200, 200]
        refused = post(client)
        clock.advance(0.2505)
        later = post(client)
    assert refused.status_code == 429
    assert refused.headers["retry-after-ms"] == "1000" and refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": {
        "message": f"Rate limit reached for requests per min (RPM) on {offline_llm.MODEL_VERSION}: "
                   "Limit: 60 / min, burst 2. Please try again in 1s.",
        "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    assert later.status_code == 429
    assert later.headers["retry-after-ms"] == "750" and later.headers["retry-after"] == "1", "both rounded up"
    assert "Please try again in 750ms." in later.json()["error"]["message"]
    assert not any(name.startswith("x-ratelimit") for name in refused.headers), "only when asked for"


def test_models_are_free_and_unlimited_servers_send_no_limit_headers():
    clock = FakeClock()
    with limited_server(clock, burst=1) as server, http_client(server) as client:
        assert post(client).status_code == 200
        assert [client.get("/models").status_code for _ in range(5)] == [200] * 5
        assert post(client).status_code == 429
        assert server.stats().requests == 2, "GET /models is not counted"
    with offline_llm.OfflineServer() as server, http_client(server) as client:
        replies = [post(client) for _ in range(20)]
    assert {reply.status_code for reply in replies} == {200}
    assert not any(name.startswith(("x-ratelimit", "retry-after")) for name in replies[-1].headers)


def test_ratelimit_headers_count_down_and_reset():
    clock = FakeClock()
    with limited_server(clock, burst=3) as server, http_client(server) as client:
        replies = [post(client) for _ in range(4)]
        clock.advance(0.5)
        half = post(client)
        clock.advance(0.5)
        one = post(client)
        clock.advance(60)
        full = post(client)
        bad = post(client, {"messages": []})
    headers = [(r.status_code, r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"],
                r.headers["x-ratelimit-reset-requests"]) for r in (*replies, half, one, full, bad)]
    assert headers == [
        (200, "60", "2", "1s"), (200, "60", "1", "2s"), (200, "60", "0", "3s"),
        (429, "60", "0", "3s"),  # a 429 carries them too, with the retry-after headers
        (429, "60", "0", "2.5s"),  # half a token back: the bucket is full 0.5 s sooner
        (200, "60", "0", "3s"),  # a whole token, taken at once
        (200, "60", "2", "1s"),  # a minute later the bucket is full again: it has reset
        (400, "60", "1", "2s"),  # a refused body counts against the budget, as on OpenAI
    ]
    assert replies[3].headers["retry-after-ms"] == "1000"


def test_the_openai_client_raises_rate_limit_error_on_the_429():
    import asyncio

    import openai

    async def ask(base_url: str, retries: int) -> str:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="offline", max_retries=retries)
        try:
            reply = await client.chat.completions.create(**WRITER_BODY)
            return reply.choices[0].message.content
        finally:
            await client.close()

    clock = FakeClock()
    with limited_server(clock, burst=1) as server:
        assert asyncio.run(ask(server.base_url, 0)) == offline_llm.write_draft("Cats")
        with pytest.raises(openai.RateLimitError) as caught:
            asyncio.run(ask(server.base_url, 0))
    error = caught.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.type == "requests"
    assert "Limit: 60 / min" in error.message
    assert error.response.headers["retry-after-ms"] == "1000"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"

    # With retries, the client waits the retry-after-ms the server sent (100 ms at 600/min) and gets through.
    with offline_llm.OfflineServer(requests_per_minute=600, burst=1) as server:
        assert asyncio.run(ask(server.base_url, 0))
        assert asyncio.run(ask(server.base_url, 2)) == offline_llm.write_draft("Cats")
        stats = server.stats()
    assert (stats.requests, stats.rate_limited, stats.completions) == (3, 1, 2)


def test_jitter_is_deterministic_per_request_and_bounded():
    bodies = [json.dumps(chat(pipeline.WRITER_PROMPT, f"Topic: topic {i}")).encode() for i in range(2000)]
    factors = [offline_llm.jitter_factor(body, 0.5) for body in bodies]
    assert factors == [offline_llm.jitter_factor(body, 0.5) for body in bodies], "same request, same wait"
    low, high = math.exp(-1.5), math.exp(1.5)
    assert all(low <= factor <= high for factor in factors), "clipped at three sigma"
    assert 0.9 < statistics.median(factors) < 1.1, "centred on the latency"
    assert min(factors) < 0.5 and max(factors) > 2, "spread out, so replies do not arrive in lockstep"
    assert len(set(factors)) > 1990
    assert offline_llm.jitter_factor(bodies[0], 0) == 1.0
    smaller = [offline_llm.jitter_factor(body, 0.1) for body in bodies[:50]]
    assert all(math.exp(-0.3) <= factor <= math.exp(0.3) for factor in smaller)

    server = offline_llm.OfflineServer(latency=1.0, per_token_latency=0.01, jitter=0.5)
    try:
        payload = offline_llm.complete(json.loads(bodies[0]))
        base = offline_llm.simulated_latency(payload, 1.0, 0.01)
        assert server.delay_for(bodies[0], payload) == pytest.approx(base * factors[0])
        assert server.delay_for(bodies[0], {"error": {}}) == 0.0, "errors come back at once"
    finally:
        server.httpd.server_close()


def test_the_server_waits_the_jittered_latency():
    import time

    body = chat(pipeline.WRITER_PROMPT, "Topic: Cats")
    raw = json.dumps(body).encode()
    factor = offline_llm.jitter_factor(raw, 0.5)
    with offline_llm.OfflineServer(latency=0.1, jitter=0.5) as server, http_client(server) as client:
        started = time.perf_counter()
        reply = client.post("/chat/completions", content=raw, headers={"Content-Type": "application/json"})
        elapsed = time.perf_counter() - started
    assert reply.status_code == 200
    assert elapsed >= 0.1 * factor - 0.005


def test_counters_and_peak_in_flight():
    from concurrent.futures import ThreadPoolExecutor

    clock = FakeClock()
    with limited_server(clock, burst=4, latency=0.4) as server, http_client(server) as client:
        assert server.stats() == offline_llm.ServerStats()
        with ThreadPoolExecutor(6) as pool:
            statuses = sorted(reply.status_code for reply in pool.map(lambda _: post(client), range(6)))
        assert statuses == [200, 200, 200, 200, 429, 429]
        client.get("/models")
        post(client, {"messages": []})
        stats = server.stats()
        assert stats == offline_llm.ServerStats(requests=7, rate_limited=3, completions=4, errors=0,
                                                in_flight=0, peak_in_flight=stats.peak_in_flight)
        assert 4 <= stats.peak_in_flight <= 6, "four completions waited their latency at the same time"
        clock.advance(60)
        assert post(client, {"messages": []}).status_code == 400
        assert server.stats().errors == 1
        server.reset_stats()
        assert server.stats() == offline_llm.ServerStats()
        post(client)
        assert server.stats() == offline_llm.ServerStats(requests=1, completions=1, peak_in_flight=1)


def test_cli_flags_parse_into_the_server():
    server = offline_llm.server_from_args(
        ["--port", "0", "--rpm", "120", "--burst", "4", "--jitter", "0.5", "--ratelimit-headers",
         "--latency", "0.2", "--latency-per-token", "0.001"])
    try:
        settings = (server.requests_per_minute, server.burst, server.jitter, server.ratelimit_headers)
        assert settings == (120, 4, 0.5, True)
        assert (server.latency, server.per_token_latency) == (0.2, 0.001)
        assert server.bucket.rate == 2
    finally:
        server.httpd.server_close()
    server = offline_llm.server_from_args(["--port", "0", "--rpm", "300"])
    try:
        assert server.burst == 50 and not server.ratelimit_headers and server.jitter == 0
    finally:
        server.httpd.server_close()
    server = offline_llm.server_from_args(["--port", "0"])
    try:
        assert server.bucket is None and server.burst is None
    finally:
        server.httpd.server_close()
    for wrong in (["--burst", "3"], ["--ratelimit-headers"], ["--rpm", "0"], ["--rpm", "60", "--burst", "0"],
                  ["--jitter", "-0.1"]):
        with pytest.raises(SystemExit):
            offline_llm.server_from_args(["--port", "0", *wrong])


def test_the_command_line_server_enforces_its_budget():
    import subprocess
    import sys
    from pathlib import Path

    command = [sys.executable, "-m", "machinery.offline_llm", "--port", "0", "--rpm", "6", "--burst", "1",
               "--ratelimit-headers"]
    with subprocess.Popen(command, cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, text=True) as process:
        try:
            first = process.stdout.readline()
            assert "listening on http://127.0.0.1:" in first
            assert process.stdout.readline().strip() == "budget: 6 requests/minute, burst 1, x-ratelimit headers"
            import httpx2

            with httpx2.Client(base_url=first.split()[-1], timeout=10) as client:
                ok, refused = post(client), post(client)
        finally:
            process.terminate()
    assert ok.status_code == 200 and ok.headers["x-ratelimit-reset-requests"] == "10s"
    assert refused.status_code == 429
    assert 9000 < int(refused.headers["retry-after-ms"]) <= 10000 and refused.headers["retry-after"] == "10"


# ----------------------------------------------------------------------------------------- reply limits


def role_bodies(topic: str = "Why cats purr") -> dict[str, dict]:
    """One request body per role, as the pipeline words them."""
    draft = offline_llm.write_draft(topic)
    improvements = "\n".join(f"- {item}" for item in offline_llm.critique(draft, topic)["improvements"])
    return {
        "writer": chat(pipeline.WRITER_PROMPT, f"Topic: {topic}\n\nWrite the report."),
        "critic": chat(pipeline.CRITIC_PROMPT, f"Topic: {topic}\n\nReport to review:\n\n{draft}", json_mode=True),
        "reviser": chat(pipeline.REVISER_PROMPT,
                        f"Topic: {topic}\n\nImprovements to make:\n{improvements}\n\nCurrent report:\n\n{draft}"),
        "summarizer": chat(pipeline.SUMMARY_PROMPT, f"Topic: {topic}\n\nReport to summarize:\n\n{draft}"),
    }


def content_of(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


@pytest.mark.parametrize("role", ["writer", "critic", "reviser", "summarizer"])
@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_a_reply_longer_than_the_limit_is_cut_with_finish_reason_length(role, key):
    body = role_bodies()[role]
    whole = offline_llm.complete(body)
    limit = whole["usage"]["completion_tokens"] // 2
    reply = offline_llm.complete({**body, key: limit})
    content = content_of(reply)
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": whole["usage"]["prompt_tokens"], "completion_tokens": limit,
                              "total_tokens": whole["usage"]["prompt_tokens"] + limit}
    assert content_of(whole).startswith(content) and offline_llm.estimate_tokens(content) <= limit
    assert len(content) > limit * 4 - 40, "cut near the limit, not far before it"
    assert content_of(whole)[len(content)].isspace(), "cut at a word boundary"
    if role == "critic":
        with pytest.raises(ValueError):
            json.loads(content)  # a cut critique is unusable, as a real model's would be


@pytest.mark.parametrize("role", ["writer", "critic", "reviser", "summarizer"])
def test_a_reply_within_the_limit_is_unchanged(role):
    body = role_bodies()[role]
    whole = offline_llm.complete(body)
    assert whole["choices"][0]["finish_reason"] == "stop"
    for limit in (whole["usage"]["completion_tokens"], offline_llm.LONGEST_REPLY_TOKENS[role], None):
        reply = offline_llm.complete({**body, "max_tokens": limit})
        assert (reply["choices"], reply["usage"]) == (whole["choices"], whole["usage"])


def test_max_completion_tokens_wins_over_max_tokens_as_on_openai():
    body = role_bodies()["writer"]
    assert offline_llm.complete({**body, "max_completion_tokens": 7, "max_tokens": 90})["usage"][
        "completion_tokens"] == 7
    assert offline_llm.reply_limit({"max_tokens": 90}) == 90 and offline_llm.reply_limit({}) is None


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "10"])
def test_a_limit_that_is_not_a_positive_integer_is_an_http_400(limit):
    body = {**role_bodies()["writer"], "max_tokens": limit}
    status, payload = offline_llm.route("POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and payload["error"]["message"].startswith("Invalid 'max_tokens'")


def test_cutting_to_tokens():
    assert offline_llm.cut_to_tokens("one two three four", 2) == "one two", "the word cut in half is dropped"
    assert offline_llm.cut_to_tokens("one two three", 2) == "one two", "a cut at a space ends there"
    assert offline_llm.cut_to_tokens("x" * 40, 3) == "x" * 12, "no word boundary: cut in the word"
    assert offline_llm.cut_to_tokens("short", 9) == "short"


def test_the_longest_replies_stay_within_the_documented_bounds():
    """LONGEST_REPLY_TOKENS, which reply limits must stay above, over ten rounds for short and 200-character topics.

    The last three topics are the longest-replying (reviser, writer, summarizer) of thousands of 200-character
    topics measured: 200 characters with no space, so a short form of a full 40 characters.
    """
    topics = ["Quantum computing", "Why cats purr", "Remote work and small businesses", "The history of tea",
              "Kubernetes cost optimisation", "日本の茶道", "x" * 200, "茶" * 200, ("tea and cats " * 20)[:200],
              "x" * 197 + "019", "茶" * 197 + "650", "x" * 197 + "257"]
    longest = dict.fromkeys(offline_llm.LONGEST_REPLY_TOKENS, 0)
    for topic in topics:
        draft = offline_llm.write_draft(topic)
        longest["writer"] = max(longest["writer"], offline_llm.estimate_tokens(draft))
        for _ in range(10):
            critique = offline_llm.critique(draft, topic)
            longest["critic"] = max(longest["critic"], offline_llm.estimate_tokens(json.dumps(critique)))
            longest["summarizer"] = max(longest["summarizer"],
                                        offline_llm.estimate_tokens(offline_llm.summarize(draft)))
            draft = offline_llm.revise(draft, topic, tuple(critique["improvements"]))
            longest["reviser"] = max(longest["reviser"], offline_llm.estimate_tokens(draft))
    assert all(longest[role] <= bound for role, bound in offline_llm.LONGEST_REPLY_TOKENS.items()), longest
    assert all(longest[role] > 0.99 * bound for role, bound in offline_llm.LONGEST_REPLY_TOKENS.items()), \
        f"the bounds are not slack: {longest}"


def test_the_longest_replies_fit_the_default_reply_limits_with_room_to_spare():
    from machinery.settings import Settings

    longest, defaults = offline_llm.LONGEST_REPLY_TOKENS, Settings()
    assert longest["reviser"] <= 1300 and longest["writer"] <= 1300, "a report is never near its 1500-token limit"
    assert defaults.max_tokens_report - max(longest["writer"], longest["reviser"]) >= 200
    assert longest["critic"] < defaults.max_tokens_critique and longest["summarizer"] < defaults.max_tokens_summary


# ----------------------------------------------------------------------------------------- long topics


def test_a_topic_of_up_to_40_characters_is_its_own_short_name():
    for topic in ["Rust", "Why cats purr", "Remote work and small businesses", "x" * 40, "茶" * 40,
                  ("tea and cats " * 4)[:40], " leading and trailing spaces ", "the of and", "Dogs (unreviewable)"]:
        assert len(topic) <= offline_llm.SHORT_NAME_CHARS and offline_llm.short_name(topic) == topic


# sha256 over the draft, then ten rounds of critique (JSON), revision and summary, for these topics: the replies
# the notebooks' committed outputs show. Computed with offline-reporter-5 before long topics got short names;
# a change here changes the tutorial's outputs (and wants a new MODEL_VERSION).
SHORT_TOPIC_REPLIES = "7894a8a1cd507e237f67181788659b37fa092ab4988acd9f448efe2cd7192315"


def test_replies_for_topics_of_up_to_40_characters_are_pinned():
    import hashlib

    digest = hashlib.sha256()
    for topic in ["Quantum computing", "Why cats purr", "Remote work and small businesses", "The history of tea",
                  "Rust", "WebAssembly", "x" * 40]:
        draft = offline_llm.write_draft(topic)
        digest.update(draft.encode())
        for _ in range(10):
            critique = offline_llm.critique(draft, topic)
            draft = offline_llm.revise(draft, topic, tuple(critique["improvements"]))
            for reply in (json.dumps(critique), offline_llm.summarize(draft), draft):
                digest.update(reply.encode())
    assert digest.hexdigest() == SHORT_TOPIC_REPLIES
    report = refine("Remote work and small businesses", 5)[-1]["draft"]
    assert "\n## Conclusion\n\nRemote work and small businesses is worth the effort when it starts small" in report


@pytest.mark.parametrize(("topic", "short"), [
    ("Remote work and small businesses in rural areas: what changed after 2020", "Remote work and small businesses"),
    ("The history of tea, from ancient China to the modern supermarket shelf",
     "The history of tea, from ancient China"),
    ("x" * 200, "x" * 40),
    ("茶" * 200, "茶" * 40),
    (("tea and cats " * 20)[:200], "tea and cats tea and cats tea and cats"),
    ("It is as it was, and so on, to be or not to be, in the end of it all: meetings", "end"),
    ("ab cd ef gh " * 16, "ab cd ef gh ab cd ef gh ab cd ef gh ab"),  # no keyword: the short form is one
])
def test_a_longer_topic_is_called_by_its_first_words(topic, short):
    name = offline_llm.short_name(topic)
    assert name == short and len(name) <= offline_llm.SHORT_NAME_CHARS
    keywords = offline_llm._topic_keywords(topic)
    assert any(keyword in name.lower() for keyword in keywords), "the critic's focus check finds the short form"


def test_a_longer_topic_is_named_in_full_in_the_title_and_introduction_only():
    topic = "Remote work and small businesses in rural areas: what changed after 2020"
    report = refine(topic, 10)[-1]["draft"]
    title, introduction, *sections = re.split(r"^## ", report, flags=re.MULTILINE)
    assert title == f"# {topic}\n\n" and topic in introduction
    assert len(sections) >= 5 and not any(topic in section for section in sections)
    assert all("Remote work and small businesses" in section for section in sections)
    assert report.count(topic) == 2


LONG_TOPICS = ["x" * 200, "茶" * 200, ("tea and cats " * 20)[:200], "x" * 197 + "019", "茶" * 197 + "650",
               "The history of tea and of the people who grew, traded, taxed and drank it, " * 2
               + "from China to India"]


@pytest.mark.parametrize("topic", LONG_TOPICS, ids=["x200", "tea200", "spaces200", "x200-longest-revision",
                                                   "tea200-longest-draft", "spaces171"])
def test_a_200_character_topic_is_never_cut_at_the_default_reply_limits(topic):
    """Ten rounds through complete(), as the pipeline asks, with the default limits: every reply whole."""
    from machinery.settings import Settings

    defaults = Settings()
    assert len(topic) <= 200 and validate_batch([topic], 3, 8) == [topic]

    def ask(body: dict, limit: int) -> str:
        reply = offline_llm.complete({**body, "max_tokens": limit})
        assert reply["choices"][0]["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] < limit
        return content_of(reply)

    draft = ask(chat(pipeline.WRITER_PROMPT, f"Topic: {topic}\n\nWrite the report."), defaults.max_tokens_report)
    scores = []
    for _ in range(10):
        critique = json.loads(ask(chat(pipeline.CRITIC_PROMPT, f"Topic: {topic}\n\nReport to review:\n\n{draft}",
                                       json_mode=True), defaults.max_tokens_critique))
        scores.append(pipeline.Critique.model_validate(critique).score)
        ask(chat(pipeline.SUMMARY_PROMPT, f"Topic: {topic}\n\nReport to summarize:\n\n{draft}"),
            defaults.max_tokens_summary)
        improvements = "\n".join(f"- {item}" for item in critique["improvements"])
        draft = ask(chat(pipeline.REVISER_PROMPT, f"Topic: {topic}\n\nImprovements to make:\n{improvements}\n\n"
                                                  f"Current report:\n\n{draft}"), defaults.max_tokens_report)
    assert draft.startswith(f"# {topic}\n")
    rising = scores[: scores.index(10) + 1]
    assert rising[0] <= 6 and all(a < b for a, b in zip(rising, rising[1:])), scores
    assert next(i for i, score in enumerate(scores) if score >= 8) <= 4, "it reaches the threshold 8 as short topics do"


def test_the_openai_client_sees_the_cut_through_the_in_process_transport():
    import asyncio

    async def ask():
        client = offline_llm.openai_client(offline_llm.OfflineTransport())
        try:
            return await client.chat.completions.create(**role_bodies()["writer"], max_tokens=10)
        finally:
            await client.close()

    reply = asyncio.run(ask())
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 10


# ----------------------------------------------------------------------------------------- a small local model


def test_a_rambling_model_fills_its_context_when_no_limit_is_sent():
    for role, body in role_bodies().items():
        whole = offline_llm.complete(body)
        reply = offline_llm.complete(body, context_tokens=2048)
        content, prompt_tokens = content_of(reply), reply["usage"]["prompt_tokens"]
        assert reply["choices"][0]["finish_reason"] == "length", role
        assert reply["usage"]["completion_tokens"] == 2048 - prompt_tokens
        assert reply["usage"]["total_tokens"] == 2048
        assert content.startswith(content_of(whole).rstrip()) and len(content) > (2048 - prompt_tokens) * 4 - 40
        last_paragraph = content_of(whole).rstrip().rpartition("\n\n")[2]
        assert content.count(last_paragraph) > 2, "it repeats itself"
    with pytest.raises(ValueError):
        json.loads(content_of(offline_llm.complete(role_bodies()["critic"], context_tokens=2048)))


def test_a_rambling_model_stops_normally_within_a_limit_but_never_past_its_context():
    body = role_bodies()["reviser"]
    whole = offline_llm.complete(body)
    bounded = offline_llm.complete({**body, "max_tokens": 1500}, context_tokens=4096)
    assert bounded["choices"] == whole["choices"] and bounded["usage"] == whole["usage"]
    prompt_tokens = whole["usage"]["prompt_tokens"]
    room = 100
    squeezed = offline_llm.complete({**body, "max_tokens": 1500}, context_tokens=prompt_tokens + room)
    assert squeezed["choices"][0]["finish_reason"] == "length" and squeezed["usage"]["completion_tokens"] == room

    status, payload = offline_llm.route("POST", "/v1/chat/completions", json.dumps(body).encode(),
                                        context_tokens=prompt_tokens)
    assert status == 400
    assert payload["error"] == {
        "code": 400, "message": f"request ({prompt_tokens} tokens) exceeds the available context size "
                                f"({prompt_tokens} tokens)",
        "type": "exceed_context_size_error", "n_prompt_tokens": prompt_tokens, "n_ctx": prompt_tokens}


SMALL_MODEL = "qwen2.5-0.5b-instruct-q4_k_m.gguf"


def test_a_small_local_model_server_names_its_model_and_rambles_like_llama_cpp():
    import openai

    body = role_bodies()["writer"]
    with offline_llm.OfflineServer(served_model=SMALL_MODEL, ramble=True, context_tokens=1024) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="offline", max_retries=0)
        models = [model.id for model in client.models.list()]
        rambling = client.chat.completions.create(**body)
        bounded = client.chat.completions.create(**{**body, "model": SMALL_MODEL}, max_tokens=1500)
        cut = client.chat.completions.create(**body, max_completion_tokens=10)
        client.close()
        received = server.received()
    assert models == [SMALL_MODEL]
    assert {reply.model for reply in (rambling, bounded, cut)} == {SMALL_MODEL}, "whatever the request named"
    assert rambling.choices[0].finish_reason == "length" and rambling.usage.total_tokens == 1024
    assert bounded.choices[0].finish_reason == "stop" and bounded.choices[0].message.content == \
        offline_llm.write_draft("Why cats purr")
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 10
    assert [(r.role, r.model, r.max_tokens) for r in received] == [
        ("writer", "m", None), ("writer", SMALL_MODEL, 1500), ("writer", "m", 10)]
    assert received[1].body["messages"] == body["messages"]


def test_several_served_models_are_listed_and_the_first_answers():
    names = (SMALL_MODEL, "llama-3.2-1b-instruct-q4_k_m.gguf")
    server = offline_llm.OfflineServer(served_model=names)
    try:
        assert server.serve("GET", "/v1/models", b"")[1]["data"] == [
            {"id": name, "object": "model", "created": 0, "owned_by": "local"} for name in names]
        status, payload = server.serve("POST", "/v1/chat/completions", json.dumps(role_bodies()["writer"]).encode())
        assert status == 200 and payload["model"] == SMALL_MODEL
        assert payload["choices"][0]["finish_reason"] == "stop", "without ramble, no rambling"
    finally:
        server.httpd.server_close()


def test_the_latency_counts_the_tokens_sent_after_the_cut():
    server = offline_llm.OfflineServer(latency=0.5, per_token_latency=0.01, ramble=True, context_tokens=2048)

    def tokens_and_delay(limit: int | None) -> tuple[int, float]:
        raw = json.dumps({**WRITER_BODY, "max_tokens": limit}).encode()
        status, payload = server.serve("POST", "/v1/chat/completions", raw)
        assert status == 200
        return payload["usage"]["completion_tokens"], server.delay_for(raw, payload)

    try:
        rambled, slow = tokens_and_delay(None)
        bounded, fast = tokens_and_delay(10)
    finally:
        server.httpd.server_close()
    assert rambled == 2048 - offline_llm.complete(WRITER_BODY)["usage"]["prompt_tokens"] and bounded == 10
    assert (slow, fast) == (pytest.approx(0.5 + 0.01 * rambled), pytest.approx(0.5 + 0.01 * 10))


def test_a_slow_server_outlasts_a_short_client_timeout():
    import time

    import openai

    with offline_llm.OfflineServer(latency=2) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="offline", timeout=0.5, max_retries=0)
        started = time.perf_counter()
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(**WRITER_BODY)
        elapsed = time.perf_counter() - started
        client.close()
        assert server.stats().requests == 1 and server.stats().completions == 0, "the reply is still waiting"
    assert 0.45 <= elapsed < 1.5, "the client gave up at its timeout, long before the reply"


def test_received_requests_are_kept_and_reset():
    with offline_llm.OfflineServer() as server, http_client(server) as client:
        post(client, {**WRITER_BODY, "max_tokens": 50})
        post(client, {"messages": []})
        client.post("/chat/completions", content=b"not json", headers={"Content-Type": "application/json"})
        client.get("/models")
        received = server.received()
        server.reset_stats()
        assert server.received() == [] and server.stats() == offline_llm.ServerStats()
    assert [(r.role, r.model, r.max_tokens) for r in received] == [("writer", "m", 50), (None, None, None)]
    assert offline_llm.RECEIVED_KEPT >= 100


def test_small_model_options_are_checked():
    for options in ({"served_model": ()}, {"served_model": ""}, {"served_model": ("a", "")}, {"context_tokens": 0}):
        with pytest.raises(ValueError):
            offline_llm.OfflineServer(**options)


def test_small_model_cli_flags_parse_into_the_server():
    server = offline_llm.server_from_args(
        ["--port", "0", "--served-model", SMALL_MODEL, "--served-model", "other", "--ramble",
         "--context-tokens", "2048", "--per-token-latency", "0.002"])
    try:
        assert (server.served_models, server.ramble, server.context_tokens) == ((SMALL_MODEL, "other"), True, 2048)
        assert server.per_token_latency == 0.002
    finally:
        server.httpd.server_close()
    server = offline_llm.server_from_args(["--port", "0", "--ramble"])
    try:
        assert (server.served_models, server.context_tokens) == (None, 4096)
    finally:
        server.httpd.server_close()
    for wrong in (["--context-tokens", "2048"], ["--ramble", "--context-tokens", "0"], ["--served-model", ""]):
        with pytest.raises(SystemExit):
            offline_llm.server_from_args(["--port", "0", *wrong])


def test_the_command_line_stands_in_for_llama_server():
    import subprocess
    import sys
    from pathlib import Path

    import httpx2

    command = [sys.executable, "-m", "machinery.offline_llm", "--port", "0", "--served-model", SMALL_MODEL,
               "--ramble", "--per-token-latency", "0.00001"]
    with subprocess.Popen(command, cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, text=True) as process:
        try:
            lines = [process.stdout.readline().strip() for _ in range(4)]
            with httpx2.Client(base_url=lines[0].split()[-1], timeout=10) as client:
                models = client.get("/models").json()
                reply = post(client).json()
        finally:
            process.terminate()
    assert lines[1:] == [f"serving: {SMALL_MODEL}", "rambling: replies without max_tokens fill the 4096-token context",
                         f"export OPENAI_BASE_URL={lines[0].split()[-1]} OPENAI_API_KEY=offline"]
    assert [model["id"] for model in models["data"]] == [SMALL_MODEL]
    assert reply["model"] == SMALL_MODEL and reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["total_tokens"] == 4096
