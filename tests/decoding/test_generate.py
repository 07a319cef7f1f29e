"""The decoding engine against the slow reference: greedy == reference, speculative == greedy, always."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_first_two_tokens_follow_the_model, tiny_mtp
from mtp.decoding.generate import DraftRequest, generate, left_pad
from mtp.decoding.reference import reference_greedy
from mtp.decoding.sampling import accept_drafts_sampling, process_logits
from mtp.errors import MTPError


def random_prompts(draw, vocab: int, batch: int) -> list[list[int]]:
    return [draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=9)) for _ in range(batch)]


def oracle_proposer(reference: list[list[int]], corrupt: float, seed: int):
    """Drafts from the known greedy continuation, each position corrupted with probability `corrupt`."""
    gen = torch.Generator().manual_seed(seed)

    def propose(req: DraftRequest):
        d = req.hidden_at.shape[1]
        drafts = torch.zeros(len(req.rows), d, dtype=torch.long)
        for i, (row, done) in enumerate(zip(req.rows.tolist(), req.produced.tolist(), strict=True)):
            future = reference[row][done:done + d]
            drafts[i, :len(future)] = torch.tensor(future, dtype=torch.long)
        flip = torch.rand(drafts.shape, generator=gen) < corrupt
        drafts = torch.where(flip, (drafts + 1) % req.model.config.vocab_size, drafts)
        return drafts, None

    return propose


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_speculative_equals_greedy_equals_reference(data):
    family = data.draw(st.sampled_from(["llama", "gpt2"]))
    num_heads = data.draw(st.integers(1, 8))
    vocab = data.draw(st.integers(8, 64))
    seed = data.draw(st.integers(0, 10_000))
    # float64: exactness must not hinge on last-bit differences between 1-row and n-row matmuls.
    model = tiny_mtp(family, num_heads=num_heads, seed=seed, dtype=torch.float64, vocab_size=vocab)
    batch = data.draw(st.integers(1, 3))
    prompts = random_prompts(data.draw, vocab, batch)
    max_new = data.draw(st.integers(0, 24))
    stop = data.draw(st.lists(st.integers(0, vocab - 1), max_size=1))
    ids, mask = left_pad(prompts)
    reference = [reference_greedy(model, p, max_new, stop) for p in prompts]
    greedy = generate(model, ids, mask, max_new_tokens=max_new, stop_token_ids=stop)
    if num_heads > 1 and data.draw(st.booleans()):  # extra heads restricted to a draft vocabulary: still exact
        model.set_draft_vocab(data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=vocab,
                                                 unique=True)))
    spec = generate(model, ids, mask, max_new_tokens=max_new, strategy="speculative", stop_token_ids=stop)
    assert greedy.tokens == reference
    assert spec.tokens == reference
    # With drafts that are often right, rows accept different lengths: holes and compaction in the cache.
    if num_heads > 1 and max_new:
        corrupt = data.draw(st.sampled_from([0.0, 0.3, 0.7]))
        oracle = generate(model, ids, mask, max_new_tokens=max_new, strategy="speculative", stop_token_ids=stop,
                          proposer=oracle_proposer(reference, corrupt, seed))
        assert oracle.tokens == reference


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_perfect_drafts_are_all_accepted(family):
    model = tiny_mtp(family, num_heads=4, dtype=torch.float64)
    prompts = [[1, 2, 3], [4, 5], [6]]
    reference = [reference_greedy(model, p, 40) for p in prompts]
    ids, mask = left_pad(prompts)
    # (adaptive_draft off: no timed plain steps in this batch, whose forwards are counted)
    out = generate(model, ids, mask, max_new_tokens=40, strategy="speculative", stop_token_ids=[],
                   proposer=oracle_proposer(reference, 0.0, 0), adaptive_draft=False)
    assert out.tokens == reference
    assert out.stats.acceptance == [1.0, 1.0, 1.0]
    # 1 token from the prefill, then 4 per forward: 40 tokens in 1 + ceil(39 / 4) forwards per row.
    assert out.stats.forward_passes == 1 + 10


def test_random_heads_accept_little_and_stay_exact():
    model = tiny_mtp("llama", num_heads=4, dtype=torch.float64, vocab_size=64)
    prompt = [3, 1, 4, 1, 5]
    out = generate(model, torch.tensor([prompt]), max_new_tokens=60, strategy="speculative", stop_token_ids=[])
    assert out.tokens[0] == reference_greedy(model, prompt, 60)
    assert out.stats.tokens_per_forward < 1.5
    assert max(out.stats.acceptance) < 0.5


def copying_model(num_heads: int):
    """A model that predicts its input token again: layers output zero, tied near-orthogonal embeddings.

    Its true continuation is the last token repeated, and every head (a copy of head 0) predicts exactly that,
    so these heads are "equal to the true model".
    """
    model = tiny_mtp("llama", num_heads=1, dtype=torch.float64, vocab_size=16, hidden=64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
    from mtp import MTPModel

    return MTPModel(model.base, num_heads=num_heads).eval()


def test_heads_equal_to_the_true_model_give_full_acceptance():
    model = copying_model(num_heads=4)
    out = generate(model, torch.tensor([[5, 7, 9]]), max_new_tokens=21, strategy="speculative", stop_token_ids=[])
    assert out.tokens[0] == [9] * 21
    assert out.stats.acceptance == [1.0, 1.0, 1.0]
    assert out.stats.tokens_per_forward == pytest.approx(21 / 6)  # prefill 1 token, then 4, 4, 4, 4, 4


def test_stop_token_inside_an_accepted_block_ends_the_row_there():
    model = tiny_mtp("llama", num_heads=4, dtype=torch.float64)
    prompt = [7, 8, 9]
    reference = reference_greedy(model, prompt, 30)
    stop = reference[6]  # reached in the middle of a fully accepted block of 4
    expected = reference[: reference.index(stop) + 1]
    out = generate(model, torch.tensor([prompt]), max_new_tokens=30, strategy="speculative",
                   stop_token_ids=[stop], proposer=oracle_proposer([reference], 0.0, 0))
    assert out.tokens[0] == expected


def test_confadapt_and_static():
    model = tiny_mtp("llama", num_heads=4, dtype=torch.float64)
    prompt = torch.tensor([[1, 2, 3, 4]])
    greedy = generate(model, prompt, max_new_tokens=20, stop_token_ids=[])
    # tau 1 (these random heads are never that sure): only head 0's token is emitted, exactly greedy decoding.
    strict = generate(model, prompt, max_new_tokens=20, strategy="confadapt", tau=1.0, stop_token_ids=[])
    assert strict.tokens == greedy.tokens
    assert strict.stats.tokens_per_forward == 1.0
    static = generate(model, prompt, max_new_tokens=20, strategy="static", k=4, stop_token_ids=[])
    assert len(static.tokens[0]) == 20
    assert static.stats.forward_passes == 5
    loose = generate(model, prompt, max_new_tokens=20, strategy="confadapt", tau=0.0, stop_token_ids=[])
    assert loose.tokens == static.tokens
    # static emits head j's top-1 at the last fed position as token t+1+j
    logits = model(prompt, return_all_heads=True)[0, -1]  # (n, V)
    assert static.tokens[0][:4] == logits.argmax(-1).tolist()


def test_k_sets_the_heads_every_strategy_reads():
    """k on a heads model: the next-token head and k - 1 extra ones, as a mask-token model's k - 1 masks; ConfAdapt
    and speculative decoding read it too (they ignored it), static always did."""
    model = tiny_mtp("llama", num_heads=4, dtype=torch.float64)
    prompt = torch.tensor([[1, 2, 3, 4]])
    greedy = generate(model, prompt, max_new_tokens=20, stop_token_ids=[])
    for k in (1, 2, 3):
        loose = generate(model, prompt, max_new_tokens=20, strategy="confadapt", tau=0.0, k=k, stop_token_ids=[])
        static = generate(model, prompt, max_new_tokens=20, strategy="static", k=k, stop_token_ids=[])
        assert loose.tokens == static.tokens and loose.stats.forward_passes == -(-20 // k)
        spec = generate(model, prompt, max_new_tokens=20, strategy="speculative", k=k, stop_token_ids=[])
        assert spec.tokens == greedy.tokens
        assert len(spec.stats.draft_positions) == k - 1  # k - 1 drafts at most a step
    with pytest.raises(MTPError, match=r"k must be in \[1, 4\] for a 4-head model, got 5"):
        generate(model, prompt, max_new_tokens=4, strategy="confadapt", k=5)
    with pytest.raises(MTPError, match=r"num_draft must be in \[0, 1\] with k=2, got 3"):
        generate(model, prompt, max_new_tokens=4, strategy="speculative", k=2, num_draft=3)


def test_batched_confadapt_rows_match_single_rows():
    model = tiny_mtp("gpt2", num_heads=3, dtype=torch.float64)
    prompts = [[1, 2, 3], [9], [4, 4, 4, 4, 4]]
    ids, mask = left_pad(prompts)
    batch = generate(model, ids, mask, max_new_tokens=15, strategy="confadapt", tau=0.05, stop_token_ids=[])
    for i, p in enumerate(prompts):
        single = generate(model, torch.tensor([p]), max_new_tokens=15, strategy="confadapt", tau=0.05,
                          stop_token_ids=[])
        assert batch.tokens[i] == single.tokens[0]


def test_edge_cases():
    model = tiny_mtp("gpt2", num_heads=2, context=32)
    with pytest.raises(MTPError, match="empty prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    out = generate(model, torch.tensor([[1, 2]]), max_new_tokens=0)
    assert out.tokens == [[]] and out.stats.new_tokens == 0
    long_prompt = torch.randint(0, 60, (1, 30))
    with pytest.raises(MTPError, match="exceeds the model's context of 32"):
        generate(model, long_prompt, max_new_tokens=10)
    cut = generate(model, long_prompt, max_new_tokens=10, truncate_prompt=True, stop_token_ids=[])
    assert len(cut.tokens[0]) == 10
    assert cut.tokens[0] == reference_greedy(model, long_prompt[0, -22:].tolist(), 10)
    with pytest.raises(MTPError, match="strategy"):
        generate(model, torch.tensor([[1]]), strategy="beam")
    with pytest.raises(MTPError, match="does not fit the model's context of 32"):  # truncating cannot help
        generate(model, long_prompt, max_new_tokens=40, truncate_prompt=True)
    with pytest.raises(MTPError, match="max_new_tokens must be >= 0"):
        generate(model, torch.tensor([[1]]), max_new_tokens=-1)
    with pytest.raises(MTPError, match="sampling is available with strategy greedy or speculative"):
        generate(model, torch.tensor([[1]]), strategy="confadapt", do_sample=True)


def test_use_speculative_spelling_and_streaming():
    model = tiny_mtp("llama", num_heads=3, dtype=torch.float64)
    prompt = torch.tensor([[5, 6, 7]])
    streamed: list[int] = []
    fast = generate(model, prompt, max_new_tokens=12, use_speculative=True, stop_token_ids=[],
                    streamer=lambda row, toks: streamed.extend(toks))
    slow = generate(model, prompt, max_new_tokens=12, use_speculative=False, stop_token_ids=[])
    assert fast.tokens == slow.tokens and streamed == fast.tokens[0]
    assert model.generate(prompt, max_new_tokens=12, use_speculative=True, stop_token_ids=[])[0, 3:].tolist() == \
        fast.tokens[0]  # the method: transformers' convention, prompt + new tokens


@pytest.mark.parametrize("one_hot", [False, True])
def test_acceptance_rule_keeps_the_target_distribution(one_hot):
    """Token after a block = draft if accepted else residual sample: its law must be exactly p (also where the
    drafts come without their distribution, a custom proposer's: each one-hot, whatever picked it)."""
    gen = torch.Generator().manual_seed(0)
    v, n = 5, 200_000
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    q = torch.tensor([0.4, 0.1, 0.1, 0.3, 0.1])
    drafts = torch.multinomial(q, n, replacement=True, generator=gen)[:, None]  # (n, 1)
    target = p.expand(n, 2, v)
    a, nxt = accept_drafts_sampling(target, drafts, None if one_hot else q.expand(n, 1, v), gen)
    first = torch.where(a == 1, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=v).float() / n
    assert torch.allclose(freq, p, atol=0.005)


@pytest.mark.parametrize("strategy, draft_vocab, reads_next", [("greedy", None, False), ("speculative", None, False),
                                                               ("speculative", [0, 2, 3], False),
                                                               ("speculative", None, True)])
def test_sampling_matches_the_model_distribution(strategy, draft_vocab, reads_next):
    """Sample 3000 continuations in one batch; the first two tokens' joint law must be the model's (also when
    the drafts can only be some of the tokens, or come from heads that read the token sampled before them)."""
    model = tiny_mtp("llama", num_heads=3, vocab_size=6, seed=3)
    model.set_draft_vocab(draft_vocab)
    if reads_next:
        model.add_next_token_input()
        torch.nn.init.normal_(model.next_token_in.weight, 0, 0.5)
    prompt = [1, 2]
    n = 3000
    out = generate(model, torch.tensor([prompt] * n), max_new_tokens=2, strategy=strategy, do_sample=True,
                   temperature=1.0, seed=0, stop_token_ids=[])
    assert_first_two_tokens_follow_the_model(model, prompt, out.tokens)


def test_processed_logits_are_what_transformers_warpers_give():
    """Temperature, top-k, top-p and min-p on random logits: the distribution transformers' warpers leave, applied
    in its order."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(0)
    for t, k, p, m in [(1.0, 0, 1.0, 0.1), (0.7, 10, 0.9, 0.05), (1.3, 0, 0.8, 0.2), (1.0, 5, 1.0, 0.0)]:
        logits = torch.randn(4, 50, generator=gen) * 3
        scores = TemperatureLogitsWarper(t)(None, logits.clone())
        warpers = ([TopKLogitsWarper(k)] if k else []) + ([TopPLogitsWarper(p)] if p < 1 else []) + \
            ([MinPLogitsWarper(m)] if m else [])
        for warper in warpers:
            scores = warper(None, scores)
        torch.testing.assert_close(process_logits(logits, t, k, p, m), torch.softmax(scores, -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"tree": "[[0], [1], [0, 0]]", "lookup": 1}])
def test_speculative_sampling_with_min_p_draws_from_the_tokens_min_p_keeps(kw):
    """3000 continuations with min_p 0.6: the first token's frequencies are the model's distribution with the
    tokens below 0.6 times the most likely one dropped (they never appear), chains and trees alike."""
    model = tiny_mtp("llama", num_heads=3, vocab_size=6, seed=3)
    prompt, n = [1, 2], 3000
    out = generate(model, torch.tensor([prompt] * n), max_new_tokens=2, strategy="speculative", do_sample=True,
                   seed=0, stop_token_ids=[], min_p=0.6, **kw)
    with torch.no_grad():
        expected = process_logits(model(torch.tensor([prompt]))[0, -1, 0].float(), min_p=0.6)
    frequencies = torch.bincount(torch.tensor([t[0] for t in out.tokens]), minlength=6).float() / n
    assert (expected == 0).any() and torch.all(frequencies[expected == 0] == 0)
    assert torch.allclose(frequencies, expected, atol=0.03)


def test_sampling_is_reproducible_under_a_seed():
    model = tiny_mtp("gpt2", num_heads=3)
    prompt = torch.tensor([[1, 2, 3]])
    a = generate(model, prompt, max_new_tokens=16, strategy="speculative", do_sample=True, seed=7, top_p=0.9)
    b = generate(model, prompt, max_new_tokens=16, strategy="speculative", do_sample=True, seed=7, top_p=0.9)
    assert a.tokens == b.tokens


def test_adaptive_draft_length_backs_off_with_random_heads_and_stays_exact():
    model = tiny_mtp("llama", num_heads=4, dtype=torch.float64, vocab_size=64)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    adaptive = generate(model, prompt, max_new_tokens=60, strategy="speculative", stop_token_ids=[])
    fixed = generate(model, prompt, max_new_tokens=60, strategy="speculative", stop_token_ids=[],
                     adaptive_draft=False)
    assert adaptive.tokens == fixed.tokens == [reference_greedy(model, [3, 1, 4, 1, 5], 60)]
    proposed = adaptive.stats.draft_positions
    assert proposed[0] > 0
    assert proposed[2] < proposed[0] / 2  # the third draft is rarely verified once the heads prove useless
    assert fixed.stats.draft_positions == [fixed.stats.draft_positions[0]] * 3


def test_adaptive_draft_length_keeps_every_draft_when_all_are_accepted():
    model = copying_model(num_heads=4)
    out = generate(model, torch.tensor([[5, 7, 9]]), max_new_tokens=41, strategy="speculative", stop_token_ids=[])
    assert out.stats.draft_positions == [10, 10, 10] and out.stats.acceptance == [1.0, 1.0, 1.0]


def test_draft_length_rule():
    from mtp.decoding.generate import DraftLength, accepted_per_position

    rule = DraftLength(3, adaptive=True, threshold=0.2, rate=0.5)
    assert rule.next() == 3
    for _ in range(6):  # position 0 accepted half the time, position 1 never
        rule.update(accepted_per_position(torch.tensor([0, 1, 1, 0]), rule.next()), 4)
    assert rule.next() == 1  # 0.5 * ~0 < 0.2: only the first draft pays
    assert DraftLength(3, adaptive=False).next() == 3 and DraftLength(0, adaptive=True).next() == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("strategy", ["greedy", "speculative", "static"])
def test_trunk_observer_sees_each_sequence_once(strategy, family) -> None:
    """on_trunk's kept positions, per row and in call order, are the trunk outputs of prompt + emitted tokens."""
    model = tiny_mtp(family, num_heads=3, seed=5)
    prompts = [[5, 9, 2, 7], [3, 1], [8, 8, 4, 6, 2, 1]]
    ids, mask = left_pad(prompts, pad=0)
    parts: dict[int, list[torch.Tensor]] = {r: [] for r in range(len(prompts))}

    def observe(rows, trunk, kept):
        for r, row in enumerate(rows.tolist()):
            parts[row].append(trunk[r][kept[r].bool()])

    res = generate(model, ids, mask, max_new_tokens=9, strategy=strategy, on_trunk=observe, stop_token_ids=[])
    for row, prompt in enumerate(prompts):
        seq = prompt + res.tokens[row]
        got = torch.cat(parts[row])
        unfed = 1 if strategy != "static" else 3  # static emits 3 tokens a forward, none fed after the last
        assert len(seq) - unfed <= got.shape[0] <= len(seq)
        with torch.no_grad():
            want, _ = model.trunk_forward(torch.tensor([seq]))
        torch.testing.assert_close(got, want[0, : got.shape[0]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("strategy", ["greedy", "speculative"])
def test_an_observer_that_only_queues_work_is_called_before_the_next_step_runs_ahead(strategy, device, monkeypatch):
    """Replayed steps run ahead of the host; an observer that declares it only queues device work (`queues_only`)
    is called before the next step is launched, and keeps them running ahead: it sees each step's own trunk
    outputs (on a CPU the stand-in for a replay runs at its launch, so a later call would see the next step's;
    on a GPU the device runs the copies before the replay). Any other observer turns running ahead off."""
    import mtp.decoding.generate as generate_module

    if device == "cpu":
        monkeypatch.setattr(generate_module, "_use_graphs", lambda graphs, device, proposer: bool(graphs))
    reads_ahead = []
    to_host = generate_module._to_host
    monkeypatch.setattr(generate_module, "_to_host", lambda host: reads_ahead.append(1) or to_host(host))
    model = tiny_mtp("llama", num_heads=3, seed=5).to(device)
    prompts = [[5, 9, 2, 7], [3, 1], [8, 8, 4, 6, 2, 1]]
    ids, mask = (t.to(device) for t in left_pad(prompts, pad=0))

    def observer(queues_only: bool):
        parts: dict[int, list[torch.Tensor]] = {r: [] for r in range(len(prompts))}

        def observe(rows, trunk, kept):  # (a test's copy: on a CPU, copying is device work)
            for r, row in enumerate(rows.tolist()):
                parts[row].append(trunk[r][kept[r].bool()].clone())

        observe.queues_only = queues_only
        return observe, parts

    for queues_only in (True, False):
        reads_ahead.clear()
        observe, parts = observer(queues_only)
        res = generate(model, ids, mask, max_new_tokens=9, strategy=strategy, on_trunk=observe, stop_token_ids=[],
                       graphs=True)
        assert bool(reads_ahead) == queues_only
        for row, prompt in enumerate(prompts):
            seq = prompt + res.tokens[row]
            got = torch.cat(parts[row])
            assert len(seq) - 1 <= got.shape[0] <= len(seq)
            with torch.no_grad():
                want, _ = model.trunk_forward(torch.tensor([seq], device=device))
            torch.testing.assert_close(got, want[0, : got.shape[0]], atol=1e-4, rtol=1e-4)


def test_draft_vocabulary_limits_what_extra_heads_propose():
    model = tiny_mtp("llama", num_heads=4, dtype=torch.float64, vocab_size=64)
    allowed = [3, 5, 8, 13, 21, 34]
    model.set_draft_vocab(allowed)
    prompt = torch.tensor([[1, 2, 3, 4]])
    logits = model(prompt, return_all_heads=True)[0]  # (T, n, V)
    assert set(logits[:, 1:].argmax(-1).flatten().tolist()) <= set(allowed)
    full = tiny_mtp("llama", num_heads=4, dtype=torch.float64, vocab_size=64)(prompt, return_all_heads=True)[0]
    torch.testing.assert_close(logits[:, 0], full[:, 0])  # head 0 keeps the whole vocabulary
    static = generate(model, prompt, max_new_tokens=20, strategy="static", k=4, stop_token_ids=[]).tokens[0]
    assert all(t in allowed for i, t in enumerate(static) if i % 4)  # tokens 2..4 of each block: extra heads
    spec = generate(model, prompt, max_new_tokens=30, strategy="speculative", stop_token_ids=[])
    assert spec.tokens[0] == reference_greedy(model, [1, 2, 3, 4], 30)
    shallow = tiny_mtp("llama", num_heads=2, dtype=torch.float64, vocab_size=64)  # (one draft: nodes are ranks)
    shallow.set_draft_vocab(allowed[:4])
    for tree in ("auto", "dynamic"):  # 8 nodes asked, 4 candidates: the tree ranks no more than 4
        tree_spec = generate(shallow, prompt, max_new_tokens=30, strategy="speculative", stop_token_ids=[], tree=tree,
                             tree_size=8)
        assert tree_spec.tokens[0] == reference_greedy(shallow, [1, 2, 3, 4], 30)
    with pytest.raises(MTPError, match="draft vocabulary"):
        model.set_draft_vocab([70])


def test_non_finite_logits_and_wrong_argument_types_are_one_line_errors():
    model = tiny_mtp("llama", num_heads=2)
    with torch.no_grad():
        model.base.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(MTPError, match="NaN or infinite logits"):
        generate(model, torch.tensor([[1, 2]]), max_new_tokens=3)
    with pytest.raises(MTPError, match="tree must be"):
        generate(tiny_mtp("llama", num_heads=2), torch.tensor([[1, 2]]), max_new_tokens=3, strategy="speculative",
                 tree=5)
    for kw in ({}, {"min_new_tokens": 2}):  # (an end token banned until then: it indexed the logits)
        with pytest.raises(MTPError, match=r"stop_token_ids must be token ids of this model's vocabulary \(0 to "):
            generate(tiny_mtp("llama", num_heads=2), torch.tensor([[1, 2]]), max_new_tokens=3, stop_token_ids=[61],
                     **kw)
    with pytest.raises(MTPError, match="seed must be"):
        generate(tiny_mtp("llama", num_heads=2), torch.tensor([[1, 2]]), max_new_tokens=3, do_sample=True,
                 seed=2**64)


def test_the_public_api_and_one_meaning_per_argument():
    import mtp

    model = tiny_mtp("llama", num_heads=3)
    ids = torch.tensor([[1, 2, 3]])
    out = mtp.generate(model, ids, max_new_tokens=4, use_speculative=True, stop_token_ids=[])
    assert isinstance(out, mtp.GenerationResult) and out.tokens == generate(model, ids, max_new_tokens=4,
                                                                           stop_token_ids=[]).tokens
    assert not hasattr(out, "sequences")  # `sequences` is transformers' prompt + new tokens (model.generate)
    with pytest.raises(mtp.MTPError, match="give one of them"):
        mtp.generate(model, ids, max_new_tokens=4, use_speculative=True, strategy="confadapt")
    with pytest.raises(mtp.MTPError, match="give one of them"):
        mtp.generate(model, ids, max_new_tokens=4, use_speculative=False, strategy="speculative")
    assert mtp.generate(model, ids, max_new_tokens=4, use_speculative=False, strategy="greedy").tokens == out.tokens
    for name in ("load", "generate", "MTPModel", "MaskTokenModel", "DraftTree", "DynamicTree", "MTPError"):
        assert name in mtp.__all__ and getattr(mtp, name) is not None


def test_damaged_rows_are_those_with_a_nan_or_positive_infinite_logit():
    from mtp.decoding.step import damaged_rows

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits = torch.randn(6, 3, 10).to(dtype)
        logits[1, 2, 4] = float("nan")
        logits[2, 0, 0] = float("inf")
        logits[3, 1, :5] = float("-inf")  # masked tokens: not damage
        logits[4, 2, :] = float("-inf")  # every token masked: not damage either
        logits[5, 0, 3], logits[5, 0, 7] = float("inf"), float("-inf")
        expected = (logits.isnan() | logits.isposinf()).any(-1).any(-1)
        assert damaged_rows(logits).tolist() == expected.tolist() == [False, True, True, False, False, True]


_STOP_TOKENIZER = []


@settings(max_examples=80, deadline=None)
@given(tokens=st.lists(st.integers(5, 299), min_size=1, max_size=40), chunks=st.lists(st.integers(1, 4), max_size=20),
       stops=st.lists(st.sampled_from(["Q:", " is", "12.", "eggs", "</s>", "7 + 5"]), max_size=2),
       taken=st.tuples(st.integers(0, 39), st.integers(1, 3)))
def test_stop_strings_cut_at_the_shortest_prefix_that_holds_one(tokens, chunks, stops, taken):
    """`StopChecker.cut` over a row's tokens arriving a few at a time (as accepted blocks do) keeps exactly the
    shortest prefix whose text holds a stop string (searched from scratch over the whole text), or everything.
    One stop string is the text of a few of the row's own tokens, so most rows stop somewhere."""
    from conftest import tiny_tokenizer
    from mtp.decoding.stopping import StopChecker

    if not _STOP_TOKENIZER:
        _STOP_TOKENIZER.append(tiny_tokenizer())
    tok = _STOP_TOKENIZER[0]
    start, length = taken
    own = tok.decode(tokens[start:start + length]).replace("\ufffd", "")
    stops = stops + [own] if own else stops
    if not stops:
        return
    expected = next((j for j in range(1, len(tokens) + 1) if any(s in tok.decode(tokens[:j]) for s in stops)),
                    len(tokens))
    checker, kept, at = StopChecker(1, None, stops, tok), 0, 0
    for size in chunks + [len(tokens)]:
        new = tokens[at:at + size]
        if not new:
            break
        cut = checker.cut(0, new)
        at += len(new)
        if cut is not None:
            kept += cut
            break
        kept += len(new)
    assert kept == expected


@pytest.mark.parametrize("stop", ["中文中文中文", "🙂🙂🙂🙂"])
def test_a_stop_string_of_many_tokens_a_character_is_found(stop):
    """A stop string whose characters take several tokens each (CJK, emoji: 3-4 byte tokens a character in a
    byte-level BPE) ends the row where its last token comes, one token a step: a window of the stop string's
    characters in tokens never held it whole, and decoding went on to its budget."""
    from conftest import tiny_tokenizer
    from mtp.decoding.stopping import StopChecker

    tok = tiny_tokenizer()
    ids = tok("ab" + stop + "cd", add_special_tokens=False).input_ids
    assert len(tok(stop, add_special_tokens=False).input_ids) > len(stop) + 8  # (more tokens than the old window)
    expected = next(j for j in range(1, len(ids) + 1) if stop in tok.decode(ids[:j]))
    checker = StopChecker(1, None, [stop], tok)
    cuts = [checker.cut(0, [t]) for t in ids]
    assert cuts.index(1) + 1 == expected and cuts[:expected - 1] == [None] * (expected - 1)


def test_end_tokens_of_one_token_blocks_as_of_longer_ones():
    """`stop_tokens` on a greedy step's one-token block (its own few kernels) says what it says of the same token
    at the head of a longer block: the row ends when its emitted token is an end token, and a row that emitted
    nothing (finished, or out of budget) does not."""
    from mtp.decoding.stopping import stop_tokens

    gen = torch.Generator().manual_seed(0)
    emitted = torch.randint(0, 6, (64, 1), generator=gen)
    counts = torch.randint(0, 2, (64,), generator=gen)
    stop_ids = torch.tensor([2, 4])
    one = stop_tokens(emitted, counts, stop_ids)
    longer = stop_tokens(torch.cat([emitted, torch.randint(0, 6, (64, 3), generator=gen)], 1), counts, stop_ids)
    assert torch.equal(one[0], longer[0]) and torch.equal(one[1], longer[1])
    assert one[1].any() and not one[1].all()
