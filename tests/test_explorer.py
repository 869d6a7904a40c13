"""explorer.py: the notebooks' views, without a browser (test_browser.py drives the explorer in JupyterLab).

The explorer: a progress bar that moves step by step, file links only where a browser can open them,
results of an earlier run marked as such after an error, right-to-left topics isolated in <bdi>, and
text and HTML beside the widget for places where widgets do not run. The critique chart's whole-round
ticks. The run tree, read from Flyte's local run history of real runs in local mode.
"""

from __future__ import annotations

import ast
import html
import json
import os
import re

import flyte
import nbformat
import pytest
from conftest import ROOT
from helpers import scripted_model

import explorer
import pipeline
from machinery.runtime import runtime

# Topics no other test file uses: Flyte's task cache is shared by the whole test session.
TOPICS = ["Explorer: tide pools", "مرحبا بالعالم", "<b>Explorer</b> & co"]
DATE = "2026-11-29"


# ----------------------------------------------------------------------------------------- progress


def test_steps_of_a_topic_that_stops_early_never_go_back():
    events = [("draft", None), ("critique", 1), ("scored", 1), ("revise", 1), ("critique", 2), ("scored", 2),
              ("format", None), ("done", None)]
    done = [explorer.steps_done({"step": step, "iteration": round_}, 3) for step, round_ in events]
    assert done == [0, 1, 2, 2, 3, 4, 6, 7]
    assert explorer.topic_steps(3) == 7 and explorer.steps_done({"step": "error"}, 3) == 7
    assert explorer.steps_done({"step": "something new"}, 3) is None


@pytest.fixture(scope="module")
def explored(tmp_path_factory):
    """One explorer run of three topics, with every progress bar value it showed and the events so far."""
    ui = explorer.ReportExplorer(TOPICS, 3, 9, report_date=DATE, output_dir=tmp_path_factory.mktemp("ui"),
                                 run_id="ui")
    seen: list[tuple[int, int, int]] = []  # (value, max, topics reported done or failed so far)
    ui.progress.observe(lambda change: seen.append((
        change["new"], ui.progress.max, sum(e["step"] in ("done", "error") for e in ui.events))), names="value")
    batch = ui.run(ui.topics_box.value)
    return ui, batch, seen


def test_the_progress_bar_moves_during_the_run_and_ends_full(explored):
    ui, batch, seen = explored
    assert all(report.ok for report in batch.reports)
    full = len(TOPICS) * explorer.topic_steps(3)
    assert {maximum for _, maximum, _ in seen} == {full}, "the scale is known before the first event"
    values = [value for value, _, _ in seen]
    assert values == sorted(values) and values[-1] == full == ui.progress.value
    before_any_done = [value for value, _, done in seen if done == 0]
    assert len(set(before_any_done)) > len(TOPICS), "it moves step by step, not only when topics finish"
    # Every topic formatted, none reported done yet: only the "done" steps are missing.
    assert max(before_any_done) == full - len(TOPICS)
    assert ui.progress.description == f"{len(TOPICS)} / {len(TOPICS)}"


# ----------------------------------------------------------------------------------------- file links


def test_links_point_into_the_folder_the_jupyter_server_serves(tmp_path):
    server = {"root": tmp_path.resolve(), "base_url": "/user/ada/"}
    inside = tmp_path / "reports" / "run one" / "report.md"
    assert explorer.file_href(inside, server) == "/user/ada/files/reports/run%20one/report.md"
    assert explorer.file_href(tmp_path.parent / "elsewhere" / "report.md", server) is None


def test_without_a_server_only_files_below_the_working_folder_are_linked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert explorer.file_href(tmp_path / "reports" / "a.md") == "reports/a.md"
    assert explorer.file_href(tmp_path.parent / "a.md") is None
    shown = explorer.files_html([("a.md", tmp_path.parent / "x" / "a.md")], tmp_path.parent / "x")
    assert "<a " not in shown and f"<code>{tmp_path.parent / 'x'}</code>" in shown


