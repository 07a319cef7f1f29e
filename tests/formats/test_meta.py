"""Meta's multi-token checkpoint format <-> MTPModel, checked against an independent forward in Meta's formulation.

The tiny checkpoint is built here from random tensors: dim 64, 4 query heads, 2 key/value heads, vocab 97,
multiple_of 16, n_future_tokens 3. Meta's `n_layers` counts every block, extra heads included: n_layers 5 gives
`layers.0..2` (two trunk layers + the next-token head) and `extra_heads.0`, `extra_heads.1`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from meta_helpers import write_sharded_meta
from safetensors.torch import load_file

from mtp.cli import main
from mtp.errors import MTPError
from mtp.formats.meta import (
    convert_meta_to_mtp_folder,
    ffn_hidden_size,
    meta_to_mtp,
    mtp_to_meta,
    read_meta_checkpoint,
)
from mtp.models.parallel_heads import MTPModel

PARAMS = {
    "dim": 64,
    "n_layers": 5,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 97,
    "multiple_of": 16,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "rope_theta": 5000.0,
    "n_future_tokens": 3,
}
LAYER_KEYS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
              "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
              "attention_norm.weight", "ffn_norm.weight")


# -------------------------------------------------------------------------------------------- fixtures
def make_meta_state(params: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    hd = dim // n_heads
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier"):
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    m = params["multiple_of"]
    hidden = m * ((hidden + m - 1) // m)
    vocab = params["vocab_size"]

    def rand(*shape, scale=0.08):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def norm_weight():
        return (1.0 + 0.2 * torch.randn(dim, generator=g)).to(dtype)

    def layer(prefix):
        return {
            prefix + "attention.wq.weight": rand(n_heads * hd, dim),
            prefix + "attention.wk.weight": rand(n_kv * hd, dim),
            prefix + "attention.wv.weight": rand(n_kv * hd, dim),
            prefix + "attention.wo.weight": rand(dim, n_heads * hd),
            prefix + "feed_forward.w1.weight": rand(hidden, dim),
            prefix + "feed_forward.w2.weight": rand(dim, hidden),
            prefix + "feed_forward.w3.weight": rand(hidden, dim),
            prefix + "attention_norm.weight": norm_weight(),
            prefix + "ffn_norm.weight": norm_weight(),
        }

    n_future = params.get("n_future_tokens", 1)
    state = {"tok_embeddings.weight": rand(vocab, dim, scale=1.0)}
    for i in range(params["n_layers"] - n_future + 1):
        state.update(layer(f"layers.{i}."))
    for j in range(n_future - 1):
        state.update(layer(f"extra_heads.{j}."))
    state["norm.weight"] = norm_weight()
    state["output.weight"] = rand(vocab, dim, scale=0.2)
    return state


def write_meta(folder: Path, params: dict, state: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    torch.save(state, folder / "consolidated.00.pth")
    return folder


@pytest.fixture
def meta_folder(tmp_path) -> Path:
    return write_meta(tmp_path / "meta", PARAMS, make_meta_state(PARAMS))


def assert_same_checkpoint(a: Path, b: Path) -> None:
    pa, sa = read_meta_checkpoint(a)
    pb, sb = read_meta_checkpoint(b)
    assert pa == pb
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


# -------------------------------------------------------------------------------------------- reference forward
def reference_forward(params: dict, sd: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Meta's Transformer.forward(tokens, 0, return_all_heads=True), written out: (B, T, n_future, V)."""
    sd = {k: v.float() for k, v in sd.items()}
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    hd = dim // n_heads
    eps = params.get("norm_eps", 1e-5)
    theta = params.get("rope_theta", 10000.0)
    n_future = params.get("n_future_tokens", 1)
    b, t = tokens.shape

    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    angles = torch.outer(torch.arange(t).float(), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)  # (T, hd/2) complex

    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotary(x):  # (B, T, heads, hd), pairs (2i, 2i+1) rotate together
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)

    def block(prefix, x):
        h = rmsnorm(x, sd[prefix + "attention_norm.weight"])
        q = (h @ sd[prefix + "attention.wq.weight"].T).view(b, t, n_heads, hd)
        k = (h @ sd[prefix + "attention.wk.weight"].T).view(b, t, n_kv, hd)
        v = (h @ sd[prefix + "attention.wv.weight"].T).view(b, t, n_kv, hd)
        q, k = rotary(q), rotary(k)
        rep = n_heads // n_kv  # Meta's repeat_kv: query head i reads key/value head i // rep
        k = k[:, :, :, None, :].expand(b, t, n_kv, rep, hd).reshape(b, t, n_heads, hd)
        v = v[:, :, :, None, :].expand(b, t, n_kv, rep, hd).reshape(b, t, n_heads, hd)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, heads, T, hd)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + mask
        attn = (F.softmax(scores.float(), dim=-1) @ v).transpose(1, 2).reshape(b, t, -1)
        h = x + attn @ sd[prefix + "attention.wo.weight"].T
        f = rmsnorm(h, sd[prefix + "ffn_norm.weight"])
        ff = (F.silu(f @ sd[prefix + "feed_forward.w1.weight"].T) * (f @ sd[prefix + "feed_forward.w3.weight"].T))
        return h + ff @ sd[prefix + "feed_forward.w2.weight"].T

    n_blocks = params["n_layers"] - n_future + 1
    h = sd["tok_embeddings.weight"][tokens]
    for i in range(n_blocks - 1):
        h = block(f"layers.{i}.", h)
    heads = [f"layers.{n_blocks - 1}."] + [f"extra_heads.{j}." for j in range(n_future - 1)]
    latents = torch.stack([block(p, h) for p in heads], dim=-2)  # (B, T, n, D)
    return rmsnorm(latents, sd["norm.weight"]) @ sd["output.weight"].T


