"""Project hygiene: declared dependencies agree, docs fragments are well formed."""

from __future__ import annotations

import re
from pathlib import Path
import tomllib

import yaml
from conftest import ROOT


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    assert set(pip_section) - {"-e ."} == declared
    assert "-e ." in pip_section
    assert "python=3.12" in environment["dependencies"]


def test_constraints_pin_every_declared_dependency():
    pinned = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        name = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower()
        assert name in pinned, requirement


def test_docs_fragments_are_balanced_and_unique():
    for module in ("pipeline.py",):
        text = (ROOT / module).read_text()
        opened = re.findall(r"# \{\{docs-fragment ([\w-]+)\}\}", text)
        closed = re.findall(r"# \{\{/docs-fragment ([\w-]+)\}\}", text)
        assert opened == closed, (module, opened, closed)
        assert len(opened) == len(set(opened))


def test_flyte_cache_of_the_test_session_is_isolated_from_the_project(tmp_path):
    import pipeline
    from conftest import SCRATCH
    from flyte._persistence._db import LocalDB

    pipeline.run_batch(["Isolation check"], max_iterations=1, output_dir=tmp_path, run_id="iso")
    assert (SCRATCH / ".flyte" / "local-cache").resolve() == Path(LocalDB._get_cache_dir()).resolve()


def test_run_history_is_recorded_only_when_switched_on(tmp_path):
    import sqlite3

    import pipeline
    from conftest import SCRATCH

    def recorded(batch) -> int:
        database = SCRATCH / ".flyte" / "local-cache" / "cache.db"
        if not database.exists():
            return 0
        with sqlite3.connect(database) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "runs" not in tables:
                return 0
            return db.execute("SELECT COUNT(*) FROM runs WHERE run_name = ?", (batch.flyte_run_name,)).fetchone()[0]

    assert pipeline.settings.run_history is False
    quiet = pipeline.run_batch(["History off"], max_iterations=1, output_dir=tmp_path, run_id="off", use_cache=False)
    pipeline.configure(run_history=True)
    try:
        loud = pipeline.run_batch(["History on"], max_iterations=1, output_dir=tmp_path, run_id="on", use_cache=False)
    finally:
        pipeline.configure(run_history=False)
        pipeline.init_flyte()
    assert recorded(quiet) == 0
    assert recorded(loud) >= 8  # the driver twice, two tasks, and the traced calls
