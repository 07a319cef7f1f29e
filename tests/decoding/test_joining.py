"""Continuous batching: prompts that join a running batch between its steps (`generate(admit=Admission(...))`)
decode exactly as they do alone, eager and replayed, and so do the rows they join."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_graphs import decoding_case, replayed  # noqa: F401  (a fixture)

from conftest import tiny_mtp
from mtp.decoding.generate import Admission, generate, left_pad
from mtp.decoding.tree import DynamicTree
from mtp.errors import MTPError


class Arrivals:
    """`Admission.take` for a test: prompt i arrives before the read of step `at[i]` (counted from the first
    read); it joins then if a row is free and it fits, else it waits. Records what it saw."""

    def __init__(self, prompts: list[list[int]], budgets: list[int], at: list[int], max_rows: int):
        self.waiting = sorted(zip(at, range(len(prompts)), prompts, budgets, strict=True))
        self.max_rows = max_rows
        self.reads = 0
        self.order: list[int] = []  # the prompts in the order they joined (their rows, after the first batch's)
        self.active: list[int] = []

    def __call__(self, active: int, fits) -> list[tuple[list[int], int]]:
        self.active.append(active)
        out = []
        while self.waiting and self.waiting[0][0] <= self.reads and active + len(out) < self.max_rows:
            _, i, ids, budget = self.waiting[0]
            if not fits(len(ids), budget):
                break
            self.waiting.pop(0)
            self.order.append(i)
            out.append((ids, budget))
        self.reads += 1
        return out


def joining_case(data, model_kind: str):
    model, kw = decoding_case(data.draw, model_kind)
    if kw["strategy"] not in ("greedy", "speculative"):  # (the strategies that take joiners)
        chosen = data.draw(st.sampled_from(["greedy", "speculative"]))
        kw = {"strategy": chosen} | ({"k": kw["k"]} if "k" in kw and chosen != "greedy" else {})
    vocab = model.config.vocab_size - (1 if hasattr(model, "mask_token_id") else 0)

    def prompt():
        return data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8))

    first = [prompt() for _ in range(data.draw(st.integers(1, 3)))]
    later = [prompt() for _ in range(data.draw(st.integers(1, 4)))]
    budgets = [data.draw(st.integers(1, 12)) for _ in first + later]
    at = [data.draw(st.integers(0, 8)) for _ in later]
    stop = data.draw(st.lists(st.integers(0, vocab - 1), max_size=1))
    return model, kw, first, later, budgets, at, stop


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), graphs=st.booleans(), model_kind=st.sampled_from(["heads", "masks"]))
def test_joined_prompts_decode_as_alone(data, graphs, model_kind, replayed):  # noqa: F811
    """Random models (heads and mask tokens), greedy and speculative (chains, fixed trees, lookup), batches whose
    rows end at different steps while prompts keep arriving: every row's tokens, the first batch's and the joined
    ones', are those it gets alone; a joined row's result follows the first batch's rows, in the order they
    joined."""
    model, kw, first, later, budgets, at, stop = joining_case(data, model_kind)
    if isinstance(kw.get("tree"), DynamicTree):
        kw["tree"] = None  # (a dynamic tree takes no joiners: its own test)
    max_rows = data.draw(st.integers(1, 4))
    arrivals = Arrivals(later, budgets[len(first):], at, max(max_rows, len(first)))
    ids, mask = left_pad(first)
    out = generate(model, ids, mask, max_new_tokens=budgets[:len(first)], stop_token_ids=stop, graphs=graphs,
                   admit=Admission(arrivals, max_rows=max(max_rows, len(first)), room=16), **kw)
    assert len(out.tokens) == len(first) + len(arrivals.order)
    prompts = first + [later[i] for i in arrivals.order]
    limits = budgets[:len(first)] + [budgets[len(first) + i] for i in arrivals.order]
    alone = [generate(model, torch.tensor([p]), max_new_tokens=n, stop_token_ids=stop, graphs=False, **kw).tokens[0]
             for p, n in zip(prompts, limits, strict=True)]
    assert out.tokens == alone
    assert max(arrivals.active) <= max(max_rows, len(first))
    assert out.stats.new_tokens == sum(map(len, alone))


def test_prompts_join_while_the_batch_decodes_and_wait_when_it_is_full(replayed):  # noqa: F811
    """Joining is not a second batch run after the first: a prompt that arrives at the third read joins the
    running batch (the batch's forwards are fewer than two batches' would be), and one that finds the batch full
    waits for a row to end."""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)
    arrivals = Arrivals([[5, 6, 7], [8, 9]], [10, 10], [2, 2], max_rows=2)
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=10, stop_token_ids=[], strategy="greedy",
                   admit=Admission(arrivals, max_rows=2))
    assert arrivals.order == [0, 1] and [len(t) for t in out.tokens] == [10, 10, 10]
    # the first row and the first joiner decode together (one forward a step for both), then the second joiner
    assert out.stats.forward_passes < 30
    assert arrivals.active[:4] == [1, 1, 1, 2]  # (asked before each read with the rows that decode)


def test_a_batch_whose_rows_all_ended_takes_a_prompt_that_arrives_then(replayed):  # noqa: F811
    """A prompt that arrives at the read where every row ends still decodes (the loop does not end under it);
    one whose first token ends it ends there."""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)
    for graphs in (False, True):
        arrivals = Arrivals([[5, 6, 7], [8]], [6, 1], [1, 1], max_rows=4)
        out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, stop_token_ids=[], strategy="speculative",
                       graphs=graphs, admit=Admission(arrivals, max_rows=4))
        assert [len(t) for t in out.tokens] == [2, 6, 1]
        alone = generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=6, stop_token_ids=[],
                         strategy="speculative")
        assert out.tokens[1] == alone.tokens[0]


@pytest.mark.parametrize("kw", [{"strategy": "speculative", "tree": "dynamic", "tree_size": 3},
                                {"strategy": "confadapt"}])
def test_batches_that_cannot_take_prompts_are_never_asked(kw):
    """A dynamic tree (shaped per batch) and the unverified strategies (their blocks as wide as each row's run)
    take no joiners: `take` is never asked, and the batch decodes as without it."""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)

    def take(active, fits):
        raise AssertionError("asked")

    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5, stop_token_ids=[], admit=Admission(take), **kw)
    assert out.tokens == generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5, stop_token_ids=[], **kw).tokens


def test_what_fits_is_what_the_cache_and_the_context_hold():
    """`fits` says whether a prompt's tokens and its new ones fit the batch's cache (the first prompts' needs plus
    `room`) and the model's context; a `take` that gives a prompt that does not fit, or more than `max_rows`
    allows, is an error, before it runs."""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40, context=64)
    seen = {}

    def take(active, fits):
        seen.update(small=fits(3, 5), room=fits(3, 5 + 10), past=fits(3, 5 + 40), empty=fits(0, 5), none=fits(3, 0),
                    context=fits(30, 40))
        return []

    generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5, stop_token_ids=[], admit=Admission(take, room=12))
    assert seen == {"small": True, "room": True, "past": False, "empty": False, "none": False, "context": False}

    with pytest.raises(MTPError, match="does not fit the batch it joins"):
        generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5, stop_token_ids=[],
                 admit=Admission(lambda active, fits: [([1, 2], 500)]))
    with pytest.raises(MTPError, match="exceed the batch's max_rows 2"):
        generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5, stop_token_ids=[],
                 admit=Admission(lambda active, fits: [([1, 2], 3)] * 2, max_rows=2))


def test_a_joined_row_streams_its_tokens_and_its_logprobs():
    """A joined row's tokens reach the streamer under its row index, with their log-probabilities, as the first
    batch's rows' do."""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)
    streamed: dict[int, list[int]] = {}
    scores: dict[int, int] = {}

    def streamer(row, new, logprobs=None):
        streamed.setdefault(row, []).extend(new)
        scores[row] = scores.get(row, 0) + len(logprobs)

    arrivals = Arrivals([[5, 6, 7]], [6], [1], max_rows=2)
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=8, stop_token_ids=[], strategy="speculative",
                   logprobs=2, streamer=streamer, admit=Admission(arrivals, max_rows=2))
    assert streamed == {0: out.tokens[0], 1: out.tokens[1]} and scores == {0: 8, 1: 6}
    alone = generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=6, stop_token_ids=[], strategy="speculative",
                     logprobs=2)
    assert [s.token for s in out.logprobs[1]] == alone.tokens[0]
    assert [s.logprob for s in out.logprobs[1]] == pytest.approx([s.logprob for s in alone.logprobs[0]], abs=1e-5)


@pytest.mark.parametrize("graphs", [False, True])
def test_sampled_rows_join_and_draw_from_the_batch_generator(graphs, replayed):  # noqa: F811
    """Speculative sampling takes joiners too (their draws come from the batch's generator): with top_k=1 every
    draw is the model's top token, so each row, joined or not, is its greedy answer."""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)
    prompts = [[5, 6, 7], [8, 9], [1, 1, 2]]
    arrivals = Arrivals(prompts, [7, 9, 5], [0, 2, 3], max_rows=3)
    kw = dict(stop_token_ids=[], strategy="speculative", lookup=2)
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=9, do_sample=True, top_k=1, seed=1,
                   graphs=graphs, admit=Admission(arrivals, max_rows=3), **kw)
    expected = [generate(model, torch.tensor([p]), max_new_tokens=n, **kw).tokens[0]
                for p, n in zip([[1, 2, 3], *[prompts[i] for i in arrivals.order]],
                                [9, *[[7, 9, 5][i] for i in arrivals.order]], strict=True)]
    assert arrivals.order == [0, 1, 2] and out.tokens == expected


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [{"strategy": "greedy"}, {"strategy": "speculative", "lookup": 2},
                                {"strategy": "speculative", "tree": "auto", "tree_size": 4}],
                         ids=["greedy", "chain-lookup", "tree"])
