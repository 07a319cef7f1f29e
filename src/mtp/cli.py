"""`mtp` command line. Each command is a typed function; its signature *is* the CLI (as in litgpt).

A command function takes keyword arguments with type hints and defaults; `build_parser` turns them into flags
(`num_heads: int = 4` becomes `--num-heads 4`, `chat: bool = False` becomes `--chat/--no-chat`). The first
paragraph of its docstring is the help text; `name: text` lines under "Args:" document the flags. A parameter
typed with a dataclass (`heads: HeadsOptions`) stands for its fields, each a flag, listed in a group headed by the
dataclass's summary and documented by its "Args:" lines (`mtp.options`); the command gets the dataclass.
`python -m mtp.cli --markdown docs/cli.md` writes the same as the command-line reference (`markdown`).
The old spellings of renamed flags (`mtp.arguments.DEPRECATED`) are hidden flags that warn and set the new
parameter (`add_deprecated_arguments`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mtp.arguments import (
    DEPRECATED,
    DEPRECATED_UNTIL,
    TYPED_FLAGS,
    Renamed,
    check_command_arguments,
    deprecation_warning,
    spelled,
    with_value,
)
from mtp.errors import MTPError
from mtp.io import DISK_ERRORS
from mtp.options import field_defaults, grouped_arguments, option_classes, unwrap_optional
from mtp.process import Terminated, end_process, exit_code, sigterm_as_interrupt

# command name -> "module:function". Imported lazily so `mtp --help` stays fast.
COMMANDS: dict[str, str] = {
    "info": "mtp.commands:info",
    "convert": "mtp.formats.commands:convert",
    "generate": "mtp.decoding.commands:generate",
    "chat": "mtp.decoding.chat:chat",
    "serve": "mtp.decoding.serve:serve",
    "train": "mtp.training.commands:train",
    "bench-train": "mtp.training.commands:bench_train",
    "eval": "mtp.evaluation.commands:eval_",
    "bench": "mtp.evaluation.commands:bench",
    "demo": "mtp.evaluation.demo:demo",
}
# command name -> parameters that are also accepted as an optional positional word (`mtp eval gsm8k`).
POSITIONAL: dict[str, list[str]] = {"eval": ["task"]}


def _load(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _first_paragraph(doc: str) -> str:
    """A docstring's first paragraph on one line: a command's summary in `--help` and in the listing."""
    return doc.split("\n\n")[0].replace("\n", " ")


def _doc_parts(fn: Callable) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    summary = _first_paragraph(doc)
    args: dict[str, str] = {}
    if "Args:" in doc:
        last, indent = None, None
        for raw in doc.split("Args:", 1)[1].splitlines():
            line = raw.strip()
            key, colon, text = line.partition(":")
            # A line indented deeper than the arguments continues the previous one's help, even when it starts
            # like an argument ("auto: ...").
            deeper = indent is not None and len(raw) - len(raw.lstrip()) > indent
            if key.isidentifier() and colon and not deeper:
                args[key] = text.strip()
                last, indent = key, len(raw) - len(raw.lstrip())
            elif line and last is not None:
                args[last] += " " + line
    return summary, args


@dataclass(frozen=True)
class Flag:
    """One keyword parameter of a command as the command line offers it."""

    name: str  # the parameter
    flag: str  # "--num-heads", or the parameter's name when it is an optional positional word
    type: type  # bool: a --x/--no-x switch
    choices: tuple = ()
    many: bool = False  # one or more values
    required: bool = False
    default: object = None
    help: str = ""
    positional: bool = False
    group: str = ""  # the heading it is listed under: its dataclass's summary ("" for a plain parameter)


def _flag(name: str, annotation, default: object, help: str, positional: bool = False, group: str = "") -> Flag:
    tp, _ = unwrap_optional(annotation)
    required = default is inspect.Parameter.empty or default is dataclasses.MISSING
    choices, many = (), False
    if typing.get_origin(tp) in (list, tuple):
        (tp, *_) = typing.get_args(tp) or (str,)
        many = True
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        tp = type(choices[0])
    return Flag(name, name if positional else spelled(name, True), tp, choices, many, required,
                None if required else default, help, positional, group)


def _option_flags(cls: type) -> list[Flag]:
    """The flags of a dataclass parameter (`mtp.options`): one per field, under the dataclass's summary."""
    hints = typing.get_type_hints(cls)
    group, helps = _doc_parts(cls)
    return [_flag(name, hints.get(name, str), default, helps.get(name, ""), group=group)
            for name, default in field_defaults(cls).items()]


