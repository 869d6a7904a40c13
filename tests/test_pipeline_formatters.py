"""pipeline.py, formatters: front matter that round-trips any topic, HTML that is a valid and inert document."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

import pipeline
from machinery.model_client import Usage
from pipeline import RefineResult, Round

AWKWARD_TOPICS = [
    "Quantum computing",
    "Kubernetes: cost & scale",
    'The "best" language? It\'s complicated',
    "---",
    "yes",
    "null",
    "1.0",
    "- a list item",
    "# not a heading",
    "&anchor *alias !tag %directive @at `tick`",
    "C:\\Windows\\System32 / ../../etc/passwd",
    "Emoji 🚀🐈 and ümlauts",
    "العربية من اليمين إلى اليسار",
    "日本の茶道",
    "<b>bold</b> & <script>alert(1)</script>",
]


def result_for(topic: str, markdown: str | None = None, score: int = 8) -> RefineResult:
    return RefineResult(
        topic=topic,
        markdown=markdown if markdown is not None else f"# {topic}\n\n## Introduction\n\nAbout {topic}.\n",
        history=[Round(iteration=1, score=score, strengths=[], improvements=[], summary="ok")],
        model="offline-test",
        usage=Usage(),
    )


@pytest.mark.parametrize("topic", AWKWARD_TOPICS)
def test_front_matter_round_trips_the_topic(topic):
    text = pipeline.format_as_markdown(result_for(topic), "2026-11-29")
    meta = pipeline.read_front_matter(text)
    assert meta == {"title": topic, "date": "2026-11-29", "model": "offline-test", "score": 8, "iterations": 1}
    assert text.split("\n---\n", 1)[1].strip().startswith("# ")


class DocumentShape(HTMLParser):
    """Records the structure we promise: doctype, lang, charset, one title, tags and attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.doctype = ""
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str, str | None]] = []
        self.title = ""
        self._in_title = False
        self.h1: list[str] = []
        self._in_h1 = False

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend((tag, name, value) for name, value in attrs)
        self._in_title = tag == "title"
        if tag == "h1":
            self._in_h1 = True
            self.h1.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False
        if tag == "h1":
            self._in_h1 = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._in_h1:
            self.h1[-1] += data


def parse(page: str) -> DocumentShape:
    shape = DocumentShape()
    shape.feed(page)
    shape.close()
    return shape


@pytest.mark.parametrize("topic", AWKWARD_TOPICS)
def test_html_is_a_complete_document_titled_by_the_topic(topic):
    page = pipeline.format_as_html(result_for(topic), "2026-11-29")
    shape = parse(page)
    assert shape.doctype.lower() == "doctype html"
    assert ("html", "lang", "en") in shape.attributes
    assert ("meta", "charset", "utf-8") in shape.attributes
    assert shape.tags.count("title") == 1 and shape.title == topic
    assert shape.h1 == [topic], "the topic is the one top heading (the model's duplicate is dropped)"
    assert "script" not in shape.tags


def test_markdown_features_survive_rendering():
    markdown = (
        "# T\n\n## Section\n\nSome **bold**, *italic* and `code`.\n\n- one\n- two\n\n"
        "1. first\n2. second\n\n[a link](https://example.org/x)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    )
    page = pipeline.format_as_html(result_for("T", markdown), "2026-11-29")
    for fragment in ("<h2>Section</h2>", "<strong>bold</strong>", "<em>italic</em>", "<code>code</code>",
                     "<li>one</li>", "<ol>", 'href="https://example.org/x"', "<table>"):
        assert fragment in page
    assert "<p><h2>" not in page, "headings must not nest inside paragraphs"


HOSTILE = [
    "<script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=2">',
    '<svg onload="window.__pwned=3"></svg>',
    "[click](javascript:window.__pwned=4)",
    "[click](JaVaScRiPt:window.__pwned=5)",
    "[click](&#106;avascript:window.__pwned=6)",
    "[click]( javascript:window.__pwned=7)",
    "[data](data:text/html;base64,PHNjcmlwdD53aW5kb3cuX19wd25lZD04PC9zY3JpcHQ+)",
    "![img](javascript:window.__pwned=9)",
    "<iframe src=\"javascript:window.__pwned=10\"></iframe>",
    "<style>body{background:url(javascript:window.__pwned=11)}</style>",
    "<!-- --><script>window.__pwned=12</script><!-- -->",
    "</title></head><body><script>window.__pwned=13</script>",
    "[x](vbscript:msgbox(14))",
    '<a href="javascript:window.__pwned=15">x</a>',
]


@pytest.mark.parametrize("vector", HOSTILE)
def test_hostile_model_text_comes_out_inert(vector):
    page = pipeline.format_as_html(result_for("Topic", f"# Topic\n\n{vector}\n\nAfter.\n"), "2026-11-29")
    shape = parse(page)
    executable = {"script", "iframe", "svg", "object", "embed"}
    assert not executable & set(shape.tags)
    assert "style" not in shape.tags[shape.tags.index("body"):]
    for tag, name, value in shape.attributes:
        assert not name.startswith("on"), (tag, name)
        if name in ("href", "src"):
            assert not re.match(r"\s*(javascript|vbscript|data):", value or "", re.IGNORECASE), (tag, value)


def test_is_safe_link():
    assert pipeline.is_safe_link("https://example.org")
    assert pipeline.is_safe_link("relative/path.html")
    assert pipeline.is_safe_link("#anchor")
    assert pipeline.is_safe_link("mailto:a@example.org")
    for bad in ("javascript:x", " JAVASCRIPT:x", "java\tscript:x", "data:text/html,x", "vbscript:x", "file:///etc/passwd"):
        assert not pipeline.is_safe_link(bad), bad


def test_read_front_matter_refuses_text_without_it():
    with pytest.raises(ValueError, match="no front matter"):
        pipeline.read_front_matter("# Just a report\n")
    with pytest.raises(ValueError, match="not closed"):
        pipeline.read_front_matter("---\ntitle: x\n\n# Report\n")


def test_the_same_inputs_give_the_same_files():
    result = result_for("Cats")
    assert pipeline.format_as_markdown(result, "2026-11-29") == pipeline.format_as_markdown(result, "2026-11-29")
    assert pipeline.format_as_html(result, "2026-11-29") == pipeline.format_as_html(result, "2026-11-29")
    assert pipeline.format_as_markdown(result, "2026-11-29") != pipeline.format_as_markdown(result, "2026-11-30")


def test_a_heading_that_differs_from_the_topic_is_kept():
    page = pipeline.format_as_html(result_for("Cats", "# Why cats purr\n\nBecause.\n"), "2026-11-29")
    assert parse(page).h1 == ["Cats", "Why cats purr"]


def test_render_markdown_shows_raw_html_as_text():
    fragment = pipeline.render_markdown("Hello <b>world</b>\n\n<div onclick=x>block</div>\n")
    assert "<b>" not in fragment and "&lt;b&gt;world&lt;/b&gt;" in fragment
    assert "<div" not in fragment and "&lt;div onclick=x&gt;" in fragment
