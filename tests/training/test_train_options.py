"""`mtp train`'s options in three dataclasses: both methods' (`TrainOptions`), parallel heads' (`HeadsOptions`)
and self-distillation's (`SelfDistillOptions`); a flag of the other method is refused, by name, before any work."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from mtp.cli import Flag, command_flags, main
from mtp.errors import MTPError
from mtp.training import commands, heads, selfdistill
from mtp.training.commands import (
    METHODS,
    _Args,
    _check_method_options,
    _merge_resume_args,
    train,
    train_defaults,
)
from mtp.training.heads import HeadsOptions
from mtp.training.options import TrainOptions
from mtp.training.selfdistill import SelfDistillOptions

PLAIN = {"output", "model", "method", "resume"}  # train's parameters outside the dataclasses


def names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_the_groups_are_disjoint_and_together_are_every_flag():
    shared, own = names(TrainOptions), {m: names(cls.options) for m, cls in METHODS.items()}
    groups = [PLAIN, shared, *own.values()]
    assert [a & b for i, a in enumerate(groups) for b in groups[i + 1:]] == [set()] * 6
    flags = [f.name for f in command_flags(train)]
    assert len(flags) == len(set(flags)) and set(flags) == set().union(*groups)
    assert set(own) == {"heads", "selfdistill"} and own["heads"] >= {"num_heads", "freeze_trunk", "draft_vocab"}


def flags_read(module) -> set[str]:
    """The flags a module reads from the run's flags namespace (`a.name`)."""
    tree = ast.parse(Path(module.__file__).read_text())
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "a"}


def test_each_method_reads_the_shared_flags_and_exactly_its_own():
    """A method-specific option is one its method's module uses and no other code does: the groups say which
    flags matter to which method."""
    every = set(train_defaults())
    shared = names(TrainOptions) | PLAIN
    for module, method in ((heads, "heads"), (selfdistill, "selfdistill")):
        own = names(METHODS[method].options)
        read = flags_read(module) & every
        assert read - shared == own, method
    assert flags_read(commands) & (names(HeadsOptions) | names(SelfDistillOptions)) == set()


def other_value(f: Flag) -> object:
    """A value of flag `f` other than its default."""
    if f.choices:
        return next(c for c in f.choices if c != f.default)
    return {bool: not f.default, int: 3 if f.default != 3 else 4, float: 0.5, str: "x"}[f.type]


METHOD_FLAGS = [(f, method) for method, cls in METHODS.items() for f in command_flags(train)
                if f.name in names(cls.options)]


@pytest.mark.parametrize("flag, owner", METHOD_FLAGS, ids=[f.flag for f, _ in METHOD_FLAGS])
def test_a_flag_of_the_other_method_is_refused_by_name(flag, owner, tmp_path):
    other = next(m for m in METHODS if m != owner)
    with pytest.raises(MTPError) as error:
        train(output=str(tmp_path / "o"), method=other, **{flag.name: other_value(flag)})
    assert str(error.value) == f"{flag.flag}: for --method {owner} only; this run trains --method {other}"
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_the_command_line_refuses_it_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output", str(tmp_path / "o"), "--method", "selfdistill", "--num-heads", "3",
              "--draft-vocab", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("mtp: error: --num-heads, --draft-vocab: for --method heads only; "
                                       "this run trains --method selfdistill\n")


def test_train_help_lists_the_groups(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    headings = ["shared options:", "parallel heads (--method heads):", "self-distillation (--method selfdistill):"]
    at = [out.index(f"\n{h}\n") for h in headings]
    listed = {flag: out.index(f"\n  {flag} ") for flag in ("--output", "--seq-len", "--num-heads", "--k-min")}
    assert listed["--output"] < at[0] < listed["--seq-len"] < at[1] < listed["--num-heads"] < at[2] < listed["--k-min"]


@pytest.fixture
def started(monkeypatch) -> dict:
    """What `train` hands to the run (the flags by name), the run itself left out."""
    seen: dict = {}
    monkeypatch.setattr(commands, "_start", lambda args, out, t_start: seen.update(args) or 0)
    return seen


def test_options_by_dataclass_by_name_and_from_the_command_line_are_the_same(started, tmp_path):
    out = str(tmp_path / "o")
    train(output=out, heads=HeadsOptions(num_heads=2), options=TrainOptions(lr=1e-3, seq_len=64))
    grouped = dict(started)
    started.clear()
    train(output=out, num_heads=2, lr=1e-3, seq_len=64)
    assert started == grouped and grouped["num_heads"] == 2 and grouped["lr"] == 1e-3
    assert set(grouped) == set(train_defaults())
    started.clear()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output", out, "--num-heads", "2", "--lr", "1e-3", "--seq-len", "64"])
    assert exit_info.value.code == 0 and started == grouped
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_head'"):
        train(output=out, num_head=2)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_run_saved_with_every_flag_flat_resumes(method):
    """train_config.json keeps every flag of the run flat, the other method's at their defaults, as before the
    groups: such a run resumes, and its other-method flags do not count as given."""
    saved = {"args": {**{k: v for k, v in train_defaults().items() if k != "output"}, "method": method,
                      "seq_len": 64, "_data_fingerprint": "12 bytes"}}
    merged = _merge_resume_args({**train_defaults(), "output": "o", "resume": True}, saved)
    assert merged["method"] == method and merged["seq_len"] == 64 and merged["_data_fingerprint"] == "12 bytes"
    _check_method_options(_Args(merged))
