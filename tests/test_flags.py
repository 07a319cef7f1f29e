"""One spelling per concept in every command: a walk over every command's signature (`mtp.cli.COMMANDS`), and the
old spellings of renamed flags (`mtp.arguments.DEPRECATED`), which still parse, warn and set the new parameter."""

from __future__ import annotations

from collections import defaultdict

import pytest

import mtp
from mtp.arguments import DEPRECATED, DEPRECATED_UNTIL, Renamed, current_arguments, spelled
from mtp.cli import COMMANDS, POSITIONAL, Flag, _load, build_parser, command_flags, main

# Other spellings of the shared concepts -> the one parameter every command spells them with. A command may take
# an old spelling only as a registered deprecated alias.
SPELLINGS: dict[str, str] = {
    # where and in what the model computes
    "devices": "device", "device_map": "device", "gpu": "device",
    "torch_dtype": "dtype", "dtypes": "dtype", "precision": "autocast", "amp": "autocast",
    # the weight format (bench's --fp16/--int8 add rows on a packed copy beside the model's: not a format)
    "quantization": "quantize", "quantized": "quantize", "packed": "quantize",
    # decoding
    "strategies": "strategy", "taus": "tau", "threshold": "tau", "static_k": "k", "ks": "k",
    "num_drafts": "num_draft", "tree_shape": "tree", "tree_shapes": "tree", "trees": "tree",
    "tree_sizes": "tree_size", "tree_nodes": "tree_size", "prompt_lookup": "lookup", "lookup_tokens": "lookup",
    "prompt_lookup_tokens": "hf_lookup", "cuda_graphs": "graphs", "new_tokens": "max_new_tokens",
    "max_tokens": "max_new_tokens", "batch_sizes": "batch_size",
    # inputs and the model
    "prompts_file": "prompts", "prompt_file": "prompts", "mask_id": "mask_token_id", "heads": "num_heads",
    "n_heads": "num_heads", "orders": "loss_order", "loss_orders": "loss_order",
}
# The decoding options `generate`, `eval` and `bench` all take, with the same names and meanings (where bench
# takes a list, a row per value).
DECODING = ("strategy", "tau", "k", "tree", "tree_size", "lookup", "device", "dtype", "graphs")
# Parameters that come together: a command that takes one takes the other.
PAIRS = (("mask_token", "mask_token_id"),)


def all_flags(commands: dict[str, str] = COMMANDS) -> dict[str, list[Flag]]:
    return {name: command_flags(_load(target), POSITIONAL.get(name, [])) for name, target in commands.items()}


def spelling_problems(flags: dict[str, list[Flag]]) -> list[str]:
    """What breaks one spelling per concept: another spelling of a concept, one name with two kinds of value,
    a decoding option one of generate/eval/bench lacks, half of a pair."""
    problems = [f"{command} {f.flag}: spell it {spelled(SPELLINGS[f.name], True)}"
                for command, fs in flags.items() for f in fs if f.name in SPELLINGS]
    uses: dict[str, list[tuple[str, Flag]]] = defaultdict(list)
    for command, fs in flags.items():
        for f in fs:
            uses[f.name].append((command, f))
    for name, where in uses.items():
        if len({f.type for _, f in where}) > 1:
            problems.append(f"{spelled(name, True)} takes " + ", ".join(f"{f.type.__name__} in {c}" for c, f in where))
        choices = [(c, set(f.choices)) for c, f in where if f.choices]
        for (c1, a), (c2, b) in zip(choices, choices[1:], strict=False):
            if not (a <= b or b <= a):  # a command may take fewer of the values (train: no float16 weights)
                problems.append(f"{spelled(name, True)}: {sorted(a)} in {c1}, {sorted(b)} in {c2}")
    for command in ("generate", "eval", "bench"):
        names = {f.name for f in flags.get(command, [])}
        problems += [f"{command} lacks {spelled(n, True)}" for n in DECODING if n not in names]
    for command, fs in flags.items():
        names = {f.name for f in fs}
        for a, b in PAIRS:
            if (a in names) != (b in names):
                has, lacks = (a, b) if a in names else (b, a)
                problems.append(f"{command} takes {spelled(has, True)} without {spelled(lacks, True)}")
    return problems


def alias_problems(flags: dict[str, list[Flag]], deprecated: dict[str, dict[str, Renamed]]) -> list[str]:
    """What is wrong with a table of old spellings: an old flag that is still a flag, a new parameter the command
    does not have, an old flag that is not a known other spelling of its new parameter."""
    problems = []
    for command, renamed in deprecated.items():
        if command not in flags:
            problems.append(f"{command}: no such command")
            continue
        by_flag, names = {f.flag for f in flags[command]}, {f.name for f in flags[command]}
        for old, to in renamed.items():
            if old in by_flag:
                problems.append(f"{command} {old}: still a flag of its own")
            if to.param not in names:
                problems.append(f"{command} {old}: {to.param} is no parameter of {command}")
            if SPELLINGS.get(old.removeprefix("--").replace("-", "_")) != to.param:
                problems.append(f"{command} {old}: not a known other spelling of {spelled(to.param, True)}")
    return problems


