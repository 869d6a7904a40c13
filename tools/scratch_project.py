"""A throwaway copy of the project, so a notebook runs against a fresh Flyte cache.

Flyte keeps its task cache in the project's ``.flyte/local-cache/``; a notebook
run in place shows cache hits from earlier runs. Saved notebook outputs and
their tests come from a copy with an empty cache instead, one per notebook, so
each notebook's outputs do not depend on what ran before it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("pipeline.py", "explorer.py")


def make_scratch_project(destination: Path) -> Path:
    """Copy the modules, the notebooks, the app and the Flyte config into ``destination`` (a git repo)."""
    destination.mkdir(parents=True, exist_ok=True)
    for module in MODULES:
        shutil.copy2(ROOT / module, destination / module)
    shutil.copytree(ROOT / "machinery", destination / "machinery", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    (destination / ".flyte").mkdir(exist_ok=True)
    shutil.copy2(ROOT / ".flyte" / "config.yaml", destination / ".flyte" / "config.yaml")
    shutil.copytree(ROOT / "notebooks", destination / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "reports"), dirs_exist_ok=True)
    # The web app (notebook 07 serves it; its tests run it): its notebook and page template.
    shutil.copytree(ROOT / "apps", destination / "apps",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"), dirs_exist_ok=True)
    # Flyte finds .flyte/config.yaml from a subfolder only through the git root.
    subprocess.run(["git", "init", "-q", str(destination)], check=True)
    return destination


def scratch_environment(project: Path, **overrides: str) -> dict[str, str]:
    """Offline, no API keys, and ``import pipeline`` resolving to the copy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "REPORT"))}
    env.update(
        PYTHONPATH=str(project),
        REPORT_BACKEND="offline",
        DO_NOT_TRACK="1",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
        JUPYTER_PLATFORM_DIRS="1",
    )
    env.update(overrides)
    return env
