"""Repetition, presence and frequency penalties (`mtp.decoding.penalties`): greedy and speculative decoding (chains,
trees, lookup, mask tokens, padded batches, joiners, eager and replayed) emit what a slow reference that penalizes
the whole sequence's logits emits; transformers' `repetition_penalty` gives the same tokens; sampling keeps the
penalized distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_generate import oracle_proposer
from test_graphs import decoding_case, replayed  # noqa: F401  (a fixture)
from test_joining import Arrivals
from test_prefix import assert_entries_hold_what_their_tokens_compute

from conftest import reading_next_token, tiny_mtp
from mtp.decoding.generate import Admission, generate, left_pad
from mtp.decoding.penalties import Penalties
from mtp.decoding.prefixes import PromptCache
from mtp.decoding.reference import reference_greedy
from mtp.decoding.tree import DynamicTree
from mtp.errors import MTPError

PENALTIES = dict(repetition_penalty=1.6, presence_penalty=0.4, frequency_penalty=0.3)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), graphs=st.booleans(), model_kind=st.sampled_from(["heads", "next-token heads", "masks"]))
def test_penalized_decoding_emits_what_the_penalized_reference_emits(data, graphs, model_kind, replayed):  # noqa: F811
    """Random models, greedy and speculative decoding (chains, fixed and dynamic trees, lookup drafts), padded
    batches with stop tokens and rows that join, logit biases, a minimum of new tokens: each row's tokens are the
    reference's, whose every step biases and penalizes the logits for the whole sequence so far and bans the end
    tokens while the answer is short (a verify block's drafts penalized along their path, banned by depth)."""
    model, kw = decoding_case(data.draw, "heads" if model_kind == "next-token heads" else model_kind)
    if model_kind == "next-token heads":
        model = reading_next_token(model, seed=data.draw(st.integers(0, 100)))
    if kw["strategy"] not in ("greedy", "speculative"):
        kw = {"strategy": "greedy"}
    vocab = model.config.vocab_size - (1 if hasattr(model, "mask_token_id") else 0)
    tokens = st.integers(0, vocab - 1)
    bias = data.draw(st.dictionaries(tokens, st.sampled_from([-100.0, -0.3, 0.5, 2.0]), max_size=3))
    penalties = Penalties(data.draw(st.sampled_from([1.0, 0.5, 1.3, 3.0])), data.draw(st.sampled_from([0.0, 0.7, -0.5])),
                          data.draw(st.sampled_from([0.0, 0.4, 2.0])), tuple(sorted(bias.items())),
                          data.draw(st.integers(0, 8)))
    first = [data.draw(st.lists(tokens, min_size=1, max_size=8)) for _ in range(data.draw(st.integers(1, 3)))]
    later = [data.draw(st.lists(tokens, min_size=1, max_size=8)) for _ in range(data.draw(st.integers(0, 2)))]
    budgets = [data.draw(st.integers(1, 12)) for _ in first + later]
    stop = data.draw(st.lists(tokens, max_size=3))
    joining = later and not isinstance(kw.get("tree"), DynamicTree)
    arrivals = Arrivals(later, budgets[len(first):], [0, 2][:len(later)], max_rows=3) if joining else None
    ids, mask = left_pad(first)
    out = generate(model, ids, mask, max_new_tokens=budgets[:len(first)], stop_token_ids=stop, graphs=graphs,
                   adaptive_draft=False, admit=Admission(arrivals, max_rows=3) if joining else None,
                   repetition_penalty=penalties.repetition, presence_penalty=penalties.presence,
                   frequency_penalty=penalties.frequency, logit_bias=bias, min_new_tokens=penalties.min_new_tokens,
                   **kw)
    prompts = first + ([later[i] for i in arrivals.order] if joining else [])
    rows_budgets = budgets[:len(first)] + ([budgets[len(first) + i] for i in arrivals.order] if joining else [])
    assert out.tokens == [reference_greedy(model, p, n, stop, penalties) for p, n in zip(prompts, rows_budgets,
                                                                                          strict=True)]


@pytest.mark.parametrize("kw", [{"strategy": "greedy"}, {"strategy": "speculative"},
                                {"strategy": "speculative", "tree": "[[0], [1], [0, 0], [1, 0]]", "lookup": 2}])
def test_repetition_penalty_gives_what_transformers_gives(kw):
    """transformers' greedy `generate(repetition_penalty=...)` on the trunk and head 0 (the base model), a
    prompt that repeats itself: the same new tokens, through `generate` and through transformers-style
    `model.generate`, which also reads the penalty from the model's generation config."""
    model = tiny_mtp("llama", num_heads=3, seed=4, vocab_size=40)
    prompt = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    hf = model.base.generate(prompt, max_new_tokens=24, do_sample=False, repetition_penalty=3.0, pad_token_id=0,
                             eos_token_id=None)[0, prompt.shape[1]:].tolist()
    plain = model.base.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0,
                                eos_token_id=None)[0, prompt.shape[1]:].tolist()
    assert hf != plain  # (the penalty changes the answer)
    assert generate(model, prompt, max_new_tokens=24, stop_token_ids=[], repetition_penalty=3.0, **kw).tokens == [hf]
    assert model.generate(prompt, max_new_tokens=24, eos_token_id=[], repetition_penalty=3.0,
                          **kw)[0, prompt.shape[1]:].tolist() == hf
    model.generation_config.repetition_penalty = 3.0
    assert model.generate(prompt, max_new_tokens=24, eos_token_id=[], **kw)[0, prompt.shape[1]:].tolist() == hf


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_drafts_that_are_mostly_right_are_penalized_along_their_chain(data):
    """Drafts from the penalized reference itself (an oracle, some corrupted): long runs are accepted, so each
    slot's counts include the drafts before it and the end tokens are banned by each slot's depth, at every
    offset from the minimum: the reference's tokens."""
    model = tiny_mtp("llama", num_heads=data.draw(st.integers(2, 5)), seed=data.draw(st.integers(0, 1000)),
                     dtype=torch.float64, vocab_size=12)
    tokens = st.integers(0, 11)
    prompts = [data.draw(st.lists(tokens, min_size=1, max_size=6)) for _ in range(data.draw(st.integers(1, 3)))]
    penalties = Penalties(data.draw(st.sampled_from([1.0, 1.5])), data.draw(st.sampled_from([0.0, 0.5])),
                          data.draw(st.sampled_from([0.0, 0.3])), (), data.draw(st.integers(0, 10)))
    stop = data.draw(st.lists(tokens, min_size=1, max_size=3))
    reference = [reference_greedy(model, p, 14, stop, penalties) for p in prompts]
    ids, mask = left_pad(prompts)
    out = generate(model, ids, mask, max_new_tokens=14, strategy="speculative", stop_token_ids=stop,
                   adaptive_draft=False, proposer=oracle_proposer(reference, data.draw(st.sampled_from([0.0, 0.3])), 0),
                   repetition_penalty=penalties.repetition, presence_penalty=penalties.presence,
                   frequency_penalty=penalties.frequency, min_new_tokens=penalties.min_new_tokens)
    assert out.tokens == reference


