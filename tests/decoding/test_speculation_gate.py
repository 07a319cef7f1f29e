"""The speculation gate: a batch takes plain one-token steps where they emit tokens faster than verify blocks do,
and stays exact either way."""

from __future__ import annotations

import random

import pytest
import torch
from test_generate import oracle_proposer
from test_mask_decoding import mask_model

from conftest import tiny_mtp
from mtp.decoding import generate as generate_module
from mtp.decoding.generate import SpeculationGate, generate, left_pad
from mtp.decoding.reference import reference_greedy
from mtp.decoding.step import Decoder


def run_gate(gate: SpeculationGate, steps: int, seconds, tokens, batch=lambda i: 2) -> list[bool]:
    """A decoding loop's calls on `gate` (launch, then read) for `steps` steps after a prompt; a step speculating
    or not takes seconds(speculating, i) and emits tokens(speculating); batch(i) rows. Returns which steps
    speculated."""
    now = [0.0]
    gate.clock = lambda: now[0]
    gate.launched(("prompt",))
    now[0] += 1.0
    gate.read(False, 2)
    chosen = []
    for i in range(steps):
        n, m = gate.block(3, 2, batch(i))
        speculating = (n, m) == (3, 2)
        assert speculating or (n, m) == (0, 0)
        gate.launched((batch(i), n, m))
        now[0] += seconds(speculating, i)
        gate.read(speculating, tokens(speculating))
        chosen.append(speculating)
    return chosen


def test_the_gate_times_each_kind_then_keeps_the_faster_and_probes_the_slower_ever_more_rarely():
    # verify blocks: 6 tokens in 4 s; plain steps: 2 tokens in 1 s (faster)
    chosen = run_gate(SpeculationGate(True, probe_every=4), 200, lambda spec, i: 4.0 if spec else 1.0,
                      lambda spec: 6 if spec else 2)
    # speculating first, timed from its second step (the first of a configuration is not), then plain likewise
    assert chosen[:4] == [True, True, False, False]
    probes = [i for i, c in enumerate(chosen) if c and i >= 4]
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] == SpeculationGate.MAX_INTERVAL + 1  # backs off, to a limit
    assert gaps[0] == 2 * 4 + 1  # the first probe confirmed plain steps: twice as long to the next
    assert sum(chosen) < 15  # 200 steps, nearly all plain

    # the other way round: verify blocks faster; plain steps are the probes
    chosen = run_gate(SpeculationGate(True, probe_every=4), 100, lambda spec, i: 1.5 if spec else 1.0,
                      lambda spec: 6 if spec else 2)
    assert chosen[:4] == [True, True, False, False] and sum(not c for c in chosen) < 10


def test_the_gate_follows_a_change_in_speed_and_leaves_untimed_steps_out():
    # plain steps faster for 60 steps, then verify blocks become cheap
    chosen = run_gate(SpeculationGate(True, probe_every=4), 200,
                      lambda spec, i: (4.0 if i < 60 else 1.0) if spec else 1.0, lambda spec: 6 if spec else 2)
    assert not any(chosen[20:60]) or sum(chosen[20:60]) <= 2
    assert all(chosen[140:190]) or sum(chosen[140:190]) >= 45  # found again within one probe interval (<= 65)

    gate = SpeculationGate(True)
    run_gate(gate, 10, lambda spec, i: 1.0, lambda spec: 2)
    before = dict(gate.speed)
    gate.launched((7, 3, 2))  # a new configuration (another batch size): its interval and its own read untimed
    gate.clock = lambda: 1e9
    gate.read(True, 2)
    assert gate.speed == before

    # a batch of 16 (plain steps faster), which shrinks to 8 and then 4 after 40 and 80 steps: measured again
    # at 8 and at 4 (both kinds, verify blocks first); at 4 verify blocks are faster
    chosen = run_gate(SpeculationGate(True, probe_every=4), 120, lambda spec, i: (4.0 if i < 80 else 1.5) if spec
                      else 1.0, lambda spec: 6 if spec else 2, batch=lambda i: 16 if i < 40 else 8 if i < 80 else 4)
    assert chosen[40:44] == [True, True, False, False] and chosen[80:82] == [True, True]
    assert sum(chosen[90:]) >= 28

    off = SpeculationGate(False)
    assert [off.block(3, 2, 4) for _ in range(5)] == [(3, 2)] * 5


def timed_steps(monkeypatch, seconds):
    """Decoder steps advance a fake clock the gate reads by seconds(n, m, step index)."""
    now, calls = [0.0], [0]
    step = Decoder.step

    def timed(self, state, n, m):
        now[0] += seconds(n, m, calls[0])
        calls[0] += 1
        return step(self, state, n, m)

    monkeypatch.setattr(Decoder, "step", timed)
    monkeypatch.setattr(generate_module.SpeculationGate, "clock", staticmethod(lambda: now[0]))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("verify_cost, plain_wins", [(50.0, True), (0.0, False)])
