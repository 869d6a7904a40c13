"""machinery/cache_policy.py: Flyte cache keys that cover the whole module defining a task and the model.

Unit tests of the key, then the CLI end to end in a project of its own: a rerun is served by
Flyte's cache, an edited prompt is not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import flyte
import pytest
from conftest import subprocess_env
from scratch_project import make_scratch_project

import pipeline
from machinery import offline_llm
from machinery.cache_policy import CodeAndModelPolicy, code_and_model
from machinery.runtime import runtime


def module_file(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_the_key_covers_the_source_file(tmp_path):
    a = module_file(tmp_path, "a.py", 'PROMPT = "You are a report writer."\n')
    b = module_file(tmp_path, "b.py", 'PROMPT = "You are a careful report writer."\n')
    same_as_a = module_file(tmp_path, "c.py", 'PROMPT = "You are a report writer."\n')
    assert code_and_model(a) != code_and_model(b)
    assert code_and_model(a) == code_and_model(same_as_a), "the content counts, not the path"
    assert code_and_model(a) == code_and_model(a)


def test_the_key_covers_the_model(tmp_path, monkeypatch, api_key):
    source = module_file(tmp_path, "m.py", "x = 1\n")
    keys = {code_and_model(source)}
    with runtime.configured(backend="openai"):
        keys.add(code_and_model(source))
        with runtime.configured(model="gpt-4.1-mini"):
            keys.add(code_and_model(source))
        with offline_llm.OfflineServer(served_model="gpt-4o-mini") as server, \
                runtime.configured(base_url=server.base_url):  # the same model elsewhere
            keys.add(code_and_model(source))
    monkeypatch.setattr(offline_llm, "MODEL_VERSION", "offline-reporter-next")
    keys.add(code_and_model(source))
    assert len(keys) == 5


@pytest.mark.parametrize("limit", ["max_tokens_report", "max_tokens_critique", "max_tokens_summary"])
def test_the_key_covers_the_reply_limits(tmp_path, limit):
    """A reply limit changes what a model writes (a report cut short, a shorter retry): a new key."""
    source = module_file(tmp_path, "m.py", "x = 1\n")
    before = code_and_model(source)
    with runtime.configured(**{limit: getattr(runtime.settings, limit) + 1}):
        assert code_and_model(source) != before


def test_settings_that_do_not_change_replies_keep_the_key(tmp_path):
    source = module_file(tmp_path, "m.py", "x = 1\n")
    before = code_and_model(source)
    with runtime.configured(max_concurrency=1, request_timeout=5.0, client_retries=0, offline_latency=0.1,
                            reply_cache=None, run_history=True, reports_dir=tmp_path):
        assert code_and_model(source) == before
    with runtime.configured(model="ignored by the offline model"):
        assert code_and_model(source) == before


def test_a_task_defined_in_a_notebook_cell_has_a_key():
    assert code_and_model(None) != code_and_model(pipeline.__file__)
    assert len(code_and_model(None)) == 64


def test_the_policy_hashes_the_salt_and_the_tasks_whole_module():
    policy = CodeAndModelPolicy()
    refine = SimpleNamespace(func=pipeline.refine_report.func)
    formatting = SimpleNamespace(func=pipeline.format_outputs.func)
    assert policy.get_version("s", refine) == policy.get_version("s", formatting), "one module, one code key"
    assert policy.get_version("s", refine) != policy.get_version("t", refine)
    with runtime.configured(backend="openai"):
        switched = policy.get_version("s", refine)
    assert switched != policy.get_version("s", refine), "another model, another key"
    assert policy.get_version("s", refine) == CodeAndModelPolicy().get_version("s", refine), "stateless"


def test_the_pipelines_tasks_use_the_policy():
    cache = pipeline.llm_env.cache
    assert isinstance(cache, flyte.Cache) and cache.behavior == "auto"
    assert any(isinstance(policy, CodeAndModelPolicy) for policy in cache.policies)
    for task in (pipeline.refine_report, pipeline.format_outputs):
        assert any(isinstance(policy, CodeAndModelPolicy) for policy in task.cache.policies), task.name


def test_the_work_folder_follows_the_code_and_model_key(tmp_path):
    from pipeline import RefineResult, Round, Usage

    result = RefineResult(topic="Cats", markdown="# Cats\n", history=[
        Round(iteration=1, score=8, strengths=[], improvements=[], summary="ok")], model="m", usage=Usage())
    with runtime.configured(reports_dir=tmp_path):
        offline = pipeline.work_folder(result, "2026-11-29")
        assert offline.parent == tmp_path / ".work" and offline.name.startswith("cats-")
        assert pipeline.work_folder(result, "2026-11-29") == offline
        assert pipeline.work_folder(result, "2026-11-30") != offline
        with runtime.configured(backend="openai"):
            assert pipeline.work_folder(result, "2026-11-29") != offline


@pytest.mark.slow
def test_cache_hits_on_rerun_and_misses_when_a_prompt_changes(tmp_path):
    """Run the CLI in a project of its own, twice, then with an edited prompt."""
    project = make_scratch_project(tmp_path / "project")

    def run(run_id):
        done = subprocess.run([sys.executable, "pipeline.py", "Cats", "Dogs", "--out", "out", "--run-id", run_id,
                               "--date", "2026-11-29"], cwd=project, capture_output=True, text=True, timeout=300,
                              env=subprocess_env(PYTHONPATH=str(project), REPORT_REPLY_CACHE=""))  # the default
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads((project / "out" / run_id / "summary.json").read_text(encoding="utf-8"))["totals"]

    first, second = run("first"), run("second")
    assert first["cached"] == 0 and first["llm_usage"]["requests"] > 2
    assert second["cached"] == 2, "both topics from Flyte's task cache"
    assert second["llm_usage"]["requests"] == second["llm_usage"]["cache_hits"] == 0, "formatting is cached too"
    assert (project / ".flyte" / "local-cache" / "cache.db").exists()
    assert (project / ".reply-cache" / "replies.sqlite3").exists(), "the default reply cache, in the project"

    source = (project / "pipeline.py").read_text(encoding="utf-8")
    edited = source.replace("You are a report writer.", "You are a careful report writer.")
    assert edited != source
    (project / "pipeline.py").write_text(edited, encoding="utf-8")
    third = run("third")
    assert third["cached"] == 0, "an edited prompt invalidates the task cache"
    # Only requests that changed are sent: the two drafts. The offline model writes the same draft
    # for the new wording, so every later request is identical to the first run's and reused.
    assert third["llm_usage"]["requests"] == 2
    assert third["llm_usage"]["cache_hits"] == first["llm_usage"]["requests"] - 2

    (project / "pipeline.py").write_text(edited + "\n# an edit that changes no behaviour\n", encoding="utf-8")
    fourth = run("fourth")
    assert fourth["cached"] == 0, "any edit of the module is a new key"
    assert fourth["llm_usage"]["requests"] == 0, "and every model call is answered by the reply cache"
