"""Views for the notebooks: source slices, tables, charts, safe HTML previews.

Nothing here computes a result: every function takes what ``pipeline`` returned
and shows it. All text that came from a model or a user is escaped before it
reaches HTML, because live JupyterLab runs event handlers in HTML outputs.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pipeline
from machinery.inputs import coerce_topics
from machinery.model_client import BackendUnavailable
from machinery.run_output import REPORT_FILES
from machinery.settings import PROJECT_ROOT

# --------------------------------------------------------------------------- source slices

_FRAGMENT = r"# \{{\{{docs-fragment {name}\}}\}}\n(.*?)# \{{\{{/docs-fragment {name}\}}\}}"


def fragment(name: str) -> str:
    """The exact source between ``# {{docs-fragment name}}`` markers in pipeline.py."""
    source = Path(pipeline.__file__).read_text(encoding="utf-8")
    match = re.search(_FRAGMENT.format(name=re.escape(name)), source, flags=re.DOTALL)
    if match is None:
        raise KeyError(f"no docs-fragment named {name!r} in pipeline.py")
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

    CELL = 'style="text-align: left; padding: 0.15em 0.9em 0.15em 0; vertical-align: top"'

    def _repr_html_(self) -> str:
        head = "".join(f"<th {self.CELL}>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td {self.CELL}>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for row in self.rows
        )
        return f'<table style="border-collapse: collapse"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def __repr__(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
                  for i, c in enumerate(self.columns)]
        line = lambda cells: "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([line(self.columns), line(["-" * w for w in widths]), *map(line, self.rows)])


def results_table(batch: pipeline.BatchResult) -> Table:
    """Topic, rounds, final score, tokens and error for every topic of a batch."""
    return rows_table(batch.rows())


def rows_table(rows: Iterable[dict[str, Any]]) -> Table:
    """The same for rows as ``BatchResult.rows()`` gives them, possibly from several runs."""
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
            for row in rows
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
        return Path(path).resolve().relative_to(PROJECT_ROOT).as_posix()
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


# --------------------------------------------------------------------------- the interactive explorer

STEP_LABELS = {
    "draft": "writing the draft",
    "critique": "critique",
    "scored": "scored",
    "revise": "revising",
    "format": "formatting",
    "done": "done",
    "error": "failed",
}


