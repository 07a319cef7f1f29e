"""The speculation gate: a batch takes plain one-token steps where they emit tokens faster than verify blocks do,
and stays exact either way."""

from __future__ import annotations

import random

import pytest
import torch
from test_generate import oracle_proposer
from test_mask_decoding import mask_model

from conftest import reading_next_token, tiny_mtp
from mtp.decoding import generate as generate_module
from mtp.decoding.blocks import Block, SpeculationGate, gate_records
from mtp.decoding.corpus import LookupCorpus
from mtp.decoding.drafters import drafter_for
from mtp.decoding.generate import generate, left_pad
from mtp.decoding.reference import reference_greedy
from mtp.decoding.step import DecodeOptions, Decoder
from mtp.models import fast_llama


def run_gate(gate: SpeculationGate, steps: int, seconds, tokens, batch=lambda i: 2) -> str:
    """A decoding loop's calls on `gate` (launch, then read) for `steps` steps after a prompt; a step verifying
    drafts or not takes seconds(verifying, i) and emits tokens(verifying); batch(i) rows. Returns the steps'
    kinds: V verified drafts, P a plain step that drafted nothing, C a plain step that drafted (catching the
    heads up on the P steps before it: their count is checked)."""
    now = [0.0]
    gate.clock = lambda: now[0]
    gate.launched(("prompt", Block(0, 0)))
    now[0] += 1.0
    gate.read(False, 2)
    kinds, plain = [], 0
    for i in range(steps):
        block = gate.block(3, 2, batch(i))
        verifying = block.n > 0
        if verifying:
            assert block == Block(3, 2) and kinds[-1:] != ["P"]  # drafts come from a step that drafted
            kinds.append("V")
        elif block.drafting:
            assert block.catch_up == plain and plain > 0
            kinds.append("C")
        else:
            assert block == Block(0, 0, False)
            kinds.append("P")
        plain = plain + 1 if kinds[-1] == "P" else 0
        gate.launched((batch(i), block))
        now[0] += seconds(verifying, i)
        gate.read(verifying, tokens(verifying))
    return "".join(kinds)


def test_the_gate_times_each_kind_then_keeps_the_faster_and_probes_the_slower_ever_more_rarely():
    # verify blocks: 6 tokens in 4 s; plain steps: 2 tokens in 1 s (faster)
    kinds = run_gate(SpeculationGate(True, probe_every=4), 200, lambda spec, i: 4.0 if spec else 1.0,
                     lambda spec: 6 if spec else 2)
    # verifying first, timed from its second step (the first of a configuration is not), then plain steps likewise
    assert kinds.startswith("VVPPPPPPCVPPPPPPPPCV")  # 4 plain steps more, then a probe; then 8 (it lost again)
    probes = [i for i, k in enumerate(kinds) if k == "C"]
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps == [10, 18, 34, 66] == [2 + 4 * 2 ** i for i in range(1, 5)]  # backs off to MAX_INTERVAL
    assert SpeculationGate.MAX_INTERVAL == 64 and kinds.count("V") == 7

    # the other way round: verify blocks faster; plain steps are the probes
    kinds = run_gate(SpeculationGate(True, probe_every=4), 100, lambda spec, i: 1.5 if spec else 1.0,
                     lambda spec: 6 if spec else 2)
    assert kinds.startswith("VVPPCVVVV") and kinds.count("P") == 6


def test_calls_that_differ_in_nothing_a_step_costs_share_the_gates_records():
    """A temperature or a budget costs a step nothing more; a lookup corpus counts by its contents (the options
    were deep-copied into the key, corpus and all: a call with one never found the records it left)."""
    import dataclasses

    model = tiny_mtp("llama", num_heads=2)
    opts = DecodeOptions("speculative", lookup=4, lookup_corpus=LookupCorpus.build([[1, 2, 3]] * 2))
    records = gate_records(model, opts, "cpu")
    same = dataclasses.replace(opts, temperature=0.5, max_new_tokens=7,
                               lookup_corpus=LookupCorpus.build([[1, 2, 3]] * 2))
    assert gate_records(model, same, "cpu") is records
    assert gate_records(model, dataclasses.replace(opts, lookup_corpus=None), "cpu") is not records
    assert gate_records(model, opts, "cuda") is not records


