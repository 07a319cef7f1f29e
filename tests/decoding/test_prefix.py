"""A prompt prefix fed once (`generate(prefix=...)`): prompts that start with it decode exactly as without it,
eager and replayed, in a batch and joining one, while the model sees the prefix's tokens once."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_graphs import decoding_case, replayed  # noqa: F401  (a fixture)
from test_joining import Arrivals

from conftest import reading_next_token, tiny_mtp
from mtp.decoding.generate import Admission, common_prefix, generate, left_pad
from mtp.decoding.prefixes import PromptCache
from mtp.decoding.tree import DynamicTree
from mtp.errors import MTPError


def fed_tokens(model) -> list[int]:
    """Counts, per forward, the token positions the model's embedding sees (a list the hook appends to)."""
    seen: list[int] = []
    model.base.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    return seen


def assert_entries_hold_what_their_tokens_compute(model, cache: PromptCache, **opts) -> None:
    """Every entry of `cache` holds, in every stack, the keys and values its tokens' own prompt step computes
    (float64), but at its last slot (which no prompt loads: there a head that reads the next token read a guess)."""
    for tokens, entry, _ in list(cache.entries.values()):
        fresh = PromptCache(min_tokens=1)
        generate(model, torch.tensor([[*tokens, 0]]), prompt_cache=fresh, **{**opts, "max_new_tokens": 1})
        whole = next(e for t, e, _ in fresh.entries.values() if t[: len(tokens)] == tokens)
        for kept, computed in zip(entry.stacks, whole.stacks, strict=True):
            assert (kept.kv is None) == (computed.kv is None)
            if kept.kv is not None:
                n = len(tokens) - 1
                torch.testing.assert_close(kept.kv[..., :n, :], computed.kv[..., :n, :], rtol=0, atol=1e-9)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), graphs=st.booleans(), model_kind=st.sampled_from(["heads", "next-token heads", "masks"]))
def test_prompts_that_start_with_the_prefix_decode_as_without_it(data, graphs, model_kind, replayed):  # noqa: F811
    """Random models (heads, heads that read the next token, mask tokens), every strategy (trees, lookup), padded
    batches in which some prompts start with the prefix and some do not (or are the prefix itself), and, where the
    strategy takes them, prompts that join: every row's tokens are those it gets without a prefix, and its drafts
    are accepted as often (the heads' and masks' keys over the prefix are the same)."""
    model, kw = decoding_case(data.draw, "heads" if model_kind == "next-token heads" else model_kind)
    if model_kind == "next-token heads":
        model = reading_next_token(model, seed=data.draw(st.integers(0, 100)))
    vocab = model.config.vocab_size - (1 if hasattr(model, "mask_token_id") else 0)
    tokens = st.integers(0, vocab - 1)
    prefix = data.draw(st.lists(tokens, min_size=2, max_size=10))

    def prompt() -> list[int]:
        rest = data.draw(st.lists(tokens, max_size=6))
        return (rest or [0]) if data.draw(st.integers(0, 4)) == 0 else prefix + rest  # (some without the prefix)

    first = [prompt() for _ in range(data.draw(st.integers(1, 4)))]
    later = [prompt() for _ in range(data.draw(st.integers(0, 3)))]
    budgets = [data.draw(st.integers(1, 10)) for _ in first + later]
    stop = data.draw(st.lists(tokens, max_size=1))
    joining = later and kw["strategy"] in ("greedy", "speculative") and not isinstance(kw.get("tree"), DynamicTree)

    def run(with_prefix: bool):
        arrivals = Arrivals(later, budgets[len(first):], [0, 2, 3][:len(later)], max_rows=3) if joining else None
        ids, mask = left_pad(first)
        out = generate(model, ids, mask, max_new_tokens=budgets[:len(first)], stop_token_ids=stop, graphs=graphs,
                       prefix=prefix if with_prefix else None, adaptive_draft=False,  # (steps not timed)
                       # (room for a joiner's loaded slots and its rest padded to a prompt width, replaying)
                       admit=Admission(arrivals, max_rows=max(3, len(first)), room=160) if joining else None, **kw)
        return out.tokens, arrivals.order if joining else [], out.stats.draft_accepted

    assert run(True) == run(False)