def test_every_command_spells_each_concept_one_way():
    flags = all_flags()
    assert spelling_problems(flags) == []
    assert alias_problems(flags, DEPRECATED) == []
    # every command that computes takes --device (convert rewrites files, tensor by tensor, on the CPU)
    assert [c for c, fs in flags.items() if c != "convert" and "device" not in {f.name for f in fs}] == []


def _old_style(prompts_file: str | None = None, taus: list[float] | None = None, device: int = 0,
               dtype: str = "fp32", mask_token: str | None = None) -> int:
    return 0


def _new_style(prompts: str | None = None, tau: float = 0.9, device: str = "auto",
               dtype: str = "float32") -> int:
    return 0


def test_the_walk_finds_each_kind_of_problem():
    """The checks above report what they are for (they pass on the commands only because those are right)."""
    fake = {"old": command_flags(_old_style), "new": command_flags(_new_style)}
    problems = spelling_problems(fake)
    assert "old --prompts-file: spell it --prompts" in problems and "old --taus: spell it --tau" in problems
    assert "--device takes int in old, str in new" in problems
    assert "generate lacks --strategy" in problems
    assert "old takes --mask-token without --mask-token-id" in problems
    aliases = alias_problems(fake, {"new": {"--prompts": Renamed("prompts"), "--devices": Renamed("tree"),
                                            "--tau-list": Renamed("tau")}, "gone": {}})
    assert aliases == ["new --prompts: still a flag of its own",
                       "new --prompts: not a known other spelling of --prompts",
                       "new --devices: tree is no parameter of new",
                       "new --devices: not a known other spelling of --tree",
                       "new --tau-list: not a known other spelling of --tau", "gone: no such command"]


# The old spellings of this release: each keeps working, with a warning, until DEPRECATED_UNTIL.
OLD_SPELLINGS = [("generate", "--prompts-file"), ("info", "--new-tokens"), ("bench", "--taus"), ("bench", "--static-k"),
                 ("bench", "--tree-sizes"), ("bench", "--tree-shape"), ("bench", "--prompt-lookup-tokens"),
                 ("bench", "--batch-sizes"), ("bench-train", "--heads"), ("bench-train", "--orders"),
                 ("train", "--precision")]


def test_every_old_spelling_is_registered():
    assert sorted(OLD_SPELLINGS) == sorted((c, old) for c, renamed in DEPRECATED.items() for old in renamed)


def _alias_cases():
    for command, renamed in DEPRECATED.items():
        for old, to in renamed.items():
            for value in to.values or [None]:
                yield command, old, value


def _sample(f: Flag) -> tuple[list[str], object]:
    """Words a flag takes on the command line, and what they parse to."""
    words = [str(f.choices[-1])] if f.choices else {int: ["3", "5"], float: ["0.5", "0.25"]}.get(f.type, ["x", "y"])
    words = words if f.many else words[:1]
    typed = [f.type(w) for w in words]
    return words, typed if f.many else typed[0]


def _required(command: str) -> list[str]:
    flags = command_flags(_load(COMMANDS[command]), POSITIONAL.get(command, []))
    return [word for f in flags if f.required for word in (f.flag, "x")]


@pytest.mark.parametrize("command, old, value", list(_alias_cases()))
def test_each_old_spelling_parses_to_the_new_parameter_and_warns(command, old, value, capsys):
    to = DEPRECATED[command][old]
    new = {f.name: f for f in command_flags(_load(COMMANDS[command]))}[to.param]
    if to.values is None:
        words, expected = _sample(new)
    else:
        words, expected = [value], to.values[value]
    parser = build_parser(only=command)
    parsed = vars(parser.parse_args([command, *_required(command), old, *words]))
    assert parsed[to.param] == expected
    err = capsys.readouterr().err
    new_words = [str(v) for v in expected] if isinstance(expected, list) else [str(expected)]
    typed_old = " ".join([old] if value is None else [old, value])
    typed_new = " ".join([new.flag] if value is None else [new.flag, *new_words])
    assert err == f"mtp: warning: {typed_old} is deprecated, use {typed_new}; it goes in {DEPRECATED_UNTIL}\n"
    # the new spelling parses to the same, without a word
    assert vars(parser.parse_args([command, *_required(command), new.flag, *new_words]))[to.param] == expected
    assert capsys.readouterr().err == ""


