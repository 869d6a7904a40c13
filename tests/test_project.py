"""Project hygiene: declared dependencies agree, pipeline.py stays a readable tutorial text whose
docs fragments the notebooks show, imports only go down (pipeline -> machinery), the test session is isolated."""

from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

PIPELINE = ROOT / "pipeline.py"
MACHINERY = sorted((ROOT / "machinery").glob("*.py"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FRAGMENT = re.compile(r"# \{\{docs-fragment ([\w-]+)\}\}\n(.*?)# \{\{/docs-fragment \1\}\}", re.DOTALL)
MAX_FRAGMENT_LINES = 60


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


def test_the_package_declares_every_machinery_module():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools["py-modules"]) == {"pipeline", "explorer"}
    assert setuptools["packages"] == ["machinery"] and (ROOT / "machinery" / "__init__.py").exists()


# ----------------------------------------------------------------------------------------- pipeline.py, the text


def fragments() -> dict[str, str]:
    return {match.group(1): match.group(2) for match in FRAGMENT.finditer(PIPELINE.read_text(encoding="utf-8"))}


def shown_by_notebooks() -> dict[str, list[str]]:
    """Fragment name -> the notebooks whose code cells call explorer.show_source(name) or explorer.fragment(name)."""
    shown: dict[str, list[str]] = {}
    call = re.compile(r"""explorer\.(?:show_source|fragment)\(\s*["']([\w-]+)["']""")
    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                for name in call.findall(source):
                    shown.setdefault(name, []).append(path.name)
    return shown


def test_docs_fragments_are_balanced_and_unique():
    text = PIPELINE.read_text(encoding="utf-8")
    opened = re.findall(r"# \{\{docs-fragment ([\w-]+)\}\}", text)
    closed = re.findall(r"# \{\{/docs-fragment ([\w-]+)\}\}", text)
    assert opened == closed, (opened, closed)
    assert len(opened) == len(set(opened))
    assert list(fragments()) == opened, "no fragment inside another"


@pytest.mark.parametrize("name", list(fragments()))
def test_each_docs_fragment_is_short_and_shown_by_a_notebook(name):
    lines = fragments()[name].rstrip("\n").count("\n") + 1
    assert lines <= MAX_FRAGMENT_LINES, f"fragment {name!r} is {lines} lines; split it (at most {MAX_FRAGMENT_LINES})"
    assert name in shown_by_notebooks(), (
        f"no notebook shows fragment {name!r}: add a code cell with explorer.show_source({name!r})")


def test_notebooks_show_only_fragments_that_exist():
    assert set(shown_by_notebooks()) <= set(fragments())


def test_pipeline_py_stays_a_readable_text():
    lines = PIPELINE.read_text(encoding="utf-8").splitlines()
    # 560: the app environment's kernel culling and its cluster caveat (a temporary REPORTS_DIR) need their comments.
    assert len(lines) <= 560, f"pipeline.py has {len(lines)} lines; move machinery out (at most 560)"
    first = next((number for number, line in enumerate(lines, start=1) if "flyte.TaskEnvironment" in line), None)
    assert first is not None and first <= 120, f"the first flyte.TaskEnvironment is on line {first}, not within 120"


# ----------------------------------------------------------------------------------------- imports only go down


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (functions included); ``from a import b`` gives
    both ``a`` and ``a.b`` (b may be a module)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):  # relative: within machinery
            modules.update(f"machinery.{node.module or alias.name}" for alias in node.names)
    return modules


def top_level(modules: set[str]) -> set[str]:
    return {module.split(".")[0] for module in modules}


@pytest.mark.parametrize("path", MACHINERY, ids=lambda p: p.name)
def test_machinery_never_imports_pipeline_or_explorer(path):
    assert not top_level(imported_modules(path)) & {"pipeline", "explorer"}


def test_pipeline_does_not_import_explorer():
    assert "explorer" not in top_level(imported_modules(PIPELINE))
    assert "pipeline" in top_level(imported_modules(ROOT / "explorer.py")), "the views sit above the text"


def test_machinery_modules_import_one_another_without_cycles():
    names = {path.stem for path in MACHINERY if path.stem != "__init__"}
    graph = {path.stem: {m.split(".")[1] for m in imported_modules(path) if m.startswith("machinery.")} & names
             for path in MACHINERY if path.stem != "__init__"}
    visiting, done = set(), set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in visiting, "import cycle: " + " -> ".join((*trail, module))
        if module in done:
            return
        visiting.add(module)
        for imported in sorted(graph[module]):
            visit(imported, (*trail, module))
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def documented_layers() -> list[str]:
    """The module order of the layer list in machinery/__init__.py (each may import only those above it)."""
    docstring = ast.get_docstring(ast.parse((ROOT / "machinery" / "__init__.py").read_text(encoding="utf-8")))
    return re.findall(r"^\* ``(\w+)``", docstring, flags=re.MULTILINE)


def test_machinery_modules_import_only_the_layers_above_them():
    layers = documented_layers()
    assert sorted(layers) == sorted(path.stem for path in MACHINERY if path.stem != "__init__"), "every module listed"
    wrong = [
        f"{path.stem} imports {imported}"
        for path in MACHINERY if path.stem != "__init__"
        for imported in sorted({m.split(".")[1] for m in imported_modules(path) if m.startswith("machinery.")})
        if imported in layers and layers.index(imported) >= layers.index(path.stem)
    ]
    assert wrong == []


def test_the_import_checker_sees_every_kind_of_import(tmp_path):
    module = tmp_path / "sample.py"
    module.write_text("import pipeline\nfrom explorer import x\n\ndef f():\n    import json.decoder\n"
                      "    from machinery import files\n", encoding="utf-8")
    assert {"pipeline", "explorer", "json", "machinery"} <= top_level(imported_modules(module))
    assert "machinery.files" in imported_modules(module)


# ----------------------------------------------------------------------------------------- the test session


def test_flyte_cache_of_the_test_session_is_isolated_from_the_project(tmp_path):
    from conftest import SCRATCH
    from flyte._persistence._db import LocalDB

    import pipeline

    pipeline.run_batch(["Isolation check"], max_iterations=1, output_dir=tmp_path, run_id="iso")
    assert (SCRATCH / ".flyte" / "local-cache").resolve() == Path(LocalDB._get_cache_dir()).resolve()
    assert not (SCRATCH / ".flyte" / "local-cache").resolve().is_relative_to(ROOT)


def test_tests_never_see_the_developers_settings():
    import os

    from machinery.runtime import runtime

    assert runtime.settings.backend == "offline"
    assert not [name for name in os.environ if name.startswith("OPENAI_")]
    assert not runtime.settings.reports_dir.is_relative_to(ROOT)
    assert runtime.settings.reply_cache is not None and not runtime.settings.reply_cache.is_relative_to(ROOT)
