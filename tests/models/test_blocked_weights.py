"""fp32 decoding on a CPU through oneDNN's matmul over blocked weights (`mtp.models.packed`): every row of a block
computed as it is alone (what keeps fp32 speculative decoding exactly equal to greedy), copies that follow the
weights, models that still copy and pickle, training untouched."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_base, tiny_mtp
from mtp import MaskTokenModel
from mtp.decoding.generate import generate, left_pad
from mtp.decoding.tree import DynamicTree
from mtp.errors import MTPError
from mtp.models.packed import BlockedWeights, blocked_available, blocked_linear, blocked_weight

needs_onednn = pytest.mark.skipif(not blocked_available(), reason="this torch has no oneDNN matmul")


@needs_onednn
@pytest.mark.xfail(tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13), strict=False,
                   reason="torch 2.11's oneDNN (AVX2) computes a last group of 1-3 rows in another order "
                          "(docs/decoding.md: fp32 speculative equals greedy up to a near-tie there)")
@pytest.mark.parametrize("shape,bias", [((1536, 64), False), ((576, 960), True), ((40, 300), False)])
def test_blocked_rows_are_computed_independently(shape, bias):
    """Every row of a block of 1..40 rows equals that row computed alone; calls of 1-3 rows are padded to 4
    (alone, oneDNN takes another path for some shapes, e.g. 1,536 inputs)."""
    linear = torch.nn.Linear(*shape, bias=bias)
    weight, b = blocked_weight(linear.weight), linear.bias.detach() if bias else None
    x = torch.randn(40, shape[0])
    with torch.no_grad():
        rows = torch.cat([blocked_linear(x[i: i + 1], weight, b, shape[1]) for i in range(40)])
        for m in range(1, 41):
            assert torch.equal(blocked_linear(x[:m], weight, b, shape[1]), rows[:m]), m
        torch.testing.assert_close(rows, linear(x), atol=1e-5, rtol=1e-5)
        assert blocked_linear(x[:3, None], weight, b, shape[1]).shape == (3, 1, shape[1])
        long = torch.randn(1100, shape[0])  # padded calls (`blocked_rows`) and calls of 1,024: rows still as alone
        alone = torch.cat([blocked_linear(long[i: i + 1], weight, b, shape[1]) for i in range(1100)])
        for m in (33, 63, 65, 130, 300, 1024, 1025, 1100):
            assert torch.equal(blocked_linear(long[:m], weight, b, shape[1]), alone[:m]), m


def test_blocked_row_counts_are_few():
    """Calls run at a few row counts (oneDNN keeps state per count for good: a process that met every prompt
    length grew by gigabytes): exact up to 31, then 16 counts a doubling, never more than 6.25% extra rows."""
    from mtp.models.packed import blocked_rows

    counts = [blocked_rows(n) for n in range(1, 1025)]  # (longer calls run in calls of 1,024 rows)
    assert counts[:31] == [4, 4, 4, *range(4, 32)]
    assert all(n <= c <= max(4, n * 1.0625) for n, c in zip(range(1, 1025), counts, strict=True))
    assert all(a <= b for a, b in zip(counts, counts[1:], strict=False))  # more rows never run at fewer
    assert len(set(counts)) <= 28 + 16 * 5 + 1  # 4..31, then 16 a doubling from 32 to 1,024 (and 1,024)


def _decoded(model, **kw):
    gen = torch.Generator().manual_seed(0)
    ids, mask = left_pad([torch.randint(0, 97, (n,), generator=gen).tolist() for n in (9, 4, 6)])
    return generate(model, ids, mask, max_new_tokens=20, stop_token_ids=[], **kw).tokens


@needs_onednn
@pytest.mark.parametrize("seed", range(3))
def test_fp32_cpu_decoding_runs_on_blocked_weights_and_speculative_equals_greedy(seed):
    # intermediate 1,536: the down projections are the shape whose lone rows oneDNN computes differently
    model = tiny_mtp("llama", num_heads=3, seed=seed, vocab_size=97, hidden=64, intermediate=1536)
    greedy = _decoded(model)
    fast = model.backbone.fast_layers[model.backbone.layers[0]]
    assert set(fast.blocked.entries) == {0, 1, 2, 3}  # q/k/v, output, gate/up, down: one matmul each
    assert "lm_head" in model.blocked.entries
    for kw in ({"strategy": "speculative"}, {"strategy": "speculative", "tree": "auto", "tree_size": 4, "lookup": 3},
               {"strategy": "speculative", "tree": DynamicTree(4, 2)}):
        assert _decoded(model, **kw) == greedy, kw
    with torch.no_grad():  # the logits are fp32's: those of Hugging Face's uncached forward, to fp32 rounding
        ids = torch.randint(0, 97, (2, 7))
        torch.testing.assert_close(model.lm_head(model.base.model(ids).last_hidden_state), model.base(ids).logits,
                                   atol=1e-5, rtol=1e-5)


@needs_onednn
def test_blocked_copies_follow_the_weights():
    """A weight changed in place (a training step) or replaced (a load) is blocked again before the next use."""
    model = tiny_mtp("llama", vocab_size=97)
    hidden = torch.randn(1, 3, 32)
    head = model.base.lm_head
    with torch.no_grad():
        before = model.lm_head(hidden)
        head.weight.mul_(2)
        torch.testing.assert_close(model.lm_head(hidden), 2 * before, atol=1e-5, rtol=1e-5)
        head.weight = torch.nn.Parameter(torch.randn(97, 32))
        torch.testing.assert_close(model.lm_head(hidden), F.linear(hidden, head.weight), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_models_with_blocked_copies_still_copy_and_pickle():
    """The blocked copies are opaque tensors that neither copy nor pickle: a copy starts without them."""
    model = tiny_mtp("llama", vocab_size=97)
    tokens = _decoded(model, strategy="speculative")
    assert model.blocked.entries
    twin = copy.deepcopy(model)
    assert not twin.blocked.entries and _decoded(twin, strategy="speculative") == tokens
    thawed = pickle.loads(pickle.dumps(model))
    assert _decoded(thawed, strategy="speculative") == tokens
    assert isinstance(copy.deepcopy(BlockedWeights()), BlockedWeights)


def test_training_and_other_dtypes_keep_torchs_matmul():
    """With gradients on (training) the unembedding is the nn.Linear autograd knows; float64 is never blocked."""
    model = tiny_mtp("llama", vocab_size=97)
    out = model.lm_head(torch.randn(1, 2, 32))
    assert out.requires_grad and not model.blocked.entries
    wide = tiny_mtp("llama", vocab_size=97, dtype=torch.float64)
    _decoded(wide)
    assert not wide.blocked.entries


@needs_onednn
def test_without_memory_to_spare_fp32_decodes_with_torchs_matmul(monkeypatch):
    """Blocked copies double the weights' memory: where the machine cannot spare it, nothing is copied and the
    tokens are those of torch's own matmul."""
    from mtp.models import packed

    model = tiny_mtp("llama", vocab_size=97)
    tokens = _decoded(model, strategy="speculative")
    monkeypatch.setattr(packed, "memory_to_spare", lambda nbytes: False)
    bare = tiny_mtp("llama", vocab_size=97)
    assert _decoded(bare, strategy="speculative") == tokens and not bare.blocked.entries
    assert not any(layer.blocked.entries for layer in bare.backbone.fast_layers.values())


