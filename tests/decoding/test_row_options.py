"""Rows of one batch with their own settings (`mtp.decoding.row_options`): sampled and greedy rows, each with its
own temperature, top-k, top-p, min-p, penalties, logit bias, minimum length and stop strings, decoded together
(eagerly and replayed, rows that join too) emit what each row emits with its settings, and sampled rows keep their
own distributions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_graphs import Letters, decoding_case, replayed  # noqa: F401  (a fixture)
from test_joining import Arrivals

from conftest import tiny_mtp
from mtp.decoding.generate import Admission, generate, left_pad
from mtp.decoding.penalties import Penalties
from mtp.decoding.reference import reference_greedy
from mtp.decoding.row_options import RowOptions, row_arguments
from mtp.decoding.sampling import process_logits
from mtp.decoding.stopping import StopChecker
from mtp.decoding.tree import DynamicTree
from mtp.errors import MTPError


@settings(max_examples=40, deadline=None)
@given(data=st.data(), rows=st.integers(1, 5), slots=st.integers(1, 3), vocab=st.integers(2, 60))
def test_each_rows_settings_process_its_logits_as_its_own_would(data, rows, slots, vocab):
    """`process_logits` with one setting per row (tensors) gives each row what the same call with that row's
    numbers gives, neutral values (top-k 0 or beyond the vocabulary, top-p 1, min-p 0) included."""
    logits = torch.randn(rows, slots, vocab, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    values = [(data.draw(st.sampled_from([0.3, 1.0, 2.5])), data.draw(st.sampled_from([0, 1, 3, 100])),
               data.draw(st.sampled_from([1.0, 0.9, 0.5, 0.01])), data.draw(st.sampled_from([0.0, 0.1, 0.9])))
              for _ in range(rows)]
    columns = torch.tensor(values, dtype=torch.float32).view(rows, 1, 1, 4).unbind(-1)
    most_k = data.draw(st.sampled_from([0, max(k for _, k, _, _ in values)]))  # (0: the vocabulary's size)
    each = process_logits(logits, *columns, most_k=most_k)
    for row, (t, k, p, m) in enumerate(values):
        torch.testing.assert_close(each[row], process_logits(logits[row], t, k, p, m), atol=1e-7, rtol=0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.sampled_from([257, 300, 2048, 5000]), scale=st.floats(0.5, 12),
       per_row=st.booleans(), top_p=st.floats(0.01, 0.999))
def test_the_nucleus_found_among_the_most_likely_tokens_is_the_whole_sorts(seed, vocab, scale, per_row, top_p):
    """On a CPU top-p first looks among the most likely NUCLEUS_HEAD tokens and sorts the whole vocabulary only
    for rows whose nucleus goes past them: the same tokens are dropped as by sorting every row (flat and peaked
    rows, one top-p or one per row)."""
    from mtp.decoding.sampling import NUCLEUS_HEAD, _outside_nucleus, _sorted_outside_nucleus

    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(3, 4, vocab, generator=generator) * scale, -1)
    p = torch.rand(3, 1, 1, generator=generator).clamp(0.01, 1.0) if per_row else top_p
    drop = _outside_nucleus(probs, p)
    assert torch.equal(drop, _sorted_outside_nucleus(probs, p))
    assert vocab > NUCLEUS_HEAD and (~drop).any(-1).all()  # (the top token always stays)


def _options(draw, vocab: int) -> RowOptions:
    """A row's settings: greedy, sampled with a filter that leaves one token (its tokens are greedy's), or sampled
    freely; penalties, biases, a minimum length, stop strings, each drawn."""
    kind = draw(st.sampled_from(["greedy", "greedy", "top-k 1", "min-p 1", "top-p tiny", "free"]))
    bias = draw(st.dictionaries(st.integers(0, vocab - 1), st.sampled_from([-100.0, 1.5]), max_size=2))
    penalties = Penalties(draw(st.sampled_from([1.0, 1.4])), draw(st.sampled_from([0.0, 0.6])), 0.0,
                          tuple(sorted(bias.items())), draw(st.integers(0, 4)))
    strings = tuple(draw(st.lists(st.text("abcdefgh", min_size=1, max_size=2), max_size=1)))
    sampled = dict(do_sample=True, temperature=draw(st.sampled_from([0.5, 1.0, 2.0])))
    return RowOptions(**({} if kind == "greedy" else sampled), top_k=1 if kind == "top-k 1" else 0,
                      min_p=1.0 if kind == "min-p 1" else 0.0, top_p=0.001 if kind == "top-p tiny" else 1.0,
                      penalties=penalties, stop_strings=strings)


class OptionedArrivals(Arrivals):
    """`Arrivals` whose prompts join with settings of their own."""

    def __init__(self, prompts, budgets, at, max_rows, options: list[RowOptions]):
        super().__init__(prompts, budgets, at, max_rows)
        self.options = options

    def __call__(self, active, fits):
        joined = len(self.order)
        out = super().__call__(active, lambda p, m: fits(p, m, self.options[self.waiting[0][1]]))
        return [(ids, budget, self.options[i]) for (ids, budget), i in zip(out, self.order[joined:], strict=True)]


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), graphs=st.booleans(), model_kind=st.sampled_from(["heads", "masks"]))
def test_rows_with_their_own_settings_emit_their_own_tokens(data, graphs, model_kind, replayed):  # noqa: F811
    """Random models, greedy and speculative decoding (chains, fixed and dynamic trees, lookup), padded batches and
    rows that join, each row with its own settings: a greedy row, and a sampled row whose filter leaves one token,
    emit what the penalized greedy reference emits for it, cut at its own stop strings; freely sampled rows stay
    within their budgets."""
    model, kw = decoding_case(data.draw, model_kind)
    if kw["strategy"] not in ("greedy", "speculative"):
        kw = {"strategy": "greedy"}
    vocab = model.config.vocab_size - (1 if hasattr(model, "mask_token_id") else 0)
    tokens = st.integers(0, vocab - 1)
    first = [data.draw(st.lists(tokens, min_size=1, max_size=8)) for _ in range(data.draw(st.integers(1, 3)))]
    later = [data.draw(st.lists(tokens, min_size=1, max_size=8)) for _ in range(data.draw(st.integers(0, 2)))]
    options = [_options(data.draw, vocab) for _ in first + later]
    budgets = [data.draw(st.integers(1, 12)) for _ in first + later]
    stop = data.draw(st.lists(tokens, max_size=2))
    joining = later and not isinstance(kw.get("tree"), DynamicTree)
    arrivals = OptionedArrivals(later, budgets[len(first):], [0, 2][:len(later)], 3, options[len(first):]) \
        if joining else None
    ids, mask = left_pad(first)
    out = generate(model, ids, mask, max_new_tokens=budgets[:len(first)], stop_token_ids=stop, graphs=graphs,
                   adaptive_draft=False, admit=Admission(arrivals, max_rows=3) if joining else None, seed=0,
                   tokenizer=Letters(), **row_arguments(options[:len(first)]), **kw)
    order = list(range(len(first))) + ([len(first) + i for i in arrivals.order] if joining else [])
    prompts = first + later
    assert len(out.tokens) == len(order)
    for row, i in enumerate(order):
        o = options[i]
        if o.do_sample and not (o.top_k == 1 or o.min_p == 1.0 or o.top_p < 0.01):
            assert len(out.tokens[row]) <= budgets[i]
            continue
        expected = reference_greedy(model, prompts[i], budgets[i], stop, o.penalties)
        cut = StopChecker(1, [], list(o.stop_strings), Letters()).cut(0, expected)
        assert out.tokens[row] == expected[:cut or len(expected)], (row, o)


def test_sampled_rows_keep_their_own_distributions():
    """4500 rows in one batch, a third each at temperature 0.5 with top-k 3, at temperature 1.5, and greedy
    (speculative decoding with chain drafts): each sampled setting's first-token frequencies are the model's
    probabilities processed with that row's settings, the second token's too after the most likely first; the
    greedy rows all emit greedy's tokens."""
    model = tiny_mtp("llama", num_heads=3, vocab_size=8, seed=3)
    prompt, n = [1, 2], 1500
    settings_of = [dict(do_sample=True, temperature=0.5, top_k=3), dict(do_sample=True, temperature=1.5), {}]
    rows = [settings_of[i % 3] for i in range(3 * n)]
    out = generate(model, torch.tensor([prompt] * len(rows)), max_new_tokens=2, strategy="speculative", seed=0,
                   stop_token_ids=[], do_sample=[bool(r) for r in rows],
                   temperature=[r.get("temperature", 1.0) for r in rows], top_k=[r.get("top_k", 0) for r in rows])
    greedy = generate(model, torch.tensor([prompt]), max_new_tokens=2, stop_token_ids=[]).tokens[0]
    assert all(t == greedy for t in out.tokens[2::3])

    def probs(ids: list[int], s: dict) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1, 0].float()
        return process_logits(logits, s["temperature"], s.get("top_k", 0))

    def assert_drawn_from(tokens: torch.Tensor, p: torch.Tensor) -> None:  # each frequency within 4.5 sigma
        sigma = (p * (1 - p) / len(tokens)).sqrt()
        assert ((torch.bincount(tokens, minlength=8).float() / len(tokens) - p).abs() <= 4.5 * sigma + 0.005).all()

    for i, s in enumerate(settings_of[:2]):
        first = torch.tensor([t[0] for t in out.tokens[i::3]])
        p1 = probs(prompt, s)
        assert_drawn_from(first, p1)
        top = int(p1.argmax())
        assert_drawn_from(torch.tensor([t[1] for t in out.tokens[i::3]])[first == top], probs(prompt + [top], s))


