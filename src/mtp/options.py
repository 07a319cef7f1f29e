"""Options grouped in dataclasses: a command parameter typed with a dataclass stands for the dataclass's fields.

A command with many options (`mtp train`) takes some of them as dataclasses (`options: TrainOptions`, ...); each
field is a flag of its own, spelled from the field's name as any parameter is (`mtp.cli.command_flags`), and
shown under a heading that is the dataclass docstring's first paragraph. The command line, and `train_config.json`
files, see the fields as flat names -> values: these functions go between that flat view and the dataclasses.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping


def unwrap_optional(tp) -> tuple[object, bool]:
    """`X | None` -> (X, True); any other annotation -> (it, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def option_classes(fn: Callable) -> dict[str, type]:
    """The parameters of `fn` whose annotation is a dataclass (or an optional one) -> that dataclass."""
    hints = typing.get_type_hints(fn)
    classes = {}
    for name in inspect.signature(fn).parameters:
        tp, _ = unwrap_optional(hints.get(name))
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            classes[name] = tp
    return classes


def field_defaults(cls: type) -> dict[str, object]:
    """A dataclass's field names -> their defaults (MISSING for a field without one)."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
        else:
            defaults[f.name] = dataclasses.MISSING
    return defaults


def flat_defaults(fn: Callable) -> dict[str, object]:
    """Every flag of `fn` -> its default: its plain parameters and the fields of its dataclass parameters."""
    classes = option_classes(fn)
    defaults: dict[str, object] = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name in classes:
            defaults.update(field_defaults(classes[name]))
        elif param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            defaults[name] = param.default
    return defaults


def grouped_arguments(fn: Callable, flat: Mapping[str, object]) -> dict[str, object]:
    """The keyword arguments of `fn` from flat flag values: the fields of each dataclass parameter gathered into
    an instance of it (a field missing from `flat` keeps its default)."""
    classes = option_classes(fn)
    fields = {f: param for param, cls in classes.items() for f in field_defaults(cls)}
    kwargs = {name: value for name, value in flat.items() if name not in fields}
    for param, cls in classes.items():
        kwargs[param] = cls(**{f: flat[f] for f in field_defaults(cls) if f in flat})
    return kwargs


def with_flat_keywords(command: str, groups: Mapping[str, object], flat: Mapping[str, object]) -> dict[str, object]:
    """`groups` (parameter -> a dataclass instance) with the fields named in `flat` (field name -> value) set: the
    Python spelling `train(num_heads=2)` of `train(heads=HeadsOptions(num_heads=2))`."""
    owner = {f.name: param for param, group in groups.items() for f in dataclasses.fields(group)}
    unknown = [name for name in flat if name not in owner]
    if unknown:
        raise TypeError(f"{command}() got an unexpected keyword argument {unknown[0]!r}")
    return {param: dataclasses.replace(group, **{k: v for k, v in flat.items() if owner[k] == param})
            for param, group in groups.items()}


def changed_fields(cls: type, values: Mapping[str, object]) -> list[str]:
    """The fields of dataclass `cls` whose value in `values` (flat names -> values) is not the field's default."""
    return [name for name, default in field_defaults(cls).items() if name in values and values[name] != default]
