"""mtp: multi-token prediction for Hugging Face causal language models.

    import mtp
    model = mtp.load()                                    # the embedded default model, 4 heads (or a folder, ...)
    out = mtp.generate(model, ids, strategy="speculative", max_new_tokens=64)  # lossless: greedy's tokens

`load` takes what every command's --model takes (an MTP or mask-token folder, a Hugging Face folder or hub id, a
.gguf, a Meta checkpoint); `generate` decodes a batch with any strategy (see `mtp.decoding.generate.generate`).
"""

from mtp.decoding.generate import GenerationResult, GenerationStats, generate
from mtp.decoding.tree import DraftTree, DynamicTree
from mtp.errors import CheckpointMismatchError, MTPError
from mtp.models.loading import load
from mtp.models.mask_tokens import MaskTokenModel
from mtp.models.parallel_heads import MTPModel

__all__ = ["load", "generate", "MTPModel", "MaskTokenModel", "DraftTree", "DynamicTree", "GenerationResult",
           "GenerationStats", "MTPError", "CheckpointMismatchError"]
__version__ = "0.2.0"
