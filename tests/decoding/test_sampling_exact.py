"""Speculative sampling's joint law of the first tokens, by a chi-square test against the model's own
probabilities enumerated token by token: for rows that join a running batch (`Admission`) while the speculation
gate takes plain steps, which the other distribution tests do not reach. The test's false-alarm rate is 1e-6."""

from __future__ import annotations

import itertools

import torch

from conftest import tiny_mtp
from mtp.decoding.blocks import SpeculationGate
from mtp.decoding.generate import Admission, generate


def _joint(model, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
    vocab, dist = model.config.vocab_size, {(): 1.0}
    with torch.no_grad():
        for _ in range(length):
            keys = list(dist)
            probs = torch.softmax(model(torch.tensor([prompt + list(k) for k in keys]))[:, -1, 0].double(), -1)
            dist = {k + (t,): dist[k] * float(p[t]) for k, p in zip(keys, probs, strict=True) for t in range(vocab)}
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
