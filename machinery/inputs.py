"""Input checks: every batch is validated before any model call.

A ``ValueError`` names the parameter, the value and the fix. ``coerce_topics``
turns the text that papermill's ``-p`` and text boxes produce into a list.
``report_date_or_today`` checks the date written into every report.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any

import yaml

MAX_TOPICS = 500
MAX_TOPIC_LENGTH = 200
# Line breaks and other control characters, and the invisible marks that reorder text
# (U+202A-U+202E, U+2066-U+2069): a topic must read the same everywhere it is shown.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f\u202a-\u202e\u2066-\u2069]")


def validate_batch(topics: Any, max_iterations: Any, quality_threshold: Any) -> list[str]:
    """The topics, stripped; or a ValueError that says which input is wrong and how to fix it."""
    if isinstance(topics, str) or not isinstance(topics, Sequence):
        raise ValueError(
            f"topics must be a list of strings, got {type(topics).__name__} {topics!r:.80}; "
            'for example topics=["Quantum computing", "Why cats purr"]'
        )
    if not topics:
        raise ValueError("topics is empty: give at least one topic")
    if len(topics) > MAX_TOPICS:
        raise ValueError(f"topics has {len(topics)} entries; at most {MAX_TOPICS} are allowed per batch")
    cleaned: list[str] = []
    first_seen: dict[str, int] = {}
    for position, topic in enumerate(topics, start=1):
        if not isinstance(topic, str):
            raise ValueError(f"topic #{position} must be a string, got {type(topic).__name__} {topic!r:.60}")
        text = topic.strip()
        if not text:
            raise ValueError(f"topic #{position} is blank: give it some text or remove it")
        if len(text) > MAX_TOPIC_LENGTH:
            raise ValueError(
                f"topic #{position} is {len(text)} characters long; at most {MAX_TOPIC_LENGTH} are allowed"
            )
        if _FORBIDDEN.search(text):
            raise ValueError(
                f"topic #{position} {text[:60]!r} contains a line break, a control character or a mark that "
                "reorders text: remove it"
            )
        if text in first_seen:
            raise ValueError(
                f"topic #{position} {text!r} repeats topic #{first_seen[text]}: each topic may appear once"
            )
        first_seen[text] = position
        cleaned.append(text)
    for name, value in (("max_iterations", max_iterations), ("quality_threshold", quality_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
            raise ValueError(f"{name} must be a whole number from 1 to 10, got {value!r}")
    return cleaned


def report_date_or_today(value: Any) -> str:
    """The report date as YYYY-MM-DD: today's when ``value`` is None or empty. A date object (YAML, as papermill's
    ``-y`` reads it, makes one of an unquoted 2026-11-30) is written out; any other value is a ValueError."""
    today = dt.date.today().isoformat()
    if value is None or value == "":
        return today
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, str) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        try:
            return dt.date.fromisoformat(value).isoformat()
        except ValueError:  # 2026-02-30
            pass
    raise ValueError(f"report_date {value!r:.40} must be a date written YYYY-MM-DD, like {today}")


def validate_run_id(run_id: str) -> str:
    """A run id names a folder: letters, digits, '.', '_' and '-' only."""
    if not re.fullmatch(r"[\w.-]{1,64}", run_id) or run_id.startswith("."):
        raise ValueError(f"run_id {run_id!r} must be 1-64 letters, digits, '.', '_' or '-', not starting with '.'")
    return run_id


def coerce_topics(value: Any) -> Any:
    """Accept topics as a list, or as the text papermill's ``-p`` and text boxes produce.

    A YAML/JSON list in a string (``"[A, B]"``) is parsed; text with one topic
    per line is split; a single line without commas is one topic. A single line
    with commas is ambiguous ("Kubernetes: cost, scale" is one topic), so it is
    rejected with the way to pass a list. Anything that is not a string is
    returned as it is. The result still goes through ``validate_batch``.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"topics {text[:80]!r} looks like a list but does not parse: {error}") from None
        if not isinstance(parsed, list):
            raise ValueError(f"topics {text[:80]!r} must be a list like [Topic A, Topic B]")
        return [str(item) if isinstance(item, (int, float)) else item for item in parsed]
    if "\n" in text:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if "," in text:
        raise ValueError(
            f"topics arrived as one string, {text[:80]!r}: is that one topic or several? Pass a list instead: "
            "papermill -y 'topics: [Topic A, Topic B]' (or -f params.yaml), or one topic per line."
        )
    return [text]
