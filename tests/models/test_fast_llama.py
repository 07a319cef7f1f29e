"""The lean Llama decoding step against the Hugging Face layers it mirrors, and fp16-packed weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from conftest import tiny_mtp
from mtp import MTPModel
from mtp.decoding.generate import generate, left_pad
from mtp.decoding.tree import DynamicTree
from mtp.models import backbones, fast_llama
from mtp.models.packed import HalfEmbedding
from mtp.models.quantize import PackedLinear, fp16_decoding, quantize_for_decoding

needs_fbgemm = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                  reason="fp16 packing needs fbgemm (x86)")


def qwen_mtp(kind: str, seed: int = 0) -> MTPModel:
    """Qwen2 (biased QKV) and Qwen3 (per-head q/k norms): the variants the lean step handles beyond Llama."""
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=61, max_position_embeddings=256, tie_word_embeddings=True)
    config = Qwen2Config(**common) if kind == "qwen2" else Qwen3Config(head_dim=8, **common)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases and norms, so a step that ignored them would be caught
        for name, p in base.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return MTPModel(base, num_heads=3).eval()


def cached_logits(model: MTPModel, ids: torch.Tensor, mask: torch.Tensor, steps: list[torch.Tensor]) -> list:
    """All-head logits of a prefill and then of each block in `steps`, through the cache."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + sum(s.shape[1] for s in steps) + 1)
    with torch.inference_mode():
        out = [model(ids, mask, return_all_heads=True, cache=cache)]
        out += [model(s, None, return_all_heads=True, cache=cache) for s in steps]
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("attention", ["default", "matmul", "grouped"])
@pytest.mark.parametrize("make", [lambda: tiny_mtp("llama", seed=3), lambda: qwen_mtp("qwen2"),
                                  lambda: qwen_mtp("qwen3"), lambda: tiny_mtp("llama", seed=4, num_trunk_layers=1)],
                         ids=["llama", "qwen2", "qwen3", "two-layer-heads"])
def test_fast_step_matches_hugging_face_layers(make, attention, fused, monkeypatch):
    """Every head's logits through the lean step, fused or not, as through the Hugging Face layers; with heads of
    two layers, a head's second layer writes into its first's output (`reuse_input`), never into the trunk's,
    which the other heads read."""
    if attention != "default":  # matmul: large batches of 1-token steps on a CPU; grouped: every block on a GPU
        monkeypatch.setattr(fast_llama, "_attention_path", lambda batch, block, device_type="cpu": attention)
    if fused:  # q, k, v and gate, up as one matmul each, as on a GPU
        monkeypatch.setattr(fast_llama, "FUSED_DEVICES", {"cpu"})
    model = make()
    assert model.fast_decoding == "fp32"  # on by default for the Llama family
    gen = torch.Generator().manual_seed(0)
    ids, mask = left_pad([torch.randint(0, 61, (n,), generator=gen).tolist() for n in (7, 3)])
    steps = [torch.randint(0, 61, (2, t), generator=gen) for t in (1, 3, 1)]
    fast = cached_logits(model, ids, mask, steps)
    model.set_fast_decoding(None)
    slow = cached_logits(model, ids, mask, steps)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


