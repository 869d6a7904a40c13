"""machinery/files.py: safe, distinct folder names; writes that leave the old file or the new one, never half."""

from __future__ import annotations

import os
import stat

import pytest

from machinery.files import SLUG_MAX_LENGTH, atomic_write_text, replace_dir, slugify, staging_dir_for

HOSTILE_TOPICS = ["../../etc/passwd", "..", "CON", "nul", "/absolute/path", "C:\\Windows\\win.ini", "x" * 200,
                  "!!!???...", "???", "~root", ".hidden", "a/b", "a\\b", "Ünïcödé – ελληνικά", "🚀🚀🚀", "", " ",
                  "com1", "LPT9", "a\x00b", "_", "__init__"]


def test_hostile_topics_get_distinct_safe_readable_slugs():
    slugs = [slugify(topic) for topic in HOSTILE_TOPICS]
    assert len(set(slugs)) == len(slugs)
    for slug in slugs:
        assert "/" not in slug and "\\" not in slug and not slug.startswith(".") and ".." not in slug
        assert "\x00" not in slug and slug == slug.strip() and slug
        assert len(slug) <= SLUG_MAX_LENGTH + 9
        assert slug.rsplit("-", 1)[0].lower() not in {"con", "nul", "prn", "aux", "com1", "lpt9"}
    assert slugify("../../etc/passwd").startswith("etc-passwd-")
    assert slugify("Ünïcödé – ελληνικά").startswith("ünïcödé-ελληνικά-")
    assert slugify("CON").startswith("topic-") and slugify("???").startswith("topic-")


def test_slugs_are_readable_and_stable():
    assert slugify("Quantum computing") == slugify("Quantum computing")
    assert slugify("Quantum computing").startswith("quantum-computing-")
    assert slugify("Kubernetes: cost & scale").startswith("kubernetes-cost-scale-")
    assert slugify("日本の茶道 🍵").startswith("日本の茶道-")
    assert slugify("ＡＢＣ").startswith("abc-"), "NFKC: full-width letters read as ASCII"


@pytest.mark.parametrize(("a", "b"), [("AI", "ai"), ("C++", "C#"), ("cats!", "cats?"), ("a b", "a-b"),
                                      ("x" * 60, "x" * 61)])
def test_texts_that_read_alike_get_distinct_slugs(a, b):
    assert slugify(a) != slugify(b)


# ----------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_creates_folders_and_writes_utf8_with_unix_newlines(tmp_path):
    target = tmp_path / "a" / "b" / "report.md"
    atomic_write_text(target, "line 1\nÜnïcödé 🚀\n")
    assert target.read_bytes() == "line 1\nÜnïcödé 🚀\n".encode()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644, "readable by other users, like any report"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"], "no temporary file left"


def test_atomic_write_replaces_an_existing_file(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_text("old")

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "half of the new text")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_an_interrupted_write_also_cleans_up(tmp_path, monkeypatch):
    """Ctrl-C (a BaseException, not an Exception) at the worst moment: still no temporary file."""
    target = tmp_path / "report.md"
    target.write_text("old")

    def interrupted(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


# ----------------------------------------------------------------------------------------- folders


def test_a_staging_folder_is_a_hidden_readable_sibling(tmp_path):
    final = tmp_path / "runs" / "run-1"
    staging = staging_dir_for(final)
    assert staging.parent == final.parent and staging.name.startswith(".run-1.") and staging.name.endswith(".partial")
    assert stat.S_IMODE(staging.stat().st_mode) == 0o755
    assert staging_dir_for(final) != staging, "a fresh one each time"


def test_replace_dir_moves_a_new_folder_into_place(tmp_path):
    final = tmp_path / "run"
    staging = staging_dir_for(final)
    (staging / "index.html").write_text("first")
    replace_dir(staging, final)
    assert (final / "index.html").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_replace_dir_replaces_an_old_folder_and_leaves_nothing_else(tmp_path):
    final = tmp_path / "run"
    (final / "old-topic").mkdir(parents=True)
    (final / "old-topic" / "report.md").write_text("old")
    staging = staging_dir_for(final)
    (staging / "index.html").write_text("new")
    replace_dir(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["index.html"], "nothing of the old run survives"
    assert [p.name for p in tmp_path.iterdir()] == ["run"], "no staging or retired folders left behind"