def test_the_gate_follows_a_change_in_speed_and_leaves_untimed_steps_out():
    # plain steps faster for 60 steps, then verify blocks become cheap: found at the next probe (<= 66 steps)
    kinds = run_gate(SpeculationGate(True, probe_every=4), 200,
                     lambda spec, i: (4.0 if i < 60 else 1.0) if spec else 1.0, lambda spec: 6 if spec else 2)
    assert kinds[20:60].count("V") <= 2 and kinds[140:190].count("V") >= 45

    gate = SpeculationGate(True)
    run_gate(gate, 10, lambda spec, i: 1.0, lambda spec: 2)
    before = dict(gate.speed)
    gate.launched((7, Block(3, 2)))  # a new configuration (another batch size): its interval and its read untimed
    gate.clock = lambda: 1e9
    gate.read(True, 2)
    assert gate.speed == before

    # a batch of 16 (plain steps faster), which shrinks to 8 and then 4 after 40 and 80 steps: measured again
    # at 8 and at 4 (both kinds, verify blocks first); at 4 verify blocks are faster
    kinds = run_gate(SpeculationGate(True, probe_every=4), 120, lambda spec, i: (4.0 if i < 80 else 1.5) if spec
                     else 1.0, lambda spec: 6 if spec else 2, batch=lambda i: 16 if i < 40 else 8 if i < 80 else 4)
    assert kinds[40:50] == "CVVPPPPPPC" and kinds[80:90] == "CVVPPCVVVV"

    # plain steps leave the heads out of at most CAPACITY positions before one step catches up
    small = SpeculationGate(True)
    small.CAPACITY = 5
    kinds = run_gate(small, 100, lambda spec, i: 100.0 if spec else 1.0, lambda spec: 6 if spec else 2)
    assert max(len(run) for run in kinds.replace("V", "C").split("C")) == 5 and "PPPPPCPPPPPC" in kinds

    # a verify step that emits little (a lookup miss) does not flip a winning kind at once: token counts average
    # slower than step times
    verified = []

    def tokens(spec: bool) -> int:  # the 15th verify step emits 1 token, the others 6
        verified.append(spec)
        return (1 if sum(verified) == 15 else 6) if spec else 2

    kinds = run_gate(SpeculationGate(True, probe_every=4), 60, lambda spec, i: 2.2 if spec else 1.0,
                     lambda spec: 6 if spec else 2)
    unlucky = run_gate(SpeculationGate(True, probe_every=4), 60, lambda spec, i: 2.2 if spec else 1.0, tokens)
    assert unlucky == kinds and kinds.count("P") < 8

    off = SpeculationGate(False)
    assert [off.block(3, 2, 4) for _ in range(5)] == [Block(3, 2)] * 5


@pytest.mark.parametrize("family, fused", [("llama", False), ("llama", True), ("gpt2", False)],
                         ids=["llama", "llama-gpu-path", "gpt2"])
@pytest.mark.parametrize("reads_next", [False, True], ids=["", "next-token-input"])
def test_catching_up_gives_the_heads_what_running_them_every_step_gives(monkeypatch, family, fused, reads_next):
    """Plain steps that leave the extra heads out, then one step that catches them up (as wide as the positions
    left out, eagerly, or as the whole buffer, replaying): the heads' keys and values at every position and the
    drafts after it are those of running the heads in every step."""
    if fused:  # the GPU's path: fused layers, the extra heads as one stacked layer
        monkeypatch.setattr(fast_llama, "FUSED_DEVICES", {"cpu"})
    catch_up_equals_every_step(tiny_mtp(family, num_heads=4, seed=2, dtype=torch.float64, vocab_size=48),
                               reads_next, static=fused, tolerance=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("reads_next", [False, True], ids=["", "next-token-input"])
def test_cuda_catching_up_gives_the_heads_what_running_them_every_step_gives(reads_next):
    """The same on a GPU's kernels (fused layers, the stacked heads, a static cache), fp32."""
    catch_up_equals_every_step(tiny_mtp("llama", num_heads=4, seed=2, vocab_size=48).to("cuda"), reads_next,
                               static=True, tolerance=1e-4)


def catch_up_equals_every_step(model, reads_next: bool, static: bool, tolerance: float) -> None:
    if reads_next:
        reading_next_token(model, seed=3)
    device = model.device
    ids, mask = left_pad([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]])
    ids, mask = ids.to(device), mask.to(device)
    opts = DecodeOptions("speculative", max_new_tokens=40)
    plain = 6

    def run(deferred: int, steps: list[tuple[bool, int]]):
        drafter = drafter_for(model, opts)
        cache = drafter.new_cache(3, 64, static=static)
        decoder = Decoder(drafter, opts, cache, torch.tensor([], dtype=torch.long, device=device), None, False,
                          deferred)
        prompt = generate_module._prompt_state(ids, mask, [opts.max_new_tokens] * ids.shape[0], 0)
        state, _ = decoder.step(prompt, 0, 0)
        for drafting, catch_up in steps:
            state, _ = decoder.step(state, 0, 0, drafting, catch_up)
        return state, cache

    every, full = run(0, [(True, 0)] * (plain + 1))
    for width in (plain, 10):
        caught, cache = run(10, [(False, 0)] * plain + [(True, width)])
        assert torch.equal(caught.pending, every.pending) and torch.equal(caught.drafts, every.drafts)
        assert caught.deferred_count.tolist() == [0, 0, 0]
        assert torch.equal(cache.length, full.length) and torch.equal(cache.valid, full.valid)
        held = (cache.valid & (torch.arange(64, device=device) < cache.length[:, None]))[None, :, None, :, None]
        for mine, theirs in zip(cache.stacks, full.stacks, strict=True):  # trunk, head 0, the extra heads
            for a, b in zip(mine.buffers(), theirs.buffers(), strict=True):
                torch.testing.assert_close(a * held, b * held, rtol=tolerance, atol=tolerance)
    # and without catching up the heads' keys differ (what the comparison above would see)
    skipped, cache = run(10, [(False, 0)] * plain + [(True, 0)])
    extra = [t for stack in cache.stacks[2:] for t in stack.buffers()]
    assert not all(torch.allclose(a, b) for a, b in zip(extra, [t for s in full.stacks[2:] for t in s.buffers()],
                                                         strict=True))


