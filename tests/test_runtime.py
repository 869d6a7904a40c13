"""machinery/runtime.py: the one owner of runtime state.

Settings changed for good or for a block, one client per event loop, the transport seam,
the cap across loops, progress listeners, Flyte's initialisation, and the live values the
task environments are declared with (env vars and secrets follow ``configure``, up to a deploy).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import re
import sqlite3
import subprocess
import sys
import threading
from types import SimpleNamespace

import flyte
import httpx2
import pytest
from conftest import ROOT, SCRATCH, subprocess_env
from helpers import ScriptedTransport, scripted_model

import pipeline
from machinery import offline_llm, pacing
from machinery.concurrency import InflightLimit
from machinery.model_client import complete
from machinery.pacing import INITIAL_WINDOW
from machinery.runtime import Runtime, runtime
from machinery.settings import Settings

SECRET = flyte.Secret(key="openai-api-key", as_env_var="OPENAI_API_KEY")


def draft_request(topic: str) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": pipeline.WRITER_PROMPT},
                                       {"role": "user", "content": f"Topic: {topic}\n\nWrite the report."}]}


# ----------------------------------------------------------------------------------------- settings


def test_configure_changes_settings_from_now_on():
    before = runtime.settings
    changed = runtime.configure(max_concurrency=3, model="gpt-4.1")
    assert changed is runtime.settings and changed.max_concurrency == 3 and changed.model == "gpt-4.1"
    assert changed.backend == before.backend, "only the named fields change"
    assert isinstance(runtime.limit, InflightLimit) and runtime.limit.limit == 3, "the window starts under it"
    assert runtime.pace.ceiling == 3 and runtime.pace.patience == changed.rate_limit_patience
    # the autouse fixture restores the settings after this test


def test_configure_rejects_unknown_fields():
    before, pace = runtime.settings, runtime.pace
    renamed = r"'llm_cache' is not a setting \(did you mean reply_cache\?\): the settings are backend, .*run_history"
    with pytest.raises(TypeError, match=renamed):
        runtime.configure(llm_cache=None)
    with pytest.raises(TypeError, match="'colour' is not a setting: the settings are backend, model, "), \
            runtime.configured(colour="blue", max_concurrency=2):
        pytest.fail("the block never runs")
    assert runtime.settings is before and runtime.pace is pace


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_concurrency": 0}, "max_concurrency=0 (REPORT_MAX_CONCURRENCY) must be a whole number of at least 1"),
        ({"backend": "foo"}, "backend='foo' (REPORT_BACKEND) is not a known backend: use 'offline' (built-in"),
        ({"max_tokens_report": 0},
         "max_tokens_report=0 (REPORT_MAX_TOKENS_REPORT) must be a whole number of at least 1"),
        ({"request_timeout": 0}, "request_timeout=0 (REPORT_REQUEST_TIMEOUT) must be a number of seconds, at least"),
        ({"rate_limit_patience": -1.0},
         "rate_limit_patience=-1.0 (REPORT_RATE_LIMIT_PATIENCE) must be a number of seconds, at least 0"),
        ({"max_concurrency": "4"}, "max_concurrency='4' (REPORT_MAX_CONCURRENCY) must be a whole number"),
        ({"run_history": "on"}, "run_history='on' (REPORT_RUN_HISTORY) must be True or False"),
    ],
)
def test_a_bad_setting_is_refused_before_anything_changes(changes, message):
    """A failed ``configure`` or ``configured`` changes nothing: no restart needed, the next call works."""

    async def grab():
        return runtime.client()

    def attempt(change):
        if change == "configure":
            runtime.configure(model="a valid change, made with the bad one", **changes)
        else:
            with runtime.configured(model="a valid change, made with the bad one", **changes):
                pytest.fail("the block never runs")

    loop = asyncio.new_event_loop()
    try:
        client = loop.run_until_complete(grab())
        settings, pace, env_vars = runtime.settings, runtime.pace, dict(runtime.task_env_vars)
        for change in ("configure", "configured"):
            with pytest.raises(ValueError, match=re.escape(message)):
                attempt(change)
            assert runtime.settings is settings, change
            assert runtime.pace is pace and runtime.limit is pace.limit, change
            assert runtime.pace.ceiling == settings.max_concurrency
            assert runtime.task_env_vars == env_vars and pipeline.llm_env.secrets == []
            assert loop.run_until_complete(grab()) is client, "the clients were kept"
        later = runtime.configure(offline_latency=0.01)
        assert later.offline_latency == 0.01 and later.max_concurrency == settings.max_concurrency
        assert later.backend == settings.backend and later.max_tokens_report == settings.max_tokens_report
        assert runtime.pace.ceiling == settings.max_concurrency
    finally:
        loop.close()


def test_configured_restores_the_settings_after_the_block_even_on_failure():
    before = runtime.settings
    with runtime.configured(max_concurrency=2, offline_latency=0.5) as inside:
        assert runtime.settings is inside and inside.max_concurrency == 2 and runtime.limit.limit == 2
        with runtime.configured(max_concurrency=5):
            assert runtime.limit.limit == 5
        assert runtime.settings is inside and runtime.limit.limit == 2
    assert runtime.settings is before and runtime.pace.ceiling == before.max_concurrency
    assert runtime.limit.limit == min(INITIAL_WINDOW, before.max_concurrency)
    with pytest.raises(RuntimeError, match="boom"), runtime.configured(backend="openai", model="x"):
        raise RuntimeError("boom")
    assert runtime.settings is before
    assert runtime.task_env_vars == before.task_env_vars()


def test_new_settings_make_a_new_pace():
    before = runtime.pace
    with runtime.configured(rate_limit_patience=5.0, max_concurrency=20):
        assert runtime.pace is not before and (runtime.pace.patience, runtime.pace.ceiling) == (5.0, 20)
        assert runtime.limit is runtime.pace.limit and runtime.limit.limit == pacing.INITIAL_WINDOW
    assert runtime.pace.ceiling == runtime.settings.max_concurrency


# ----------------------------------------------------------------------------------------- clients


def test_clients_on_different_loops_are_different_objects():
    seen = []

    async def grab():
        seen.append(runtime.client())

    loop_a, loop_b = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        loop_a.run_until_complete(grab())
        loop_b.run_until_complete(grab())
        loop_a.run_until_complete(grab())
    finally:
        loop_a.close()
        loop_b.close()
    assert seen[0] is seen[2] and seen[0] is not seen[1]


def test_client_needs_a_running_loop():
    with pytest.raises(RuntimeError):
        runtime.client()


def test_new_settings_make_new_clients():
    async def grab():
        return runtime.client()

    async def scenario():
        first = await grab()
        with runtime.configured(request_timeout=7.0):
            inside = await grab()
        return first, inside, await grab()

    first, inside, after = asyncio.run(scenario())
    assert inside is not first and inside.timeout == 7.0
    assert after is not inside and after.timeout == Settings.request_timeout
    assert first.max_retries == 0, "model_client.complete retries, within one deadline"


def test_one_client_per_event_loop_across_notebook_and_flyte_loops(tmp_path):
    """A direct await, then a Flyte run (on Flyte's own loop), then a direct await on a new loop: all work."""
    first = asyncio.run(pipeline.write_draft("Cats"))
    batch = pipeline.run_batch(["Cats"], max_iterations=1, output_dir=tmp_path, run_id="loops", flyte_cache=False)
    again = asyncio.run(pipeline.write_draft("Cats"))
    assert first == again == offline_llm.write_draft("Cats")
    assert batch.reports[0].ok, batch.reports[0].error

    async def two_calls_same_loop():
        return runtime.client(), runtime.client()

    a, b = asyncio.run(two_calls_same_loop())
    assert a is b


def test_use_transport_answers_every_client_made_in_the_block_and_restores_after():
    async def ask(topic):
        return await complete(draft_request(topic), topic="Cats", step="draft")

    with runtime.configured(reply_cache=None):
        outside = ScriptedTransport()
        with scripted_model(lambda role, topic, content: "scripted " + topic) as transport:
            assert asyncio.run(ask("Cats")) == "scripted Cats"
            assert asyncio.run(ask("Dogs")) == "scripted Dogs", "a client made on a second loop uses it too"
            with runtime.use_transport(outside):
                assert asyncio.run(ask("Owls")) == offline_llm.write_draft("Owls")
            assert asyncio.run(ask("Bats")) == "scripted Bats", "the inner block restored the outer transport"
        assert transport.log == [("writer", "Cats"), ("writer", "Dogs"), ("writer", "Bats")]
        assert outside.log == [("writer", "Owls")]
        assert asyncio.run(ask("Cats")) == offline_llm.write_draft("Cats"), "the offline model is back"
        with pytest.raises(KeyError), scripted_model(lambda *_: "never") as failed:
            raise KeyError("inside")
        assert asyncio.run(ask("Rats")) == offline_llm.write_draft("Rats")
        assert failed.log == []


def test_use_transport_replaces_a_client_made_before_the_block():
    """A loop that already has a client must not keep using it inside the block."""

    async def scenario():
        before = runtime.client()
        with scripted_model(lambda *_: "scripted") as transport:
            inside = runtime.client()
            text = await complete(draft_request("Cats"), topic="Cats", step="draft")
        return before, inside, runtime.client(), text, transport

    before, inside, after, text, transport = asyncio.run(scenario())
    assert inside is not before and after is not inside
    assert text == "scripted" and transport.count("writer") == 1


def test_use_client_replaces_the_client_itself_for_the_block():
    class Canned:
        """Anything with chat.completions.create will do (the benchmark measures without the HTTP layer)."""

        def __init__(self):
            self.chat = self.completions = self
            self.calls = 0

        async def create(self, **request):
            self.calls += 1
            message = SimpleNamespace(content=f"canned {request['model']}")
            return SimpleNamespace(choices=[SimpleNamespace(message=message)], usage=None)

    canned = Canned()
    with runtime.configured(reply_cache=None):
        with runtime.use_client(canned):
            assert asyncio.run(complete(draft_request("Cats"), topic="Cats", step="draft")) == "canned m"
            with pytest.raises(LookupError), runtime.use_client(None):
                raise LookupError
            assert asyncio.run(complete(draft_request("Dogs"), topic="Cats", step="draft")) == "canned m"
        cats = asyncio.run(complete(draft_request("Cats"), topic="Cats", step="draft"))
        assert cats == offline_llm.write_draft("Cats")
    assert canned.calls == 2


def test_the_runtime_pickles_as_a_reference_to_the_process_runtime():
    """Flyte pickles task functions and what they use; settings and clients must never travel."""
    assert pickle.loads(pickle.dumps(runtime)) is runtime
    assert len(pickle.dumps(runtime)) < 100
    cloudpickle = pytest.importorskip("cloudpickle")

    def uses_the_runtime():  # defined here, so pickled by value with what it refers to, as Flyte does
        return runtime.settings

    with runtime.configured(model="not travelling"):
        payload = cloudpickle.dumps(uses_the_runtime)
    assert b"not travelling" not in payload
    assert cloudpickle.loads(payload)() is runtime.settings


def test_requests_sent_counts_every_request():
    before = runtime.requests_sent.value
    with runtime.configured(reply_cache=None), scripted_model():
        asyncio.run(complete(draft_request("Cats"), topic="Cats", step="draft"))
        asyncio.run(complete(draft_request("Cats"), topic="Cats", step="draft"))
    assert runtime.requests_sent.value - before == 2


def test_the_cap_holds_across_event_loops():
    """A notebook's loop and Flyte's loop share one cap on requests in flight."""

    async def many(prefix):
        await asyncio.gather(*(complete(draft_request(f"{prefix} {i}"), topic="Cats", step="draft") for i in range(8)))

    with runtime.configured(max_concurrency=2, reply_cache=None), \
            runtime.use_transport(offline_llm.OfflineTransport(latency=0.02)):
        threads = [threading.Thread(target=asyncio.run, args=(many(f"loop {n}"),)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert runtime.limit.peak == 2 and runtime.limit.in_flight == 0


# ----------------------------------------------------------------------------------------- the reply cache


def test_reply_cache_is_opened_once_per_path_and_none_when_off(tmp_path):
    with runtime.configured(reply_cache=tmp_path / "a.sqlite3"):
        first = runtime.reply_cache()
        assert first is runtime.reply_cache() and first.path == tmp_path / "a.sqlite3"
        with runtime.configured(reply_cache=tmp_path / "b.sqlite3"):
            assert runtime.reply_cache().path == tmp_path / "b.sqlite3"
        with runtime.configured(reply_cache=None):
            assert runtime.reply_cache() is None
    assert (tmp_path / "a.sqlite3").exists()


# ----------------------------------------------------------------------------------------- progress events


def test_listeners_get_the_events_of_their_block_only():
    events, failing_calls = [], []

    def broken(event):
        failing_calls.append(event)
        raise RuntimeError("a broken widget")

    runtime.emit("Cats", "draft")  # nobody listens: nothing happens
    with runtime.listening(events.append), runtime.listening(broken), runtime.listening(None):
        runtime.emit("Cats", "scored", iteration=1, score=7)
    runtime.emit("Cats", "done")
    assert events == [{"topic": "Cats", "step": "scored", "iteration": 1, "score": 7}]
    assert len(failing_calls) == 1, "a failing listener is logged, not raised, and not kept"
    with pytest.raises(ValueError), runtime.listening(events.append):
        raise ValueError("the run failed")
    runtime.emit("Cats", "after")
    assert len(events) == 1, "removed even when the block failed"


class LimitedOnce(offline_llm.OfflineTransport):
    """The offline model behind a server whose first answer is a 429 naming 200 ms."""

    def __init__(self) -> None:
        super().__init__()
        self.answered = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.answered += 1
        if self.answered == 1:
            return httpx2.Response(429, headers={"retry-after-ms": "200"}, json={"error": {"message": "slow down"}})
        return await super().handle_async_request(request)


def test_a_long_pause_is_one_event_for_the_whole_batch(monkeypatch):
    monkeypatch.setattr(pacing, "ANNOUNCE_PAUSES_OVER", 0.1)  # a second in earnest
    events = []

    async def three():
        return await asyncio.gather(*(complete(draft_request(f"Topic {i}"), topic=f"Topic {i}", step="draft")
                                      for i in range(3)))

    with runtime.configured(reply_cache=None), runtime.use_transport(LimitedOnce()), \
            runtime.listening(events.append):
        asyncio.run(three())
    assert events == [{"topic": None, "step": "rate-limited", "seconds": 0.2,
                       "reason": "HTTP 429 from the server, retry after 0.2 s"}]


def test_a_batch_reports_every_step_to_its_listener(tmp_path):
    events = []
    pipeline.run_batch(["Cats"], max_iterations=2, output_dir=tmp_path, run_id="events", on_event=events.append,
                       flyte_cache=False)
    steps = [event["step"] for event in events]
    assert steps[0] == "draft" and steps[-1] == "done"
    assert {"critique", "scored", "format"} <= set(steps)


# ----------------------------------------------------------------------------------------- console and Flyte


def test_the_backend_is_announced_once_and_never_shows_the_key(capsys, api_key):
    fresh = Runtime(Settings(backend="openai", base_url="http://127.0.0.1:1/v1", model="gpt-4o-mini"))
    fresh._model = "gpt-4o-mini"  # as check_backend would have named it: nothing listens at port 1
    fresh.announce_backend()
    fresh.announce_backend()
    out = capsys.readouterr().out
    assert out == "Reports are written by the model gpt-4o-mini at http://127.0.0.1:1/v1 (OpenAI-compatible).\n"
    assert api_key not in out


def test_run_history_is_recorded_only_when_switched_on(tmp_path):
    def recorded(batch) -> int:
        database = SCRATCH / ".flyte" / "local-cache" / "cache.db"
        if not database.exists():
            return 0
        with sqlite3.connect(database) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "runs" not in tables:
                return 0
            return db.execute("SELECT COUNT(*) FROM runs WHERE run_name = ?", (batch.flyte_run_name,)).fetchone()[0]

    assert runtime.settings.run_history is False
    quiet = pipeline.run_batch(["History off"], max_iterations=1, output_dir=tmp_path, run_id="off", flyte_cache=False)
    with runtime.configured(run_history=True):
        loud = pipeline.run_batch(["History on"], max_iterations=1, output_dir=tmp_path, run_id="on",
                                  flyte_cache=False)
    again = pipeline.run_batch(["History off again"], max_iterations=1, output_dir=tmp_path, run_id="off2",
                               flyte_cache=False)
    assert recorded(quiet) == 0
    assert recorded(loud) >= 8  # the driver twice, two tasks, and the traced calls
    assert recorded(again) == 0, "the next batch re-initialises Flyte without history"


# ----------------------------------------------------------------------------------------- task environments


def test_task_env_vars_follow_configure():
    live = runtime.task_env_vars
    assert live == runtime.settings.task_env_vars()
    with runtime.configured(backend="openai", model="gpt-4.1-mini", base_url="http://10.0.0.5:8000/v1"):
        assert runtime.task_env_vars is live, "the same dict the environments hold, updated in place"
        assert live == {"REPORT_BACKEND": "openai", "REPORT_MODEL": "gpt-4.1-mini", "REPORT_REPLY_CACHE": "off",
                        "OPENAI_BASE_URL": "http://10.0.0.5:8000/v1"}
    assert "OPENAI_BASE_URL" not in live and live["REPORT_BACKEND"] == "offline"


def test_openai_secrets_are_present_only_with_the_openai_backend():
    fresh = Runtime(Settings())
    secrets = fresh.openai_secrets(SECRET)
    assert secrets == []
    fresh.configure(backend="openai")
    assert secrets == [SECRET]
    with fresh.configured(backend="offline"):
        assert secrets == []
    assert secrets == [SECRET]
    assert Runtime(Settings(backend="openai")).openai_secrets(SECRET) == [SECRET]


def test_the_pipelines_environments_follow_configure(api_key):
    """What a deploy reads from the environments and their tasks: the settings in force."""
    assert pipeline.llm_env.secrets == [] and pipeline.driver_env.secrets in ([], None, ())
    assert pipeline.llm_env.env_vars["REPORT_BACKEND"] == "offline"
    with runtime.configured(backend="openai", model="gpt-4.1-mini"):
        assert [s.key for s in pipeline.llm_env.secrets] == ["openai-api-key"]
        assert [s.key for s in pipeline.refine_report.secrets] == ["openai-api-key"]
        assert pipeline.driver_env.secrets in ([], None, ()), "the driver never calls the model"
        for env_vars in (pipeline.llm_env.env_vars, pipeline.driver_env.env_vars, pipeline.format_outputs.env_vars):
            assert env_vars["REPORT_BACKEND"] == "openai" and env_vars["REPORT_MODEL"] == "gpt-4.1-mini"
            assert api_key not in json.dumps(env_vars)
    assert pipeline.llm_env.secrets == [] and pipeline.llm_env.env_vars["REPORT_BACKEND"] == "offline"


def deploy_dry_run(tmp_path, *changes: str, **env: str) -> dict:
    # TMPDIR: Flyte packs the code bundle into a temp folder it never removes.
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "deploy_dry_run.py"), *changes], capture_output=True,
                          text=True, timeout=300, env=subprocess_env(TMPDIR=str(tmp_path), **env), cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_deploy_dry_run_serializes_both_environments(tmp_path):
    result = deploy_dry_run(tmp_path, REPORT_BACKEND="openai", OPENAI_API_KEY="sk-dry-run")
    assert result["tasks"] == ["driver.report_batch_pipeline", "llm-worker.format_outputs", "llm-worker.refine_report"]
    assert result["worker_secret"] and result["formatter_secret"] and not result["driver_secret"]
    assert result["worker_reuse"] and result["worker_retries"]
    expected_env = {"REPORT_BACKEND": "openai", "REPORT_MODEL": "gpt-4o-mini", "REPORT_REPLY_CACHE": "off"}
    assert result["worker_env"] == result["driver_env"] == expected_env
    assert "sk-dry-run" not in json.dumps(result)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("environment", "changes", "secret", "backend"),
    [
        ({}, ["backend=openai", "model=gpt-4.1-mini"], True, "openai"),
        ({"REPORT_BACKEND": "openai", "OPENAI_API_KEY": "sk-dry-run"}, ["backend=offline"], False, "offline"),
        ({}, [], False, "offline"),
    ],
    ids=["configure-openai", "configure-offline", "offline"],
)
def test_a_deploy_ships_the_settings_in_force(tmp_path, environment, changes, secret, backend):
    """``runtime.configure(backend="openai")`` in a notebook, then a deploy: the key's secret goes with it."""
    result = deploy_dry_run(tmp_path, *changes, **environment)
    assert result["worker_secret"] is secret and result["formatter_secret"] is secret
    assert result["driver_secret"] is False
    assert result["worker_env"]["REPORT_BACKEND"] == result["driver_env"]["REPORT_BACKEND"] == backend
    if "model=gpt-4.1-mini" in changes:
        assert result["worker_env"]["REPORT_MODEL"] == "gpt-4.1-mini"
