"""machinery/settings.py: environment variables -> Settings, with errors that name the variable."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from machinery import offline_llm
from machinery.settings import NUMBERS, OPENAI_URL, PROJECT_ROOT, Settings

KEY = "sk-canary-1234567890abcdef"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"REPORT_BACKEND": "anthropic"}, "REPORT_BACKEND='anthropic' is not a known backend"),
        ({"REPORT_MAX_CONCURRENCY": "0"}, "REPORT_MAX_CONCURRENCY='0' must be a whole number of at least 1"),
        ({"REPORT_MAX_CONCURRENCY": "many"}, "REPORT_MAX_CONCURRENCY='many'"),
        ({"REPORT_MAX_CONCURRENCY": "2.5"}, "REPORT_MAX_CONCURRENCY='2.5'"),
        ({"REPORT_CLIENT_RETRIES": "-1"}, "REPORT_CLIENT_RETRIES='-1' must be a whole number of at least 0"),
        ({"REPORT_OFFLINE_LATENCY": "-1"}, "REPORT_OFFLINE_LATENCY='-1'"),
        ({"REPORT_OFFLINE_LATENCY_PER_TOKEN": "nan"}, "REPORT_OFFLINE_LATENCY_PER_TOKEN='nan'"),
        ({"REPORT_REQUEST_TIMEOUT": "soon"}, "REPORT_REQUEST_TIMEOUT='soon'"),
        ({"REPORT_REQUEST_TIMEOUT": "0"}, "REPORT_REQUEST_TIMEOUT='0' must be a number of seconds"),
        ({"REPORT_RUN_HISTORY": "maybe"}, "REPORT_RUN_HISTORY='maybe' must be 'on' or 'off'"),
        ({"REPORT_RATE_LIMIT_PATIENCE": "-1"},
         "REPORT_RATE_LIMIT_PATIENCE='-1' must be a number of seconds, at least 0"),
        ({"REPORT_RATE_LIMIT_PATIENCE": "a while"}, "REPORT_RATE_LIMIT_PATIENCE='a while'"),
        ({"REPORT_MAX_TOKENS_REPORT": "0"}, "REPORT_MAX_TOKENS_REPORT='0' must be a whole number of at least 1"),
        ({"REPORT_MAX_TOKENS_CRITIQUE": "lots"}, "REPORT_MAX_TOKENS_CRITIQUE='lots' must be a whole number"),
        ({"REPORT_MAX_TOKENS_SUMMARY": "1.5"}, "REPORT_MAX_TOKENS_SUMMARY='1.5' must be a whole number"),
    ],
)
def test_bad_settings_are_named(environ, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        Settings.from_env(environ)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("backend", "foo", "backend='foo' (REPORT_BACKEND) is not a known backend: use 'offline' (built-in model"),
        ("backend", "OpenAI", "backend='OpenAI' (REPORT_BACKEND) is not a known backend"),
        ("backend", None, "backend=None (REPORT_BACKEND) is not a known backend"),
        ("max_concurrency", 0, "max_concurrency=0 (REPORT_MAX_CONCURRENCY) must be a whole number of at least 1"),
        ("max_concurrency", 2.5, "max_concurrency=2.5 (REPORT_MAX_CONCURRENCY) must be a whole number of at least 1"),
        ("max_concurrency", "4", "max_concurrency='4' (REPORT_MAX_CONCURRENCY) must be a whole number"),
        ("max_concurrency", True, "max_concurrency=True (REPORT_MAX_CONCURRENCY) must be a whole number"),
        ("client_retries", -1, "client_retries=-1 (REPORT_CLIENT_RETRIES) must be a whole number of at least 0"),
        ("max_tokens_report", 0, "max_tokens_report=0 (REPORT_MAX_TOKENS_REPORT) must be a whole number of at least 1"),
        ("max_tokens_critique", -5, "max_tokens_critique=-5 (REPORT_MAX_TOKENS_CRITIQUE) must be a whole number"),
        ("max_tokens_summary", None, "max_tokens_summary=None (REPORT_MAX_TOKENS_SUMMARY) must be a whole number"),
        ("request_timeout", 0,
         "request_timeout=0 (REPORT_REQUEST_TIMEOUT) must be a number of seconds, at least 0.001"),
        ("request_timeout", float("nan"), "request_timeout=nan (REPORT_REQUEST_TIMEOUT) must be a number of seconds"),
        ("rate_limit_patience", -1, "rate_limit_patience=-1 (REPORT_RATE_LIMIT_PATIENCE) must be a number of seconds"),
        ("offline_latency", "0.2", "offline_latency='0.2' (REPORT_OFFLINE_LATENCY) must be a number of seconds"),
        ("offline_latency_per_token", -0.01, "offline_latency_per_token=-0.01 (REPORT_OFFLINE_LATENCY_PER_TOKEN)"),
        ("run_history", "on", "run_history='on' (REPORT_RUN_HISTORY) must be True or False"),
        ("run_history", 1, "run_history=1 (REPORT_RUN_HISTORY) must be True or False"),
        ("model", 4, "model=4 (REPORT_MODEL) must be a model's name (a string) or None"),
        ("base_url", Path("x"), "base_url=PosixPath('x') (OPENAI_BASE_URL) must be a URL (a string) or None"),
        ("reports_dir", None, "reports_dir=None (REPORTS_DIR) must be a path"),
        ("reports_dir", "", "reports_dir='' (REPORTS_DIR) must be a path"),
        ("reply_cache", 0, "reply_cache=0 (REPORT_REPLY_CACHE) must be a path (a Path or a string), or None to switch"),
        ("reply_cache", "off", "reply_cache='off' (REPORT_REPLY_CACHE) must be a path (a Path or a string), or None"),
    ],
)
def test_bad_values_in_python_are_named_with_their_variable(field, value, expected):
    """``Settings(...)`` (and so ``runtime.configure``) checks what ``from_env`` checks: the same bounds."""
    with pytest.raises(ValueError, match=re.escape(expected)):
        Settings(**{field: value})


def test_python_and_the_environment_share_one_set_of_bounds():
    for field, (variable, kind, minimum) in NUMBERS.items():
        least = Settings(**{field: minimum})
        assert getattr(least, field) == minimum and type(getattr(least, field)) is kind
        assert getattr(Settings.from_env({variable: str(minimum)}), field) == minimum
        below = minimum - 1 if kind is int else minimum - 0.0005
        with pytest.raises(ValueError, match=f"^{variable}="):
            Settings.from_env({variable: str(below)})
        with pytest.raises(ValueError, match=re.escape(f"{field}={below!r} ({variable}) must be")):
            Settings(**{field: below})
    assert set(NUMBERS) | {"backend", "model", "base_url", "reports_dir", "reply_cache", "run_history"} == {
        field.name for field in dataclasses.fields(Settings)}


def test_python_values_of_the_right_kind_are_taken_as_they_mean(tmp_path):
    settings = Settings(request_timeout=5, rate_limit_patience=0, reports_dir=str(tmp_path), reply_cache=None,
                        run_history=True, backend="openai", model="m", base_url="http://127.0.0.1:1/v1")
    assert settings.request_timeout == 5.0 and type(settings.request_timeout) is float, "seconds are floats"
    assert settings.rate_limit_patience == 0.0 and type(settings.rate_limit_patience) is float
    assert settings.reports_dir == tmp_path and isinstance(settings.reports_dir, Path)
    assert Settings(reply_cache=str(tmp_path / "r.sqlite3")).reply_cache == tmp_path / "r.sqlite3"
    assert dataclasses.replace(settings, max_concurrency=1).max_concurrency == 1


def test_the_old_cache_variable_is_refused_with_its_new_name():
    for value in ("off", "/tmp/x.sqlite3", ""):
        with pytest.raises(ValueError, match="REPORT_LLM_CACHE was renamed: set REPORT_REPLY_CACHE instead"):
            Settings.from_env({"REPORT_LLM_CACHE": value})


def test_defaults_with_an_empty_environment():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.backend == "offline" and settings.model_name == offline_llm.MODEL_VERSION
    assert settings.reply_cache == PROJECT_ROOT / ".reply-cache" / "replies.sqlite3"
    assert settings.reports_dir == PROJECT_ROOT / "reports"
    assert settings.run_history is False and settings.client_retries == 3
    assert settings.max_concurrency == 64, "a ceiling: the pace's window finds what the server takes below it"
    assert settings.rate_limit_patience == 600.0
    assert settings.model is None, "REPORT_MODEL unset: the name comes from OpenAI's default or the server"
    limits = (settings.max_tokens_report, settings.max_tokens_critique, settings.max_tokens_summary)
    assert limits == (1500, 500, 400)
    longest = offline_llm.LONGEST_REPLY_TOKENS  # the offline model is never cut at the defaults
    assert settings.max_tokens_critique > 3 * longest["critic"] and settings.max_tokens_summary > longest["summarizer"]
    assert settings.max_tokens_report > max(longest["writer"], longest["reviser"])


def test_backend_defaults_follow_the_environment():
    assert Settings.from_env({}).backend == "offline"
    assert Settings.from_env({"OPENAI_API_KEY": "sk-x"}).backend == "openai"
    assert Settings.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}).backend == "openai"
    assert Settings.from_env({"OPENAI_API_KEY": "sk-x", "REPORT_BACKEND": "offline"}).backend == "offline"
    assert Settings.from_env({"REPORT_BACKEND": " OpenAI "}).backend == "openai"
    assert Settings.from_env({"OPENAI_API_KEY": "", "REPORT_BACKEND": ""}).backend == "offline"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("off", None), ("OFF", None), ("0", None), ("false", None), ("no", None), ("none", None), (" off ", None),
        ("", Settings.reply_cache),
    ],
)
def test_the_reply_cache_switch(value, expected):
    assert Settings.from_env({"REPORT_REPLY_CACHE": value}).reply_cache == expected


def test_paths_are_expanded_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    settings = Settings.from_env({"REPORT_REPLY_CACHE": "~/r.sqlite3", "REPORTS_DIR": "out"})
    assert settings.reply_cache == tmp_path / "home" / "r.sqlite3"
    assert settings.reports_dir == tmp_path / "out"


def test_numbers_and_switches_are_parsed():
    settings = Settings.from_env({
        "REPORT_MAX_CONCURRENCY": "3", "REPORT_CLIENT_RETRIES": "0", "REPORT_REQUEST_TIMEOUT": "2.5",
        "REPORT_OFFLINE_LATENCY": "0.2", "REPORT_OFFLINE_LATENCY_PER_TOKEN": "0.01", "REPORT_RUN_HISTORY": "On",
        "REPORT_MODEL": "qwen2.5:1.5b", "REPORT_RATE_LIMIT_PATIENCE": "90", "REPORT_MAX_TOKENS_REPORT": "900",
        "REPORT_MAX_TOKENS_CRITIQUE": "300", "REPORT_MAX_TOKENS_SUMMARY": "200",
    })
    assert [settings.reply_limit(step) for step in ("draft", "revision", "critique", "summary")] == [900, 900, 300, 200]
    assert [settings.reply_limit_variable(step) for step in ("draft", "revision", "critique", "summary")] == [
        "REPORT_MAX_TOKENS_REPORT", "REPORT_MAX_TOKENS_REPORT", "REPORT_MAX_TOKENS_CRITIQUE",
        "REPORT_MAX_TOKENS_SUMMARY"]
    assert (settings.max_concurrency, settings.client_retries, settings.request_timeout) == (3, 0, 2.5)
    assert settings.rate_limit_patience == 90.0
    assert Settings.from_env({"REPORT_RATE_LIMIT_PATIENCE": "0"}).rate_limit_patience == 0.0, "0: fail on a 429"
    assert (settings.offline_latency, settings.offline_latency_per_token) == (0.2, 0.01)
    assert settings.run_history is True and settings.model == "qwen2.5:1.5b"
    assert Settings.from_env({"REPORT_RUN_HISTORY": "off"}).run_history is False


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().backend = "openai"  # type: ignore[misc]


def test_endpoint_and_model_name_follow_the_backend():
    assert Settings().endpoint == "offline"
    assert Settings(backend="openai").endpoint == OPENAI_URL
    assert Settings(backend="openai", base_url="http://127.0.0.1:8765/v1").endpoint == "http://127.0.0.1:8765/v1"
    assert Settings(model="gpt-4.1").model_name == offline_llm.MODEL_VERSION, "offline ignores REPORT_MODEL"
    assert Settings(backend="openai", model="gpt-4.1").model_name == "gpt-4.1"
    assert Settings(backend="openai").model_name == "gpt-4o-mini", "OpenAI's API: the default model"
    local = Settings(backend="openai", base_url="http://127.0.0.1:8765/v1")
    assert local.model_name is None, "another server, no REPORT_MODEL: runtime asks the server"


def test_openai_backend_without_a_key_fails_before_any_call(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="needs OPENAI_API_KEY"):
        Settings.from_env({"REPORT_BACKEND": "openai"}).check_ready()
    Settings.from_env({}).check_ready()  # the offline model needs nothing
    monkeypatch.setenv("OPENAI_API_KEY", "local")
    Settings.from_env({"REPORT_BACKEND": "openai"}).check_ready()


def test_task_env_vars_carry_the_model_and_never_the_key_or_a_local_path():
    local = Settings.from_env({"REPORT_REPLY_CACHE": "/somewhere/replies.sqlite3"})
    assert local.task_env_vars() == {"REPORT_BACKEND": "offline", "REPORT_REPLY_CACHE": "off"}
    openai_api = Settings.from_env({"OPENAI_API_KEY": KEY})
    assert openai_api.task_env_vars() == {"REPORT_BACKEND": "openai", "REPORT_MODEL": "gpt-4o-mini",
                                          "REPORT_REPLY_CACHE": "off"}
    unnamed = Settings.from_env({"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "http://10.0.0.5:8000/v1"})
    assert "REPORT_MODEL" not in unnamed.task_env_vars(), "runtime adds the served name once it has asked"
    remote = Settings.from_env({"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "http://10.0.0.5:8000/v1",
                                "REPORT_MODEL": "llama3"})
    assert remote.task_env_vars() == {"REPORT_BACKEND": "openai", "REPORT_MODEL": "llama3",
                                      "REPORT_REPLY_CACHE": "off", "OPENAI_BASE_URL": "http://10.0.0.5:8000/v1"}


def test_task_env_vars_carry_reply_limits_that_differ_from_the_defaults():
    """A reply limit changes what the model writes and the cache key: a container must write with the same one."""
    assert not any(name.startswith("REPORT_MAX_TOKENS") for name in Settings().task_env_vars())
    raised = Settings.from_env({"REPORT_MAX_TOKENS_REPORT": "3000", "REPORT_MAX_TOKENS_SUMMARY": "400"})
    shipped = {name: value for name, value in raised.task_env_vars().items() if name.startswith("REPORT_MAX_TOKENS")}
    assert shipped == {"REPORT_MAX_TOKENS_REPORT": "3000"}, "the summary's limit is the default: nothing to ship"
    assert Settings.from_env(raised.task_env_vars()).reply_limit("draft") == 3000, "the container reads it back"


def test_the_key_never_appears_in_what_settings_show(monkeypatch):
    """The key is read from the environment by the client, never stored in Settings: nothing can show it."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    environ = {"OPENAI_API_KEY": KEY, "REPORT_MODEL": "qwen2.5:1.5b", "OPENAI_BASE_URL": "http://localhost:11434/v1"}
    settings = Settings.from_env(environ)
    assert settings.backend == "openai", "the key was seen: it chose the backend"
    text = settings.describe()
    assert "qwen2.5:1.5b" in text and "localhost:11434" in text
    shown = [text, repr(settings), str(settings), repr(dataclasses.asdict(settings)), repr(settings.task_env_vars())]
    for view in shown:
        assert KEY not in view and KEY[3:13] not in view, view
    assert KEY not in repr(dataclasses.fields(settings))
    assert all(KEY not in str(value) for value in dataclasses.asdict(settings).values())