def test_the_kernel_finds_the_server_that_started_it(tmp_path, monkeypatch):
    runtime_dir = tmp_path / "runtime"
    runtime_dir.mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime_dir))
    assert explorer.jupyter_server() is None
    (runtime_dir / f"jpserver-{os.getppid() + 1}.json").write_text(json.dumps({"root_dir": "/elsewhere"}))
    assert explorer.jupyter_server() is None, "another server's file"
    (runtime_dir / f"jpserver-{os.getppid()}.json").write_text(
        json.dumps({"root_dir": str(tmp_path), "base_url": "/lab-base/", "token": "not-read"}))
    assert explorer.jupyter_server() == {"root": tmp_path.resolve(), "base_url": "/lab-base/"}


def test_the_files_tab_links_only_what_can_be_opened(explored):
    ui, batch, _ = explored
    ui.server = None  # the tests' working folder is not above the output folder: no link would work
    ui._show(TOPICS[0])
    assert "<a " not in ui.files_view.value
    assert f"<code>{batch.run_dir}</code>" in ui.files_view.value and "report.md" in ui.files_view.value
    ui.server = {"root": batch.run_dir.parent, "base_url": "/"}
    ui._show(TOPICS[0])
    hrefs = re.findall(r'href="([^"]*)"', ui.files_view.value)
    slug = batch.reports[0].slug
    assert hrefs == [f"/files/ui/{slug}/report.md", f"/files/ui/{slug}/report.html", f"/files/ui/{slug}/summary.txt",
                     "/files/ui/index.html"]


# ----------------------------------------------------------------------------------------- the critique chart


@pytest.mark.parametrize("scores", [[7], [4, 7, 9]], ids=["one-round", "three-rounds"])
def test_the_chart_shows_whole_rounds_only(scores):
    axes = explorer.score_chart({"topic": scores}).axes[0]
    low, high = axes.get_xlim()
    shown = [tick for tick in axes.get_xticks() if low <= tick <= high]
    assert shown == list(range(1, len(scores) + 1))


# ----------------------------------------------------------------------------------------- after an error


@pytest.fixture
def one_run(tmp_path):
    ui = explorer.ReportExplorer(["Explorer: one run"], 1, 8, report_date=DATE, output_dir=tmp_path, run_id="first")
    ui.run(ui.topics_box.value)
    assert "Results of run first" in ui.results_note.value
    return ui


def test_a_bad_input_marks_the_results_on_screen_as_an_earlier_runs(one_run):
    ui = one_run
    with pytest.raises(ValueError, match="topics is empty"):
        ui.run("")
    assert "topics is empty" in ui.message.value and "#cf222e" in ui.message.value
    assert "The last Run failed" in ui.results_note.value and "earlier runs" in ui.results_note.value
    assert ui.progress.description == "0 / 0" and "<td" not in ui.progress_table.value
    assert "Explorer: one run" in ui.results_table.value and "<bdi>first</bdi>" in ui.results_table.value, \
        "each row says which run it comes from"
    assert not ui.run_button.disabled


def test_a_click_with_bad_input_shows_the_message_and_marks_the_results(one_run):
    ui = one_run
    ui.topics_box.value = "Fine\nFine"
    ui._clicked(ui.run_button)  # what the Run button does: no exception escapes into the page
    assert "repeats topic #1" in ui.message.value and "The last Run failed" in ui.results_note.value


# The explorer's box is one topic per line, whatever a line contains: papermill's string rules (a line with commas
# is ambiguous, one starting with "[" is a YAML list) are for `-p topics "..."`, not for what a person types.
TYPED = [
    ("Salt, fat, acid and heat", ["Salt, fat, acid and heat"]),
    ("[Draft] Tea", ["[Draft] Tea"]),
    ("  [Draft] Tea  \n\n Salt, fat, acid and heat \n", ["[Draft] Tea", "Salt, fat, acid and heat"]),
]


