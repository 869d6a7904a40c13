"""Names and writes on disk: no unsafe folder name, no half-written file or folder after a crash.

* ``slugify``: safe, unique, readable folder names for arbitrary topics.
* ``atomic_write_text``, ``staging_dir_for`` and ``replace_dir``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import unicodedata
from pathlib import Path

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


def writable_folder(folder: str | Path) -> Path:
    """``folder``, absolute, made if it is missing; a ValueError, before any work is done, if it cannot be written."""
    path = Path(folder).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as error:
        raise ValueError(f"the output folder {path} cannot be written ({error.strerror or error}): pass another "
                         "output_dir (--out on the command line) or set REPORTS_DIR") from None
    return path


def claim_free_dir(wanted: Path) -> Path:
    """``wanted``, or else ``wanted-2``, ``-3``...: the first that does not exist, made empty. Made in one step
    (``mkdir`` fails if the folder exists), so two processes never claim the same one."""
    wanted.parent.mkdir(parents=True, exist_ok=True)
    candidate, number = wanted, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1
            candidate = wanted.with_name(f"{wanted.name}-{number}")


def replace_dir(staging: Path, final: Path) -> None:
    """Move a fully written ``staging`` folder to ``final``, replacing what was there."""
    if final.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, retired / final.name)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
