"""Checks on what transformers builds a model from: a config's sizes against the weights on disk, and loading
that refuses weights which do not fill the model (`mtp.hub` for folders, `mtp.formats.gguf` for GGUF files)."""

from __future__ import annotations

import os
from pathlib import Path

from mtp.errors import MTPError

# The config's sizes that the model's tensors are built from (transformers maps GPT-2's n_embd etc. to these).
_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
          "num_key_value_heads", "head_dim")


def check_config_sizes(source: Path, config, stored: int, mtp: dict | None = None) -> None:
    """The sizes of `config` (a transformers config, from config.json or a GGUF's metadata, named `source` in
    errors) are positive and describe no more weights than `stored` bytes hold. transformers accepts any integer,
    and the model is built from the config before a weight is read: a negative size was a traceback there, an
    absurd one (another model's config, a typo: vocab_size 10**10, num_hidden_layers 10**6, an mtp section's
    num_heads 10**6) an allocation of terabytes or an hour spent building layers. The bound is loose (every
    model holds at least its embedding and, per layer, hidden_size x intermediate_size weights, and no format
    stores a weight in less than a bit), so only sizes that do not describe the weights fail."""
    sizes = {name: getattr(config, name, None) for name in _SIZES}
    sizes = {name: v for name, v in sizes.items() if isinstance(v, int) and not isinstance(v, bool)}
    for name, value in sizes.items():
        if value < 1:
            raise MTPError(f"{source}: {name} must be at least 1, got {value}")
    if not all(name in sizes for name in ("vocab_size", "hidden_size", "num_hidden_layers")) or not stored:
        return
    layers = sizes["num_hidden_layers"]
    if isinstance(mtp, dict) and all(isinstance(mtp.get(k), int) for k in ("num_heads", "num_trunk_layers")):
        layers += max(mtp["num_heads"] - 1, 0) * max(layers - mtp["num_trunk_layers"], 1)  # the extra heads' layers
    least = sizes["vocab_size"] * sizes["hidden_size"] + layers * sizes["hidden_size"] * sizes.get("intermediate_size", 1)
    if least > 8 * stored:
        named = ", ".join(f"{name} {sizes[name]:,}" for name in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                                 "intermediate_size") if name in sizes)
        heads = f", {mtp['num_heads']:,} heads" if layers != sizes["num_hidden_layers"] else ""
        raise MTPError(f"{source}: its sizes ({named}{heads}) need at least {least:,} weights, more than "
                       f"{stored:,} bytes of weights can hold: the sizes do not describe these weights")


def complete_from_pretrained(where: str, source: str | os.PathLike, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(where, **kwargs)`, refusing weights that do not fill the model the
    config describes. transformers initialises a weight the files lack (a config with more layers than the
    weights) at random and loads on, saying so only in a table among its warnings: the model's answers would be
    noise. A weight of another shape was a RuntimeError after that table. Both are one MTPError naming the
    weights (`source`); the table is not shown (weights the model has no place for are dropped, as transformers
    drops them)."""
    from transformers import AutoModelForCausalLM  # slow import, only when loading
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(where, ignore_mismatched_sizes=True,
                                                           output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    misshaped = sorted(f"{key} (weights {tuple(stored)}, config {tuple(wanted)})"
                       for key, stored, wanted in info.get("mismatched_keys") or ())
    parts = [f"{label}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
             for label, names in (("missing", missing), ("mis-shaped", misshaped)) if names]
    if parts:
        raise MTPError(f"{source}: the weights do not match the model its config describes ({'; '.join(parts)})")
    return model
