"""machinery/inputs.py: bad input gets one clear ValueError, naming the parameter, the value and what is allowed.

Unit tests of ``validate_batch``, ``validate_run_id``, ``coerce_topics`` and ``report_date_or_today``.
That ``run_batch`` checks before any model call is in test_pipeline_batch.py; what only a kernel can show (papermill's
``-p`` and ``-y``) is in test_notebooks.py.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest

from machinery.inputs import (
    MAX_TOPIC_LENGTH,
    MAX_TOPICS,
    coerce_topics,
    report_date_or_today,
    validate_batch,
    validate_run_id,
)

GOOD = ["Quantum computing"]

CASES = [
    # (topics, max_iterations, quality_threshold, words the message must contain)
    ([], 3, 8, ["topics is empty"]),
    ((), 3, 8, ["topics is empty"]),
    ("Quantum computing", 3, 8, ["topics must be a list", "str"]),
    (None, 3, 8, ["topics must be a list", "NoneType"]),
    ({"a": 1}, 3, 8, ["topics must be a list", "dict"]),
    ({"Cats"}, 3, 8, ["topics must be a list", "set"]),
    (b"Cats", 3, 8, ["topic #1 must be a string", "int"]),
    (["   "], 3, 8, ["topic #1 is blank"]),
    (["ok", ""], 3, 8, ["topic #2 is blank"]),
    (["ok", "\t \u3000"], 3, 8, ["topic #2 is blank"]),
    ([42], 3, 8, ["topic #1 must be a string", "int"]),
    (["ok", None], 3, 8, ["topic #2 must be a string", "NoneType"]),
    (["ok", ["nested"]], 3, 8, ["topic #2 must be a string", "list"]),
    (["x" * (MAX_TOPIC_LENGTH + 1)], 3, 8,
     ["topic #1", f"{MAX_TOPIC_LENGTH + 1} characters", f"at most {MAX_TOPIC_LENGTH}"]),
    (["a\nb"], 3, 8, ["topic #1", "line break"]),
    (["a\rb"], 3, 8, ["line break"]),
    (["tab\tinside"], 3, 8, ["control character"]),
    (["nul\x00byte"], 3, 8, ["control character"]),
    (["escape \x1b[31mred"], 3, 8, ["control character"]),
    (["delete \x7f"], 3, 8, ["control character"]),
    ([f"t{i}" for i in range(MAX_TOPICS + 1)], 3, 8, [f"{MAX_TOPICS + 1} entries", f"at most {MAX_TOPICS}"]),
    (["AI", "Cats", "AI"], 3, 8, ["topic #3 'AI' repeats topic #1"]),
    (["AI", " AI "], 3, 8, ["topic #2 'AI' repeats topic #1"]),
    (GOOD, 0, 8, ["max_iterations", "1 to 10", "0"]),
    (GOOD, 11, 8, ["max_iterations", "11"]),
    (GOOD, -1, 8, ["max_iterations", "-1"]),
    (GOOD, "3", 8, ["max_iterations", "'3'"]),
    (GOOD, 2.5, 8, ["max_iterations", "2.5"]),
    (GOOD, 3.0, 8, ["max_iterations", "3.0"]),
    (GOOD, True, 8, ["max_iterations", "True"]),
    (GOOD, None, 8, ["max_iterations", "None"]),
    (GOOD, 3, 0, ["quality_threshold", "0"]),
    (GOOD, 3, 11, ["quality_threshold", "11"]),
    (GOOD, 3, None, ["quality_threshold", "None"]),
    (GOOD, 3, False, ["quality_threshold", "False"]),
]

# The invisible marks that reorder text (bidi embeddings, overrides and isolates): a topic
# holding one reads differently in a file name, a page title and a table.
BIDI_MARKS = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"]


@pytest.mark.parametrize(("topics", "iterations", "threshold", "expected"), CASES)
def test_bad_input_is_rejected_with_a_clear_message(topics, iterations, threshold, expected):
    with pytest.raises(ValueError) as caught:
        validate_batch(topics, iterations, threshold)
    for words in expected:
        assert words in str(caught.value)


@pytest.mark.parametrize("mark", BIDI_MARKS, ids=lambda mark: f"U+{ord(mark):04X}")
def test_marks_that_reorder_text_are_rejected(mark):
    with pytest.raises(ValueError, match="topic #2 .* a mark that reorders text: remove it"):
        validate_batch(["Cats", f"invoice{mark}fdp.exe"], 3, 8)


@pytest.mark.parametrize("mark", ["\u200f", "\u200e", "\u061c", "\u200d", "\u00ad"],
                         ids=["RLM", "LRM", "ALM", "ZWJ", "soft-hyphen"])
def test_other_invisible_characters_are_allowed(mark):
    """Not everything invisible is hostile: joiners make emoji and scripts, marks fix punctuation."""
    assert validate_batch([f"שלום{mark} world"], 3, 8) == [f"שלום{mark} world"]


def test_the_first_problem_is_reported_in_topic_order():
    with pytest.raises(ValueError, match="topic #2 is blank"):
        validate_batch(["ok", " ", 42], 3, 8)


def test_a_long_value_is_shortened_in_the_message():
    with pytest.raises(ValueError) as caught:
        validate_batch("x" * 1000, 3, 8)
    assert len(str(caught.value)) < 300


def test_valid_awkward_topics_pass_and_are_trimmed():
    topics = [" Kubernetes: cost ", "<b>markup</b>", "🚀 emoji", "עברית", "a/b\\c", "AI", "ai", "x" * MAX_TOPIC_LENGTH,
              "👩‍👩‍👧 family"]
    assert validate_batch(topics, 1, 10) == [t.strip() for t in topics]


def test_limits_are_inclusive():
    assert validate_batch([f"t{i}" for i in range(MAX_TOPICS)], 1, 1) == [f"t{i}" for i in range(MAX_TOPICS)]
    assert validate_batch(("a tuple is a sequence",), 10, 10) == ["a tuple is a sequence"]


# ----------------------------------------------------------------------------------------- run ids


@pytest.mark.parametrize("run_id", ["20261129-120000", "e2e", "run_1.final", "a" * 64, "R-2", "日本"])
def test_good_run_ids(run_id):
    assert validate_run_id(run_id) == run_id


@pytest.mark.parametrize("run_id", ["", ".", "..", ".hidden", "../up", "a/b", "a\\b", "a b", "a" * 65, "x\n",
                                    "semi;colon", "~home", "/abs"])
def test_bad_run_ids(run_id):
    with pytest.raises(ValueError, match="must be 1-64 letters, digits, '.', '_' or '-', not starting with '.'"):
        validate_run_id(run_id)


# ----------------------------------------------------------------------------------------- coerce_topics


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["A", "B"], ["A", "B"]),
        (("A",), ("A",)),
        (None, None),
        (42, 42),
        ("Rust", ["Rust"]),
        ("  Rust  ", ["Rust"]),
        ("", []),
        ("   ", []),
        ("[Rust, WebAssembly]", ["Rust", "WebAssembly"]),
        ('["Kubernetes: cost, scale", "Cats"]', ["Kubernetes: cost, scale", "Cats"]),
        ("[]", []),
        ("[2024, 3.5]", ["2024", "3.5"]),
        ("[Rust, null]", ["Rust", None]),
        ("Rust\nWebAssembly\n\n  Café culture ☕  \n", ["Rust", "WebAssembly", "Café culture ☕"]),
        ("Kubernetes: cost, scale\nCats", ["Kubernetes: cost, scale", "Cats"]),
        ("Kubernetes: cost and scale", ["Kubernetes: cost and scale"]),
    ],
)
def test_coerce_topics(value, expected):
    assert coerce_topics(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("Rust, WebAssembly", "topics arrived as one string, 'Rust, WebAssembly': is that one topic or several?"),
        ("Kubernetes: cost, scale", "Pass a list instead"),
        ("[Rust, [unclosed", "looks like a list but does not parse"),
        ("[a: b]: c", "looks like a list but does not parse"),
    ],
)
def test_coerce_topics_refuses_ambiguous_or_broken_text(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        coerce_topics(value)


def test_coerced_text_still_goes_through_validation():
    with pytest.raises(ValueError, match="topics is empty"):
        validate_batch(coerce_topics("  "), 3, 8)
    with pytest.raises(ValueError, match="topic #2 must be a string, got NoneType"):
        validate_batch(coerce_topics("[Rust, null]"), 3, 8)
    assert validate_batch(coerce_topics("[Rust, 2024]"), 3, 8) == ["Rust", "2024"]


# ----------------------------------------------------------------------------------------- report dates


def test_a_report_date_defaults_to_today_and_is_kept_when_valid():
    today = dt.date.today().isoformat()
    assert report_date_or_today(None) == report_date_or_today("") == today
    assert report_date_or_today("2026-02-28") == "2026-02-28"
    assert report_date_or_today(dt.date(2026, 11, 30)) == "2026-11-30", "YAML reads an unquoted date as a date"


@pytest.mark.parametrize("value", ["yesterday", "2026-13-01", "2026-02-30", "30/11/2026", "2026-1-5", "20261130",
                                   " 2026-11-30", 20261130])
def test_a_report_date_that_is_not_yyyy_mm_dd_is_rejected(value):
    with pytest.raises(ValueError, match=r"report_date .* must be a date written YYYY-MM-DD, like 20\d\d-"):
        report_date_or_today(value)
