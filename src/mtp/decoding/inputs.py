"""What the Python API accepts as token ids: checked once at the door, so bad input is one clear MTPError.

`token_batch` turns input_ids (a tensor, or the lists a tokenizer returns) and an optional attention mask into a
(B, T) LongTensor pair on the model's device, or says what is wrong with them: wrong dtype, rank or device, ids
outside the vocabulary, a mask of another shape or with values other than 0 and 1. Without this, torch reports
such input much later as an IndexError from inside an embedding lookup.
"""

from __future__ import annotations

import torch

from mtp.errors import MTPError


def _as_tensor(value, name: str) -> torch.Tensor:
    """A tensor from a tensor, a list of ids, or a list of rows of ids (ragged rows: see `token_batch`)."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise MTPError(f"{name} must be a tensor or a list of token ids (or a list of such lists), got "
                       f"{type(value).__name__}: {e}") from None
    if tensor.numel() == 0:  # torch makes [] a float tensor: say what is wrong, not "float32"
        raise MTPError("empty prompt: give at least one token")
    return tensor


def _is_ragged(rows) -> bool:
    return (isinstance(rows, list | tuple) and len(rows) > 0
            and all(isinstance(r, list | tuple | torch.Tensor) for r in rows) and len({len(r) for r in rows}) > 1)


def _shape(t: torch.Tensor) -> str:
    return f"({', '.join(str(s) for s in t.shape)})"


def token_batch(model, input_ids, attention_mask=None, *, left_padded: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids (B, T) long, attention_mask (B, T) long or None), checked against `model`.

    input_ids: (B, T) or (T,) integer token ids, or a list of ids / a list of rows (rows of different lengths
        are left-padded, and get an attention mask, when no mask is given). `left_padded`: the mask may only
        have padding on the left of each row (what generation needs) and every row needs a token.
    """
    if _is_ragged(input_ids):
        if attention_mask is not None:
            raise MTPError("input_ids rows differ in length: pad them (left padding) or leave attention_mask out")
        for row in input_ids:
            _check_ids(_as_tensor(row, "input_ids"), model)
        input_ids, attention_mask = left_pad([list(map(int, r)) for r in input_ids],
                                             getattr(model.config, "pad_token_id", None) or 0)
    ids = _check_ids(_as_tensor(input_ids, "input_ids"), model)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise MTPError(f"input_ids must be (batch, length) token ids, got a tensor of shape {_shape(ids)}")
    if ids.numel() == 0:
        raise MTPError("empty prompt: give at least one token")
    if attention_mask is None:
        return ids, None
    mask = _check_device(_as_tensor(attention_mask, "attention_mask"), model, "attention_mask")
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise MTPError(f"attention_mask has shape {_shape(mask)}, input_ids {_shape(ids)}: they must match")
    if mask.dtype.is_complex or bool(((mask != 0) & (mask != 1)).any()):
        raise MTPError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.long()
    if left_padded:
        if bool((mask.sum(-1) == 0).any()):
            raise MTPError("empty prompt in the batch: every row needs at least one token")
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise MTPError("attention_mask has padding after a token: generation needs left padding "
                           "(tokenizer.padding_side = 'left')")
    return ids, mask


def _check_device(t: torch.Tensor, model, name: str) -> torch.Tensor:
    if t.device != model.device:
        raise MTPError(f"{name} is on {t.device}, the model on {model.device}: move it with .to(model.device)")
    return t


def _check_ids(ids: torch.Tensor, model) -> torch.Tensor:
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise MTPError(f"input_ids must be integer token ids, got {ids.dtype} (tokenizer(...).input_ids, or "
                       ".long() on a tensor of whole numbers)")
    _check_device(ids, model, "input_ids")
    vocab = model.config.vocab_size
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise MTPError(f"input_ids hold token id {low if low < 0 else high}, outside the model's vocabulary "
                           f"[0, {vocab})")
    return ids.long()


def shared_length(a, b) -> int:
    """How many tokens the sequences `a` and `b` start with alike."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def common_prefix(rows) -> list[int]:
    """The longest run of token ids every row starts with (what `generate(prefix=...)` computes once)."""
    rows = [list(map(int, r)) for r in rows]
    if not rows:
        return []
    first, n = rows[0], len(rows[0])
    for r in rows[1:]:
        n = shared_length(first[:n], r)
    return first[:n]


def left_pad(rows, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a left-padded batch of token lists, as `generate` takes them."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask
