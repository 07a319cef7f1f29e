"""`mtp train --method selfdistill`: the objective, the teacher, resume, and that it teaches masks to predict."""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import folder_tensors, tiny_llama, train_tokenizer

from mtp.decoding.generate import generate, left_pad
from mtp.errors import MTPError
from mtp.models.mask_tokens import MaskTokenModel, gather_layout, mask_layout
from mtp.models.safetensors_io import SHARD_NAMES
from mtp.training.data import TokenizedData
from mtp.training.loop import TrainConfig
from mtp.training.selfdistill import SelfDistillConfig, SelfDistillTrainer, distill_figures, draw


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture
def hf_folder(tmp_path, tok) -> str:
    model = tiny_llama(vocab_size=len(tok), num_heads=1, tokenizer=tok)
    model.base.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    return str(tmp_path / "hf")


def write_data(path, n: int = 24) -> str:
    records = [{"question": f"Tom has {i} apples and buys {i % 7 + 1}. How many apples does he have?",
                "answer": f"Tom has {i} + {i % 7 + 1} = {i + i % 7 + 1} apples. The answer is {i + i % 7 + 1}."}
               for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_k_is_drawn_per_step_uniformly_and_reproducibly():
    ks = [draw(3, step, 2, 6) for step in range(400)]
    assert ks == [draw(3, step, 2, 6) for step in range(400)]  # a resumed run draws the same
    assert set(ks) == {2, 3, 4, 5, 6}
    assert max(ks.count(v) for v in set(ks)) < 2 * min(ks.count(v) for v in set(ks))
    assert ks != [draw(4, step, 2, 6) for step in range(400)]  # the seed matters


def train_capturing_trainer(monkeypatch, **kwargs) -> tuple[int, dict]:
    """`mtp train` with its SelfDistillTrainer and the teacher's weights at the start kept aside."""
    from mtp.training.commands import train

    captured = {}
    real_init = SelfDistillTrainer.__init__

    def keep(self, *args, **kw):
        real_init(self, *args, **kw)
        captured["trainer"] = self
        captured["teacher"] = {k: v.clone() for k, v in self.teacher.state_dict().items()}

    monkeypatch.setattr(SelfDistillTrainer, "__init__", keep)
    code = train(**kwargs)
    monkeypatch.setattr(SelfDistillTrainer, "__init__", real_init)
    return code, captured


@pytest.mark.parametrize("adapter", ["full", "gated-lora"])
@pytest.mark.parametrize("supervision", ["hard", "soft"])
def test_cli_run_trains_student_and_never_the_teacher(tmp_path, hf_folder, adapter, supervision, monkeypatch):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    code, captured = train_capturing_trainer(
        monkeypatch, output=str(out), model=hf_folder, data=data, method="selfdistill", adapter=adapter,
        supervision=supervision, k_min=2, k_max=4, regions=8, seq_len=64, steps=6, lr=1e-2, holdout=0.2,
        save_every=3, eval_every=3, progress=False, lora_rank=4, prefix_loss=0.5 if adapter == "full" else 0.0)
    assert code == 0
    trainer = captured["trainer"]
    teacher_now = trainer.teacher.state_dict()
    for name, before in captured["teacher"].items():  # the teacher's weights never move
        assert torch.equal(before, teacher_now[name]), name
    trained = MaskTokenModel.from_pretrained(out)
    assert trained.adapter == adapter and trained.mask_token == "<|mtp_mask|>"
    saved = folder_tensors(out)
    base = load_file(os.path.join(hf_folder, "model.safetensors"))
    changed = [n for n in base if not torch.equal(base[n], saved[n][: base[n].shape[0]])]
    if adapter == "gated-lora":  # the base weights are exactly the base model; only the adapters trained
        assert changed == []
        frozen = [out / "checkpoints" / "step-000003", out / "checkpoints" / "step-000006", out]
        assert len({(f / SHARD_NAMES[0]).stat().st_ino for f in frozen}) == 1  # written once, linked
        assert not (out / "model.safetensors").exists()
        assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in saved.items() if n.endswith(".B"))
    else:
        assert "model.layers.0.mlp.up_proj.weight" in changed
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "eval" not in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5, 6]
    for x in steps:  # per offset; offsets past this step's k are None
        k = sum(v is not None for v in x["head_loss"])
        assert 2 <= k <= 4 and len(x["head_loss"]) == 4
    report = json.loads((out / "eval.json").read_text())
    assert [h["predicts"] for h in report["heads"]] == ["t+1", "t+2", "t+3", "t+4"]
    for figures in report["confadapt"].values():  # held-out ConfAdapt estimate per threshold
        share = figures["confident_run_share"]
        assert len(share) == 4 and all(a >= b for a, b in zip(share[:-1], share[1:], strict=True))  # a run only shortens
        assert figures["tokens_per_forward_estimate"] == pytest.approx(1 + sum(share[1:]), abs=1e-3)
    assert report["confadapt"]["0.5"]["tokens_per_forward_estimate"] >= \
        report["confadapt"]["0.9"]["tokens_per_forward_estimate"]
    if adapter == "gated-lora":  # slot 0 is the base model itself: it always agrees with the teacher
        assert report["heads"][0]["top1_accuracy"] == 1.0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000006"]