def test_describe_says_which_model_writes():
    assert Settings().describe().startswith(f"offline model {offline_llm.MODEL_VERSION}")
    assert Settings(backend="openai").describe() == f"model gpt-4o-mini at {OPENAI_URL} (OpenAI-compatible)"
    local = Settings(backend="openai", base_url="http://127.0.0.1:8765/v1")
    assert local.describe() == "model served at http://127.0.0.1:8765/v1 (OpenAI-compatible)"
    assert local.describe("qwen") == "model qwen at http://127.0.0.1:8765/v1 (OpenAI-compatible)"


def test_project_root_is_the_repository():
    assert (PROJECT_ROOT / "pipeline.py").is_file() and (PROJECT_ROOT / "machinery").is_dir()
    assert Path(PROJECT_ROOT).is_absolute()


def test_a_user_and_password_in_the_server_url_are_never_shown():
    settings = Settings(backend="openai", base_url="http://reports:s3cret@127.0.0.1:8000/v1/")
    assert settings.shown_endpoint == "http://127.0.0.1:8000/v1" and "s3cret" in settings.endpoint
    assert settings.describe("m") == "model m at http://127.0.0.1:8000/v1 (OpenAI-compatible)"
    assert "s3cret" not in settings.describe()


def test_a_home_folder_path_from_python_is_expanded_as_from_the_environment():
    assert Settings(reports_dir="~/reports").reports_dir == Path.home() / "reports"
    assert Settings(reply_cache="~/replies.sqlite3").reply_cache == Path.home() / "replies.sqlite3"