@pytest.mark.parametrize("kw", [{"strategy": "greedy"}, {"strategy": "speculative", "lookup": 2},
                                {"strategy": "speculative", "tree": "[[0], [1], [0, 0], [1, 0]]"}])
def test_min_new_tokens_gives_what_transformers_gives(kw):
    """transformers' `min_new_tokens` with an end token the model emits early: no end token before that many new
    tokens, the same tokens as transformers' greedy (through `generate` and `model.generate`)."""
    model = tiny_mtp("llama", num_heads=3, seed=4, vocab_size=40)
    prompt = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    end = model.base.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, prompt.shape[1]].item()  # (its first token: an early end)
    hf = model.base.generate(prompt, max_new_tokens=16, min_new_tokens=10, do_sample=False, pad_token_id=0,
                             eos_token_id=end)[0, prompt.shape[1]:].tolist()
    assert end not in hf[:10] and len(hf) > 10
    assert generate(model, prompt, max_new_tokens=16, stop_token_ids=[end], min_new_tokens=10, **kw).tokens[0] == \
        hf[: hf.index(end) + 1 if end in hf else 16]
    out = model.generate(prompt, max_new_tokens=16, eos_token_id=end, min_new_tokens=10, pad_token_id=0, **kw)
    assert out[0, prompt.shape[1]:].tolist() == hf