def test_cuda_joined_prompts_decode_as_eager_alone(kw):
    """On a GPU, replayed graphs: prompts that join (each its own eager prompt step, then the batch's session of
    the next power of two) decode as eager fp32 decoding decodes each alone."""
    model = tiny_mtp("llama", num_heads=3, seed=3, vocab_size=50).to("cuda")
    prompts = [[5, 6, 7], [8, 9], [1, 1, 2], [4, 3, 2, 1]]
    arrivals = Arrivals(prompts, [12, 9, 5, 12], [0, 2, 3, 3], max_rows=4)
    out = generate(model, torch.tensor([[1, 2, 3]], device="cuda"), max_new_tokens=12, stop_token_ids=[],
                   admit=Admission(arrivals, max_rows=4), **kw)
    joined = [[1, 2, 3], *[prompts[i] for i in arrivals.order]]
    limits = [12, *[[12, 9, 5, 12][i] for i in arrivals.order]]
    alone = [generate(model, torch.tensor([p], device="cuda"), max_new_tokens=n, stop_token_ids=[], graphs=False,
                      **kw).tokens[0] for p, n in zip(joined, limits, strict=True)]
    assert len(arrivals.order) == 4 and out.tokens == alone


def test_replayed_prompts_that_join_take_their_step_in_a_session_of_their_own(replayed):  # noqa: F811
    """Replaying, a joining prompt's step is the prompt graph of a one-row session kept for joiners (the batch's
    own one-row session may be the one decoding): captured once per prompt width, then replayed."""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)
    arrivals = Arrivals([[5, 6, 7], [8, 9], [1, 2, 3, 4]], [6, 6, 6], [1, 2, 3], max_rows=1 + 3)
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=8, stop_token_ids=[], strategy="speculative",
                   graphs=True, admit=Admission(arrivals, max_rows=4))
    assert [len(t) for t in out.tokens] == [8, 6, 6, 6]
    sessions = model.__dict__["_mtp_decode_sessions"].sessions
    joining = [s for key, s in sessions.items() if key[-1]]
    assert len(joining) == 1 and joining[0].cache.batch_size == 1
    assert list(joining[0].run.prompts) == [(1, 64)]  # (every prompt padded to one width: one graph)


