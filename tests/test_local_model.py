"""Against a small local model, end to end: the loopback server playing llama.cpp (``OfflineServer`` with a
served model name, rambling to its context without a reply limit, a per-token latency) behind the real
``openai`` client, the pipeline in Flyte's local mode, configured as the README's llama.cpp row says.

Bounded replies, the served model's name in every output and in the cache keys, visible waits, timeouts
that say what to change, and every attempt counted in summary.json.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any

import pytest
from helpers import served_by

import pipeline
from machinery import model_client, offline_llm
from machinery.runtime import runtime

SERVED = "qwen2.5-0.5b-instruct-q4_k_m.gguf"


def small_model(context_tokens: int = 4096, **options: Any) -> offline_llm.OfflineServer:
    """llama-server with a 0.5B model: one served name, no reply limit of its own, a 4096-token context (its -c)."""
    return offline_llm.OfflineServer(served_model=SERVED, ramble=True, context_tokens=context_tokens, **options)


class SlowFor(offline_llm.OfflineServer):
    """A small local model that takes ``seconds`` over every reply about a topic containing ``marker``."""

    def __init__(self, marker: str, seconds: float, **options: Any) -> None:
        super().__init__(served_model=SERVED, ramble=True, **options)
        self.marker, self.seconds = marker, seconds

    def delay_for(self, raw_body: bytes, payload: dict[str, Any]) -> float:
        slow = self.marker in offline_llm.parse_request(json.loads(raw_body)).topic
        return self.seconds if slow else super().delay_for(raw_body, payload)


def everything_written(batch: pipeline.BatchResult) -> str:
    """summary.json, index.html and every topic's three files, as one text."""
    paths = [batch.summary_path, batch.index_path] + [p for p in batch.run_dir.glob("*/*") if p.is_file()]
    return "\n".join(path.read_text(encoding="utf-8") for path in paths)


# ----------------------------------------------------------------------------------------- done when


@pytest.mark.slow  # a per-token latency: seconds of real waiting
def test_two_topics_with_the_readme_settings_finish_fast_with_the_served_name_everywhere(tmp_path, api_key, capsys):
    topics = ["Why cats purr", "Quantum computing"]
    # 500 tokens a second, as the CLI demo: a topic's replies take seconds, so the time limit below means something.
    with small_model(per_token_latency=0.002) as server, \
            served_by(server, reply_cache=tmp_path / "replies.sqlite3"):  # no REPORT_MODEL, as in the README
        started = time.monotonic()
        batch = pipeline.run_batch(topics, max_iterations=2, output_dir=tmp_path, run_id="local",
                                   report_date="2026-11-29", flyte_cache=False)
        elapsed = time.monotonic() - started
        received = server.received()
        described = runtime.describe()
    assert all(report.ok for report in batch.reports), [r.error for r in batch.reports]
    # A topic's refinement is one call after another: its replies alone take their tokens x the latency.
    longest_topic = max(r.result.usage.completion_tokens for r in batch.reports) * 0.002
    assert 2 < longest_topic <= elapsed < 60, f"{elapsed:.1f} s, the longest topic's replies {longest_topic:.1f} s"
    assert described == f"model {SERVED} at {server.base_url} (OpenAI-compatible)", "what the announcement says"
    assert batch.model == SERVED and {r.result.model for r in batch.reports} == {SERVED}
    summary = json.loads(batch.summary_path.read_text(encoding="utf-8"))
    assert summary["model"] == SERVED and f"· {SERVED} ·" in batch.index_path.read_text(encoding="utf-8")
    for topic in topics:
        front_matter = pipeline.read_front_matter((batch.folder(topic) / "report.md").read_text(encoding="utf-8"))
        assert front_matter["model"] == SERVED
        assert f"· {SERVED} ·" in (batch.folder(topic) / "report.html").read_text(encoding="utf-8")
    assert "gpt-4o-mini" not in everything_written(batch)
    settings = runtime.settings
    limits = {"writer": settings.max_tokens_report, "reviser": settings.max_tokens_report,
              "critic": settings.max_tokens_critique, "summarizer": settings.max_tokens_summary}
    assert {(r.model, r.max_tokens == limits[r.role]) for r in received} == {(SERVED, True)}, "every request"
    totals = summary["totals"]["llm_usage"]
    assert (totals["requests"], totals["cut_off"], totals["timed_out"]) == (len(received), 0, 0)
    print(f"\ntwo topics against a small local model: {elapsed:.1f} s, {len(received)} requests")


