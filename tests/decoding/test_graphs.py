"""The replayed decoding step: sessions, shrinking batches, one traced graph per step, CUDA graphs on a GPU.

On a CPU the replay machinery runs with its stand-in for a capture (the same in-place step run again on the same
buffers), so everything but the capture itself is checked in CI; the tests marked `cuda` capture real graphs.
"""

from __future__ import annotations

import copy
import gc
import re
import warnings
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mask_decoding import mask_model
from test_tree import random_tree

import mtp.decoding.generate as generate_module
from conftest import reading_next_token, tiny_mtp
from mtp.decoding.corpus import LookupCorpus
from mtp.decoding.drafters import drafter_for
from mtp.decoding.generate import _prompt_state, _rows_to_keep, generate, left_pad
from mtp.decoding.reference import reference_greedy
from mtp.decoding.step import DecodeOptions, Decoder
from mtp.decoding.stopping import StopChecker
from mtp.decoding.tree import DynamicTree
from mtp.errors import MTPError

LOSSLESS = ("greedy", "speculative")


@pytest.fixture
def replayed(monkeypatch):
    """generate(..., graphs=True) on a CPU: the replay path with its stand-in for a capture."""
    monkeypatch.setattr(generate_module, "_use_graphs", lambda graphs, device, proposer: bool(graphs))


