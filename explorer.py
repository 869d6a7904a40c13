"""Views for the notebooks: source slices, tables, charts, safe HTML previews.

Nothing here computes a result: every function takes what ``pipeline`` returned
and shows it. All text that came from a model or a user is escaped before it
reaches HTML, because live JupyterLab runs event handlers in HTML outputs.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pipeline

# --------------------------------------------------------------------------- source slices

_FRAGMENT = r"# \{{\{{docs-fragment {name}\}}\}}\n(.*?)# \{{\{{/docs-fragment {name}\}}\}}"


def fragment(name: str, module: Path = Path(pipeline.__file__)) -> str:
    """The exact source between ``# {{docs-fragment name}}`` markers."""
    match = re.search(_FRAGMENT.format(name=re.escape(name)), module.read_text(encoding="utf-8"), flags=re.DOTALL)
    if match is None:
        raise KeyError(f"no docs-fragment named {name!r} in {module.name}")
    return match.group(1).strip("\n")


class Source:
    """A code listing that renders as highlighted Markdown in Jupyter and as plain text elsewhere."""

    def __init__(self, code: str, title: str = "") -> None:
        self.code, self.title = code, title

    def _repr_markdown_(self) -> str:
        heading = f"**{self.title}**\n\n" if self.title else ""
        return f"{heading}```python\n{self.code}\n```"

    def __repr__(self) -> str:
        return f"{self.title}\n{self.code}" if self.title else self.code


def show_source(name: str) -> Source:
    """``show_source("formatters")``: the ``formatters`` fragment of pipeline.py."""
    return Source(fragment(name), f"pipeline.py, fragment `{name}`")


# --------------------------------------------------------------------------- tables


class Table:
    """A small table: escaped HTML in Jupyter, aligned text in plain outputs and tests."""

    def __init__(self, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        self.columns = list(columns)
        self.rows = [["" if cell is None else str(cell) for cell in row] for row in rows]

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def __repr__(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
                  for i, c in enumerate(self.columns)]
        line = lambda cells: "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([line(self.columns), line(["-" * w for w in widths]), *map(line, self.rows)])


def results_table(batch: pipeline.BatchResult) -> Table:
    """Topic, rounds, final score, tokens and error for every topic of a batch."""
    return Table(
        ["topic", "iterations", "final score", "scores", "tokens", "error"],
        [
            [
                row["topic"],
                row["iterations"],
                "" if row["final_score"] is None else f"{row['final_score']}/10",
                " → ".join(map(str, row["score_history"])),
                row["usage"]["total_tokens"],
                row["error"] or "",
            ]
            for row in batch.rows()
        ],
    )


# --------------------------------------------------------------------------- HTML previews


class SafeHTML:
    """HTML that we built ourselves around escaped content."""

    def __init__(self, markup: str, text: str) -> None:
        self.markup, self.text = markup, text

    def _repr_html_(self) -> str:
        return self.markup

    def __repr__(self) -> str:
        return self.text


def preview(page: str, height: int = 420, label: str = "HTML preview") -> SafeHTML:
    """Show a generated page in a sandboxed iframe: no script in it can run, whatever it contains."""
    frame = (
        f'<iframe sandbox="" title="{html.escape(label)}" srcdoc="{html.escape(page, quote=True)}" '
        f'style="width: 100%; height: {int(height)}px; border: 1px solid #d0d7de; border-radius: 4px;"></iframe>'
    )
    return SafeHTML(frame, f"[{label}: {len(page)} characters of HTML in a sandboxed iframe]")


# --------------------------------------------------------------------------- paths and charts


def shown_path(path: Path) -> str:
    """A path relative to the project when it is inside it: no machine-specific prefixes in outputs."""
    try:
        return Path(path).resolve().relative_to(pipeline.PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)


def score_chart(histories: dict[str, list[int]], threshold: int | None = None, title: str = "Score per round"):
    """A line per topic: the critic's score after each round."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=100)
    for topic, scores in histories.items():
        label = topic if len(topic) <= 40 else topic[:39] + "…"
        axes.plot(range(1, len(scores) + 1), scores, marker="o", label=label)
    if threshold is not None:
        axes.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    axes.set(xlabel="round", ylabel="critic score", ylim=(0, 10.5), title=title)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    plt.close(figure)  # returned, not auto-displayed twice
    return figure
