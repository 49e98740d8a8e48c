"""A folder saved as a whole (a model: config, weights, tokenizer) is swapped in complete, never rmtree'd first:
common.atomic.staged_folder, hand-made cases.

    pytest -q tests/test_staged_folder.py
"""
from __future__ import annotations

import os

import pytest

import common.atomic as atomic
from common.atomic import staged_folder
from common.errors import UserError


def listing(d):
    return sorted(os.listdir(d))


def fill(folder, text):
    (folder / "config.json").write_text(text)


def test_a_new_folder_appears_complete_with_nothing_beside_it(tmp_path):
    with staged_folder(tmp_path / "m") as tmp:
        assert not (tmp_path / "m").exists() and tmp.parent == tmp_path and tmp.name.startswith(".m.partial-")
        fill(tmp, "new")
    assert listing(tmp_path) == ["m"] and (tmp_path / "m" / "config.json").read_text() == "new"
    assert (tmp_path / "m").stat().st_mode & 0o777 == atomic.DIR_MODE  # not mkdtemp's 0700


def test_an_old_folder_is_replaced_whole_and_its_files_go_with_it(tmp_path):
    (tmp_path / "m").mkdir()
    fill(tmp_path / "m", "old")
    (tmp_path / "m" / "stale.bin").write_text("x")
    with staged_folder(tmp_path / "m") as tmp:
        fill(tmp, "new")
    assert listing(tmp_path) == ["m"] and listing(tmp_path / "m") == ["config.json"]
    assert (tmp_path / "m" / "config.json").read_text() == "new"


def test_a_failure_while_writing_leaves_the_old_folder_and_nothing_else(tmp_path):
    (tmp_path / "m").mkdir()
    fill(tmp_path / "m", "old")
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(tmp_path / "m") as tmp:
            fill(tmp, "half")
            raise KeyboardInterrupt
    assert listing(tmp_path) == ["m"] and (tmp_path / "m" / "config.json").read_text() == "old"


def test_a_failure_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    """The old folder moves aside, then the new one fails to move in: the old one is restored, not lost."""
    (tmp_path / "m").mkdir()
    fill(tmp_path / "m", "old")
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(str(dst))
        if len(calls) == 2:
            raise OSError(5, "I/O error")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_fails)
    with pytest.raises(OSError):
        with staged_folder(tmp_path / "m") as tmp:
            fill(tmp, "new")
    monkeypatch.setattr(atomic.os, "replace", real)
    assert calls[1] == str(tmp_path / "m")  # the second rename was the new folder's
    assert listing(tmp_path) == ["m"] and (tmp_path / "m" / "config.json").read_text() == "old"


def test_a_link_or_file_in_the_folders_place_is_refused_and_left_alone(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    fill(tmp_path / "elsewhere", "theirs")
    (tmp_path / "m").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "f").write_text("a file")
    for name in ("m", "f"):
        with pytest.raises(UserError, match="never followed or removed"):
            with staged_folder(tmp_path / name) as tmp:
                fill(tmp, "new")
    assert (tmp_path / "elsewhere" / "config.json").read_text() == "theirs" and (tmp_path / "f").read_text() == "a file"
    assert listing(tmp_path) == ["elsewhere", "f", "m"]