def test_without_a_reply_limit_the_same_server_rambles_to_its_context():
    """What the limits prevent: without one, the server stops only when its context is full."""
    body = {"model": SERVED, "messages": [{"role": "system", "content": pipeline.WRITER_PROMPT},
                                          {"role": "user", "content": "Topic: Cats\n\nWrite the report."}]}
    with small_model() as server:
        rambling = server.serve("POST", "/v1/chat/completions", json.dumps(body).encode())[1]
        bounded = server.serve("POST", "/v1/chat/completions", json.dumps({**body, "max_tokens": 1500}).encode())[1]
    assert rambling["choices"][0]["finish_reason"] == "length" and rambling["usage"]["completion_tokens"] > 3500
    assert bounded["choices"][0]["finish_reason"] == "stop"
    assert bounded["choices"][0]["message"]["content"] == offline_llm.write_draft("Cats")


# ----------------------------------------------------------------------------------------- the cache keys


@pytest.mark.slow  # three whole batches
def test_another_model_behind_the_same_url_never_returns_the_old_reports(tmp_path, api_key):
    topics = ["Swapped model: cats", "Swapped model: dogs"]

    def run(name: str, port: int, run_id: str) -> tuple[pipeline.BatchResult, int]:
        with offline_llm.OfflineServer(port=port, served_model=name) as server, served_by(server):
            batch = pipeline.run_batch(topics, max_iterations=1, output_dir=tmp_path, run_id=run_id)
            return batch, server.stats().requests

    with offline_llm.OfflineServer() as probe:
        port = int(re.search(r":(\d+)/", probe.base_url).group(1))
    first, sent_first = run("model-a.gguf", port, "a")
    second, sent_second = run("model-b.gguf", port, "b")  # the .gguf swapped behind the same URL
    again, sent_again = run("model-a.gguf", port, "a-again")
    assert first.cached_topics == [] and sent_first > 0
    assert second.cached_topics == [], "not served by Flyte's task cache"
    assert second.llm_usage.cache_hits == 0 and second.llm_usage.requests == sent_second > 0, "nor the reply cache"
    assert (first.model, second.model) == ("model-a.gguf", "model-b.gguf")
    assert again.cached_topics == topics and sent_again == 0, "the first model's reports are still its own"


# ----------------------------------------------------------------------------------------- timeouts, cut-offs, counts


@pytest.mark.slow  # waits out a real timeout
def test_a_timeout_and_a_cut_off_fail_their_topics_clearly_and_every_attempt_is_counted(tmp_path, api_key):
    events: list[dict[str, Any]] = []
    with SlowFor("Slow", seconds=2.0) as server, \
            served_by(server, request_timeout=0.5, client_retries=3, max_tokens_summary=20, reply_cache=None):
        batch = pipeline.run_batch(["Slow owls", "Cats"], max_iterations=1, output_dir=tmp_path, run_id="t",
                                   on_event=events.append, flyte_cache=False)
        received = server.received()
    slow, cats = batch.reports
    assert slow.error == ("ModelTimeout: Slow owls: the draft got no reply within 0.5 s (REPORT_REQUEST_TIMEOUT=0.5). "
                          "A model on a CPU may need longer: raise REPORT_REQUEST_TIMEOUT. (A lower "
                          "REPORT_MAX_TOKENS_REPORT does not make the model write less: it cuts its replies off.)")
    assert sum(1 for r in received if "Slow owls" in json.dumps(r.body)) == 1, "no client retry, no task retry"
    assert cats.error == ('ReplyCutOff: Cats: the summary hit the reply limit of 20 tokens and was cut off '
                          '(finish_reason "length"), even though a shorter reply was asked for. '
                          'Raise REPORT_MAX_TOKENS_SUMMARY for longer replies.')
    assert [r.role for r in received if r.role == "summarizer"] == ["summarizer"] * 2, "one shorter retry, no more"
    notable = [(e["topic"], e["step"], e.get("call")) for e in events if e["step"] in ("timed-out", "cut-off")]
    assert sorted(notable) == [("Cats", "cut-off", "summary"), ("Cats", "cut-off", "summary"),
                               ("Slow owls", "timed-out", "draft")]
    totals = json.loads(batch.summary_path.read_text(encoding="utf-8"))["totals"]["llm_usage"]
    assert (totals["requests"], totals["timed_out"], totals["cut_off"]) == (len(received), 1, 2), \
        "every attempt the server saw, the failed topics' included"


