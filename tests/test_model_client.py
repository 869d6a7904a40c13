"""machinery/model_client.py: one chat completion (paced, cached, retried on empty replies, redacted, metered),
the error wording of reports, a rate limit past patience as one clear error, and the check made once before a
batch."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections import Counter
from typing import Any

import flyte.errors
import httpx2
import openai
import pytest
from fault_server import FaultyServer
from helpers import ScriptedTransport, replies_in_turn, scripted_model, served_by

from machinery import model_client, offline_llm
from machinery.model_client import (
    BackendUnavailable,
    EmptyReplyError,
    ServerLimitError,
    Usage,
    check_backend,
    complete,
    describe_error,
    metering,
    redact,
)
from machinery.reply_cache import ReplyCache, request_key
from machinery.runtime import runtime

CANARY = "sk-canary-7f3a9c1e5b2d4680"
WRITER = "You are a report writer."


def request(topic: str, system: str = WRITER, **extra: Any) -> dict[str, Any]:
    return {"model": offline_llm.MODEL_VERSION, "messages": [{"role": "system", "content": system},
                                       {"role": "user", "content": f"Topic: {topic}\n\nWrite the report."}], **extra}


def call(body: dict[str, Any], step: str = "draft") -> Any:
    """``complete`` for ``step`` of the topic in the body (messages and events name it)."""
    return complete(body, topic=offline_llm.parse_request(body).topic, step=step)


def run_metered(*requests: dict[str, Any]) -> tuple[list[str], Usage]:
    """Complete ``requests`` one after another on a fresh loop; the replies and the usage they recorded."""

    async def go():
        with metering() as meter:
            return [await call(r) for r in requests], meter.total

    return asyncio.run(go())


# ----------------------------------------------------------------------------------------- replies and usage


def test_complete_returns_the_models_text_and_meters_its_tokens():
    with scripted_model() as transport:
        (text,), usage = run_metered(request("Cats"))
    assert text == offline_llm.write_draft("Cats")
    assert transport.bodies == [request("Cats")], "the request body is sent as given"
    assert (usage.requests, usage.cache_hits) == (1, 0)
    assert usage.prompt_tokens > 0 and usage.completion_tokens == offline_llm.estimate_tokens(text)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


class NoUsageTransport(offline_llm.OfflineTransport):
    """A server that does not report token usage (some OpenAI-compatible servers don't)."""

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        payload = json.loads(response.content)
        payload.pop("usage", None)
        return httpx2.Response(response.status_code, json=payload)


def test_a_reply_without_usage_counts_the_request_and_no_tokens():
    with runtime.use_transport(NoUsageTransport()):
        (text,), usage = run_metered(request("Cats"))
    assert text == offline_llm.write_draft("Cats")
    assert usage == Usage(requests=1)


def test_usage_adds_up():
    a = Usage(requests=1, cache_hits=2, prompt_tokens=3, completion_tokens=4)
    b = Usage(requests=10, cache_hits=20, prompt_tokens=30, completion_tokens=40)
    assert a + b == Usage(requests=11, cache_hits=22, prompt_tokens=33, completion_tokens=44)
    assert (a + b).total_tokens == 77
    assert sum([a, b], Usage()) == a + b


def test_concurrent_meters_count_only_their_own_calls():
    """Topics share one event loop; each task's meter must see its own calls, gathered ones included."""

    async def topic(name: str, calls: int):
        with metering() as meter:
            await asyncio.gather(*(call(request(f"{name} {i}")) for i in range(calls)))
            return meter.total

    async def both():
        return await asyncio.gather(topic("Cats", 1), topic("Dogs", 3))

    cats, dogs = asyncio.run(both())
    assert (cats.requests, dogs.requests) == (1, 3)


def test_only_the_innermost_meter_counts_and_none_outside_a_meter():
    async def scenario():
        await call(request("Nobody counts this"))
        with metering() as outer:
            await call(request("Outer"))
            with metering() as inner:
                await call(request("Inner"))
            await call(request("Outer again"))
        return outer.total, inner.total

    outer, inner = asyncio.run(scenario())
    assert (outer.requests, inner.requests) == (2, 1)


# ----------------------------------------------------------------------------------------- the reply cache


def test_a_reply_cache_hit_is_counted_as_a_hit_not_a_request(tmp_path):
    with runtime.configured(reply_cache=tmp_path / "replies.sqlite3"), scripted_model() as transport:
        (first,), spent = run_metered(request("Cats"))
        before = runtime.requests_sent.value
        (again,), reused = run_metered(request("Cats"))
        assert runtime.requests_sent.value == before
    assert first == again
    assert (spent.requests, spent.cache_hits) == (1, 0)
    assert (reused.requests, reused.cache_hits, reused.total_tokens) == (0, 1, 0)
    assert transport.count() == 1
    stored = ReplyCache(tmp_path / "replies.sqlite3").get(request_key("offline", request("Cats")))
    assert stored.content == first and stored.completion_tokens == spent.completion_tokens


def test_the_cache_key_includes_the_endpoint(tmp_path, api_key):
    """The same request to another server is another reply."""
    with runtime.configured(reply_cache=tmp_path / "replies.sqlite3"):
        run_metered(request("Cats"))
        with offline_llm.OfflineServer() as server, served_by(server):
            _, usage = run_metered(request("Cats"))
    assert (usage.requests, usage.cache_hits) == (1, 0)


def test_with_the_cache_off_every_call_asks_the_model():
    with runtime.configured(reply_cache=None), scripted_model() as transport:
        _, usage = run_metered(request("Cats"), request("Cats"))
    assert transport.count() == 2 and (usage.requests, usage.cache_hits) == (2, 0)
    assert runtime.reply_cache() is not None, "the test's own cache is back after the block"


# ----------------------------------------------------------------------------------------- empty replies


@pytest.fixture
def quick_backoff(monkeypatch):
    """Retries after 10 ms instead of 0.5 s, 1 s, 2 s: the same decisions, no waiting."""
    monkeypatch.setattr(model_client, "BACKOFF_FIRST", 0.01)


def test_an_empty_reply_is_asked_again():
    with scripted_model(replies_in_turn("writer", "", "  \n")) as transport:
        (text,), usage = run_metered(request("Cats"))
    assert transport.count("writer") == 3, "two empty replies, then the same request once more"
    assert transport.bodies[0] == transport.bodies[1] == transport.bodies[2]
    assert (usage.requests, usage.retries) == (3, 2) and text == offline_llm.write_draft("Cats")


def test_empty_replies_beyond_the_budget_are_a_clear_error_and_never_cached(tmp_path):
    with runtime.configured(reply_cache=tmp_path / "replies.sqlite3", client_retries=2):
        with scripted_model(lambda role, topic, content: "") as transport, \
                pytest.raises(EmptyReplyError, match="empty reply 3 times in a row"):
            asyncio.run(call(request("Cats")))
        assert transport.count() == 3, "REPORT_CLIENT_RETRIES=2: three attempts"
        (text,), usage = run_metered(request("Cats"))
    assert text == offline_llm.write_draft("Cats") and usage.cache_hits == 0


# ----------------------------------------------------------------------------------------- errors and the key


def test_a_key_quoted_by_the_server_is_redacted_from_the_error(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    with FaultyServer(echo_key_on_401="completions") as server, served_by(server, client_retries=0), \
            pytest.raises(openai.AuthenticationError) as caught:
        asyncio.run(call(request("Cats")))
    assert caught.value.status_code == 401
    assert CANARY not in str(caught.value) and CANARY not in describe_error(caught.value)
    assert "Incorrect API key provided: [API key]" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__, "no chained original error"


def test_error_messages_are_redacted(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    message = describe_error(RuntimeError(f"Incorrect API key provided: {CANARY}."))
    assert message == "RuntimeError: Incorrect API key provided: [API key]."
    assert redact(f"a {CANARY} b {CANARY}") == "a [API key] b [API key]"


def test_a_short_key_is_not_redacted_everywhere(monkeypatch):
    """OPENAI_API_KEY=local (for servers that ignore it) must not blank every 'local' in a message."""
    monkeypatch.setenv("OPENAI_API_KEY", "local")
    assert redact("a local server") == "a local server"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert redact("nothing to hide") == "nothing to hide"


def test_describe_error_prefers_flytes_error_code():
    class Wrapped(RuntimeError):
        code = "CritiqueError"

    assert describe_error(Wrapped("invalid twice")) == "CritiqueError: invalid twice"
    assert describe_error(ValueError("bad")) == "ValueError: bad"


def test_the_cache_file_never_holds_the_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    with FaultyServer() as server, served_by(server, reply_cache=tmp_path / "replies.sqlite3"):
        run_metered(request("Cats"), request("Dogs"))
        assert server.requests == 2
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("replies.sqlite3*"))
    assert len(stored) > 0 and CANARY.encode() not in stored


# ----------------------------------------------------------------------------------------- rate limits


class RateLimited(offline_llm.OfflineTransport):
    """The offline model, except that requests about ``topic`` get a 429 (``headers``, ``body``) their first
    ``times`` attempts (None: always). ``attempts`` counts attempts per topic."""

    def __init__(self, topic: str, times: int | None = None, headers: dict[str, str] | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.topic, self.times = topic, times
        self.headers = {"retry-after-ms": "100", "x-ratelimit-limit-requests": "300",
                        "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"} \
            if headers is None else headers
        self.body = body or {"error": {"message": "Rate limit reached for requests", "type": "requests",
                                      "code": "rate_limit_exceeded"}}
        self.attempts: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        topic = offline_llm.parse_request(json.loads(await request.aread())).topic
        self.attempts[topic] += 1
        if self.topic in topic and (self.times is None or self.attempts[topic] <= self.times):
            return httpx2.Response(429, headers=self.headers, json=self.body)
        return await super().handle_async_request(request)


def test_429s_while_patience_lasts_are_waited_out_unseen():
    transport = RateLimited("Cats", times=2)
    with runtime.use_transport(transport), runtime.configured(reply_cache=None):
        (text,), usage = run_metered(request("Cats"))
    assert text == offline_llm.write_draft("Cats")
    assert transport.attempts["Cats"] == 3 and usage.requests == 1, "two 429s, sent again by the pace, not the client"


def test_a_429_past_patience_is_one_clear_error_that_flyte_will_not_retry(tmp_path):
    transport = RateLimited("Doomed")
    with runtime.configured(rate_limit_patience=0.25, client_retries=3, reply_cache=tmp_path / "replies.sqlite3"), \
            runtime.use_transport(transport):
        (done,), _ = run_metered(request("Cats"))
        runtime.pace.start_batch()
        started = time.monotonic()
        with pytest.raises(ServerLimitError) as caught:
            asyncio.run(call(request("Doomed")))
        elapsed = time.monotonic() - started
        stats = runtime.pace.stats()
        (again,), reused = run_metered(request("Cats"))
    error = caught.value
    assert isinstance(error, flyte.errors.NonRecoverableError) and error.code == "RateLimited"
    assert transport.attempts["Doomed"] == 3, "paused 0.1 s twice, then the 429 went back: the client did not retry it"
    assert (stats.rate_limited, stats.gave_up, stats.pauses) == (3, 1, 2) and elapsed < 1.0
    described = describe_error(error)
    assert described.startswith("RateLimited: The server at offline kept answering 429 (rate limited); its limit: "
                                "300 requests (0 left, full again in 1s). No request has succeeded for 0.2 s (the "
                                "server asks for 0.1 s more) and REPORT_RATE_LIMIT_PATIENCE is 0.25 s, so this call "
                                "gives up")
    for advice in ("paused 0.2 s in all", "REPORT_MAX_CONCURRENCY", "higher rate-limit tier", "reply cache"):
        assert advice in described
    assert again == done and (reused.requests, reused.cache_hits) == (0, 1), "the completed call is kept"


def test_no_credit_left_fails_at_once_with_what_to_check():
    body = {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                      "code": "insufficient_quota"}}
    transport = RateLimited("Cats", headers={}, body=body)
    with runtime.use_transport(transport), pytest.raises(ServerLimitError) as caught:
        asyncio.run(call(request("Cats")))
    assert caught.value.code == "QuotaExceeded" and transport.attempts["Cats"] == 1
    assert describe_error(caught.value).startswith("QuotaExceeded: The server at offline answered 429 "
                                                   "insufficient_quota")


def test_a_429_from_a_client_without_the_pace_keeps_the_clients_rules():
    """use_client bypasses HTTP and the pace: its RateLimitError is passed on as the client raised it."""

    class Limited:
        def __init__(self):
            self.chat = self.completions = self

        async def create(self, **request):
            response = httpx2.Response(429, request=httpx2.Request("POST", "http://x.invalid"))
            raise openai.RateLimitError("Rate limit reached", response=response, body=None)

    with runtime.use_client(Limited()), pytest.raises(openai.RateLimitError):
        asyncio.run(call(request("Cats")))


def test_requests_go_through_the_pace_over_real_http(api_key):
    with offline_llm.OfflineServer(latency=0.02) as server, served_by(server, max_concurrency=3):
        runtime.pace.start_batch()

        async def many():
            return await asyncio.gather(*(call(request(f"Topic {i}")) for i in range(8)))

        assert len(asyncio.run(many())) == 8
        assert runtime.pace.stats().peak_in_flight == 3


# ----------------------------------------------------------------------------------------- check_backend


def test_the_offline_model_needs_no_check(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    check_backend()


def test_the_openai_backend_without_a_key_is_refused(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with runtime.configured(backend="openai"), pytest.raises(ValueError, match="needs OPENAI_API_KEY"):
        check_backend()


def test_a_working_server_passes_the_check(api_key):
    with offline_llm.OfflineServer() as server, served_by(server):
        check_backend()


def test_an_unreachable_server_is_named(api_key):
    with runtime.configured(backend="openai", base_url="http://127.0.0.1:9/v1"), \
            pytest.raises(BackendUnavailable) as caught:  # port 9 (discard): nothing listens
        check_backend(timeout=5)
    message = str(caught.value)
    assert "Cannot reach the model server at http://127.0.0.1:9/v1" in message and "OPENAI_BASE_URL" in message
    assert api_key not in message


def test_a_password_in_the_servers_url_is_never_in_a_message(api_key, quick_backoff):
    url = "http://reports:s3cret-pass@127.0.0.1:9/v1"  # port 9 (discard): nothing listens
    with runtime.configured(backend="openai", base_url=url, model="m", client_retries=0):
        with pytest.raises(BackendUnavailable) as caught:
            check_backend(timeout=5)
        error, _, _ = run_listened(request("Cats"))
    assert "Cannot reach the model server at http://127.0.0.1:9/v1 (" in str(caught.value)
    assert "could not reach the model server at http://127.0.0.1:9/v1 after 1 attempt(s)" in str(error)
    assert "s3cret" not in str(caught.value) + str(error)


def test_a_rejected_key_is_named_without_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    with FaultyServer(echo_key_on_401="everything") as server, served_by(server), \
            pytest.raises(BackendUnavailable) as caught:
        check_backend()
    assert str(caught.value) == (f"The server at {server.base_url} rejected the API key (HTTP 401): "
                                 "check OPENAI_API_KEY.")


class NoModelsServer(offline_llm.OfflineServer):
    """A server that answers completions but does not list models (404), like some local servers."""

    def handle(self, handler: Any, method: str, raw_body: bytes) -> None:
        if method == "GET":
            handler.reply(404, {"error": {"message": "not found", "type": "not_found"}})
        else:
            super().handle(handler, method, raw_body)


def test_a_server_that_does_not_list_models_passes_the_check_when_the_model_is_named(api_key):
    with NoModelsServer() as server, served_by(server, model="llama3"):
        assert check_backend() == "llama3"
        assert asyncio.run(call(request("Cats"))) == offline_llm.write_draft("Cats")


# ----------------------------------------------------------------------------------------- the true model name


def test_the_one_model_a_server_lists_is_the_model(api_key):
    with offline_llm.OfflineServer(served_model="qwen2.5-0.5b-instruct") as server, served_by(server):
        assert runtime.task_env_vars.get("REPORT_MODEL") is None, "not asked yet"
        assert check_backend() == runtime.model_name == "qwen2.5-0.5b-instruct"
        assert runtime.task_env_vars["REPORT_MODEL"] == "qwen2.5-0.5b-instruct", "a cluster's tasks use it too"
        assert runtime.describe() == f"model qwen2.5-0.5b-instruct at {server.base_url} (OpenAI-compatible)"
        runtime.model_name  # noqa: B018 (asked again: answered from memory)
    assert server.stats().requests == 0, "GET /models is not a completion"


def test_the_model_is_asked_for_once_per_settings_even_from_many_threads(api_key):
    class CountingServer(offline_llm.OfflineServer):
        listed = 0

        def handle(self, handler: Any, method: str, raw_body: bytes) -> None:
            if method == "GET":
                type(self).listed += 1
            super().handle(handler, method, raw_body)

    with CountingServer(served_model="tiny") as server, served_by(server):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            names = set(pool.map(lambda _: runtime.model_name, range(16)))
        with runtime.configured(max_concurrency=5):  # new settings: asked again
            assert runtime.model_name == "tiny"
    assert names == {"tiny"} and CountingServer.listed == 2


def test_several_models_are_an_error_that_lists_them_and_asks_for_report_model(api_key):
    with offline_llm.OfflineServer(served_model=("qwen-0.5b", "llama-3b")) as server, served_by(server), \
            pytest.raises(BackendUnavailable) as caught:
        check_backend()
    assert str(caught.value) == (f"The server at {server.base_url} serves 2 models (qwen-0.5b, llama-3b): set "
                                 "REPORT_MODEL to the one that should write the reports.")


def test_a_server_that_lists_no_models_needs_report_model(api_key):
    with NoModelsServer() as server, served_by(server), pytest.raises(BackendUnavailable) as caught:
        check_backend()
    assert str(caught.value) == (f"The server at {server.base_url} does not list the model it serves (GET /models): "
                                 "set REPORT_MODEL to the model's name.")


def test_report_model_picks_one_of_several_and_openais_api_needs_no_listing(api_key):
    with offline_llm.OfflineServer(served_model=("a", "b")) as server, served_by(server, model="b"):
        assert runtime.model_name == runtime.requested_model == "b" and runtime.model_note is None
    for url in (None, "https://api.openai.com/v1/"):  # a trailing slash is still OpenAI's API: nothing asked
        with runtime.configured(backend="openai", base_url=url):
            assert check_backend() == runtime.model_name == "gpt-4o-mini"
    assert runtime.model_name == offline_llm.MODEL_VERSION


def test_outside_a_batch_report_model_stands_when_the_server_cannot_be_asked(api_key, monkeypatch):
    """A deploy prepares tasks for a server this machine may not reach, with a key only the cluster has; a batch
    still checks the server."""
    with runtime.configured(backend="openai", model="qwen2.5:1.5b", base_url="http://127.0.0.1:9/v1"):
        assert runtime.model_name == "qwen2.5:1.5b"
        with monkeypatch.context() as without_key, runtime.configured():
            without_key.delenv("OPENAI_API_KEY")
            assert runtime.model_name == "qwen2.5:1.5b"
        with pytest.raises(BackendUnavailable, match="Cannot reach the model server at http://127.0.0.1:9/v1"):
            check_backend(timeout=5)
    with runtime.configured(backend="openai", base_url="http://127.0.0.1:9/v1"), \
            pytest.raises(openai.APIConnectionError):
        runtime.model_name  # noqa: B018 (no name to stand in for the server's)


def test_the_one_model_served_is_recorded_even_when_report_model_names_another(api_key, capsys):
    """llama.cpp answers every request with the model it serves, whatever the request names."""
    with offline_llm.OfflineServer(served_model="qwen.gguf") as server, served_by(server, model="gpt-4o-mini"):
        assert check_backend() == runtime.model_name == "qwen.gguf"
        assert runtime.requested_model == "gpt-4o-mini", "requests still send the user's choice"
        runtime.announce_backend()
        runtime.start_batch()
        asyncio.run(complete({**request("Cats"), "model": runtime.requested_model}, topic="Cats", step="draft"))
        assert [r.model for r in server.received()] == ["gpt-4o-mini"]
    assert capsys.readouterr().out.splitlines() == [
        f"Reports are written by the model qwen.gguf at {server.base_url} (OpenAI-compatible).",
        "Note: REPORT_MODEL=gpt-4o-mini is not the model the server lists: it serves qwen.gguf whatever a request "
        "names, so qwen.gguf is recorded as the model."]
    assert runtime.reported_models() == [], "the reply names the model recorded"


def test_a_reply_naming_another_model_is_noted_once_unless_it_is_a_dated_version(api_key):
    events = []
    with runtime.configured(backend="openai", base_url=None), runtime.listening(events.append):
        runtime.start_batch()
        for reported in ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", None, "llama-3-8b", "mistral", "llama-3-8b"):
            runtime.note_reported_model(reported)
        assert runtime.reported_models() == ["llama-3-8b", "mistral"]
        runtime.start_batch()
        assert runtime.reported_models() == [], "counted per batch"
    assert events == [{"topic": None, "step": "other-model", "reported": "llama-3-8b", "recorded": "gpt-4o-mini"}]


class LoadingServer(offline_llm.OfflineServer):
    """llama.cpp's server while it loads a model: HTTP 503 to everything."""

    def handle(self, handler: Any, method: str, raw_body: bytes) -> None:
        handler.reply(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})


def test_a_5xx_to_the_model_list_is_a_clear_error_not_a_traceback(api_key):
    with LoadingServer() as server, served_by(server, model="qwen"), pytest.raises(BackendUnavailable) as caught:
        check_backend()
    assert str(caught.value) == (f"The server at {server.base_url} answered HTTP 503 to GET /models: is it still "
                                 "loading the model? Wait for it to finish (its log says when), then run again.")


def test_a_server_with_many_models_is_named_with_the_first_ten_and_a_count(api_key):
    names = tuple(f"model-{i:02}" for i in range(14))
    with offline_llm.OfflineServer(served_model=names) as server, served_by(server), \
            pytest.raises(BackendUnavailable) as caught:
        check_backend()
    assert f"serves 14 models ({', '.join(names[:10])} and 4 more): set REPORT_MODEL" in str(caught.value)


def port_of(server: offline_llm.OfflineServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1].split("/")[0])


def test_another_model_behind_the_same_url_is_never_answered_from_the_cache(api_key, tmp_path):
    async def draft() -> Usage:
        with metering() as meter:
            await complete({**request("Cats"), "model": runtime.model_name}, topic="Cats", step="draft")
        return meter.total

    used = []
    with runtime.configured(reply_cache=tmp_path / "replies.sqlite3"):
        with offline_llm.OfflineServer(served_model="qwen-0.5b") as first, served_by(first):
            used.append(asyncio.run(draft()))
        for name in ("llama-3b", "qwen-0.5b"):  # swapped behind the same URL, then back
            with offline_llm.OfflineServer(port=port_of(first), served_model=name) as server, served_by(server):
                assert server.base_url == first.base_url
                used.append(asyncio.run(draft()))
                sent = [r.model for r in server.received()]
            assert sent == ([name] if name == "llama-3b" else [])
    assert [(u.requests, u.cache_hits) for u in used] == [(1, 0), (1, 0), (0, 1)]


def test_scripted_transport_is_the_real_openai_client():
    """The double behind most tests: the real client builds the request and parses the reply."""

    async def ask():
        client = runtime.client()
        return client, await call(request("Owls"))

    with scripted_model() as transport:
        client, text = asyncio.run(ask())
    assert isinstance(client, openai.AsyncOpenAI) and isinstance(transport, ScriptedTransport)
    assert text == offline_llm.write_draft("Owls")


# ----------------------------------------------------------------------------------------- retries and one deadline


class Failing(offline_llm.OfflineTransport):
    """The offline model, after the given failures, one per attempt: an HTTP status (int), or an httpx2
    exception to raise (a class)."""

    def __init__(self, *failures: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.failures, self.headers, self.attempts = list(failures), headers or {}, 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.attempts += 1
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, int):
                body = {"error": {"message": f"injected {failure}"}}
                return httpx2.Response(failure, headers=self.headers, json=body)
            raise failure("injected", request=request)
        return await super().handle_async_request(request)


def run_listened(body: dict[str, Any], step: str = "draft") -> tuple[Any, Usage, list[dict[str, Any]]]:
    """``call(body)`` on a fresh loop: its reply (or the exception it raised), its usage and its events."""
    events: list[dict[str, Any]] = []

    async def go():
        with metering() as meter:
            try:
                return await call(body, step), meter.total
            except Exception as error:  # noqa: BLE001 (the test looks at it)
                return error, meter.total

    with runtime.listening(events.append):
        outcome, usage = asyncio.run(go())
    return outcome, usage, events


def test_5xx_and_dropped_connections_are_retried_with_an_event_each(quick_backoff):
    transport = Failing(503, httpx2.ConnectError, 500)
    with runtime.use_transport(transport), runtime.configured(client_retries=3):
        text, usage, events = run_listened(request("Cats"))
    assert text == offline_llm.write_draft("Cats") and transport.attempts == 4
    assert events == [
        {"topic": "Cats", "step": "retrying", "call": "draft", "attempt": 2, "attempts": 4,
         "reason": "HTTP 503 from the server"},
        {"topic": "Cats", "step": "retrying", "call": "draft", "attempt": 3, "attempts": 4,
         "reason": "the connection failed"},
        {"topic": "Cats", "step": "retrying", "call": "draft", "attempt": 4, "attempts": 4,
         "reason": "HTTP 500 from the server"},
    ]
    assert (usage.requests, usage.retries, usage.timed_out) == (4, 3, 0)


def test_retries_end_with_the_last_error_which_flyte_may_retry(quick_backoff):
    transport = Failing(503, 503, 503)
    with runtime.use_transport(transport), runtime.configured(client_retries=2):
        error, usage, events = run_listened(request("Cats"))
    assert isinstance(error, openai.InternalServerError) and "injected 503" in str(error)
    assert not isinstance(error, flyte.errors.NonRecoverableError), "a recoverable error: Flyte's task retry decides"
    assert transport.attempts == 3 and (usage.requests, usage.retries) == (3, 2)
    assert [event["step"] for event in events] == ["retrying", "retrying", "gave-up"]
    assert events[-1] == {"topic": "Cats", "step": "gave-up", "call": "draft", "attempts": 3,
                          "reason": "HTTP 503 from the server", "task_attempt": 0}, "giving up is said aloud"


def test_a_400_is_retried_neither_by_the_client_nor_by_flyte():
    transport = Failing(400)
    with runtime.use_transport(transport):
        error, usage, events = run_listened(request("Cats"))
    assert isinstance(error, model_client.RequestRejected) and isinstance(error, flyte.errors.NonRecoverableError)
    assert error.code == "BadRequest" and transport.attempts == 1 and events == []


class Rejecting(offline_llm.OfflineTransport):
    """A server that answers every request with HTTP ``status`` and the error object ``error``."""

    def __init__(self, error: dict[str, Any], status: int = 400) -> None:
        super().__init__()
        self.error, self.status, self.attempts = error, status, 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.attempts += 1
        return httpx2.Response(self.status, json={"error": self.error})


def small_context(context_tokens: int) -> offline_llm.OfflineServer:
    """A small local model as llama.cpp serves one: prompt and reply share ``context_tokens`` (its ``-c``)."""
    return offline_llm.OfflineServer(ramble=True, context_tokens=context_tokens)


def prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt's tokens, as the offline model counts them."""
    return sum(offline_llm.estimate_tokens(message["content"]) for message in body["messages"])


def test_a_request_too_long_for_the_models_context_fails_at_once_and_says_what_to_do(api_key):
    body = request("Cats", max_tokens=100)
    tokens = prompt_tokens(body)
    with small_context(tokens - 5) as server, served_by(server, client_retries=3):
        error, usage, events = run_listened(body)
        sent = server.stats().requests
    assert isinstance(error, model_client.RequestRejected) and isinstance(error, flyte.errors.NonRecoverableError)
    assert error.code == "ContextExceeded"
    assert (sent, usage.requests, usage.retries) == (1, 1, 0) and events == [], "asked once: a retry gets the same 400"
    assert describe_error(error) == (
        f"ContextExceeded: Cats: the draft's request does not fit in the model's context window: the server at "
        f"{server.base_url} answered HTTP 400 (request ({tokens} tokens) exceeds the available context size "
        f"({tokens - 5} tokens)). Use a server or model with a larger context window (llama.cpp: -c, Ollama: "
        "num_ctx), a lower REPORT_MAX_TOKENS_REPORT (servers like vLLM and OpenAI's count the reply's limit in) "
        "or shorter prompts. A retry would be rejected the same way, so neither the client nor Flyte retries it.")


def test_openais_context_length_error_is_named_the_same_way():
    transport = Rejecting({"message": "This model's maximum context length is 8192 tokens. However, your messages "
                                      "resulted in 9001 tokens. Please reduce the length of the messages.",
                           "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"})
    with runtime.use_transport(transport):
        error, _, _ = run_listened(request("Cats"), step="revision")
    assert error.code == "ContextExceeded" and transport.attempts == 1
    assert str(error).startswith("Cats: the revision's request does not fit in the model's context window: the "
                                 "server at offline answered HTTP 400 (This model's maximum context length is 8192")


def test_any_other_400_fails_at_once_in_the_servers_words_and_never_with_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    transport = Rejecting({"message": f"Unsupported value: 'response_format' for key {CANARY}",
                           "type": "invalid_request_error", "param": "response_format"})
    with runtime.use_transport(transport), runtime.configured(client_retries=3):
        error, usage, events = run_listened(request("Cats"), step="critique")
    assert isinstance(error, model_client.RequestRejected) and isinstance(error, flyte.errors.NonRecoverableError)
    assert transport.attempts == 1 and events == []
    assert describe_error(error) == (
        "BadRequest: Cats: the server at offline rejected the critique's request (HTTP 400: Unsupported value: "
        "'response_format' for key [API key]). A retry would be rejected the same way, so neither the client nor "
        "Flyte retries it: the server's message says what it did not accept (a REPORT_MODEL or "
        "REPORT_MAX_TOKENS_CRITIQUE value this model does not take, say).")


def test_a_server_gone_mid_run_is_named_with_the_setting_to_check(api_key, quick_backoff):
    with offline_llm.OfflineServer() as server, served_by(server, client_retries=1):
        assert runtime.model_name == offline_llm.MODEL_VERSION, "asked while the server ran"
        server.stop()  # it dies mid-run
        error, usage, events = run_listened(request("Cats"))
    assert isinstance(error, openai.APIConnectionError) and not isinstance(error, flyte.errors.NonRecoverableError), \
        "still recoverable: a restarted server may answer Flyte's retry"
    message = describe_error(error)
    assert message.startswith(f"APIConnectionError: Cats: the draft could not reach the model server at "
                              f"{server.base_url} after 2 attempt(s) (")
    assert message.endswith("). Is it still running? Check OPENAI_BASE_URL, or unset it and OPENAI_API_KEY to use "
                            "the offline model.")
    assert api_key not in message and (usage.requests, usage.retries) == (2, 1)
    assert [event["step"] for event in events] == ["retrying", "gave-up"]


def test_a_retry_waits_what_the_server_names():
    transport = Failing(503, headers={"retry-after-ms": "20"})
    with runtime.use_transport(transport):
        started = time.monotonic()
        text, usage, _ = run_listened(request("Cats"))
    assert text == offline_llm.write_draft("Cats") and time.monotonic() - started < 0.3, "20 ms, not 0.5 s"


def test_no_retry_starts_when_its_backoff_would_pass_the_deadline():
    transport = Failing(503)
    with runtime.use_transport(transport), runtime.configured(request_timeout=0.05):
        error, usage, events = run_listened(request("Cats"))
    assert isinstance(error, openai.InternalServerError) and transport.attempts == 1
    assert [(event["step"], event["attempts"]) for event in events] == [("gave-up", 1)], "no retry, one give-up"


def test_a_timeout_ends_the_call_with_a_message_that_says_what_to_change():
    transport = Failing(httpx2.ReadTimeout, httpx2.ReadTimeout)
    with runtime.use_transport(transport), runtime.configured(request_timeout=120.0, client_retries=3):
        error, usage, events = run_listened(request("Why cats purr"))
    assert isinstance(error, model_client.ModelTimeout) and isinstance(error, flyte.errors.NonRecoverableError)
    assert describe_error(error) == (
        "ModelTimeout: Why cats purr: the draft got no reply within 120 s (REPORT_REQUEST_TIMEOUT=120). A model on a "
        "CPU may need longer: raise REPORT_REQUEST_TIMEOUT. (A lower REPORT_MAX_TOKENS_REPORT does not make the "
        "model write less: it cuts its replies off.)")
    assert transport.attempts == 1, "the attempt used the whole deadline: no retry"
    assert events == [{"topic": "Why cats purr", "step": "timed-out", "call": "draft", "seconds": 120.0}]
    assert (usage.requests, usage.timed_out, usage.retries) == (1, 1, 0), "a failed call still counts"


class SlowAndBusyAtFirst(offline_llm.OfflineTransport):
    """A slow server, one request at a time: every request takes ``seconds``, and each body's first attempt then
    gets an HTTP 503 (retry after 10 ms)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.seen = seconds, set()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        await asyncio.sleep(self.seconds)
        if body not in self.seen:
            self.seen.add(body)
            return httpx2.Response(503, headers={"retry-after-ms": "10"}, json={"error": {"message": "busy"}})
        return await super().handle_async_request(request)


def test_the_deadline_counts_the_servers_time_not_the_time_queued_in_the_pace(quick_backoff):
    """REPORT_MAX_CONCURRENCY=1: the third call's first attempt waits 0.4 s for its turn, its retry longer; the
    server takes 0.4 s over its two attempts, within REPORT_REQUEST_TIMEOUT=0.5. Counting the queue, it would
    time out before its retry."""
    async def three() -> list[Any]:
        return await asyncio.gather(*(call(request(topic)) for topic in ("Cats", "Dogs", "Owls")),
                                    return_exceptions=True)

    with runtime.use_transport(SlowAndBusyAtFirst(0.2)), runtime.configured(max_concurrency=1, request_timeout=0.5):
        started = time.monotonic()
        replies = asyncio.run(three())
        elapsed = time.monotonic() - started
    assert replies == [offline_llm.write_draft(topic) for topic in ("Cats", "Dogs", "Owls")], replies
    assert elapsed >= 1.2, "six attempts of 0.2 s, one at a time: the calls did queue"


def test_the_timeout_message_names_the_steps_own_limit():
    with runtime.use_transport(Failing(httpx2.ReadTimeout)), runtime.configured(request_timeout=2.5):
        error, _, _ = run_listened(request("Cats", system=WRITER), step="summary")
    assert str(error).startswith("Cats: the summary got no reply within 2.5 s (REPORT_REQUEST_TIMEOUT=2.5).")
    assert str(error).endswith("(A lower REPORT_MAX_TOKENS_SUMMARY does not make the model write less: it cuts "
                               "its replies off.)")


@pytest.mark.slow  # waits out a real timeout over HTTP
def test_one_deadline_for_all_attempts_against_a_server_slower_than_it(api_key):
    with offline_llm.OfflineServer(latency=1.5) as server, \
            served_by(server, model="m", request_timeout=0.4, client_retries=3):
        started = time.monotonic()
        error, usage, events = run_listened(request("Cats"))
        elapsed = time.monotonic() - started
        received = server.stats().requests
    assert isinstance(error, model_client.ModelTimeout)
    assert received == 1 and usage.requests == 1, "one attempt, not 1 + 3 retries"
    assert 0.35 < elapsed < 1.2
    assert [event["step"] for event in events] == ["timed-out"]


def test_a_call_still_waiting_is_told_once(monkeypatch):
    monkeypatch.setattr(model_client, "STILL_WAITING_AFTER", 0.02)
    with runtime.configured(offline_latency=0.15, reply_cache=None):
        text, _, events = run_listened(request("Cats"))
    assert text == offline_llm.write_draft("Cats")
    assert events == [{"topic": "Cats", "step": "still-waiting", "call": "draft", "seconds": 0.02}], "one, not many"


# ----------------------------------------------------------------------------------------- cut-off replies


def test_a_reply_cut_at_its_limit_is_an_error_that_names_the_setting_and_is_never_cached(tmp_path):
    body = request("Cats", max_tokens=20)
    with runtime.configured(reply_cache=tmp_path / "replies.sqlite3"), scripted_model() as transport:
        error, usage, events = run_listened(body)
        again, _, _ = run_listened(body)
    assert isinstance(error, model_client.ReplyCutOff) and isinstance(error, flyte.errors.NonRecoverableError)
    assert (error.topic, error.step, error.limit, error.setting) == ("Cats", "draft", 20, "REPORT_MAX_TOKENS_REPORT")
    assert describe_error(error) == ('ReplyCutOff: Cats: the draft hit the reply limit of 20 tokens and was cut off '
                                     '(finish_reason "length"). Raise REPORT_MAX_TOKENS_REPORT for longer replies.')
    assert events == [{"topic": "Cats", "step": "cut-off", "call": "draft", "limit": 20, "shorter": False}]
    assert (usage.requests, usage.cut_off, usage.completion_tokens) == (1, 1, 20)
    assert isinstance(again, model_client.ReplyCutOff) and str(again) == str(error)
    assert transport.count() == 1, "the cut-off is remembered, its text is not: a rerun sends nothing"


def test_a_rerun_of_a_request_cut_off_before_goes_straight_to_the_shorter_one_without_any_request(tmp_path):
    cut_first = CutFirstDraft()
    body = request("Cats", max_tokens=1500)

    def shorter_draft() -> tuple[str, Usage]:
        async def go():
            with metering() as meter:
                return await complete(body, topic="Cats", step="draft", retry_shorter=True), meter.total
        return asyncio.run(go())

    with runtime.configured(reply_cache=tmp_path / "replies.sqlite3"), runtime.use_transport(cut_first):
        first, spent = shorter_draft()
        sent = runtime.requests_sent.value
        again, reused = shorter_draft()
        assert runtime.requests_sent.value == sent, "no request at all"
    assert cut_first.drafts == 2 and (spent.requests, spent.cut_off) == (2, 1)
    assert again == first and (reused.requests, reused.cache_hits) == (0, 2), "the marker, then the shorter reply"


class CutFirstDraft(offline_llm.OfflineTransport):
    """The offline model; a draft request without the shorter instruction is cut off at its limit."""

    def __init__(self) -> None:
        super().__init__()
        self.drafts = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(await request.aread())
        self.drafts += 1
        if "was cut off" in body["messages"][0]["content"]:
            return await super().handle_async_request(request)
        return httpx2.Response(200, json={
            "id": "cut", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "# Cats\n\nCats are"},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": body["max_tokens"], "total_tokens": 0}})


def test_a_reply_cut_off_and_a_rejected_request_survive_pickling():
    import pickle

    error = model_client.ReplyCutOff("Cats", "critique", 500, "REPORT_MAX_TOKENS_CRITIQUE")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.limit, copy.setting, str(copy), copy.code) == (500, error.setting, str(error), "ReplyCutOff")
    stopped = model_client.ReplyCutOff("Cats", "revision", 1500, "REPORT_MAX_TOKENS_REPORT", True, tokens=210)
    copy = pickle.loads(pickle.dumps(stopped))
    assert (copy.tokens, copy.shorter, str(copy)) == (210, True, str(stopped))
    rejected = model_client.RequestRejected("Cats: too long", "ContextExceeded")
    copy = pickle.loads(pickle.dumps(rejected))
    assert (str(copy), copy.code) == ("Cats: too long", "ContextExceeded")


def test_a_reply_stopped_by_a_full_context_says_so_and_not_to_raise_the_limit(api_key):
    """A small local model's context (prompt plus reply) fills before the reply limit: the reply stops with
    finish_reason "length" after fewer tokens than max_tokens. A higher limit would not help."""
    body = request("Cats", max_tokens=1500)
    room = 200 - prompt_tokens(body)
    with small_context(200) as server, served_by(server):
        error, usage, events = run_listened(body)
    assert isinstance(error, model_client.ReplyCutOff) and isinstance(error, flyte.errors.NonRecoverableError)
    assert (error.limit, error.tokens, error.setting) == (1500, room, "REPORT_MAX_TOKENS_REPORT")
    assert describe_error(error) == (
        f'ReplyCutOff: Cats: the draft stopped after {room} tokens, before the reply limit of 1500 tokens '
        '(finish_reason "length"): the model\'s context (prompt plus reply) is probably full. Use a server or model '
        'with a larger context window (llama.cpp: -c, Ollama: num_ctx) or shorter prompts; raising '
        'REPORT_MAX_TOKENS_REPORT will not help.')
    assert events == [{"topic": "Cats", "step": "cut-off", "call": "draft", "limit": 1500, "shorter": False,
                       "tokens": room}]
    assert (usage.requests, usage.cut_off, usage.completion_tokens) == (1, 1, room)


def test_a_cut_off_reply_that_does_not_say_its_length_keeps_the_reply_limit_message():
    with runtime.use_transport(NoUsageTransport()):
        error, _, events = run_listened(request("Cats", max_tokens=20))
    assert str(error) == ('Cats: the draft hit the reply limit of 20 tokens and was cut off (finish_reason "length"). '
                          'Raise REPORT_MAX_TOKENS_REPORT for longer replies.')
    assert events == [{"topic": "Cats", "step": "cut-off", "call": "draft", "limit": 20, "shorter": False}]


def test_a_reply_stopped_by_a_full_context_is_asked_for_again_shorter_and_a_rerun_asks_again(api_key, tmp_path):
    """The shorter retry asks for what the context left room for (not half the reply limit). Nothing is kept in the
    reply cache: the fix (a larger context: the same URL, model and request) would otherwise never be tried."""
    body = request("Cats", max_tokens=1500)

    def shorter_draft() -> Any:
        async def go():
            try:
                return await complete(body, topic="Cats", step="draft", retry_shorter=True)
            except model_client.ReplyCutOff as cut:
                return cut
        return asyncio.run(go())

    with small_context(200) as server, served_by(server, reply_cache=tmp_path / "replies.sqlite3"):
        first = shorter_draft()
        received = server.received()
        again = shorter_draft()
        rerun = server.received()[len(received):]
    assert len(received) == 2, "the draft and its shorter retry"
    stopped = 200 - prompt_tokens(received[0].body)
    assert f"must fit in {stopped} tokens: at most {stopped // 2} words" in received[1].body["messages"][0]["content"]
    assert isinstance(first, model_client.ReplyCutOff) and first.shorter
    assert first.tokens == 200 - prompt_tokens(received[1].body), "where the shorter retry's context was full"
    assert str(first).startswith(f"Cats: the draft stopped after {first.tokens} tokens, before the reply limit of "
                                 '1500 tokens (finish_reason "length"), even though a shorter reply was asked for: ')
    assert len(rerun) == 2 and isinstance(again, model_client.ReplyCutOff), "a rerun asks the server again"


def test_a_reply_within_its_limit_is_not_cut():
    text, usage, events = run_listened(request("Cats", max_tokens=1500))
    assert text == offline_llm.write_draft("Cats") and usage.cut_off == 0 and events == []


def test_every_call_adds_to_the_batch_counts_failed_ones_too(quick_backoff):
    runtime.start_batch()
    with runtime.use_transport(Failing(503, httpx2.ReadTimeout)):
        run_listened(request("Cats"))
    run_listened(request("Dogs", max_tokens=5))
    run_listened(request("Owls"))
    counts = runtime.batch_usage.snapshot()
    assert {name: counts[name] for name in ("requests", "retries", "timed_out", "cut_off")} == {
        "requests": 4, "retries": 1, "timed_out": 1, "cut_off": 1}
    runtime.start_batch()
    assert runtime.batch_usage.snapshot() == {}


def test_a_cut_off_reply_gives_its_reason_for_a_larger_message():
    """What critique_draft quotes when even the repair is cut: the setting to raise, or the context that is full."""
    at_limit = model_client.ReplyCutOff("Cats", "critique", 500, "REPORT_MAX_TOKENS_CRITIQUE")
    early = model_client.ReplyCutOff("Cats", "critique", 500, "REPORT_MAX_TOKENS_CRITIQUE", tokens=210)
    assert at_limit.reason == ("the reply hit the limit of 500 tokens "
                               "(raise REPORT_MAX_TOKENS_CRITIQUE for longer replies)")
    assert early.reason.startswith("the reply stopped after 210 tokens, before the limit of 500: the model's context")
    assert "REPORT_MAX_TOKENS_CRITIQUE" not in early.reason and model_client.LARGER_CONTEXT in early.reason