class Ops(TorchDispatchMode):
    """The aten ops that do work while active (no views, no allocations): a CPU count of a GPU's kernels."""

    free = {"empty", "new_empty", "empty_strided", "new_empty_strided", "detach", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view:  # reshape may copy: then it is a kernel too
            if out.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr():
                self.names.append(f"{name} (a copy)")
        elif name not in self.free:
            self.names.append(name)
        return out


def _ops_of_a_fused_step(model: MTPModel, block: int, reuse_input: bool = True) -> list[str]:
    """The aten ops that do work (no views, no allocations) in one cached forward of `block` tokens of the first
    fused layer step called with `reuse_input` (trunk layers: True; a head's first layer: False), with the static
    cache's attention mask: a CPU count of the kernels a GPU replays."""
    calls = []
    original = fast_llama.layer_step
    cache = model.new_cache(1, 16, static=True)
    ids = torch.randint(0, 61, (1, 4))
    with torch.inference_mode():
        model(ids, torch.ones_like(ids), return_all_heads=False, cache=cache)

        def counted(*args, **kwargs):
            ops = Ops()
            with ops:
                out = original(*args, **kwargs)
            calls.append((kwargs.get("reuse_input", False), ops.names))
            return out

        fast_llama.layer_step = counted
        try:
            model(ids[:, :block], None, return_all_heads=False, cache=cache)
        finally:
            fast_llama.layer_step = original
    found = [names for reused, names in calls if reused == reuse_input]
    assert found, f"no fused layer ran with reuse_input={reuse_input}"
    return found[0]


@pytest.mark.parametrize("path", fast_llama.ATTENTION_PATHS)
@pytest.mark.parametrize("block", [1, 4])
def test_a_fused_layer_step_is_few_kernels(block, path, monkeypatch):
    """A GPU step costs per kernel, not per byte (docs/benchmarks.md): a fused layer writes its keys and values
    in one op, rotates q and k in two (their swapped halves come out of the projection), scales inside the
    scores' matmul and adds the second residual inside the down projection - 16 ops a layer with the two-matmul
    attention, where the same arithmetic one op at a time is 21; a trunk layer, whose input nothing else reads,
    adds the first residual inside the output projection too (15); CUDA's grouped attention is one sdpa kernel
    instead of four (12: on a CPU, whose sdpa writes (B, kv heads, rows, D), the output projection's group-major
    read costs a copy counted here, which CUDA's layout makes a view,
    `test_grouped_attention_is_read_where_cudas_kernel_writes_it`). Blocks of several tokens add the copies that
    regroup query heads (and the mask)."""
    monkeypatch.setattr(fast_llama, "FUSED_DEVICES", {"cpu"})
    monkeypatch.setattr(fast_llama, "_attention_path", lambda batch, block, device_type="cpu": path)  # as on a GPU
    model = tiny_mtp("llama", seed=3)
    for reuse_input in (False, True):
        ops = _ops_of_a_fused_step(model, block, reuse_input)
        if path == "matmul":
            assert ops.count("bmm") + ops.count("baddbmm") == 2 and "scaled_dot_product_attention" not in ops, ops
            most = 16 if block == 1 else 18
        else:
            assert ops.count("scaled_dot_product_attention") == 1 and "bmm" not in ops, ops
            most = 14 if block == 1 else 16  # one less on CUDA (no regrouping copy of the output)
        assert ops.count("scatter_") == 1 and "cat" not in ops and "mul" in ops, ops
        assert ops.count("addmm_") == (2 if reuse_input else 1), ops
        assert len(ops) <= most - reuse_input, ops


@pytest.mark.parametrize("layout", ["cpu", "cuda"])
@pytest.mark.parametrize("path", fast_llama.ATTENTION_PATHS)
@pytest.mark.parametrize("make", [lambda: tiny_mtp("llama", seed=5, num_heads=4), lambda: qwen_mtp("qwen2"),
                                  lambda: tiny_mtp("llama", seed=6, num_heads=4, num_trunk_layers=1),
                                  lambda: MTPModel(qwen_mtp("qwen2").base, num_heads=3, num_trunk_layers=1).eval()],
                         ids=["llama", "qwen2", "llama-two-layer-heads", "qwen2-two-layer-heads"])
def test_extra_heads_run_as_one_stack_on_the_fused_path(make, path, layout, monkeypatch):
    """On a GPU's fused path the extra heads (all reading the trunk's output) run together, layer i of every head
    as one wide layer (`FastHeadStack`): every head's logits as through the Hugging Face layers (random norm
    weights, which the stack folds into its projections; Qwen2's biases; heads of two layers, whose second layers
    read inputs of their own), also with the grouped attention laid out as CUDA's kernels write it, in a third of
    the kernels of the layers one by one (each ~13, and a final norm)."""
    monkeypatch.setattr(fast_llama, "FUSED_DEVICES", {"cpu"})
    monkeypatch.setattr(fast_llama, "_attention_path", lambda batch, block, device_type="cpu": path)
    if layout == "cuda":  # sdpa's values as CUDA's kernels lay them out: (B, rows, kv heads, D) in memory
        real = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(fast_llama.F, "scaled_dot_product_attention",
                            lambda *a, **k: real(*a, **k).transpose(1, 2).contiguous().transpose(1, 2))
    model = make()
    with torch.no_grad():  # norms the stack must fold in
        for j in range(1, model.num_heads):
            for layer in model.head_layers(j):
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight.add_(torch.randn_like(norm.weight) * 0.3)
    calls = []
    original = fast_llama.head_stack_step

    def counted(*args, **kwargs):
        with Ops() as ops:
            out = original(*args, **kwargs)
        calls.append(ops.names)
        return out

    monkeypatch.setattr(fast_llama, "head_stack_step", counted)
    gen = torch.Generator().manual_seed(0)
    ids, mask = left_pad([torch.randint(0, 61, (n,), generator=gen).tolist() for n in (7, 3)])
    steps = [torch.randint(0, 61, (2, t), generator=gen) for t in (1, 3, 1)]
    fast = cached_logits(model, ids, mask, steps)
    levels = len(model.head_layers(1))
    assert len(calls) == levels * (1 + len(steps))  # every layer of every forward, the prompt's too
    # a level in at most 16 ops (the two-matmul attention: 19), the final norm included (Qwen2's q/k/v biases: one
    # more in a later layer's batched matmul); 3 tokens: the regrouping copies
    most = (16 if path == "grouped" else 19) + (model.head_layers(1)[0].self_attn.q_proj.bias is not None)
    assert all(len(ops) <= most for ops in calls[levels:2 * levels]), calls
    assert all(len(ops) <= most + 2 for ops in calls[2 * levels:3 * levels]), calls
    model.set_fast_decoding(None)
    slow = cached_logits(model, ids, mask, steps)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [lambda: tiny_mtp("llama", seed=3), lambda: qwen_mtp("qwen2")], ids=["llama", "qwen2"])