def test_speculative_sampling_keeps_the_penalized_distribution():
    """3000 sampled continuations (chain drafts, then a tree with lookup): the first token's frequencies are the
    model's penalized probabilities given the prompt, the second's after the most likely first token the ones
    penalized for it too."""
    model = tiny_mtp("llama", num_heads=3, vocab_size=6, seed=3)
    prompt, n, penalties = [1, 2], 3000, Penalties(2.0, 0.5, 0.5)

    def probs(ids: list[int], answer: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1, 0].float()  # (V,) (the penalty's sign rule reads raw logits)
        counts = torch.bincount(torch.tensor(answer, dtype=torch.long), minlength=6).float()
        seen = torch.zeros(6, dtype=torch.bool)
        seen[ids] = True
        return torch.softmax(penalties.apply(logits, counts, seen), -1)

    for kw in ({}, {"tree": "[[0], [1], [0, 0]]", "lookup": 1}):
        out = generate(model, torch.tensor([prompt] * n), max_new_tokens=2, strategy="speculative", do_sample=True,
                       seed=0, stop_token_ids=[], repetition_penalty=2.0, presence_penalty=0.5,
                       frequency_penalty=0.5, **kw)
        first = torch.tensor([t[0] for t in out.tokens])
        second = torch.tensor([t[1] for t in out.tokens])
        p1 = probs(prompt, [])
        assert torch.allclose(torch.bincount(first, minlength=6).float() / n, p1, atol=0.03)
        top = int(p1.argmax())
        picked = second[first == top]
        assert torch.allclose(torch.bincount(picked, minlength=6).float() / len(picked), probs(prompt + [top], [top]),
                              atol=0.05)


def test_penalized_answers_are_kept_with_the_keys_their_tokens_give():
    """A prompt cache keeps a penalized row's prompt and answer; heads that read the next token read the penalized
    token the step emitted, not the model's own, so the entry holds what a fresh forward of its tokens computes."""
    for reads_next in (False, True):
        model = tiny_mtp("llama", num_heads=3, seed=5, dtype=torch.float64, vocab_size=40)
        if reads_next:
            model = reading_next_token(model, seed=1, scale=2.0)
        cache = PromptCache(min_tokens=2)
        prompt = list(range(1, 12))
        out = generate(model, torch.tensor([prompt]), max_new_tokens=10, stop_token_ids=[], strategy="speculative",
                       prompt_cache=cache, **PENALTIES)
        (kept, _, _), = cache.entries.values()
        assert kept == tuple(prompt + out.tokens[0][:-1])
        assert_entries_hold_what_their_tokens_compute(model, cache, strategy="speculative", stop_token_ids=[])


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [{"strategy": "greedy"}, {"strategy": "speculative", "lookup": 2},
                                {"strategy": "speculative", "tree": "dynamic", "tree_size": 6}])
def test_cuda_replayed_penalized_decoding_equals_eager_greedy(kw):
    """On a GPU, CUDA graphs of the penalized step (the counts in the state's buffers), fp32: a padded batch's
    tokens are those of eager penalized greedy decoding."""
    model = tiny_mtp("llama", num_heads=3, seed=4, vocab_size=50).to("cuda")
    ids, mask = left_pad([[3, 4, 5, 3, 4, 5, 3, 4], [7, 7, 7], [1, 2, 3, 4, 5, 6]])
    ids, mask = ids.cuda(), mask.cuda()
    graphed = generate(model, ids, mask, max_new_tokens=20, stop_token_ids=[], **PENALTIES, **kw)
    eager = generate(model, ids, mask, max_new_tokens=20, stop_token_ids=[], graphs=False, **PENALTIES)
    assert graphed.tokens == eager.tokens


def test_one_session_replays_every_calls_penalties(replayed):  # noqa: F811
    """The penalties' values and biases are inputs of the captured steps, not constants: calls with other values
    (a server's requests) replay the first call's session, each with its own penalties."""
    model = tiny_mtp("llama", num_heads=3, seed=4, dtype=torch.float64, vocab_size=40)
    ids, mask = left_pad([[3, 4, 5, 3, 4, 5, 3, 4], [7, 7, 7]])
    kw = dict(max_new_tokens=12, stop_token_ids=[], strategy="speculative", lookup=2, graphs=True)
    answers = []
    for penalties in (Penalties(1.5, 0.0, 0.5), Penalties(0.8, 1.0, 0.0, ((5, 3.0),)), Penalties(2.0)):
        out = generate(model, ids, mask, repetition_penalty=penalties.repetition,
                       presence_penalty=penalties.presence, frequency_penalty=penalties.frequency,
                       logit_bias=dict(penalties.bias), **kw)
        assert out.tokens == [reference_greedy(model, p, 12, (), penalties) for p in ([3, 4, 5, 3, 4, 5, 3, 4],
                                                                                      [7, 7, 7])]
        answers.append(out.tokens)
    two_rows = [key for key in model.__dict__["_mtp_decode_sessions"].sessions if key[1] == 2]
    assert len(two_rows) == 1 and len({str(a) for a in answers}) == 3  # (a batch that shrinks has its own too)