def test_one_session_replays_calls_with_other_sampling_settings(replayed):  # noqa: F811
    """The rows' settings are inputs of the captured steps: calls at other temperatures, top-p and min-p (a
    server's requests; the largest top-k is the width of a step's top-k) replay the first call's session, while a
    greedy row of such a batch still emits greedy's tokens."""
    model = tiny_mtp("llama", num_heads=3, seed=4, dtype=torch.float64, vocab_size=40)
    ids, mask = left_pad([[3, 4, 5, 3, 4, 5, 3, 4], [7, 7, 7]])
    greedy = generate(model, ids[1:], mask[1:], max_new_tokens=12, stop_token_ids=[]).tokens[0]
    kw = dict(max_new_tokens=12, stop_token_ids=[], strategy="speculative", lookup=2, graphs=True, seed=1)
    for t, k, p, m in ((0.7, 5, 0.9, 0.05), (1.3, 5, 0.5, 0.2), (2.0, 5, 0.99, 0.01)):
        out = generate(model, ids, mask, do_sample=[True, False], temperature=t, top_k=k, top_p=p, min_p=m, **kw)
        assert out.tokens[1] == greedy
    sessions = [key for key in model.__dict__["_mtp_decode_sessions"].sessions if key[1] == 2]
    assert len(sessions) == 1


