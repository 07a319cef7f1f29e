"""The rules every argument of every command obeys, in one place, checked before any work is done.

`RULES` maps a parameter name to the values it may take; the same name means the same thing in every command
(`--batch-size`, `--limit`, `--threads`, ...), so one table serves them all, and the CLI applies it to a command's
arguments before calling the command (`mtp.cli.run`). The Python API uses it for the arguments it shares with the
CLI (`check_values(..., flags=False)`: messages name `top_p`, not `--top-p`). `RELATIONS` are the rules between
two arguments, `OUTPUTS` says which commands write a file and which a folder at `--output`: a path of the wrong
kind, or one that cannot be written, is reported at the start, not after an hour of work. `DEPRECATED` lists the
old spellings of renamed flags, which still work, with a warning, for one more release.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mtp.errors import MTPError

# (command, the parameters whose flags were typed) while the CLI runs a command (`mtp.cli.run`). A value equal to
# its default does not say whether it was typed, and `mtp train --resume` must know: a flag typed at its default
# value that differs from the run's is a clash, not a flag left for the run to fill.
TYPED_FLAGS: ContextVar[tuple[str, frozenset[str]] | None] = ContextVar("TYPED_FLAGS", default=None)


def typed_flags(command: str) -> frozenset[str] | None:
    """The parameters typed on the command line of `command`, when the CLI runs it; None for a call from Python (or
    for a command another one calls, e.g. `mtp demo`'s `train`)."""
    typed = TYPED_FLAGS.get()
    return typed[1] if typed is not None and typed[0] == command else None


@dataclass(frozen=True)
class Range:
    """low <= value (< low when low_open), value <= high (< high when high_open); None: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: float | None) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}" if x is not None else ""


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1)
# Each node of a draft tree is a token of every verify forward: beyond a few hundred a step costs more than the
# tokens it can gain.
TREE_SIZE = Range(1, 256)
# What torch's generators take (and every seed derived from one stays there: mtp.training.selfdistill.draw).
SEED = Range(0, 2**64 - 1)

# parameter name -> the values it may take (None, "not given", is always allowed). A list-valued parameter
# (`mtp bench --tau 0.9 0.7`) applies the rule to each element.
RULES: dict[str, Range] = {
    # sizes and counts
    "batch_size": AT_LEAST_1, "gen_batch_size": AT_LEAST_1, "eval_batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1, "limit": AT_LEAST_1,
    "train_limit": Range(2), "threads": AT_LEAST_1, "max_new_tokens": AT_LEAST_1, "steps": AT_LEAST_1,
    "keep_checkpoints": AT_LEAST_1, "seq_len": Range(2), "holdout_max": AT_LEAST_0, "warmup_steps": AT_LEAST_0,
    "eval_every": AT_LEAST_0, "save_every": AT_LEAST_0, "draft_vocab": AT_LEAST_0, "shots": Range(0, 8),
    "hf_lookup": AT_LEAST_0, "bandwidth_gbs": POSITIVE, "sample_temperature": POSITIVE,
    # serving
    "port": Range(0, 65535), "max_batch_size": AT_LEAST_1, "batch_window_ms": AT_LEAST_0, "prompt_cache_mb": AT_LEAST_0,
    # model structure
    "num_heads": AT_LEAST_1, "num_trunk_layers": AT_LEAST_0, "num_draft": AT_LEAST_0,
    "k": AT_LEAST_1, "k_min": AT_LEAST_1, "k_max": AT_LEAST_1, "regions": AT_LEAST_1,
    "lora_rank": AT_LEAST_1, "lora_layers": AT_LEAST_1, "mask_token_id": AT_LEAST_0,
    "tree_size": TREE_SIZE, "lookup": AT_LEAST_0,
    # decoding
    "tau": PROBABILITY, "temperature": AT_LEAST_0, "top_p": Range(0, 1, low_open=True), "min_p": PROBABILITY,
    # (a repetition penalty divides logits in fp32: bounded, so that neither it nor its inverse overflows)
    "top_k": AT_LEAST_0, "logprobs": Range(0, 20), "repetition_penalty": Range(0.01, 100),
    "presence_penalty": Range(-2, 2), "frequency_penalty": Range(-2, 2),  # (OpenAI's range)
    "min_new_tokens": AT_LEAST_0,
    # training
    "epochs": POSITIVE, "train_epochs": POSITIVE, "lr": POSITIVE, "min_lr_ratio": PROBABILITY,
    "weight_decay": AT_LEAST_0, "max_grad_norm": AT_LEAST_0, "holdout": Range(0, 1, high_open=True),
    "prefix_loss": AT_LEAST_0, "entropy_loss": AT_LEAST_0, "answer_minutes": POSITIVE, "budget_minutes": POSITIVE,
    "train_minutes": POSITIVE,
    "seed": SEED,
}

# Rules between arguments: (the parameters, whether the values are fine, what is wrong when they are not).
RELATIONS: list[tuple[tuple[str, ...], Callable[..., bool], str]] = [
    (("do_sample", "temperature"), lambda do_sample, temperature: not do_sample or temperature > 0,
     "{temperature} must be > 0 when sampling ({do_sample})"),
    # drafts that are verified: a tree of candidates and prompt-lookup drafts need the speculative strategy
    (("tree", "strategy"), lambda tree, strategy: tree == "chain" or "speculative" in _strategies(strategy),
     "{tree}: a draft tree is verified; use it with {strategy} speculative"),
    (("tree_size", "strategy"), lambda tree_size, strategy: "speculative" in _strategies(strategy),
     "{tree_size}: a draft tree is verified; use it with {strategy} speculative"),
    # a chain or a tree file has its own shape: a node count would be ignored without a word
    (("tree_size", "tree"), lambda tree_size, tree: all(t in ("auto", "dynamic") for t in _strategies(tree)),
     "{tree_size}: the node count of an auto or dynamic tree; use it with {tree} auto or dynamic"),
    # ConfAdapt and static k emit the heads' top tokens; only greedy and speculative decoding sample
    (("do_sample", "strategy"),
     lambda do_sample, strategy: not do_sample or all(s in ("greedy", "speculative") for s in _strategies(strategy)),
     "{do_sample}: sampling is available with {strategy} greedy or speculative (ConfAdapt and static emit the "
     "heads' top tokens)"),
    (("lookup", "strategy"), lambda lookup, strategy: lookup == 0 or "speculative" in _strategies(strategy),
     "{lookup}: lookup drafts are verified; use them with {strategy} speculative"),
    (("logprobs", "strategy"), lambda logprobs, strategy: all(s in ("greedy", "speculative") for s in _strategies(strategy)),
     "{logprobs}: the model's log-probabilities of the tokens it verified; use them with {strategy} greedy or "
     "speculative (ConfAdapt and static emit the heads' tokens unscored)"),
    # penalties and biases change the verified logits; ConfAdapt and static emit the heads' proposals
    *(((name, "strategy"), lambda value, strategy, neutral=neutral: value == neutral or all(
        s in ("greedy", "speculative") for s in _strategies(strategy)),
       f"{{{name}}} changes the logits greedy or speculative decoding verifies; use it with {{strategy}} "
       "greedy or speculative") for name, neutral in (("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                                                      ("frequency_penalty", 0.0), ("logit_bias", {}),
                                                      ("min_new_tokens", 0))),
    (("num_draft", "strategy"), lambda num_draft, strategy: "speculative" in _strategies(strategy),
     "{num_draft}: drafts verified per step; use it with {strategy} speculative"),
    # greedy decoding makes one token per forward: a k would be ignored without a word
    (("k", "strategy"), lambda k, strategy: any(s != "greedy" for s in _strategies(strategy)),
     "{k}: tokens per forward of a multi-token strategy; greedy makes one (choose {strategy} static, "
     "confadapt or speculative, or drop {k})"),
]


# Options that one mode of a command reads: (the option, the parameters that decide the mode, whether that mode
# reads the option, what is wrong). Set away from the command's default in another mode the option would be ignored
# without a word, so the command line refuses it (`check_command_arguments`; a deciding parameter that is None,
# such as `mtp bench`'s strategies, means every mode). The Python API leaves these alone: transformers-style
# callers pass neutral sampling settings (top_k=50) with do_sample=False.
UNUSED_UNLESS: list[tuple[str, tuple[str, ...], Callable[..., bool], str]] = [
    *((name, ("do_sample",), lambda do_sample: do_sample,
       f"{{{name}}} shapes sampling; greedy decoding ignores it (add {{do_sample}}, or drop {{{name}}})")
      for name in ("temperature", "top_p", "top_k", "min_p", "seed")),
    ("tau", ("strategy",), lambda strategy: "confadapt" in _strategies(strategy),
     "{tau}: the confidence threshold of ConfAdapt; use it with {strategy} confadapt (or drop {tau})"),
    ("lookup_corpus", ("lookup",), lambda lookup: lookup > 0,
     "{lookup_corpus} drafts where {lookup}'s do not: give {lookup} N too (or drop {lookup_corpus})"),
    # mtp info: what --memory decodes
    *((name, ("memory",), lambda memory: memory,
       f"{{{name}}}: with {{memory}} only; without it nothing decodes (add {{memory}}, or drop {{{name}}})")
      for name in ("quantize", "tree_size", "lookup", "max_new_tokens")),
    # mtp train, mtp eval: a split is a dataset's (shipped GSM8K's, a datasets folder's); a data file has none
    ("split", ("data",), lambda data: not Path(str(data)).expanduser().is_file(),
     "{split} chooses a dataset's split (GSM8K's train or test); {data} names a file, which has none (drop {split})"),
    # mtp train: answering the prompts (a resumed run's own --targets decides)
    *((name, ("targets", "resume"), lambda targets, resume: targets == "self" or resume,
       f"{{{name}}}: for the model's own answers ({{targets}} self); this run trains on the data's answers")
      for name in ("max_new_tokens", "gen_batch_size")),
]


def _strategies(strategy: str | Sequence[str]) -> Sequence[str]:
    """The strategies a command decodes with: one, or `mtp bench`'s list of its rows' strategies."""
    return [strategy] if isinstance(strategy, str) else strategy


# command -> parameter -> what it names: a file that will be written, or a folder that will be created / filled.
OutputKind = Literal["file", "folder"]
OUTPUTS: dict[str, dict[str, OutputKind]] = {
    "generate": {"output": "file"}, "bench-train": {"output": "file"}, "train": {"output": "folder"},
    "eval": {"output": "folder"}, "bench": {"output": "folder"}, "demo": {"output": "folder"},
    "convert": {"output": "folder"},
}

# The release in which the old spellings of `DEPRECATED` stop working.
DEPRECATED_UNTIL = "0.3"


@dataclass(frozen=True)
class Renamed:
    """What an old flag became: the parameter it sets now, and, when its values were renamed too, the new value
    of each old one (`values`; None: the values are the new parameter's)."""

    param: str
    values: Mapping[str, object] | None = None


# command -> old flag -> what it became. A concept has one spelling in every command (tests/test_flags.py); an old
# one still parses, prints one warning line and sets the new parameter (`mtp.cli`), until `DEPRECATED_UNTIL`.
DEPRECATED: dict[str, dict[str, Renamed]] = {
    "generate": {"--prompts-file": Renamed("prompts")},
    "info": {"--new-tokens": Renamed("max_new_tokens")},
    "bench": {"--taus": Renamed("tau"), "--static-k": Renamed("k"), "--tree-sizes": Renamed("tree_size"),
              "--tree-shape": Renamed("tree", {"auto": ["auto"], "dynamic": ["dynamic"], "both": ["auto", "dynamic"]}),
              "--prompt-lookup-tokens": Renamed("hf_lookup"), "--batch-sizes": Renamed("batch_size")},
    "bench-train": {"--heads": Renamed("num_heads"), "--orders": Renamed("loss_order")},
    "train": {"--precision": Renamed("autocast", {"auto": "auto", "fp32": "float32", "bf16": "bfloat16",
                                                  "fp16": "float16"})},
}


def with_value(flag: str, value: object = None) -> str:
    """A flag as typed: `--tree-shape both`, `--tree auto dynamic` (a list), `--taus` (None: the flag alone)."""
    return flag if value is None else f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def deprecation_warning(old: str, new: str, value: object = None, new_value: object = None) -> str:
    """The line an old spelling prints: `--taus is deprecated, use --tau; it goes in 0.3`."""
    return f"{with_value(old, value)} is deprecated, use {with_value(new, new_value)}; it goes in {DEPRECATED_UNTIL}"


def current_arguments(command: str, arguments: Mapping[str, object]) -> dict[str, object]:
    """`arguments` (parameter name -> value, e.g. a run's saved flags) with old spellings under their new names
    and values (`DEPRECATED`)."""
    renamed = DEPRECATED.get(command, {})
    current: dict[str, object] = {}
    for name, value in arguments.items():
        new = renamed.get(spelled(name, True))
        if new is None:
            current[name] = value
        else:
            current[new.param] = value if new.values is None else new.values.get(str(value), value)
    return current


def spelled(name: str, flags: bool) -> str:
    """How the user wrote a parameter: `--top-p` on the command line, `top_p` in Python."""
    return "--" + name.rstrip("_").replace("_", "-") if flags else name


def check_values(values: Mapping[str, object], flags: bool = True) -> None:
    """Raise MTPError for the first value that breaks its rule in `RULES` or `RELATIONS`."""
    for name, value in values.items():
        rule = RULES.get(name)
        if rule is None or value is None or isinstance(value, bool):
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            if not isinstance(item, numbers.Real) or isinstance(item, bool):  # the Python API takes anything
                raise MTPError(f"{spelled(name, flags)} must be a number, got {type(item).__name__} {item!r}")
            # (an open range would take an infinity; NaN fails every comparison; an int is finite however large:
            # math.isfinite would overflow converting one of 400 digits to a float)
            if isinstance(item, float) and not math.isfinite(item):
                raise MTPError(f"{spelled(name, flags)} must be a finite number, got {item}")
            if not rule.holds(item):
                raise MTPError(f"{spelled(name, flags)} must be {rule}, got {item}")
    for names, fine, message in RELATIONS:
        if all(values.get(n) is not None for n in names) and not fine(*(values[n] for n in names)):
            raise MTPError(message.format(**{n: spelled(n, flags) for n in names}))


def check_draft_counts(most: int, default_k: int, k: int | Sequence[int] | None, num_draft: int | None, what: str,
                       flags: bool) -> int:
    """k (one, or `mtp bench`'s list) in [1, `most`], num_draft in [0, k - 1]: what a model with `most` heads (or
    mask-token predictions) can read and verify. Decoding checks the loaded model with it, the command line an MTP
    folder's config before loading (`check_draft_flags`). Returns the k in effect (the
    smallest given, else `default_k`). `what` names the model ("4-head model")."""
    the = "this" if flags else "a"
    ks = [] if k is None else list(k) if isinstance(k, list | tuple) else [k]
    for value in ks:
        if not 1 <= value <= most:
            raise MTPError(f"{spelled('k', flags)} must be in [1, {most}] for {the} {what}, got {value}")
    reads = min(ks) if ks else default_k
    if num_draft is not None and not 0 <= num_draft <= reads - 1:
        where = (f"--k {reads}" if flags else f"k={reads}") if ks else f"{the} {what}"
        raise MTPError(f"{spelled('num_draft', flags)} must be in [0, {reads - 1}] with {where}, got {num_draft}")
    return reads


def check_draft_flags(directory: str | os.PathLike | None, k, num_draft: int | None, tree=None,
                      tree_size: int | None = None) -> None:
    """--k (one, or `mtp bench`'s list), --num-draft and a --tree of explicit paths (a JSON list or file) against
    an MTP folder's heads or mask tokens, before it loads (anything else: decoding checks them)."""
    from mtp.decoding.tree import resolve_tree
    from mtp.models.folder_kind import folder_draft_limits

    explicit = isinstance(tree, str) and (tree.lstrip().startswith("[") or Path(tree).is_file())  # (a missing
    # file: the command's own check says so)
    if directory is None or (k is None and num_draft is None and not explicit):
        return
    limits = folder_draft_limits(directory)
    if limits is None:
        return
    reads = check_draft_counts(*limits[:2], k, num_draft, limits[2], flags=True)
    if explicit:  # as deep as the model drafts: k - 1 tokens past the next one, at most --num-draft
        resolve_tree(tree, tree_size, reads - 1 if num_draft is None else min(reads - 1, num_draft), None)


def check_output(path: str | os.PathLike, kind: OutputKind, flag: str = "--output") -> None:
    """Raise MTPError unless `path` can become a file (`kind` "file") or a folder ("folder") written by us."""
    if not str(path).strip():  # (Path("") is the working directory: a run wrote its checkpoints and model there)
        raise MTPError(f"{flag} is empty; give the name of a {kind} to write")
    target = Path(path).expanduser().absolute()
    if kind == "file" and target.is_dir():
        raise MTPError(f"{flag} {path} is a folder; give the name of a file to write")
    if kind == "folder" and target.exists() and not target.is_dir():
        raise MTPError(f"{flag} {path} is a file, not a folder")
    # Files are written to a temporary name beside the target, then renamed; folders likewise (mtp.io), so the
    # nearest existing folder above the target must be writable.
    above = target.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise MTPError(f"{flag} {path} cannot be created: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise MTPError(f"{flag} {path} cannot be written: no permission to write in {above}")
    if kind == "folder" and target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise MTPError(f"{flag} {path} cannot be written: no permission to write in it")


def check_report_folder(path: str, flag: str = "--output") -> None:
    """A folder `mtp eval` or `bench` writes its reports into is not a model's or a training run's: written among
    their files, the reports would be taken for theirs (and `save_pretrained` would refuse the folder after)."""
    folder = Path(path).expanduser()
    for name, what in (("config.json", "a model"), ("train_config.json", "a training run")):
        if (folder / name).is_file():
            raise MTPError(f"{flag} {path} holds {what} ({name}): give a folder of its own for the reports (e.g. "
                           f"{Path(path) / 'reports'})")


def check_unused(arguments: Mapping[str, object], defaults: Mapping[str, object]) -> None:
    """Raise MTPError for an option of `UNUSED_UNLESS` set away from its default (`defaults`) in a mode that would
    ignore it."""
    for name, deciding, reads, message in UNUSED_UNLESS:
        if name not in arguments or name not in defaults or arguments[name] == defaults[name]:
            continue
        if deciding == ("do_sample",) and arguments.get("prompts") is not None:
            continue  # (a prompts file's records may sample: `mtp generate` checks once it has read them)
        if all(arguments.get(d) is not None for d in deciding) and not reads(*(arguments[d] for d in deciding)):
            raise MTPError(message.format(**{n: spelled(n, True) for n in (name, *deciding)}))


def bias_pair(pair: str) -> tuple[int, float]:
    """One --logit-bias TOKEN_ID:BIAS pair as (id, bias); ValueError where it is no such pair."""
    token, _, value = str(pair).partition(":")
    return int(token), float(value)


def _bias_ids(pairs: object) -> list[int]:
    """The token ids of --logit-bias's pairs that read as pairs (a malformed one is `SamplingOptions.bias`'s to
    refuse, with its own words)."""
    ids = []
    for pair in pairs if isinstance(pairs, list | tuple) else ():
        with contextlib.suppress(ValueError):
            ids.append(bias_pair(pair)[0])
    return ids


def check_command_arguments(command: str, arguments: Mapping[str, object],
                            defaults: Mapping[str, object] | None = None) -> None:
    """Everything the CLI checks before it runs `command` with `arguments` (the parsed flags; `defaults`: each
    flag's default, which tells an option the user set, `UNUSED_UNLESS`)."""
    check_values(arguments)
    check_unused(arguments, defaults or {})
    for name, kind in OUTPUTS.get(command, {}).items():
        if arguments.get(name) is not None:
            check_output(str(arguments[name]), kind, spelled(name, True))
    if command in ("eval", "bench") and arguments.get("output") is not None:
        check_report_folder(str(arguments["output"]), spelled("output", True))
    sized = {n: arguments.get(n) for n in ("num_trunk_layers", "lora_layers", "mask_token_id", "seq_len")}
    bias_ids = _bias_ids(arguments.get("logit_bias"))
    if (bias_ids or any(v is not None for v in sized.values())) and not arguments.get("resume"):  # (a resumed
        from mtp.hub import check_model_sizes  # run's model is its own, its sizes checked when it was made)

        check_model_sizes(arguments.get("model", arguments.get("input")), token_ids=bias_ids, **sized)
    if arguments.get("mask_token") is not None and arguments.get("mask_token_id") is None:
        from mtp.hub import check_mask_token

        check_mask_token(arguments.get("model"), arguments["mask_token"])
    if any(arguments.get(n) is not None for n in ("k", "num_draft", "tree")):  # against the folder's heads
        check_draft_flags(arguments.get("model"), arguments.get("k"), arguments.get("num_draft"),
                          arguments.get("tree"), arguments.get("tree_size"))
    if arguments.get("device") is not None:  # a device this torch cannot use, CPU-only packing on a GPU
        from mtp.runtime import resolve_runtime

        resolve_runtime(arguments["device"], quantize=str(arguments.get("quantize") or "none"), flags=True)
