"""A deterministic, offline stand-in for an OpenAI-compatible chat model.

The tutorial runs with no account and no network, yet the pipeline still goes
through the real ``openai`` client: request building, JSON mode, retries, error
classes and token usage all run for real. Only the model behind the client is
replaced, in one of two ways:

* ``OfflineTransport``: an ``httpx2`` transport handed to ``AsyncOpenAI``; no
  sockets, no threads (the default offline backend and most tests).
* ``python -m machinery.offline_llm --port 8765``: the same model as a small loopback
  HTTP server, so ``OPENAI_BASE_URL=http://127.0.0.1:8765/v1`` works like any
  OpenAI-compatible server (Ollama, vLLM, llama.cpp).

Both honour a reply limit as OpenAI does: a request with ``max_tokens`` (or
``max_completion_tokens``) whose reply would be longer gets the reply cut to that many
tokens' worth of text (four characters a token, at a word boundary when there is one),
``finish_reason`` ``"length"`` and ``usage.completion_tokens`` equal to the limit. A
cut critique is invalid JSON, as a real model's would be. A reply that fits is the
same as without a limit; ``LONGEST_REPLY_TOKENS`` says how long replies get.

The loopback server can behave like a small local model served by llama.cpp, so
clients can be tested for bounded replies, model-name discovery and timeouts:

* ``served_model`` / ``--served-model`` (repeatable): the name(s) ``GET /models``
  lists instead of ``MODEL_VERSION``; every reply's ``model`` is the first one,
  whatever name the request sent, as llama.cpp answers with the model it serves;
* ``ramble`` / ``--ramble``, with ``context_tokens`` / ``--context-tokens`` (4096):
  a request without a reply limit gets the reply, then its last paragraph over and
  over until prompt and reply fill the context, ``finish_reason`` ``"length"`` (a
  critique without a limit is cut-off JSON). Every reply is bounded by the context,
  and a prompt that fills it gets llama.cpp's HTTP 400 (``exceed_context_size_error``);
* the per-token latency below counts the tokens actually sent, after any cut: a
  rambling reply is slow, a bounded one fast. ``python -m machinery.offline_llm
  --served-model qwen2.5-0.5b-instruct-q4_k_m.gguf --ramble --per-token-latency 0.002``
  stands in for ``llama-server``.

The loopback server (``OfflineServer``, and the same options on the command line)
can also behave like a remote, rate-limited API, for tests and benchmarks:

* ``latency`` / ``--latency`` seconds per completion, plus ``per_token_latency`` /
  ``--latency-per-token`` (or ``--per-token-latency``) per generated token; a client
  whose timeout is shorter gets no reply (``openai.APITimeoutError``), every time;
* ``jitter`` / ``--jitter``: that latency times a lognormal factor (median 1, sigma
  ``jitter``, clipped at 3 sigma) drawn from the request body's hash, so replies do
  not arrive in lockstep yet the same request always waits the same time;
* ``requests_per_minute`` / ``--rpm``: a budget over ``/chat/completions`` requests
  (``GET /models`` is free), a token bucket of ``burst`` / ``--burst`` tokens
  (default: ten seconds' worth, ``ceil(rpm / 6)``, at least 1) refilled at
  ``rpm / 60`` per second. A request over it gets HTTP 429 with OpenAI's error body
  (``"type": "requests"``, ``"code": "rate_limit_exceeded"``), ``retry-after-ms``
  (milliseconds until the next token, rounded up) and ``retry-after`` (the same in
  whole seconds, rounded up). The ``openai`` client raises ``RateLimitError`` on it,
  after its own retries;
* ``ratelimit_headers`` / ``--ratelimit-headers`` (needs a budget): every
  chat-completion reply, 429s included, carries ``x-ratelimit-limit-requests`` (the
  budget per minute), ``x-ratelimit-remaining-requests`` (whole tokens left in the
  bucket after this request, at most ``burst``) and ``x-ratelimit-reset-requests``
  (until the bucket is full again, in OpenAI's format: ``12ms``, ``1s``, ``6m0s``);
* ``clock``: the bucket's clock, ``time.monotonic`` unless a test passes a fake one.

``OfflineServer.stats()`` is a snapshot (``ServerStats``) of what the server saw:
chat-completion ``requests`` received, ``rate_limited`` (429s sent), ``completions``
served, ``errors`` (400s), ``in_flight`` and ``peak_in_flight`` (requests being
handled at once). ``received()`` lists the last ``RECEIVED_KEPT`` chat-completion
requests (``ReceivedRequest``: the body, its role, the model named and the reply
limit sent). ``reset_stats()`` zeroes the counters and empties that list.

The model is not a language model. It writes template prose that varies with
the topic, and it plays the four roles of the pipeline (writer, critic,
reviser, summariser) well enough to make the control flow real:

* the critic scores measurable properties of a report (sections, length,
  examples, figures, conclusion, topic focus) and names what is missing;
* the reviser fixes at most two named problems per round, as a cautious editor
  would, so the score rises over several iterations;
* the summariser picks the report's most representative sentences.

A report names its topic in full in its title and introduction. A topic of more
than ``SHORT_NAME_CHARS`` (40) characters is then referred to by a short form,
as a writer would (``short_name``: its first words up to 40 characters, or its
first 40 characters if it has no space there), so reports do not grow with the
topic's length and stay within the pipeline's default reply limits for topics
of any length ``machinery.inputs`` accepts. Shorter topics are named in full
everywhere.

Two markers in a topic (any letter case, anywhere in it) make the critic
misbehave on purpose, so the notebooks can show the pipeline's critique repair
and partial failure with no test double:

* ``(unreviewable)``, as in ``"Dogs (unreviewable)"``: every critique, the
  repair request's included, has a score of 0, which ``Critique`` rejects
  ("score: Input should be greater than or equal to 1"). ``critique_draft``
  sends one repair request, then raises ``CritiqueError``; Flyte does not retry
  it, so the topic fails at once (two critic requests) and the others finish.
* ``(needs repair)``, as in ``"Why cats purr (needs repair)"``: the first
  critique of each draft has a score of 11 ("score: Input should be less than
  or equal to 10"); the repair request (its prompt says "Your previous reply
  could not be used") gets the valid critique. The topic succeeds, with two
  critic requests per round.

If a topic holds both, ``(unreviewable)`` wins. Nothing else changes: writer,
reviser and summariser answer as for any topic, and the valid critique is the
one any other topic would get for the same report.

Same request, same reply, every run: the model reads no clock and no random
source (only the server's budget reads its clock). Learners read ``pipeline.py``;
this module is machinery.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import re
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx2

# Bump when the model's behaviour changes: the pipeline folds it into its cache
# keys, so a changed offline model never serves an old cached report.
MODEL_VERSION = "offline-reporter-6"

ASPECTS = (
    "Background",
    "Key Benefits",
    "Challenges and Risks",
    "Practical Recommendations",
    "Outlook",
    "Common Misconceptions",
)

OPENERS = (
    "This report looks at {topic} from a practical angle.",
    "{topic} draws attention from practitioners and decision makers alike.",
    "Few subjects reward a careful look as much as {topic}.",
    "Interest in {topic} has grown steadily, and so have the questions about it.",
)

ASPECT_SENTENCES = {
    "Background": (
        "The story of {topic} begins with a practical problem that people wanted to solve.",
        "Early work on {topic} was driven by small teams who shared their results openly.",
        "Understanding where {topic} comes from makes its current shape easier to follow.",
    ),
    "Key Benefits": (
        "The main benefit of {topic} is that it turns slow, manual work into a repeatable process.",
        "Teams that adopt {topic} usually report clearer decisions and fewer surprises.",
        "{topic} also lowers the cost of trying new ideas, which encourages learning.",
    ),
    "Challenges and Risks": (
        "The hardest part of {topic} is rarely the technology; it is changing habits.",
        "Costs of {topic} can grow quietly when nobody owns the budget.",
        "Poorly planned work on {topic} creates risks that only show up much later.",
    ),
    "Practical Recommendations": (
        "Start {topic} with one small, measurable goal and review it after a month.",
        "Write down who is responsible for each part of {topic} before scaling it.",
        "Share what worked and what failed with {topic}, so others avoid the same mistakes.",
    ),
    "Outlook": (
        "Over the next few years {topic} is likely to become simpler and more widespread.",
        "Better tools will make {topic} accessible to people without specialist training.",
        "The open questions around {topic} are now about scale rather than feasibility.",
    ),
    "Common Misconceptions": (
        "A common misconception is that {topic} only matters to large organisations.",
        "It is also often assumed that {topic} delivers results without sustained attention.",
        "In practice {topic} rewards patience more than it rewards big launches.",
    ),
}

ELABORATIONS = (
    "When it comes to {topic}, {aspect} deserves attention because early decisions are hard to reverse.",
    "People who document their reasoning about {aspect} find it easier to explain {topic} to newcomers.",
)

EXAMPLE_SENTENCES = (
    "For example, a small team applying {topic} cut its weekly review time in half.",
    "For instance, one community group used {topic} to plan its budget a year ahead.",
    "For example, a regional hospital piloted {topic} on a single ward before expanding.",
)

STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were "
    "with which who will can into than then they them their there these those about also more "
    "most some such what when where while how not only very".split()
)


# Markers that make the critic's reply unusable on purpose (see the module docstring).
UNREVIEWABLE = "(unreviewable)"
NEEDS_REPAIR = "(needs repair)"
# A phrase in pipeline.critique_draft's repair request: it tells a repair from a first critique.
REPAIR_REQUEST = "Your previous reply could not be used"


class OfflineModelError(Exception):
    """A request the offline model refuses, as a real API would (HTTP 400)."""


# --------------------------------------------------------------------------- prompts in, roles out


@dataclass(frozen=True)
class Request:
    role: str
    topic: str
    document: str
    improvements: tuple[str, ...]
    repair: bool = False  # a request to repair an unusable reply (the critic's, in practice)


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # the structured content form
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _labelled_block(text: str, label: str) -> str:
    """The text after a line ``label`` up to the next blank-line-separated label."""
    _, found, rest = text.partition(label)
    return rest.strip() if found else ""


def parse_request(body: dict[str, Any]) -> Request:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OfflineModelError("'messages' must be a non-empty list")
    system = " ".join(_message_text(m) for m in messages if m.get("role") == "system").lower()
    user_texts = [_message_text(m) for m in messages if m.get("role") == "user"]
    first_user = user_texts[0] if user_texts else ""
    json_mode = (body.get("response_format") or {}).get("type") == "json_object"
    if json_mode and "json" not in " ".join(_message_text(m) for m in messages).lower():
        # OpenAI's own rule: JSON mode needs the word JSON somewhere in the messages.
        raise OfflineModelError("'messages' must contain the word 'json' to use response_format json_object")

    topic_match = re.search(r"^Topic: (.+)$", first_user, flags=re.MULTILINE)
    topic = topic_match.group(1).strip() if topic_match else first_user.strip()[:80] or "the topic"

    if json_mode or "critic" in system or "editor" in system:
        role = "critic"
    elif "revis" in system:
        role = "reviser"
    elif "summar" in system:
        role = "summarizer"
    else:
        role = "writer"

    improvements_block = _labelled_block(first_user, "Improvements to make:")
    improvements_block = improvements_block.partition("Current report:")[0]
    improvements = tuple(
        line.strip()[2:].strip() for line in improvements_block.splitlines() if line.strip().startswith("- ")
    )
    document = ""
    for label in ("Current report:", "Report to review:", "Report to summarize:"):
        document = _labelled_block(first_user, label)
        if document:
            break
    return Request(role=role, topic=topic, document=document, improvements=improvements,
                   repair=REPAIR_REQUEST in first_user)


# --------------------------------------------------------------------------- writing


# A topic longer than this is named in full only in the title and the introduction; the rest of the report
# refers to it by its short form (``short_name``), as a writer would, so replies do not grow with it.
SHORT_NAME_CHARS = 40


def _keywords_in(text: str) -> list[str]:
    """The words of ``text`` (lower case, in order) that count as keywords, each cut to ``SHORT_NAME_CHARS``."""
    return [w[:SHORT_NAME_CHARS] for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS and len(w) > 2]


def short_name(topic: str) -> str:
    """How the report's body refers to ``topic``: the topic itself if it has at most ``SHORT_NAME_CHARS``
    characters, else its first words up to that many characters (a word boundary, no trailing stopwords or
    punctuation), or its first ``SHORT_NAME_CHARS`` characters if its first word is longer. If that names none
    of the topic's keywords (``_topic_keywords``, which the critic looks for in every section), its first word
    that does instead. Never longer than ``SHORT_NAME_CHARS``.
    """
    if len(topic) <= SHORT_NAME_CHARS:
        return topic
    words = topic[: SHORT_NAME_CHARS + 1].split()
    if len(words) > 1 and not topic[SHORT_NAME_CHARS].isspace():
        words.pop()  # the word cut in half
    if len(words) == 1 and len(words[0]) > SHORT_NAME_CHARS:  # one long word: cut it
        words = [words[0][:SHORT_NAME_CHARS]]
    while len(words) > 1 and (re.sub(r"\W+", "", words[-1]).lower() in STOPWORDS or not re.search(r"\w", words[-1])):
        words.pop()
    short = re.sub(r"[^\w)\]]+$", "", " ".join(words)) or " ".join(words)
    keywords = _keywords_in(topic)

    def names_a_keyword(name: str) -> bool:  # as the critic's focus check reads a section that names it
        return any(keyword in f"{name} ".lower() for keyword in keywords)

    if keywords and not names_a_keyword(short):
        candidates = (word[:SHORT_NAME_CHARS] for word in re.findall(r"\w+", topic))
        short = next((word for word in candidates if names_a_keyword(word)), keywords[0])
    return short


def _pick(options: tuple[str, ...], topic: str, salt: str) -> str:
    digest = hashlib.sha256(f"{salt}:{topic}".encode()).digest()
    return options[digest[0] % len(options)]


def _aspects_for(topic: str) -> list[str]:
    """A topic-specific, stable order of the aspects."""
    return sorted(ASPECTS, key=lambda aspect: hashlib.sha256(f"{topic}:{aspect}".encode()).hexdigest())


def _section(topic: str, aspect: str, sentences: int) -> str:
    pool = ASPECT_SENTENCES[aspect]
    start = hashlib.sha256(f"{aspect}:{topic}".encode()).digest()[0] % len(pool)
    name = short_name(topic)
    body = " ".join(pool[(start + i) % len(pool)].format(topic=name) for i in range(sentences))
    return f"## {aspect}\n\n{body}"


def write_draft(topic: str) -> str:
    """A deliberately first draft: a title, an introduction and one to three short sections.

    How much the first draft gets right depends on the topic (stably), so different
    topics start at different scores and take different paths to the threshold.
    """
    seed = hashlib.sha256(topic.encode()).digest()
    opener = _pick(OPENERS, topic, "opener").format(topic=topic)
    sections = 1 + seed[5] % 3
    parts = [
        f"# {topic}",
        f"## Introduction\n\n{opener} It summarises what matters most and where to start.",
        *(_section(topic, aspect, 2 + seed[6] % 2) for aspect in _aspects_for(topic)[:sections]),
    ]
    if seed[7] % 3 == 0:
        parts.append(_add_conclusion("", topic).strip())
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- critique


@dataclass(frozen=True)
class Check:
    name: str
    points: int
    improvement: str


CHECKS = (
    Check("title", 1, "Add a clear Markdown title (a '# ' heading) naming the topic."),
    Check("introduction", 1, "Add an Introduction section that states the purpose and scope."),
    Check("sections", 2, "Add more body sections: at least three, each covering one aspect."),
    Check("length", 2, "Expand the report to at least 350 words with more explanation."),
    Check("examples", 1, "Include at least two concrete examples ('for example', 'for instance')."),
    Check("figures", 1, "Add a bullet list of key figures, with numbers."),
    Check("conclusion", 1, "Add a Conclusion section that summarises the findings."),
    Check("focus", 1, "Mention the topic explicitly in every section."),
)


def _sections(markdown: str) -> list[tuple[str, str]]:
    """(heading, body) for every '## ' section."""
    chunks = re.split(r"^## +(.+)$", markdown, flags=re.MULTILINE)
    return [(chunks[i].strip(), chunks[i + 1]) for i in range(1, len(chunks) - 1, 2)]


def _topic_keywords(topic: str) -> set[str]:
    """The words a section must mention one of (the short form itself for a topic without any)."""
    return set(_keywords_in(topic)) or {short_name(topic).lower().strip()}


def measure(markdown: str, topic: str) -> dict[str, float]:
    """The fraction (0..1) of each check's points that the report earns."""
    sections = _sections(markdown)
    headings = [h.lower() for h, _ in sections]
    body_sections = [h for h in headings if h not in ("introduction", "conclusion")]
    words = _word_count(markdown)
    examples = len(re.findall(r"\b(for example|for instance|e\.g\.)", markdown, flags=re.IGNORECASE))
    keywords = _topic_keywords(topic)
    focused = all(any(k in body.lower() for k in keywords) for _, body in sections) if sections else False
    return {
        "title": 1.0 if re.search(r"^# \S", markdown, flags=re.MULTILINE) else 0.0,
        "introduction": 1.0 if "introduction" in headings else 0.0,
        "sections": 1.0 if len(body_sections) >= 3 else 0.5 if len(body_sections) == 2 else 0.0,
        "length": 1.0 if words >= 350 else 0.5 if words >= 200 else 0.0,
        "examples": 1.0 if examples >= 2 else 0.0,
        "figures": 1.0 if re.search(r"^[-*] .*\d", markdown, flags=re.MULTILINE) else 0.0,
        "conclusion": 1.0 if "conclusion" in headings else 0.0,
        "focus": 1.0 if focused else 0.0,
    }