def test_a_row_joins_a_batch_whose_steps_compute_what_it_asks_for():
    """`Admission`'s `fits` says whether a joiner's settings are among what the batch's steps compute: a greedy
    row joins a sampling batch, a sampled row does not join a greedy one, a penalized row no batch without
    penalties, a top-k row no sampling batch whose largest top-k is smaller."""
    model = tiny_mtp("llama", num_heads=3, seed=4, vocab_size=40)
    seen = {}

    def take(active, fits):
        seen.update(greedy=fits(3, 4, RowOptions()), sampled=fits(3, 4, RowOptions(do_sample=True)),
                    top_k=fits(3, 4, RowOptions(do_sample=True, top_k=3)),
                    smaller_top_k=fits(3, 4, RowOptions(do_sample=True, top_k=2)),
                    penalized=fits(3, 4, RowOptions(penalties=Penalties(1.5))))
        return []

    for kw, expected in (({}, dict(greedy=True, sampled=False, top_k=False, smaller_top_k=False, penalized=False)),
                         ({"do_sample": True}, dict(greedy=True, sampled=True, top_k=False, smaller_top_k=False,
                                                    penalized=False)),
                         ({"do_sample": True, "top_k": 2, "presence_penalty": 0.5},
                          dict(greedy=True, sampled=True, top_k=False, smaller_top_k=True, penalized=True))):
        generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4, strategy="speculative",
                 admit=Admission(take, max_rows=2), **kw)
        assert seen == expected


def test_per_row_settings_that_do_not_fit_are_clear_errors():
    model = tiny_mtp("llama", num_heads=3, seed=4, vocab_size=40)
    ids = torch.tensor([[1, 2], [3, 4]])
    for kw, said in ((dict(temperature=[1.0, 0.5, 2.0], do_sample=True), r"one per row \(2\), got 3"),
                     (dict(do_sample=[True, True], temperature=[1.0, 0.0]), "temperature"),
                     (dict(top_p=[1.0, 1.5], do_sample=True), "top_p"),
                     (dict(logit_bias=[{}, {99: 1.0}]), "logit_bias"),
                     (dict(stop_strings=[["a"], "b"]), "stop_strings"),
                     (dict(repetition_penalty=[1.0, 2.0], strategy="confadapt", k=2), "repetition_penalty")):
        with pytest.raises(MTPError, match=said):
            generate(model, ids, max_new_tokens=3, **kw)


