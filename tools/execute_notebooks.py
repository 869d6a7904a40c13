"""Restart and run all: execute notebooks in a fresh copy of the project and save their outputs.

    python tools/execute_notebooks.py                      # every notebook
    python tools/execute_notebooks.py 03_refinement_loop   # some: a name, its start (03) or its file name

Outputs come from the offline model and an empty Flyte cache (see
scratch_project.py), so saving them again changes nothing unless the code
did. Volatile metadata (execution times, widget state) is not kept, nor the
outputs of cells tagged ``volatile-output`` (timings), and every notebook's
kernelspec is set to ``python3``. Prints each notebook's run time.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook_nav import notebook_paths  # noqa: E402
from scratch_project import make_scratch_project, scratch_environment  # noqa: E402

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
VOLATILE = "volatile-output"  # with nbval-ignore-output: run and shown live, never saved
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def normalize(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    notebook.metadata = {
        "kernelspec": dict(KERNELSPEC),
        "language_info": {"name": "python", "pygments_lexer": "ipython3"},
    }
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
        if VOLATILE in cell.metadata.get("tags", []):
            cell.outputs = []  # timings differ on every run: readers run the cell to see their own
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view:  # a random id per run; the widget state is not saved anyway
                view["model_id"] = f"saved-{cell.id}"
    return notebook


def execute(path: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="nb-run-") as scratch:
        project = make_scratch_project(Path(scratch) / "project")
        notebook = nbformat.read(project / "notebooks" / path.name, as_version=4)
        saved_env = dict(os.environ)
        os.environ.clear()
        os.environ.update(scratch_environment(project))
        try:
            started = time.perf_counter()
            client = NotebookClient(
                notebook, kernel_name="python3", timeout=300, store_widget_state=False, record_timing=False,
                resources={"metadata": {"path": str(project / "notebooks")}},
            )
            client.execute()
            elapsed = time.perf_counter() - started
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
    path.write_text(nbformat.writes(normalize(notebook)) + "\n", encoding="utf-8")
    return elapsed


def selected(names: list[str]) -> list[Path]:
    """The notebooks named (``03``, ``03_refinement_loop``, ``notebooks/03_refinement_loop.ipynb``), or all."""
    paths = notebook_paths()
    stems = [Path(name).name.removesuffix(".ipynb") for name in names]
    unknown = [name for name, stem in zip(names, stems) if not any(p.stem.startswith(stem) for p in paths)]
    if unknown:
        raise SystemExit(f"no notebook named {', '.join(unknown)}: use names like 03_refinement_loop")
    return [p for p in paths if not stems or any(p.stem.startswith(stem) for stem in stems)]


def main(names: list[str]) -> int:
    for path in selected(names):
        print(f"{path.name}: {execute(path):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