def test_bf16_run_keeps_its_separate_teacher_in_bf16_and_uses_fused_adamw(tmp_path, hf_folder, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", n=8)
    code, captured = train_capturing_trainer(
        monkeypatch, output=str(tmp_path / "run"), model=hf_folder, data=data, method="selfdistill",
        adapter="full", k_min=2, k_max=3, regions=8, seq_len=64, steps=3, lr=1e-2, holdout=0.0, progress=False,
        autocast="bfloat16")
    assert code == 0
    trainer = captured["trainer"]
    assert trainer.optimizer.defaults["fused"] is True  # one kernel per tensor (CPU, one process)
    base = load_file(os.path.join(hf_folder, "model.safetensors"))
    teacher = trainer.teacher.state_dict()
    assert {t.dtype for t in teacher.values()} == {torch.bfloat16}  # stored as it computes under autocast
    for name, weight in base.items():  # the base model's weights, rounded once; they never move
        assert torch.equal(teacher[name][: weight.shape[0]], weight.to(torch.bfloat16)), name
        assert torch.equal(teacher[name], captured["teacher"][name]), name
    student = trainer.model.base.state_dict()
    assert student["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32  # fp32 master weights train
    assert not torch.equal(student["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_interrupted_run_resumes_exactly(tmp_path, hf_folder, monkeypatch):
    from mtp.training.commands import train

    data = write_data(tmp_path / "d.jsonl", n=12)
    common = {"model": hf_folder, "data": data, "method": "selfdistill", "steps": 5, "seq_len": 64, "regions": 8,
              "k_min": 2, "k_max": 3, "batch_size": 2, "save_every": 2, "progress": False, "lr": 5e-3,
              "holdout": 0.0}
    train(output=str(tmp_path / "a"), **common)
    real_step = SelfDistillTrainer.train_step

    def step_then_ctrl_c(self):
        m = real_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return m

    monkeypatch.setattr(SelfDistillTrainer, "train_step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(output=str(tmp_path / "b"), **common)
    monkeypatch.setattr(SelfDistillTrainer, "train_step", real_step)
    assert train(output=str(tmp_path / "b"), resume=True, progress=False) == 0
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_adapters_on_the_top_layers_only(tmp_path, hf_folder, tok):
    """--lora-layers below the model's depth: inside a mask pass that needs gradients the layers under the
    adapters run without them. They must run the Hugging Face layers (as the layers above do), not the lean
    decoding step, whose rotary tables a forward with gradients never builds (it crashed with KeyError
    'fast_rope'); the gradients of the adapters are then those of the one-forward reference."""
    from mtp.training.commands import train

    model = MaskTokenModel.from_base(tiny_llama(vocab_size=len(tok), num_heads=1).base, adapter="gated-lora",
                                     rank=4, lora_layers=1, tokenizer=tok)
    assert model.lm.fast_decoding == "fp32"  # the lean step is on, as it is for every Llama-family model
    with torch.no_grad():
        for b in model.lora.B.values():
            b.normal_(std=0.3)
    ids = torch.randint(5, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))
    lb = gather_layout(ids, torch.ones_like(ids), mask_layout(4, 3, 5), model.mask_token_id, 1)
    with torch.no_grad():
        real_h, prefix = model.real_pass(lb)  # as distill_figures runs it with gated LoRA
    mask_h = model.mask_pass(lb, prefix)
    grads = torch.autograd.grad(mask_h.square().sum(), list(model.lora.parameters()))
    ref = model.layout_hidden_reference(lb)[:, lb.is_mask]
    torch.testing.assert_close(mask_h, ref, atol=1e-5, rtol=1e-5)
    expected = torch.autograd.grad(ref.square().sum(), list(model.lora.parameters()))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)

    data = write_data(tmp_path / "d.jsonl", n=8)
    assert train(output=str(tmp_path / "run"), model=hf_folder, data=data, method="selfdistill",
                 adapter="gated-lora", lora_layers=1, lora_rank=4, k_min=2, k_max=3, regions=4, seq_len=48, steps=2,
                 lr=1e-2, holdout=0.25, progress=False, device="cpu") == 0
    trained = MaskTokenModel.from_pretrained(tmp_path / "run")
    assert trained.lora.first_layer == 2 and trained.lm.num_layers == 3


def test_the_papers_recipe_runs(tmp_path, hf_folder):
    """Seed 002's recipe at its sizes: full fine-tuning, k drawn from 2..16, 5 regions of 32 real tokens, hard
    targets, AdamW at lr 1e-5 after a warmup, on the model's own answers to as many questions as asked."""
    from mtp.training.commands import train

    out = tmp_path / "run"
    assert train(output=str(out), model=hf_folder, data=write_data(tmp_path / "d.jsonl", n=8), method="selfdistill",
                 adapter="full", k_min=2, k_max=16, regions=5, seq_len=160, supervision="hard", lr=1e-5,
                 warmup_steps=2, targets="self", limit=8, max_new_tokens=8, steps=3, holdout=0.25,
                 progress=False) == 0
    config = json.loads((out / "train_config.json").read_text())["args"]
    assert (config["k_min"], config["k_max"], config["regions"], config["seq_len"]) == (2, 16, 5, 160)
    trained = MaskTokenModel.from_pretrained(out)
    assert trained.lora is None and trained.default_k == 16
    report = json.loads((out / "eval.json").read_text())
    assert len(report["heads"]) == 16 and len(report["confadapt"]["0.9"]["confident_run_share"]) == 16
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines() if "eval" not in x]
    assert lrs[0] == pytest.approx(0.5e-5) and lrs[1] == pytest.approx(1e-5)  # the warmup, then the peak


def test_bad_flags_are_one_line_errors(tmp_path, hf_folder):
    from mtp.training.commands import train

    data = write_data(tmp_path / "d.jsonl", n=6)
    common = {"model": hf_folder, "data": data, "method": "selfdistill", "steps": 1, "progress": False}
    for extra, match in (({"k": 3, "k_min": 2, "k_max": 4}, "not both"), ({"k_min": 2}, "go together"),
                         ({"k_min": 5, "k_max": 3}, "k_min"), ({"regions": 100, "seq_len": 50}, "no real token"),
                         ({"adapter": "gated-lora", "prefix_loss": 1.0}, "prefix-loss"),
                         ({"freeze_trunk": True}, "freeze-trunk")):
        with pytest.raises(MTPError, match=match):
            train(output=str(tmp_path / f"o{len(match)}"), **common, **extra)


def test_idle_regions_change_nothing(tok):
    """Dropping the masks of regions that count nowhere leaves every counted figure as it was."""
    model = MaskTokenModel.from_base(tiny_llama(vocab_size=len(tok), num_heads=1).base, adapter="gated-lora",
                                     rank=4, tokenizer=train_tokenizer())
    with torch.no_grad():
        for b in model.lora.B.values():
            b.normal_()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (3, 40), generator=g)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, 25:] = True  # answers only at the end: the early regions count nowhere
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
    cfg = SelfDistillConfig(k_min=3, k_max=3, regions=8, seq_len=40)
    with torch.no_grad():
        pruned = distill_figures(model, model.base, batch, 3, cfg, 0, need_grad=False)
        cfg_all = SelfDistillConfig(k_min=3, k_max=3, regions=8, seq_len=40, answer_only=False)
        everything = distill_figures(model, model.base, batch, 3, cfg_all, 0, need_grad=False)
    assert pruned.count.tolist() == [9.0, 9.0, 9.0]  # 3 regions x 3 rows end where the next token is an answer
    assert everything.count.tolist() == [24.0, 24.0, 24.0]
    assert 0 < float(pruned.total) and torch.isfinite(pruned.total)