def test_permutation_layout_is_rotate_half():
    """Our converted wq rows pair dimension i with i + hd/2 (rotate-half) where Meta pairs 2i with 2i+1."""
    from mtp.formats.meta import _permute, _unpermute

    n_heads, hd = 2, 8
    w = torch.arange(n_heads * hd, dtype=torch.float32)[:, None]  # row r holds r
    hf = _permute(w, n_heads)[:, 0].long().tolist()
    assert hf == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert torch.equal(_unpermute(_permute(w, n_heads), n_heads), w)


def test_all_heads_match_meta_reference(meta_folder):
    model = meta_to_mtp(meta_folder)
    assert (model.num_heads, model.num_trunk_layers, model.num_layers) == (3, 2, 3)
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 176, 4, 2)
    assert cfg.vocab_size == 97 and not cfg.tie_word_embeddings
    _, state = read_meta_checkpoint(meta_folder)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids, return_all_heads=True)
        first = model(ids)
    expected = reference_forward(PARAMS, state, ids)
    assert ours.shape == expected.shape == (2, 11, 3, 97)
    assert (ours - expected).abs().max().item() <= 1e-4
    assert torch.equal(first[:, :, 0], ours[:, :, 0])
    # The heads really differ (a mapping that fed every head the same layer would not be caught otherwise).
    assert (expected[:, :, 0] - expected[:, :, 1]).abs().max() > 1e-2