@pytest.mark.parametrize(("typed", "topics"), TYPED, ids=["commas", "bracket", "two-lines"])
def test_a_click_runs_each_typed_line_as_one_topic(typed, topics, tmp_path, monkeypatch):
    ran = []

    def recording(checked, **options):
        ran.append(checked)
        raise RuntimeError("recorded, not run")

    monkeypatch.setattr(pipeline, "run_batch", recording)
    ui = explorer.ReportExplorer(output_dir=tmp_path)
    ui.topics_box.value = typed
    ui.run_button.click()
    assert ran == [topics], ui.message.value
    assert explorer.click_inputs(ui)[0] == topics


def test_a_click_on_a_typed_topic_with_a_bracket_and_commas_runs_it(tmp_path):
    ui = explorer.ReportExplorer(max_iterations=1, report_date=DATE, output_dir=tmp_path, run_id="typed")
    ui.topics_box.value = " [Draft] Explorer: salt, fat, acid and heat \n"
    ui.run_button.click()
    assert ui.last_batch is not None, ui.message.value
    assert [report.topic for report in ui.last_batch.reports] == ["[Draft] Explorer: salt, fat, acid and heat"]
    assert ui.message.value.startswith("Finished: 1 of 1 topics succeeded")


@pytest.mark.parametrize(("typed", "message"), [
    ("\n  \n", "topics is empty"),
    ("Salt, fat\n  Salt, fat ", "topic #2 'Salt, fat' repeats topic #1"),
    ("[Draft]\n" + "x" * 201, "topic #2 is 201 characters long"),
], ids=["blank", "repeated", "too-long"])
def test_typed_topics_still_get_the_usual_checks(typed, message, tmp_path):
    ui = explorer.ReportExplorer(output_dir=tmp_path)
    ui.topics_box.value = typed
    ui.run_button.click()
    assert html.escape(message) in ui.message.value and ui.last_batch is None


def test_on_a_cluster_a_click_starts_each_typed_line_as_one_topic(tmp_path):
    started = []
    app = explorer.ExplorerApp(tmp_path, target="cluster",
                               start_run=lambda name, inputs: started.append(inputs["topics"]) or "r-1")
    for typed, topics in TYPED:
        app.explorer.topics_box.value = typed
        app.explorer.run_button.click()
        assert started[-1:] == [topics], app.explorer.message.value


def test_a_string_in_a_call_is_still_read_as_papermill_reads_it(tmp_path):
    ui = explorer.ReportExplorer(output_dir=tmp_path)
    with pytest.raises(ValueError, match="one topic or several"):
        ui.run("Salt, fat, acid and heat")


def test_an_unexpected_failure_marks_them_too(one_run, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "run_batch", broken)
    with pytest.raises(RuntimeError):
        one_run.run("Another topic")
    assert "The run failed: RuntimeError: disk full" in one_run.message.value
    assert "The last Run failed" in one_run.results_note.value


def test_a_new_run_says_which_results_are_its_own(one_run):
    one_run.run("Explorer: second run")
    assert "Results of run first-2, and of 1 topic from earlier runs." in one_run.results_note.value


# ----------------------------------------------------------------------------------------- right-to-left topics


def test_every_table_cell_is_isolated_in_bdi():
    markup = explorer.Table(["topic", "score"], [["שלום עולם", 7], ["<b>x</b>", None]])._repr_html_()
    assert "<bdi>שלום עולם</bdi>" in markup and "<bdi>7</bdi>" in markup
    assert "<bdi>&lt;b&gt;x&lt;/b&gt;</bdi>" in markup and "<b>x</b>" not in markup