def test_memory_to_spare_reads_the_machines_memory(monkeypatch, tmp_path):
    from mtp.models import packed

    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       16000000 kB\nMemAvailable:    6000000 kB\nHugePages_Total:       0\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(info if path == "/proc/meminfo" else path,
                                                                          *a, **k))
    assert packed.memory_to_spare(1_000_000 * 1024)  # 5 GB left of 16: more than a quarter
    assert not packed.memory_to_spare(3_000_000 * 1024)  # 3 GB left: less



@needs_onednn
def test_blocked_copies_follow_a_round_trip_through_another_dtype():
    """`Module.to` swaps each parameter's storage and keeps the object (its version unchanged): the copy is
    remade from the new storage (here the weights rounded through bf16)."""
    model = tiny_mtp("llama", vocab_size=97)
    hidden = torch.randn(1, 3, 32)
    _decoded(model, strategy="speculative")  # (every layer: the extra heads draft)
    layers = model.backbone.fast_layers.values()
    assert all(layer.blocked.entries for layer in layers)
    with torch.no_grad():
        model.lm_head(hidden)
        head = model.base.lm_head
        param = head.weight
        model.to(torch.bfloat16).to(torch.float32)
        assert head.weight is param and not any(layer.blocked.entries for layer in layers)
        torch.testing.assert_close(model.lm_head(hidden), F.linear(hidden, head.weight), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ decode-only
def _blocked_only(model):
    from mtp.models.quantize import block_for_decoding

    return block_for_decoding(model)


@needs_onednn
@pytest.mark.parametrize("draft_vocab", [False, True])
def test_decode_only_keeps_only_blocked_weights_and_decodes_as_the_copies_do(draft_vocab):
    """`mtp generate` / `mtp eval` (`load_mtp_model(decode_only=True)`): the projections, the unembedding and the
    draft rows live only as blocked weights; the tokens are those of the copies kept beside trainable weights
    (the same matmuls), in less memory; an uncached forward still runs (through the Hugging Face layers)."""
    from mtp.memory import tensor_bytes
    from mtp.models.packed import BlockedLinear

    model = tiny_mtp("llama", num_heads=3, vocab_size=97, hidden=64, intermediate=1536)
    if draft_vocab:
        model.set_draft_vocab(list(range(0, 97, 2)))
    runs = [{}, {"strategy": "speculative"}, {"strategy": "speculative", "tree": "auto", "tree_size": 4, "lookup": 3}]
    with_copies = [_decoded(model, **kw) for kw in runs]
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        uncached = model(ids)
    weights = tensor_bytes(model)
    lean = _blocked_only(model)
    assert lean is model and lean.fast_decoding == "blocked" and isinstance(lean.base.lm_head, BlockedLinear)
    assert isinstance(lean.packed_draft_head, BlockedLinear) == draft_vocab
    assert not [name for name, m in lean.named_modules() if type(m) is torch.nn.Linear]
    # the same bytes as the fp32 weights (nothing kept twice), but for the unembedding, which shared the embedding
    # table, and the draft rows, which were a cache
    assert tensor_bytes(lean) == weights + 4 * 64 * (97 + (49 if draft_vocab else 0))
    assert [_decoded(lean, **kw) for kw in runs] == with_copies
    assert with_copies[1] == with_copies[0] and with_copies[2] == with_copies[0]
    with torch.no_grad():
        torch.testing.assert_close(lean(ids), uncached, atol=1e-4, rtol=1e-4)
    with pytest.raises(MTPError, match="cannot be copied"):
        copy.deepcopy(lean)
    with pytest.raises(MTPError, match="cannot be pickled"):
        pickle.dumps(lean)


@needs_onednn
def test_decode_only_leaves_what_it_does_not_apply_to():
    """float64, GPT-2 (no lean layer step) and projections hooked by adapters keep their nn.Linear layers."""
    wide = tiny_mtp("llama", dtype=torch.float64)
    gpt2 = tiny_mtp("gpt2")
    hooked = tiny_mtp("llama")
    hooked.base.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: None)
    for model in (wide, gpt2, hooked):
        assert _blocked_only(model) is model and type(model.base.lm_head) is torch.nn.Linear


