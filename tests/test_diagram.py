"""tools/pipeline_diagram.py: the committed diagrams are what the script draws from pipeline.py today, every
name in them exists in pipeline.py (checked by reading the source, not through the script), every task, traced
function and group of pipeline.py is in them, and JupyterLab's Mermaid renders the diagram (slow: a browser)."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, SCREENSHOTS
from pipeline_diagram import BEGIN, END, mermaid, readme_block
from test_browser import WatchedPage, lab  # noqa: F401  (the JupyterLab fixture)

PIPELINE = (ROOT / "pipeline.py").read_text(encoding="utf-8")
README = ROOT / "README.md"
INDEX = ROOT / "notebooks" / "README.md"


def committed() -> str:
    """The diagram in README.md, without its markers."""
    return readme_block(README.read_text(encoding="utf-8")).removeprefix(BEGIN + "\n").removesuffix(END)


def labels(diagram: str) -> list[str]:
    return re.findall(r'"([^"]*)"', diagram)


def test_the_readme_diagram_is_what_the_script_draws():
    assert committed() == mermaid(), "out of date: run python tools/pipeline_diagram.py --write"


def test_the_notebook_index_shows_the_same_diagram():
    assert mermaid() in INDEX.read_text(encoding="utf-8"), "out of date: run python tools/notebook_nav.py"


def test_every_task_in_the_diagram_is_a_task_of_pipeline_py_in_its_environment():
    tasks = [re.match(r"task (\w+) · env ([\w-]+)(?: · retries=(\d+))?", label) for label in labels(mermaid())]
    tasks = [match for match in tasks if match]
    assert {match[1] for match in tasks} == {"report_batch_pipeline", "refine_report", "format_outputs"}
    for match in tasks:
        name, environment, retries = match.groups()
        decorator = re.search(rf"@(\w+)\.task(\([^)]*\))?\nasync def {name}\(", PIPELINE)
        assert decorator, f"{name} is not an @env.task in pipeline.py"
        assert re.search(rf'{decorator[1]} = flyte\.TaskEnvironment\(\n\s+name="{environment}"', PIPELINE)
        assert (f"retries={retries}" in (decorator[2] or "")) if retries else "retries" not in (decorator[2] or "")


def test_every_other_name_in_the_diagram_exists_in_pipeline_py():
    diagram = mermaid()
    traced = [label.removeprefix("trace ") for label in labels(diagram) if label.startswith("trace ")]
    groups = [label.split(" · ")[0].removeprefix("group ") for label in labels(diagram) if label.startswith("group ")]
    threads = [label.split(" · ")[0] for label in labels(diagram) if " · in a thread" in label]
    assert traced and groups and threads
    for name in traced:
        assert re.search(rf"@flyte\.trace\nasync def {name}\(", PIPELINE), name
    for name in groups:
        literal = f'flyte.group("{name}")' if not name.endswith("_N") else f'flyte.group(f"{name[:-1]}{{'
        assert literal in PIPELINE, name
    for name in threads:
        assert f"asyncio.to_thread({name}, " in PIPELINE and re.search(rf"\ndef {name}\(", PIPELINE), name
    for file_name in re.search(r"writes ([^\"]+)", diagram)[1].split(", "):
        assert f'"{file_name}": ' in PIPELINE, file_name
    driver = re.search(r"async def report_batch_pipeline\(\n\s+(.*?)\n\) -> ([^\n]+):\n", PIPELINE, flags=re.DOTALL)
    parameters = ", ".join(part.split(":")[0].strip() for part in driver[1].split(","))
    assert f'inputs[/"{parameters}"/]' in diagram and f'output[/"{driver[2]}"/]' in diagram
    assert "def run_batch(" in PIPELINE and 'saved[/"run_batch saves' in diagram


def test_every_task_traced_function_and_group_of_pipeline_py_is_in_the_diagram():
    diagram = mermaid()
    for name in re.findall(r"@\w+\.task(?:\([^)]*\))?\nasync def (\w+)\(", PIPELINE):
        assert f"task {name} · " in diagram, name
    for name in re.findall(r"@flyte\.trace\nasync def (\w+)\(", PIPELINE):
        assert f'"trace {name}"' in diagram, name
    for name in re.findall(r'flyte\.group\("(\w+)"\)', PIPELINE):
        assert f'"group {name}' in diagram, name
    for prefix in re.findall(r'flyte\.group\(f"(\w+)\{', PIPELINE):
        assert f'"group {prefix}N' in diagram, prefix


def test_the_diagram_follows_an_edit_of_pipeline_py():
    """Renaming a group, or adding a traced step to a task, changes the drawing: it cannot drift."""
    renamed = mermaid(PIPELINE.replace('flyte.group("format_all")', 'flyte.group("format_every_report")'))
    assert '"group format_every_report"' in renamed and "format_all" not in renamed
    extra_step = PIPELINE.replace(
        "        markdown = await write_draft(topic)\n",
        "        markdown = await write_draft(topic)\n        markdown = await polish_draft(topic, markdown)\n",
    ).replace("@flyte.trace\nasync def revise_draft(", "@flyte.trace\nasync def polish_draft(topic, draft):\n"
              "    return await call_llm('', draft)\n\n\n@flyte.trace\nasync def revise_draft(")
    drawn = mermaid(extra_step)
    assert 'polish_draft(["trace polish_draft"])' in drawn and "write_draft --> polish_draft" in drawn
    assert "write_draft & critique_draft & polish_draft" not in drawn
    assert re.search(r"& polish_draft .*-\.-> call_llm|polish_draft & .*-\.-> call_llm", drawn)


@pytest.mark.slow
def test_jupyterlab_renders_the_diagram(browser, lab):  # noqa: F811
    """notebooks/README.md in JupyterLab's Markdown preview: Mermaid draws the diagram, with no warning."""
    base, token, _ = lab
    watched = WatchedPage(browser)
    page = watched.page
    try:
        page.goto(f"{base}/lab?reset&token={token}")
        page.wait_for_function("() => window.jupyterapp?.commands.hasCommand('docmanager:open')")
        page.evaluate("async () => { await window.jupyterapp.restored; await window.jupyterapp.commands.execute("
                      "'docmanager:open', {path: 'notebooks/README.md', factory: 'Markdown Preview'}); }")
        diagram = page.locator(".jp-RenderedMermaid").first
        diagram.locator("img, svg").first.wait_for(timeout=60_000)
        assert "jp-mod-warning" not in (diagram.get_attribute("class") or "")
        diagram.screenshot(path=str(SCREENSHOTS / "pipeline-diagram.png"))
        assert watched.remote_requests == [], watched.remote_requests
    finally:
        watched.close()