@pytest.mark.slow  # real waiting, so that the waits show
def test_the_cli_shows_each_wait_and_the_timeout(tmp_path, api_key, capsys, monkeypatch):
    monkeypatch.setattr(model_client, "STILL_WAITING_AFTER", 0.3)
    with SlowFor("Slow", seconds=3.0, per_token_latency=0.002) as server, \
            served_by(server, request_timeout=1.0, reply_cache=None):
        code = pipeline.main(["Why cats purr", "Slow owls", "--max-iterations", "1", "--out", str(tmp_path),
                              "--run-id", "cli", "--no-cache"])
    out = capsys.readouterr().out
    print(out)
    assert code == 1
    lines = out.splitlines()
    assert "  Slow owls: still waiting for the draft after 0.3 s" in lines
    assert "  Slow owls: the draft got no reply within 1 s (REPORT_REQUEST_TIMEOUT)" in lines
    assert sum(line.startswith("  Slow owls: still waiting") for line in lines) == 1, "one line per call, no flood"
    assert "  Why cats purr: draft" in lines and "  Why cats purr: round 1 critique" in lines
    assert any(line.startswith("  Slow owls: ModelTimeout: Slow owls: the draft got no reply within 1 s")
               for line in lines), "the closing lines say it again, with what to change"


# ----------------------------------------------------------------------------------------- small contexts, dead servers


def prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt's tokens, as the offline model counts them."""
    return sum(offline_llm.estimate_tokens(message["content"]) for message in body["messages"])


def test_a_reply_that_fills_a_small_context_is_not_blamed_on_the_reply_limit(tmp_path, api_key, capsys):
    """A 600-token context: the revision's prompt leaves its reply some 200 tokens, far below the limit of 1500."""
    with small_model(context_tokens=600) as server, \
            served_by(server, reply_cache=None):
        code = pipeline.main(["Some topic", "--out", str(tmp_path), "--run-id", "small", "--no-cache"])
        revision, shorter = [r for r in server.received() if r.role == "reviser"]
    lines = capsys.readouterr().out.splitlines()
    stopped, again = (600 - prompt_tokens(r.body) for r in (revision, shorter))
    assert code == 1 and 0 < again < stopped < 1500
    assert (f"  Some topic: the revision stopped after {stopped} tokens, before the reply limit of 1500 tokens: the "
            "model's context (prompt plus reply) is probably full; a larger context window (llama.cpp: -c, Ollama: "
            "num_ctx) or shorter prompts would help") in lines
    assert (f"  Some topic: the revision stopped after {again} tokens, before the reply limit of 1500 tokens, even "
            "the shorter retry: the model's context") in "\n".join(lines)
    (error,) = [line for line in lines if line.startswith("  Some topic: ReplyCutOff: ")]
    assert error == (f"  Some topic: ReplyCutOff: Some topic: the revision stopped after {again} tokens, before the "
                     'reply limit of 1500 tokens (finish_reason "length"), even though a shorter reply was asked for: '
                     "the model's context (prompt plus reply) is probably full. Use a server or model with a larger "
                     "context window (llama.cpp: -c, Ollama: num_ctx) or shorter prompts; raising "
                     "REPORT_MAX_TOKENS_REPORT will not help.")
    assert not any("Raise REPORT_MAX_TOKENS" in line or "at the reply limit" in line for line in lines)