def test_the_prefix_is_fed_once_and_counted_as_one_forward():
    """A batch of prompts that share a 20-token prefix: the model sees the prefix's tokens once, not once per
    prompt (its last token again, with each prompt's rest), and the statistics count its forward."""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)
    prefix = list(range(1, 21))
    prompts = [prefix + [30, 31], prefix + [32], prefix + [33, 34, 35]]
    ids, mask = left_pad(prompts)
    seen = fed_tokens(model)
    plain = generate(model, ids, mask, max_new_tokens=6, stop_token_ids=[], strategy="speculative")
    fed_plain, seen[:] = list(seen), []
    shared = generate(model, ids, mask, max_new_tokens=6, stop_token_ids=[], strategy="speculative", prefix=prefix)
    assert shared.tokens == plain.tokens
    assert fed_plain[0] == 3 * 23  # the prompt step: three rows as wide as the longest prompt
    assert seen[:2] == [20, 3 * 4]  # the prefix, then each prompt's rest after the prefix's last-but-one token
    assert shared.stats.forward_passes == plain.stats.forward_passes + 1


@pytest.mark.parametrize("kw", [{"strategy": "static", "k": 3}, {"strategy": "confadapt", "tau": 0.0}])
def test_heads_that_read_the_next_token_read_the_one_after_the_prefix(kw):
    """The prefix's last token is fed again with the prompt's rest: at the prefix's last-but-one position a head
    that reads the next token reads the prefix's last one, and at its last the prompt's first token after it
    (not the model's guess). The lossy strategies emit the heads' drafts as they are: equal tokens say so."""
    for seed in range(3):
        model = reading_next_token(tiny_mtp("llama", num_heads=3, seed=seed, dtype=torch.float64, vocab_size=30),
                                   seed=seed)
        prefix = [3, 4, 5, 6, 7, 8]
        ids, mask = left_pad([prefix + [1, 2], prefix + [9]])
        opts = dict(max_new_tokens=12, stop_token_ids=[], **kw)
        assert generate(model, ids, mask, prefix=prefix, **opts).tokens == generate(model, ids, mask, **opts).tokens


def test_joining_prompts_start_from_the_prefix_computed_once(replayed):  # noqa: F811
    """Prompts that join a batch reuse the prefix the first prompts computed (no second forward over it), and one
    that does not start with it is fed whole; every row decodes as alone."""
    model = tiny_mtp("llama", num_heads=3, seed=4, dtype=torch.float64, vocab_size=40)
    prefix = [7, 8, 9, 10, 11, 12, 13, 14]
    later = [prefix + [2, 3], [5, 6, 7], prefix + [1]]
    for graphs in (False, True):
        seen = fed_tokens(model)
        arrivals = Arrivals(later, [5, 6, 7], [1, 2, 2], max_rows=3)
        out = generate(model, torch.tensor([prefix + [4]]), max_new_tokens=8, stop_token_ids=[], graphs=graphs,
                       strategy="speculative", prefix=prefix, admit=Admission(arrivals, max_rows=3))
        alone = [generate(model, torch.tensor([p]), max_new_tokens=n, stop_token_ids=[],
                          strategy="speculative").tokens[0]
                 for p, n in zip([prefix + [4], *[later[i] for i in arrivals.order]],
                                 [8, *[[5, 6, 7][i] for i in arrivals.order]], strict=True)]
        assert arrivals.order == [0, 1, 2] and out.tokens == alone
        assert seen.count(len(prefix)) == 1  # the prefix's forward, once
        model.base.get_input_embeddings()._forward_hooks.clear()


def test_a_seeded_sampled_batch_draws_as_without_the_prefix():
    """The prefix's forward draws nothing: a seeded sampled batch emits what it emits without it."""
    model = tiny_mtp("llama", num_heads=3, seed=5, dtype=torch.float64, vocab_size=40)
    prefix = [3, 4, 5, 6, 7]
    ids, mask = left_pad([prefix + [1, 2], prefix + [9]])
    kw = dict(max_new_tokens=10, stop_token_ids=[], strategy="speculative", do_sample=True, seed=3,
              adaptive_draft=False)
    assert generate(model, ids, mask, prefix=prefix, **kw).tokens == generate(model, ids, mask, **kw).tokens


def test_bad_prefixes_are_clear_errors():
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)
    with pytest.raises(MTPError, match="out of range|vocabulary"):
        generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, prefix=[1, 99])
    with pytest.raises(MTPError, match="on_trunk"):
        generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, prefix=[1, 2],
                 on_trunk=lambda rows, trunk, kept: None)
    with pytest.raises(MTPError, match="prompt_cache must be a"):
        generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, prompt_cache={})
    # an empty or one-token prefix holds nothing to reuse: decoding as without one
    for prefix in ([], [1]):
        assert generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4, prefix=prefix).tokens == \
            generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4).tokens