def test_large_layers_rotate_without_swapped_weight_rows(make, monkeypatch):
    """Past SWAPPED_ROWS_BYTES a fused layer does not keep q's and k's rows a second time (streaming them would
    cost more than the kernel they save): it swaps the halves with a `cat`, to the same logits."""
    monkeypatch.setattr(fast_llama, "FUSED_DEVICES", {"cpu"})
    model = make()
    gen = torch.Generator().manual_seed(2)
    ids, mask = left_pad([torch.randint(0, 61, (n,), generator=gen).tolist() for n in (6, 2)])
    steps = [torch.randint(0, 61, (2, t), generator=gen) for t in (1, 3)]
    small = cached_logits(model, ids, mask, steps)
    monkeypatch.setattr(fast_llama, "SWAPPED_ROWS_BYTES", 0)
    large = cached_logits(model, ids, mask, steps)
    for a, b in zip(large, small, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    monkeypatch.setattr(fast_llama, "_attention_path", lambda batch, block, device_type="cpu": "matmul")
    ops = _ops_of_a_fused_step(model, 1, reuse_input=False)
    assert ops.count("cat") == 1 and len(ops) == 17, ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_tables_read_from_a_table_equal_those_computed_per_forward(dtype, monkeypatch):
    """A cached decoding forward reads cos and signed sin from a table of every position (one kernel instead of
    ten): bit for bit what the rotary module computes for those positions; a larger cache gets a table of its own
    and the first stays (a captured graph reads it)."""
    model = tiny_mtp("llama", seed=2).to(dtype)
    backbone = model.backbone
    positions = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(0))
    hidden = torch.zeros(3, 5, model.config.hidden_size, dtype=dtype)
    with torch.no_grad():
        computed = backbone._fast_rope(hidden, positions, None)
        read = backbone._fast_rope(hidden, positions, 300)
        first = dict(backbone._rope_tables)
        assert len(first) == 1 and next(iter(first.values())).shape[0] >= 300
        backbone._fast_rope(hidden, positions, 3000)
    for a, b in zip(read, computed, strict=True):
        assert a.shape == b.shape == (3, 1, 5, model.config.hidden_size // model.config.num_attention_heads)
        assert torch.equal(a, b)
    assert len(backbone._rope_tables) == 2 and all(backbone._rope_tables[k] is v for k, v in first.items())
    monkeypatch.setattr(backbones, "STATIC_ROPE_TYPES", ())  # as for frequencies that follow the length
    backbone._rope_tables.clear()
    with torch.no_grad():
        again = backbone._fast_rope(hidden, positions, 300)
    assert not backbone._rope_tables and all(torch.equal(a, b) for a, b in zip(again, computed, strict=True))


def test_fast_step_is_not_used_for_training(monkeypatch):
    model = tiny_mtp("llama")
    calls = []
    fast = next(iter(model.backbone.fast_layers.values()))
    monkeypatch.setattr(type(fast), "__call__", lambda *a, **k: calls.append(1))
    ids = torch.randint(0, 61, (2, 5))
    model(ids, return_all_heads=True).sum().backward()  # uncached, with grad: the Hugging Face layers
    assert calls == [] and model.extra_heads[0][0].mlp.down_proj.weight.grad is not None


@needs_fbgemm
@pytest.mark.parametrize("shape", [(40, 300), (576, 960), (96, 33)])
def test_packed_fp16_rows_are_computed_independently(shape):
    """Every row of a block of 1..40 rows equals that row computed alone (on AVX2, fbgemm's 1- and 2-row kernel
    blocks accumulate in another order: PackedLinear pads the row count, `row_invariant_count`)."""
    linear = torch.nn.Linear(*shape)
    packed = PackedLinear(linear)
    x = torch.randn(40, shape[0])
    rows = torch.cat([packed(x[i: i + 1]) for i in range(40)])
    for m in range(1, 41):
        block = packed(x[:m])
        assert torch.equal(block, rows[:m]), m  # why speculative stays exactly equal to greedy under fp16
    torch.testing.assert_close(packed(x), linear(x), atol=1e-2, rtol=1e-2)
    assert packed(x[:2, None]).shape == (2, 1, shape[1])


@needs_fbgemm
@pytest.mark.parametrize("seed", range(6))
def test_fp16_speculative_equals_fp16_greedy(seed):
    model = quantize_for_decoding(tiny_mtp("llama", num_heads=1 + seed % 4, seed=seed, vocab_size=97), "fp16")
    assert model.fast_decoding == "fp16" and isinstance(model.base.lm_head, PackedLinear)
    gen = torch.Generator().manual_seed(seed)
    ids, mask = left_pad([torch.randint(0, 97, (n,), generator=gen).tolist() for n in (9, 4, 6)])
    greedy = generate(model, ids, mask, max_new_tokens=24, stop_token_ids=[])
    spec = generate(model, ids, mask, max_new_tokens=24, strategy="speculative", stop_token_ids=[])
    assert spec.tokens == greedy.tokens


@needs_fbgemm
def test_fp16_logits_close_to_fp32():
    model = tiny_mtp("llama", seed=5)
    packed = quantize_for_decoding(copy.deepcopy(model), "fp16")
    ids, mask = left_pad([[1, 2, 3, 4, 5], [6, 7]])
    for a, b in zip(cached_logits(packed, ids, mask, [ids[:, :2]]), cached_logits(model, ids, mask, [ids[:, :2]]),
                    strict=True):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3)


