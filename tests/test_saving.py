"""Saving never deletes or renames what it did not write: a folder of other files, a file in the way, a
replacement killed half-way, a full disk."""

from __future__ import annotations

import errno
import os

import pytest

from conftest import tiny_base, tiny_mtp, tiny_tokenizer
from mtp.errors import MTPError
from mtp.io import _TEMPORARY, atomic_folder, moved_aside, remove_stale_temporaries
from mtp.models.mask_tokens import MaskTokenModel
from mtp.models.parallel_heads import MTPModel


def _heads():
    model = tiny_mtp("llama", num_heads=2)
    model.tokenizer = tiny_tokenizer()
    return model


def _masks():
    return MaskTokenModel.from_base(tiny_base("llama", vocab_size=310), tokenizer=tiny_tokenizer())


MODELS = {"heads": _heads, "mask-tokens": _masks}


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", MODELS)
def test_a_folder_holding_other_files_is_refused_unless_overwrite(tmp_path, kind):
    model = MODELS[kind]()
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _snapshot(folder)
    with pytest.raises(MTPError, match=r"holds files that saving would delete \(notes\.txt, sub/\).*overwrite=True"):
        model.save_pretrained(folder)
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary left beside it
    model.save_pretrained(folder, overwrite=True)  # the user said so
    assert (folder / "config.json").is_file() and not (folder / "notes.txt").exists()


@pytest.mark.parametrize("kind", MODELS)
def test_a_previous_save_is_replaced_and_an_existing_file_refused(tmp_path, kind):
    model = MODELS[kind]()
    folder = model.save_pretrained(tmp_path / "model")
    model.save_pretrained(folder)  # a model folder and nothing else: ours to replace
    loaded = (MaskTokenModel if kind == "mask-tokens" else MTPModel).from_pretrained(folder)
    assert loaded.tokenizer is not None
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"user data")
    with pytest.raises(MTPError, match="weights.bin is a file, not a folder; nothing was written"):
        model.save_pretrained(a_file)
    assert a_file.read_bytes() == b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "weights.bin"]


def test_a_moved_aside_folder_is_never_a_stale_temporary_and_comes_back(tmp_path):
    """A replacement killed between its two renames leaves the old folder moved aside and none at the target:
    the next write puts it back (it is never deleted, whoever's it was)."""
    from test_io import dead_pid

    target = tmp_path / "model"
    aside = tmp_path / f".model.replaced-{dead_pid()}"
    aside.mkdir()
    (aside / "config.json").write_text("the old one")
    assert not _TEMPORARY.fullmatch(aside.name) and not _TEMPORARY.fullmatch(moved_aside(target).name)
    assert remove_stale_temporaries(tmp_path) == []
    with pytest.raises(RuntimeError):  # a write that fails: the restored folder stays
        with atomic_folder(target):
            raise RuntimeError("interrupted")
    assert (target / "config.json").read_text() == "the old one" and not aside.exists()


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "No space left on device"),
                                          (errno.EFBIG, "File too large")])
def test_a_full_disk_names_the_folder_and_leaves_the_old_save(tmp_path, monkeypatch, code, reason):
    model = _heads()
    folder = model.save_pretrained(tmp_path / "model")
    before = _snapshot(folder)
    from mtp.models import safetensors_io

    real = safetensors_io.write_safetensors

    def half_then_full(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"x" * 100)  # what fitted
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(safetensors_io, "write_safetensors", half_then_full)
    with pytest.raises(MTPError, match=f"cannot write {folder}: {reason}"):
        model.save_pretrained(folder)
    monkeypatch.setattr(safetensors_io, "write_safetensors", real)
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing half-written beside it


def test_a_file_size_limit_while_converting_is_one_line_and_leaves_nothing(tmp_path):
    """A real limit (RLIMIT_FSIZE: writes past it fail with EFBIG) in a process of its own."""
    import subprocess
    import sys

    base = tiny_base("llama", vocab_size=310, hidden=64)
    base.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
              "from mtp.cli import main; main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", script, "convert", "--input", str(tmp_path / "hf"), "--output",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err[-1] == f"mtp: error: cannot write {out}: File too large (nothing half-written was left)", proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_read_only_place_is_one_error_naming_it(tmp_path, monkeypatch):
    from pathlib import Path

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(MTPError, match=r"cannot write .*/deep/model: Read-only file system"):
        _heads().save_pretrained(tmp_path / "deep" / "model")