@pytest.mark.parametrize("graphs", [False, True])
def test_each_row_is_told_when_it_ended_while_the_others_decode_on(graphs, replayed):  # noqa: F811
    """generate(on_end=...): once for every row (joined ones and those with no tokens to emit included), right
    after the streamer got its last tokens and before the rows that go on emit more, with the statistics so far."""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)
    events: list[tuple] = []
    arrivals = Arrivals([[5, 6, 7]], [2], [1], max_rows=3)
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=[9, 0], stop_token_ids=[], strategy="speculative",
                   graphs=graphs, admit=Admission(arrivals, max_rows=3),
                   streamer=lambda row, new: events.append(("tokens", row, len(new))),
                   on_end=lambda row, tokens, scores, stats: events.append(("end", row, stats.new_tokens, tokens)))
    ends = [e for e in events if e[0] == "end"]
    assert sorted(e[1] for e in ends) == [0, 1, 2] and [len(t) for t in out.tokens] == [9, 0, 2]
    at = {e[1]: events.index(e) for e in ends}
    last_tokens = {row: max(i for i, e in enumerate(events) if e[:2] == ("tokens", row)) for row in (0, 2)}
    assert at[2] == last_tokens[2] + 1 and at[0] == last_tokens[0] + 1
    assert at[2] < last_tokens[0]  # (the joined row ended while row 0 went on)
    assert dict((e[1], e[2]) for e in ends)[0] == 11  # (the statistics then: every token so far)
    assert all(e[3] == out.tokens[e[1]] for e in ends)  # (each row's tokens, as the result holds them)


def test_prompts_that_join_at_one_read_take_one_step_together():
    """Eagerly, prompts that join at the same read take one prompt step together (left-padded to the longest),
    not one each; each still decodes as alone."""
    model = tiny_mtp("llama", num_heads=3, seed=2, dtype=torch.float64, vocab_size=40)
    shapes: list[tuple[int, ...]] = []
    model.base.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    prompts = [[5, 6, 7], [8, 9], [1, 2, 3, 4]]
    arrivals = Arrivals(prompts, [6, 6, 6], [1, 1, 1], max_rows=4)
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=8, stop_token_ids=[], strategy="greedy",
                   admit=Admission(arrivals, max_rows=4))
    # the first prompt's step (1, 3), greedy steps (B, 1), and the three joiners' step (3, 4)
    assert arrivals.order == [0, 1, 2] and shapes.count((3, 4)) == 1
    assert all(s[1] == 1 for s in shapes[1:] if s != (3, 4)), shapes
    alone = [generate(model, torch.tensor([p]), max_new_tokens=6, stop_token_ids=[]).tokens[0] for p in prompts]
    assert out.tokens[1:] == alone
