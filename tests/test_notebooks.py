"""notebooks/: saved notebooks are clean and use today's API; nbval (strict) and papermill runs, each in a
fresh copy of the project (slow: a kernel per run). Unit tests of what papermill's parameters go through
(``coerce_topics``, ``validate_batch``) are in test_inputs.py; here is only what a kernel can show."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT
from scratch_project import make_scratch_project, scratch_environment

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
BATCH = "05_batch_pipeline.ipynb"
EXECUTED = ROOT / "build" / "papermill"  # kept by CI as an artifact when a test fails


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


def test_there_are_seven_ordered_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == ["00_", "01_", "02_", "03_", "04_", "05_", "06_"]


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
    first = notebook.cells[0].source
    last = "\n".join(c.source for c in notebook.cells[-3:] if c.cell_type == "markdown")
    assert "**What you will learn**" in first
    assert "## What you learned" in last and "**Try this:**" in last
    assert "import pipeline" in "\n".join(c.source for c in code_cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_no_removed_name(path):
    notebook = nbformat.read(path, as_version=4)
    sources = "\n".join(cell.source for cell in notebook.cells)
    assert [name for name in REMOVED_NAMES if name in sources] == []


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


def papermill(project: Path, name: str, *parameters: str) -> tuple[subprocess.CompletedProcess, Path]:
    EXECUTED.mkdir(parents=True, exist_ok=True)
    output = EXECUTED / f"{name}.ipynb"
    done = subprocess.run(
        [sys.executable, "-m", "papermill", f"notebooks/{BATCH}", str(output), "-k", "python3",
         "--cwd", "notebooks", "--no-progress-bar", *parameters],
        cwd=project, capture_output=True, text=True, timeout=600, env=scratch_environment(project),
    )
    return done, output


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
    assert (out / "pm" / "index.html").exists() and (out / "pm-again" / "summary.json").exists()
    executed = nbformat.read(executed_path, as_version=4)
    injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "topics = [" in injected.source


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
