"""Bad input gets one clear ValueError, naming the parameter, the value and what is allowed."""

from __future__ import annotations

import pytest

import pipeline

GOOD = ["Quantum computing"]

CASES = [
    # (topics, max_iterations, quality_threshold, words the message must contain)
    ([], 3, 8, ["topics is empty"]),
    ("Quantum computing", 3, 8, ["topics must be a list", "str"]),
    (None, 3, 8, ["topics must be a list", "NoneType"]),
    (["   "], 3, 8, ["topic #1 is blank"]),
    (["ok", ""], 3, 8, ["topic #2 is blank"]),
    ([42], 3, 8, ["topic #1 must be a string", "int"]),
    (["x" * (pipeline.MAX_TOPIC_LENGTH + 1)], 3, 8, ["topic #1", f"at most {pipeline.MAX_TOPIC_LENGTH}"]),
    (["a\nb"], 3, 8, ["line break"]),
    ([f"t{i}" for i in range(pipeline.MAX_TOPICS + 1)], 3, 8, [f"at most {pipeline.MAX_TOPICS}"]),
    (["AI", "Cats", "AI"], 3, 8, ["topic #3 'AI' repeats topic #1"]),
    (["AI", " AI "], 3, 8, ["repeats topic #1"]),
    (GOOD, 0, 8, ["max_iterations", "1 to 10", "0"]),
    (GOOD, 11, 8, ["max_iterations", "11"]),
    (GOOD, "3", 8, ["max_iterations", "'3'"]),
    (GOOD, 2.5, 8, ["max_iterations", "2.5"]),
    (GOOD, True, 8, ["max_iterations", "True"]),
    (GOOD, 3, 0, ["quality_threshold", "0"]),
    (GOOD, 3, 11, ["quality_threshold", "11"]),
    (GOOD, 3, None, ["quality_threshold", "None"]),
]


@pytest.mark.parametrize(("topics", "iterations", "threshold", "expected"), CASES)
def test_bad_input_is_rejected_with_a_clear_message(topics, iterations, threshold, expected):
    with pytest.raises(ValueError) as caught:
        pipeline.validate_batch(topics, iterations, threshold)
    for words in expected:
        assert words in str(caught.value)


@pytest.mark.parametrize(("topics", "iterations", "threshold", "expected"), CASES[:4])
def test_run_batch_rejects_before_any_llm_call(topics, iterations, threshold, expected, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(pipeline, "make_client", lambda config: calls.append(config))
    with pytest.raises(ValueError):
        pipeline.run_batch(topics, max_iterations=iterations, quality_threshold=threshold, output_dir=tmp_path)
    assert calls == []
    assert list(tmp_path.iterdir()) == []


def test_valid_awkward_topics_pass_and_are_trimmed():
    topics = [" Kubernetes: cost ", "<b>markup</b>", "🚀 emoji", "עברית", "a/b\\c", "AI", "ai"]
    assert pipeline.validate_batch(topics, 1, 10) == [t.strip() for t in topics]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"REPORT_BACKEND": "anthropic"}, "REPORT_BACKEND='anthropic' is not a known backend"),
        ({"REPORT_MAX_CONCURRENCY": "0"}, "REPORT_MAX_CONCURRENCY='0' must be a whole number of at least 1"),
        ({"REPORT_MAX_CONCURRENCY": "many"}, "REPORT_MAX_CONCURRENCY='many'"),
        ({"REPORT_OFFLINE_LATENCY": "-1"}, "REPORT_OFFLINE_LATENCY='-1'"),
        ({"REPORT_REQUEST_TIMEOUT": "soon"}, "REPORT_REQUEST_TIMEOUT='soon'"),
    ],
)
def test_bad_settings_are_named(environ, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        pipeline.Settings.from_env(environ)


def test_backend_defaults_follow_the_environment():
    assert pipeline.Settings.from_env({}).backend == "offline"
    assert pipeline.Settings.from_env({"OPENAI_API_KEY": "sk-x"}).backend == "openai"
    assert pipeline.Settings.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}).backend == "openai"
    assert pipeline.Settings.from_env({"OPENAI_API_KEY": "sk-x", "REPORT_BACKEND": "offline"}).backend == "offline"
    assert pipeline.Settings.from_env({"REPORT_BACKEND": " OpenAI "}).backend == "openai"


def test_openai_backend_without_a_key_fails_before_any_call(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = pipeline.Settings.from_env({"REPORT_BACKEND": "openai"})
    with pytest.raises(ValueError, match="needs OPENAI_API_KEY"):
        config.check_ready()


def test_describe_never_shows_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-canary-1234567890")
    config = pipeline.Settings.from_env({"OPENAI_API_KEY": "sk-canary-1234567890", "REPORT_MODEL": "qwen2.5:1.5b",
                                          "OPENAI_BASE_URL": "http://localhost:11434/v1"})
    text = config.describe()
    assert "qwen2.5:1.5b" in text and "localhost:11434" in text
    assert "canary" not in text and "canary" not in repr(config)


def test_an_unreachable_server_stops_the_batch_before_any_topic(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-unreachable")
    pipeline.configure(backend="openai", base_url="http://127.0.0.1:9/v1")  # port 9 (discard): nothing listens
    try:
        with pytest.raises(pipeline.BackendUnavailable) as caught:
            pipeline.run_batch(["Cats"], output_dir=tmp_path)
    finally:
        pipeline.configure(backend="offline", base_url=None)
    message = str(caught.value)
    assert "Cannot reach the model server at http://127.0.0.1:9/v1" in message and "OPENAI_BASE_URL" in message
    assert "sk-test-unreachable" not in message
    assert list(tmp_path.iterdir()) == []


def test_a_bad_run_history_switch_is_named():
    with pytest.raises(ValueError, match="REPORT_RUN_HISTORY='maybe' must be 'on' or 'off'"):
        pipeline.Settings.from_env({"REPORT_RUN_HISTORY": "maybe"})
