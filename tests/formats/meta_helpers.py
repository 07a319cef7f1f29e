"""Synthetic Meta-format checkpoints: model-parallel shards of a state dict, and a Llama-shaped checkpoint of any
size with random weights (for memory measurements: `python tests/formats/meta_helpers.py /tmp/meta-1b`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

# How Meta's llama splits each weight across model-parallel ranks (fairscale): column-parallel layers split
# their output rows, row-parallel layers and the embedding their input columns; norms are copied to every rank.
ROWS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
        "feed_forward.w3.weight", "output.weight")
COLUMNS = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")


def shard_state(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, tensor in state.items():
        if key.endswith(ROWS):
            pieces = tensor.chunk(n, dim=0)
        elif key.endswith(COLUMNS):
            pieces = tensor.chunk(n, dim=1)
        else:
            pieces = [tensor] * n
        assert len(pieces) == n, key
        for shard, piece in zip(shards, pieces, strict=True):
            shard[key] = piece.clone()
    return shards


def write_sharded_meta(folder: Path, params: dict, state: dict[str, torch.Tensor], n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(shard_state(state, n)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return folder


def synthetic_params(dim: int = 2048, n_layers: int = 19, n_heads: int = 32, n_kv_heads: int = 8,
                     vocab_size: int = 32000, n_future_tokens: int = 4) -> dict:
    """Llama-shaped params.json; the defaults give ~1.0B parameters (n_layers counts the extra heads)."""
    return {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
            "vocab_size": vocab_size, "multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
            "rope_theta": 10000.0, "n_future_tokens": n_future_tokens}


def write_synthetic_meta(folder: Path, params: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A random Meta checkpoint (params.json + consolidated.00.pth) with `params`' shapes."""
    from mtp.formats.meta import _Shape

    shape = _Shape(params, {})
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, dims in shape.expected().items():
        if len(dims) == 1:
            state[key] = torch.ones(dims, dtype=dtype)
        else:
            state[key] = (torch.randn(dims, generator=g) * 0.02).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    torch.save(state, folder / "consolidated.00.pth")
    return folder


if __name__ == "__main__":
    out = write_synthetic_meta(Path(sys.argv[1]), synthetic_params())
    n = sum(t.numel() for t in torch.load(out / "consolidated.00.pth", mmap=True, weights_only=True).values())
    print(f"wrote {out}: {n:,} parameters")
