"""The training loop on tiny random models: loss goes down, frozen trunk, caching, checkpointing, resume, NaN."""

import json
import os
import signal

import pytest
import torch
from training_helpers import tiny_gpt2, tiny_llama

from mtp.errors import MTPError
from mtp.training.checkpoints import latest_checkpoint, list_checkpoints, load_trainer_state, save_checkpoint
from mtp.training.data import TokenizedData, batch_at
from mtp.training.loop import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    batch_rows,
    compute_trunk_features,
    enable_gradient_checkpointing,
    lr_lambda,
)


def make_data(vocab: int = 97, rows: int = 8, length: int = 16, seed: int = 3) -> TokenizedData:
    """Learnable rows: an arithmetic progression mod vocab (each row its own start and step)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (rows, 1), generator=g)
    step = torch.randint(1, 4, (rows, 1), generator=g)
    ids = (start + step * torch.arange(length)[None, :]) % vocab
    lengths = torch.tensor([length - (i % 3) * 2 for i in range(rows)])
    pos = torch.arange(length)[None, :]
    attention = (pos < lengths[:, None]).long()
    loss_mask = (pos >= 3) & attention.bool()
    return TokenizedData.from_dense(ids, loss_mask, attention)


def cfg(**kw) -> TrainConfig:
    base = {"steps": 4, "batch_size": 4, "lr": 3e-3, "progress": False, "warmup_steps": 0}
    base.update(kw)
    return TrainConfig(**base)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lr_schedule_warmup_then_cosine() -> None:
    f = [lr_lambda(s, 10, 2, 0.1) for s in range(11)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0) and f[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))


def test_batch_rows_matches_batch_at() -> None:
    data = make_data(rows=7)
    for step in range(6):
        rows = batch_rows(len(data), 3, 11, step)
        expected = batch_at(data, 3, 11, step)
        assert torch.equal(data.batch(rows)["input_ids"], expected["input_ids"])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_full_finetune_loss_goes_down(make) -> None:
    model = make(num_heads=3)
    data = make_data(rows=4)
    trainer = Trainer(model, data, cfg(steps=15, batch_size=4, lr=1e-2, warmup_steps=2))
    result = trainer.train()
    first, last = result.history[0], result.history[-1]
    for j in range(3):
        assert last.head_loss[j] < 0.7 * first.head_loss[j], j


def test_frozen_trunk_trains_extra_heads_only_and_loss_goes_down() -> None:
    model = tiny_llama(num_heads=3)
    before = params(model)
    data = make_data(rows=4)
    trainer = Trainer(model, data, cfg(steps=25, lr=1e-2, freeze_trunk=True))
    result = trainer.train()
    after = params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("extra_heads.") for n in changed)
    assert len(changed) == len([n for n in before if n.startswith("extra_heads.")])
    assert result.history[0].head_loss[0] is None  # head 0 is frozen: not computed in training
    for j in (1, 2):
        assert result.history[-1].head_loss[j] < 0.9 * result.history[0].head_loss[j]
    assert not model.base.training and model.extra_heads.training


def test_cached_trunk_equals_recomputed() -> None:
    data = make_data(rows=6)
    models = []
    for cache in ("device", "off"):
        model = tiny_llama(num_heads=3)
        Trainer(model, data, cfg(steps=5, batch_size=3, freeze_trunk=True, trunk_cache=cache)).train()
        models.append(params(model))
    for name in models[0]:
        torch.testing.assert_close(models[0][name], models[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_trunk_features_are_the_trunk_output() -> None:
    model = tiny_llama(num_heads=2)
    data = make_data(rows=5)
    with torch.no_grad():
        features = compute_trunk_features(model, data, batch_size=2)
        for i in range(len(data)):
            n = int(data.attention_mask[i].sum())
            hidden, _ = model.trunk_forward(data.input_ids[i:i + 1, :n])
            torch.testing.assert_close(features[i, :n], hidden[0], rtol=1e-5, atol=1e-6)
            assert not features[i, n:].any()


def test_the_trunk_cache_without_a_bar_logs_plain_lines(monkeypatch, capsys) -> None:
    """A trunk cache over a large dataset takes minutes: with no bar (--no-progress) it prints a plain line every
    few minutes instead."""
    import mtp.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a line every batch
    with torch.no_grad():
        compute_trunk_features(tiny_llama(num_heads=2), make_data(rows=5), batch_size=2, progress=False)
    err = capsys.readouterr().err
    assert "mtp trunk cache: 1 of 3 batches (33%)" in err and "mtp trunk cache: 3 of 3 batches (100%)" in err, err


def test_features_that_come_with_the_data_are_used(monkeypatch) -> None:
    """Trunk outputs recorded with the data (self-distilled answers) replace the trunk pass: training on them
    gives the parameters training on a fresh trunk cache gives."""
    import mtp.training.loop as loop

    data, held = make_data(rows=6), make_data(rows=3, seed=4)
    reference = tiny_llama(num_heads=3)
    Trainer(reference, data, cfg(steps=5, batch_size=3, freeze_trunk=True), eval_data=held).train()
    model = tiny_llama(num_heads=3)
    with torch.no_grad():
        data.trunk_features = compute_trunk_features(model, data)
        held.trunk_features = compute_trunk_features(model, held)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the trunk ran again")

    monkeypatch.setattr(loop, "compute_trunk_features", no_second_pass)
    trainer = Trainer(model, data, cfg(steps=5, batch_size=3, freeze_trunk=True), eval_data=held)
    trainer.train()
    assert trainer.features is data.trunk_features and trainer.eval_features is held.trunk_features
    for name, value in params(reference).items():
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), value, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_recomputes_and_keeps_gradients() -> None:
    from training_helpers import random_batch

    from mtp.training.losses import mtp_loss_memory_efficient

    grads = []
    calls = []
    for checkpointing in (False, True):
        model = tiny_llama(num_heads=3)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        count = {"n": 0}
        # A submodule's pre-hooks fire again when its layer is recomputed in the backward pass (a post-hook
        # may not: the recomputation stops as soon as the saved tensors it needs are back).
        for layers in [model.backbone.layers, *model.extra_heads]:
            for layer in layers:
                layer.mlp.register_forward_pre_hook(lambda *a, c=count: c.__setitem__("n", c["n"] + 1))
        mtp_loss_memory_efficient(model, random_batch(), [1.0, 1.0, 1.0])
        calls.append(count["n"])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    n_layers = 3 + 2  # base layers + one layer per extra head
    assert calls == [n_layers, 2 * n_layers]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_step_runs() -> None:
    model = tiny_llama(num_heads=2)
    result = Trainer(model, make_data(rows=4), cfg(steps=2, precision="bf16")).train()
    assert all(torch.isfinite(torch.tensor(m.loss)) for m in result.history)


def test_grad_accumulation_equals_big_batch() -> None:
    data = make_data(rows=4)
    out = []
    for bs, acc in ((4, 1), (2, 2)):
        model = tiny_llama(num_heads=2)
        # With 4 rows, micro-batches (2 rows) 0 and 1 of epoch 0 are the same rows as the one 4-row batch.
        Trainer(model, data, cfg(steps=1, batch_size=bs, grad_accum=acc, max_grad_norm=0)).train()
        out.append(params(model))
    for name in out[0]:
        torch.testing.assert_close(out[1][name], out[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradients_the_model_came_with_are_not_added_to_the_first_step() -> None:
    """A model handed over after a backward of the caller's own (its parameters hold `.grad`) trains as one
    without: the first step's gradients are its batch's alone."""
    data = make_data(rows=4)
    out = []
    for stale in (False, True):
        model = tiny_llama(num_heads=2)
        if stale:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
        Trainer(model, data, cfg(steps=1, batch_size=4, max_grad_norm=0)).train()
        out.append(params(model))
    for name in out[0]:
        torch.testing.assert_close(out[1][name], out[0][name], rtol=0, atol=0, msg=name)


def _run(tmp_path, name, steps, stop_at=None, resume=False, eval_data=None, **kw):
    model = tiny_llama(num_heads=3)
    data = make_data(rows=6)
    trainer = Trainer(model, data, cfg(steps=steps, batch_size=2, grad_accum=2, save_every=2, warmup_steps=2, **kw),
                      output_dir=tmp_path / name, eval_data=eval_data)
    if resume:
        ckpt = latest_checkpoint(tmp_path / name)
        trainer.resume_from(ckpt)

    def on_step(tr, m):
        if stop_at is not None and tr.step == stop_at:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: handled after this step

    trainer.train(on_step=on_step)
    return model


@pytest.mark.parametrize("freeze", [False, True], ids=["full", "frozen"])
def test_resume_gives_the_same_parameters(tmp_path, freeze) -> None:
    straight = params(_run(tmp_path, "a", 7, freeze_trunk=freeze))
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "b", 7, stop_at=3, freeze_trunk=freeze)  # Ctrl-C after step 3: not a save_every step
    assert latest_checkpoint(tmp_path / "b").name == "step-000003"
    assert load_trainer_state(latest_checkpoint(tmp_path / "b"))["step"] == 3
    resumed = params(_run(tmp_path, "b", 7, resume=True, freeze_trunk=freeze))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in lines if '"eval"' not in line]
    assert steps == list(range(1, 8))  # no step logged twice
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path) -> None:
    model = tiny_llama(num_heads=3)
    trainer = Trainer(model, make_data(rows=4), cfg(steps=6, batch_size=2, save_every=2), output_dir=tmp_path)

    def poison(tr, m):
        if tr.step == 3:
            with torch.no_grad():
                next(model.extra_heads[0].parameters()).fill_(float("inf"))

    with pytest.raises(NonFiniteLossError, match="step 4: .*head 1.*step-000002"):
        trainer.train(on_step=poison)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]


def test_checkpoints_keep_last_k_and_ignore_partial(tmp_path) -> None:
    model = tiny_llama(num_heads=2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"x": step}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    (tmp_path / "step-000009").mkdir()  # a folder without trainer state is not a checkpoint
    (tmp_path / ".tmp-step-000010-abc").mkdir()  # a crashed save
    assert latest_checkpoint(tmp_path).name == "step-000003"
    save_checkpoint(tmp_path, 4, model, {}, keep=2)
    assert not (tmp_path / ".tmp-step-000010-abc").exists()
    from mtp.models.parallel_heads import MTPModel

    loaded = MTPModel.from_pretrained(latest_checkpoint(tmp_path))
    assert loaded.num_heads == 2
    with pytest.raises(MTPError):
        load_trainer_state(tmp_path / "step-000009")


def test_bad_config() -> None:
    model = tiny_llama(num_heads=2)
    data = make_data()
    for bad in ({"steps": 0}, {"batch_size": 0}, {"lr": -1.0}, {"loss_order": "fast"}, {"precision": "fp8"},
                {"keep_checkpoints": 0}, {"head_weights": [1.0]}):
        with pytest.raises(MTPError):
            Trainer(model, data, cfg(**bad))
    with pytest.raises(MTPError, match="extra heads"):
        Trainer(tiny_llama(num_heads=1), data, cfg(freeze_trunk=True))
    with pytest.raises(MTPError, match="extra head needs a weight"):
        Trainer(model, data, cfg(freeze_trunk=True, head_weights=[1.0, 0.0]))


def _paced(tmp_path, steps, seconds_a_step, stop_at=None, resume=False, minutes=3.0):
    """A run of `steps` at most with a budget of `minutes` on a clock that reads `seconds_a_step` per step done."""
    model = tiny_llama(num_heads=3)
    config = cfg(steps=steps, batch_size=2, save_every=0, warmup_steps=round(0.05 * steps), warmup_share=0.05,
                 minutes=minutes)
    trainer = Trainer(model, make_data(rows=6), config, output_dir=tmp_path)
    if resume:
        trainer.resume_from(latest_checkpoint(tmp_path))
    trainer.clock = lambda: seconds_a_step * trainer.step

    def on_step(tr, m):
        if stop_at is not None and tr.step == stop_at:
            os.kill(os.getpid(), signal.SIGINT)

    trainer.train(on_step=on_step)
    return trainer, params(model)


def test_train_minutes_sets_the_step_count_from_the_pace(tmp_path, capsys) -> None:
    """10 s a step and 3 minutes: steps 1-2 are not timed, and once timed steps took a tenth of the budget (steps
    3-4) the 140 s left take 14 more steps; the warmup follows the count. A budget whose tenth is longer than 8
    timed steps is paced after them (step 10), and a smaller --steps stays the cap."""
    trainer, straight = _paced(tmp_path / "a", 10**9, 10.0)
    assert trainer.step == trainer.config.steps == 18 and trainer.config.warmup_steps == 1
    assert "10 s a step after step 4: 18 steps in about 3 min" in capsys.readouterr().out
    assert load_trainer_state(latest_checkpoint(tmp_path / "a"))["paced"] == {"steps": 18, "warmup_steps": 1}
    trainer, _ = _paced(tmp_path / "b", 12, 10.0, minutes=60.0)
    assert trainer.step == 12 and "10 s a step after step 10: 12 steps" in capsys.readouterr().out
    trainer, _ = _paced(tmp_path / "c", 10**9, 30.0)  # 30 s a step: paced after one timed step
    assert trainer.step == 6
    trainer, _ = _paced(tmp_path / "e", 10**9, 300.0)  # the budget is spent by the first step
    assert trainer.step == 1 and "the budget is spent after step 1: 1 step in" in capsys.readouterr().out
    # Ctrl-C after pacing, resumed on a slower clock: the run keeps the count it was paced to, and its weights
    with pytest.raises(KeyboardInterrupt):
        _paced(tmp_path / "d", 10**9, 10.0, stop_at=14)
    trainer, resumed = _paced(tmp_path / "d", 10**9, 100.0, resume=True)
    assert trainer.step == 18
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_train_minutes_must_be_positive() -> None:
    with pytest.raises(MTPError, match="minutes must be > 0"):
        Trainer(tiny_llama(num_heads=2), make_data(), cfg(minutes=0.0))


def test_evaluations_after_steps_see_the_updated_weights() -> None:
    """A held-out evaluation (no grad: fp32 CPU matmuls over blocked copies of the weights, kept while the weights
    stay the same) sees the optimizer's updates: the fused AdamW step changes the weights without bumping their
    version, and the unembedding's copy from the first evaluation stood in for the trained one ever after."""
    import copy

    from mtp.training.losses import evaluate_heads

    model = tiny_llama(num_heads=2)
    data = make_data()
    trainer = Trainer(model, data, cfg(steps=3, batch_size=4, lr=1e-2), eval_data=data)
    assert trainer.optimizer.defaults.get("fused")  # (the fused kernel: what changed weights unseen)
    trainer.evaluate()  # keeps a copy of the weights made now
    trainer.train()
    fresh = evaluate_heads(copy.deepcopy(model), data, trainer.config.eval_batch_size, trainer.autocast)
    assert trainer.evaluate().head_loss == fresh.head_loss


