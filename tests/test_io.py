"""Atomic writes: an interrupted write leaves the previous file or folder as it was."""

from __future__ import annotations

import pytest

from mtp.errors import MTPError
from mtp.io import atomic_folder, atomic_write_text, read_json_object


def test_atomic_folder_replaces_on_success_and_keeps_old_on_error(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("two")
            raise KeyboardInterrupt
    assert (target / "a.txt").read_text() == "one"
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folder left behind


def test_read_json_object_errors_name_the_file(tmp_path):
    good = atomic_write_text(tmp_path / "ok.json", '{"a": 1}')
    assert read_json_object(good) == {"a": 1}
    bad = atomic_write_text(tmp_path / "bad.json", "{nope")
    with pytest.raises(MTPError, match=r"bad\.json is not valid JSON"):
        read_json_object(bad)
    arr = atomic_write_text(tmp_path / "arr.json", "[1]")
    with pytest.raises(MTPError, match=r"arr\.json is not a model config"):
        read_json_object(arr, "a model config")