@needs_onednn
def test_decoding_commands_load_decode_only(monkeypatch, tmp_path):
    """`mtp generate` loads decode-only (the blocked layout alone); `mtp bench` does not (its transformers rows
    run the Hugging Face modules)."""
    from mtp.decoding import commands as decoding_commands
    from mtp.models.loading import load_mtp_model
    from mtp.models.packed import BlockedLinear

    folder, hf = tmp_path / "tiny", tmp_path / "hf"
    tiny_mtp("llama", vocab_size=97).save_pretrained(folder)
    tiny_base("llama", vocab_size=97).save_pretrained(hf)  # read into memory for decode-only, not mapped
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(hf)
    for source in (folder, hf):
        lean, trainable = load_mtp_model(str(source), decode_only=True), load_mtp_model(str(source))
        assert isinstance(lean.base.lm_head, BlockedLinear) and type(trainable.base.lm_head) is torch.nn.Linear
        assert _decoded(lean, strategy="speculative") == _decoded(trainable, strategy="speculative")
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise MTPError("stop here")

    monkeypatch.setattr("mtp.models.loading.load_mtp_model", spy)
    with pytest.raises(MTPError, match="stop here"):
        decoding_commands.generate(model=str(folder), prompt="hi", device="cpu")
    assert seen["decode_only"] is True


@needs_onednn
@pytest.mark.parametrize("adapter", ["full", "gated-lora"])
def test_decode_only_mask_token_models(adapter):
    """A mask-token model decodes through its base as `.lm`: with the full adapter that base is blocked and decodes
    as before (ConfAdapt's drafts included); gated LoRA hooks the projections, which keep their nn.Linear."""
    from mtp.models.packed import BlockedLinear
    from mtp.models.quantize import block_for_decoding

    model = MaskTokenModel.from_base(tiny_base("llama", seed=3, vocab_size=90), adapter=adapter, rank=4, k=4).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adapters and a mask embedding that draft something
        for b in (model.lora.B.values() if model.lora is not None else []):
            b.copy_(torch.randn(b.shape, generator=gen) * 0.5)
        model.base.get_input_embeddings().weight[model.mask_token_id].normal_(generator=gen)
    ids, mask = left_pad([[1, 2, 3, 4, 5], [6, 7, 8]])
    runs = [{}, {"strategy": "speculative"}, {"strategy": "confadapt", "tau": 0.5}]
    before = [generate(model, ids, mask, max_new_tokens=12, stop_token_ids=[], **kw).tokens for kw in runs]
    block_for_decoding(model.lm)
    assert isinstance(model.lm.base.lm_head, BlockedLinear) == (adapter == "full")
    assert [generate(model, ids, mask, max_new_tokens=12, stop_token_ids=[], **kw).tokens for kw in runs] == before


@needs_onednn
def test_a_warm_model_reorders_no_weight_while_decoding(monkeypatch):
    """After its first call a model's blocked copies are kept: decoding reorders no weight (the check of whether
    this torch has oneDNN's matmul, itself a reorder and a matmul, once ran before every matmul: fp32 decoding
    at half its speed)."""
    model = tiny_mtp("llama", vocab_size=97)
    _decoded(model, strategy="speculative")
    reorders = []
    real = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda *a: reorders.append(a) or real(*a))
    _decoded(model, strategy="speculative")
    assert reorders == []