def test_common_prefix():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
    assert common_prefix([[1, 2, 3]]) == [1, 2, 3]
    assert common_prefix([[1, 2], [3]]) == [] and common_prefix([]) == []
    assert common_prefix([torch.tensor([4, 5, 6]), (4, 5)]) == [4, 5]


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [{"strategy": "greedy"}, {"strategy": "speculative", "lookup": 2},
                                {"strategy": "speculative", "tree": "auto", "tree_size": 4}],
                         ids=["greedy", "chain-lookup", "tree"])
def test_cuda_replayed_prompts_from_the_prefix_decode_as_eager_without_it(kw):
    """On a GPU, replayed graphs: a batch, and prompts that join it, starting from the prefix's cache (its slots,
    then each prompt's rest padded to a prompt width a graph was captured for) decode as eager fp32 decoding
    decodes them whole."""
    model = tiny_mtp("llama", num_heads=3, seed=3, vocab_size=50).to("cuda")
    prefix = list(range(1, 40))
    first, later = [prefix + [5, 6], prefix + [7]], [prefix + [8, 9, 10], [4, 3, 2], prefix + [11]]
    arrivals = Arrivals(later, [12, 9, 5], [0, 2, 3], max_rows=4)
    ids, mask = left_pad(first)
    out = generate(model, ids.cuda(), mask.cuda(), max_new_tokens=12, stop_token_ids=[], prefix=prefix,
                   admit=Admission(arrivals, max_rows=4), **kw)
    rows = first + [later[i] for i in arrivals.order]
    limits = [12, 12, *[[12, 9, 5][i] for i in arrivals.order]]
    alone = [generate(model, torch.tensor([p], device="cuda"), max_new_tokens=n, stop_token_ids=[], graphs=False,
                      **kw).tokens[0] for p, n in zip(rows, limits, strict=True)]
    assert len(arrivals.order) == 3 and out.tokens == alone


# ------------------------------------------------------------------------------------------------ PromptCache
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), graphs=st.booleans(), model_kind=st.sampled_from(["heads", "next-token heads", "masks"]))
def test_calls_that_share_a_prompt_cache_decode_as_without_it(data, graphs, model_kind, replayed):  # noqa: F811
    """A conversation's turns (each prompt the one before, most often its answer, and a new message) and prompts
    that share only their start, as batches and one at a time, through one `PromptCache`, every strategy and
    drafter: each call emits what it emits without the cache, its drafts accepted as often (the keys and values
    it starts from are those its prompt's step computes), and later calls start from earlier prompts and answers."""
    model, kw = decoding_case(data.draw, "heads" if model_kind == "next-token heads" else model_kind)
    if model_kind == "next-token heads":
        model = reading_next_token(model, seed=data.draw(st.integers(0, 100)))
    vocab = model.config.vocab_size - (1 if hasattr(model, "mask_token_id") else 0)
    tokens = st.integers(0, vocab - 1)
    cache = PromptCache(min_tokens=2)
    first = data.draw(st.lists(tokens, min_size=3, max_size=10))
    others = [[], [first[:2] + data.draw(st.lists(tokens, min_size=1, max_size=4))], [], [first]]  # (its start only)
    opts = dict(max_new_tokens=data.draw(st.integers(1, 8)), stop_token_ids=data.draw(st.lists(tokens, max_size=1)),
                adaptive_draft=False, **kw)
    turn = first
    for others_in_batch in others:
        ids, mask = left_pad([turn, *others_in_batch])
        with_cache = generate(model, ids, mask, graphs=graphs, prompt_cache=cache, **opts)
        without = generate(model, ids, mask, graphs=graphs, **opts)
        assert with_cache.tokens == without.tokens
        assert with_cache.stats.draft_accepted == without.stats.draft_accepted
        assert_entries_hold_what_their_tokens_compute(model, cache, graphs=graphs, **opts)
        answer = with_cache.tokens[0] if data.draw(st.integers(0, 3)) else []
        turn = turn + answer + data.draw(st.lists(tokens, min_size=1, max_size=6))  # the next turn
    assert cache.hits >= 3  # (each turn starts from the one before it)


