"""mtp: multi-token prediction for Hugging Face causal language models.

    import mtp
    model = mtp.load()                                    # the embedded default model, 4 heads (or a folder, ...)
    out = mtp.generate(model, ids, strategy="speculative", max_new_tokens=64)  # lossless: greedy's tokens

`load` takes what every command's --model takes (an MTP or mask-token folder, a Hugging Face folder or hub id, a
.gguf, a Meta checkpoint); `generate` decodes a batch with any strategy (see `mtp.decoding.generate.generate`).
"""

import importlib
from typing import TYPE_CHECKING

# name -> module. Imported on first use (PEP 562) so that `mtp --help` and the errors module load without torch.
_EXPORTS = {
    "load": "mtp.models.loading",
    "generate": "mtp.decoding.generate",
    "GenerationResult": "mtp.decoding.generate",
    "GenerationStats": "mtp.decoding.generate",
    "MTPModel": "mtp.models.parallel_heads",
    "MaskTokenModel": "mtp.models.mask_tokens",
    "DraftTree": "mtp.decoding.tree",
    "DynamicTree": "mtp.decoding.tree",
    "LookupCorpus": "mtp.decoding.corpus",
    "GrowingCorpus": "mtp.decoding.corpus",
    "MTPError": "mtp.errors",
    "CheckpointMismatchError": "mtp.errors",
}
__all__ = ["load", "generate", "MTPModel", "MaskTokenModel", "DraftTree", "DynamicTree", "LookupCorpus",
           "GrowingCorpus", "GenerationResult", "GenerationStats", "MTPError", "CheckpointMismatchError"]
__version__ = "0.2.0"

if TYPE_CHECKING:
    from mtp.decoding.corpus import GrowingCorpus, LookupCorpus
    from mtp.decoding.generate import GenerationResult, GenerationStats, generate
    from mtp.decoding.tree import DraftTree, DynamicTree
    from mtp.errors import CheckpointMismatchError, MTPError
    from mtp.models.loading import load
    from mtp.models.mask_tokens import MaskTokenModel
    from mtp.models.parallel_heads import MTPModel


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mtp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