@needs_fbgemm
def test_fp16_on_gpt2_packs_its_linear_layers():
    model = quantize_for_decoding(tiny_mtp("gpt2"), "fp16")
    assert isinstance(model.base.lm_head, PackedLinear)
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5, stop_token_ids=[])
    assert len(out.tokens[0]) == 5


@needs_fbgemm
def test_fp16_decoding_context_restores_fp32():
    model = tiny_mtp("llama")
    head = model.base.lm_head
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids, return_all_heads=True)
    with fp16_decoding(model):
        assert model.fast_decoding == "fp16" and isinstance(model.base.lm_head, PackedLinear)
        out = generate(model, ids, max_new_tokens=6, stop_token_ids=[])
    assert len(out.tokens[0]) == 6
    assert model.fast_decoding == "fp32" and model.base.lm_head is head
    assert head.weight is model.base.get_input_embeddings().weight  # still tied
    with torch.no_grad():
        assert torch.equal(model(ids, return_all_heads=True), before)
    gpt2 = tiny_mtp("gpt2")
    with fp16_decoding(gpt2):  # no lean step for GPT-2: decodes as it is
        assert gpt2.fast_decoding is None


@needs_fbgemm
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fp16_draft_vocabulary_head_is_packed_and_exact(family):
    """With a draft vocabulary, fp16 packing also packs those K rows of the unembedding for drafting; the
    drafts stay inside the vocabulary and speculative output still equals greedy output."""
    from mtp.decoding.drafters import drafter_for
    from mtp.decoding.step import DecodeOptions

    model = tiny_mtp(family, num_heads=4, seed=2, vocab_size=97)
    allowed = list(range(0, 97, 3))
    model.set_draft_vocab(allowed)
    hidden = torch.randn(5, 3, model.config.hidden_size)
    with torch.no_grad():
        fp32_logits = model.draft_logits(hidden)
        logits, vocab = drafter_for(model, DecodeOptions("speculative")).draft_logits(hidden, "greedy")
        drafts = vocab[logits.argmax(-1)]  # (5, 3) over the K draft tokens
        assert drafts.tolist() == model.restrict_to_draft_vocab(model.lm_head(hidden)).argmax(-1).tolist()
        packed = quantize_for_decoding(model, "fp16")
        assert isinstance(packed.packed_draft_head, PackedLinear)
        torch.testing.assert_close(packed.draft_logits(hidden), fp32_logits, atol=5e-3, rtol=5e-3)
    ids, mask = left_pad([[5, 9, 2, 7, 1], [3, 1]])
    greedy = generate(packed, ids, mask, max_new_tokens=20, stop_token_ids=[])
    spec = generate(packed, ids, mask, max_new_tokens=20, strategy="speculative", stop_token_ids=[])
    assert spec.tokens == greedy.tokens
    static = generate(packed, ids, mask, max_new_tokens=8, strategy="static", k=4, stop_token_ids=[])
    assert all(t in allowed for row in static.tokens for i, t in enumerate(row) if i % 4)