def test_without_optional_params(tmp_path):
    """Absent n_kv_heads, rope_theta, n_future_tokens, vocab_size -1 take Meta's defaults (a plain Llama)."""
    params = {"dim": 32, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-6, "vocab_size": -1}
    state = make_meta_state({**params, "vocab_size": 50}, seed=3)
    folder = write_meta(tmp_path / "plain", params, state)
    model = meta_to_mtp(folder)
    assert (model.num_heads, model.num_layers, model.config.vocab_size) == (1, 2, 50)
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids, return_all_heads=True)
    ref = reference_forward({**params, "vocab_size": 50}, state, ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    out = mtp_to_meta(model, tmp_path / "back")
    assert_same_checkpoint(folder, out)


# -------------------------------------------------------------------------------------------- round trips
def test_round_trip_through_mtp_folder_is_exact(meta_folder, tmp_path):
    model = meta_to_mtp(meta_folder)
    model.save_pretrained(tmp_path / "ours")
    loaded = MTPModel.from_pretrained(tmp_path / "ours")
    out = mtp_to_meta(loaded, tmp_path / "back")
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json"]
    assert_same_checkpoint(meta_folder, out)
    # Written atomically: no temporary folders left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "meta", "ours"]


def test_round_trip_keeps_bfloat16_exact(tmp_path):
    folder = write_meta(tmp_path / "bf16", PARAMS, make_meta_state(PARAMS, seed=5, dtype=torch.bfloat16))
    model = meta_to_mtp(folder, dtype=None)
    assert model.dtype == torch.bfloat16
    assert_same_checkpoint(folder, mtp_to_meta(model, tmp_path / "back"))


def test_export_of_a_plain_llama_derives_params(tmp_path):
    """No original params.json to reuse: multiple_of / ffn_dim_multiplier are chosen to reproduce the MLP size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                         rms_norm_eps=1e-6, rope_theta=20000.0)
    model = MTPModel(LlamaForCausalLM(config).eval(), num_heads=2).eval()
    out = mtp_to_meta(model, tmp_path / "meta")
    params, state = read_meta_checkpoint(out)
    assert params["n_layers"] == 4 and params["n_future_tokens"] == 2  # 3 blocks + 1 extra head
    assert ffn_hidden_size(48, params["multiple_of"], params["ffn_dim_multiplier"]) == 100
    assert params["rope_theta"] == 20000.0 and params["norm_eps"] == 1e-6
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    assert state["output.weight"].data_ptr() != state["tok_embeddings.weight"].data_ptr()
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(ids, return_all_heads=True)
        back = meta_to_mtp(out)(ids, return_all_heads=True)
    assert (ours - back).abs().max().item() <= 1e-5
    assert (ours - reference_forward(params, state, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dim,intermediate", [(576, 1536), (4096, 11008), (4096, 14336), (64, 176), (48, 100),
                                              (48, 128), (100, 300)])
def test_ffn_params_reproduce_intermediate_size(dim, intermediate):
    from mtp.formats.meta import _ffn_params

    multiple_of, multiplier = _ffn_params(dim, intermediate)
    assert ffn_hidden_size(dim, multiple_of, multiplier) == intermediate


def test_export_refuses_heads_of_several_layers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=31, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4)
    model = MTPModel(LlamaForCausalLM(config), num_heads=2, num_trunk_layers=1)
    with pytest.raises(MTPError, match="one layer per head"):
        mtp_to_meta(model, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()
    reading = MTPModel(LlamaForCausalLM(config), num_heads=2).add_next_token_input()
    with pytest.raises(MTPError, match="read the next token"):
        mtp_to_meta(reading, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()


# -------------------------------------------------------------------------------------------- bad checkpoints
def _broken(tmp_path, edit) -> Path:
    state = make_meta_state(PARAMS)
    edit(state)
    return write_meta(tmp_path / "broken", PARAMS, state)


def test_missing_tensor_is_named(tmp_path):
    folder = _broken(tmp_path, lambda s: s.pop("extra_heads.1.feed_forward.w3.weight"))
    with pytest.raises(MTPError, match=r"missing: extra_heads\.1\.feed_forward\.w3\.weight"):
        meta_to_mtp(folder)


def test_extra_tensor_is_named(tmp_path):
    folder = _broken(tmp_path, lambda s: s.__setitem__("extra_heads.2.ffn_norm.weight", torch.ones(64)))
    with pytest.raises(MTPError, match=r"unexpected: extra_heads\.2\.ffn_norm\.weight"):
        meta_to_mtp(folder)


def test_misshaped_tensor_is_named(tmp_path):
    folder = _broken(tmp_path, lambda s: s.__setitem__("layers.1.attention.wk.weight", torch.zeros(48, 64)))
    with pytest.raises(MTPError, match=r"mis-shaped: layers\.1\.attention\.wk\.weight \(checkpoint \(48, 64\)"):
        meta_to_mtp(folder)


def test_n_layers_must_count_the_extra_heads(tmp_path):
    """A params.json whose n_layers counts only `layers.*` is not Meta's convention: say what was expected."""
    folder = write_meta(tmp_path / "m", {**PARAMS, "n_layers": 3}, make_meta_state(PARAMS))
    with pytest.raises(MTPError, match=r"expected layers\.0\.\.0, found 3 layers\.\* blocks"):
        meta_to_mtp(folder)


def test_missing_files_and_shards(tmp_path, meta_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MTPError, match="params.json"):
        read_meta_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "params.json").write_text(json.dumps(PARAMS))
    with pytest.raises(MTPError, match=r"consolidated\.00\.pth"):
        read_meta_checkpoint(tmp_path / "empty")
    # A copy of the file as a second model-parallel shard doubles the split axes: params.json no longer fits.
    (meta_folder / "consolidated.01.pth").write_bytes((meta_folder / "consolidated.00.pth").read_bytes())
    with pytest.raises(MTPError, match=r"consolidated\.\*\.pth does not match params.json: mis-shaped: "
                                       r"extra_heads\.0\.attention\.wk\.weight \(checkpoint \(64, 64\), params.json \(32, 64\)"):
        meta_to_mtp(meta_folder)
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2)}, meta_folder / "consolidated.01.pth")
    with pytest.raises(MTPError, match=r"consolidated\.01\.pth does not hold the same tensors"):
        read_meta_checkpoint(meta_folder)