class ReportExplorer:
    """Type topics, press Run, watch each topic move through the loop, browse the results.

    A view only: ``run`` (what the Run button calls) validates the input, calls
    ``pipeline.run_batch`` with a progress listener, and shows the returned
    ``BatchResult``. A notebook cell can call ``run`` directly and gets the same
    result, so headless runs exercise the same path as a click.
    """

    def __init__(self, topics: Sequence[str] = (), max_iterations: int = 3, quality_threshold: int = 8, *,
                 report_date: str | None = None, output_dir: str | Path | None = None,
                 run_id: str = "explorer") -> None:
        import ipywidgets as widgets

        self.report_date, self.output_dir, self.run_id = report_date, output_dir, run_id
        self._runs = 0
        self.events: list[dict[str, Any]] = []
        self.progress_rows: dict[str, dict[str, Any]] = {}
        # topic -> its latest outcome, the run folder holding it, and its row of BatchResult.rows()
        self.results: dict[str, tuple[pipeline.TopicReport, Path, dict[str, Any]]] = {}

        self.topics_box = widgets.Textarea(value="\n".join(topics), placeholder="One topic per line",
                                           description="Topics", layout=widgets.Layout(width="32rem", height="7rem"))
        self.iterations = widgets.IntSlider(value=max_iterations, min=1, max=10, description="Max rounds")
        self.threshold = widgets.IntSlider(value=quality_threshold, min=1, max=10, description="Threshold")
        self.backend = widgets.HTML(f"<small>Using the {html.escape(pipeline.runtime.settings.describe())}</small>")
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play",
                                         tooltip="Generate reports for these topics")
        self.message = widgets.HTML()
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="0 / 0",
                                            layout=widgets.Layout(width="32rem"))
        self.progress_table = widgets.HTML()
        self.results_table = widgets.HTML()
        self.choice = widgets.Dropdown(description="Report", options=[], layout=widgets.Layout(width="32rem"))
        self.summary_view, self.report_view = widgets.HTML(), widgets.HTML()
        self.preview_view, self.history_view, self.files_view = widgets.HTML(), widgets.HTML(), widgets.HTML()
        self.tabs = widgets.Tab(
            children=[self.summary_view, self.report_view, self.preview_view, self.history_view, self.files_view],
            titles=("Summary", "Report", "HTML preview", "Critique history", "Files"),
        )
        self.run_button.on_click(self._clicked)
        self.choice.observe(lambda change: self._show(change["new"]), names="value")
        self.widget = widgets.VBox([
            widgets.HTML("<b>Report explorer</b>"),
            self.topics_box,
            widgets.HBox([self.iterations, self.threshold]),
            widgets.HBox([self.run_button, self.backend]),
            self.message,
            self.progress,
            self.progress_table,
            self.results_table,
            self.choice,
            self.tabs,
        ])

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ running

    def run(self, topics: Any, max_iterations: int | None = None,
            quality_threshold: int | None = None) -> pipeline.BatchResult:
        """Run the batch with live progress and show the results; raise ValueError on bad input.

        ``run_batch`` validates the input and checks the backend, once; its error is shown here.
        """
        max_iterations = self.iterations.value if max_iterations is None else max_iterations
        quality_threshold = self.threshold.value if quality_threshold is None else quality_threshold
        self.message.value = ""
        self.progress_rows = {}  # filled by the progress events, topic by topic
        self._refresh_progress()
        self.run_button.disabled = True
        try:
            batch = pipeline.run_batch(
                coerce_topics(topics), max_iterations=max_iterations, quality_threshold=quality_threshold,
                report_date=self.report_date, output_dir=self.output_dir,
                run_id=self.run_id if self._runs == 0 else f"{self.run_id}-{self._runs + 1}", on_event=self._on_event,
            )
            self._runs += 1
            for report, row in zip(batch.reports, batch.rows()):
                self.results[report.topic] = (report, batch.run_dir, row)
                self.progress_rows[report.topic].update(
                    step="done" if report.ok else "failed", error=report.error or "",
                    score=report.result.final_score if report.result else "")
            self._refresh_progress()
            self._refresh_results(select=batch.reports[0].topic)
            succeeded = sum(report.ok for report in batch.reports)
            self.message.value = html.escape(
                f"Finished: {succeeded} of {len(batch.reports)} topics succeeded; "
                f"reports in {shown_path(batch.run_dir)}")
        except (ValueError, BackendUnavailable) as error:
            self.message.value = f'<span style="color:#cf222e">{html.escape(str(error))}</span>'
            raise
        finally:
            self.run_button.disabled = False  # last, so an enabled button means everything is shown
        return batch

    def _clicked(self, _button: Any) -> None:
        # A bad input is already shown in the message line, where a person is looking.
        with contextlib.suppress(ValueError, BackendUnavailable):
            self.run(self.topics_box.value, self.iterations.value, self.threshold.value)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        row = self.progress_rows.setdefault(event["topic"], {"step": "", "iteration": "", "score": "", "error": ""})
        row["step"] = STEP_LABELS.get(event["step"], event["step"])
        row["iteration"] = event.get("iteration", row["iteration"])
        row["score"] = event.get("score", row["score"])
        row["error"] = event.get("error", row["error"])
        self._refresh_progress()

    # ------------------------------------------------------------------ showing

    def _refresh_progress(self) -> None:
        finished = sum(1 for row in self.progress_rows.values() if row["step"] in ("done", "failed"))
        self.progress.max = max(1, len(self.progress_rows))
        self.progress.value = finished
        self.progress.description = f"{finished} / {len(self.progress_rows)}"
        self.progress_table.value = Table(
            ["topic", "step", "round", "latest score", "error"],
            [[t, r["step"], r["iteration"], r["score"], r["error"]] for t, r in self.progress_rows.items()],
        )._repr_html_()

    def _refresh_results(self, select: str | None = None) -> None:
        self.results_table.value = rows_table(row for _, _, row in self.results.values())._repr_html_()
        self.choice.options = list(self.results)
        if select is not None:
            self.choice.value = select
            self._show(select)

    def _show(self, topic: str | None) -> None:
        if not topic or topic not in self.results:
            return
        report, run_dir, _ = self.results[topic]
        folder = run_dir / report.slug
        if not report.ok or report.result is None:
            failure = f'<p style="color:#cf222e">This topic failed: {html.escape(report.error or "")}</p>'
            self.summary_view.value = self.report_view.value = self.preview_view.value = failure
            self.files_view.value = failure
        else:
            summary = (folder / "summary.txt").read_text(encoding="utf-8")
            self.summary_view.value = "".join(f"<p>{html.escape(p)}</p>" for p in summary.split("\n\n") if p.strip())
            self.report_view.value = pipeline.render_markdown(report.result.markdown)
            self.preview_view.value = preview((folder / "report.html").read_text(encoding="utf-8")).markup
            self.files_view.value = "<ul>" + "".join(
                f'<li><a href="{html.escape(_link(folder / name))}" target="_blank">{html.escape(name)}</a></li>'
                for name in REPORT_FILES
            ) + f'<li><a href="{html.escape(_link(run_dir / "index.html"))}" target="_blank">index.html</a></li></ul>'
        self.history_view.value = _history_html(report)


def _link(path: Path) -> str:
    """A link that JupyterLab resolves from the notebook's folder."""
    return Path(os.path.relpath(path, Path.cwd())).as_posix()


def _history_html(report: pipeline.TopicReport) -> str:
    if report.result is None:
        return "<p>No critique was recorded.</p>"
    history = report.result.history
    figure = score_chart({report.topic: [r.score for r in history]}, title="Score per round")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    image = base64.b64encode(buffer.getvalue()).decode()
    rounds = "".join(
        f"<li><b>Round {r.iteration}: {r.score}/10.</b> "
        + (" ".join(html.escape(item) for item in r.improvements) or "No further improvements asked for.")
        + "</li>"
        for r in history
    )
    return f'<img alt="score per round" src="data:image/png;base64,{image}" style="max-width: 100%"><ol>{rounds}</ol>'