@pytest.mark.parametrize("path", fast_llama.ATTENTION_PATHS)
@pytest.mark.parametrize("batch,block,masked", [(16, 1, True), (48, 1, False), (20, 4, True), (3, 8, True),
                                                (1, 1, True), (1, 11, True)])
def test_attention_paths_equal_sdpa(batch, block, masked, path, monkeypatch):
    """The attention paths of the lean step (two matmuls; the query heads regrouped as rows of sdpa's heads, as
    CUDA runs it) agree with sdpa's grouped key/value heads, padding masks and causal blocks included."""
    gen = torch.Generator().manual_seed(batch + block)
    end = 40
    q = torch.randn(batch, 6, block, 8, generator=gen)  # 6 query heads over 2 key/value heads
    keys, values = torch.randn(2, batch, 2, end, 8, generator=gen)
    mask = None
    if masked:  # left padding of random length per row, and causal within the block
        allowed = torch.arange(end)[None, None, :] <= (end - block + torch.arange(block))[None, :, None]
        allowed = allowed & (torch.arange(end)[None, None, :] >= torch.randint(0, 20, (batch, 1, 1), generator=gen))
        mask = torch.zeros(batch, 1, block, end).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.3,
                                                                enable_gqa=True)
    monkeypatch.setattr(fast_llama, "_attention_path", lambda batch, block, device_type="cpu": path)
    got = fast_llama._attention(q, keys, values, mask, 0.3)  # (B, T, heads, D)
    torch.testing.assert_close(got, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)
    if path == "grouped":  # as CUDA's kernel writes it, (B, rows, kv heads, D) in memory: the same values
        real = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(fast_llama.F, "scaled_dot_product_attention",
                            lambda *a, **k: real(*a, **k).transpose(1, 2).contiguous().transpose(1, 2))
        torch.testing.assert_close(fast_llama._attention(q, keys, values, mask, 0.3), got, atol=0, rtol=0)