@pytest.mark.parametrize("n", [2, 4])
def test_model_parallel_shards_join_into_the_one_file_checkpoint(tmp_path, n):
    state = make_meta_state(PARAMS)
    one = write_meta(tmp_path / "one", PARAMS, state)
    many = write_sharded_meta(tmp_path / "many", PARAMS, state, n)
    assert len(list(many.glob("consolidated.*.pth"))) == n
    _, joined = read_meta_checkpoint(many)
    assert sorted(joined) == sorted(state)
    assert all(torch.equal(joined[k], state[k]) for k in state)
    a, b = meta_to_mtp(one), meta_to_mtp(many)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(a(ids, return_all_heads=True), b(ids, return_all_heads=True))
    # the streamed conversion writes the same folder as loading and saving the model
    streamed, saved = tmp_path / "streamed", tmp_path / "saved"
    convert_meta_to_mtp_folder(many, streamed)
    a.save_pretrained(saved)
    assert (streamed / "config.json").read_text() == (saved / "config.json").read_text()
    sa, sb = load_file(streamed / "model.safetensors"), load_file(saved / "model.safetensors")
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_streamed_conversion_casts(tmp_path, meta_folder):
    out = convert_meta_to_mtp_folder(meta_folder, tmp_path / "bf16", dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    state = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    model = MTPModel.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    reference = meta_to_mtp(meta_folder, dtype=torch.bfloat16)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(), strict=True))


def test_bad_params_json(tmp_path):
    folder = write_meta(tmp_path / "m", PARAMS, make_meta_state(PARAMS))
    (folder / "params.json").write_text("{not json")
    with pytest.raises(MTPError, match="not valid JSON"):
        meta_to_mtp(folder)
    (folder / "params.json").write_text(json.dumps({k: v for k, v in PARAMS.items() if k != "dim"}))
    with pytest.raises(MTPError, match="missing 'dim'"):
        meta_to_mtp(folder)