def test_confident_runs_are_what_confadapt_would_emit(tok):
    """`taus`: per threshold and offset j, the counted slots whose student top-1 probabilities at offsets 0..j
    are all >= tau, checked against one plain 4-D-mask forward of the layout; and the estimate built on them."""
    from mtp.models.mask_tokens import gather_layout, mask_layout
    from mtp.training.selfdistill import CONFADAPT_TAUS, confadapt_estimates

    torch.manual_seed(0)
    model = MaskTokenModel.from_base(tiny_llama(vocab_size=len(tok), num_heads=1).base, adapter="full",
                                     tokenizer=train_tokenizer())
    ids = torch.randint(0, 40, (2, 36))  # a small id range: some predictions are confident, some not
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, 12:] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
    cfg = SelfDistillConfig(k_min=3, k_max=3, regions=12, seq_len=36)
    with torch.no_grad():
        lb = gather_layout(ids, batch["attention_mask"], mask_layout(cfg.prefix_len, 3, cfg.regions),
                           model.mask_token_id, 0, loss_mask)
        probs = model.lm_head(model.layout_hidden_reference(lb)).float().softmax(-1)  # (B, S, V)
    top = probs.amax(-1)[:, lb.predict]  # (B, M, k)
    weight = lb.region_weight[:, :, None]  # (B, M, 1)
    # thresholds between the probabilities this random model gives (a random model is nowhere near 0.9)
    values = top[weight.expand_as(top).bool()].sort().values
    mids = [float(values[i] + values[i + 1]) / 2 for i in (len(values) // 4, len(values) // 2, 3 * len(values) // 4)]
    taus = (0.0, *mids, 1.01)
    with torch.no_grad():
        f = distill_figures(model, model.make_teacher(), batch, 3, cfg, 0, need_grad=False, taus=taus)
    for i, tau in enumerate(taus):
        expected = (((top >= tau).long().cumprod(-1)) * weight).sum((0, 1))  # (k,)
        assert f.confident[i].tolist() == expected.tolist(), tau
    assert f.confident[0].tolist() == f.count.tolist()  # tau 0: every slot
    assert f.confident[-1].tolist() == [0.0, 0.0, 0.0]  # above 1: none
    assert 0 < float(f.confident[2, 1]) < float(f.count[1])  # this model is confident at some slots only
    est = confadapt_estimates(torch.tensor([[10.0, 5.0, 2.0], [10.0, 8.0, 8.0], [4.0, 0.0, 0.0]]),
                              torch.tensor([10.0, 10.0, 10.0]))
    assert list(est) == [f"{t:g}" for t in CONFADAPT_TAUS]
    assert est["0.9"] == {"confident_run_share": [1.0, 0.5, 0.2], "tokens_per_forward_estimate": 1.7}
    assert est["0.7"]["tokens_per_forward_estimate"] == 2.6 and est["0.5"]["tokens_per_forward_estimate"] == 1.0


def test_entropy_loss_adds_the_students_mean_entropy_and_lowers_it(tok):
    """`entropy_loss` w: the objective grows by w x the student's mean entropy over the counted prediction slots
    (checked against a 4-D-mask forward), and a gradient step on that term alone makes the student sharper."""
    from mtp.models.mask_tokens import gather_layout, mask_layout

    torch.manual_seed(1)
    model = MaskTokenModel.from_base(tiny_llama(vocab_size=len(tok), num_heads=1).base, adapter="full",
                                     tokenizer=train_tokenizer())
    teacher = model.make_teacher()
    ids = torch.randint(0, 200, (2, 36))
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, 10:] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
    plain = SelfDistillConfig(k_min=3, k_max=3, regions=12, seq_len=36)
    sharp = SelfDistillConfig(k_min=3, k_max=3, regions=12, seq_len=36, entropy_loss=0.5)
    lb = gather_layout(ids, batch["attention_mask"], mask_layout(plain.prefix_len, 3, plain.regions),
                       model.mask_token_id, 0, loss_mask)
    weight = lb.region_weight[:, :, None].expand(-1, -1, 3)  # (B, M, k)

    def mean_entropy() -> torch.Tensor:
        logp = model.lm_head(model.layout_hidden_reference(lb)).float().log_softmax(-1)[:, lb.predict]  # (B,M,k,V)
        return (-(logp.exp() * logp).sum(-1) * weight).sum() / weight.sum()

    with torch.no_grad():
        before = float(mean_entropy())
        base_total = float(distill_figures(model, teacher, batch, 3, plain, 0, need_grad=True).total)
    extra = distill_figures(model, teacher, batch, 3, sharp, 0, need_grad=True).total - base_total
    assert float(extra.detach()) == pytest.approx(0.5 * before, rel=1e-4)
    extra.backward()
    with torch.no_grad():
        for p in model.base.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
        assert float(mean_entropy()) < before  # (a sign error would raise it)
    with pytest.raises(MTPError, match="entropy-loss"):
        SelfDistillConfig(entropy_loss=-1.0).validate()


def counting_rows(vocab: int, n: int, length: int, seed: int) -> TokenizedData:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    ids = (start + torch.arange(length)[None]) % vocab  # (n, length): 7 8 9 10 ...
    return TokenizedData.from_dense(ids, torch.ones_like(ids, dtype=torch.bool), torch.ones_like(ids))


@pytest.fixture(scope="module")
def counting_base():
    """A tiny model that learned to count (plain next-token training) and the torch RNG state after that: trained
    once, each adapter's test starts from a copy and that state."""
    torch.manual_seed(0)
    base = tiny_llama(vocab_size=24, num_heads=1, num_layers=3).base.train()
    data = counting_rows(24, 64, 24, seed=0)
    opt = torch.optim.AdamW(base.parameters(), lr=1e-2)
    for _ in range(150):
        rows = torch.randint(0, 64, (16,))
        loss = base(data.input_ids[rows], labels=data.input_ids[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return base.eval(), torch.get_rng_state()


@pytest.mark.parametrize("adapter", ["full", "gated-lora"])
def test_masks_learn_to_count(adapter, counting_base):
    """A tiny model first learns to count (plain next-token training); self-distillation then teaches its mask
    token the next tokens too, so ConfAdapt emits several tokens per forward and speculative decoding accepts
    drafts, still equal to greedy."""
    vocab = 24
    base = copy.deepcopy(counting_base[0])  # (the full adapter trains these weights)
    torch.set_rng_state(counting_base[1])
    data = counting_rows(vocab, 64, 24, seed=0)
    model = MaskTokenModel.from_base(base, adapter=adapter, rank=8, k=4)
    assert model.default_k == 4
    config = TrainConfig(steps=300, batch_size=8, lr=3e-3 if adapter == "gated-lora" else 1e-3, warmup_steps=5,
                         progress=False, seed=0)
    # k drawn from 2..4: the k=2 steps give the first mask a clean target (the teacher after the student's own,
    # correct, next token), which bootstraps the later masks; a fixed k=4 from scratch locks into constants here
    distill = SelfDistillConfig(k_min=2, k_max=4, regions=6, seq_len=24)
    trainer = SelfDistillTrainer(model, data, config, distill, eval_data=counting_rows(vocab, 8, 24, seed=1))
    result = trainer.train()
    assert result.evaluation.head_accuracy[1] > 0.9  # the first mask agrees with the teacher
    model.eval()
    prompts = [[3, 4, 5], [10, 11, 12, 13], [20]]
    ids, mask = left_pad(prompts)
    greedy = generate(model, ids, mask, max_new_tokens=16, stop_token_ids=[])
    conf = generate(model, ids, mask, max_new_tokens=16, strategy="confadapt", tau=0.9, stop_token_ids=[])
    # (the speculation gate off: this batch's timing would decide how many steps verify)
    spec = generate(model, ids, mask, max_new_tokens=16, strategy="speculative", stop_token_ids=[],
                    adaptive_draft=False)
    assert conf.stats.tokens_per_forward > 2.0
    assert spec.tokens == greedy.tokens and spec.stats.tokens_per_forward > 2.0
    same = sum(a == b for c, g in zip(conf.tokens, greedy.tokens, strict=True) for a, b in zip(c, g, strict=True))
    assert same >= 0.8 * 48  # ConfAdapt is lossy, but on counting its confident runs are mostly right


def test_a_nan_loss_stops_self_distillation_before_its_update() -> None:
    """The step's figures come back in one copy; a NaN among them stops the run with the step named and nothing of
    that step applied: no optimizer update, no gradients left behind."""
    from mtp.training.loop import NonFiniteLossError

    vocab = 24
    model = MaskTokenModel.from_base(tiny_llama(vocab_size=vocab, num_heads=1, num_layers=2).base, adapter="full",
                                     k=3)
    trainer = SelfDistillTrainer(model, counting_rows(vocab, 16, 16, seed=0),
                                 TrainConfig(steps=4, batch_size=4, lr=1e-3, progress=False, seed=0),
                                 SelfDistillConfig(k_min=2, k_max=3, regions=3, seq_len=16))
    trainer.train_step()
    norm = model.base.model.norm.weight  # the student's final norm (the teacher is a copy)
    with torch.no_grad():
        norm[0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p is not norm}
    with pytest.raises(NonFiniteLossError, match="step 2: the loss is nan"):
        trainer.train_step()
    assert trainer.step == 1
    for n, p in model.named_parameters():
        assert p.grad is None, n
        if p is not norm:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("supervision", ["hard", "soft"])
def test_objective_is_the_papers_on_one_plain_forward(supervision):
    """The objective against the paper's statement, written out on one 4-D-mask forward per model: the student's
    argmax at slot j is written into mask j+1 (its guess, not the data's token), the frozen teacher scores the
    filled layout once, and the loss is the plain mean over the slots of the CE to the teacher's argmax (hard) or
    of KL(teacher || student) (soft). Loss and gradients match; the guesses differ from the data here, so writing
    the data's tokens into the masks, or a reversed KL, would fail."""
    from mtp.models.cache import additive_mask

    torch.manual_seed(0)
    vocab, k, offset = 60, 4, 2
    model = MaskTokenModel.from_base(tiny_llama(vocab_size=vocab, num_heads=1).base, adapter="full", k=k)
    teacher = model.make_teacher()
    with torch.no_grad():  # a student that has moved away from its teacher
        for p in model.base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, vocab, (2, 36))  # longer than offset + seq_len: every region counts
    ones = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}
    cfg = SelfDistillConfig(k_min=k, k_max=k, regions=3, seq_len=30, supervision=supervision, answer_only=False)
    ours = distill_figures(model, teacher, batch, k, cfg, offset, need_grad=True).total

    lb = gather_layout(ids, ones, mask_layout(cfg.prefix_len, k, cfg.regions), model.mask_token_id, offset)
    student = model.lm_head(model.layout_hidden_reference(lb))[:, lb.predict].float()  # (B, M, k, V)
    filled = lb.input_ids.clone()
    filled[:, lb.predict[:, 1:].flatten()] = student.argmax(-1)[:, :, :-1].flatten(1)
    # the data's tokens that the masks stand for: k-1 after each region's last real token
    last = (lb.layout.source + offset)[lb.predict[:, 0]]  # (M,) row index of each region's last real token
    data = ids[:, (last[:, None] + torch.arange(1, k)).clamp_max(ids.shape[1] - 1)]  # (B, M, k-1)
    assert not torch.equal(filled[:, lb.predict[:, 1:]], data)  # the guesses are not the data's tokens
    with torch.no_grad():
        hidden = teacher.base_model(input_ids=filled, attention_mask=additive_mask(lb.attention, torch.float32),
                                    position_ids=lb.position_ids).last_hidden_state
        t_logits = model.without_mask_token(teacher.lm_head(hidden))[:, lb.predict].float()
    log_probs = student.log_softmax(-1)
    if supervision == "hard":
        per_slot = -log_probs.gather(-1, t_logits.argmax(-1, keepdim=True)).squeeze(-1)
    else:
        t_log = t_logits.log_softmax(-1)
        per_slot = (t_log.exp() * (t_log - log_probs)).sum(-1)
    assert bool(lb.region_weight.all())
    reference = per_slot.mean()  # every region counts here: the plain mean over all slots
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-5, abs=1e-7)
    params = list(model.base.parameters())
    for a, b in zip(torch.autograd.grad(ours, params, allow_unused=True),
                    torch.autograd.grad(reference, params, allow_unused=True), strict=True):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_seq_len_counts_real_tokens_not_the_papers_slots():
    """mtp's --seq-len is the row's real tokens: a region holds seq_len / regions of them for every k, and the
    masks come on top (the paper's S counts them: P = S/M - (k-1)); docs/training.md states the difference."""
    for k in (2, 8, 16):
        cfg = SelfDistillConfig(k_min=k, k_max=k, regions=5, seq_len=160)
        lay = mask_layout(cfg.prefix_len, k, cfg.regions)
        assert cfg.prefix_len == 32
        assert int((~lay.is_mask).sum()) == 160 and lay.is_mask.numel() == 160 + 5 * (k - 1)


