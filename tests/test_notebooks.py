"""notebooks/: saved notebooks are clean, use today's API, give their time and prerequisites, answer every
"Try this" and check their claims with assertions, never printed booleans; nbval (strict) and papermill runs of
every notebook, each in a fresh copy of the project (slow: a kernel per run). Unit tests of what papermill's
parameters go through (``coerce_topics``, ``validate_batch``) are in test_inputs.py; here is only what a kernel
can show."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import notebook_nav
import pytest
from conftest import ROOT
from scratch_project import make_scratch_project, scratch_environment

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
BATCH = "05_batch_pipeline.ipynb"
EXECUTED = ROOT / "build" / "papermill"  # kept by CI as an artifact when a test fails
TRY_THIS = "**Try this:**"
WORKED_ANSWER = '# Worked answer to "Try this"'


# Names the refactor removed or renamed: a notebook using one would fail for a learner.
REMOVED_NAMES = [
    "pipeline.configure(", "pipeline.settings", "pipeline.init_flyte", "pipeline.requests_sent", "pipeline.get_client",
    "pipeline.make_client", "pipeline._clients", "pipeline._limit", "pipeline.config_fingerprint", "llm_cache",
    "REPORT_LLM_CACHE", "ResponseCache", "use_cache=", "import offline_llm", "import plumbing", "from plumbing",
    "from offline_llm", "python -m offline_llm", ".llm-cache",
]


@pytest.fixture(scope="module")
def matplotlib_font_cache():
    """Build matplotlib's font cache up front: its first-use notice would land in a notebook's stderr."""
    subprocess.run([sys.executable, "-c", "import matplotlib.pyplot"], check=True, capture_output=True)


def test_there_are_eight_ordered_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == ["00_", "01_", "02_", "03_", "04_", "05_", "06_", "07_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert "widgets" not in notebook.metadata, "widget state is volatile; it is not saved"
    text = path.read_text(encoding="utf-8")
    for volatile in (str(ROOT), "/tmp/", "nb-run-"):
        assert volatile not in text, f"{volatile!r} in saved notebook"
    assert not re.search(r"sk-[A-Za-z0-9_-]{16,}", text), "something that looks like an API key"
    assert not re.search(r'"model_id": "[0-9a-f]{32}"', text), "random widget ids churn on every save"
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code_cells), "run all cells before saving (tools/execute_notebooks.py)"
    assert [c.execution_count for c in code_cells] == list(range(1, len(code_cells) + 1)), "restart, then run all"
    assert not any(o.output_type == "error" for c in code_cells for o in c.outputs)
    assert "**What you will learn**" in notebook.cells[0].source
    closing = [c for c in notebook.cells if c.cell_type == "markdown" and not is_navigation(c)][-1]
    assert "## What you learned" in closing.source and TRY_THIS in closing.source
    after = notebook.cells[notebook.cells.index(closing) + 1:]
    assert [is_worked_answer(c) for c in after[:-1]] == [True] * (len(after) - 1) and is_navigation(after[-1]), \
        "after the closing cell: its worked answer, then the navigation"
    assert "import pipeline" in "\n".join(c.source for c in code_cells)


def is_navigation(cell: nbformat.NotebookNode) -> bool:
    return cell.cell_type == "markdown" and cell.source.startswith(notebook_nav.MARKER)


def is_worked_answer(cell: nbformat.NotebookNode) -> bool:
    return cell.cell_type == "code" and "solution" in cell.metadata.get("tags", [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_gives_time_and_prerequisites(path):
    minutes, prerequisites = notebook_nav.time_and_prerequisites(nbformat.read(path, as_version=4))
    assert 5 <= minutes <= 60 and prerequisites


def test_the_index_stops_on_a_notebook_without_its_time(tmp_path, monkeypatch, capsys):
    for path in NOTEBOOKS[:2]:
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    untimed = nbformat.read(tmp_path / NOTEBOOKS[1].name, as_version=4)
    untimed.cells[0].source = notebook_nav.TIME_LINE.sub("", untimed.cells[0].source)
    nbformat.write(untimed, tmp_path / NOTEBOOKS[1].name)
    monkeypatch.setattr(notebook_nav, "NOTEBOOKS", tmp_path)
    assert notebook_nav.main([]) == 2
    message = capsys.readouterr().err
    assert f"notebooks/{NOTEBOOKS[1].name}: its first cell needs one line of the form" in message
    assert "**Time:** about N minutes · **Prerequisites:** ..." in message and NOTEBOOKS[0].name not in message
    assert not (tmp_path / "README.md").exists(), "nothing written"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_try_this_has_a_worked_answer(path):
    """A collapsed code cell right after each "Try this", tagged `solution`, that does the exercise and asserts
    what it finds; the last one comes just before the navigation."""
    cells = nbformat.read(path, as_version=4).cells
    exercises = [i for i, c in enumerate(cells) if c.cell_type == "markdown" and TRY_THIS in c.source]
    assert exercises, "every notebook ends with a Try this"
    for index in exercises:
        answer = cells[index + 1]
        assert is_worked_answer(answer), f"cell {index + 1} should be the worked answer to the Try this above it"
        assert answer.metadata.get("jupyter", {}).get("source_hidden") is True, "collapsed, so readers try first"
        assert answer.source.splitlines()[0] == WORKED_ANSWER
        assert re.search(r"^assert ", answer.source, flags=re.MULTILINE), "it checks its result"
    answers = [i for i, c in enumerate(cells) if is_worked_answer(c)]
    assert answers == [i + 1 for i in exercises], "a worked answer follows a Try this, nowhere else"
    assert is_navigation(cells[answers[-1] + 1]) and answers[-1] + 2 == len(cells)


def shows_a_boolean(node: ast.expr) -> bool:
    """A comparison, `not`, `and`/`or`, all(), any() or bool(), or an f-string showing one."""
    if isinstance(node, (ast.Compare, ast.BoolOp)) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("all", "any", "bool"):
        return True
    if isinstance(node, ast.JoinedStr):
        return any(shows_a_boolean(part.value) for part in node.values if isinstance(part, ast.FormattedValue))
    return False


def boolean_claims(source: str) -> list[str]:
    """print(...) calls that show a boolean, and a cell's last expression when it is one: a claim that says False
    and carries on. (`x if a > b else y` shows a value, not a claim: not flagged.)"""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    text = "\n".join(lines)
    tree = compile(text, "<cell>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    claims = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "print" and any(shows_a_boolean(arg) for arg in node.args)]
    if tree.body and isinstance(tree.body[-1], ast.Expr) and shows_a_boolean(tree.body[-1].value):
        claims.append(tree.body[-1])
    return [ast.get_source_segment(text, node) for node in claims]


def test_boolean_claims_are_found_precisely():
    assert boolean_claims('print("fast:", speedup >= 2.5)\nx = 1') == ['print("fast:", speedup >= 2.5)']
    assert boolean_claims('print(f"same: {a == b}")') == ['print(f"same: {a == b}")']
    assert boolean_claims("print('all ok:', all(r.ok for r in rows))") != []
    assert boolean_claims("await run()\nlen(rows) > 2") == ["len(rows) > 2"]
    assert boolean_claims('assert a >= b, "claim"\nprint(f"{a:.2f} s", "on" if a > b else "off")') == []
    assert boolean_claims('print("index:", path)\nrows = [r for r in rows if r.ok]\nrows') == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_claims_are_assertions_not_printed_booleans(path):
    notebook = nbformat.read(path, as_version=4)
    claims = [claim for cell in notebook.cells if cell.cell_type == "code" for claim in boolean_claims(cell.source)]
    assert claims == [], "check a claim with assert, so a false one stops the notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_no_removed_name(path):
    notebook = nbformat.read(path, as_version=4)
    sources = "\n".join(cell.source for cell in notebook.cells)
    # An old import counts only as a statement of its own: `from machinery import offline_llm` is today's import.
    def used(name: str) -> bool:
        if name.startswith(("import ", "from ")):
            return re.search(r"(?m)^\s*" + re.escape(name), sources) is not None
        return name in sources

    assert [name for name in REMOVED_NAMES if used(name)] == []


@pytest.mark.slow
def test_navigation_and_index_are_up_to_date():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "notebook_nav.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("matplotlib_font_cache")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_reproduces_its_saved_outputs(path, tmp_path):
    """pytest --nbval (strict: every output compared) in a fresh project copy with an empty Flyte cache."""
    project = make_scratch_project(tmp_path / "project")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", "-p", "no:cacheprovider",
         "--nbval-sanitize-with", str(ROOT / "tests" / "nbval.cfg"), "-q", f"notebooks/{path.name}"],
        cwd=project, capture_output=True, text=True, timeout=600, env=scratch_environment(project),
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    code_cells = sum(1 for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert passed and int(passed.group(1)) == code_cells, done.stdout[-2000:]


def papermill(project: Path, name: str, *parameters: str, notebook: str = BATCH,
              **environment: str) -> tuple[subprocess.CompletedProcess, Path]:
    EXECUTED.mkdir(parents=True, exist_ok=True)
    output = EXECUTED / f"{name}.ipynb"
    done = subprocess.run(
        [sys.executable, "-m", "papermill", f"notebooks/{notebook}", str(output), "-k", "python3",
         "--cwd", "notebooks", "--no-progress-bar", *parameters],
        cwd=project, capture_output=True, text=True, timeout=600, env=scratch_environment(project, **environment),
    )
    return done, output


@pytest.mark.slow
@pytest.mark.usefixtures("matplotlib_font_cache")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_afresh_with_papermill(path, tmp_path):
    """Every notebook from top to bottom in a fresh project copy: a claim that does not hold fails its assert."""
    project = make_scratch_project(tmp_path / "project")
    done, executed_path = papermill(project, f"fresh-{path.stem}", notebook=path.name)
    assert done.returncode == 0, done.stderr[-4000:]
    executed = nbformat.read(executed_path, as_version=4)
    assert not [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


def run_folders(folder: Path) -> list[str]:
    """The run folders in a reports folder (``.work`` holds the tasks' work folders, not runs)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".work") if folder.exists() else []


@pytest.mark.slow
@pytest.mark.usefixtures("matplotlib_font_cache")
@pytest.mark.parametrize("topics", [["Rust"], ["Rust", "WebAssembly: the next decade", "Café culture ☕"]],
                         ids=["one-topic", "three-topics"])
def test_papermill_runs_the_batch_with_yaml_topics(topics, tmp_path):
    project = make_scratch_project(tmp_path / "project")
    out = tmp_path / "reports"
    yaml_topics = "topics: [" + ", ".join(json.dumps(t, ensure_ascii=False) for t in topics) + "]"
    done, executed_path = papermill(project, f"topics-{len(topics)}", "-y", yaml_topics, "-p", "output_dir",
                                    str(out), "-p", "run_id", "pm", "-p", "max_iterations", "3")
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "pm" / "summary.json").read_text(encoding="utf-8"))
    assert [row["topic"] for row in summary["topics"]] == topics
    assert summary["totals"]["succeeded"] == len(topics) and summary["totals"]["cached"] == 0
    for row in summary["topics"]:
        assert row["iterations"] <= 3 and row["status"] == "ok"
        for relative in row["files"].values():
            assert (out / "pm" / relative).stat().st_size > 0
    assert (out / "pm" / "index.html").exists()
    assert run_folders(out) == ["pm"], "the demo runs write to a temporary folder, not to output_dir"
    executed = nbformat.read(executed_path, as_version=4)
    injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "topics = [" in injected.source