@pytest.mark.parametrize("edit, message", [
    ({"n_heads": 0}, "n_heads must be at least 1, got 0"),  # these three: a ZeroDivisionError
    ({"n_kv_heads": 0}, "n_kv_heads must be at least 1, got 0"),
    ({"multiple_of": 0}, "multiple_of must be at least 1, got 0"),
    ({"ffn_dim_multiplier": "x"}, "ffn_dim_multiplier must be a positive number or null, got 'x'"),
    ({"n_layers": 10**6}, "n_layers 1,000,000, but the checkpoint holds"),  # 10**9: a MemoryError, after minutes
])
def test_params_json_sizes_the_checkpoint_cannot_have(tmp_path, edit, message):
    folder = write_meta(tmp_path / "m", {**PARAMS, **edit}, make_meta_state(PARAMS))
    with pytest.raises(MTPError, match=message):
        meta_to_mtp(folder)


# -------------------------------------------------------------------------------------------- CLI
def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def test_cli_converts_both_ways(meta_folder, tmp_path, capsys):
    ours, back, auto = tmp_path / "ours", tmp_path / "back", tmp_path / "auto"
    assert run_cli(["convert", "--from", "meta", "--input", str(meta_folder), "--output", str(ours)]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((ours / "config.json").read_text())
    assert config["mtp"]["num_heads"] == 3 and config["mtp"]["num_trunk_layers"] == 2
    model = MTPModel.from_pretrained(ours)
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(7))
    _, state = read_meta_checkpoint(meta_folder)
    with torch.no_grad():
        assert (model(ids, return_all_heads=True) - reference_forward(PARAMS, state, ids)).abs().max() <= 1e-4

    assert run_cli(["convert", "--to", "meta", "--input", str(ours), "--output", str(back)]) == 0
    assert_same_checkpoint(meta_folder, back)
    # --from omitted: the format is read from what is on disk.
    assert run_cli(["convert", "--input", str(meta_folder), "--output", str(auto)]) == 0
    assert json.loads((auto / "config.json").read_text())["mtp"]["num_heads"] == 3