def test_the_explorer_shows_topics_in_bdi(explored):
    ui, _, _ = explored
    ui._show(TOPICS[1])
    for markup in (ui.progress_table.value, ui.results_table.value, ui.files_view.value, ui._static_html()):
        assert f"<bdi>{TOPICS[1]}</bdi>" in markup
    assert "<b>Explorer</b>" not in ui.results_table.value + ui._static_html(), "escaped"


def test_marks_that_reorder_text_never_reach_the_explorer(tmp_path):
    ui = explorer.ReportExplorer(output_dir=tmp_path)
    with pytest.raises(ValueError, match="reorders text"):
        ui.run(["evil\u202etxt.exe"])


# ----------------------------------------------------------------------------------------- where widgets don't run


def test_a_saved_explorer_reads_well_without_widgets(tmp_path):
    ui = explorer.ReportExplorer(["Quantum computing", TOPICS[2]], 4, 9, output_dir=tmp_path)
    bundle = ui._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"] == (
        "Report explorer (interactive in JupyterLab with a running kernel): 2 topics, up to 4 rounds, threshold 9\n"
        "No run yet: press Run, or call .run(topics).")
    assert "VBox" not in bundle["text/plain"]
    assert "<li><bdi>&lt;b&gt;Explorer&lt;/b&gt; &amp; co</bdi></li>" in bundle["text/html"]


def test_after_a_run_it_shows_the_results_table(explored):
    ui, batch, _ = explored
    bundle = ui._repr_mimebundle_()
    assert bundle["text/plain"].splitlines()[1].startswith("Last run ui: 3 of 3 topics succeeded")
    assert repr(explorer.results_table(batch)) in bundle["text/plain"]
    assert explorer.results_table(batch)._repr_html_() in bundle["text/html"]


def test_the_notebook_tool_still_fixes_the_widget_id(tmp_path):
    from execute_notebooks import normalize

    ui = explorer.ReportExplorer(["Quantum computing"], output_dir=tmp_path)
    cell = nbformat.v4.new_code_cell("ui", id="05-13")
    cell.outputs = [nbformat.v4.new_output("execute_result", data=ui._repr_mimebundle_(), execution_count=1)]
    notebook = normalize(nbformat.v4.new_notebook(cells=[cell]))
    saved = nbformat.writes(notebook)
    assert '"model_id": "saved-05-13"' in saved
    assert not re.search(r"[0-9a-f]{32}", saved), "no random id in the saved output"


# ----------------------------------------------------------------------------------------- the run tree


def test_the_run_history_is_where_flyte_keeps_it():
    from flyte._persistence._db import LocalDB

    assert explorer.run_history_path() == (LocalDB._get_cache_dir() / "cache.db").resolve()


ONE_TOPIC_TWO_ROUNDS = """\
report_batch_pipeline                      succeeded
├─ refine_all (group)                      succeeded
│  └─ refine_report: Run tree, one topic   succeeded
│     ├─ write_draft                       succeeded
│     │  └─ call_llm                       succeeded
│     ├─ refinement_1 (group)              succeeded
│     │  ├─ critique_draft                 succeeded
│     │  │  └─ call_llm                    succeeded
│     │  └─ revise_draft                   succeeded
│     │     └─ call_llm                    succeeded
│     └─ refinement_2 (group)              succeeded
│        └─ critique_draft                 succeeded
│           └─ call_llm                    succeeded
└─ format_all (group)                      succeeded
   └─ format_outputs: Run tree, one topic  succeeded
      └─ formatting (group)                succeeded
         └─ summarize_report               succeeded
            └─ call_llm                    succeeded"""


def recorded_batch(topics, out, run_id, **options):
    with runtime.configured(run_history=True):
        return pipeline.run_batch(topics, report_date=DATE, output_dir=out, run_id=run_id, **options)


