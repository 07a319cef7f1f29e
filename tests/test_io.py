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


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_write_removes_temporaries_of_killed_writes_only(tmp_path):
    import os

    from mtp.io import atomic_write_json, remove_stale_temporaries

    dead, alive = dead_pid(), os.getppid()  # our parent is alive for as long as this test runs
    killed_folder = tmp_path / f".model.tmp-{dead}-abc123"
    killed_folder.mkdir()
    (killed_folder / "model.safetensors").write_bytes(b"half")
    (tmp_path / "model").mkdir()
    moved_aside = tmp_path / f".model.replaced-{dead}"  # what a killed replacement moved aside: never deleted
    moved_aside.mkdir()
    older_moved_aside = tmp_path / f".model.old-{dead}"  # as mtp named it before (it may hold a user's file)
    older_moved_aside.mkdir()
    in_progress = tmp_path / f".model.tmp-{alive}-def456"  # another process writing right now
    in_progress.mkdir()
    other_target = tmp_path / f".other.tmp-{dead}-x"  # not the target written: left for its own next write
    other_target.mkdir()
    legacy = tmp_path / f".model-tmp-{dead}"  # as `mtp train` named it before
    legacy.mkdir()
    killed_file = tmp_path / f".report.json.tmp-{dead}-q1w2.json"
    killed_file.write_text("{")
    with atomic_folder(tmp_path / "model") as tmp:
        (tmp / "a.txt").write_text("one")
    assert not killed_folder.exists() and not legacy.exists()
    assert in_progress.is_dir() and other_target.is_dir() and moved_aside.is_dir() and older_moved_aside.is_dir()
    atomic_write_json(tmp_path / "report.json", {"a": 1})
    assert not killed_file.exists()
    assert remove_stale_temporaries(tmp_path) == [other_target]  # any target: what a checkpoint save sweeps
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", "report.json", in_progress.name,
                                                                 moved_aside.name, older_moved_aside.name])


def test_a_checkpoint_save_removes_a_killed_save(tmp_path):
    from conftest import tiny_mtp
    from mtp.training.checkpoints import list_checkpoints, save_checkpoint

    killed = tmp_path / f".step-000003.tmp-{dead_pid()}-zz"  # a save killed at step 3
    killed.mkdir()
    (killed / "config.json").write_text("{}")
    save_checkpoint(tmp_path, 4, tiny_mtp(num_heads=2), {"x": 1})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_modes_plain_writes_get(tmp_path, umask):
    """A file or folder written through a temporary name ends with the mode `open` / `mkdir` would give it under
    the process's umask (mkstemp and mkdtemp make theirs private: colleagues could not read a shared run's
    reports), and the umask is left as it was."""
    import os

    before = os.umask(umask)
    try:
        text = atomic_write_text(tmp_path / "report.json", "{}\n")
        with atomic_folder(tmp_path / "model") as folder:
            (folder / "config.json").write_text("{}")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        (tmp_path / "plain-folder").mkdir()
        assert os.umask(umask) == umask
    finally:
        os.umask(before)
    assert text.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "model").stat().st_mode & 0o777 == (tmp_path / "plain-folder").stat().st_mode & 0o777


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux's /proc")
def test_the_umask_is_read_without_setting_it(monkeypatch):
    """Setting the umask to read it would let another thread (a tokenizer's, a data loader's) create a file under
    the wrong one: where /proc shows it, it is only read."""
    import os

    from mtp import io as mtp_io

    before = os.umask(0o027)
    try:
        def no_umask(mask):
            raise AssertionError("os.umask was called")

        monkeypatch.setattr(mtp_io.os, "umask", no_umask)
        assert mtp_io._umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(before)


def test_a_target_that_cannot_take_a_file_is_named_not_its_temporary(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(MTPError, match=f"cannot write {tmp_path}/a-file/report.json: ") as e:
        atomic_write_text(tmp_path / "a-file" / "report.json", "{}")
    assert ".tmp" not in str(e.value)


def test_lines_end_where_a_files_lines_end_not_at_characters_a_line_may_hold(tmp_path):
    """A JSONL record written with ensure_ascii=False holds U+2028 as is, a text line may hold a form feed or
    U+0085: `str.splitlines()` cut them in two (a record that is not JSON, a prompt in two), where Python's file
    iteration, `mtp train --data` and JSONL readers keep them; CRLF, a BOM and blank lines are read as ever."""
    import json

    from mtp.decoding.commands import read_prompt_records
    from mtp.evaluation.prompts import file_prompt_texts
    from mtp.io import read_complete_records, read_json_records

    odd = "one\u2028line\u2029still\x85one\x0cline\x1c"
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\ufeff" + json.dumps({"prompt": odd}, ensure_ascii=False) + "\r\n\r\n"
                     + json.dumps({"prompt": "é😀 " * 5000}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert [r for _, r in read_json_records(jsonl)] == [{"prompt": odd}, {"prompt": "é😀 " * 5000}]
    assert [line for line, _ in read_json_records(jsonl)] == [1, 3]
    assert [r[0] for r in read_prompt_records(str(jsonl))] == [odd, "é😀 " * 5000]
    assert file_prompt_texts(jsonl) == [odd, "é😀 " * 5000]
    assert read_complete_records(jsonl) == [{"prompt": odd}, {"prompt": "é😀 " * 5000}]
    text = tmp_path / "p.txt"
    text.write_bytes(("\ufeff" + odd + "\r\n\r\nsecond\rthird\n").encode())
    assert [(r[0], r[2]) for r in read_prompt_records(str(text))] == [
        (odd, f"{text}:1"), ("second", f"{text}:3"), ("third", f"{text}:4")]
    assert file_prompt_texts(text) == [odd, "second", "third"]


def test_a_write_to_a_link_replaces_its_target_and_to_a_pipe_writes_into_it(tmp_path):
    """Renamed over, a link would become a file and its target stay old; /dev/null (as root) a regular file."""
    import os
    import threading

    target = atomic_write_text(tmp_path / "real.json", "old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    read = []
    reader = threading.Thread(target=lambda: read.append(pipe.read_text()))
    reader.start()
    atomic_write_text(pipe, "through")
    reader.join(10)
    assert read == ["through"] and not pipe.is_file() and pipe.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "pipe", "real.json"]


def test_a_folder_written_through_a_link_replaces_its_target(tmp_path):
    """`save_pretrained`, `mtp convert --output` into a link to a folder: the target's contents are replaced and
    the link stays (the link became a folder of its own, then an rmtree of the moved-aside link failed)."""
    target = tmp_path / "real"
    target.mkdir()
    (target / "old.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    with atomic_folder(link) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
