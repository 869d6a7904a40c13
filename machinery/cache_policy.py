"""A Flyte cache key that cannot go stale.

Flyte's default policy hashes only the task function's own source, so editing
a prompt, a traced step, a formatter or the model name would silently return
old reports from the cache. ``CodeAndModelPolicy`` hashes the whole module that
defines the task (any edit to ``pipeline.py`` is a new key) and the settings
that change what the model writes: backend, model, server, the offline model's
version and the reply limits (``max_tokens`` of each step).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Any

from machinery import offline_llm
from machinery.runtime import runtime
from machinery.settings import REPLY_LIMIT_SETTINGS


class CodeAndModelPolicy:
    """A ``flyte.Cache`` policy: ``flyte.Cache("auto", policies=[CodeAndModelPolicy()])``."""

    def get_version(self, salt: str, params: Any) -> str:
        return hashlib.sha256(f"{salt}:{code_and_model(_source_file(params.func))}".encode()).hexdigest()


@functools.cache  # inspect looks at the disk; a function's file does not change while the process runs
def _source_file(function: Any) -> str | None:
    return inspect.getsourcefile(function)


def code_and_model(source_file: str | None) -> str:
    """A digest of ``source_file`` and of the model in force: what a cached result depends on."""
    settings = runtime.settings
    # runtime.model_name: the model really served, so a new model behind the same URL is a new key.
    limits = tuple(getattr(settings, field) for field in REPLY_LIMIT_SETTINGS)
    return _digest(source_file, settings.backend, runtime.model_name, settings.base_url or "", limits)


@functools.cache  # asked for on every cache lookup; files and settings are few
def _digest(source_file: str | None, backend: str, model: str, base_url: str, limits: tuple[int, ...]) -> str:
    source = _read(source_file)
    parts = [source, backend, model, base_url, offline_llm.MODEL_VERSION, *map(str, limits)]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _read(source_file: str | None) -> str:
    if source_file is None:  # defined in a notebook cell: no file to hash
        return ""
    with open(source_file, encoding="utf-8") as handle:
        return handle.read()