def test_a_batch_shows_its_groups_nested(tmp_path):
    batch = recorded_batch(["Run tree, one topic"], tmp_path, "tree", max_iterations=2, quality_threshold=10,
                           flyte_cache=False)
    assert batch.reports[0].result.iterations == 2
    tree = explorer.run_tree(batch)
    assert repr(tree) == ONE_TOPIC_TWO_ROUNDS
    assert batch.flyte_run_name not in repr(tree) + tree._repr_html_(), "no run id in what a notebook saves"
    round_2 = tree.find("refine_all (group)", "refine_report: Run tree, one topic", "refinement_2 (group)")
    assert [node.label for _, node in round_2.walk()] == ["refinement_2 (group)", "critique_draft", "call_llm"]
    assert repr(explorer.run_tree(batch.flyte_run_name)) == repr(tree), "by name as well"


def test_failures_retries_of_the_critic_and_order_of_topics(tmp_path):
    hostile = '<img src=x onerror="alert(1)"> tree'

    def broken_critic(role, topic, content):
        return '{"score": 11}' if role == "critic" and topic == "Run tree: broken" else None

    with scripted_model(broken_critic):
        batch = recorded_batch(["Run tree: broken", hostile], tmp_path, "failing", max_iterations=2,
                               quality_threshold=10, flyte_cache=False)
    tree = explorer.run_tree(batch)
    refine_all = tree.find("refine_all (group)")
    assert [node.label for node in refine_all.children] == ["refine_report: Run tree: broken",
                                                            f"refine_report: {hostile}"], "in the order given"
    assert refine_all.status == "failed" and tree.root.status == "succeeded", "one topic failed, not the batch"
    broken = refine_all.children[0]
    assert broken.status == "failed" and broken.note.startswith("CritiqueError: The critic's reply for")
    critique = broken.child("refinement_1 (group)").child("critique_draft")
    assert critique.status == "failed" and "invalid twice" in critique.error
    assert [node.label for node in critique.children] == ["call_llm #1", "call_llm #2"], "the repair request"
    assert [node.label for node in tree.find("format_all (group)").children] == [f"format_outputs: {hostile}"]
    markup = tree._repr_html_()
    assert "<img" not in markup and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt; tree" in markup
    assert 'title="Error(err=code: &quot;CritiqueError&quot;' in markup


def test_a_cache_hit_has_no_calls_under_it(tmp_path):
    recorded_batch(["Run tree: cached"], tmp_path, "fill", max_iterations=1)
    again = recorded_batch(["Run tree: cached"], tmp_path, "hit", max_iterations=1)
    assert repr(explorer.run_tree(again)) == """\
report_batch_pipeline                   succeeded
├─ refine_all (group)                   succeeded
│  └─ refine_report: Run tree: cached   succeeded, cache hit
└─ format_all (group)                   succeeded
   └─ format_outputs: Run tree: cached  succeeded, cache hit"""


def test_a_task_run_on_its_own(tmp_path):
    with runtime.configured(run_history=True):
        runtime.init_flyte()
        run = flyte.with_runcontext(mode="local", disable_run_cache=True).run(
            pipeline.refine_report, topic="Run tree: one task", max_iterations=2, quality_threshold=10)
    tree = explorer.run_tree(run)
    assert tree.root.label == "refine_report: Run tree: one task"
    assert [node.label for node in tree.root.children] == ["write_draft", "refinement_1 (group)",
                                                           "refinement_2 (group)"]


def test_a_run_made_without_the_history_is_explained(tmp_path):
    with runtime.configured(run_history=False):
        batch = pipeline.run_batch(["Run tree: not recorded"], max_iterations=1, report_date=DATE,
                                   output_dir=tmp_path, run_id="off")
    with pytest.raises(LookupError, match=r"run_history=True"):
        explorer.run_tree(batch)
    with pytest.raises(LookupError, match="has no run named"):
        explorer.run_tree("no-such-run", database=tmp_path / "missing.db")
    with pytest.raises(TypeError):
        explorer.run_tree(42)


