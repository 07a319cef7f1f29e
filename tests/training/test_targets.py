"""Self-distilled targets: the model's own greedy answers, cached on disk and resumable."""

import gc
import json

import pytest
import torch
from training_helpers import tiny_llama, train_tokenizer

import mtp.decoding.generate as gen_module
from mtp.errors import MTPError
from mtp.training.data import Example, _example_tokens, check_tokenizer, rows_to_data, tokenize_examples
from mtp.training.losses import evaluate_heads
from mtp.training.targets import (
    prompt_token_ids,
    prompts_token_ids,
    read_cache,
    self_distilled_answers,
    self_distilled_data,
)

REAL_GENERATE = gen_module.generate
QUESTIONS = ["How many apples?", "Tom has 3 + 4 apples. How many?", "1 2 3", "What is 7 times 8 plus 9 minus 1?",
             "user 5", "equals 0"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture
def model(tok):
    return tiny_llama(vocab_size=len(tok), num_heads=3, tokenizer=tok)


def local_greedy(model, prompt: list[int], n: int, stop: int) -> list[int]:
    """One prompt, no cache, no padding: argmax of head 0 at the last position, n times."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids]))[0, -1, 0].argmax())
            out.append(token)
            ids.append(token)
            if token == stop:
                break
    return out


class CountingGenerate:
    def __init__(self, monkeypatch, fail_on_call: int | None = None):
        self.rows: list[int] = []
        self.real = REAL_GENERATE
        self.fail_on_call = fail_on_call
        monkeypatch.setattr(gen_module, "generate", self)

    def __call__(self, model, input_ids, attention_mask=None, **kw):
        if self.fail_on_call is not None and len(self.rows) + 1 == self.fail_on_call:
            raise KeyboardInterrupt
        self.rows.append(input_ids.shape[0])
        return self.real(model, input_ids, attention_mask, **kw)


def test_prompt_tokens_match_tokenize_examples(tok) -> None:
    for template in ("chat", "plain"):
        ex = Example("How many apples?", "Tom has 7.")
        data = tokenize_examples([ex], tok, template=template, seq_len=64)
        n_prompt = int((~data.loss_mask[0] & data.attention_mask[0].bool()).sum())
        assert prompt_token_ids(tok, ex.prompt, template) == data.input_ids[0, :n_prompt].tolist()


def test_many_prompts_are_tokenized_as_each_alone(tok) -> None:
    """`prompts_token_ids` (the start tokens looked up once for all prompts) lays out each prompt, with its
    conversation before it, as `prompt_token_ids` does alone; with a tokenizer that starts texts with a BOS too."""
    from conftest import tiny_sentencepiece_tokenizer

    context = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."})
    examples = [Example(q, "", context if i % 2 else ()) for i, q in enumerate(QUESTIONS)] + [Example("", "x")]
    with_bos = tiny_sentencepiece_tokenizer()
    for tokenizer, template in ((tok, "chat"), (tok, "plain"), (with_bos, "chat"), (with_bos, "plain")):
        lists = prompts_token_ids(tokenizer, iter(examples), template)  # (a file's examples: read once)
        eos = check_tokenizer(tokenizer, template)  # (each alone: its own start tokens looked up)
        alone = [_example_tokens(tokenizer, Example(ex.prompt, "", ex.context), template, eos)[0] for ex in examples]
        assert alone == [prompt_token_ids(tokenizer, ex.prompt, template, ex.context) for ex in examples]
        assert list(lists) == alone and len({len(a) for a in alone}) > 2
    assert all(a[0] == with_bos.bos_token_id for a in prompts_token_ids(with_bos, examples, "plain"))


def test_answers_are_greedy_and_batched_like_single(model, tok) -> None:
    prompts = [prompt_token_ids(tok, q, "chat") for q in QUESTIONS]
    answers = self_distilled_answers(model, tok, prompts, max_new_tokens=6, batch_size=4, progress=False,
                                     stop_token_ids=[tok.eos_token_id])
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer == local_greedy(model, prompt, 6, tok.eos_token_id)
    assert gc.get_freeze_count() == 0  # (see test_cache_resume_after_interruption)


def test_cache_resume_after_interruption(model, tok, tmp_path, monkeypatch, capsys) -> None:
    """Answers are kept batch by batch: an interrupted run says how many are kept and that the same command goes
    on from them; the next run says how many it read and answers only the others."""
    prompts = [prompt_token_ids(tok, q, "plain") for q in QUESTIONS]
    cache = tmp_path / "answers.jsonl"
    kw = {"max_new_tokens": 5, "batch_size": 2, "progress": False}
    expected = self_distilled_answers(model, tok, prompts, **kw)

    first = CountingGenerate(monkeypatch, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        self_distilled_answers(model, tok, prompts, cache_path=cache, **kw)
    assert first.rows == [2] and len(read_cache(cache)) == 2
    # answering freezes what existed before it (each batch's collection walks only its own objects), and puts it
    # back however it ends: frozen objects would never be collected again
    assert gc.get_freeze_count() == 0
    n = len(prompts)
    assert f"answers: interrupted; 2 of {n} are kept in {cache}: the same command goes on from them" \
        in capsys.readouterr().err
    with cache.open("a") as f:
        f.write('{"id": 5, "key": "abc", "tok')  # a line cut off by the interruption

    second = CountingGenerate(monkeypatch)
    assert self_distilled_answers(model, tok, prompts, cache_path=cache, **kw).tolist() == expected.tolist()
    assert sum(second.rows) == len(prompts) - 2  # only the missing answers were generated
    assert f"answers: 2 of {n} read from {cache} (answered before); answering the other {n - 2}" \
        in capsys.readouterr().err

    third = CountingGenerate(monkeypatch)
    assert self_distilled_answers(model, tok, prompts, cache_path=cache, **kw).tolist() == expected.tolist()
    assert third.rows == []
    assert sorted(json.loads(line)["id"] for line in cache.read_text().splitlines()[:2]) == [1, 3]  # longest first


def test_cache_is_keyed_on_model_prompt_and_budget(model, tok, tmp_path, monkeypatch) -> None:
    prompts = [prompt_token_ids(tok, q, "plain") for q in QUESTIONS[:3]]
    cache = tmp_path / "a.jsonl"
    self_distilled_answers(model, tok, prompts, max_new_tokens=4, cache_path=cache, progress=False)
    counter = CountingGenerate(monkeypatch)
    self_distilled_answers(model, tok, prompts, max_new_tokens=5, cache_path=cache, progress=False)
    assert sum(counter.rows) == 3  # another budget: generated again
    other = tiny_llama(vocab_size=len(tok), num_heads=3, seed=9, tokenizer=tok)
    with pytest.raises(MTPError, match="missing"):
        self_distilled_answers(other, tok, prompts, max_new_tokens=5, cache_path=cache, progress=False,
                               generate_missing=False)
    # Extra heads do not change the answers, so they are not part of the key.
    with torch.no_grad():
        for p in model.extra_heads.parameters():
            p.add_(1.0)
    counter.rows.clear()
    self_distilled_answers(model, tok, prompts, max_new_tokens=5, cache_path=cache, progress=False)
    assert counter.rows == []


def test_fingerprint_survives_save_and_load(model, tmp_path) -> None:
    from mtp.models.parallel_heads import MTPModel
    from mtp.training.targets import model_fingerprint

    model.save_pretrained(tmp_path / "m")
    assert model_fingerprint(MTPModel.from_pretrained(tmp_path / "m")) == model_fingerprint(model)


def test_budgets_cap_each_row(model, tok) -> None:
    prompts = [prompt_token_ids(tok, q, "plain") for q in QUESTIONS[:4]]
    answers = self_distilled_answers(model, tok, prompts, max_new_tokens=8, budgets=[1, 8, 0, 3],
                                     batch_size=4, progress=False, stop_token_ids=[])
    assert [len(a) for a in answers] == [1, 8, 0, 3]


def test_self_distilled_data_rows_and_head0_agreement(model, tok, tmp_path) -> None:
    train = [Example(q, "unused") for q in QUESTIONS[:4]]
    held = [Example(q, "unused") for q in QUESTIONS[4:]]
    train_data, held_data = self_distilled_data(model, tok, [train, held], template="chat", seq_len=40,
                                                max_new_tokens=8, cache_path=tmp_path / "c.jsonl", progress=False)
    assert len(train_data) == 4 and len(held_data) == 2
    prompt = prompt_token_ids(tok, QUESTIONS[0], "chat")
    row = train_data.input_ids[0]
    assert row[: len(prompt)].tolist() == prompt
    assert not train_data.loss_mask[0, : len(prompt)].any() and train_data.loss_mask[0, len(prompt)]
    # The answers are the model's own greedy choices, so teacher-forced head 0 agrees everywhere.
    ev = evaluate_heads(model, train_data)
    assert ev.head_accuracy[0] == 1.0
    assert self_distilled_data(model, tok, [train, []], seq_len=40, max_new_tokens=8,
                               cache_path=tmp_path / "c.jsonl", progress=False)[1] is None


def test_rows_to_data_layout_and_errors() -> None:
    data = rows_to_data([([4, 5, 6, 7, 8], [False] * 5), ([1, 2, 3], [False, True, True]), ([9, 9], [False, True])],
                        seq_len=4, pad_id=0)
    assert data.source_rows.tolist() == [1, 2]  # the first row has no target: dropped
    data = rows_to_data([([1, 2, 3], [False, True, True]), ([4, 5, 6, 7, 8], [False] * 5)], seq_len=4, pad_id=0)
    assert len(data) == 1  # the row without targets is dropped
    assert data.input_ids.tolist() == [[1, 2, 3, 0]] and data.attention_mask.tolist() == [[1, 1, 1, 0]]
    packed = rows_to_data([([1, 2, 3], [True] * 3), ([4, 5, 6], [True] * 3)], seq_len=4, pad_id=0, pack=True)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    with pytest.raises(MTPError):
        rows_to_data([([1, 2], [False, False])], seq_len=4, pad_id=0)


def test_trunk_features_recorded_while_answering(model, tok, tmp_path) -> None:
    """The trunk outputs kept from generation, read back from the feature store, equal a fresh trunk pass over the
    finished rows (within fp16 rounding); answers from the cache store nothing again."""
    from mtp.training.features import FeatureStore, compute_trunk_features
    from mtp.training.targets import model_fingerprint

    store = FeatureStore.for_model(tmp_path / "run", model, model_fingerprint(model))
    too_long = Example("count: " + " ".join(str(i) for i in range(40)), "unused")  # no room for an answer: dropped
    groups = [[Example(q, "unused") for q in QUESTIONS[:2]] + [too_long] + [Example(q, "unused") for q in QUESTIONS[2:4]],
              [Example(q, "unused") for q in QUESTIONS[4:]]]
    kw = {"template": "chat", "seq_len": 40, "max_new_tokens": 8, "cache_path": tmp_path / "c.jsonl",
          "batch_size": 3, "progress": False, "features": store}
    train_data, held_data = self_distilled_data(model, tok, groups, **kw)
    assert train_data.source_rows.tolist() == [0, 1, 3, 4]
    for data in (train_data, held_data):
        stored = store.lookup([store.key(data.row(i)) for i in range(len(data))])
        assert len(stored.missing()) == 0 and stored.dtype == torch.float16
        expected = compute_trunk_features(model, data)
        got = stored[:, : expected.shape[1]]
        for k, n in enumerate(data.lengths.tolist()):
            # The last token of an answer is never fed back while generating; nothing reads it.
            torch.testing.assert_close(got[k, : n - 1].float(), expected[k, : n - 1], atol=2e-3, rtol=2e-3)
    size = (tmp_path / "run" / "trunk_features.bin").stat().st_size
    self_distilled_data(model, tok, groups, **kw)  # every answer from the cache
    assert (tmp_path / "run" / "trunk_features.bin").stat().st_size == size
    with pytest.raises(MTPError, match="packed"):
        self_distilled_data(model, tok, groups, pack=True, **kw)


class FakeClock:
    """Stands in for `time` in mtp.training.targets: every reading is `step` seconds after the previous one."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now


def test_answers_within_minutes_extrapolates_from_the_first_batch(model, tok, tmp_path, monkeypatch) -> None:
    import mtp.training.targets as targets

    prompts = [prompt_token_ids(tok, f"{q} ({i})", "chat") for i in range(5) for q in QUESTIONS]  # 30
    cache = tmp_path / "answers.jsonl"
    counting = CountingGenerate(monkeypatch)
    monkeypatch.setattr(targets, "time", FakeClock(2.0))  # a batch of 4 answers: 2 s, 0.5 s an answer
    kw = {"max_new_tokens": 4, "batch_size": 4, "cache_path": cache, "progress": False}
    assert targets.answers_within_minutes(model, tok, prompts, 0.1, **kw) == 12  # 6 s / 0.5 s
    assert counting.rows == [4] and sorted(i for i, _ in read_cache(cache)) == [0, 1, 2, 3]
    assert targets.answers_within_minutes(model, tok, prompts, 1e-6, **kw) == 8  # at least the measured batch
    assert counting.rows == [4, 4]  # batch 0-3 came from the cache (no speed there): 4-7 were measured
    assert targets.answers_within_minutes(model, tok, prompts, 100.0, **kw) == 30  # all fit
    assert targets.answers_within_minutes(model, tok, prompts[:8], 1e-6, **kw) == 8  # all answered already
    with pytest.raises(MTPError, match="> 0 minutes"):
        targets.answers_within_minutes(model, tok, prompts, 0.0, **kw)
    # the run's own pass reuses the measured answers under the same ids (positions in the prompts)
    answers = self_distilled_answers(model, tok, prompts[:8], **kw)
    assert counting.rows == [4, 4, 4] and len(answers) == 8


def test_prompts_with_no_room_are_not_counted_as_answers(model, tok, tmp_path, monkeypatch, capsys) -> None:
    """Prompts with no room for an answer under --seq-len get an empty one, written nowhere: the messages count
    the answers in the file (a fresh run said "2 of 5 read from ... (answered before)" of a file that did not
    exist, and an interrupted one counted them as kept)."""
    prompts = [prompt_token_ids(tok, q, "plain") for q in QUESTIONS]
    n = len(prompts)
    budgets = [0, 0] + [5] * (n - 2)  # the first two: no room
    cache = tmp_path / "answers.jsonl"
    kw = {"max_new_tokens": 5, "batch_size": 1, "progress": False, "budgets": budgets}
    CountingGenerate(monkeypatch, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        self_distilled_answers(model, tok, prompts, cache_path=cache, **kw)
    err = capsys.readouterr().err
    assert "read from" not in err  # nothing was answered before
    assert f"answers: interrupted; 2 of {n} are kept in {cache}" in err and len(read_cache(cache)) == 2
    CountingGenerate(monkeypatch)
    self_distilled_answers(model, tok, prompts, cache_path=cache, **kw)
    assert f"answers: 2 of {n} read from {cache} (answered before); answering the other {n - 4}" \
        in capsys.readouterr().err
