"""Progress events (``runtime.listening``) as console lines, one line per event worth a line.

* ``print_notable``: a wait a person should know about: a retry, a call still waiting after
  ``model_client.STILL_WAITING_AFTER`` seconds, a timeout, a reply cut off at its limit (or stopped
  short of it by a full context), a call given up to Flyte's task retry, if the task has one left
  (each naming the topic and the step), a pause for the server's rate limit, and a reply naming
  another model than the one recorded. ``run_batch`` always listens with it,
  so a terminal and a papermill log show them; ordinary steps print nothing, so an offline run's
  output does not change.
* ``StepLines()``: a topic's ordinary steps (draft, each round's critique, score and revision,
  formatting, done or failed), for the command line, which shows progress like the explorer's.

The event shapes are in ``machinery.runtime``'s docstring.
"""

from __future__ import annotations

from typing import Any

from machinery.model_client import LARGER_CONTEXT


def notable_line(event: dict[str, Any]) -> str | None:
    """The line for a notable event; None for an ordinary step."""
    step, topic, call = event.get("step"), event.get("topic"), event.get("call")
    if step == "rate-limited":
        return f"  rate limit: new requests wait {event['seconds']:.1f} s ({event['reason']})"
    if step == "still-waiting":
        return f"  {topic}: still waiting for the {call} after {event['seconds']:g} s"
    if step == "retrying":
        return f"  {topic}: retrying the {call} (attempt {event['attempt']} of {event['attempts']}): {event['reason']}"
    if step == "timed-out":
        return f"  {topic}: the {call} got no reply within {event['seconds']:g} s (REPORT_REQUEST_TIMEOUT)"
    if step == "cut-off":
        again = ", even the shorter retry" if event.get("shorter") else ""
        limit, tokens = event["limit"], event.get("tokens")
        if tokens is not None and tokens < limit:  # stopped short of its limit: the context was full
            return (f"  {topic}: the {call} stopped after {tokens} tokens, before the reply limit of {limit} tokens"
                    f"{again}: the model's context (prompt plus reply) is probably full; a larger context window "
                    f"({LARGER_CONTEXT}) or shorter prompts would help")
        return f"  {topic}: the {call} was cut off at the reply limit of {limit} tokens{again}"
    if step == "gave-up":
        # Whether Flyte runs the task again depends on the retries it has left, which its context does not say.
        attempt = event.get("task_attempt") or 0
        task = f" in the task's attempt {attempt + 1}" if attempt else ""
        return (f"  {topic}: the {call} failed after {event['attempts']} attempt(s) ({event['reason']}){task}; "
                "Flyte retries the task if it has a retry left")
    if step == "other-model":
        return (f"  the server answered as model {event['reported']}, not {event['recorded']} "
                "(summary.json lists it under reported_models)")
    return None


def print_notable(event: dict[str, Any]) -> None:
    """A progress listener: one line per notable event (``notable_line``), nothing for ordinary steps."""
    if (line := notable_line(event)) is not None:
        print(line, flush=True)


class StepLines:
    """A progress listener that prints one line per ordinary step of each topic. A topic's outcome (its
    score, or its error) is left to the lines the command line prints at the end, one per topic."""

    @staticmethod
    def line(event: dict[str, Any]) -> str | None:
        step, topic, round_ = event.get("step"), event.get("topic"), event.get("iteration")
        text = {
            "draft": "draft",
            "critique": f"round {round_} critique",
            "scored": f"score {event.get('score')}/10",
            "revise": f"round {round_} revision",
            "format": "formatting",
            "done": "done",
            "error": "failed",
        }.get(step)
        return f"  {topic}: {text}" if text and topic is not None else None

    def __call__(self, event: dict[str, Any]) -> None:
        if (line := self.line(event)) is not None:
            print(line, flush=True)