def command_flags(fn: Callable, positional: Sequence[str] = ()) -> list[Flag]:
    """The flags of a command function: one per keyword parameter, typed from its annotations, documented by the
    "Args:" lines of its docstring (names in `positional`: an optional positional word instead of a flag); a
    parameter typed with a dataclass gives one flag per field (`mtp.options`), documented by its docstring."""
    hints = typing.get_type_hints(fn)
    classes = option_classes(fn)
    _, helps = _doc_parts(fn)
    flags = []
    for name, param in inspect.signature(fn).parameters.items():
        if name in classes:
            flags += _option_flags(classes[name])
        elif param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            flags.append(_flag(name, hints.get(name, str), param.default, helps.get(name, ""), name in positional))
    seen = set()
    for f in flags:
        if f.name in seen:
            raise TypeError(f"{getattr(fn, '__name__', fn)}: two flags named {f.flag}")
        seen.add(f.name)
    return flags


def add_function_arguments(parser: argparse.ArgumentParser, fn: Callable, positional: Sequence[str] = ()) -> None:
    """Add one flag per keyword parameter of `fn` (`command_flags`); the fields of a dataclass parameter go in an
    argument group headed by its summary."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in command_flags(fn, positional):
        where = parser
        if f.group:
            where = groups.get(f.group) or groups.setdefault(f.group, parser.add_argument_group(f.group))
        _add_flag(where, f)


def _add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, f: Flag) -> None:
    if f.type is bool:
        parser.add_argument(f.flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                            help=f.help)
        return
    kwargs: dict = {"type": f.type, "default": f.default, "help": f.help}
    if f.choices:
        kwargs["choices"] = list(f.choices)
    if f.many:
        kwargs["nargs"] = "+"
    if not f.required and f.default is not None:
        kwargs["help"] = f"{f.help} (default: {f.default})".strip()
    if f.positional:
        parser.add_argument(f.flag, nargs="?", **kwargs)
    else:
        parser.add_argument(f.flag, dest=f.name, required=f.required, **kwargs)


class _DeprecatedFlag(argparse.Action):
    """An old spelling of a flag: one warning line on stderr, then its value (translated when the values were
    renamed too) goes to the new parameter. Hidden from the help; the reference lists it apart."""

    def __init__(self, option_strings, dest, new: Flag, renamed: Renamed, **kwargs):
        if new.type is bool:
            raise TypeError(f"{option_strings[0]}: a renamed switch needs a --x/--no-x pair of its own")
        if renamed.values is not None:
            kwargs["choices"] = list(renamed.values)
        else:
            kwargs.update(type=new.type, choices=list(new.choices) or None, nargs="+" if new.many else None)
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.new, self.renamed = new, renamed

    def __call__(self, parser, namespace, values, option_string=None):
        if self.renamed.values is None:
            warning = deprecation_warning(option_string, self.new.flag)
        else:
            warning = deprecation_warning(option_string, self.new.flag, values, self.renamed.values[values])
            values = self.renamed.values[values]
        print(f"mtp: warning: {warning}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_arguments(parser: argparse.ArgumentParser, fn: Callable, renamed: Mapping[str, Renamed],
                             positional: Sequence[str] = ()) -> None:
    """Accept each old flag of `renamed` (`mtp.arguments.DEPRECATED`) as a spelling of its new parameter."""
    flags = {f.name: f for f in command_flags(fn, positional)}
    for old, to in renamed.items():
        new = flags[to.param]
        parser.add_argument(old, dest=new.name, action=_DeprecatedFlag, new=new, renamed=to)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (what is wrong, where the help is), not its usage screen."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A value that starts like a negative number is a value, not a flag: "--logit-bias -5:1" reaches the pair's
        # own check ("-5 is not a token id"), where argparse said "expected at least one argument".
        if isinstance(getattr(self, "_negative_number_matcher", None), re.Pattern):
            self._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+:")

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser(commands: dict[str, str] = COMMANDS, only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="mtp", description="Multi-token prediction for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, target in commands.items():
        if only is not None and name != only:
            sub.add_parser(name)  # listed in --help without importing its module
            continue
        fn = _load(target)
        summary, _ = _doc_parts(fn)
        p = sub.add_parser(name, help=summary, description=summary)
        add_function_arguments(p, fn, POSITIONAL.get(name, []))
        add_deprecated_arguments(p, fn, DEPRECATED.get(name, {}), POSITIONAL.get(name, []))
    return parser


def _summary_from_source(target: str) -> str:
    """A command's one-line help read from its module's source, so that `mtp --help` imports no torch."""
    module, name = target.split(":")
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return _first_paragraph(ast.get_docstring(node) or "")
    return ""


def _help_listing() -> str:
    lines = ["usage: mtp COMMAND [options]", "", "Multi-token prediction for Hugging Face causal LMs.", "",
             "commands:"]
    for name, target in COMMANDS.items():
        try:
            summary = _summary_from_source(target)
        except Exception:  # a command whose module cannot be read is still listed
            summary = ""
        lines.append(f"  {name:<12} {summary}")
    lines.append("")
    lines.append("Run `mtp COMMAND --help` for a command's options; `mtp --version` for the version.")
    return "\n".join(lines)


CLI_DOC = "docs/cli.md"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|")


def _flag_markdown(f: Flag) -> str:
    if f.positional:
        name = f"`[{f.flag}]` (a word after the command)"
    elif f.type is bool:
        name = f"`{f.flag}`, `--no-{f.flag[2:]}`"
    else:
        name = f"`{f.flag}`"
    if f.type is bool:
        value = ""
    else:
        value = "{" + ",".join(map(str, f.choices)) + "}" if f.choices else f.type.__name__
        value += " ..." if f.many else ""
    if f.required:
        default = "required"
    elif f.default is None:
        default = ""
    elif f.type is bool:
        default = "on" if f.default else "off"
    else:
        default = "`" + " ".join(map(str, f.default)) + "`" if f.many else f"`{f.default}`"
    return f"| {_cell(name)} | {_cell(value)} | {_cell(default)} | {_cell(f.help)} |"


def command_markdown(name: str, fn: Callable, positional: Sequence[str] = ()) -> str:
    """One command's section of the reference: its summary and a table of its flags (`command_flags`), a table
    per group of them."""
    summary, _ = _doc_parts(fn)
    flags = command_flags(fn, positional)
    lines = [f"## mtp {name}", "", summary, ""]
    for group in dict.fromkeys(f.group for f in flags):  # the plain parameters' table, then one per group
        lines += [f"### {group}", ""] if group else []
        lines += ["| flag | value | default | what it does |", "|---|---|---|---|",
                  *(_flag_markdown(f) for f in flags if f.group == group), ""]
    return "\n".join(lines)


def markdown(commands: dict[str, str] = COMMANDS) -> str:
    """The command-line reference (docs/cli.md), generated from the commands' signatures and docstrings."""
    index = ", ".join(f"[`{name}`](#mtp-{name})" for name in commands)
    head = ["# Command line", "",
            f"Generated from the commands' typed signatures by `python -m mtp.cli --markdown {CLI_DOC}`: edit the",
            "command functions' signatures and docstrings, not this file (`tests/test_cli.py` checks it is current).",
            "`mtp COMMAND --help` prints the same. A bad value is one line and exit code 2, before any work.", "",
            f"Commands: {index}; old spellings: [deprecated](#deprecated-spellings).", ""]
    sections = [command_markdown(name, _load(target), POSITIONAL.get(name, [])) for name, target in commands.items()]
    return "\n".join(head + sections + [deprecated_markdown({c: r for c, r in DEPRECATED.items() if c in commands})])