def test_a_conversation_feeds_only_its_new_turn_and_keeps_its_latest_answer():
    """Each turn of a conversation feeds only its new message: the previous turn's prompt and answer (but for the
    answer's last token, never fed, and the one before it, fed again) come from the cache, which holds one entry
    for the conversation: its latest prompt and answer."""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)
    cache = PromptCache(min_tokens=4)
    seen = fed_tokens(model)
    kw = dict(max_new_tokens=6, stop_token_ids=[], strategy="speculative")
    turn1 = list(range(1, 31))
    out1 = generate(model, torch.tensor([turn1]), prompt_cache=cache, **kw)
    assert [tokens for tokens, _, _ in cache.entries.values()] == [tuple(turn1 + out1.tokens[0][:-1])]
    turn2 = turn1 + out1.tokens[0] + [33, 34, 35]
    seen[:] = []
    out2 = generate(model, torch.tensor([turn2]), prompt_cache=cache, **kw)
    assert seen[0] == 5  # the answer's last two tokens and the new message
    assert out2.tokens == generate(model, torch.tensor([turn2]), **kw).tokens
    assert [tokens for tokens, _, _ in cache.entries.values()] == [tuple(turn2 + out2.tokens[0][:-1])]
    assert cache.hits == 1 and cache.reused_tokens == len(turn2) - 5


def test_answers_are_kept_without_the_positions_plain_steps_left_to_catch_up():
    """Speculative steps the gate turns plain leave the extra heads' keys of their positions for later: an answer
    that ends before they are caught up is kept without them, so a later prompt computes them, and decodes (with
    the same drafts accepted) as without the cache."""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)
    gen = dict(max_new_tokens=12, stop_token_ids=[], strategy="speculative", adaptive_draft=True)
    cache = PromptCache(min_tokens=2)
    prompts = [list(range(1, 21)), list(range(5, 30))]
    ids, mask = left_pad(prompts)
    asked = []  # plain steps, but for one that catches up and drafts (the third) and one that verifies

    def faster_kind(self) -> bool:
        asked.append(1)
        return len(asked) == 3

    with patch("mtp.decoding.blocks.SpeculationGate._faster_kind", faster_kind):
        out = generate(model, ids, mask, prompt_cache=cache, **gen)  # (two rows: the gate is on)
    assert out.stats.draft_positions == [2, 2]  # (one verifying step)
    (tokens, _, _), = [e for e in cache.entries.values() if e[0][0] == 1]
    assert len(prompts[0]) < len(tokens) < len(prompts[0]) + len(out.tokens[0]) - 1  # no plain step's position
    assert tokens == tuple(prompts[0] + out.tokens[0])[: len(tokens)]
    assert_entries_hold_what_their_tokens_compute(model, cache, **gen)
    turn = prompts[0] + out.tokens[0] + [7, 8]
    with_cache = generate(model, torch.tensor([turn]), prompt_cache=cache, **gen)
    without = generate(model, torch.tensor([turn]), **gen)
    assert with_cache.tokens == without.tokens and with_cache.stats.draft_accepted == without.stats.draft_accepted
    assert cache.hits == 1


@pytest.mark.parametrize("reads_next", [False, True], ids=["heads", "next-token-heads"])
def test_a_sampled_conversation_decodes_as_without_the_cache(reads_next):
    """Seeded speculative sampling, turn after turn through one `PromptCache`: the same tokens and drafts accepted
    as without it, each answer kept with its prompt; heads that read the next token read the one drawn there,
    so their keys are the sequence's too (the entries hold what a fresh forward of their tokens computes)."""
    model = tiny_mtp("llama", num_heads=3, seed=5, dtype=torch.float64, vocab_size=40)
    if reads_next:
        model = reading_next_token(model, seed=1, scale=2.0)
    kw = dict(max_new_tokens=12, stop_token_ids=[], strategy="speculative", do_sample=True, temperature=1.5,
              seed=3, adaptive_draft=False)
    cache = PromptCache(min_tokens=2)
    turn = list(range(1, 12))
    for message in ([20, 21], [22, 23, 24], [25]):
        with_cache = generate(model, torch.tensor([turn]), prompt_cache=cache, **kw)
        without = generate(model, torch.tensor([turn]), **kw)
        assert with_cache.tokens == without.tokens
        assert with_cache.stats.draft_accepted == without.stats.draft_accepted
        (kept, _, _), = cache.entries.values()
        assert kept == tuple(turn + with_cache.tokens[0][:-1])
        assert_entries_hold_what_their_tokens_compute(model, cache, **kw)
        turn = turn + with_cache.tokens[0] + message


