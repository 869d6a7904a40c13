"""machinery/progress.py: progress events as console lines, one per event worth a line."""

from __future__ import annotations

import pytest

from machinery.progress import StepLines, notable_line, print_notable

NOTABLE = [
    ({"topic": "Cats", "step": "retrying", "call": "draft", "attempt": 2, "attempts": 4,
      "reason": "HTTP 503 from the server"},
     "  Cats: retrying the draft (attempt 2 of 4): HTTP 503 from the server"),
    ({"topic": "Cats", "step": "still-waiting", "call": "critique", "seconds": 10.0},
     "  Cats: still waiting for the critique after 10 s"),
    ({"topic": "Cats", "step": "timed-out", "call": "revision", "seconds": 120.0},
     "  Cats: the revision got no reply within 120 s (REPORT_REQUEST_TIMEOUT)"),
    ({"topic": "Cats", "step": "cut-off", "call": "summary", "limit": 400},
     "  Cats: the summary was cut off at the reply limit of 400 tokens"),
    ({"topic": "Cats", "step": "cut-off", "call": "summary", "limit": 400, "shorter": True},
     "  Cats: the summary was cut off at the reply limit of 400 tokens, even the shorter retry"),
    ({"topic": "Cats", "step": "cut-off", "call": "summary", "limit": 400, "tokens": 400},
     "  Cats: the summary was cut off at the reply limit of 400 tokens"),
    # Stopped before its limit: the server's context (prompt plus reply) was full, not the limit reached.
    ({"topic": "Cats", "step": "cut-off", "call": "revision", "limit": 1500, "tokens": 210},
     "  Cats: the revision stopped after 210 tokens, before the reply limit of 1500 tokens: the model's context "
     "(prompt plus reply) is probably full; a larger context window (llama.cpp: -c, Ollama: num_ctx) or shorter "
     "prompts would help"),
    ({"topic": "Cats", "step": "cut-off", "call": "draft", "limit": 1500, "tokens": 90, "shorter": True},
     "  Cats: the draft stopped after 90 tokens, before the reply limit of 1500 tokens, even the shorter retry: the "
     "model's context (prompt plus reply) is probably full; a larger context window (llama.cpp: -c, Ollama: num_ctx) "
     "or shorter prompts would help"),
    # Whether Flyte retries the task is Flyte's to decide (the task's retries, which its context does not say):
    # the line names the task's attempt and promises nothing.
    ({"topic": "Cats", "step": "gave-up", "call": "draft", "attempts": 4, "reason": "HTTP 500 from the server",
      "task_attempt": 0},
     "  Cats: the draft failed after 4 attempt(s) (HTTP 500 from the server); Flyte retries the task if it has a "
     "retry left"),
    ({"topic": "Cats", "step": "gave-up", "call": "draft", "attempts": 4, "reason": "an empty reply",
      "task_attempt": 1},
     "  Cats: the draft failed after 4 attempt(s) (an empty reply) in the task's attempt 2; Flyte retries the task "
     "if it has a retry left"),
    ({"topic": None, "step": "other-model", "reported": "llama-3-8b", "recorded": "qwen"},
     "  the server answered as model llama-3-8b, not qwen (summary.json lists it under reported_models)"),
    ({"topic": None, "step": "rate-limited", "seconds": 2.0, "reason": "HTTP 429 from the server, retry after 2.0 s"},
     "  rate limit: new requests wait 2.0 s (HTTP 429 from the server, retry after 2.0 s)"),
]


@pytest.mark.parametrize(("event", "line"), NOTABLE, ids=[f"{e['step']}-{i}" for i, (e, _) in enumerate(NOTABLE)])
def test_each_notable_event_is_one_line(event, line, capsys):
    assert notable_line(event) == line
    print_notable(event)
    assert capsys.readouterr().out == line + "\n"


def test_ordinary_steps_print_nothing_so_offline_outputs_do_not_change(capsys):
    for step in ("draft", "critique", "scored", "revise", "format", "done", "error"):
        print_notable({"topic": "Cats", "step": step, "iteration": 1, "score": 7})
    assert capsys.readouterr().out == ""


def test_step_lines_follow_a_topic_through_its_rounds(capsys):
    lines = StepLines()
    events = [{"step": "draft"}, {"step": "critique", "iteration": 1}, {"step": "scored", "iteration": 1, "score": 6},
              {"step": "revise", "iteration": 1}, {"step": "critique", "iteration": 2},
              {"step": "scored", "iteration": 2, "score": 8}, {"step": "format"}, {"step": "done", "score": 8},
              {"step": "cut-off", "call": "draft", "limit": 9}]
    for event in events:
        lines({"topic": "Why cats purr", **event})
    lines({"topic": "Dogs", "step": "error", "error": "ModelTimeout: ..."})
    lines({"topic": None, "step": "rate-limited", "seconds": 2.0, "reason": "429"})
    assert capsys.readouterr().out.splitlines() == [
        "  Why cats purr: draft", "  Why cats purr: round 1 critique", "  Why cats purr: score 6/10",
        "  Why cats purr: round 1 revision", "  Why cats purr: round 2 critique", "  Why cats purr: score 8/10",
        "  Why cats purr: formatting", "  Why cats purr: done", "  Dogs: failed",
    ], "one line per step; the waits are print_notable's, not repeated"