def test_a_batch_takes_plain_steps_where_verifying_is_slower(monkeypatch, family, verify_cost, plain_wins):
    model = tiny_mtp(family, num_heads=4, dtype=torch.float64)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    reference = [reference_greedy(model, p, 40) for p in prompts]
    timed_steps(monkeypatch, lambda n, m, i: 1.0 + verify_cost * (n + m))  # a draft costs verify_cost
    ids, mask = left_pad(prompts)
    out = generate(model, ids, mask, max_new_tokens=40, strategy="speculative", stop_token_ids=[],
                   proposer=oracle_proposer(reference, 0.2, 0))
    assert out.tokens == reference
    steps = out.stats.forward_passes - 1  # (the prompt's step is neither kind)
    if plain_wins:
        assert out.stats.plain_steps >= 0.7 * steps
    else:
        assert out.stats.plain_steps <= 3 and out.stats.tokens_per_forward > 2.0
    # one prompt on a CPU is left to the draft length: no plain steps
    one = generate(model, ids[:1], mask[:1], max_new_tokens=40, strategy="speculative", stop_token_ids=[],
                   proposer=oracle_proposer(reference[:1], 0.2, 0))
    assert one.tokens == reference[:1] and one.stats.plain_steps == 0


@pytest.mark.parametrize("drafter", ["chain", "tree", "dynamic", "lookup", "tree+lookup", "masks", "sampling"])
def test_switching_between_plain_steps_and_verify_blocks_stays_exact(monkeypatch, drafter):
    """Step times drawn at random flip the gate's choice often: every kind of drafter resumes after plain steps
    with the drafts a plain step proposed, and the output stays greedy's (sampling: the seed's own)."""
    rng = random.Random(drafter)
    timed_steps(monkeypatch, lambda n, m, i: rng.choice([0.2, 1.0, 5.0]) * (1 + n + m))
    prompts = [[1, 2, 3, 1, 2], [4, 5], [6, 7, 8, 9, 6, 7]]
    ids, mask = left_pad(prompts)
    kw: dict = {}
    if drafter == "masks":
        model = mask_model("llama", "full", 3, 32)
    else:
        model = tiny_mtp("llama", num_heads=4, dtype=torch.float64, vocab_size=32)
        kw = {"tree": {"tree": "auto", "dynamic": "dynamic", "tree+lookup": "auto"}.get(drafter),
              "tree_size": 4 if drafter in ("tree", "dynamic", "tree+lookup") else None,
              "lookup": 3 if "lookup" in drafter else 0}
    if drafter == "sampling":
        kw = {"do_sample": True, "seed": 11, "top_k": 8}
        reference = None
    else:
        reference = [reference_greedy(model, p, 30) for p in prompts]
    out = generate(model, ids, mask, max_new_tokens=30, strategy="speculative", stop_token_ids=[], **kw)
    assert out.stats.plain_steps > 0 and out.stats.draft_positions[0] > 0  # both kinds of step ran
    if drafter != "sampling":
        assert out.tokens == reference
    else:  # a plain step draws from the model as a verify block does; the draws themselves differ
        assert [len(t) for t in out.tokens] == [30] * 3


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [{}, {"tree": "auto", "tree_size": 4, "lookup": 3}], ids=["chain", "tree+lookup"])
def test_cuda_speculation_gate_switches_between_captured_steps(monkeypatch, kw):
    """Replayed graphs: a batch of 8 (verify blocks of more than 32 rows) under a clock whose intervals are drawn
    at random switches between captured plain steps and captured verify blocks, in fp32 equal to greedy."""
    rng = random.Random(5)
    now = [0.0]

    def clock() -> float:
        now[0] += rng.choice([0.01, 1.0, 100.0])
        return now[0]

    monkeypatch.setattr(generate_module.SpeculationGate, "clock", staticmethod(clock))
    model = tiny_mtp("llama", num_heads=4, seed=3, vocab_size=40).to("cuda")
    prompts = [[1 + i, 2, 3 + i % 3, 4][: 1 + i % 4] for i in range(8)]
    ids, mask = left_pad(prompts)
    ids, mask = ids.cuda(), mask.cuda()
    greedy = generate(model, ids, mask, max_new_tokens=40, stop_token_ids=[], graphs=True)
    spec = generate(model, ids, mask, max_new_tokens=40, stop_token_ids=[], graphs=True, strategy="speculative",
                    **kw)
    assert spec.tokens == greedy.tokens
    assert spec.stats.plain_steps > 0 and spec.stats.draft_positions[0] > 0
