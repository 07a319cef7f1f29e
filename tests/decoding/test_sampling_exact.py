"""Speculative sampling's joint law of the first tokens, by a chi-square test against the model's own
probabilities enumerated token by token: for rows that join a running batch (`Admission`) while the speculation
gate takes plain steps, which the other distribution tests do not reach. The test's false-alarm rate is 1e-6."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import tiny_mtp
from mtp.decoding.blocks import SpeculationGate
from mtp.decoding.generate import Admission, generate, left_pad
from mtp.decoding.penalties import Penalties
from mtp.decoding.reference import reference_greedy
from mtp.decoding.sampling import process_logits


def _joint(model, prompt: list[int], length: int, penalties: Penalties | None = None,
           **settings) -> dict[tuple[int, ...], float]:
    """The law of the first `length` tokens sampled after `prompt`: each next token's probabilities from the
    model's logits, biased and penalized for the sequence (`penalties`), then filtered (`settings`: temperature,
    top_k, top_p, min_p), prefix by prefix."""
    vocab, dist = model.config.vocab_size, {(): 1.0}
    with torch.no_grad():
        for _ in range(length):
            keys = list(dist)
            logits = model(torch.tensor([prompt + list(k) for k in keys]))[:, -1, 0].float()
            if penalties is not None:
                logits = torch.stack([penalties.apply(row, torch.bincount(torch.tensor(k, dtype=torch.long),
                                                                          minlength=vocab).float(),
                                                      torch.isin(torch.arange(vocab), torch.tensor(prompt + list(k))))
                                      for k, row in zip(keys, logits, strict=True)])
            probs = process_logits(logits, **settings).double()
            dist = {k + (t,): dist[k] * float(p[t]) for k, p in zip(keys, probs, strict=True) for t in range(vocab)
                    if p[t] > 0}
    return dist


def _chi_square_p(samples: list[tuple[int, ...]], dist: dict[tuple[int, ...], float]) -> float:
    """Pearson's test, the cells expected fewer than 5 times pooled."""
    n = len(samples)
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    big = [k for k, p in dist.items() if p * n >= 5]
    observed = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    expected = [dist[k] * n for k in big] + [n - sum(dist[k] * n for k in big)]
    pairs = [(o, e) for o, e in zip(observed, expected, strict=True) if e > 1e-9]
    x = sum((o - e) ** 2 / e for o, e in pairs)
    df = torch.tensor((len(pairs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(x / 2, dtype=torch.float64)))


def test_joined_rows_and_the_gates_plain_steps_sample_the_models_distribution(monkeypatch):
    """2000 rows, 2000 more that join after the first step, a chain of drafts, the gate forced to take a
    verifying step, a plain one, then a drafting one: each group's first three tokens follow the model's joint law."""
    model = tiny_mtp("llama", num_heads=4, vocab_size=8, seed=3)
    with torch.no_grad():
        model.base.model.norm.weight.mul_(4.0)  # peaked distributions: drafts accepted and refused alike
    pattern = itertools.cycle([True, False, True])
    monkeypatch.setattr(SpeculationGate, "_faster_kind", lambda self: next(pattern))
    prompt, half, reads = [1, 2, 3, 1, 2, 3, 1, 2], 2000, [0]

    def take(active, fits):
        reads[0] += 1
        return [(prompt, 3)] * half if reads[0] == 2 else []

    out = generate(model, torch.tensor([prompt] * half), max_new_tokens=3, strategy="speculative", do_sample=True,
                   seed=0, stop_token_ids=[], admit=Admission(take, max_rows=2 * half, room=16))
    assert out.stats.plain_steps > 0 and len(out.tokens) == 2 * half
    dist = _joint(model, prompt, 3)
    for rows in (out.tokens[:half], out.tokens[half:]):
        assert _chi_square_p([tuple(t) for t in rows], dist) > 1e-6


WIDE = "[[0], [1], [2], [0, 0], [0, 1], [0, 2], [1, 0], [0, 0, 0]]"  # three children under the root and (0,)


@pytest.mark.parametrize("case", ["top-k under the tree's width", "dynamic tree, one-token draft vocabulary"])
def test_tree_sampling_keeps_the_law_where_the_heads_q_has_no_mass_outside_the_siblings(case):
    """3000 rows, the first three tokens' joint law: where q has no mass outside a drawn child's siblings (top_k 2
    under a node of three children; a draft vocabulary of one token, whose other ranks fill a dynamic tree), the
    drawn child is a filler that was kept (chi-square p = 0), and tied scores built a dynamic tree whose nodes
    lacked their parents (p = 1e-108)."""
    model = tiny_mtp("llama", num_heads=4, vocab_size=8, seed=3)
    with torch.no_grad():
        model.base.model.norm.weight.mul_(2.0)  # peaked distributions: drafts accepted and refused alike
    prompt, n = [1, 2, 3, 1, 2], 3000
    if case.startswith("top-k"):
        kw, settings = {"tree": WIDE, "top_k": 2}, {"top_k": 2}
    else:
        model.set_draft_vocab([4])
        kw, settings = {"tree": "dynamic", "tree_size": 6}, {}
    out = generate(model, torch.tensor([prompt] * n), max_new_tokens=3, strategy="speculative", do_sample=True,
                   seed=0, stop_token_ids=[], **kw)
    assert _chi_square_p([tuple(t) for t in out.tokens], _joint(model, prompt, 3, **settings)) > 1e-6


def test_rows_with_their_own_filters_and_penalties_keep_their_laws_through_a_tree_with_lookup():
    """One left-padded batch through a wide tree with lookup drafts: 2000 rows of one prompt at temperature 0.7,
    top-k 3, presence and frequency penalties and a logit bias, 2000 of a shorter prompt at temperature 1.3, top-p
    0.8, min-p 0.1 and a repetition penalty, ending two steps later, and greedy rows: each sampled group's first
    three tokens follow its own joint law, the greedy rows are greedy decoding's."""
    model = tiny_mtp("llama", num_heads=4, vocab_size=8, seed=3)
    with torch.no_grad():
        model.base.model.norm.weight.mul_(2.0)
    a, b, n = [1, 2, 3, 1, 2, 3, 1], [4, 6, 4], 2000
    first = dict(do_sample=True, temperature=0.7, top_k=3, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                 presence_penalty=0.5, frequency_penalty=0.3, logit_bias={3: 1.5, 5: -100.0})
    second = dict(do_sample=True, temperature=1.3, top_k=0, top_p=0.8, min_p=0.1, repetition_penalty=1.4,
                  presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None)
    greedy = dict(second, do_sample=False)
    groups = [(a, first, 3)] * n + [(b, second, 5)] * n + [(a, greedy, 5)] * 20
    ids, mask = left_pad([g[0] for g in groups])
    per_row = {name: [g[1][name] for g in groups] for name in first}
    out = generate(model, ids, mask, max_new_tokens=[g[2] for g in groups], strategy="speculative", seed=0,
                   stop_token_ids=[], tree=WIDE, lookup=3, **per_row)
    assert [len(t) for t in out.tokens] == [g[2] for g in groups]
    assert all(t == reference_greedy(model, a, 5) for t in out.tokens[2 * n:])
    for rows, prompt, s in ((out.tokens[:n], a, first), (out.tokens[n: 2 * n], b, second)):
        penalties = Penalties(s["repetition_penalty"], s["presence_penalty"], s["frequency_penalty"],
                              tuple(sorted((s["logit_bias"] or {}).items())))
        dist = _joint(model, prompt, 3, penalties, temperature=s["temperature"], top_k=s["top_k"],
                      top_p=s["top_p"], min_p=s["min_p"])
        assert _chi_square_p([tuple(t[:3]) for t in rows], dist) > 1e-6