@pytest.mark.parametrize("graphs", [False, True])
def test_greedy_sampled_and_penalized_rows_answers_are_kept_from_one_batch(graphs, replayed):  # noqa: F811
    """Heads that read the next token, one batch of a greedy row, a sampled row and a penalized greedy row (a
    server's requests with their own settings): every row's prompt and answer are kept (the heads read the tokens
    each row emitted), and every entry holds what its tokens compute."""
    model = reading_next_token(tiny_mtp("llama", num_heads=3, seed=5, dtype=torch.float64, vocab_size=40),
                               seed=1, scale=2.0)
    cache = PromptCache(min_tokens=2)
    prompts = [list(range(1, 12)), list(range(12, 20)), list(range(20, 29))]
    ids, mask = left_pad(prompts)
    out = generate(model, ids, mask, max_new_tokens=10, stop_token_ids=[], strategy="speculative", seed=3,
                   adaptive_draft=False, prompt_cache=cache, graphs=graphs, do_sample=[False, True, False],
                   temperature=1.5,
                   repetition_penalty=[1.0, 1.0, 2.0])
    kept = {tokens for tokens, _, _ in cache.entries.values()}
    assert kept == {tuple(p + t[:-1]) for p, t in zip(prompts, out.tokens, strict=True)}
    assert_entries_hold_what_their_tokens_compute(model, cache, strategy="speculative", stop_token_ids=[])


@pytest.mark.cuda
def test_cuda_a_conversation_through_a_prompt_cache_decodes_as_eager_without_it():
    """On a GPU, replayed graphs: a conversation's turns, each starting from the turn before it in the prompt
    cache (copied out of the session's cache, loaded into the next one's), decode as eager fp32 decoding
    decodes their whole prompts."""
    model = tiny_mtp("llama", num_heads=3, seed=3, vocab_size=50).to("cuda")
    cache = PromptCache(min_tokens=4)
    prompt = list(range(1, 30))
    for turn in range(3):
        ids = torch.tensor([prompt], device="cuda")
        kw = dict(max_new_tokens=10, stop_token_ids=[], strategy="speculative", lookup=2)
        out = generate(model, ids, prompt_cache=cache, **kw)
        assert out.tokens == generate(model, ids, graphs=False, **kw).tokens
        prompt = prompt + out.tokens[0] + [40 + turn, 41 + turn]
    assert cache.hits == 2


def test_entries_of_fp32_layers_are_not_loaded_by_fp16_packed_decoding():
    """fp16-packed decoding layers (`fp16_decoding`, `--quantize fp16`) compute other keys from the same fp32
    parameters: a prompt decoded with them does not start from an entry the fp32 layers made, and back."""
    from mtp.models.quantize import fp16_decoding

    model = tiny_mtp("llama", num_heads=3, seed=2, vocab_size=40)
    cache = PromptCache(min_tokens=4)
    prompt = list(range(1, 21))
    kw = dict(max_new_tokens=4, stop_token_ids=[], prompt_cache=cache)
    generate(model, torch.tensor([prompt]), **kw)
    with fp16_decoding(model):
        generate(model, torch.tensor([prompt + [5]]), **kw)
    assert cache.hits == 0 and len(cache.entries) == 2
    generate(model, torch.tensor([prompt + [6]]), **kw)  # fp32 again: the fp32 entry
    assert cache.hits == 1


def test_a_long_prompt_and_one_loaded_from_an_entry_allocate_their_buffers_once(monkeypatch):
    """A prompt past the cache's first capacity, and a row loaded from a prompt-cache entry, grow at their next
    step (the first decoding step; the prompt's last token at least): their buffers are made that large at once,
    not made and then copied into buffers twice as large at that step (a copy of every stack)."""
    from mtp.models.cache import StackCache

    regrown: list[int] = []
    reserve = StackCache.reserve

    def counted(self, slots):
        if self.kv is not None and self.kv.shape[4] < slots:
            regrown.append(slots)
        reserve(self, slots)

    monkeypatch.setattr(StackCache, "reserve", counted)
    model = tiny_mtp("llama", num_heads=3, seed=2, vocab_size=40, context=2048)
    cache = PromptCache(min_tokens=2)
    prompt = [(7 * i) % 37 + 1 for i in range(600)]  # more than twice a cache's first capacity
    kw = dict(max_new_tokens=4, stop_token_ids=[], strategy="speculative")
    first = generate(model, torch.tensor([prompt]), prompt_cache=cache, **kw)
    assert not regrown, regrown
    turn = prompt + first.tokens[0] + [5, 6, 7]
    again = generate(model, torch.tensor([turn]), prompt_cache=cache, **kw)
    assert cache.hits == 1 and not regrown, regrown
    assert again.tokens == generate(model, torch.tensor([turn]), **kw).tokens