def test_the_position_shift_stays_within_a_learned_position_table(tmp_path, monkeypatch, capsys):
    """GPT-2's positions are a table (128 rows here): --seq-len 96 with k 3 fits it, but a step's random shift of
    the positions (up to a region's 48 tokens) took real slots past it, an IndexError at some step. The shift is
    kept within the table: 128 - (96 + 2) = 30 at most, every step trains."""
    from training_helpers import tiny_gpt2

    from mtp.cli import main

    calls = []
    real = draw

    def recorded(seed, step, low, high):
        calls.append(high)
        return real(seed, step, low, high)

    monkeypatch.setattr("mtp.training.selfdistill.draw", recorded)
    tok = train_tokenizer()
    gpt2 = tiny_gpt2(vocab_size=len(tok), num_heads=1)
    gpt2.base.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": "one two three " * (i + 4), "answer": "four five " * (i + 4)})
                            + "\n" for i in range(6)))
    with pytest.raises(SystemExit) as done:
        main(["train", "--model", str(tmp_path / "gpt2"), "--data", str(data), "--output", str(tmp_path / "run"),
              "--method", "selfdistill", "--seq-len", "96", "--regions", "2", "--k", "3", "--pack", "--holdout", "0",
              "--batch-size", "1", "--steps", "6", "--no-progress"])
    assert done.value.code in (0, None), capsys.readouterr().err
    assert 30 in calls and max(calls) == 30  # (the step's k is drawn too: a fixed k 3 draws from [3, 3])
