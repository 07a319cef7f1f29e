"""`mtp train --method heads`: parallel heads on a shared trunk (Gloeckle et al. 2024), trained by the shared
loop (`mtp.training.loop.Trainer`). Its options (`HeadsOptions`) and its piece of `mtp train` (`HeadsMethod`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from mtp.errors import MTPError
from mtp.models.folder_kind import folder_num_heads, reads_next_token
from mtp.runtime import parse_dtype

LossOrder = Literal["memory-efficient", "naive"]


@dataclass(frozen=True)
class HeadsOptions:
    """parallel heads (--method heads)

    Args:
        num_heads: heads including the next-token head (default 4; an MTP folder keeps its own)
        num_trunk_layers: shared layers (default: all but the last)
        freeze_trunk: train the extra heads only; the trunk and head 0 stay exactly as the base model
        trunk_cache: with --freeze-trunk, compute the frozen trunk's outputs once per row (or keep those computed
            while answering) and reuse them every epoch: "disk" (in the run folder, fp16, read per batch),
            "device" (all in GPU or CPU memory), "off" (run the trunk every step); auto: device on a GPU when
            they take at most a quarter of its free memory, else disk
        head_weights: "equal", "medusa" (0.2*0.8^(i-1) for head i>=1), or comma-separated weights per head
        loss_order: "memory-efficient" (one head's logits at a time) or "naive" (all heads at once)
        draft_vocab: the extra heads predict among the N most frequent tokens of the training rows (much faster
            training and drafting, lossless decoding); 0: the whole vocabulary
        next_token_input: the extra heads also read the next token, which decoding has verified when they draft
            (head 1's held-out top-1 0.56 -> 0.61 on 1,100 GSM8K rows); a folder that has it keeps it
    """

    num_heads: int | None = None
    num_trunk_layers: int | None = None
    freeze_trunk: bool = False
    trunk_cache: Literal["auto", "device", "disk", "off"] = "auto"
    head_weights: str = "equal"
    loss_order: LossOrder = "memory-efficient"
    draft_vocab: int = 8192
    next_token_input: bool = True


def _check_head_weights(a) -> None:
    """--head-weights as written, and their count where the heads are known before loading (--num-heads, or the
    --model folder's)."""
    from mtp.training.losses import head_weights

    spec = a.head_weights
    if isinstance(spec, str) and spec.strip().lower() in ("equal", "medusa"):
        return
    given = len([x for x in spec.split(",") if x.strip()]) if isinstance(spec, str) else len(spec)
    heads = a.num_heads if a.num_heads is not None else folder_num_heads(a.model) if a.model is not None else None
    try:
        head_weights(spec, given if heads is None else heads)
    except MTPError as e:
        raise MTPError(f"--head-weights: {e}") from None


class HeadsMethod:
    """--method heads for `mtp train` (`mtp.training.commands`): model, trainer. `a`: the run's flags by name."""

    options = HeadsOptions

    def check(self, a) -> None:
        """What this method's flags can get wrong together, refused before anything loads."""
        if a.freeze_trunk and a.num_heads == 1:
            raise MTPError("--freeze-trunk trains the extra heads only; use --num-heads 2 or more")
        if a.trunk_cache in ("device", "disk") and not a.freeze_trunk:
            raise MTPError(f"--trunk-cache {a.trunk_cache} keeps a frozen trunk's outputs; it needs --freeze-trunk")
        if not a.next_token_input and a.model is not None and reads_next_token(a.model):
            raise _cannot_drop_next_token(a.model)
        _check_head_weights(a)

    def masks(self, a) -> int:
        """Positions a training row takes past its --seq-len tokens: none (every head's labels lie in the row)."""
        return 0

    def frozen_weights(self, a) -> bool:
        """Whether some weights stay frozen (and may be kept in --dtype): the trunk, with --freeze-trunk."""
        return a.freeze_trunk

    def loop_settings(self, a, model) -> dict:
        """The settings of the training loop (`TrainConfig` fields) that this method's flags give."""
        from mtp.training.losses import head_weights

        return {"head_weights": head_weights(a.head_weights, model.num_heads), "loss_order": a.loss_order,
                "freeze_trunk": a.freeze_trunk, "trunk_cache": a.trunk_cache}

    def resolved(self, a) -> dict:
        """What the flags left to the model resolved to once it loaded (recorded in train_config.json)."""
        return {"num_heads": a.num_heads, "num_trunk_layers": a.num_trunk_layers}

    def load(self, a, checkpoint: Path | None, dev: torch.device):
        from mtp.models.parallel_heads import MTPModel

        dtype = parse_dtype(a.dtype)
        if checkpoint is not None:  # the trained heads come back in fp32, exactly as saved
            model = MTPModel.from_pretrained(checkpoint, device=dev, dtype=dtype, tensor_dtype=_extra_heads_fp32)
        else:
            model = load_model_for_training(a.model, a.num_heads, a.num_trunk_layers, dev, dtype)
        a.num_heads, a.num_trunk_layers = model.num_heads, model.num_trunk_layers
        if model.reads_next_token and not a.next_token_input:  # (a checkpoint of a run with other flags)
            raise _cannot_drop_next_token(checkpoint or a.model)
        if a.next_token_input and model.num_heads > 1:
            model.add_next_token_input()  # starts at zero: the loaded heads compute what they did
        return model.frozen_trunk_in(dtype) if dtype != torch.float32 else model

    def answering_model(self, model):
        return model

    def wants_trunk_features(self, a) -> bool:
        return a.freeze_trunk and a.trunk_cache != "off"

    def default_lr(self, a) -> float:
        return 1e-3 if a.freeze_trunk else 5e-5

    def trainer(self, model, train_data, held_data, config, a, out: Path, parallel=None, features=None):
        from mtp.training.draft_vocab import frequent_tokens
        from mtp.training.loop import Trainer

        model.set_draft_vocab(frequent_tokens(train_data, model.config.vocab_size, a.draft_vocab))
        return Trainer(model, train_data, config, output_dir=out, eval_data=held_data, parallel=parallel,
                       feature_store=features)

    def describe(self, model, a) -> str:
        vocab = f", draft vocabulary {model.draft_vocab.numel():,} tokens" if model.draft_vocab is not None else ""
        reads = ", reading the next token" if model.reads_next_token else ""
        return (f"{model.num_heads} heads on {model.num_trunk_layers} trunk layers{reads}, "
                f"{'heads only (frozen trunk)' if a.freeze_trunk else 'full fine-tuning'}{vocab}")


def load_model_for_training(spec: str | None, num_heads: int | None, num_trunk_layers: int | None,
                            device: torch.device, dtype: torch.dtype = torch.float32):
    """An MTPModel to train (mtp.models.loading), fp32 unless `dtype` (frozen-trunk training): an MTP folder as
    it is, a base model with new heads."""
    from mtp.models.loading import load_mtp_model

    return load_mtp_model(spec, num_heads=num_heads, num_trunk_layers=num_trunk_layers, device=str(device),
                          dtype=dtype)


def _cannot_drop_next_token(where) -> MTPError:
    return MTPError(f"{where} has heads that read the next token; --no-next-token-input cannot take that away "
                    "(train new heads from the base model instead)")


def _extra_heads_fp32(name: str) -> torch.dtype | None:
    from mtp.models.parallel_heads import OWN_PREFIXES

    return torch.float32 if name.startswith(OWN_PREFIXES) else None