@pytest.mark.parametrize("block", [1, 3])
def test_grouped_attention_is_read_where_cudas_kernel_writes_it(block, monkeypatch):
    """CUDA's sdpa kernels write their output as (B, rows, kv heads, D) (a transposed view of (B, kv, rows, D)). The
    grouped path's rows are (token, query head of the group), so each token's heads come out group-major:
    `group_major` hands them on as they lie (flattening is a view, no copy), in the order the output projection's
    group-major weight copy (`OUT_GROUP_MAJOR`) reads; without it they are regrouped to the model's head order."""
    real = torch.nn.functional.scaled_dot_product_attention
    written = []

    def cuda_layout(*args, **kwargs):  # the values of sdpa, laid out as CUDA's kernels lay them
        out = real(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)
        written.append(out)
        return out

    monkeypatch.setattr(fast_llama.F, "scaled_dot_product_attention", cuda_layout)
    monkeypatch.setattr(fast_llama, "_attention_path", lambda batch, block, device_type="cpu": "grouped")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, block, 8, generator=gen)  # 6 query heads over 2 key/value heads: groups of 3
    keys, values = torch.randn(2, 2, 2, 24, 8, generator=gen)
    allowed = (torch.arange(24) >= 5) & (torch.arange(24)[None, :] <= 20 + torch.arange(block)[:, None])  # (T, 24)
    mask = torch.zeros(2, 1, block, 24).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected = real(q, keys, values, attn_mask=mask, scale=0.3, enable_gqa=True).transpose(1, 2)  # (B, T, 6, D)
    head_major = fast_llama._attention(q, keys, values, mask, 0.3)
    group_major = fast_llama._attention(q, keys, values, mask, 0.3, group_major=True).reshape(2 * block, -1)
    assert group_major.untyped_storage().data_ptr() == written[-1].untyped_storage().data_ptr()  # no copy
    torch.testing.assert_close(head_major, expected)
    regrouped = expected.reshape(2, block, 2, 3, 8).transpose(2, 3).reshape(2 * block, -1)  # (kv, group) -> (group, kv)
    torch.testing.assert_close(group_major, regrouped)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("path", fast_llama.ATTENTION_PATHS)
@pytest.mark.parametrize("seed", range(4))
def test_speculative_equals_greedy_with_each_attention_path(seed, path, fused, monkeypatch):
    """Batched decoding on a CPU takes the matmul attention path for 1-token steps, CUDA the grouped one for every
    block (forced here, for every block or for some), and CUDA's fused layers run the extra heads as one stack
    (`FastHeadStack`, forced with `fused`): still token-for-token greedy, chains, trees and lookup drafts alike."""
    def chosen(batch, block, device_type="cpu"):
        return path if batch >= 2 or seed % 2 == 0 else "sdpa"

    monkeypatch.setattr(fast_llama, "_attention_path", chosen)
    if fused:
        monkeypatch.setattr(fast_llama, "FUSED_DEVICES", {"cpu"})
    model = tiny_mtp("llama", num_heads=2 + seed % 3, seed=seed, vocab_size=97,
                     num_trunk_layers=1 if seed % 2 else None)  # odd seeds: heads of two layers
    gen = torch.Generator().manual_seed(seed)
    ids, mask = left_pad([torch.randint(0, 97, (n,), generator=gen).tolist() for n in (9, 4, 6, 1, 5)])
    greedy = generate(model, ids, mask, max_new_tokens=20, stop_token_ids=[])
    spec = generate(model, ids, mask, max_new_tokens=20, strategy="speculative", stop_token_ids=[])
    assert spec.tokens == greedy.tokens
    if fused:
        tree = DynamicTree(5, model.num_heads - 1)
        assert generate(model, ids, mask, max_new_tokens=20, strategy="speculative", tree=tree, lookup=3,
                        stop_token_ids=[]).tokens == greedy.tokens
    model.set_fast_decoding(None)  # Hugging Face layers throughout
    assert generate(model, ids, mask, max_new_tokens=20, stop_token_ids=[]).tokens == greedy.tokens


