"""Heads-only training with the frozen part in bf16 (`mtp train --freeze-trunk --dtype bfloat16`): the extra heads
keep fp32 master weights, the loss goes down, the trunk does not move, and the result decodes."""

import pytest
import torch
from test_commands import write_data
from test_loop import cfg, make_data
from training_helpers import tiny_llama, train_tokenizer

from mtp.decoding.generate import generate, left_pad
from mtp.errors import MTPError
from mtp.models.parallel_heads import MTPModel
from mtp.training.commands import train
from mtp.training.features import FeatureStore
from mtp.training.loop import Trainer


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("trunk_cache", ["device", "disk", "off"])
def test_bf16_frozen_trunk_trains_fp32_heads_and_lowers_the_loss(tmp_path, trunk_cache) -> None:
    model = tiny_llama(num_heads=3).frozen_trunk_in(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.extra_heads.parameters()} == {torch.float32}
    before = snapshot(model)
    store = FeatureStore.for_model(tmp_path / "features", model, "bf16-trunk") if trunk_cache == "disk" else None
    trainer = Trainer(model, make_data(rows=4), cfg(steps=40, lr=1e-2, freeze_trunk=True, precision="bf16",
                                                    trunk_cache=trunk_cache), feature_store=store)
    result = trainer.train()
    assert trainer.trunk_cache == trunk_cache
    if trunk_cache != "off":
        assert trainer.features.dtype == torch.bfloat16  # the cached trunk outputs take half the memory too
    for j in (1, 2):
        assert result.history[-1].head_loss[j] < 0.9 * result.history[0].head_loss[j]
    after = snapshot(model)
    for name, p in model.named_parameters():
        trained = name.startswith("extra_heads.")
        assert p.dtype == (torch.float32 if trained else torch.bfloat16), name
        assert torch.equal(before[name], after[name]) != trained, name
    states = [s for s in trainer.optimizer.state.values() if s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)  # AdamW moments in fp32

    # Saved as it is (bf16 trunk, fp32 heads), loaded in bf16 for decoding: speculative equals greedy.
    folder = model.save_pretrained(tmp_path / "trained")
    loaded = MTPModel.from_pretrained(folder, dtype=torch.bfloat16)
    ids, mask = left_pad([[5, 9, 2, 7, 1, 3], [3, 1, 4]])
    greedy = generate(loaded, ids, mask, max_new_tokens=12, stop_token_ids=[])
    assert generate(loaded, ids, mask, max_new_tokens=12, strategy="speculative",
                    stop_token_ids=[]).tokens == greedy.tokens


def test_train_cli_dtype_bfloat16_keeps_the_trunk_and_trains_the_heads(tmp_path) -> None:
    tok = train_tokenizer()
    base = tiny_llama(vocab_size=len(tok), num_heads=3, tokenizer=tok)
    with torch.no_grad():  # bf16 values, so the frozen part can be compared exactly after the run
        for p in base.parameters():
            p.copy_(p.bfloat16().float())
    source = base.save_pretrained(tmp_path / "base")
    data = write_data(tmp_path / "d.jsonl", n=12)
    common = {"model": str(source), "data": data, "steps": 3, "seq_len": 48, "batch_size": 2, "progress": False,
              "holdout": 0.0, "freeze_trunk": True, "save_every": 0}
    assert train(output=str(tmp_path / "run"), dtype="bfloat16", **common) == 0
    trained = MTPModel.from_pretrained(tmp_path / "run")
    reference = MTPModel.from_pretrained(source)
    before, after = reference.checkpoint_state_dict(), trained.checkpoint_state_dict()
    for name in before:
        assert torch.equal(before[name], after[name]) == (not name.startswith("extra_heads.")), name
    with pytest.raises(MTPError, match="for --freeze-trunk"):
        train(output=str(tmp_path / "full"), dtype="bfloat16", **{**common, "freeze_trunk": False})
    with pytest.raises(MTPError, match="--autocast bfloat16"):
        train(output=str(tmp_path / "p"), dtype="bfloat16", autocast="float32", **common)