def traced_groups_in_pipeline() -> dict[str, tuple[str, str, frozenset[str]]]:
    """From pipeline.py's text: task -> (group name, first traced call in the group, traced calls in it)."""
    module = ast.parse((ROOT / "pipeline.py").read_text(encoding="utf-8"))
    traced = {node.name for node in module.body if isinstance(node, ast.AsyncFunctionDef)
              and any(ast.unparse(d) == "flyte.trace" for d in node.decorator_list)}
    found = {}
    for function in module.body:
        if not isinstance(function, ast.AsyncFunctionDef):
            continue
        for block in ast.walk(function):
            group = next((item.context_expr for item in getattr(block, "items", [])
                          if ast.unparse(item.context_expr).startswith("flyte.group(")), None)
            if group is None:
                continue
            calls = [node.func.id for statement in block.body for node in ast.walk(statement)
                     if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in traced]
            if calls:  # groups of sub-tasks (refine_all, format_all) are recorded by Flyte itself
                name = group.args[0]
                parts = [name] if isinstance(name, ast.Constant) else name.values  # "formatting", f"refinement_{i}"
                pattern = "".join(part.value if isinstance(part, ast.Constant) else "{n}" for part in parts)
                found[function.name] = (pattern, calls[0], frozenset(calls))
    return found


def test_groups_of_traced_calls_match_pipeline_py():
    assert traced_groups_in_pipeline() == explorer.TRACED_GROUPS


def test_a_rate_limit_pause_is_a_batch_message_not_a_topic_row():
    ui = explorer.ReportExplorer(["Cats"])
    ui._on_event({"topic": None, "step": "rate-limited", "seconds": 2.0,
                  "reason": "HTTP 429 from the server, retry after 2.0 s <b>"})
    assert None not in ui.progress_rows
    assert "Waiting 2.0 s for the server&#x27;s rate limit" in ui.message.value
    assert "<b>" not in ui.message.value, "the server's words are escaped"


def test_a_calls_waits_show_in_the_step_column_without_moving_the_bar():
    ui = explorer.ReportExplorer(["Cats"], 2)
    ui.progress_rows = {"Cats": {"step": "waiting", "iteration": "", "score": "", "error": "", "done": 0}}
    shown = []
    for event in [
        {"step": "draft"},
        {"step": "still-waiting", "call": "draft", "seconds": 10.0},
        {"step": "retrying", "call": "draft", "attempt": 2, "attempts": 4, "reason": "HTTP 503 from the server"},
        {"step": "cut-off", "call": "draft", "limit": 1500},
        {"step": "critique", "iteration": 1},
        {"step": "timed-out", "call": "critique", "seconds": 120.0},
        {"step": "gave-up", "call": "critique", "attempts": 4, "reason": "HTTP 500 from the server", "task_attempt": 0},
    ]:
        ui._on_event({"topic": "Cats", **event})
        shown.append((ui.progress_rows["Cats"]["step"], ui.progress_rows["Cats"]["done"]))
    assert shown == [("writing the draft", 0), ("waiting for the model (over 10 s)", 0),
                     ("retrying the draft (attempt 2)", 0), ("the draft was cut off", 0), ("critique", 1),
                     ("the critique timed out", 1),
                     ("the critique failed after 4 attempts: Flyte retries the task if it has a retry left", 1)]
    assert "failed after 4 attempts" in ui.progress_table.value, "the table shows the latest"
    assert all(explorer.steps_done({"step": step}, 2) is None
               for step in ("still-waiting", "retrying", "cut-off", "timed-out", "gave-up")), "not steps: the bar stays"


def test_a_reply_from_another_model_is_a_batch_message_not_a_topic_row():
    ui = explorer.ReportExplorer(["Cats"])
    ui._on_event({"topic": None, "step": "other-model", "reported": "llama-3-8b", "recorded": "qwen"})
    assert None not in ui.progress_rows
    assert ui.message.value == "The server answered as model llama-3-8b, not qwen (see summary.json)"