def test_cli_refuses_to_overwrite(meta_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert run_cli(["convert", "--from", "meta", "--input", str(meta_folder), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    assert run_cli(["convert", "--from", "meta", "--input", str(meta_folder), "--output", str(out),
                    "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert run_cli(["convert", "--from", "meta", "--input", str(meta_folder), "--output", str(meta_folder.parent),
                    "--overwrite"]) == 2  # (replacing the folder that holds the input would delete it)
    assert "would delete the input" in capsys.readouterr().err and (meta_folder / "params.json").exists()


def test_cli_missing_params_json_is_one_line_exit_2(meta_folder, tmp_path, capsys):
    (meta_folder / "params.json").unlink()
    code = run_cli(["convert", "--from", "meta", "--input", str(meta_folder), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mtp: error:") and "params.json" in err
    assert not (tmp_path / "o").exists()


def test_cli_wraps_a_plain_hf_model(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(40)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp_path / "hf")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=43, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "hf")
    out, meta = tmp_path / "ours", tmp_path / "meta"
    assert run_cli(["convert", "--from", "hf", "--input", str(tmp_path / "hf"), "--output", str(out),
                    "--num-heads", "3"]) == 0
    model = MTPModel.from_pretrained(out)
    assert model.num_heads == 3 and model.tokenizer is not None
    ids = torch.randint(0, 43, (1, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert (model(ids)[:, :, 0] - base(ids).logits).abs().max() <= 1e-5
    # A plain model straight to Meta's format, and --num-heads refused where heads already exist.
    assert run_cli(["convert", "--from", "hf", "--to", "meta", "--input", str(tmp_path / "hf"),
                    "--output", str(meta), "--num-heads", "2"]) == 0
    params, _ = read_meta_checkpoint(meta)
    assert params["n_future_tokens"] == 2 and params["n_layers"] == 4
    capsys.readouterr()
    assert run_cli(["convert", "--to", "meta", "--input", str(out), "--output", str(tmp_path / "x"),
                    "--num-heads", "2"]) == 2
    assert "--num-heads" in capsys.readouterr().err
    # --from that is not what the input is: named, with what it is
    assert run_cli(["convert", "--from", "gguf", "--to", "meta", "--input", str(out), "--output",
                    str(tmp_path / "y")]) == 2
    assert f"--from gguf: {out} is an mtp folder (--from mtp, or leave --from out)" in capsys.readouterr().err


def test_meta_tokenizer_is_optional(meta_folder, tmp_path):
    """A tokenizer.model beside the weights is attached when transformers can read it; never blocks conversion."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(100)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(meta_folder / "tokenizer"), vocab_size=40,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    model = meta_to_mtp(meta_folder)
    if model.tokenizer is not None:
        expected = spm.SentencePieceProcessor(model_file=str(meta_folder / "tokenizer.model")).encode("the lazy dog")
        assert model.tokenizer("the lazy dog", add_special_tokens=False).input_ids == expected


def test_export_keeps_a_tokenizer_that_is_not_sentencepiece(tmp_path):
    """A model whose tokenizer is Hugging Face's (BPE, as SmolLM2's): `mtp convert --to meta` writes its files
    beside params.json, and the folder loads back, and converts back, with the same tokenizer (it had none: the
    Meta folder could not decode and the mtp folder converted back said "without a tokenizer")."""
    from conftest import tiny_mtp, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_mtp("llama", num_heads=2, vocab_size=len(tok))
    model.tokenizer = tok
    model.save_pretrained(tmp_path / "mtp")
    assert run_cli(["convert", "--to", "meta", "--input", str(tmp_path / "mtp"), "--output", str(tmp_path / "meta")]) == 0
    assert (tmp_path / "meta" / "tokenizer_config.json").is_file()
    text = "Tom has 3 apples"
    assert meta_to_mtp(tmp_path / "meta").tokenizer.encode(text) == tok.encode(text)
    assert run_cli(["convert", "--from", "meta", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "back")]) == 0
    assert MTPModel.from_pretrained(tmp_path / "back").tokenizer.encode(text) == tok.encode(text)


def test_a_round_trip_keeps_the_context_and_the_tokenizers_ids(tmp_path):
    """mtp -> Meta -> mtp: params.json carries the context (max_seq_len; it came back as 4096) and the ids come
    from the tokenizer converted along (they came back as LlamaConfig's 1 and 2: in another vocabulary ordinary
    tokens, at which the converted model stopped)."""
    import json

    from conftest import tiny_mtp, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_mtp("llama", num_heads=2, vocab_size=len(tok), context=200)
    model.tokenizer = tok
    model.save_pretrained(tmp_path / "mtp")
    assert run_cli(["convert", "--to", "meta", "--input", str(tmp_path / "mtp"), "--output", str(tmp_path / "meta")]) == 0
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["max_seq_len"] == 200
    assert run_cli(["convert", "--from", "meta", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "back")]) == 0
    for config in (json.loads((tmp_path / "back" / "config.json").read_text()), meta_to_mtp(tmp_path / "meta").config):
        config = config if isinstance(config, dict) else config.to_dict()
        assert config["max_position_embeddings"] == 200
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
            tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_export_refuses_a_draft_vocabulary(tmp_path):
    """Heads that draft from a subset of the vocabulary (--draft-vocab): Meta's heads score all of it, and the
    subset (a buffer outside the state dict) was dropped without a word."""
    from conftest import tiny_mtp

    model = tiny_mtp("llama", num_heads=2)
    model.set_draft_vocab(list(range(20)))
    with pytest.raises(MTPError, match="draft from 20 tokens"):
        mtp_to_meta(model, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()