def timed_steps(monkeypatch, seconds):
    """Decoder steps advance a fake clock the gate reads by seconds(n, m, step index)."""
    now, calls = [0.0], [0]
    step = Decoder.step

    def timed(self, state, n, m, drafting=True, catch_up=0):
        now[0] += seconds(n, m, calls[0])
        calls[0] += 1
        return step(self, state, n, m, drafting, catch_up)

    monkeypatch.setattr(Decoder, "step", timed)
    monkeypatch.setattr(generate_module.SpeculationGate, "clock", staticmethod(lambda: now[0]))


def test_a_batch_that_prompts_join_is_gated_once_it_holds_two_rows(monkeypatch):
    """A batch that prompts may join (a server's) has the gate from its start, while its one row on a CPU verifies
    as a lone prompt does; once a prompt joined, it takes plain steps where they are faster. Lossless throughout."""
    from mtp.decoding.generate import Admission

    model = tiny_mtp("llama", num_heads=4, dtype=torch.float64)
    reference = [reference_greedy(model, p, 40) for p in ([1, 2, 3], [4, 5])]
    timed_steps(monkeypatch, lambda n, m, i: 1.0 + 50.0 * (n + m))  # verifying is slower
    seen = []
    step = Decoder.step

    def recorded(self, state, n, m, drafting=True, catch_up=0):
        seen.append((state.pending.shape[0], n, drafting))
        return step(self, state, n, m, drafting, catch_up)

    monkeypatch.setattr(Decoder, "step", recorded)
    reads = [0]

    def take(active, fits):
        reads[0] += 1
        return [([4, 5], 40)] if reads[0] == 6 else []

    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=40, strategy="speculative", stop_token_ids=[],
                   admit=Admission(take, max_rows=4), num_draft=3)
    assert out.tokens == reference
    alone = [(n, drafting) for rows, n, drafting in seen[1:6]]  # (after the prompt's step, before the join)
    assert all(n > 0 for n, _ in alone)
    together = [(n, drafting) for rows, n, drafting in seen if rows == 2]
    assert sum(n == 0 and not drafting for n, drafting in together) >= 0.5 * len(together)


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
        # a later call starts from what this one measured: plain steps at once, one probe at most
        again = generate(model, ids, mask, max_new_tokens=40, strategy="speculative", stop_token_ids=[],
                         proposer=oracle_proposer(reference, 0.2, 0))
        assert again.tokens == reference
        assert again.stats.forward_passes - 1 - again.stats.plain_steps <= 1 < steps - out.stats.plain_steps
    else:
        assert out.stats.plain_steps <= 6 and out.stats.tokens_per_forward > 2.0  # the first ones and a probe
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


def test_a_seed_reproduces_sampled_tokens_without_the_timed_gate(monkeypatch):
    """A batch's sampled draws follow the steps the timed gate picks; with adaptive_draft=False it picks none,
    and a seed gives the same tokens however the steps were timed."""
    rng = random.Random(5)
    timed_steps(monkeypatch, lambda n, m, i: rng.choice([0.2, 1.0, 5.0]) * (1 + n + m))
    model = tiny_mtp("llama", num_heads=4, dtype=torch.float64, vocab_size=32)
    ids, mask = left_pad([[1, 2, 3, 1, 2], [4, 5], [6, 7, 8, 9, 6, 7]])
    kw = dict(max_new_tokens=30, strategy="speculative", stop_token_ids=[], do_sample=True, seed=11, top_k=8,
              adaptive_draft=False)
    first, second = generate(model, ids, mask, **kw), generate(model, ids, mask, **kw)
    assert first.tokens == second.tokens and first.stats.plain_steps == second.stats.plain_steps == 0


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
