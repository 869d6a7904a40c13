"""pipeline.py, prompts and traced steps: what each step asks the model, and the critique's validation and repair.

The steps are awaited directly (as a notebook cell does), through the real openai client in front of
a scripted offline model (``scripted_model``); the batch around them is in test_pipeline_batch.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import flyte.errors
import httpx2
import pytest
from helpers import Rewrite, ScriptedTransport, replies_in_turn, scripted_model
from pydantic import ValidationError

import pipeline
from machinery import offline_llm
from machinery.model_client import ReplyCutOff, metering
from machinery.runtime import runtime

DRAFT = offline_llm.write_draft("Cats")
VALID = json.dumps({"score": 6, "strengths": ["clear"], "improvements": ["Add a conclusion."], "summary": "ok"})


def run_metered(step, *args):
    """Run one traced step on a fresh loop; return its result and the usage it recorded."""

    async def go():
        with metering() as meter:
            return await step(*args), meter.total

    return asyncio.run(go())


# ----------------------------------------------------------------------------------------- prompts and records


def test_the_critic_prompt_asks_for_exactly_the_critique_fields():
    for name, field in pipeline.Critique.model_fields.items():
        assert f'"{name}": {field.description};' in pipeline.CRITIC_PROMPT
    assert "JSON" in pipeline.CRITIC_PROMPT, "JSON mode needs the word in the messages"
    assert pipeline.CRITIC_PROMPT.count('": ') == len(pipeline.Critique.model_fields)


def test_a_critique_is_validated_not_hoped_for():
    critique = pipeline.Critique.model_validate_json(VALID.replace("}", ', "mood": "chatty"}'))
    assert critique.score == 6 and not hasattr(critique, "mood"), "extra keys are ignored"
    for bad in ({"score": 11}, {"score": 0}, {"score": "high"}):
        with pytest.raises(ValidationError):
            pipeline.Critique.model_validate({**json.loads(VALID), **bad})


def test_a_round_is_a_critique_with_its_number():
    critique = pipeline.Critique.model_validate_json(VALID)
    round_ = pipeline.Round(iteration=2, **critique.model_dump())
    assert isinstance(round_, pipeline.Critique) and round_.iteration == 2 and round_.score == 6
    result = pipeline.RefineResult(topic="Cats", markdown=DRAFT, history=[round_, round_.model_copy(
        update={"iteration": 3, "score": 9})], model="m", usage=pipeline.Usage())
    assert (result.iterations, result.final_score) == (2, 9)


# ----------------------------------------------------------------------------------------- what each step asks


def test_each_step_sends_its_prompt_and_the_settings_model():
    async def steps():
        draft = await pipeline.write_draft("Cats")
        await pipeline.critique_draft("Cats", draft)
        await pipeline.revise_draft("Cats", draft, ["Add a conclusion.", "Add examples."])
        await pipeline.summarize_report("Cats", draft)

    with runtime.configured(reply_cache=None), scripted_model() as transport:
        asyncio.run(steps())
    roles = [role for role, _ in transport.log]
    assert roles == ["writer", "critic", "reviser", "summarizer"]
    systems = [body["messages"][0]["content"] for body in transport.bodies]
    assert systems == [pipeline.WRITER_PROMPT, pipeline.CRITIC_PROMPT, pipeline.REVISER_PROMPT,
                       pipeline.SUMMARY_PROMPT]
    assert all(body["model"] == runtime.model_name and body["temperature"] == 0.2 for body in transport.bodies)
    settings = runtime.settings
    assert [body["max_tokens"] for body in transport.bodies] == [
        settings.max_tokens_report, settings.max_tokens_critique, settings.max_tokens_report,
        settings.max_tokens_summary], "each step's own reply limit"
    json_mode = [body.get("response_format") for body in transport.bodies]
    assert json_mode == [None, {"type": "json_object"}, None, None], "only the critic asks for JSON"
    revise = transport.prompts("reviser")[0]
    assert "- Add a conclusion.\n- Add examples." in revise and revise.endswith(DRAFT)


def test_a_revision_without_improvements_still_asks_for_something():
    with scripted_model() as transport:
        asyncio.run(pipeline.revise_draft("Cats", DRAFT, []))
    assert "- Tighten the wording." in transport.prompts("reviser")[0]


def test_call_llm_uses_the_model_and_the_reply_limits_in_force():
    with runtime.configured(backend="openai", model="gpt-4.1-mini", max_tokens_report=700, max_tokens_summary=90), \
            scripted_model() as transport:
        asyncio.run(pipeline.call_llm("Cats", "draft", "You are a report writer.", "Topic: Cats"))
        asyncio.run(pipeline.call_llm("Cats", "summary", pipeline.SUMMARY_PROMPT, "Topic: Cats"))
    assert [(body["model"], body["max_tokens"]) for body in transport.bodies] == [("gpt-4.1-mini", 700),
                                                                                ("gpt-4.1-mini", 90)]


def test_call_llm_refuses_a_step_without_a_reply_limit():
    with scripted_model() as transport, pytest.raises(ValueError, match="step 'polish' is not one of draft, "):
        asyncio.run(pipeline.call_llm("Cats", "polish", "You are a report writer.", "Topic: Cats"))
    assert transport.log == []


def test_usage_adds_up_over_the_steps():
    async def steps():
        draft = await pipeline.write_draft("Cats")
        return await pipeline.critique_draft("Cats", draft)

    _, usage = run_metered(steps)
    assert usage.requests == 2
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# ----------------------------------------------------------------------------------------- critique repair


@pytest.mark.parametrize(
    ("bad_reply", "quoted"),
    [
        ("not json at all", "Invalid JSON"),
        ('{"score": 7, "strengths": [], "improvements": []', "EOF while parsing"),
        (json.dumps({"score": 11, "strengths": [], "improvements": [], "summary": "s"}), "less than or equal to 10"),
        (json.dumps({"score": 0, "strengths": [], "improvements": [], "summary": "s"}), "greater than or equal to 1"),
        (json.dumps({"strengths": [], "improvements": [], "summary": "s"}), "score: Field required"),
        ("[1, 2, 3]", "Input should be an object"),
    ],
)
def test_a_bad_critique_gets_one_repair_request_that_quotes_the_error(bad_reply, quoted):
    with scripted_model(replies_in_turn("critic", bad_reply)) as transport:
        critique, usage = run_metered(pipeline.critique_draft, "Cats", DRAFT)
    assert transport.count("critic") == 2
    assert usage.requests == 2
    first, repair = transport.prompts("critic")
    assert quoted not in first and quoted in repair, repair[:300]
    assert "Your previous reply could not be used" in repair and repair.endswith(DRAFT)
    assert "score, strengths, improvements, summary" in repair
    assert "https://errors.pydantic.dev" not in repair, "no pydantic URLs in the prompt"
    assert critique == pipeline.Critique.model_validate(offline_llm.critique(DRAFT, "Cats"))


def test_an_empty_reply_is_asked_again_not_repaired():
    with scripted_model(replies_in_turn("critic", "", "  \n")) as transport:
        critique, usage = run_metered(pipeline.critique_draft, "Cats", DRAFT)
    assert transport.count("critic") == 3, "two empty replies, then the same request once more"
    assert usage.requests == 3
    assert not any("could not be used" in prompt for prompt in transport.prompts("critic"))
    assert critique.score == offline_llm.critique(DRAFT, "Cats")["score"]


def test_a_critique_invalid_twice_is_a_clear_error():
    with scripted_model(replies_in_turn("critic", '{"score": "high"}', '{"score": 12}')) as transport, \
            pytest.raises(pipeline.CritiqueError) as caught:
        asyncio.run(pipeline.critique_draft("Cats", DRAFT))
    message = str(caught.value)
    assert "'Cats'" in message and "invalid twice" in message and "score" in message
    assert transport.count("critic") == 2, "exactly one repair request, no more"
    assert isinstance(caught.value, flyte.errors.NonRecoverableError), "Flyte does not retry it"
    assert caught.value.code == "CritiqueError"


def test_the_offline_needs_repair_marker_costs_exactly_one_repair_request():
    """The notebooks show a repair with the offline model alone: no test double rewrites the reply."""
    topic = "Why cats purr (needs repair)"
    draft = offline_llm.write_draft(topic)
    with scripted_model() as transport:
        critique, usage = run_metered(pipeline.critique_draft, topic, draft)
    assert transport.count("critic") == 2 and usage.requests == 2
    first, repair = transport.prompts("critic")
    assert offline_llm.REPAIR_REQUEST not in first
    assert repair.startswith(f"Topic: {topic}\n\n{offline_llm.REPAIR_REQUEST}: "
                             "score: Input should be less than or equal to 10 (got '11')"), repair[:200]
    assert critique == pipeline.Critique.model_validate(offline_llm.critique(draft, topic))


def test_the_offline_unreviewable_marker_fails_fast_with_a_critique_error():
    topic = "Dogs (unreviewable)"
    started = time.perf_counter()
    with scripted_model() as transport, pytest.raises(pipeline.CritiqueError) as caught:
        asyncio.run(pipeline.critique_draft(topic, offline_llm.write_draft(topic)))
    assert time.perf_counter() - started < 1.0
    assert str(caught.value) == (
        "The critic's reply for 'Dogs (unreviewable)' was invalid twice (after one repair request): "
        "score: Input should be greater than or equal to 1 (got '0')"
    )
    assert transport.count("critic") == 2
    assert isinstance(caught.value, flyte.errors.NonRecoverableError)


def test_a_score_given_as_a_string_is_accepted():
    with scripted_model(replies_in_turn("critic", VALID.replace("6", '"6"', 1))):
        assert asyncio.run(pipeline.critique_draft("Cats", DRAFT)).score == 6


def test_extra_keys_in_a_critique_are_not_an_error():
    chatty = VALID.replace("}", ', "confidence": 0.9, "notes": ["x"]}')
    with scripted_model(replies_in_turn("critic", chatty)) as transport:
        assert asyncio.run(pipeline.critique_draft("Cats", DRAFT)).score == 6
    assert transport.count("critic") == 1


def test_validation_summary_is_short_and_names_the_fields():
    with pytest.raises(ValidationError) as caught:
        pipeline.Critique.model_validate({"score": 99, "strengths": "not a list", "summary": "s" * 500})
    summary = pipeline.validation_summary(caught.value)
    assert summary.startswith("score: Input should be less than or equal to 10 (got '99')")
    assert "improvements: Field required" in summary and "(got" not in summary.split("improvements:")[1]
    assert summary.count("; ") == 2, "at most three problems"
    assert "https://" not in summary
    with pytest.raises(ValidationError) as caught:
        pipeline.Critique.model_validate_json("[]")
    assert pipeline.validation_summary(caught.value).startswith("reply: ")


def test_current_run_is_empty_outside_a_task():
    assert pipeline.current_run() == ""


# ----------------------------------------------------------------------------------------- replies cut off


class CutOff(ScriptedTransport):
    """The offline model (its replies rewritten by ``rewrite``, if given), except that the replies in ``role``
    numbered in ``cut`` (1: the first) stop at their limit, unfinished: ``finish_reason`` "length", as a
    server says when ``max_tokens`` ends a reply."""

    def __init__(self, role: str, cut: set[int], rewrite: Rewrite | None = None) -> None:
        super().__init__(rewrite)
        self.role, self.cut = role, cut

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        if not request.url.path.endswith("/chat/completions") or self.count(self.role) not in self.cut \
                or self.log[-1][0] != self.role:
            return response
        payload = json.loads(response.content)
        choice = payload["choices"][0]
        choice["message"]["content"], choice["finish_reason"] = choice["message"]["content"][:40], "length"
        payload["usage"]["completion_tokens"] = json.loads(request.content)["max_tokens"]  # as a server's limit ends it
        return httpx2.Response(200, json=payload)


def test_a_critique_cut_off_gets_the_repair_request_saying_so():
    transport = CutOff("critic", cut={1})
    with runtime.use_transport(transport):
        critique, usage = run_metered(pipeline.critique_draft, "Cats", DRAFT)
    first, repair = transport.prompts("critic")
    assert repair.startswith(f"Topic: Cats\n\n{offline_llm.REPAIR_REQUEST}: it was cut off at the limit of 500 "
                             "tokens; keep every string short\n"), repair[:200]
    assert critique == pipeline.Critique.model_validate(offline_llm.critique(DRAFT, "Cats"))
    assert (usage.requests, usage.cut_off) == (2, 1)


def test_a_critique_cut_off_twice_is_a_critique_error_naming_the_setting():
    with runtime.use_transport(CutOff("critic", cut={1, 2})), pytest.raises(pipeline.CritiqueError) as caught:
        asyncio.run(pipeline.critique_draft("Cats", DRAFT))
    assert str(caught.value) == ("The critic's reply for 'Cats' was invalid twice (after one repair request): the "
                                 "reply hit the limit of 500 tokens (raise REPORT_MAX_TOKENS_CRITIQUE for longer "
                                 "replies)")


def test_an_invalid_critique_whose_repair_is_cut_off_says_it_hit_the_limit():
    transport = CutOff("critic", cut={2}, rewrite=replies_in_turn("critic", "not json"))
    with runtime.use_transport(transport), pytest.raises(pipeline.CritiqueError) as caught:
        asyncio.run(pipeline.critique_draft("Cats", DRAFT))
    assert "Invalid JSON" in transport.prompts("critic")[1], "the repair quoted the first problem"
    assert str(caught.value).endswith("the reply hit the limit of 500 tokens (raise REPORT_MAX_TOKENS_CRITIQUE for "
                                      "longer replies)")


STEPS = {  # step -> (role, how to run it, the prompt it sends, the setting of its limit)
    "draft": ("writer", lambda: pipeline.write_draft("Cats"), pipeline.WRITER_PROMPT, "REPORT_MAX_TOKENS_REPORT"),
    "revision": ("reviser", lambda: pipeline.revise_draft("Cats", DRAFT, ["Add a conclusion."]),
                 pipeline.REVISER_PROMPT, "REPORT_MAX_TOKENS_REPORT"),
    "summary": ("summarizer", lambda: pipeline.summarize_report("Cats", DRAFT), pipeline.SUMMARY_PROMPT,
                "REPORT_MAX_TOKENS_SUMMARY"),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_text_cut_off_is_asked_once_more_for_a_shorter_one(step):
    role, run, system, _ = STEPS[step]
    transport = CutOff(role, cut={1})
    with runtime.use_transport(transport):
        text, usage = run_metered(run)
    assert transport.count(role) == 2 and (usage.requests, usage.cut_off) == (2, 1)
    first, second = (body for body, (r, _) in zip(transport.bodies, transport.log) if r == role)
    limit = first["max_tokens"]
    assert first["messages"][0]["content"] == system
    assert second["messages"][0]["content"] == (
        f"{system}\nYour previous reply was cut off at the limit of {limit} tokens. This time the whole reply must "
        f"fit in {limit} tokens: at most {limit // 2} words, fewer than asked above if need be.")
    assert second["messages"][1:] == first["messages"][1:] and second["max_tokens"] == limit
    assert len(text) > 40, "the second, whole reply"


@pytest.mark.parametrize("step", list(STEPS))
def test_a_text_cut_off_twice_ends_the_topic_naming_the_setting(step):
    role, run, _, setting = STEPS[step]
    transport = CutOff(role, cut={1, 2})
    with runtime.use_transport(transport), pytest.raises(ReplyCutOff) as caught:
        asyncio.run(run())
    limit = runtime.settings.reply_limit(step)
    assert str(caught.value) == (f'Cats: the {step} hit the reply limit of {limit} tokens and was cut off '
                                 f'(finish_reason "length"), even though a shorter reply was asked for. '
                                 f'Raise {setting} for longer replies.')
    assert transport.count(role) == 2, "one shorter retry, no more"