@pytest.mark.slow
@pytest.mark.usefixtures("matplotlib_font_cache")
def test_papermill_writes_exactly_one_run_into_output_dir(tmp_path):
    """The batch is the only run the notebook keeps: its demos (a failing topic, a second run, the worked
    answer) write their runs and work folders into temporary folders and delete them."""
    project = make_scratch_project(tmp_path / "project")
    out, temporary = tmp_path / "reports", tmp_path / "tmp"
    temporary.mkdir()
    done, _ = papermill(project, "one-run", "-y", "topics: [Rust]", "-p", "output_dir", str(out), "-p", "run_id",
                        "only", "-p", "max_iterations", "1", TMPDIR=str(temporary))
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["only"]
    assert run_folders(project / "reports") == [], "nor into the default reports folder"
    assert len(list((project / "reports" / ".work").iterdir())) == 1, "one work folder: the one topic's"
    assert list(temporary.glob("notebook-05-*")) == [], "the temporary folders are gone"


@pytest.mark.slow
@pytest.mark.usefixtures("matplotlib_font_cache")
def test_papermill_reports_a_bad_parameter_clearly(tmp_path):
    """papermill's -p hands a list over as one string: one short error in the notebook, nothing written.
    Every other bad value gets the same treatment; their messages are unit-tested in test_inputs.py."""
    project = make_scratch_project(tmp_path / "project")
    message = "topics arrived as one string, 'Rust, WebAssembly'"
    done, executed_path = papermill(project, "bad-ambiguous-string", "-p", "topics", "Rust, WebAssembly",
                                    "-p", "output_dir", str(tmp_path / "reports"))
    assert done.returncode != 0
    executed = nbformat.read(executed_path, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "ValueError" and message in errors[0].evalue
    assert len(errors[0].traceback) <= 6, "a short traceback, not a wall"
    assert not (tmp_path / "reports").exists(), "nothing written for bad input"


@pytest.mark.slow
@pytest.mark.usefixtures("matplotlib_font_cache")
def test_papermill_accepts_a_single_topic_as_a_plain_string(tmp_path):
    project = make_scratch_project(tmp_path / "project")
    done, _ = papermill(project, "plain-string-topic", "-p", "topics", "Rust", "-p", "output_dir",
                        str(tmp_path / "reports"), "-p", "run_id", "one", "-p", "max_iterations", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "reports" / "one" / "summary.json").read_text(encoding="utf-8"))
    assert [row["topic"] for row in summary["topics"]] == ["Rust"]


@pytest.mark.slow
@pytest.mark.usefixtures("matplotlib_font_cache")
def test_the_readme_papermill_command_works_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if line.startswith(".venv/bin/papermill "))
    project = make_scratch_project(tmp_path / "project")
    (project / ".venv").symlink_to(Path(sys.executable).parents[1])
    done = subprocess.run(["bash", "-c", command], cwd=project, capture_output=True, text=True, timeout=600,
                          env=scratch_environment(project))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((project / "reports" / "notebook-05" / "summary.json").read_text(encoding="utf-8"))
    assert [row["topic"] for row in summary["topics"]] == ["Quantum computing", "Why cats purr"]
    assert all(row["iterations"] <= 4 for row in summary["topics"])
    assert (project / "out.ipynb").exists()