def deprecated_markdown(deprecated: Mapping[str, Mapping[str, Renamed]] = DEPRECATED) -> str:
    """The reference's table of old spellings, which still work, with a warning, until `DEPRECATED_UNTIL`."""
    rows = []
    for command, renamed in deprecated.items():
        for old, to in renamed.items():
            new = spelled(to.param, True)
            pairs = [(old, new)] if to.values is None else \
                [(with_value(old, v), with_value(new, n)) for v, n in to.values.items()]
            rows += [f"| {command} | `{o}` | `{n}` |" for o, n in pairs]
    return "\n".join(["## Deprecated spellings", "",
                      f"Old flags that still work until {DEPRECATED_UNTIL}: each prints one warning line and sets "
                      "the new flag.", "", "| command | old | new |", "|---|---|---|", *rows, ""])


# command -> flags other commands have that this one takes elsewhere -> where (said instead of a near spelling)
ELSEWHERE: dict[str, dict[str, str]] = {
    "serve": {flag: "each request brings its own sampling settings (temperature > 0 samples; top_p, top_k, "
                    "min_p, seed, the penalties), as the OpenAI API does"
              for flag in ("--do-sample", "--temperature", "--top-p", "--top-k", "--min-p", "--seed",
                           "--repetition-penalty", "--presence-penalty", "--frequency-penalty", "--min-new-tokens")},
}


def _unknown_arguments(unknown: list[str], fn: Callable, command: str) -> str:
    """What argparse could not place, and the command's flag closest to the first unknown flag."""
    import difflib

    message = f"unrecognized arguments: {' '.join(unknown)}"
    flag = next((word.split("=", 1)[0] for word in unknown if word.startswith("--")), None)
    if flag is None:
        return message
    if flag in ELSEWHERE.get(command, {}):
        return f"{message}; {ELSEWHERE[command][flag]}"
    known = [name for f in command_flags(fn, POSITIONAL.get(command, [])) if not f.positional
             for name in ((f.flag, "--no-" + f.flag[2:]) if f.type is bool else (f.flag,))]
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.7)
    return f"{message}; did you mean {close[0]}?" if close else message


