"""Log-probabilities of the emitted tokens (`generate(logprobs=k)`): the model's own scores of the tokens, as a
forward over the whole sequence gives them, whatever the strategy, drafter, batch or replay path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_generate import oracle_proposer
from test_graphs import LOSSLESS, decoding_case
from test_mask_decoding import mask_model

import mtp.decoding.generate as generate_module
import mtp.decoding.logprobs as logprobs_module
from conftest import tiny_mtp
from mtp.decoding.generate import generate, left_pad
from mtp.decoding.logprobs import TokenLogprob, prompt_logprobs, prompts_logprobs, score_rows
from mtp.decoding.reference import reference_greedy
from mtp.errors import MTPError


def assert_scores_follow_the_model(model, prompts: list[list[int]], tokens: list[list[int]],
                                   scores: list[list[TokenLogprob]], top: int, greedy: bool) -> None:
    """Each row's scores are those a forward over its prompt and tokens gives (`prompt_logprobs`, the
    reference): its own tokens, their log-probabilities, the `top` most likely tokens and theirs."""
    for prompt, row_tokens, row_scores in zip(prompts, tokens, scores, strict=True):
        expected = prompt_logprobs(model, prompt + row_tokens, top)[len(prompt):]
        assert [e.token for e in row_scores] == row_tokens == [e.token for e in expected]
        for got, want in zip(row_scores, expected, strict=True):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
            assert len(got.top) == top
            assert [lp for _, lp in got.top] == pytest.approx([lp for _, lp in want.top], abs=1e-5)
            assert all(a[1] >= b[1] for a, b in zip(got.top, got.top[1:], strict=False))  # most likely first
            if greedy and top:  # the token emitted is the most likely one (its score, even where two tie)
                assert got.logprob == got.top[0][1]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data(), graphs=st.booleans())
def test_emitted_tokens_log_probabilities_are_the_models(data, graphs, monkeypatch):
    """Greedy and speculative decoding (chains, trees, dynamic trees, lookup drafts; heads and mask tokens),
    padded batches whose rows end at different steps, eager or replayed: asking for log-probabilities changes no
    token, and each token's is the model's score of it after the tokens before it."""
    monkeypatch.setattr(generate_module, "_use_graphs", lambda graphs, device, proposer: bool(graphs))
    model, kw = decoding_case(data.draw, data.draw(st.sampled_from(["heads", "masks"])))
    assume(kw["strategy"] in LOSSLESS)
    vocab = model.config.vocab_size - (1 if hasattr(model, "mask_token_id") else 0)
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8))
               for _ in range(data.draw(st.integers(1, 4)))]
    budgets = [data.draw(st.integers(0, 12)) for _ in prompts]
    stop = data.draw(st.lists(st.integers(0, vocab - 1), max_size=1))
    top = data.draw(st.integers(0, 4))
    ids, mask = left_pad(prompts)
    plain = generate(model, ids, mask, max_new_tokens=budgets, stop_token_ids=stop, graphs=False, **kw)
    scored = generate(model, ids, mask, max_new_tokens=budgets, stop_token_ids=stop, graphs=graphs, logprobs=top,
                      **kw)
    assert scored.tokens == plain.tokens and plain.logprobs is None
    assert_scores_follow_the_model(model, prompts, scored.tokens, scored.logprobs, top, greedy=True)


@pytest.mark.parametrize("corrupt", [0.0, 0.3])
def test_accepted_chains_are_scored_token_by_token(corrupt):
    """Drafts that are often right (an oracle's, some corrupted): rows accept different lengths of a chain, each
    kept draft scored by the slot before it."""
    model = tiny_mtp("gpt2", num_heads=4, seed=2, dtype=torch.float64, vocab_size=40)
    prompts = [[1, 2, 3], [4, 5], [6]]
    reference = [reference_greedy(model, p, 24) for p in prompts]
    ids, mask = left_pad(prompts)
    res = generate(model, ids, mask, max_new_tokens=24, strategy="speculative", stop_token_ids=[], logprobs=2,
                   proposer=oracle_proposer(reference, corrupt, 0), adaptive_draft=False)
    assert res.tokens == reference and res.stats.tokens_per_forward > 1.5
    assert_scores_follow_the_model(model, prompts, res.tokens, res.logprobs, 2, greedy=True)


def test_sampled_tokens_are_scored_by_the_model_before_temperature():
    """Exact speculative sampling (a tree and lookup drafts): the scores are the model's raw distribution's,
    whatever temperature and top-p drew the tokens."""
    model = tiny_mtp("llama", num_heads=3, seed=3, dtype=torch.float64, vocab_size=30)
    prompts = [[1, 2, 3, 1, 2, 3], [4, 5]]
    ids, mask = left_pad(prompts)
    res = generate(model, ids, mask, max_new_tokens=16, strategy="speculative", do_sample=True, temperature=0.7,
                   top_p=0.9, seed=1, tree="dynamic", tree_size=4, lookup=2, stop_token_ids=[], logprobs=3)
    assert all(len(t) == 16 for t in res.tokens)
    assert_scores_follow_the_model(model, prompts, res.tokens, res.logprobs, 3, greedy=False)


def test_the_streamer_gets_each_steps_scores():
    model = tiny_mtp("llama", num_heads=3, seed=1, dtype=torch.float64, vocab_size=30)
    seen: dict[int, list] = {0: [], 1: []}

    def streamer(row, new, logprobs):
        assert [s.token for s in logprobs] == new
        seen[row].extend(logprobs)

    ids, mask = left_pad([[1, 2, 3], [4]])
    res = generate(model, ids, mask, max_new_tokens=10, strategy="speculative", logprobs=1, streamer=streamer)
    assert [seen[0], seen[1]] == res.logprobs


@pytest.mark.parametrize("kw, message", [
    ({"strategy": "confadapt"}, "logprobs: the model's log-probabilities of the tokens it verified"),
    ({"strategy": "static"}, "logprobs: the model's log-probabilities of the tokens it verified"),
    ({"logprobs": 21}, "logprobs must be in [0, 20], got 21"),
    ({"logprobs": -1}, "logprobs must be in [0, 20], got -1"),
])
def test_log_probabilities_come_with_the_strategies_that_verify(kw, message):
    model = tiny_mtp("llama", num_heads=3, vocab_size=30)
    with pytest.raises(MTPError, match=r"^" + message.replace("[", r"\[").replace("]", r"\]")):
        generate(model, torch.tensor([[1, 2]]), max_new_tokens=4, **({"logprobs": 2} | kw))


def test_a_prompts_first_token_has_no_score():
    model = tiny_mtp("llama", num_heads=2, seed=5, dtype=torch.float64, vocab_size=30)
    scores = prompt_logprobs(model, [3, 4, 5], top=2)
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5]]))[0, :, 0].log_softmax(-1)  # (3, V)
    assert scores[0] is None and [s.token for s in scores[1:]] == [4, 5]
    assert [s.logprob for s in scores[1:]] == pytest.approx([float(logits[0, 4]), float(logits[1, 5])])
    assert prompt_logprobs(model, [7]) == [None]


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [{"strategy": "greedy"}, {"strategy": "speculative", "tree": "dynamic", "tree_size": 5,
                                                         "lookup": 3}], ids=["greedy", "dynamic-tree-lookup"])
def test_cuda_graphs_score_as_eager_decoding(kw):
    model = tiny_mtp("llama", num_heads=3, seed=7, vocab_size=50).to("cuda")
    ids, mask = left_pad([[1, 2, 3, 1, 2, 3], [4, 5], [6, 7, 8]])
    ids, mask = ids.cuda(), mask.cuda()
    eager = generate(model, ids, mask, max_new_tokens=20, stop_token_ids=[11], graphs=False, adaptive_draft=False,
                     logprobs=2, **kw)
    for graphs in (True, "compile"):
        replay = generate(model, ids, mask, max_new_tokens=20, stop_token_ids=[11], graphs=graphs,
                          adaptive_draft=False, logprobs=2, **kw)
        assert replay.tokens == eager.tokens
        for got, want in zip(sum(replay.logprobs, []), sum(eager.logprobs, []), strict=True):
            assert got.token == want.token and got.logprob == pytest.approx(want.logprob, abs=1e-4)


@pytest.mark.parametrize("make", [lambda: tiny_mtp("llama", num_heads=3, seed=8, dtype=torch.float64, vocab_size=40),
                                  lambda: tiny_mtp("gpt2", num_heads=2, seed=9, dtype=torch.float64, vocab_size=40),
                                  lambda: mask_model("llama", "gated-lora", seed=4, vocab=40)],
                         ids=["llama", "gpt2", "mask-tokens"])
def test_rows_are_scored_together_as_each_alone(make, monkeypatch):
    """`score_rows` (lm-eval's loglikelihood, echo): rows of different lengths right-padded into forwards of a
    few tokens at most, the positions unembedded a few at a time, score every token from its row's start as a
    forward over that row alone does: log-probabilities, whether each is the argmax, the top k."""
    monkeypatch.setattr(logprobs_module, "UNEMBEDDED_ROWS", 3)
    model = make()
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 39, (n,), generator=gen).tolist() for n in (9, 2, 5, 1, 12, 5, 3)]
    starts = [4, 1, 5, 1, 1, 2, 3]  # (a row may have nothing to score: start == its length)
    for most in (1, 20, 1000):  # one row a forward, a few, all together
        scored = score_rows(model, rows, starts, top=3, max_tokens=most)
        for row, start, s in zip(rows, starts, scored, strict=True):
            with torch.no_grad():
                logp = model(torch.tensor([row]))[0, :, 0].log_softmax(-1)[start - 1:-1]  # (n, V)
            target = torch.tensor(row[start:], dtype=torch.long)
            assert s.logprobs.shape == (len(row) - start,) and s.top_ids.shape == (len(row) - start, 3)
            assert torch.allclose(s.logprobs.double(), logp.gather(1, target[:, None])[:, 0].float().double(),
                                  atol=1e-5)
            assert torch.equal(s.greedy, logp.argmax(-1) == target)
            assert torch.equal(s.top_ids, logp.topk(3, -1).indices)
    assert [p and [t.token for t in p[1:]] for p in prompts_logprobs(model, [rows[1], [5], rows[0]])] == \
        [rows[1][1:], [], rows[0][1:]]
    with pytest.raises(ValueError, match="start at index 1"):
        score_rows(model, [[1, 2]], [0])