def test_a_prompt_beyond_a_small_context_fails_its_topic_at_once(tmp_path, api_key):
    """A 100-token context: the draft stops early, its shorter retry's prompt no longer fits (HTTP 400)."""
    events: list[dict[str, Any]] = []
    with small_model(context_tokens=100) as server, served_by(server):
        batch = pipeline.run_batch(["Some topic"], max_iterations=1, output_dir=tmp_path, run_id="tiny",
                                   on_event=events.append, flyte_cache=False)
        received = server.received()
    (report,) = batch.reports
    assert report.error.startswith("ContextExceeded: Some topic: the draft's request does not fit in the model's "
                                   f"context window: the server at {server.base_url} answered HTTP 400 (request (")
    assert "Use a server or model with a larger context window (llama.cpp: -c, Ollama: num_ctx)" in report.error
    assert len(received) == 2, "the draft and its shorter retry, once: no client retry, no task retry"
    assert [e for e in events if e["step"] == "cut-off"] == [
        {"topic": "Some topic", "step": "cut-off", "call": "draft", "limit": 1500, "shorter": False,
         "tokens": 100 - prompt_tokens(received[0].body)}]
    assert not any(e["step"] == "gave-up" for e in events)


class DiesAfter(offline_llm.OfflineServer):
    """A small local model whose process dies after ``replies`` completions: the next request finds its
    connection closed, every later one finds nobody listening."""

    def __init__(self, replies: int) -> None:
        super().__init__(served_model=SERVED)
        self.replies_left, self.lock = replies, threading.Lock()

    def handle(self, handler: Any, method: str, raw_body: bytes) -> None:
        if method == "POST":
            with self.lock:
                self.replies_left -= 1
                dying = self.replies_left == -1
                dead = self.replies_left < 0
            if dying:
                threading.Thread(target=self.stop).start()  # not on this thread: stop waits for the server loop
            if dead:
                handler.close_connection = True
                return
        super().handle(handler, method, raw_body)


@pytest.mark.slow  # Flyte's own backoff between the task's attempts: 0.5 + 1 + 2 s
def test_a_server_that_dies_mid_run_is_named_and_no_line_promises_a_retry_it_may_not_get(tmp_path, api_key, capsys,
                                                                                           monkeypatch):
    monkeypatch.setattr(model_client, "BACKOFF_FIRST", 0.01)
    with DiesAfter(replies=2) as server, served_by(server, client_retries=1):
        code = pipeline.main(["Some topic", "--out", str(tmp_path), "--run-id", "dead", "--no-cache"])
    lines = capsys.readouterr().out.splitlines()
    gave_up = [line for line in lines if " failed after 2 attempt(s) (the connection failed)" in line]
    assert code == 1 and len(gave_up) == 4, "refine_report's attempt and its 3 retries"
    # A local run does not number the task's attempts (a cluster's containers are told theirs), and Flyte's
    # context does not say how many retries are left: no line may promise one.
    assert [re.sub(r".* failed after 2 attempt\(s\) \(the connection failed\)", "", line) for line in gave_up] == [
        "; Flyte retries the task if it has a retry left"] * 4
    (error,) = [line for line in lines if line.startswith("  Some topic: APIConnectionError: ")]
    assert f"could not reach the model server at {server.base_url} after 2 attempt(s) (" in error
    assert error.endswith("Is it still running? Check OPENAI_BASE_URL, or unset it and OPENAI_API_KEY to use the "
                          "offline model.")
    assert api_key not in "\n".join(lines)


# ----------------------------------------------------------------------------------------- without run_batch


def test_a_step_awaited_directly_or_a_task_run_alone_asks_the_server_too(api_key):
    """A notebook cell awaiting a traced step, or ``flyte.run`` of one task, never goes through check_backend."""
    import flyte

    with small_model() as server, served_by(server):
        draft = asyncio.run(pipeline.write_draft("Why owls hoot"))
        runtime.init_flyte()
        refined = flyte.run(pipeline.refine_report, topic="Why owls hoot", max_iterations=1).outputs()[0]
        received = server.received()
    assert draft == offline_llm.write_draft("Why owls hoot")
    assert refined.model == SERVED and {r.model for r in received} == {SERVED}
    assert runtime.task_env_vars.get("REPORT_MODEL") != SERVED, "restored with the settings after the block"