def critique(markdown: str, topic: str) -> dict[str, Any]:
    earned = measure(markdown, topic)
    score = sum(check.points * earned[check.name] for check in CHECKS)
    passed = [check for check in CHECKS if earned[check.name] == 1.0]
    missing = [check for check in CHECKS if earned[check.name] < 1.0]
    strengths = [f"Meets the '{check.name}' criterion." for check in passed] or ["The report has a clear subject."]
    words = _word_count(markdown)
    return {
        "score": max(1, min(10, math.floor(score))),
        "strengths": strengths,
        "improvements": [check.improvement for check in missing],
        "summary": f"{len(passed)} of {len(CHECKS)} criteria met in {words} words.",
    }


def critic_reply(request: Request) -> dict[str, Any]:
    """The critique, or the unusable one a marker in the topic asks for (see the module docstring)."""
    result = critique(request.document, request.topic)
    topic = request.topic.lower()
    if UNREVIEWABLE in topic:
        return {**result, "score": 0}
    if NEEDS_REPAIR in topic and not request.repair:
        return {**result, "score": 11}
    return result


# --------------------------------------------------------------------------- revision


def _add_sections(markdown: str, topic: str) -> str:
    present = {h for h, _ in _sections(markdown)}
    missing = [a for a in _aspects_for(topic) if a not in present]
    needed = max(0, 3 - len([h for h in present if h.lower() not in ("introduction", "conclusion")]))
    additions = [_section(topic, aspect, 2) for aspect in missing[: max(needed, 1)]]
    return _insert_before_conclusion(markdown, "\n\n".join(additions))