def test_resuming_a_finished_run_logs_its_final_evaluation_once(tmp_path) -> None:
    """A run killed after its last checkpoint (installing the model) is resumed at its last step: the final
    held-out evaluation it makes again replaces the one the log holds, not a second line for the same step."""
    data = make_data(rows=6)
    _run(tmp_path, "a", 4, eval_data=data)
    _run(tmp_path, "a", 4, eval_data=data, resume=True)  # from step-000004: nothing left to train
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "eval" in x] == [4]
    assert [x["step"] for x in lines if "eval" not in x] == [1, 2, 3, 4]


def test_a_resumed_log_keeps_only_records_of_steps(tmp_path) -> None:
    """metrics.jsonl's lines that are no record of a step (an edit's, another file's) are dropped on resume, as
    lines cut off by a crash are: one without a step was kept as step 0, and the plot failed on it (KeyError)."""
    from mtp.training.loop import MetricsLog
    from mtp.training.plots import plot_losses

    path = tmp_path / "metrics.jsonl"
    step = {"step": 1, "loss": 1.0, "head_loss": [1.0]}
    path.write_text("\n".join(json.dumps(x) for x in [{"a": 1}, [1, 2], 5, {"step": "x"}, step, {"step": 3}]) + "\n")
    MetricsLog(path, resume_step=2).close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [step]
    assert plot_losses(path, tmp_path / "loss.png") is not None