def test_compiled_penalized_steps_decode_as_the_reference(monkeypatch):
    """The penalized step through torch.compile (`graphs="compile"`, here on a CPU): one graph, no fallback, the
    reference's tokens, a speculative chain and greedy steps alike."""
    import warnings

    import mtp.decoding.generate as generate_module

    monkeypatch.setattr(generate_module, "_use_graphs", lambda graphs, device, proposer: graphs)
    model = tiny_mtp("llama", num_heads=3, seed=2, vocab_size=50)
    prompts = [[1, 2, 3, 1, 2], [4, 5]]
    ids, mask = left_pad(prompts)
    penalties = Penalties(1.6, 0.4, 0.3, ((7, 2.0),))  # (PENALTIES and the bias below)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mtp: compiling the decoding step failed", category=RuntimeWarning)
        out = generate(model, ids, mask, graphs="compile", max_new_tokens=12, stop_token_ids=[], strategy="speculative",
                       num_draft=1, adaptive_draft=False, **PENALTIES, logit_bias={7: 2.0})
    assert out.tokens == [reference_greedy(model, p, 12, (), penalties) for p in prompts]


def test_a_logit_bias_of_minus_100_bans_a_token_and_100_forces_one():
    """OpenAI's extremes: the answer's most frequent token never appears once banned; a +100 token is every token
    (greedy and speculative alike)."""
    model = tiny_mtp("llama", num_heads=3, seed=4, vocab_size=40)
    prompt = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    kw = dict(max_new_tokens=16, stop_token_ids=[])
    plain = generate(model, prompt, **kw).tokens[0]
    common = max(set(plain), key=plain.count)
    for strategy in ("greedy", "speculative"):
        banned = generate(model, prompt, strategy=strategy, logit_bias={common: -100}, **kw).tokens[0]
        assert common not in banned and len(banned) == 16
        assert generate(model, prompt, strategy=strategy, logit_bias={17: 100}, **kw).tokens[0] == [17] * 16


def test_bad_penalties_are_clear_errors():
    model = tiny_mtp("llama", num_heads=3, seed=2, vocab_size=40)
    ids = torch.tensor([[1, 2, 3]])
    for bad in (0, 1e-46, float("inf")):  # (fp32 divides by it: bounded)
        with pytest.raises(MTPError, match=r"repetition_penalty must be (in \[0.01, 100\]|a finite number)"):
            generate(model, ids, max_new_tokens=2, repetition_penalty=bad)
    numpy_id = generate(model, ids, max_new_tokens=4, stop_token_ids=[], logit_bias={np.int64(5): 100.0}).tokens
    assert numpy_id == [[5] * 4]  # (numpy's integers are token ids too)
    with pytest.raises(MTPError, match=r"presence_penalty must be in \[-2, 2\]"):
        generate(model, ids, max_new_tokens=2, presence_penalty=3)
    with pytest.raises(MTPError, match="frequency_penalty changes the logits greedy or speculative"):
        generate(model, ids, max_new_tokens=2, strategy="confadapt", frequency_penalty=0.5)
    with pytest.raises(MTPError, match="logit_bias changes the logits greedy or speculative"):
        generate(model, ids, max_new_tokens=2, strategy="static", logit_bias={1: 2.0})
    for bad, says in (({40: 1.0}, "40 is not a token id of this model"), ({"3": 1.0}, "'3' is not a token id"),
                      ({3: 101}, r"must be a number in \[-100, 100\], got 101"), ([3], "must be a mapping")):
        with pytest.raises(MTPError, match=says):
            generate(model, ids, max_new_tokens=2, logit_bias=bad)