@needs_fbgemm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp16_decode_only_drops_the_fp32_weights_and_decodes_the_same(dtype):
    """`decode_only` keeps only the packed copies of the layers' weights: fewer bytes in parameters, the same
    tokens as fp16 packing that keeps fp32 weights, speculative still equal to greedy, uncached forwards still
    work (through the packed matmuls), and the embedding table is kept once, in fp16 (the unembedding is its
    packed copy). Weights are rounded to fp16 first, so the fp16 table holds exactly the fp32 one's values."""
    model = tiny_mtp("llama", num_heads=3, seed=4, vocab_size=97)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model = model.to(dtype)
    keep = quantize_for_decoding(copy.deepcopy(model), "fp16")
    lean = quantize_for_decoding(copy.deepcopy(model), "fp16", decode_only=True)

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in {id(p): p for p in m.parameters()}.values())

    assert not any(type(mod) is torch.nn.Linear for mod in lean.modules())
    assert nbytes(lean) < nbytes(keep) / 3
    assert lean.dtype == torch.float32 and lean.decode_only and not keep.decode_only
    assert [p for p in lean.parameters() if p.dim() == 2] == []  # no fp32 matrix left
    emb = lean.base.get_input_embeddings()
    assert isinstance(emb, HalfEmbedding) and emb.weight.dtype == torch.float16
    assert lean.activation_dtype == torch.float32 and lean.dtype == torch.float32
    ids, mask = left_pad([[5, 9, 2, 7, 1, 3], [3, 1, 4]])
    greedy = generate(lean, ids, mask, max_new_tokens=20, stop_token_ids=[])
    assert greedy.tokens == generate(keep, ids, mask, max_new_tokens=20, stop_token_ids=[]).tokens
    spec = generate(lean, ids, mask, max_new_tokens=20, strategy="speculative", stop_token_ids=[])
    assert spec.tokens == greedy.tokens
    with torch.no_grad():
        # uncached: fp16-packed weights here, the fp32 Hugging Face layers there
        torch.testing.assert_close(lean(ids, mask, return_all_heads=True), keep(ids, mask, return_all_heads=True),
                                   atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("seed", range(4))
def test_bf16_speculative_equals_bf16_greedy(tmp_path, seed):
    """bf16 weights end to end: saved, loaded in bf16 (meta device, read into place), decoded; speculative output
    equals greedy output of the same bf16 model (here exactly: these prompts meet no near-tie; in general bf16
    holds only up to near-ties, tests/decoding/test_bf16_decoding.py)."""
    from mtp import MTPModel

    folder = tiny_mtp("llama", num_heads=1 + seed % 4, seed=seed, vocab_size=97).save_pretrained(tmp_path / "m")
    model = MTPModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(seed))
    greedy = generate(model, ids, max_new_tokens=24, stop_token_ids=[])
    spec = generate(model, ids, max_new_tokens=24, strategy="speculative", stop_token_ids=[])
    assert spec.tokens == greedy.tokens