def decoding_case(draw, model_kind: str):
    """A random tiny model and decoding options that apply to it."""
    vocab = draw(st.integers(8, 40))
    seed = draw(st.integers(0, 10_000))
    strategy = draw(st.sampled_from(["greedy", "speculative", "speculative", "confadapt", "static"]))
    kw = {"strategy": strategy}
    if model_kind == "heads":
        heads = draw(st.integers(2, 4))
        model = tiny_mtp(draw(st.sampled_from(["llama", "gpt2"])), num_heads=heads, seed=seed,
                         dtype=torch.float64, vocab_size=vocab)
        depth = heads - 1
    else:
        model = mask_model(draw(st.sampled_from(["llama", "gpt2"])), draw(st.sampled_from(["full", "gated-lora"])),
                           seed, vocab)
        k = draw(st.integers(2, 4))
        depth = k - 1
        if strategy != "greedy":  # (k means nothing to greedy decoding: an error)
            kw["k"] = k
    if strategy == "speculative":
        kw["tree"] = draw(st.sampled_from([None, random_tree(draw, depth), DynamicTree(draw(st.integers(1, 6)),
                                                                                       depth)]))
        kw["lookup"] = draw(st.sampled_from([0, 2, 4]))
        if kw["lookup"] and draw(st.booleans()):  # earlier "answers" in the model's vocabulary
            answers = draw(st.lists(st.lists(st.integers(0, min(vocab, 6) - 1), max_size=12), max_size=4))
            kw["lookup_corpus"] = LookupCorpus.build(answers, min_count=1)
    return model, kw


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # `replayed`: fixed
@given(data=st.data())
def test_replayed_steps_equal_eager_steps(data, replayed):
    """Every strategy and drafter, padded batches whose rows stop at different steps: the replay path (fixed
    block widths, finished rows kept in the batch until it halves, state and cache reused between calls) emits
    exactly what eager decoding emits, and the lossless strategies what the uncached reference emits."""
    model, kw = decoding_case(data.draw, data.draw(st.sampled_from(["heads", "masks"])))
    vocab = model.config.vocab_size - (1 if hasattr(model, "mask_token_id") else 0)
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8))
               for _ in range(data.draw(st.integers(1, 5)))]
    max_new = data.draw(st.integers(1, 14))
    stop = data.draw(st.lists(st.integers(0, vocab - 1), max_size=2))
    # Stop strings end rows on the host, a step after the device ran on (replaying, the next step is in flight).
    strings = data.draw(st.lists(st.text("abcdefgh", min_size=1, max_size=2), max_size=2))
    kw.update(stop_strings=strings, tokenizer=Letters())
    ids, mask = left_pad(prompts)
    eager = generate(model, ids, mask, max_new_tokens=max_new, stop_token_ids=stop, graphs=False, **kw)
    for _ in range(2):  # the second call replays the first call's session
        replay = generate(model, ids, mask, max_new_tokens=max_new, stop_token_ids=stop, graphs=True, **kw)
        assert replay.tokens == eager.tokens
    if kw["strategy"] in LOSSLESS:
        expected = [reference_greedy(model, p, max_new, stop) for p in prompts]
        assert eager.tokens == [t[:StopChecker(1, [], strings, Letters()).cut(0, t) or len(t)] for t in expected]


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), graphs=st.booleans())
def test_each_row_keeps_its_own_budget(data, graphs, replayed):
    """max_new_tokens given per row (a server's requests with their own max_tokens in one batch), eager and
    replayed: each row's tokens are those it gets alone with its budget (0 included), whatever the others'."""
    model, kw = decoding_case(data.draw, data.draw(st.sampled_from(["heads", "masks"])))
    vocab = model.config.vocab_size - (1 if hasattr(model, "mask_token_id") else 0)
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8))
               for _ in range(data.draw(st.integers(1, 4)))]
    budgets = [data.draw(st.integers(0, 12)) for _ in prompts]
    stop = data.draw(st.lists(st.integers(0, vocab - 1), max_size=1))
    ids, mask = left_pad(prompts)
    batch = generate(model, ids, mask, max_new_tokens=budgets, stop_token_ids=stop, graphs=graphs, **kw)
    alone = [generate(model, torch.tensor([p]), max_new_tokens=n, stop_token_ids=stop, graphs=False, **kw).tokens[0]
             for p, n in zip(prompts, budgets, strict=True)]
    assert batch.tokens == alone and all(len(t) <= n for t, n in zip(batch.tokens, budgets, strict=True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_row_that_accepts_drafts_past_its_budget_keeps_no_more_than_it_emits(replayed, device):
    """Row 0 loops, and its 8 lookup drafts are accepted each step, past its last tokens; row 1 (penalized) goes
    on. Replayed, the finished row stays in the batch, masked, and its later blocks are written after what it kept:
    with every accepted draft kept they were written past the cache's end (an index error; on a GPU a
    device-side assert), eager decoding (which drops the row) was fine."""
    model = tiny_mtp("gpt2", num_heads=2, seed=47088, dtype=torch.float64, vocab_size=300, layers=2).to(device)
    prompts = [[150, 240, 165, 115] + [225] * 20, [32, 9, 92, 88, 260, 287, 247, 32, 295, 78, 0, 194]]
    ids, mask = (t.to(device) for t in left_pad(prompts))
    kw = dict(max_new_tokens=49, strategy="speculative", lookup=8, adaptive_draft=False, stop_token_ids=[],
              repetition_penalty=[1.0, 3.0])
    eager = generate(model, ids, mask, graphs=False, **kw)
    assert generate(model, ids, mask, graphs=True, **kw).tokens == eager.tokens
    assert eager.tokens == generate(model, ids, mask, **{**kw, "strategy": "greedy", "lookup": 0}).tokens


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("strategy", ["greedy", "speculative", "confadapt"])
def test_a_halted_row_ends_and_the_others_keep_their_tokens(graphs, strategy, replayed):
    """generate(halt=...): a row the caller halts (a server's client that left) ends at the step it is asked
    after, its tokens of that step dropped; the other rows' tokens are those they get alone, eager and replayed."""
    model = tiny_mtp("llama", num_heads=3, seed=4, dtype=torch.float64, vocab_size=40)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    ids, mask = left_pad(prompts)
    seen = [0, 0, 0]

    def halt(row: int) -> bool:  # row 1 after its second step
        seen[row] += 1
        return row == 1 and seen[row] > 2

    kw = {"strategy": strategy, "stop_token_ids": [], "graphs": graphs} | ({"k": 3} if strategy == "confadapt" else {})
    out = generate(model, ids, mask, max_new_tokens=20, halt=halt, **kw)
    full = generate(model, ids, mask, max_new_tokens=20, **kw)
    assert out.tokens[0] == full.tokens[0] and out.tokens[2] == full.tokens[2] and len(full.tokens[1]) == 20
    assert 2 <= len(out.tokens[1]) < 20 and out.tokens[1] == full.tokens[1][:len(out.tokens[1])]
    assert seen[1] == 3  # (not asked again once halted)


@pytest.mark.parametrize("budgets, message", [([3], "one int per row (2)"), ([3, -1], "must be >= 0"),
                                              ([3, 2.0], "one int per row")])
def test_per_row_budgets_are_checked(budgets, message):
    model = tiny_mtp("llama", num_heads=2, vocab_size=20)
    with pytest.raises(MTPError, match=re.escape(message)):
        generate(model, [[1, 2], [3]], max_new_tokens=budgets)


class Letters:
    """A tokenizer's stand-in for stop strings: token i reads as one letter."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def test_a_session_is_reused_by_shape_and_renewed_when_the_weights_move(replayed):
    model = tiny_mtp("llama", num_heads=3)
    ids = torch.tensor([[1, 2, 3]])
    generate(model, ids, max_new_tokens=5, strategy="speculative", graphs=True)
    sessions = model._mtp_decode_sessions
    first = list(sessions.sessions.values())
    generate(model, ids, max_new_tokens=7, strategy="speculative", graphs=True)  # same cache length bucket
    assert list(sessions.sessions.values()) == first
    assert copy.deepcopy(model)._mtp_decode_sessions.sessions == {}  # a copy starts with none
    model.double()  # new weight tensors: graphs captured over the old ones must not be replayed, nor kept
    out = generate(model, ids.repeat(2, 1), max_new_tokens=5, strategy="speculative", graphs=True)
    assert len(sessions.sessions) == 1 and list(sessions.sessions.values()) != first
    assert out.tokens[0] == generate(model, ids, max_new_tokens=5, graphs=False).tokens[0]
    alive = weakref.ref(model)
    del model, sessions, first, out  # the model owns its sessions: nothing else keeps it alive
    gc.collect()
    assert alive() is None


def test_weights_changed_in_place_get_new_graphs(replayed):
    """A training loop that decodes now and then changes the weights in place (the optimizer's step): their
    addresses stay, but a CUDA graph captured before replays the copies it was captured with (the fused q/k/v,
    the stacked heads), so the session must be a new one, not a replay of the old model."""
    model = tiny_mtp("llama", num_heads=3)
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    generate(model, ids, max_new_tokens=6, strategy="speculative", graphs=True)
    (before,) = model._mtp_decode_sessions.sessions.values()
    with torch.no_grad():  # as optimizer.step() does: in place, same tensors
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = generate(model, ids, max_new_tokens=6, strategy="speculative", graphs=True)
    (after,) = model._mtp_decode_sessions.sessions.values()
    assert after is not before  # the old session (graphs, cache) is dropped with the old weights
    assert out.tokens == generate(model, ids, max_new_tokens=6, graphs=False).tokens


@pytest.mark.parametrize("strategy", LOSSLESS)
def test_a_batch_shrinks_after_reading_the_step_in_flight(replayed, monkeypatch, strategy):
    """Replaying, the next step is launched before the host reads a step, so when stop strings end enough rows
    for the batch to halve, a step of the full batch is already in flight: its tokens are read before the batch
    shrinks (the tokens are eager decoding's, and the batch did shrink)."""
    kept, copies = [], []
    rows_to_keep, to_host = generate_module._rows_to_keep, generate_module._to_host
    monkeypatch.setattr(generate_module, "_rows_to_keep",
                        lambda active, graphs: kept.append(rows_to_keep(active, graphs)) or kept[-1])
    monkeypatch.setattr(generate_module, "_to_host", lambda tensor: copies.append(1) or to_host(tensor))
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    ids, mask = left_pad(prompts)
    for seed in range(20):  # stop strings that end rows 0-2 at their third token and never row 3
        model = tiny_mtp("llama", num_heads=3, seed=seed, dtype=torch.float64, vocab_size=12)
        free = [Letters().decode(t) for t in
                generate(model, ids, mask, max_new_tokens=16, stop_token_ids=[], graphs=False).tokens]
        strings = [text[:3] for text in free[:3]]
        if not any(s in free[3] or s in text[:2] for s in strings for text in free[:3]):
            break
    else:
        raise AssertionError("no model whose rows 0-2 and row 3 differ")
    kw = {"max_new_tokens": 16, "stop_token_ids": [], "stop_strings": strings, "tokenizer": Letters(),
          "strategy": strategy}
    eager = generate(model, ids, mask, graphs=False, **kw)
    kept.clear()
    assert generate(model, ids, mask, graphs=True, **kw).tokens == eager.tokens
    assert [3] in kept  # the batch shrank to row 3
    assert copies  # steps were launched ahead of the host


@pytest.mark.parametrize("strategy", LOSSLESS)
def test_no_step_is_launched_ahead_past_the_budget(replayed, monkeypatch, strategy):
    """A step launched ahead of the host is wasted when the step being read ends every row; where the budget says
    it may, none is launched: every step run is read."""
    from mtp.decoding.graphs import GraphedSteps

    runs = []
    call = GraphedSteps.__call__
    monkeypatch.setattr(GraphedSteps, "__call__", lambda self, *a: runs.append(1) or call(self, *a))
    model = tiny_mtp("llama", num_heads=3, seed=0, dtype=torch.float64, vocab_size=40)
    ids, mask = left_pad([[1, 2, 3], [4, 5]])
    out = generate(model, ids, mask, max_new_tokens=9, stop_token_ids=[], strategy=strategy, graphs=True)
    assert len(runs) == out.stats.forward_passes - 1  # (the prompt's step is not a call)


def test_sessions_keep_the_most_recent_within_their_cache_budget(replayed):
    """Sessions are kept by recency: at most `limit`, and besides the session in use (always kept) no more key/value
    cache bytes than the budget (a later call of an evicted shape captures again, with the same tokens)."""
    from mtp.decoding.graphs import DecodeSessions

    model = tiny_mtp("llama", num_heads=3, seed=0)
    ids = torch.tensor([[1, 2, 3]])
    kw = {"max_new_tokens": 4, "stop_token_ids": [], "graphs": True}
    first = generate(model, ids, strategy="speculative", **kw).tokens
    one = next(iter(model._mtp_decode_sessions.sessions.values())).cache.nbytes
    assert one > 0
    model._mtp_decode_sessions = sessions = DecodeSessions(limit=3, cache_bytes=one)
    for batch in (1, 2):  # besides the two-row batch's session in use, the one-row one fits the budget
        generate(model, ids.repeat(batch, 1), strategy="speculative", **kw)
    assert [k[1] for k in sessions.sessions] == [1, 2]
    generate(model, ids.repeat(4, 1), strategy="speculative", **kw)  # the others (3 rows' caches) do not
    assert [k[1] for k in sessions.sessions] == [4]
    sessions.cache_bytes = 100 * one
    for strategy in ("greedy", "speculative", "static", "confadapt"):  # the limit: the three most recent
        generate(model, ids, strategy=strategy, **kw)
    assert [k[3][0] for k in sessions.sessions] == ["speculative", "static", "confadapt"]
    assert generate(model, ids, strategy="speculative", **kw).tokens == first


def prompts_replay_as_eager(model, device: str = "cpu") -> None:
    """Three batches of prompts of one padded width, decoded eagerly and then twice replaying: each call's
    tokens are eager decoding's, and the caller's prompt tensors are left as they were."""
    gen = torch.Generator().manual_seed(0)
    batches = [left_pad([torch.randint(0, 40, (n,), generator=gen).tolist() for n in lengths])
               for lengths in ((5, 9), (12, 3), (7, 7))]
    batches = [(ids.to(device), mask.to(device)) for ids, mask in batches]
    before = [ids.clone() for ids, _ in batches]
    kw = {"max_new_tokens": 10, "stop_token_ids": [], "strategy": "speculative", "lookup": 2}
    eager = [generate(model, ids, mask, graphs=False, **kw).tokens for ids, mask in batches]
    for _ in range(2):
        for (ids, mask), expected in zip(batches, eager, strict=True):
            assert generate(model, ids, mask, graphs=True, **kw).tokens == expected
    assert all(torch.equal(ids, b) for (ids, _), b in zip(batches, before, strict=True))


def test_a_replayed_prompt_step_reads_each_calls_prompts(replayed):
    """Replaying, prompts are left-padded to a multiple of PROMPT_BUCKET and the prompt's step is replayed from
    the first prompt of that width's capture: each call decodes its own prompts (copied into the captured
    buffers, never into the caller's tensors), as eager decoding does."""
    model = tiny_mtp("llama", num_heads=3, seed=4, vocab_size=40, dtype=torch.float64)
    prompts_replay_as_eager(model)
    (session,) = model._mtp_decode_sessions.sessions.values()
    assert list(session.run.prompts) == [(2, generate_module.PROMPT_BUCKET)]  # one width, one capture


def test_two_calls_at_once_do_not_share_a_session(replayed):
    """A session's buffers and graphs are its call's while it decodes: a `generate` from the streamer of another
    (and so one from another thread) on the same model decodes in sessions of its own, and both answers are what
    each gives alone (the nested call wrote into the outer one's buffers: a wrong answer, or a shape error)."""
    import threading

    model = tiny_mtp("llama", num_heads=3, seed=3)
    gen = torch.Generator().manual_seed(0)
    jobs = [[torch.randint(0, 61, (10,), generator=gen).tolist() for _ in range(2)] for _ in range(6)]
    alone = [generate(model, job, max_new_tokens=12, graphs=True).tokens for job in jobs]
    inner = []

    def streamer(row, new, **_):
        if row == 0 and len(inner) < 2:
            inner.append(generate(model, jobs[1], max_new_tokens=12, graphs=True).tokens)

    assert generate(model, jobs[0], max_new_tokens=12, graphs=True, streamer=streamer).tokens == alone[0]
    assert inner == [alone[1]] * 2
    got = {}

    def work(indices):
        for i in indices:
            got[i] = generate(model, jobs[i], max_new_tokens=12, graphs=True).tokens

    threads = [threading.Thread(target=work, args=(range(k, 6, 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(6)] == alone
    assert not model._mtp_decode_sessions.in_use.locked()  # each call gave the model's sessions back


def test_a_replayed_batch_shrinks_to_the_next_power_of_two():
    assert _rows_to_keep([True] * 8, graphs=True) is None
    assert _rows_to_keep([True] * 5 + [False] * 3, graphs=True) is None  # 5 do not fit in 4
    assert _rows_to_keep([True, False, True, False, True, False, True, False], graphs=True) == [0, 2, 4, 6]
    assert _rows_to_keep([True, False, True, False, True, False, False, False], graphs=True) == [0, 1, 2, 4]
    assert _rows_to_keep([False, False, True], graphs=True) == [2]
    assert _rows_to_keep([True, False, True], graphs=False) == [0, 2]  # eager: every finished row goes at once
    assert _rows_to_keep([True, True], graphs=False) is None


def test_graphs_need_a_cuda_device():
    model = tiny_mtp("llama", num_heads=2)
    for graphs in (True, "compile"):
        with pytest.raises(MTPError, match="CUDA graphs need a CUDA device"):
            generate(model, torch.tensor([[1, 2]]), max_new_tokens=3, graphs=graphs)
    with pytest.raises(MTPError, match="graphs must be None, True, False or 'compile', not 'yes'"):
        generate(model, torch.tensor([[1, 2]]), max_new_tokens=3, graphs="yes")


@pytest.fixture(params=[False, True], ids=["", "fused"])
def gpu_path(request, monkeypatch):
    """With the GPU's path (fused layers, CUDA's grouped attention) forced on the CPU, or without."""
    if request.param:
        from mtp.models import fast_llama

        monkeypatch.setattr(fast_llama, "FUSED_DEVICES", {"cpu"})
        monkeypatch.setattr(fast_llama, "_attention_path", lambda batch, block, device_type="cpu": "grouped")
    return request.param


def test_a_model_made_in_inference_mode_decodes(replayed, gpu_path):
    """Weights made under torch.inference_mode() have no version counter (reading it raises): the copies kept
    from them (fused projections, stacked heads, draft rows) and the sessions still key on them, as 0."""
    with torch.inference_mode():
        model = tiny_mtp("llama", num_heads=3)
        model.set_draft_vocab(torch.arange(0, model.config.vocab_size, 2))
        ids = torch.tensor([[1, 2, 3, 1, 2]])
        kw = dict(max_new_tokens=6, strategy="speculative", tree="auto", tree_size=3, lookup=2)
        replay = generate(model, ids, graphs=True, **kw)
        assert replay.tokens == generate(model, ids, graphs=False, **kw).tokens
    assert replay.tokens == [reference_greedy(model, [1, 2, 3, 1, 2], 6)]


TRACED_STEPS = {  # id -> (kind, generate's arguments)
    # (log-probabilities too: the scores of the verified tokens are read on the device like the tokens)
    # (heads that read the next token: sampled, the kept path's heads run again after verifying)
    "heads-dynamic-tree-lookup-sampling-logprobs": ("heads", {"strategy": "speculative", "tree": DynamicTree(4, 2),
                                                              "lookup": 3, "do_sample": True, "logprobs": 3,
                                                              "reads_next": True}),
    "heads-tree-lookup-draft-vocab": ("heads", {"strategy": "speculative", "tree": "auto", "tree_size": 4,
                                                "lookup": 2, "draft_vocab": True}),
    "heads-chain-lookup": ("heads", {"strategy": "speculative", "lookup": 2}),
    "heads-chain-lookup-sampling-filters": ("heads", {"strategy": "speculative", "lookup": 2, "do_sample": True,
                                                      "top_k": 5, "top_p": 0.9, "min_p": 0.05}),
    "masks-confadapt": ("masks", {"strategy": "confadapt", "k": 3}),
}
# Every drafting feature on the GPU's path (fused layers); on the general path (Hugging Face layers), whose
# drafting code is the same, a tree that samples and the mask tokens (a trace costs 5-8 s on 2 cores).
GENERAL_PATH_TRACES = ("heads-dynamic-tree-lookup-sampling-logprobs", "masks-confadapt")


@pytest.mark.parametrize("gpu_path,kind,kw", [
    pytest.param(fused, *TRACED_STEPS[name], id=("fused-" if fused else "-") + name)
    for fused in (False, True) for name in TRACED_STEPS if fused or name in GENERAL_PATH_TRACES],
    indirect=["gpu_path"])
def test_a_step_traces_as_one_graph(kind, kw, gpu_path):
    """The step reads nothing back to the host (what a CUDA graph cannot replay): dynamo traces it as one graph
    (fullgraph=True fails on a host read such as .item(), .tolist() or a tensor in an `if`), the prompt's step
    (captured too, `GraphedSteps.prefill`) and the next; on the GPU's path too, whose fused weights and stacked
    heads are cached by their tensors' addresses (which a traced graph cannot read: `graphs="compile"`)."""
    model = tiny_mtp("llama", num_heads=3) if kind == "heads" else mask_model("llama", "gated-lora", 0, 20)
    if kw.get("draft_vocab"):  # as `mtp train` makes heads: a draft vocabulary (its rows cached by their address)
        model.set_draft_vocab(torch.arange(0, model.config.vocab_size, 2))
    if kw.get("reads_next"):
        reading_next_token(model, seed=0)
    from mtp.decoding.generate import model_tree

    opts = DecodeOptions(kw["strategy"], 8, do_sample=kw.get("do_sample", False), k=kw.get("k"),
                         top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0), min_p=kw.get("min_p", 0.0),
                         tree=model_tree(model, kw.get("tree"), kw.get("tree_size"), None, kw.get("k")),
                         lookup=kw.get("lookup", 0), logprobs=kw.get("logprobs"))
    drafter = drafter_for(model, opts)
    ids, mask = left_pad([[1, 2, 3, 1, 2], [4, 5]])
    cache = drafter.new_cache(2, 64, static=True)
    decoder = Decoder(drafter, opts, cache, torch.tensor([5]), None)  # (dynamo traces no torch.Generator)
    n, m = drafter.num_drafts, opts.lookup
    prompt = _prompt_state(ids, mask.bool(), [opts.max_new_tokens] * ids.shape[0], 64 if m else 0, opts=opts)
    with torch.inference_mode():
        if gpu_path:  # an eager prompt step first builds the fused weights a trace reads (graphs="compile" too)
            decoder.step(prompt.clone(), 0, 0)
            cache.reset()
        torch._dynamo.reset()
        prompt_step = torch.compile(lambda s: decoder.step(s, 0, 0), fullgraph=True, backend="eager", dynamic=False)
        state, _ = prompt_step(prompt)
        torch._dynamo.reset()
        traced = torch.compile(lambda s: decoder.step(s, n, m), fullgraph=True, backend="eager", dynamic=False)
        new, result = traced(state)
    assert result.host.shape[0] == 2 and new.pending.shape == state.pending.shape


# Every step verifies the whole tree (no timed gate, no shorter drafts): the step shapes are known, 2 rows then 1
# (timed, the gate's first plain steps and catch-ups compiled 2-3 more graphs, ~8 s each on 2 cores; those steps
# compile in `test_compiled_plain_and_catch_up_steps_decode_as_the_eager_ones`).
DYNAMIC_TREE_LOOKUP = {"strategy": "speculative", "tree": "dynamic", "tree_size": 4, "lookup": 3,
                       "adaptive_draft": False,  # and lookup drafts from a corpus (its device copies: constants)
                       "lookup_corpus": LookupCorpus.build([[4, 5, 6, 7, 8], [2, 3, 9, 9, 9]] * 2)}


def compiling_with(monkeypatch, backend: str) -> None:
    """graphs="compile" through `backend`: inductor generates and compiles C++ on a CPU (10-40 s a step shape on
    2 cores, the suite's slowest tests), aot_eager traces the same graph (dynamo, functionalisation) and runs it
    eagerly: the tests that count graphs and compare tokens over many shapes use it; a few keep inductor."""
    from mtp.decoding import graphs

    compiled = graphs._compiled
    monkeypatch.setattr(graphs, "_compiled", lambda step: compiled(step, backend=backend))


@pytest.mark.parametrize("gpu_path,kw,backend", [(True, {}, "inductor"), (True, DYNAMIC_TREE_LOOKUP, "aot_eager")],
                         indirect=["gpu_path"],
                         ids=["fused-greedy", "fused-dynamic-tree-lookup"])  # (the general path: the next test)
def test_a_compiled_step_decodes_as_the_eager_one(kw, backend, monkeypatch, gpu_path, capsys):
    """graphs="compile" (here on a CPU, with the stand-in for a capture; greedy through inductor's C++, the dynamic
    tree's through aot_eager): the whole step through torch.compile, one graph per step shape, emits
    what eager decoding emits - rows that end at different steps, a dynamic tree with lookup drafts - and a later
    call compiles nothing more."""
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    from mtp.decoding import graphs

    compiling_with(monkeypatch, backend)
    monkeypatch.setattr(generate_module, "_use_graphs", lambda graphs, device, proposer: graphs)
    monkeypatch.setattr(graphs, "COMPILE_NOTICE_S", 0.0)  # compiling says so at once (after 5 s otherwise)
    model = tiny_mtp("llama", num_heads=3, seed=2, vocab_size=50)
    ids, mask = left_pad([[1, 2, 3, 1, 2, 3], [4, 5]])
    eager = generate(model, ids, mask, max_new_tokens=20, stop_token_ids=[21], graphs=False, **kw)
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(model, ids, mask, max_new_tokens=20, stop_token_ids=[21], graphs="compile", **kw)
    graphs_compiled = counters["stats"]["unique_graphs"]
    assert compiled.tokens == eager.tokens and len(set(map(len, eager.tokens))) == 2  # (rows end apart)
    assert "mtp: compiling the decoding step for 2 rows, " in capsys.readouterr().err
    assert not counters["graph_break"], dict(counters["graph_break"])
    # each step shape compiles once at most (batch 2, then 1 once a row ends), not once a step
    def shapes() -> int:
        return sum(len(session.run.graphs) for session in model.__dict__["_mtp_decode_sessions"].sessions.values())

    assert 1 <= graphs_compiled <= shapes() == 2
    # the same steps in a later call: nothing more compiles
    again = generate(model, ids, mask, max_new_tokens=20, stop_token_ids=[21], graphs="compile", **kw)
    assert again.tokens == eager.tokens and counters["stats"]["unique_graphs"] == graphs_compiled


def test_compiled_plain_and_catch_up_steps_decode_as_the_eager_ones(monkeypatch):
    """A batch whose verify blocks do not pay takes plain steps and catches the heads up before verifying again
    (`SpeculationGate`): those steps compile too (one graph each), and the output is still greedy's; here on the
    general path (the Hugging Face layers' arithmetic, as GPT-2 and adapter-hooked layers run on a GPU; inductor's
    code for it: `test_penalties.py`). Step times drawn at random (a fake clock, advanced outside the compiled
    step) flip the gate often."""
    import random

    from mtp.decoding import graphs

    compiling_with(monkeypatch, "aot_eager")
    monkeypatch.setattr(generate_module, "_use_graphs", lambda graphs, device, proposer: graphs)
    now, rng, replay = [0.0], random.Random(3), graphs.GraphedSteps.__call__

    def timed(self, state, n, m, drafting=True, catch_up=0):
        now[0] += rng.choice([0.2, 1.0, 5.0]) * (1 + n + m)
        return replay(self, state, n, m, drafting, catch_up)

    monkeypatch.setattr(graphs.GraphedSteps, "__call__", timed)
    monkeypatch.setattr(generate_module.SpeculationGate, "clock", staticmethod(lambda: now[0]))
    model = tiny_mtp("llama", num_heads=3, seed=2, vocab_size=50)
    ids, mask = left_pad([[1, 2, 3, 1, 2], [4, 5], [6, 7, 8, 9, 6, 7]])
    kw = dict(max_new_tokens=24, stop_token_ids=[], strategy="speculative", num_draft=1)  # few shapes to compile
    # (steps compiled by earlier tests would have dynamo compile these with symbolic sizes: 2.5x the time)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        # (a step that failed to compile would warn; torch's own RuntimeWarnings, e.g. Python 3.13.0's slower
        # guards, are not this test's business)
        warnings.filterwarnings("error", message="mtp: compiling the decoding step failed", category=RuntimeWarning)
        compiled = generate(model, ids, mask, graphs="compile", **kw)
    assert compiled.stats.plain_steps > 0 and compiled.stats.draft_positions[0] > 0  # both kinds of step ran
    assert compiled.tokens == [reference_greedy(model, p, 24) for p in ([1, 2, 3, 1, 2], [4, 5], [6, 7, 8, 9, 6, 7])]


@pytest.mark.parametrize("older_torch", [False, True])
def test_a_step_that_fails_to_compile_is_replayed_uncompiled(monkeypatch, older_torch):
    """Where torch.compile cannot trace or compile the step (an unknown GPU's toolchain), it fails before any of
    the step has run (one graph): the step is captured uncompiled, with a warning saying so, and decodes alike.
    Also under a torch whose inductor has no InductorError (torch 2.6: catching it raised AttributeError)."""
    import torch._inductor.exc

    from mtp.decoding import graphs

    if older_torch:
        monkeypatch.delattr(torch._inductor.exc, "InductorError", raising=False)

    def failing(step):
        def compiled(*args, **kwargs):
            raise torch._dynamo.exc.TorchDynamoException("Triton is missing\nmore detail")
        return compiled

    monkeypatch.setattr(generate_module, "_use_graphs", lambda graphs, device, proposer: graphs)
    monkeypatch.setattr(graphs, "_compiled", failing)
    model = tiny_mtp("llama", num_heads=3, seed=2, vocab_size=50)
    ids, mask = left_pad([[1, 2, 3, 1, 2, 3], [4, 5]])
    kw = dict(max_new_tokens=12, stop_token_ids=[], strategy="speculative", lookup=2)
    with pytest.warns(RuntimeWarning, match=r"compiling the decoding step failed \(TorchDynamoException: Triton "
                                            r"is missing\); the CUDA graphs replay the uncompiled step"):
        compiled = generate(model, ids, mask, graphs="compile", **kw)
    assert compiled.tokens == generate(model, ids, mask, graphs=False, **kw).tokens


def test_sampling_steps_are_captured_uncompiled(replayed, monkeypatch):
    """graphs="compile" with sampling: dynamo traces no torch.Generator (each draw would break the graph; compiled
    piecewise, the step sampled unlike the eager one), so those steps are captured as they are, without trying:
    nothing compiles, and a seed samples what it samples with graphs on."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(generate_module, "_use_graphs", lambda graphs, device, proposer: graphs)
    model = tiny_mtp("llama", num_heads=3, seed=2, vocab_size=50)
    kw = dict(max_new_tokens=12, stop_token_ids=[], strategy="speculative", do_sample=True, seed=3)
    counters.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mtp: compiling the decoding step failed",
                                category=RuntimeWarning)  # (a compile tried and failed would warn)
        sampled = generate(model, torch.tensor([[1, 2, 3, 1, 2, 3]]), graphs="compile", **kw)
    assert counters["stats"]["unique_graphs"] == 0
    assert sampled.tokens == generate(model, torch.tensor([[1, 2, 3, 1, 2, 3]]), graphs=True, **kw).tokens


def test_a_sampled_batch_that_shrinks_draws_on(replayed):
    """Replaying, a batch that shrinks moves into a smaller session with a generator of its own: its draws go on
    where the larger session's stopped. (They started over from the seed: a row's later tokens repeated the first
    draws of the call, token for token, where every token is equally likely.)"""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)
    model.base.lm_head.weight.data.zero_()  # every token equally likely: a token is the draw itself
    ids, mask = left_pad([[1, 2], [3, 4], [5, 6], [7, 8]])
    kw = dict(stop_token_ids=[], do_sample=True, seed=5, graphs=True)
    out = generate(model, ids, mask, max_new_tokens=[1, 1, 1, 30], **kw)
    stream = generate(model, torch.tensor([[7, 8]]), max_new_tokens=30, **kw).tokens[0]  # the seed's draws
    assert [t[0] for t in out.tokens] == stream[:4]  # (one draw a row, in row order: the same stream)
    later = out.tokens[3][1:]
    assert not any(later[i:i + 4] == stream[:4] for i in range(len(later) - 3))


@pytest.mark.parametrize("kind,kw", [
    ("heads", {"strategy": "greedy"}),
    ("heads", {"strategy": "speculative", "lookup": 2}),
    ("heads", {"strategy": "speculative", "tree": "auto", "tree_size": 4}),
    ("heads", {"strategy": "speculative", "tree": DynamicTree(4, 2), "lookup": 2}),
    ("masks", {"strategy": "speculative", "k": 3}),
    ("masks", {"strategy": "speculative", "k": 3, "tree": "auto", "tree_size": 3}),
], ids=["heads-greedy", "heads-chain-lookup", "heads-tree", "heads-dynamic-tree-lookup", "masks-chain", "masks-tree"])
def test_a_verifying_step_after_the_prompt_counts_no_positions(replayed, kind, kw, monkeypatch):
    """After the prompt a verifying step feeds one pending token, always valid, then drafts: its slots' positions
    follow from its layout without counting the valid ones (no cumsum: kernels a GPU step saves), and decoding
    still equals greedy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mtp.decoding import graphs

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = tiny_mtp("llama", num_heads=3, seed=1) if kind == "heads" else mask_model("llama", "full", 1, 20)
    replay, logs = graphs.GraphedSteps.__call__, []

    def logged(self, *args, **kwargs):
        with Names() as names:
            result = replay(self, *args, **kwargs)
        logs.append(names.names)
        return result

    monkeypatch.setattr(graphs.GraphedSteps, "__call__", logged)
    ids, mask = left_pad([[1, 2, 3, 1, 2, 3], [4, 5]])
    out = generate(model, ids, mask, max_new_tokens=10, stop_token_ids=[], graphs=True, **kw)
    assert len(logs) >= 2 and not any("cumsum" in names for names in logs), logs
    greedy = generate(model, ids, mask, max_new_tokens=10, stop_token_ids=[], graphs=False)
    assert out.tokens == greedy.tokens


# ------------------------------------------------------------------------------------------------ on a GPU
STRATEGIES = [
    {"strategy": "greedy"},
    {"strategy": "speculative"},
    {"strategy": "speculative", "tree": "auto", "tree_size": 5},
    {"strategy": "speculative", "tree": "dynamic", "tree_size": 5, "lookup": 3},
    {"strategy": "speculative", "lookup": 4},
    {"strategy": "confadapt"},
    {"strategy": "static"},
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kw", STRATEGIES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_cuda_graph_replay_equals_eager(kw, family, dtype):
    model = tiny_mtp(family, num_heads=3, seed=7, vocab_size=50).to("cuda", dtype)
    prompts = [[1, 2, 3, 1, 2, 3], [4, 5], [6, 7, 8], [9]]
    ids, mask = left_pad(prompts)
    ids, mask = ids.cuda(), mask.cuda()
    # (adaptive_draft off: the speculation gate times steps, and in bf16 a plain step and a verify block round
    # differently; test_cuda_speculation_gate_switches_between_captured_steps has it on)
    eager = generate(model, ids, mask, max_new_tokens=24, stop_token_ids=[11], graphs=False, adaptive_draft=False,
                     **kw)
    for _ in range(2):
        replay = generate(model, ids, mask, max_new_tokens=24, stop_token_ids=[11], graphs=True,
                          adaptive_draft=False, **kw)
        assert replay.tokens == eager.tokens
    if dtype == torch.float32 and kw["strategy"] in LOSSLESS:
        greedy = generate(model, ids, mask, max_new_tokens=24, stop_token_ids=[11], graphs=True)
        assert replay.tokens == greedy.tokens


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_prompt_graphs_read_each_calls_prompts(dtype):
    """The prompt's step replayed from a real capture: other prompts of the same padded width, the caller's
    tensors untouched, each call's tokens those of eager decoding (which pads the same way on a GPU)."""
    prompts_replay_as_eager(tiny_mtp("llama", num_heads=3, seed=4, vocab_size=40).to("cuda", dtype), "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [{"strategy": "speculative", "k": 3}, {"strategy": "confadapt", "k": 3},
                                {"strategy": "speculative", "k": 3, "tree": "dynamic", "tree_size": 4}],
                         ids=["speculative", "confadapt", "dynamic-tree"])
def test_cuda_graph_replay_with_mask_tokens(kw):
    model = mask_model("llama", "gated-lora", 3, 30).to("cuda")
    ids, mask = left_pad([[1, 2, 3, 4], [5, 6]])
    ids, mask = ids.cuda(), mask.cuda()
    eager = generate(model, ids, mask, max_new_tokens=16, stop_token_ids=[], graphs=False, **kw)
    replay = generate(model, ids, mask, max_new_tokens=16, stop_token_ids=[], graphs=True, **kw)
    assert replay.tokens == eager.tokens
    if kw["strategy"] == "speculative":
        assert replay.tokens == generate(model, ids, mask, max_new_tokens=16, stop_token_ids=[]).tokens


@pytest.mark.cuda
def test_cuda_graph_sampling_is_reproducible_and_exact_for_greedy_rows():
    model = tiny_mtp("llama", num_heads=3, seed=2, vocab_size=30).to("cuda")
    ids = torch.tensor([[1, 2, 3]] * 4, device="cuda")
    runs = [generate(model, ids, max_new_tokens=12, strategy="speculative", do_sample=True, seed=5,
                     stop_token_ids=[], graphs=True).tokens for _ in range(2)]
    assert runs[0] == runs[1] and all(len(r) == 12 for r in runs[0])
    cold = generate(model, ids, max_new_tokens=12, strategy="speculative", do_sample=True, temperature=1e-6,
                    stop_token_ids=[], graphs=True)  # temperature ~0: sampling is greedy
    assert cold.tokens == generate(model, ids, max_new_tokens=12, stop_token_ids=[]).tokens


@pytest.mark.cuda
@pytest.mark.real_model
def test_default_model_on_cuda_graphs_equal_eager_and_greedy():
    from mtp.models.loading import load_mtp_model
    from mtp.training.targets import prompt_token_ids

    model = load_mtp_model(None, num_heads=1, device="cuda")
    prompts = [prompt_token_ids(model.tokenizer, q, "chat") for q in ("What is 7 + 5?", "Name three colours.")]
    ids, mask = left_pad(prompts)
    ids, mask = ids.cuda(), mask.cuda()
    eager = generate(model, ids, mask, max_new_tokens=48, graphs=False)
    replay = generate(model, ids, mask, max_new_tokens=48, graphs=True)
    lookup = generate(model, ids, mask, max_new_tokens=48, strategy="speculative", lookup=6, graphs=True)
    assert replay.tokens == eager.tokens and lookup.tokens == eager.tokens


@pytest.mark.cuda
def test_graphs_of_the_compiled_step_decode_as_the_eager_steps():
    """graphs="compile": the captured steps run what torch.compile made of the step; in fp32 the tokens are the
    eager steps' (fused kernels round differently only in the last bits), and speculative decoding still equals
    greedy."""
    model = tiny_mtp("llama", num_heads=3, seed=7, vocab_size=50).to("cuda")
    ids, mask = left_pad([[1, 2, 3, 1, 2, 3], [4, 5]])
    ids, mask = ids.cuda(), mask.cuda()
    eager = generate(model, ids, mask, max_new_tokens=24, stop_token_ids=[], graphs=False)
    compiled = generate(model, ids, mask, max_new_tokens=24, stop_token_ids=[], graphs="compile")
    tree = generate(model, ids, mask, max_new_tokens=24, stop_token_ids=[], graphs="compile", strategy="speculative",
                    tree="dynamic", tree_size=4, lookup=3)
    assert compiled.tokens == eager.tokens and tree.tokens == eager.tokens


def test_another_draft_vocabulary_gets_new_graphs(replayed):
    """A captured graph reads the draft vocabulary it was captured with (its rows of the unembedding, the token
    id of each draft): after `set_draft_vocab` the session must be a new one, or CUDA would replay the old
    vocabulary (freed: its memory may hold anything by then)."""
    model = tiny_mtp("llama", num_heads=3, vocab_size=40)
    model.set_draft_vocab(list(range(0, 40, 2)))
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    generate(model, ids, max_new_tokens=6, strategy="speculative", graphs=True)
    (before,) = model._mtp_decode_sessions.sessions.values()
    model.set_draft_vocab(list(range(1, 40, 2)))
    out = generate(model, ids, max_new_tokens=6, strategy="speculative", graphs=True)
    (after,) = model._mtp_decode_sessions.sessions.values()
    assert after is not before
    assert out.tokens == [reference_greedy(model, ids[0].tolist(), 6)]


@pytest.mark.parametrize("graphs", [True, False], ids=["replayed", "eager"])
def test_a_weight_at_a_freed_weights_address_does_not_pass_for_it(replayed, monkeypatch, graphs):
    """Copies made from the weights (a session's graphs, fused and blocked weights, draft rows) are checked by
    each weight's address and version. A weight replaced twice before the next check could come back at the
    first one's freed address, its parameter's version unchanged (`p.data = ...` keeps the counter): here every
    weight reports the same (address, version) whatever happens, and replacing the weights must still remake
    every copy, since the storage they were made from is gone."""
    from mtp.decoding import graphs as graphs_module
    from mtp.models import weight_state

    def unchanged(tensors):  # as if each new weight had come back at its predecessor's address
        return tuple((0, 0) for _ in tensors)

    for module in (weight_state, graphs_module):  # every copy is checked through these (`kept_copy`, sessions)
        monkeypatch.setattr(module, "weights_state", unchanged)
    model = tiny_mtp("llama", num_heads=3, vocab_size=40)
    model.set_draft_vocab(list(range(0, 40, 2)))
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    kw = dict(max_new_tokens=6, strategy="speculative", tree="auto", tree_size=3, lookup=2, graphs=graphs)
    first = generate(model, ids, **kw).tokens
    (before,) = model._mtp_decode_sessions.sessions.values() if graphs else (None,)
    other = tiny_mtp("llama", num_heads=3, seed=7, vocab_size=40)
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            p.data = q.data * 8 if q.dim() == 2 else q.data.clone()  # another model's weights (larger: a
            # tiny random model's small ones emit one token throughout), new tensors
    reference = [reference_greedy(model, ids[0].tolist(), 6)]
    assert reference != first  # (the two models decode apart: stale copies would show)
    assert generate(model, ids, **kw).tokens == reference
    if graphs:
        (after,) = model._mtp_decode_sessions.sessions.values()
        assert after is not before


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("graphs", [False, True])
def test_a_short_prompt_beside_a_long_one_may_take_the_longer_budget(family, graphs, monkeypatch):
    """Each row's positions start at its own first token: a batch of a 100-token prompt (budget 20) and an 8-token
    one (budget 115) fits a 128-position model, though the padded width plus the larger budget does not (it was
    refused: `mtp train --targets self` failed with --seq-len at the context). The same tokens as each alone."""
    if graphs:
        monkeypatch.setattr(generate_module, "_use_graphs", lambda graphs, device, proposer: bool(graphs))
    model = tiny_mtp(family, num_heads=2, context=128)
    g = torch.Generator().manual_seed(0)
    long, short = torch.randint(3, 60, (100,), generator=g).tolist(), torch.randint(3, 60, (8,), generator=g).tolist()
    ids, mask = left_pad([long, short], 0)
    for strategy in LOSSLESS:
        both = generate(model, ids, mask, max_new_tokens=[20, 115], strategy=strategy, graphs=graphs).tokens
        alone = [generate(model, [p], max_new_tokens=n, strategy=strategy).tokens[0]
                 for p, n in ((long, 20), (short, 115))]
        assert both == alone and [len(t) for t in both] == [20, 115]
    with pytest.raises(MTPError, match="prompt of 100 tokens \\+ max_new_tokens 29 exceeds the model's context"):
        generate(model, ids, mask, max_new_tokens=[29, 115], graphs=graphs)