def _word_count(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _expand(markdown: str, topic: str) -> str:
    """Lengthen every body section, then add whole sections until the report is long enough."""
    name = short_name(topic)
    out = []
    for block in re.split(r"(?=^## )", markdown, flags=re.MULTILINE):
        heading = block.splitlines()[0][3:].strip() if block.startswith("## ") else ""
        extra = [s.format(topic=name) for s in ASPECT_SENTENCES.get(heading, ()) if s.format(topic=name) not in block]
        if extra:
            block = block.rstrip() + " " + " ".join(extra) + "\n\n"
        out.append(block)
    expanded = "".join(out).rstrip() + "\n"
    present = {heading for heading, _ in _sections(expanded)}
    for aspect in _aspects_for(topic):
        if _word_count(expanded) >= 350:
            break
        if aspect not in present:
            expanded = _insert_before_conclusion(expanded, _section(topic, aspect, 3))
    if _word_count(expanded) < 350:
        expanded = re.sub(
            r"^## (?!Introduction|Conclusion)(.+)\n\n(.+)$",
            lambda m: f"## {m[1]}\n\n{m[2]} "
            + " ".join(e.format(topic=name, aspect=m[1].lower()) for e in ELABORATIONS),
            expanded,
            flags=re.MULTILINE,
        )
    return expanded


def _add_examples(markdown: str, topic: str) -> str:
    examples = " ".join(s.format(topic=short_name(topic)) for s in EXAMPLE_SENTENCES[:2])
    return _insert_before_conclusion(markdown, f"## Examples in Practice\n\n{examples}")


def _add_figures(markdown: str, topic: str) -> str:
    seed = hashlib.sha256(topic.encode()).digest()
    name = short_name(topic)
    bullets = "\n".join(
        [
            f"- Around {20 + seed[1] % 60}% of surveyed teams mention {name} in their plans.",
            f"- Pilot projects on {name} typically run for {2 + seed[2] % 10} to {12 + seed[3] % 12} weeks.",
            f"- {3 + seed[4] % 7} out of 10 early adopters report measurable savings.",
        ]
    )
    return _insert_before_conclusion(markdown, f"## Key Figures\n\nIllustrative figures for {name}:\n\n{bullets}")


def _add_conclusion(markdown: str, topic: str) -> str:
    return (
        markdown.rstrip()
        + f"\n\n## Conclusion\n\n{short_name(topic)} is worth the effort when it starts small, has clear owners and is "
        "reviewed regularly. The sections above outline the benefits, the risks and the first steps.\n"
    )


def _add_introduction(markdown: str, topic: str) -> str:
    intro = f"## Introduction\n\nThis report explains {topic}: what it is, why it matters and how to begin."
    title, sep, rest = markdown.partition("\n")
    if title.startswith("# "):
        return f"{title}\n\n{intro}\n{sep}{rest}"
    return f"{intro}\n\n{markdown}"


def _add_title(markdown: str, topic: str) -> str:
    return f"# {topic}\n\n{markdown.lstrip()}"


def _focus(markdown: str, topic: str) -> str:
    keywords = _topic_keywords(topic)
    out = []
    for block in re.split(r"(?=^## )", markdown, flags=re.MULTILINE):
        if block.startswith("## ") and not any(k in block.lower() for k in keywords):
            block = block.rstrip() + f" This matters directly for {short_name(topic)}.\n\n"
        out.append(block)
    return "".join(out)


def _insert_before_conclusion(markdown: str, addition: str) -> str:
    if not addition:
        return markdown
    head, found, tail = markdown.partition("\n## Conclusion\n")
    if found:
        return f"{head.rstrip()}\n\n{addition}\n{found}{tail}"
    return f"{markdown.rstrip()}\n\n{addition}\n"


FIXERS = (
    ("title", _add_title),
    ("introduction", _add_introduction),
    ("body sections", _add_sections),
    ("expand", _expand),
    ("example", _add_examples),
    ("figures", _add_figures),
    ("conclusion", _add_conclusion),
    ("mention the topic", _focus),
)
FIXES_PER_ROUND = 2


def revise(markdown: str, topic: str, improvements: tuple[str, ...]) -> str:
    """Address the first two improvements this model knows how to fix."""
    applied = 0
    for improvement in improvements:
        lowered = improvement.lower()
        fixer = next((fix for key, fix in FIXERS if key in lowered), None)
        if fixer is None:
            continue
        markdown = fixer(markdown, topic)
        applied += 1
        if applied == FIXES_PER_ROUND:
            break
    return markdown.rstrip() + "\n"


# --------------------------------------------------------------------------- summary


def _sentences(text: str) -> list[str]:
    prose = "\n".join(
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith(("#", "-", "*", "|"))
    )
    found = (s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", prose))
    return [s for s in found if len(s.split()) >= 5 and s.endswith((".", "!", "?"))]


def summarize(markdown: str, sentences: int = 3) -> str:
    """Extractive, as an editor skims: the introduction's lead, the most central section leads, the conclusion's lead.

    Section leads are ranked by how many of the report's frequent content words they carry.
    """
    frequency: dict[str, int] = {}
    for word in re.findall(r"\w+", markdown.lower()):
        if word not in STOPWORDS:
            frequency[word] = frequency.get(word, 0) + 1

    def weight(sentence: str) -> float:
        words = [w for w in re.findall(r"\w+", sentence.lower()) if w not in STOPWORDS]
        return sum(frequency.get(w, 0) for w in words) / math.sqrt(len(words) or 1)

    leads = {heading.lower(): found[0] for heading, body in _sections(markdown) if (found := _sentences(body))}
    opening, closing = leads.pop("introduction", None), leads.pop("conclusion", None)
    if not leads and not opening and not closing:
        return " ".join(_sentences(markdown)[:sentences]) or "The report is empty."
    room = sentences - (opening is not None) - (closing is not None)
    order = list(leads.values())
    middle = sorted(order, key=lambda s: (-weight(s), order.index(s)))[: max(room, 0)]
    middle.sort(key=order.index)  # keep the report's order
    return " ".join(s for s in (opening, *middle, closing) if s)


# --------------------------------------------------------------------------- the chat completion


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


# The longest reply each role gives, in estimated tokens: measured over drafts, ten rounds of critique and
# revision, and summaries of every version, for the tutorial's topics and thousands of topics up to the 200
# characters ``machinery.inputs`` allows, with spaces and without. A report names its topic in full only in the
# title and the introduction, and by ``short_name`` (at most ``SHORT_NAME_CHARS`` characters) everywhere else,
# so a longer topic adds to those two mentions only: for topics of up to 40 characters the longest are 380
# (writer), 1210 (reviser), 130 (critic) and 90 (summarizer); the longest below come from 200-character topics
# whose short form is a full 40 characters (no spaces in the first 40). A reply limit at or above these never
# cuts this model, and the pipeline's defaults (1500 for a report, 500 a critique, 400 a summary) are above them.
LONGEST_REPLY_TOKENS = {"writer": 461, "reviser": 1289, "critic": 130, "summarizer": 130}


class ContextExceededError(OfflineModelError):
    """A prompt that leaves no room for a reply in a small model's context (llama.cpp's HTTP 400)."""

    def __init__(self, prompt_tokens: int, context_tokens: int) -> None:
        super().__init__(f"request ({prompt_tokens} tokens) exceeds the available context size "
                         f"({context_tokens} tokens)")
        self.prompt_tokens, self.context_tokens = prompt_tokens, context_tokens


def reply_limit(body: dict[str, Any]) -> int | None:
    """The most tokens the reply may have: ``max_completion_tokens``, else ``max_tokens``; None: no limit."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OfflineModelError(f"Invalid '{name}': expected an integer of at least 1, got {value!r}")
        return value
    return None


def cut_to_tokens(text: str, tokens: int) -> str:
    """The first ``tokens`` tokens' worth of ``text`` (four characters each), ending at a word boundary if any."""
    head = text[: tokens * 4]
    if len(head) < len(text) and not text[len(head)].isspace():
        head = re.sub(r"\S+$", "", head) or head  # drop the cut word, unless it is all there is
    return head.rstrip()


def ramble(content: str, tokens: int) -> str:
    """``content``, then its last paragraph over and over, to more than ``tokens`` tokens: a model that never stops."""
    content = content.rstrip()
    paragraph = content.rpartition("\n\n")[2]
    repeats = math.ceil((tokens * 4 + 1 - len(content)) / (len(paragraph) + 2))
    return content + f"\n\n{paragraph}" * max(0, repeats)


def complete(body: dict[str, Any], *, served_model: str | None = None,
             context_tokens: int | None = None) -> dict[str, Any]:
    """Answer one ``/v1/chat/completions`` request body with a complete response body.

    ``served_model``: the ``model`` every reply names (default: the one the request named).
    ``context_tokens``: play a small local model with this context window (prompt and reply): without a reply
    limit it rambles until the context is full; with one, the reply is cut at the limit or the context's end.
    """
    request = parse_request(body)
    limit = reply_limit(body)
    if request.role == "critic":
        content = json.dumps(critic_reply(request))
    elif request.role == "reviser":
        content = revise(request.document, request.topic, request.improvements)
    elif request.role == "summarizer":
        content = summarize(request.document)
    else:
        content = write_draft(request.topic)
    prompt_tokens = sum(estimate_tokens(_message_text(m)) for m in body["messages"])
    if context_tokens is not None:
        room = context_tokens - prompt_tokens
        if room < 1:
            raise ContextExceededError(prompt_tokens, context_tokens)
        if limit is None:
            content = ramble(content, room)
        limit = room if limit is None else min(limit, room)
    completion_tokens, finish_reason = estimate_tokens(content), "stop"
    if limit is not None and completion_tokens > limit:
        # A real model stops generating at the limit: it reports the limit as its count, however the text ends.
        content, completion_tokens, finish_reason = cut_to_tokens(content, limit), limit, "length"
    request_hash = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
    return {
        "id": f"chatcmpl-offline-{request_hash}",
        "object": "chat.completion",
        "created": 0,
        "model": served_model or body.get("model") or MODEL_VERSION,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def models_list(names: tuple[str, ...] = (MODEL_VERSION,)) -> dict[str, Any]:
    """The body of ``GET /v1/models``, listing ``names``."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "local"}
                                       for name in names]}


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


def route(method: str, path: str, raw_body: bytes, *, served_models: tuple[str, ...] | None = None,
          context_tokens: int | None = None) -> tuple[int, dict[str, Any]]:
    """Serve one HTTP request: shared by the in-process transport and the loopback server.

    ``served_models`` and ``context_tokens`` make it a small local model (see ``OfflineServer``).
    """
    if method == "GET" and path.rstrip("/").endswith("/models"):
        return 200, models_list(served_models or (MODEL_VERSION,))
    if method == "POST" and path.rstrip("/").endswith("/chat/completions"):
        try:
            body = json.loads(raw_body or b"{}")
            return 200, complete(body, served_model=served_models[0] if served_models else None,
                                 context_tokens=context_tokens)
        except ContextExceededError as error:
            return 400, {"error": {"code": 400, "message": str(error), "type": "exceed_context_size_error",
                                   "n_prompt_tokens": error.prompt_tokens, "n_ctx": error.context_tokens}}
        except (OfflineModelError, ValueError, KeyError, TypeError, AttributeError) as error:
            return 400, _error_body(str(error), "invalid_request_error")
    return 404, _error_body(f"no route for {method} {path}", "not_found")


# --------------------------------------------------------------------------- in-process transport


def simulated_latency(payload: dict[str, Any], fixed: float, per_token: float) -> float:
    """Seconds a remote model would take: a fixed part plus a part per generated token."""
    if "choices" not in payload:
        return 0.0
    return fixed + per_token * payload.get("usage", {}).get("completion_tokens", 0)


class OfflineTransport(httpx2.AsyncBaseTransport):
    """Answers the openai client's HTTP requests in-process.

    ``latency`` seconds (plus ``per_token_latency`` per generated token) are
    slept per completion, to simulate a remote model in timing experiments
    (``asyncio.sleep``, so concurrent requests overlap).
    """

    def __init__(self, latency: float = 0.0, per_token_latency: float = 0.0) -> None:
        self.latency, self.per_token_latency = latency, per_token_latency

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        raw = await request.aread()
        status, payload = route(request.method, request.url.path, raw)
        delay = simulated_latency(payload, self.latency, self.per_token_latency) if status == 200 else 0.0
        if delay:
            await asyncio.sleep(delay)
        return httpx2.Response(status, json=payload)


def openai_client(transport: httpx2.AsyncBaseTransport, **options: Any) -> Any:
    """The real ``AsyncOpenAI`` client, answered in-process by ``transport``: no sockets, no network."""
    from openai import AsyncOpenAI

    return AsyncOpenAI(
        api_key="offline",
        base_url="http://offline.invalid/v1",  # never resolved: the transport answers
        http_client=httpx2.AsyncClient(transport=transport),
        **options,
    )


# --------------------------------------------------------------------------- loopback HTTP server


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*`` (Go's style), rounded up to the millisecond.

    ``0s``, ``12ms``, ``1s``, ``8.64s``, ``1m30.5s``, ``6m0s``, ``1h0m0s``.
    """
    millis = max(0, math.ceil(seconds * 1000 - 1e-6))
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs = f"{millis // 1000}.{millis % 1000:03d}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def jitter_factor(raw_body: bytes, jitter: float) -> float:
    """The factor a reply's latency is multiplied by: lognormal with median 1 and ``sigma = jitter``.

    Drawn from the request body's SHA-256 (no random state), so the same request always waits the
    same time; clipped at three sigma, so it lies in ``[exp(-3 * jitter), exp(3 * jitter)]``.
    """
    if jitter <= 0:
        return 1.0
    digest = hashlib.sha256(b"jitter:" + raw_body).digest()
    uniform = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64  # strictly inside (0, 1)
    z = max(-3.0, min(3.0, statistics.NormalDist().inv_cdf(uniform)))
    return math.exp(jitter * z)


@dataclass(frozen=True)
class Admission:
    """The token bucket's answer to one request."""

    allowed: bool
    remaining: int  # whole requests the bucket would admit right now, after this one
    retry_after: float  # seconds until the next token (0.0 when a token is available now)
    reset: float  # seconds until the bucket is full again


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` tokens per second; each admitted request takes one.

    Thread-safe. ``clock`` (seconds, monotonic) is injectable, so tests need no sleeps.
    """

    EPSILON = 1e-9  # float noise: 0.1 s at 10 tokens/s refills one whole token

    def __init__(self, rate: float, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.rate, self.capacity, self.clock = rate, capacity, clock
        self._lock = threading.Lock()
        self._tokens = float(capacity)
        self._updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(float(self.capacity), self._tokens + max(0.0, now - self._updated) * self.rate)
        self._updated = now

    def _admission(self, allowed: bool) -> Admission:
        tokens = self._tokens
        remaining = math.floor(tokens + self.EPSILON)
        retry_after = 0.0 if remaining >= 1 else max(0.0, (1.0 - tokens) / self.rate)
        return Admission(allowed, remaining, retry_after, max(0.0, (self.capacity - tokens) / self.rate))

    def take(self) -> Admission:
        """Take a token if there is one: ``allowed`` says whether the request may proceed."""
        with self._lock:
            self._refill()
            if self._tokens + self.EPSILON >= 1.0:
                self._tokens = max(0.0, self._tokens - 1.0)
                return self._admission(True)
            return self._admission(False)

    def peek(self) -> Admission:
        """The bucket's state now, taking nothing (``allowed``: would a request be admitted)."""
        with self._lock:
            self._refill()
            return self._admission(self._tokens + self.EPSILON >= 1.0)


@dataclass(frozen=True)
class ServerStats:
    """What an ``OfflineServer`` has seen, counted over ``/chat/completions`` requests only."""

    requests: int = 0  # chat-completion requests received
    rate_limited: int = 0  # of those, answered 429 (over the budget)
    completions: int = 0  # answered 200 with a completion
    errors: int = 0  # answered 400 (a body the model refuses)
    in_flight: int = 0  # being handled right now (from arrival until its reply is ready to send)
    peak_in_flight: int = 0  # the most ever handled at once


RECEIVED_KEPT = 1000  # chat-completion requests an OfflineServer remembers (the last ones)
DEFAULT_CONTEXT_TOKENS = 4096  # a rambling OfflineServer's context, prompt and reply: a small local model's


@dataclass(frozen=True)
class ReceivedRequest:
    """One chat-completion request as an ``OfflineServer`` received it (over the budget or refused ones too)."""

    body: dict[str, Any]  # the parsed JSON body
    role: str | None  # writer, critic, reviser or summarizer; None if the model cannot read the body
    model: Any  # the model the request named, as sent (None if it named none)
    max_tokens: Any  # the reply limit as sent: max_completion_tokens, else max_tokens (None: no limit)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ReceivedRequest:
        try:
            role: str | None = parse_request(body).role
        except (OfflineModelError, ValueError, KeyError, TypeError, AttributeError):
            role = None
        limit = body.get("max_completion_tokens")
        return cls(body, role, body.get("model"), body.get("max_tokens") if limit is None else limit)


def _number(value: float) -> str:
    """300.0 as ``300``, 0.5 as ``0.5``."""
    return str(int(value)) if float(value).is_integer() else str(value)


def rate_limit_error(requests_per_minute: float, burst: int, retry_after: float) -> dict[str, Any]:
    """The body of a 429, worded like OpenAI's."""
    return {
        "error": {
            "message": (
                f"Rate limit reached for requests per min (RPM) on {MODEL_VERSION}: "
                f"Limit: {_number(requests_per_minute)} / min, burst {burst}. "
                f"Please try again in {format_duration(retry_after)}."
            ),
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }


class _LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a reply still waiting out its latency does not hold up the process's exit

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client gave up (timed out, say) and closed its socket: nothing to report, as on a real server
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # without it every reply waits ~40 ms on delayed ACKs

    def reply(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.owner.handle(self, "GET", b"")  # type: ignore[attr-defined]

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        self.server.owner.handle(self, "POST", self.rfile.read(length))  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def default_burst(requests_per_minute: float) -> int:
    """Ten seconds' worth of the budget, at least one: 50 for 300 requests/minute."""
    return max(1, math.ceil(requests_per_minute / 6))


class OfflineServer:
    """The offline model on ``http://127.0.0.1:<port>/v1``; ``port=0`` picks a free one.

    * ``latency``, ``per_token_latency``: seconds slept per completion (fixed, and per token in the reply as
      sent, after any cut: a rambling reply is slow, a bounded one fast). A client whose timeout is shorter
      gives up first, every time; the server drops the late reply quietly.
    * ``jitter``: sigma of a lognormal factor on that latency (median 1, clipped at 3 sigma), drawn
      from the request body's hash: the same request waits the same time (``jitter_factor``).
    * ``requests_per_minute``: a budget over ``/chat/completions`` requests (``None``: unlimited), as a
      token bucket of ``burst`` tokens (default ``default_burst``: ten seconds' worth) refilled at
      ``requests_per_minute / 60`` per second. Over it: 429, ``rate_limit_error``'s body,
      ``retry-after-ms`` and ``retry-after`` (the time until the next token). ``GET /models`` is free.
    * ``ratelimit_headers``: with a budget, every chat-completion reply (200, 400 and 429) carries
      ``x-ratelimit-limit-requests`` (the budget per minute), ``x-ratelimit-remaining-requests``
      (whole tokens left in the bucket after this request) and ``x-ratelimit-reset-requests`` (until
      the bucket is full again, as ``format_duration`` writes it).
    * ``clock``: the bucket's clock (seconds, monotonic), for tests.

    A small local model, as llama.cpp serves one:

    * ``served_model``: the name, or names, ``GET /models`` lists (default: ``MODEL_VERSION``). Every reply's
      ``model`` is the first, whatever the request named.
    * ``ramble``: a request without ``max_tokens`` (or ``max_completion_tokens``) gets the reply, then its
      last paragraph repeated until prompt and reply fill ``context_tokens``, ``finish_reason`` ``"length"``.
      Every reply ends at the context's end, and a prompt of ``context_tokens`` or more gets an HTTP 400
      (``"type": "exceed_context_size_error"``). ``context_tokens`` means nothing without ``ramble``.

    Every server, like the in-process transport, cuts a reply longer than the request's ``max_tokens``
    (``finish_reason`` ``"length"``, ``completion_tokens`` equal to the limit).

    ``stats()`` is a snapshot of the counters (``ServerStats``); ``received()`` the last ``RECEIVED_KEPT``
    chat-completion requests (``ReceivedRequest``); ``reset_stats()`` zeroes the one and empties the other.
    Subclasses can override ``handle`` to shape replies (tests inject faults this way).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0,
                 per_token_latency: float = 0.0, *, requests_per_minute: float | None = None,
                 burst: int | None = None, ratelimit_headers: bool = False, jitter: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, served_model: str | tuple[str, ...] | None = None,
                 ramble: bool = False, context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> None:
        if jitter < 0:
            raise ValueError(f"jitter must not be negative, got {jitter}")
        if requests_per_minute is None and (burst is not None or ratelimit_headers):
            raise ValueError("burst and ratelimit_headers need a budget (requests_per_minute)")
        if requests_per_minute is not None and requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be positive, got {requests_per_minute}")
        served_models = (served_model,) if isinstance(served_model, str) else served_model
        if served_models is not None and (not served_models or not all(served_models)):
            raise ValueError(f"served_model must be one or more non-empty names, got {served_model!r}")
        if context_tokens < 1:
            raise ValueError(f"context_tokens must be at least 1, got {context_tokens}")
        self.latency, self.per_token_latency, self.jitter = latency, per_token_latency, jitter
        self.requests_per_minute = requests_per_minute
        self.ratelimit_headers = ratelimit_headers
        self.served_models: tuple[str, ...] | None = served_models
        self.ramble, self.context_tokens = ramble, context_tokens
        self.bucket: TokenBucket | None = None
        if requests_per_minute is not None:
            burst = default_burst(requests_per_minute) if burst is None else burst
            self.bucket = TokenBucket(requests_per_minute / 60, burst, clock)
        self._stats_lock = threading.Lock()
        self._stats = ServerStats()
        self._received: deque[ReceivedRequest] = deque(maxlen=RECEIVED_KEPT)
        self._stopping = threading.Event()  # wakes replies still waiting out their latency when the server stops
        self.httpd = _LoopbackHTTPServer((host, port), _Handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def burst(self) -> int | None:
        return self.bucket.capacity if self.bucket else None

    # ----------------------------------------------------------------- counters

    def stats(self) -> ServerStats:
        with self._stats_lock:
            return self._stats

    def received(self) -> list[ReceivedRequest]:
        """The last ``RECEIVED_KEPT`` chat-completion requests with a JSON object body, oldest first."""
        with self._stats_lock:
            return list(self._received)

    def reset_stats(self) -> None:
        """Zero the counters and forget the requests received.

        Requests in flight stay counted, so the peak restarts from them.
        """
        with self._stats_lock:
            self._stats = ServerStats(in_flight=self._stats.in_flight, peak_in_flight=self._stats.in_flight)
            self._received.clear()

    def _record(self, raw_body: bytes) -> None:
        try:
            body = json.loads(raw_body or b"{}")
        except ValueError:
            return  # not JSON: nothing a test could ask about; the reply is a 400
        if isinstance(body, dict):
            received = ReceivedRequest.from_body(body)
            with self._stats_lock:
                self._received.append(received)

    def _count(self, **changes: int) -> None:
        with self._stats_lock:
            counts = {name: getattr(self._stats, name) + change for name, change in changes.items()}
            peak = max(self._stats.peak_in_flight, counts.get("in_flight", 0))
            self._stats = replace(self._stats, **counts, peak_in_flight=peak)

    # ----------------------------------------------------------------- the budget

    def admit(self) -> tuple[Admission | None, dict[str, str]]:
        """Take a token for one chat-completion request: (the admission or None if unlimited, headers to send)."""
        if self.bucket is None:
            return None, {}
        admission = self.bucket.take()
        headers = {}
        if self.ratelimit_headers:
            headers.update({
                "x-ratelimit-limit-requests": _number(self.requests_per_minute or 0),
                "x-ratelimit-remaining-requests": str(admission.remaining),
                "x-ratelimit-reset-requests": format_duration(admission.reset),
            })
        if not admission.allowed:
            headers["retry-after-ms"] = str(max(1, math.ceil(admission.retry_after * 1000 - 1e-6)))
            headers["retry-after"] = str(max(1, math.ceil(admission.retry_after - 1e-9)))
        return admission, headers

    def delay_for(self, raw_body: bytes, payload: dict[str, Any]) -> float:
        """Seconds to wait before sending this completion: the latency, times the jitter factor."""
        return simulated_latency(payload, self.latency, self.per_token_latency) * jitter_factor(raw_body, self.jitter)

    # ----------------------------------------------------------------- serving

    def serve(self, method: str, path: str, raw_body: bytes) -> tuple[int, dict[str, Any]]:
        """``route``, as this server's model: the model it serves, and its context if it rambles."""
        return route(method, path, raw_body, served_models=self.served_models,
                     context_tokens=self.context_tokens if self.ramble else None)

    def handle(self, handler: _Handler, method: str, raw_body: bytes) -> None:
        if not (method == "POST" and handler.path.rstrip("/").endswith("/chat/completions")):
            status, payload = self.serve(method, handler.path, raw_body)
            handler.reply(status, payload)
            return
        self._record(raw_body)
        self._count(requests=1, in_flight=1)
        counted = False
        try:
            status, payload, headers = self.answer_completion(handler.path, raw_body)
            outcome = {200: "completions", 429: "rate_limited"}.get(status, "errors")
            self._count(in_flight=-1, **{outcome: 1})  # before the reply: a client that has it sees final counts
            counted = True
            handler.reply(status, payload, headers)
        finally:
            if not counted:
                self._count(in_flight=-1)

    def answer_completion(self, path: str, raw_body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, body, headers) for one chat-completion request: the budget, the model, the latency."""
        admission, headers = self.admit()
        if admission is not None and not admission.allowed:
            assert self.requests_per_minute is not None and self.bucket is not None
            return 429, rate_limit_error(self.requests_per_minute, self.bucket.capacity,
                                         admission.retry_after), headers
        status, payload = self.serve("POST", path, raw_body)
        if status == 200:
            self._stopping.wait(self.delay_for(raw_body, payload))
        return status, payload, headers

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OfflineServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="offline-llm", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> OfflineServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Serve the offline model as an OpenAI-compatible API.",
        epilog="As a stand-in for llama.cpp's llama-server: --served-model qwen2.5-0.5b-instruct-q4_k_m.gguf "
               "--ramble --per-token-latency 0.002")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8765, help="port (0 picks a free one; default 8765)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to wait per completion")
    parser.add_argument("--latency-per-token", "--per-token-latency", dest="latency_per_token", type=float,
                        default=0.0, metavar="SECONDS",
                        help="and seconds per token of the reply as sent (after a max_tokens cut)")
    parser.add_argument("--served-model", dest="served_models", action="append", metavar="NAME",
                        help="a model name GET /models lists, instead of the offline model's version (repeatable); "
                             "every reply names the first, whatever the request asked for, like llama.cpp")
    parser.add_argument("--ramble", action="store_true",
                        help="like a small local model: a request without max_tokens gets the reply, then its last "
                             "paragraph repeated until the context is full, finish_reason 'length'")
    parser.add_argument("--context-tokens", type=int, default=None, metavar="N",
                        help=f"the rambling model's context, prompt and reply (default {DEFAULT_CONTEXT_TOKENS}); "
                             "a prompt that fills it gets HTTP 400")
    parser.add_argument("--jitter", type=float, default=0.0,
                        help="sigma of a lognormal factor on the latency, fixed per request body (e.g. 0.5)")
    parser.add_argument("--rpm", type=float, default=None,
                        help="budget of chat-completion requests per minute (default: unlimited); over it, 429")
    parser.add_argument("--burst", type=int, default=None,
                        help="requests the budget admits at once (default: ten seconds' worth, rpm/6)")
    parser.add_argument("--ratelimit-headers", action="store_true",
                        help="send x-ratelimit-{limit,remaining,reset}-requests on every completion reply")
    return parser


def server_from_args(argv: list[str] | None = None) -> OfflineServer:
    """The server the command line asks for (bound, not yet serving)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rpm is None and (args.burst is not None or args.ratelimit_headers):
        parser.error("--burst and --ratelimit-headers need --rpm")
    if args.rpm is not None and args.rpm <= 0:
        parser.error("--rpm must be positive")
    if args.burst is not None and args.burst < 1:
        parser.error("--burst must be at least 1")
    if args.jitter < 0:
        parser.error("--jitter must not be negative")
    if args.context_tokens is not None and not args.ramble:
        parser.error("--context-tokens needs --ramble")
    if args.context_tokens is not None and args.context_tokens < 1:
        parser.error("--context-tokens must be at least 1")
    if args.served_models and not all(args.served_models):
        parser.error("--served-model needs a name")
    return OfflineServer(args.host, args.port, args.latency, args.latency_per_token,
                         requests_per_minute=args.rpm, burst=args.burst,
                         ratelimit_headers=args.ratelimit_headers, jitter=args.jitter,
                         served_model=tuple(args.served_models) if args.served_models else None,
                         ramble=args.ramble, context_tokens=args.context_tokens or DEFAULT_CONTEXT_TOKENS)


def main(argv: list[str] | None = None) -> None:
    server = server_from_args(argv)
    print(f"offline model {MODEL_VERSION} listening on {server.base_url}", flush=True)
    if server.bucket is not None:
        print(f"  budget: {_number(server.requests_per_minute or 0)} requests/minute, burst {server.burst}"
              + (", x-ratelimit headers" if server.ratelimit_headers else ""), flush=True)
    if server.served_models is not None:
        print(f"  serving: {', '.join(server.served_models)}", flush=True)
    if server.ramble:
        print(f"  rambling: replies without max_tokens fill the {server.context_tokens}-token context", flush=True)
    print(f"  export OPENAI_BASE_URL={server.base_url} OPENAI_API_KEY=offline", flush=True)
    try:
        server.httpd.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