def _check_one_spelling(command: str, argv: Sequence[str]) -> None:
    """A renamed flag given in both spellings: the last would win without a word, so neither does."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for old, renamed in DEPRECATED.get(command, {}).items():
        new = spelled(renamed.param, True)
        if old in given and new in given:
            raise MTPError(f"{old} and {new} are two spellings of one flag ({old} is deprecated); give {new} only")


def run(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help_listing())
        return 0
    if argv[0] in ("-V", "--version"):
        from mtp import __version__

        print(f"mtp {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"mtp: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    _check_one_spelling(command, argv)
    args, typed, unknown = _parse(command, argv)
    fn = _load(COMMANDS[command])
    if unknown:
        print(f"mtp {command}: error: {_unknown_arguments(unknown, fn, command)} (see `mtp {command} --help`)",
              file=sys.stderr)
        return 2
    defaults = {f.name: f.default for f in command_flags(fn, POSITIONAL.get(command, []))}
    check_command_arguments(command, args, defaults)  # ranges and output paths, before the command does any work
    import torch

    # The library draws an unseeded sampling call's seed from torch's global generator (as transformers samples
    # from it), which starts at the same seed in every process: a command seeds it from the system, so that
    # without --seed each run samples anew.
    torch.seed()
    token = TYPED_FLAGS.set((command, typed))
    try:
        with _no_bars(args.get("progress") is False):
            result = fn(**grouped_arguments(fn, args))
    finally:
        TYPED_FLAGS.reset(token)
    return int(result or 0)


def _parse(command: str, argv: list[str]) -> tuple[dict[str, object], frozenset[str], list[str]]:
    """`argv` read for `command`: every parameter's value (a flag not typed: its default, as argparse gives it), the
    parameters whose flags were typed (in any spelling: `--x=1`, `--no-x`, an old name), and the words argparse
    could not place. A flag typed at its default value is typed all the same (`mtp train --resume` tells the two
    apart), so the command's parser leaves out the flags not typed, and their defaults are filled in after."""
    parser = build_parser(only=command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    untyped, positional = {}, {}
    for action in sub._actions:
        if not action.option_strings:  # (argparse checks an absent optional word's default against its choices)
            positional[action.dest] = action.default
        elif action.dest != "help" and action.default is not argparse.SUPPRESS:
            untyped[action.dest] = (action, action.default)
            action.default = argparse.SUPPRESS
    namespace, unknown = parser.parse_known_args(argv)
    given = vars(namespace)
    given.pop("command")
    args = {dest: sub._get_value(action, default) if isinstance(default, str) else default  # as argparse converts
            for dest, (action, default) in untyped.items()}  # a default given as a string
    typed = {k for k, v in given.items() if k not in positional or v != positional[k]}  # a word: if not its default
    return {**args, **given}, frozenset(typed), unknown


@contextlib.contextmanager
def _no_bars(quiet: bool):
    """--no-progress: no bar on stderr at all, transformers' own included ("Loading weights", its GGUF conversion:
    `mtp.formats.gguf`); restored afterwards for a caller that runs several commands in one process."""
    if not quiet:  # (transformers takes seconds to import: only where its bars must go)
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    """The command line (`mtp ...`); `argv`: its words (default: the process's, which it then ends with
    `process.end_process`; given words, it raises SystemExit as usual)."""
    try:
        with sigterm_as_interrupt():
            code = run(argv)
    except MTPError as e:
        print(f"mtp: error: {e}", file=sys.stderr)
        code = 2
    except FileNotFoundError as e:
        print(f"mtp: error: file not found: {e.filename or e}", file=sys.stderr)
        code = 2
    except (PermissionError, IsADirectoryError, NotADirectoryError) as e:  # what the path checks cannot foresee
        print(f"mtp: error: cannot use {e.filename or 'a path'}: {e.strerror or e}", file=sys.stderr)
        code = 2
    except OSError as e:  # a full disk or a read-only file system where no atomic write names its target
        if e.errno not in DISK_ERRORS:
            raise
        print(f"mtp: error: cannot write {e.filename or 'a file'}: {e.strerror or e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as e:
        print(f"mtp: {'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        code = exit_code(e)
    if argv is None:
        end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--markdown"]:  # python -m mtp.cli --markdown [docs/cli.md]: the reference, printed or written
        if len(sys.argv) > 2:
            from mtp.io import atomic_write_text

            atomic_write_text(sys.argv[2], markdown())
        else:
            print(markdown(), end="")
    else:
        main()
