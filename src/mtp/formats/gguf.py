"""Turn a GGUF checkpoint into a plain Hugging Face folder (fp32 safetensors), atomically.

Dequantising a GGUF through transformers is slow (~20 s for 135M parameters on 2 CPU cores), so callers do it once
and load the resulting folder afterwards. The folder only appears under its final name once it is complete.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from mtp.errors import MTPError, first_line
from mtp.formats.hf_weights import check_config_sizes, complete_from_pretrained
from mtp.io import disk_errors, moved_aside, remove_stale_temporaries, restore_moved_aside

# What a truncated, corrupt or unsupported GGUF makes transformers' and gguf's readers raise (a head count of 0:
# ZeroDivisionError).
_READ_ERRORS = (ValueError, OSError, KeyError, IndexError, NotImplementedError, struct.error, ZeroDivisionError)


def is_complete_folder(folder: Path) -> bool:
    """A finished conversion (or any usable HF folder): a config plus its weights."""
    weights = folder / "model.safetensors", folder / "model.safetensors.index.json"
    return (folder / "config.json").is_file() and any(w.is_file() for w in weights)


def convert_gguf_to_folder(gguf_path: Path, output: Path) -> Path:
    """Dequantise `gguf_path` to fp32 and save it, with its tokenizer, as a Hugging Face folder at `output`."""
    # Imported here: transformers costs seconds to import and most callers of this module never convert.
    from transformers import AutoConfig, AutoTokenizer


    gguf_path, output = Path(gguf_path).resolve(), Path(output)
    if not gguf_path.is_file():
        raise MTPError(f"GGUF file not found: {gguf_path}")
    with disk_errors(output):  # a full disk or a read-only $MTP_HOME
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output.parent, output.name)  # left by conversions that were killed
        restore_moved_aside(output)  # a cache a killed _publish moved aside: back, to be replaced (not leaked)
        tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"mtp: converting {gguf_path.name} to a Hugging Face folder at {output} (about 20 s, once)",
              file=sys.stderr, flush=True)
        try:
            folder, name = str(gguf_path.parent), gguf_path.name
            try:
                with _parsed_once():
                    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
                    # sizes in its metadata that its weights cannot have: refused before from_pretrained builds the
                    # model from them (a traceback there, or an hour spent building a million layers)
                    check_config_sizes(gguf_path, AutoConfig.from_pretrained(folder, gguf_file=name),
                                       gguf_path.stat().st_size)
                    with _bar_follows_transformers():
                        quantized = complete_from_pretrained(folder, gguf_path, gguf_file=name, dtype=torch.float32)
            except _READ_ERRORS as e:
                size = gguf_path.stat().st_size
                raise MTPError(f"cannot read {gguf_path} as a GGUF model ({size:,} bytes: a file cut short or damaged "
                               f"fails so; copy or download it again): {first_line(e)}") from e
            _plain_copy(quantized).save_pretrained(tmp)  # safetensors, config.json, generation_config.json
            tokenizer.save_pretrained(tmp)
            _publish(tmp, output)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return output


@contextlib.contextmanager
def _parsed_once():
    """transformers reads a GGUF file whole for the tokenizer, for the config, and twice for the model (its config,
    then its weights): four parses of ~5 s each for the default model, mostly its 49,152-word vocabulary read a
    field at a time; and it rebuilds gguf's tensor-name table (~20 ms) for each of the model's tensors. While
    converting, each file is parsed once and each table built once (both are read-only to transformers), and
    its strings are decoded whole (`_strings_at_once`) and its values read as plain views (`_plain_views`)."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    parse = getattr(hf_gguf, "_gguf_parse_value", None)  # (a transformers without it: nothing to speed up)
    if parse is not None:
        hf_gguf._gguf_parse_value = _strings_at_once(parse)
    open_reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    fast_reader = _plain_views(open_reader)
    readers: dict[tuple, object] = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = fast_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = open_reader, name_map
        if parse is not None:
            hf_gguf._gguf_parse_value = parse


def gguf_reader(path: str | os.PathLike):
    """gguf's reader of `path`, its values read as plain views (`_plain_views`: the default model's header in ~2 s
    rather than ~4)."""
    import gguf

    return _plain_views(gguf.GGUFReader)(str(path))


def _plain_views(open_reader):
    """gguf's reader, reading each value as a view of the file through a plain numpy array. gguf's own `_get`
    slices the file's np.memmap, whose every view runs memmap's Python `__array_finalize__`: the default model's
    ~100,000 vocabulary words and merges, four views each, took ~5 s of a ~7 s parse (~2 s so). The same values,
    the same fields and tensors (views of the same mapped file); a gguf whose `_get` differs: its own reader."""
    get = getattr(open_reader, "_get", None)
    if get is None or list(inspect.signature(get).parameters) != ["self", "offset", "dtype", "count", "override_order"]:
        return open_reader

    class PlainViews(open_reader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None or plain.base is not self.data:  # (the file mapped once: one plain view of it)
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return PlainViews


def _strings_at_once(parse):
    """transformers' parse of a GGUF value (`parse(value, types)`) where a string's bytes are read at once: it
    reads them one numpy element at a time (~1 s for the default model's ~100,000 vocabulary words and merges,
    each time it reads the file). Other values: `parse`'s."""

    def parsed(value, types):
        if types in (8, [8], [9, 8]) and isinstance(value, np.ndarray) and value.dtype == np.uint8:
            return value.tobytes().decode()
        return parse(value, types)

    return parsed


@contextlib.contextmanager
def _bar_follows_transformers():
    """transformers' GGUF reader draws a tqdm bar that ignores transformers' own progress switch (which --no-progress
    turns off): while it reads, its bar follows that switch."""
    from transformers import modeling_gguf_pytorch_utils as reader
    from transformers.utils import logging as hf_logging

    bar = getattr(reader, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def _plain_copy(quantized: torch.nn.Module) -> torch.nn.Module:
    """The same weights in an ordinary model: a GGUF-loaded model carries a quantizer and refuses save_pretrained."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # GGUF stores float metadata as float32, so 1e-5 comes back as 9.999999747e-06; keep the number people wrote.
    for key, value in config.to_diff_dict().items():
        if isinstance(value, float) and float(np.float32(value)) == value:
            setattr(config, key, float(str(np.float32(value))))
    # Built without initialising its weights (every one is loaded next; a 135M model's random init took 2.3 s, a
    # 7B one's minutes). Buffers no file holds (rotary frequencies) are left unset: the copy is only saved.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to_empty(device="cpu")
    model.tie_weights()  # (to_empty gives tied weights a tensor each)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(quantized.generation_config)
    return model


def _publish(tmp: Path, output: Path) -> None:
    """Move the finished `tmp` into place; a reader sees either no folder or a complete one."""
    old = moved_aside(output)
    if output.exists():  # an earlier, possibly incomplete folder: swap it out rather than merge into it
        os.replace(output, old)
    try:
        os.replace(tmp, output)
    except OSError:
        if not is_complete_folder(output):  # anything but "another process finished first" is a real error
            raise
    shutil.rmtree(old, ignore_errors=True)