@pytest.mark.parametrize("tree", [False, True])
def test_a_greedy_row_of_a_sampling_batch_breaks_ties_as_greedy_does(tree):
    """Logits whose top two tokens tie exactly: a greedy row of a batch that samples takes greedy's token (the
    first), at the root and after a kept draft, whatever the draw; a sampled row at a low temperature takes
    either (a temperature near 0 is no stand-in for greedy)."""
    from mtp.decoding.drafters import Drafts, StepOutput
    from mtp.decoding.step import DecodeOptions, verify
    from mtp.decoding.tree import DraftTree

    logits = torch.zeros(2, 2, 5)
    logits[..., 2] = logits[..., 3] = 4.0  # (B, 1+d, V): tokens 2 and 3 tie at every slot
    drafts = Drafts(torch.tensor([[2], [2]]), torch.nn.functional.one_hot(torch.tensor([[2], [2]]), 5).float(),
                    tree=DraftTree(((0,),)) if tree else None)
    settings = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.01, 0.0, 1.0, 0.0]])  # a greedy row, a sampled one
    opts = DecodeOptions("speculative", do_sample=True)
    lasts = set()
    for seed in range(40):
        acc = verify(StepOutput(logits, logits[:, :, None, :1]), drafts, opts, torch.Generator().manual_seed(seed),
                     settings)
        assert (int(acc.count[0]), int(acc.last[0])) == (1, 2)
        lasts.add(int(acc.last[1]))
    assert lasts == {2, 3}


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [{"strategy": "greedy"}, {"strategy": "speculative", "lookup": 2},
                                {"strategy": "speculative", "tree": "[[0], [1], [0, 0]]"}])
def test_cuda_rows_with_their_own_settings_replay_as_they_decode_eagerly(kw):
    """On a GPU, CUDA graphs of a step whose rows sample with their own settings (one greedy, one with penalties,
    one whose top-k of 1 leaves greedy's token), fp32: the deterministic rows' tokens are eager greedy's with
    their penalties, and one session replays calls at other temperatures."""
    model = tiny_mtp("llama", num_heads=3, seed=4, vocab_size=50).to("cuda")
    ids, mask = left_pad([[3, 4, 5, 3, 4, 5, 3, 4], [7, 7, 7], [1, 2, 3, 4, 5, 6], [9, 8]])
    ids, mask = ids.cuda(), mask.cuda()
    for temperature in (0.7, 1.3):
        out = generate(model, ids, mask, max_new_tokens=20, stop_token_ids=[], seed=0,
                       do_sample=[False, False, True, True], temperature=temperature, top_k=[0, 0, 1, 0],
                       repetition_penalty=[1.0, 1.5, 1.0, 1.0], **kw)
        for row, penalty in ((0, 1.0), (1, 1.5), (2, 1.0)):
            eager = generate(model, ids[row:row + 1], mask[row:row + 1], max_new_tokens=20, stop_token_ids=[],
                             graphs=False, repetition_penalty=penalty)
            assert out.tokens[row] == eager.tokens[0]


def test_rows_given_the_same_settings_are_checked_once_and_read_as_their_own(monkeypatch):
    """A thousand rows of one setting cost one check (self-answering's batches are 1,000 greedy rows), and a row
    whose values are its own is still checked and read as its own."""
    import mtp.decoding.row_options as module

    checked = []
    real = module.check_values
    monkeypatch.setattr(module, "check_values", lambda values, **kw: (checked.append(values), real(values, **kw)))
    defaults = dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                    presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, min_new_tokens=0, stop_strings=None)
    hot, bias = 0.5, {3: 1.0}
    values = {**defaults, "do_sample": True, "temperature": [hot if i % 500 == 7 else 1.0 for i in range(1000)],
              "logit_bias": [bias] * 1000, "stop_strings": ["x"]}
    rows = module.row_options(1000, 40, values, {"strategy": "greedy"})
    assert len(checked) == 2 and rows[0] is rows[999] and rows[7] is rows[507]
    assert [r.temperature for r in rows] == values["temperature"]
    for i in (0, 7):  # each as a batch of its own row would read it
        own = {k: v[i] if k in ("temperature", "logit_bias") else v for k, v in values.items()}
        alone = module.row_options(1, 40, own, {"strategy": "greedy"})[0]
        assert rows[i] == alone and rows[i].penalties.bias == ((3, 1.0),) and rows[i].stop_strings == ("x",)
    values["top_p"] = [1.0] * 999 + [1.5]  # the last row alone breaks a rule
    with pytest.raises(MTPError, match="top_p"):
        module.row_options(1000, 40, values, {"strategy": "greedy"})


def test_a_top_k_past_any_vocabulary_keeps_every_token():
    """top_k of 400 digits (the Python API, a prompts record) samples as top_k 0 does: it overflowed the float of
    the step's settings."""
    model = tiny_mtp(num_heads=2)
    runs = [generate(model, [[1, 2, 3]], max_new_tokens=6, do_sample=True, seed=3, top_k=k).tokens
            for k in (10**400, 0)]
    assert runs[0] == runs[1]
