"""Small, general helpers that ``pipeline.py`` uses but does not teach.

* ``InflightLimit``: a cap on concurrent work that holds across event loops.
* ``Tally``: a thread-safe counter.
* ``Record``: a pydantic model whose JSON schema is computed once.
* ``slugify``: safe, unique, readable folder names for arbitrary topics.
* ``atomic_write_text`` and ``replace_dir``: no half-written file or folder
  after a crash.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import os
import pickle
import re
import shutil
import tempfile
import threading
import unicodedata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

# --------------------------------------------------------------------------- concurrency


class InflightLimit:
    """At most ``limit`` holders at once, process-wide.

    ``asyncio.Semaphore`` belongs to one event loop, but a notebook awaits on
    the kernel's loop while Flyte runs tasks on a loop of its own: this limit
    is shared by every loop (and thread) in the process. Waiters are served
    first come, first served.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._holders = 0
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = (
            collections.deque()
        )
        self.peak = 0

    @property
    def in_flight(self) -> int:
        return self._holders

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._holders < self.limit and not self._waiters:
                self._take()
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            with self._lock:
                if (loop, waiter) in self._waiters:
                    self._waiters.remove((loop, waiter))
                    raise
            # The slot was handed over just as we were cancelled: give it back.
            self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _take(self) -> None:
        self._holders += 1
        self.peak = max(self.peak, self._holders)

    def _release(self) -> None:
        with self._lock:
            self._holders -= 1
            while self._waiters:
                loop, waiter = self._waiters.popleft()
                if loop.is_closed():
                    continue
                self._take()
                loop.call_soon_threadsafe(self._grant, waiter)
                return

    def _grant(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled():
            self._release()
        else:
            waiter.set_result(None)


class Tally:
    """A thread-safe running count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def add(self) -> None:
        with self._lock:
            self._value += 1

    @property
    def value(self) -> int:
        return self._value


# --------------------------------------------------------------------------- data


class Record(BaseModel):
    """A pydantic model whose JSON schema is built once per class and arguments.

    Flyte asks the classes of a task's or traced call's inputs and outputs for
    their JSON schema on every call; pydantic rebuilds it on every request, which
    was the largest single cost of a traced call (see benchmarks/).
    """

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # A fresh copy for every caller, as pydantic gives; unpickling is 6x faster than deepcopy.
        return pickle.loads(_pickled_schema(cls, args, tuple(sorted(kwargs.items()))))


@functools.cache
def _pickled_schema(cls: type[BaseModel], args: tuple, kwargs: tuple) -> bytes:
    return pickle.dumps(BaseModel.model_json_schema.__func__(cls, *args, **dict(kwargs)))


# --------------------------------------------------------------------------- names on disk

SLUG_MAX_LENGTH = 48
# Names Windows refuses for files and folders, whatever the extension.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def slugify(text: str) -> str:
    """A folder name for ``text``: readable, bounded, and distinct for distinct texts.

    Letters and digits of any script are kept (lower-cased, NFKC-normalised);
    everything else becomes ``-``. A short hash of the exact text is always
    appended, so ``"AI"`` and ``"ai"`` or two topics that differ only in
    punctuation never share a folder, and no name is empty, hidden, reserved
    or a path (``..``, ``/``).
    """
    normalized = unicodedata.normalize("NFKC", text).lower()
    readable = re.sub(r"[^\w]+|_+", "-", normalized).strip("-")[:SLUG_MAX_LENGTH].strip("-")
    if not readable or readable in _RESERVED:
        readable = "topic"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}"


# --------------------------------------------------------------------------- crash-safe writes


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temp_name, 0o644)  # mkstemp's 0600 would hide reports from other users
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def staging_dir_for(final: Path) -> Path:
    """A fresh hidden sibling of ``final`` to build it in before ``replace_dir``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide reports from other users
    return staging


def replace_dir(staging: Path, final: Path) -> None:
    """Move a fully written ``staging`` folder to ``final``, replacing what was there."""
    if final.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, retired / final.name)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
