"""Lossless decoding under combinations of its features: random tiny float64 models (Llama and GPT-2 parallel
heads, heads that read the next token, mask tokens), greedy and speculative decoding (chains, random fixed and
dynamic trees, lookup, num_draft 0-1), padded batches with per-row budgets (0 and 1 included), per-row settings
(penalties, logit_bias, min_new_tokens, stop strings, sampled rows whose filter leaves one token), end tokens,
a shared prefix, a prompt cache over two turns, rows that join, the speculation gate off, timed or flipping a
coin (plain steps and catch-up), log-probabilities, eager and replayed: every deterministic row emits what the
slow penalized reference emits for it alone, and every row's scores are the model's own."""

from __future__ import annotations

import os
import random
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_graphs import Letters, decoding_case, replayed  # noqa: F401  (a fixture)
from test_row_options import OptionedArrivals, _options

from conftest import reading_next_token
from mtp.decoding.blocks import SpeculationGate
from mtp.decoding.generate import Admission, generate, left_pad
from mtp.decoding.logprobs import prompt_logprobs
from mtp.decoding.prefixes import PromptCache
from mtp.decoding.reference import reference_greedy
from mtp.decoding.row_options import row_arguments
from mtp.decoding.stopping import StopChecker
from mtp.decoding.tree import DynamicTree

EXAMPLES = int(os.environ.get("MTP_FUZZ_EXAMPLES", "40"))  # (MTP_FUZZ_EXAMPLES=300 for a longer search)


def _deterministic(o) -> bool:
    return not o.do_sample or o.top_k == 1 or o.min_p == 1.0 or o.top_p < 0.01


def _expected(model, prompt, budget, stop, o) -> list[int]:
    tokens = reference_greedy(model, prompt, budget, stop, o.penalties)
    cut = StopChecker(1, [], list(o.stop_strings), Letters()).cut(0, tokens)
    return tokens[:cut or len(tokens)]


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), graphs=st.booleans(), model_kind=st.sampled_from(["heads", "next-token heads", "masks"]))
def test_every_feature_at_once_stays_lossless(data, graphs, model_kind, replayed):  # noqa: F811
    model, kw = decoding_case(data.draw, "heads" if model_kind == "next-token heads" else model_kind)
    if model_kind == "next-token heads":
        model = reading_next_token(model, seed=data.draw(st.integers(0, 100)))
    if kw["strategy"] not in ("greedy", "speculative"):
        kw = {"strategy": data.draw(st.sampled_from(["greedy", "speculative"]))} | \
            ({"k": kw["k"]} if "k" in kw else {})
        if kw["strategy"] == "greedy":
            kw.pop("k", None)
    if kw["strategy"] == "speculative" and data.draw(st.booleans()):
        kw["num_draft"] = data.draw(st.integers(0, 1))
        if isinstance(kw.get("tree"), DynamicTree) or kw.get("tree") is not None:
            kw["tree"] = None
    vocab = model.config.vocab_size - (1 if hasattr(model, "mask_token_id") else 0)
    tokens = st.integers(0, vocab - 1)
    prefix = data.draw(st.lists(tokens, min_size=2, max_size=8)) if data.draw(st.booleans()) else None

    def prompt() -> list[int]:
        rest = data.draw(st.lists(tokens, min_size=0 if prefix else 1, max_size=7))
        if prefix and data.draw(st.integers(0, 3)):
            return prefix + rest
        return rest or [0]

    first = [prompt() for _ in range(data.draw(st.integers(1, 4)))]
    joinable = not isinstance(kw.get("tree"), DynamicTree)
    later = [prompt() for _ in range(data.draw(st.integers(0, 2)))] if joinable else []
    options = [_options(data.draw, vocab) for _ in first + later]
    budgets = [data.draw(st.integers(0, 10)) for _ in first] + [data.draw(st.integers(1, 10)) for _ in later]
    stop = data.draw(st.lists(tokens, max_size=2))
    if data.draw(st.booleans()):  # an end token the first row's answer reaches in its middle
        plain = reference_greedy(model, first[0], 8, (), options[0].penalties)
        stop.append(plain[data.draw(st.integers(1, 7))])
    adaptive = data.draw(st.booleans())
    # the speculation gate's choice of plain steps or verify blocks: its timing, or a coin (plain steps, catch-up)
    coin = random.Random(data.draw(st.integers(0, 1000))) if adaptive and data.draw(st.booleans()) else None
    cache = PromptCache(min_tokens=2) if data.draw(st.booleans()) else None
    top = data.draw(st.sampled_from([None, 0, 2]))

    def run(rows, row_opts, row_budgets, arriving, arriving_opts, arriving_budgets):
        arrivals = OptionedArrivals(arriving, arriving_budgets, [0, 1][:len(arriving)], 4, arriving_opts) \
            if arriving else None
        ids, mask = left_pad(rows)
        out = generate(model, ids, mask, max_new_tokens=row_budgets, stop_token_ids=stop, graphs=graphs,
                       adaptive_draft=adaptive, prefix=prefix, prompt_cache=cache, seed=0, tokenizer=Letters(),
                       admit=Admission(arrivals, max_rows=4, room=200) if arriving else None, logprobs=top,
                       **row_arguments(row_opts), **kw)
        order = list(range(len(rows))) + ([len(rows) + i for i in arrivals.order] if arriving else [])
        prompts = rows + arriving
        opts = row_opts + arriving_opts
        limits = row_budgets + arriving_budgets
        assert len(out.tokens) == len(order)
        for row, i in enumerate(order):
            o = opts[i]
            if top is not None:  # the model's own scores of the row's tokens, whatever emitted them
                want = prompt_logprobs(model, prompts[i] + out.tokens[row], top)[len(prompts[i]):]
                got = out.logprobs[row]
                assert [g.token for g in got] == out.tokens[row]
                for g, w in zip(got, want, strict=True):
                    assert g.logprob == pytest.approx(w.logprob, abs=1e-5)
                    assert [lp for _, lp in g.top] == pytest.approx([lp for _, lp in w.top], abs=1e-5)
            if not _deterministic(o):
                assert len(out.tokens[row]) <= limits[i]
                continue
            assert out.tokens[row] == _expected(model, prompts[i], limits[i], stop, o), (row, i, o)
        return [(prompts[i], out.tokens[row], opts[i]) for row, i in enumerate(order)]

    n = len(first)
    with patch("mtp.decoding.blocks.SpeculationGate._faster_kind",
               (lambda self: coin.random() < 0.5) if coin else SpeculationGate._faster_kind):
        answered = run(first, options[:n], budgets[:n], later, options[n:], budgets[n:])
        if cache is not None:  # a second turn: each prompt with its answer and a new message, through the cache
            turns = [p + a + data.draw(st.lists(tokens, min_size=1, max_size=4)) for p, a, _ in answered]
            opts = [o for _, _, o in answered]
            again = [data.draw(st.integers(1, 8)) for _ in turns]
            run(turns[:n], opts[:n], again[:n], turns[n:], opts[n:], again[n:])