def test_an_old_spelling_runs_the_command(tiny_mtp_folder, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 7 + 5?\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(tiny_mtp_folder), "--prompts-file", str(prompts), "--max-new-tokens", "3",
              "--json"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 0, err
    assert err.splitlines()[0] == \
        f"mtp: warning: --prompts-file is deprecated, use --prompts; it goes in {DEPRECATED_UNTIL}"


def test_a_run_saved_under_old_flag_names_resumes_under_the_new_ones():
    from mtp.errors import MTPError
    from mtp.training.commands import _merge_resume_args, train_defaults

    assert current_arguments("train", {"precision": "bf16", "lr": 0.1, "_answer_count": 3}) == \
        {"autocast": "bfloat16", "lr": 0.1, "_answer_count": 3}
    assert current_arguments("bench-train", {"heads": [1, 4]}) == {"num_heads": [1, 4]}
    defaults = train_defaults()
    saved = {"args": {"precision": "bf16", "_answer_count": 3}}  # train_config.json of a run started with --precision
    merged = _merge_resume_args({**defaults, "output": "o", "resume": True}, saved)
    assert merged["autocast"] == "bfloat16" and merged["_answer_count"] == 3 and "precision" not in merged
    with pytest.raises(MTPError, match="--autocast float32 \\(the run used bfloat16\\)"):
        _merge_resume_args({**defaults, "output": "o", "resume": True, "autocast": "float32"}, saved)


def test_the_command_line_says_which_flags_were_typed_even_at_their_default_values():
    """`mtp.cli._parse`: every parameter has its value (the default where its flag is absent, as argparse gives
    it), and the typed ones are known whatever their spelling, a default value typed included."""
    from mtp.cli import _parse

    defaults = {f.name: f.default for f in command_flags(_load(COMMANDS["train"]))}
    args, typed, unknown = _parse("train", ["train", "--output", "o", "--seq-len", str(defaults["seq_len"]),
                                            "--lr=0.5", "--no-progress", "--precision", "bf16", "--nonsense"])
    assert typed == {"output", "seq_len", "lr", "progress", "autocast"} and unknown == ["--nonsense"]
    assert args == {**defaults, "output": "o", "lr": 0.5, "progress": False, "autocast": "bfloat16"}
    for command in ("bench", "eval"):  # (eval: an optional word)
        args, typed, _ = _parse(command, [command])
        assert typed == frozenset()
        assert args == {f.name: f.default for f in command_flags(_load(COMMANDS[command]), POSITIONAL.get(command, []))}


def test_resume_refuses_a_flag_typed_at_its_default_value_that_the_run_did_not_use(tmp_path, capsys):
    """A flag typed on the command line is given even at its default value: the run's value does not silently
    replace it (`--seq-len 512` on a run of 64 was taken as "not given"). From Python, where typing cannot be
    told, a value at its default is still the run's to fill."""
    from mtp.arguments import TYPED_FLAGS
    from mtp.errors import MTPError
    from mtp.training.commands import _merge_resume_args, train_defaults

    defaults = train_defaults()
    saved = {"args": {"seq_len": 64, "lr": defaults["lr"]}}
    args = {**defaults, "output": "o", "resume": True}
    assert _merge_resume_args(args, saved)["seq_len"] == 64  # from Python
    token = TYPED_FLAGS.set(("train", frozenset({"output", "resume", "seq_len", "lr"})))
    try:
        with pytest.raises(MTPError, match=f"--seq-len {defaults['seq_len']} \\(the run used 64\\)"):
            _merge_resume_args(args, saved)
        merged = _merge_resume_args({**args, "seq_len": 64}, saved)  # typed as the run had it
        assert merged["seq_len"] == 64 and merged["lr"] == defaults["lr"]
    finally:
        TYPED_FLAGS.reset(token)
    token = TYPED_FLAGS.set(("demo", frozenset({"seq_len"})))  # another command's flags say nothing of train's
    try:
        assert _merge_resume_args(args, saved)["seq_len"] == 64
    finally:
        TYPED_FLAGS.reset(token)
    out = tmp_path / "run"  # the command line end to end: refused before any work
    out.mkdir()
    (out / "train_config.json").write_text('{"args": {"seq_len": 64}}')
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output", str(out), "--resume", "--seq-len", str(defaults["seq_len"])])
    assert exit_info.value.code == 2
    assert f"--seq-len {defaults['seq_len']} (the run used 64)" in capsys.readouterr().err


def test_the_old_spellings_go_in_the_release_they_name():
    def release(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split(".")[:2])

    assert release(mtp.__version__) < release(DEPRECATED_UNTIL) or not any(DEPRECATED.values()), \
        f"mtp {mtp.__version__}: remove the deprecated spellings of mtp.arguments.DEPRECATED"