def test_fused_projections_follow_weight_updates(monkeypatch):
    """The fused copy of a layer's weights is rebuilt when a weight changes (a training step in between)."""
    monkeypatch.setattr(fast_llama, "FUSED_DEVICES", {"cpu"})
    model = tiny_mtp("llama", seed=4)
    ids, mask = torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.long)
    steps = [torch.tensor([[5]])]
    before = cached_logits(model, ids, mask, steps)
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.self_attn.k_proj.weight.mul_(-3.0)
            layer.mlp.up_proj.weight.mul_(2.0)
    after = cached_logits(model, ids, mask, steps)
    monkeypatch.setattr(fast_llama, "FUSED_DEVICES", set())
    separate = cached_logits(model, ids, mask, steps)
    for a, b, old in zip(after, separate, before, strict=True):
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, old)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", [1, 11, 64])
def test_cuda_grouped_attention_runs_a_fused_kernel(block, dtype):
    """CUDA's attention path (query heads regrouped as rows) must find one of sdpa's fused kernels for SmolLM2's
    shapes (9 query heads over 3 key/value heads, a cache of 16-aligned length with a padding mask): with the
    math fallback excluded it raises if none takes them. Its output is sdpa's grouped-heads attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    assert fast_llama._attention_path(1, block, "cuda") == "grouped"
    gen = torch.Generator(device="cuda").manual_seed(block)
    end = 384
    q = torch.randn(1, 9, block, 64, generator=gen, device="cuda", dtype=dtype)
    keys, values = torch.randn(2, 1, 3, end, 64, generator=gen, device="cuda", dtype=dtype)
    allowed = torch.arange(end, device="cuda")[None, :] <= (200 + torch.arange(block, device="cuda"))[:, None]
    allowed &= torch.arange(end, device="cuda")[None, :] >= 7  # left padding
    mask = torch.zeros(1, 1, block, end, device="cuda", dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        got = fast_llama._attention(q, keys, values, mask, 0.125)  # (B, T, heads, D)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), keys.float(), values.float(),
                                                                attn_mask=mask.float(), scale=0.125,
                                                                enable_gqa=True).transpose(1, 2)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@pytest.mark.cuda
def test_cuda_extra_heads_run_as_one_stack(monkeypatch):
    """On CUDA the extra heads run as one wide layer (`FastHeadStack`) with the grouped attention in CUDA's own
    layout: every head's logits as through the Hugging Face layers (fp32), and the stack did run."""
    model = tiny_mtp("llama", seed=5, num_heads=4).to("cuda")
    calls = []
    original = fast_llama.head_stack_step
    monkeypatch.setattr(fast_llama, "head_stack_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    gen = torch.Generator().manual_seed(0)
    ids, mask = left_pad([torch.randint(0, 61, (n,), generator=gen).tolist() for n in (7, 3)])
    steps = [torch.randint(0, 61, (2, t), generator=gen).cuda() for t in (1, 3, 1)]
    fast = cached_logits(model, ids.cuda(), mask.cuda(), steps)
    assert len(calls) == 1 + len(steps)
    model.set_fast_decoding(None)
    slow = cached_logits(model, ids.cuda(), mask.cuda(), steps)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_fbgemm
def test_int8_scales_each_output_channel_of_a_weight():
    """`--quantize int8` gives every output channel of a weight its own scale: one large weight (trained LLMs have
    them) costs its own row precision, not every row's - with one scale per matrix, SmolLM2-135M answered "What is
    7 + 5?" with "SyntaxError: Missing comma". No deprecation notice of torch's int8 modules reaches the user."""
    import warnings

    from torch import nn

    model = tiny_mtp("llama", seed=1, vocab_size=97)
    original = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod) is nn.Linear:
                mod.weight[0, 0] = 30 * mod.weight.abs().max()
                original[name] = mod.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_for_decoding(model, "int8")
    checked = 0
    for name, mod in model.named_modules():
        if name in original and hasattr(mod, "weight") and callable(mod.weight):  # a dynamic int8 Linear
            got, want = mod.weight().dequantize(), original[name]
            row_step = want.abs().amax(1) / 127  # (out,): one int8 step of each row's own scale
            assert ((got - want).abs().amax(1) <= row_step * 0.51 + 1e-7).all(), name
            checked += 1
    assert checked == len(original)


def test_a_forwards_mask_is_spread_over_the_group_once():
    """The grouped path's mask for a block of several tokens (row (t, g) reads mask row t) is built once per forward
    and group size, and kept on the mask every layer is handed: one copy a forward, not one a layer."""
    mask = torch.randn(2, 1, 3, 16)
    rows = fast_llama._rows_mask(mask, 4)
    assert fast_llama._rows_mask(mask, 4) is rows and fast_llama._rows_mask(mask, 2) is not rows
    assert rows.shape == (2, 1, 12, 16)
    assert torch.equal(rows.view(2, 1, 3, 4, 16), mask[:, :, :, None].expand(2, 1, 3, 4, 16))
    assert fast_llama._rows_mask(mask.clone(), 4) is not rows  # another forward's mask: its own
