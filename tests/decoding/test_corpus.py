"""Lookup drafts from a corpus of earlier answers: the table, its lookup on the device, and lossless decoding."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_graphs import replayed  # noqa: F401  (a fixture)
from test_lookup import brute_force_lookup

import mtp.decoding.generate as generate_module
from conftest import tiny_mtp
from mtp.decoding.corpus import (
    CORPUS_NAME,
    MAX_DRAFTS,
    MIN_SHARE,
    NGRAM_SIZES,
    GrowingCorpus,
    LookupCorpus,
    fixed_corpus,
    folder_corpus,
)
from mtp.decoding.generate import generate, left_pad
from mtp.decoding.lookup import CORPUS_BELOW, lookup_drafts
from mtp.decoding.reference import reference_greedy
from mtp.errors import MTPError


def reference_table(answers: list[list[int]], min_count: int) -> dict[tuple[int, ...], list[int]]:
    """{sequence: the continuation its occurrences agree on}, by counting: a walk down the occurrences."""
    seen: dict[tuple[int, ...], list[list[int]]] = {}
    for a in answers:
        for n in NGRAM_SIZES:
            for j in range(n, len(a)):
                seen.setdefault(tuple(a[j - n:j]), []).append(a[j:j + MAX_DRAFTS])
    table = {}
    for words, conts in seen.items():
        if len(conts) < min_count:
            continue
        out, agreeing = [], conts
        for i in range(MAX_DRAFTS):
            votes = Counter(c[i] for c in agreeing if len(c) > i)
            if not votes:
                break
            token, n = max(votes.items(), key=lambda kv: (kv[1], -kv[0]))  # the first (smallest) on a tie
            if n < MIN_SHARE * len(conts):
                break
            out.append(token)
            agreeing = [c for c in agreeing if len(c) > i and c[i] == token]
        if out:  # (one whose continuations disagree at once is left out: a shorter one may draft)
            table[words] = out
    return table


def corpus_lookup(corpus: LookupCorpus, rows: list[list[int]], max_tokens: int) -> list[list[int]]:
    """`LookupCorpus.match` on rows of their own lengths, each row's drafts cut to its count."""
    suffix = torch.tensor([[r[-1 - k] if k < len(r) else -2 for k in range(4)] for r in rows])
    tokens, count = corpus.match(suffix, torch.tensor([len(r) for r in rows]), max_tokens)
    return [t[:c] for t, c in zip(tokens.tolist(), count.tolist(), strict=True)]


def expected_match(table, row: list[int], max_tokens: int) -> list[int]:
    for n in sorted(NGRAM_SIZES, reverse=True):
        if len(row) >= n and tuple(row[-n:]) in table:
            return table[tuple(row[-n:])][:max_tokens]
    return []


@settings(max_examples=60, deadline=None)
@given(answers=st.lists(st.lists(st.integers(0, 3), max_size=25), max_size=8),
       rows=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=4),
       min_count=st.integers(1, 3), max_tokens=st.integers(1, 10))
def test_the_table_and_its_lookup_match_counting(answers, rows, min_count, max_tokens):
    """Every kept sequence and its agreed continuation as counting finds them; the device lookup of any row's last
    tokens is the longest kept sequence's (a tiny vocabulary: sequences repeat, continuations disagree)."""
    corpus = LookupCorpus.build(answers, min_count=min_count)
    table = reference_table(answers, min_count)
    assert len(corpus) == len(table) and corpus.answers == len(answers)
    assert corpus_lookup(corpus, rows, max_tokens) == [expected_match(table, r, max_tokens) for r in rows]
    # every kept sequence is found, with its continuation
    words = list(table)
    if words:
        assert corpus_lookup(corpus, [list(w) for w in words], MAX_DRAFTS) == [table[w] for w in words]


def test_a_corpus_of_token_ids_past_the_vocabulary_is_one_line_error():
    """Another model's corpus (`--lookup-corpus FILE`): an MTPError before decoding, not an index error."""
    model = tiny_mtp("llama", num_heads=3, vocab_size=40)
    corpus = LookupCorpus.build([[1, 1, 50, 51, 52]] * 3)
    for passed in (corpus, GrowingCorpus(corpus)):  # (a growing one: its base; its answers are the model's own)
        with pytest.raises(MTPError, match="the lookup corpus holds token id 52, past this model's vocabulary"):
            generate(model, torch.tensor([[7, 3, 1]]), max_new_tokens=6, strategy="speculative", lookup=4,
                     lookup_corpus=passed)


def test_rows_whose_own_match_is_short_take_the_corpus_drafts():
    corpus = LookupCorpus.build([[1, 2, 3, 4, 5, 6]] * 2)
    history = torch.tensor([[9, 1, 2, 0, 0], [2, 3, 7, 2, 3], [8, 8, 2, 0, 0]])
    tokens, count = lookup_drafts(history, torch.tensor([3, 5, 3]), 4, corpus)
    # row 0: no match of its own, the corpus continues (1, 2) with 3 4 5 6; row 1: its own 2-token match (2, 3)
    # wins; row 2: neither finds one (the corpus keeps sequences of 2 tokens or more, and not (8, 2))
    assert count.tolist() == [4, 3, 0] and tokens[:2].tolist() == [[3, 4, 5, 6], [7, 2, 3, 3]]
    assert CORPUS_BELOW == 2
    own_tokens, own_count = lookup_drafts(history, torch.tensor([3, 5, 3]), 4)
    assert count[2] == own_count[2] and tokens[2].tolist() == own_tokens[2].tolist()
    # wider than the corpus keeps: its drafts end where its continuation does, the rest filled with the last
    tokens, count = lookup_drafts(history[:1], torch.tensor([3]), MAX_DRAFTS + 3, corpus)
    assert count.tolist() == [4] and tokens[0].tolist() == [3, 4, 5, 6] + [6] * (MAX_DRAFTS - 1)


@settings(max_examples=40, deadline=None)
@given(seq=st.lists(st.integers(0, 4), min_size=1, max_size=20), max_tokens=st.integers(1, 6))
def test_without_a_useful_corpus_lookup_is_the_rows_own(seq, max_tokens):
    """A corpus that holds none of the row's sequences changes nothing."""
    corpus = LookupCorpus.build([[50, 51, 52, 53, 54]] * 3)
    history = torch.tensor([seq + [0, 0]])
    tokens, count = lookup_drafts(history, torch.tensor([len(seq)]), max_tokens, corpus)
    assert tokens[0, :count[0]].tolist() == brute_force_lookup(seq, max_tokens)


def test_save_and_load_and_a_file_that_is_not_one(tmp_path):
    corpus = LookupCorpus.build([[1, 2, 3, 4, 5], [1, 2, 3, 9], [7, 1, 2, 3, 4]])
    path = corpus.save(tmp_path / CORPUS_NAME)
    back = folder_corpus(tmp_path)
    assert back.fingerprint == corpus.fingerprint and back.answers == 3
    assert torch.equal(back.drafts, corpus.drafts) and torch.equal(back.counts, corpus.counts)
    assert folder_corpus(tmp_path / "nothing") is None and folder_corpus(None) is None
    path.write_bytes(b"not safetensors")
    with pytest.raises(MTPError, match=CORPUS_NAME):
        folder_corpus(tmp_path)
    from safetensors.torch import save_file

    save_file({"keys": torch.zeros(1, dtype=torch.long)}, str(path), metadata={"format": "0"})
    with pytest.raises(MTPError, match="not a lookup corpus this mtp reads"):
        LookupCorpus.load(path)
    with pytest.raises(MTPError, match="token ids"):
        LookupCorpus.build([[1, -3, 2]])


def varied(model):
    """A tiny model with 10x its weights: its greedy answers wander instead of repeating one token at once (which
    a row's own lookup, and even its filler drafts, would predict)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("graphs", [False, True])
def test_decoding_with_a_corpus_of_the_models_answers_equals_greedy_in_fewer_forwards(family, graphs, request):
    """A corpus of the model's own earlier greedy answers (to these prompts, as a server sees questions again):
    the same tokens as greedy, in fewer forwards than lookup without it (the corpus drafts where the row's own
    tokens have not repeated yet)."""
    if graphs:
        request.getfixturevalue("replayed")  # (the replay path, with the CPU's stand-in for a capture)
    model = varied(tiny_mtp(family, num_heads=1, dtype=torch.float64, vocab_size=256, seed=1))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 9, 7, 12)]
    reference = [reference_greedy(model, p, 16) for p in prompts]
    corpus = LookupCorpus.build(reference, min_count=1)  # (each answer seen once)
    ids, mask = left_pad(prompts)
    kw = dict(max_new_tokens=16, strategy="speculative", stop_token_ids=[], adaptive_draft=False, graphs=graphs,
              lookup=5)
    with_corpus = generate(model, ids, mask, lookup_corpus=corpus, **kw)
    without = generate(model, ids, mask, **kw)
    assert with_corpus.tokens == reference and without.tokens == reference
    assert with_corpus.stats.forward_passes < without.stats.forward_passes
    with pytest.raises(MTPError, match="lookup_corpus must be a mtp.LookupCorpus"):
        generate(model, ids, mask, lookup_corpus="lookup_corpus.safetensors", **kw)
    heads = varied(tiny_mtp(family, num_heads=3, dtype=torch.float64, vocab_size=256, seed=1))  # and a tree
    reference = [reference_greedy(heads, p, 16) for p in prompts]
    tree = generate(heads, ids, mask, lookup_corpus=corpus, tree="dynamic", tree_size=4, **kw)
    assert tree.tokens == reference


def test_the_commands_read_the_model_folders_corpus_or_the_one_named(tiny_mtp_folder, tmp_path, capsys):
    from mtp.cli import run
    from mtp.decoding.options import DraftOptions
    from mtp.models.loading import load_mtp_model

    model = load_mtp_model(str(tiny_mtp_folder))
    assert DraftOptions(lookup=4, lookup_corpus="auto").corpus(model) is None  # a folder without one
    corpus = LookupCorpus.build([[5, 6, 7, 8, 9]] * 2)
    corpus.save(tiny_mtp_folder / CORPUS_NAME)
    other = LookupCorpus.build([[1, 2, 3]] * 2).save(tmp_path / "other.safetensors")
    assert DraftOptions(lookup=4, lookup_corpus="auto").corpus(model).fingerprint == corpus.fingerprint
    assert DraftOptions(lookup=4).corpus(model) is None  # none unless asked
    assert DraftOptions(lookup=0, lookup_corpus="auto").corpus(model) is None  # no lookup drafts: no corpus
    assert DraftOptions(lookup=4, lookup_corpus=str(other)).corpus(model).answers == 2
    # the bench: each lookup row again with the corpus, only when asked
    from mtp.evaluation.bench import build_methods

    names = [x.name for x in build_methods(model, model.tokenizer, hf=False, fp16=False, tree_size=[2], lookup=3,
                                           lookup_corpus="auto")]
    assert [n for n in names if "lookup" in n] == ["speculative-lookup3", "speculative-tree2-lookup3",
                                                    "speculative-lookup3-corpus", "speculative-tree2-lookup3-corpus"]
    assert not [n for n in [x.name for x in build_methods(model, model.tokenizer, hf=False, fp16=False, lookup=3)]
                if n.endswith("-corpus")]
    # a corpus file that is not there: an MTPError naming it (one line, exit code 2), checked with the inputs
    with pytest.raises(MTPError, match="missing.safetensors: lookup corpus file not found"):
        run(["generate", "--model", str(tiny_mtp_folder), "--prompt", "hi", "--strategy", "speculative",
             "--lookup", "4", "--lookup-corpus", str(tmp_path / "missing.safetensors")])
    # and with the folder's corpus, generate decodes as without it
    outs = []
    for choice in ("auto", "none"):
        assert run(["generate", "--model", str(tiny_mtp_folder), "--prompt", "hi", "--strategy", "speculative",
                    "--lookup", "4", "--lookup-corpus", choice, "--max-new-tokens", "12", "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"])
    assert outs[0] == outs[1]


def test_training_saves_a_corpus_of_its_first_answers_up_to_a_token_budget(tmp_path, monkeypatch, capsys):
    from mtp.training import targets

    answers = targets.TokenLists()
    for a in ([1, 2, 3, 4], [], [1, 2, 3, 5], [7, 7, 7, 7, 7], [1, 2, 3, 4]):
        answers.append(a)
    targets._save_corpus(answers, tmp_path / CORPUS_NAME)
    assert folder_corpus(tmp_path).answers == 4  # (the empty one is left out)
    assert "lookup corpus: " in capsys.readouterr().err
    monkeypatch.setattr(targets, "CORPUS_TOKENS", 9)  # the first two answers fit; the third would not
    targets._save_corpus(answers, tmp_path / CORPUS_NAME)
    kept = folder_corpus(tmp_path)
    assert kept.answers == 2 and kept.fingerprint == LookupCorpus.build([[1, 2, 3, 4], [1, 2, 3, 5]]).fingerprint


def table_of(corpus: LookupCorpus) -> dict[tuple[int, ...], list[int]]:
    """{key: continuation} of a corpus's kept sequences (keys are hashes: compared as the tables' keys are)."""
    n = len(corpus)
    return {k: d[:c] for k, d, c in zip(corpus.keys[:n].tolist(), corpus.drafts[:n].tolist(),
                                         corpus.counts[:n].tolist(), strict=True)}


@settings(max_examples=40, deadline=None)
@given(answers=st.lists(st.lists(st.integers(0, 3), max_size=12), max_size=12),
       base_answers=st.lists(st.lists(st.integers(0, 3), max_size=12), max_size=4),
       max_tokens=st.integers(1, 60), rows=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6),
                                                     min_size=1, max_size=4))
def test_a_growing_corpus_holds_its_recent_answers_and_its_base(answers, base_answers, max_tokens, rows):
    """After a rebuild: the sequences of the most recent answers within its token budget (as a corpus built from
    them holds them), and the base's that those do not hold; the lookup finds them (padding equals no key)."""
    base = LookupCorpus.build(base_answers)
    corpus = GrowingCorpus(base, capacity=256, max_tokens=max_tokens, background=False)
    for a in answers:
        corpus.add(a)
    corpus.rebuild()
    recent, total = [], 0
    for a in reversed([a for a in answers if a]):  # the newest first while they fit (the newest always kept)
        if recent and total + len(a) > max_tokens:
            break
        recent.insert(0, a)
        total += len(a)
    expected = table_of(base) | table_of(LookupCorpus.build(recent))  # (the answers' continuation wins)
    assert table_of(corpus) == expected and len(corpus) == len(expected)
    assert corpus.added == len([a for a in answers if a]) and corpus.answers == len(base_answers) + len(recent)
    table = reference_table(base_answers, 2) | reference_table(recent, 2)
    assert corpus_lookup(corpus, rows, MAX_DRAFTS) == [expected_match(table, r, MAX_DRAFTS) for r in rows]


def test_a_growing_corpus_rebuilds_as_answers_come_keeps_its_tensors_and_past_capacity_the_longest():
    corpus = GrowingCorpus(background=False)
    keys, drafts = corpus.keys, corpus.on(torch.device("cpu"))[1]
    corpus.add([1, 2, 3, 4])
    assert len(corpus) == 0  # (one answer: every sequence seen once)
    corpus.add([1, 2, 3, 5])  # the second answer rebuilds: (1, 2) and (1, 2, 3) seen twice
    assert corpus_lookup(corpus, [[9, 1, 2]], 4) == [[3, 4]]
    assert corpus.keys is keys and corpus.on(torch.device("cpu"))[1] is drafts  # written in place
    for _ in range(5):  # (an eighth of those it holds, at least 2, since the last rebuild)
        corpus.add([7, 8, 9])
    assert corpus_lookup(corpus, [[7, 8]], 4) == [[9]]
    assert table_of(corpus) == table_of(LookupCorpus.build([[1, 2, 3, 4], [1, 2, 3, 5]] + [[7, 8, 9]] * 4))
    small = GrowingCorpus(capacity=2, background=False)
    small.add([1, 2, 3, 4, 5, 6])
    small.add([1, 2, 3, 4, 5, 6, 7, 8])
    full = table_of(LookupCorpus.build([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8]]))
    longest = sorted(full.items(), key=lambda kv: -len(kv[1]))[:2]
    assert table_of(small) == dict(longest) and len(small) == 2
    assert small.keys.shape == (2,) and (small.keys[:-1] <= small.keys[1:]).all()
    from_base = GrowingCorpus(LookupCorpus.build([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8]]), capacity=2)
    assert table_of(from_base) == dict(longest)  # (a base past the capacity too)


def test_a_growing_corpus_builds_on_a_thread_past_its_sync_size(monkeypatch):
    """On a thread of its own, at the lowest priority (Linux: its own nice value) where it can set one."""
    import os
    import sys
    import threading

    niced = []
    monkeypatch.setattr(os, "setpriority", lambda which, who, value: niced.append(
        (which, who == threading.get_native_id() and threading.current_thread().name, value)), raising=False)
    monkeypatch.setattr(GrowingCorpus, "SYNC_TOKENS", 0)
    answers = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [5, 6, 7], [5, 6, 7]]
    corpus = GrowingCorpus()
    corpus.add(answers[0])
    corpus.add(answers[1])
    corpus.wait()  # (the thread's rebuild installed)
    assert corpus._builder is None and table_of(corpus) == table_of(LookupCorpus.build(answers[:2]))
    corpus.add(answers[2])
    corpus.add(answers[3])
    corpus.wait()
    assert table_of(corpus) == table_of(LookupCorpus.build(answers)) and corpus.answers == 4
    assert niced == ([(os.PRIO_PROCESS, "mtp-corpus", 19)] * 2 if sys.platform == "linux" else [])
    assert fixed_corpus(corpus) is None and fixed_corpus(GrowingCorpus(LookupCorpus.build(answers))).answers == 4


def test_a_growing_corpus_with_a_file_writes_its_rebuilds_and_as_it_finishes_every_answer(tmp_path, monkeypatch,
                                                                                          capsys):
    """`--save-corpus`: each rebuild is written (on its thread too), a rebuild older than the file's is not, the
    answers since the last rebuild go in as it finishes; the file read back as a base drafts the same. A write
    that fails while decoding goes on is a warning, said once; at the end, an MTPError."""
    from mtp.decoding.corpus import finish_corpus

    path = tmp_path / "grown.safetensors"
    answers = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [5, 6, 7], [5, 6, 7], [8, 9, 1, 2], [8, 9, 1, 2]]
    base = LookupCorpus.build([[20, 21, 22], [20, 21, 22]])
    corpus = GrowingCorpus(base, background=False, path=path)
    corpus.add(answers[0])
    assert not path.exists()  # (one answer: no rebuild yet)
    corpus.add(answers[1])
    assert table_of(LookupCorpus.load(path)) == table_of(corpus)
    corpus.add(answers[2])  # (not yet a rebuild: 1 new answer of 3)
    assert table_of(LookupCorpus.load(path)) == {**table_of(base), **table_of(LookupCorpus.build(answers[:2]))}
    finish_corpus(corpus)
    saved = LookupCorpus.load(path)
    assert table_of(saved) == table_of(corpus) == {**table_of(base), **table_of(LookupCorpus.build(answers[:3]))}
    assert saved.answers == 2 + 3 and "written to" in capsys.readouterr().err
    again = GrowingCorpus(saved, background=False, path=path)  # the next run: the file as its base
    assert table_of(again) == table_of(saved)
    finish_corpus(again)  # (nothing taken in: the base written back)
    assert table_of(LookupCorpus.load(path)) == table_of(saved)

    monkeypatch.setattr(GrowingCorpus, "SYNC_TOKENS", 0)
    threaded = GrowingCorpus(path=path)
    for n in (2, 4):
        for answer in answers[n - 2:n]:
            threaded.add(answer)
        threaded.wait()
        assert table_of(LookupCorpus.load(path)) == table_of(LookupCorpus.build(answers[:n]))
    threaded._write((1, ([], [], []), 0))  # an older rebuild's tables, ending later: not written
    assert table_of(LookupCorpus.load(path)) == table_of(LookupCorpus.build(answers[:4]))

    (tmp_path / "file").write_text("")
    broken = GrowingCorpus(background=False, path=tmp_path / "file" / "grown.safetensors")
    for answer in answers:
        broken.add(answer)  # (rebuilds at 2, 3?, 4 and 6 answers: each write fails)
    assert capsys.readouterr().err.count("warning: the lookup corpus was not written") == 1
    assert table_of(broken) == table_of(LookupCorpus.build(answers))  # (decoding goes on with it)
    with pytest.raises(MTPError, match="--save-corpus: cannot write"):
        broken.finish()


@pytest.mark.parametrize("graphs", [False, True])
def test_decoding_with_a_growing_corpus_drafts_from_earlier_calls_answers(graphs, request):
    """Prompts decoded one call at a time, as a server sees them, twice: the second time, the corpus grown from
    the first time's answers drafts (fewer forwards) and every answer is greedy's. Replayed steps read the
    corpus's contents as they are now: their session was made when it was empty."""
    if graphs:
        request.getfixturevalue("replayed")
    model = varied(tiny_mtp("llama", num_heads=1, dtype=torch.float64, vocab_size=256, seed=1))
    decode_twice_with_a_growing_corpus(model, "cpu", graphs)


def decode_twice_with_a_growing_corpus(model, device: str, graphs: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 9, 7, 12)]
    reference = [reference_greedy(model, p, 16) for p in prompts]
    kw = dict(max_new_tokens=16, strategy="speculative", stop_token_ids=[], adaptive_draft=False, graphs=graphs,
              lookup=5)
    corpus = GrowingCorpus(background=False)
    first = [generate(model, torch.tensor([p], device=device), lookup_corpus=corpus, **kw) for p in prompts]
    assert [r.tokens[0] for r in first] == reference and corpus.added == 4
    corpus.rebuild()  # (the schedule rebuilt at the 2nd and 4th answers: each answer twice from here)
    again = [generate(model, torch.tensor([p], device=device), lookup_corpus=corpus, **kw) for p in prompts]
    plain = [generate(model, torch.tensor([p], device=device), **kw) for p in prompts]
    assert [r.tokens[0] for r in again] == reference == [r.tokens[0] for r in plain]
    assert sum(r.stats.forward_passes for r in again) < sum(r.stats.forward_passes for r in plain)
    # a batch's rows take in their answers as they end
    batch = GrowingCorpus(background=False)
    ids, mask = left_pad(prompts)
    assert generate(model, ids.to(device), mask.to(device), lookup_corpus=batch, **kw).tokens == reference
    assert batch.added == 4


@pytest.mark.cuda
def test_cuda_replayed_steps_read_a_growing_corpus_from_its_device_copies():
    """The copies on the GPU are written in place by each rebuild: captured graphs read the new contents."""
    model = varied(tiny_mtp("llama", num_heads=1, dtype=torch.float64, vocab_size=256, seed=1)).float().cuda()
    decode_twice_with_a_growing_corpus(model, "cuda", True)


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi", "--strategy", "speculative"], ["serve"],
                                     ["eval", "--strategy", "speculative"]])
def test_a_damaged_corpus_file_is_refused_before_the_model_loads(command, tmp_path, capsys):
    from mtp.cli import run

    garbage = tmp_path / "corpus.safetensors"
    garbage.write_bytes(bytes(range(256)) * 4)
    missing = ["--model", str(tmp_path / "no-model")]  # (one it looked for first: "model not found")
    with pytest.raises(MTPError, match="corpus.safetensors is not a valid safetensors file"):
        run([*command, *missing, "--lookup", "2", "--lookup-corpus", str(garbage)])


def test_grow_corpus_on_the_command_line(tiny_mtp_folder, tmp_path, capsys):
    from mtp.cli import run

    with pytest.raises(MTPError, match="--grow-corpus adds answers to the drafts of --lookup: give --lookup N"):
        run(["generate", "--model", str(tiny_mtp_folder), "--prompt", "hi", "--grow-corpus"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\nhello there\nhi\n")
    outs = []
    for grow in ("--grow-corpus", "--no-grow-corpus"):
        assert run(["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts), "--strategy",
                     "speculative", "--lookup", "4", grow, "--max-new-tokens", "12", "--json"]) == 0
        outs.append([json.loads(line)["text"] for line in capsys.readouterr().out.strip().splitlines()])
    assert outs[0] == outs[1] and len(outs[0]) == 3
    saved = tmp_path / "corpus.safetensors"
    with pytest.raises(MTPError, match="--save-corpus writes the corpus --grow-corpus grows"):
        run(["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts), "--strategy", "speculative",
             "--lookup", "4", "--save-corpus", str(saved)])
    with pytest.raises(MTPError, match="--save-corpus .* is a folder"):
        run(["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts), "--strategy", "speculative",
             "--lookup", "4", "--grow-corpus", "--save-corpus", str(tmp_path)])
    for run_number in (1, 2):  # the second run reads the first's file, grows it and writes it back
        kept = ["--lookup-corpus", str(saved)] if run_number == 2 else []
        assert run(["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts), "--strategy",
                    "speculative", "--lookup", "4", "--grow-corpus", "--save-corpus", str(saved), *kept,
                    "--max-new-tokens", "12", "--json"]) == 0
        assert [json.loads(line)["text"] for line in capsys.readouterr().out.strip().splitlines()] == outs[0]
        assert LookupCorpus.load(saved).answers == 3 * run_number


def test_a_servers_growing_corpus_takes_its_answers_and_seeded_requests_read_its_base(tiny_mtp_folder):
    """The decoding thread of `mtp serve --grow-corpus`: each answer goes in as its row ends; a seeded request
    drafts from the base alone (its draws follow its drafts: its seed reproduces them whatever came before)."""
    from queue import Queue

    from mtp.decoding import openai_api as api
    from mtp.decoding.batcher import Batcher, Job
    from mtp.models.loading import load_mtp_model

    model = load_mtp_model(str(tiny_mtp_folder))
    corpus = GrowingCorpus(background=False)
    batcher = Batcher(model, {"strategy": "speculative", "graphs": False, "lookup": 4, "lookup_corpus": corpus},
                      log=lambda line: None)
    batcher.warm_up()  # (its answer is not one)
    assert corpus.added == 0
    jobs = [Job([5, 6, 7], api.Sampling(max_tokens=6), 0, Queue()), Job([8, 9], api.Sampling(max_tokens=5), 1, Queue())]
    batcher.decode_batch(jobs)
    answers = [[e for e in list(j.events.queue) if e[0] == "end"][0][2].tokens for j in jobs]
    assert corpus.added == 2 and sorted(corpus.recent) == sorted(answers)  # (in the order the rows ended)
    metrics = batcher.counts.prometheus(0, 0, corpus)  # (/metrics)
    assert f"mtp_lookup_corpus_sequences {len(corpus)}\n" in metrics and "mtp_lookup_corpus_answers_total 2\n" in metrics
    assert "lookup_corpus" not in batcher.counts.prometheus(0, 0, LookupCorpus.build(answers))
    seeded = [Job([5, 6, 7], api.Sampling(max_tokens=6, do_sample=True, seed=3), 0, Queue())]
    batcher.decode_batch(seeded)
    assert [e[0] for e in list(seeded[0].events.queue)][-1] == "end" and corpus.added == 2


def test_a_rebuild_on_its_thread_that_ends_after_a_newer_one_is_not_installed(monkeypatch):
    import threading

    monkeypatch.setattr(GrowingCorpus, "SYNC_TOKENS", 0)
    release, build = threading.Event(), LookupCorpus.build

    def slow_on_its_thread(answers, *a, **kw):
        if threading.current_thread().name == "mtp-corpus":
            release.wait(10)
        return build(answers, *a, **kw)

    monkeypatch.setattr(LookupCorpus, "build", staticmethod(slow_on_its_thread))
    corpus = GrowingCorpus()
    corpus.add([1, 2, 3])
    corpus.add([1, 2, 3])  # a rebuild on its thread, held
    corpus.add([4, 5, 6])
    corpus.add([4, 5, 6])
    corpus.rebuild()  # all four answers, now
    release.set()
    corpus.wait()
    assert table_of(corpus) == table_of(build([[1, 2, 3], [1, 2, 3], [4, 5, 6], [4, 5, 6]]))


def test_generate_prompts_with_a_growing_corpus(tiny_mtp_folder, tmp_path, capsys, monkeypatch):
    """A prompts file whose records sample, with --seed: the corpus rebuilds at once, never on a thread (its draws
    follow the drafts); a run that goes on from its journal takes in the answers it had first."""
    import mtp.decoding.queue as queue_module
    from mtp.cli import run

    made, added = [], []
    init, add = GrowingCorpus.__init__, GrowingCorpus.add
    monkeypatch.setattr(GrowingCorpus, "__init__", lambda self, *a, **kw: made.append(kw) or init(self, *a, **kw))
    monkeypatch.setattr(GrowingCorpus, "add", lambda self, answer: added.append(list(answer)) or add(self, answer))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t, "do_sample": True}) + "\n" for t in ["hi", "go on", "ok"]))
    args = ["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts), "--strategy", "speculative",
            "--lookup", "4", "--grow-corpus", "--max-new-tokens", "6", "--batch-size", "1", "--no-progress",
            "--output", str(tmp_path / "out.jsonl")]
    assert run([*args, "--seed", "7"]) == 0 and made[-1] == {"background": False, "path": None}
    real = queue_module.generate

    def first_answer_only(*a, on_end, **kw):  # (Ctrl-C once the first answer is written)
        def end(row, *rest):
            on_end(row, *rest)
            raise KeyboardInterrupt
        return real(*a, on_end=end, **kw)

    monkeypatch.setattr(queue_module, "generate", first_answer_only)
    out = tmp_path / "again.jsonl"
    args[-1] = str(out)
    with pytest.raises(KeyboardInterrupt):
        run(args)
    journal = [json.loads(line) for line in (tmp_path / "again.jsonl.partial").read_text().splitlines()]
    assert made[-1] == {"background": True, "path": None} and len(journal) == 2
    monkeypatch.setattr(queue_module, "generate", real)
    added.clear()
    assert run(args) == 0
    assert added[0] == journal[1]["token_ids"] and len(added) == 3


def test_a_compiled_step_reads_a_growing_corpus_as_it_is_now(monkeypatch):
    """graphs="compile" (aot_eager here: dynamo's trace of the step, run eagerly): the corpus's tensors are inputs
    of the traced step, not constants of it; a step compiled while the corpus was empty drafts from it once it
    grew, as the uncompiled static step does, in as many forwards, and nothing compiles again."""
    from test_graphs import compiling_with
    from torch._dynamo.utils import counters

    compiling_with(monkeypatch, "aot_eager")
    monkeypatch.setattr(generate_module, "_use_graphs", lambda graphs, device, proposer: graphs)
    model = varied(tiny_mtp("llama", num_heads=1, dtype=torch.float64, vocab_size=256, seed=1))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 9, 7, 12)]
    kw = dict(max_new_tokens=16, strategy="speculative", stop_token_ids=[], adaptive_draft=False, lookup=5)
    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for graphs in (True, "compile"):  # the static step replayed, then compiled
        corpus = GrowingCorpus(background=False)
        for p in prompts:  # (the first answers: drafts from an empty corpus, then from a few)
            generate(model, torch.tensor([p]), lookup_corpus=corpus, graphs=graphs, **kw)
        corpus.rebuild()
        compiled_graphs = counters["stats"]["unique_graphs"]
        runs[graphs] = [generate(model, torch.tensor([p]), lookup_corpus=corpus, graphs=graphs, **kw) for p in prompts]
    assert [r.tokens for r in runs["compile"]] == [r.tokens for r in runs[True]]
    forwards = [[r.stats.forward_passes for r in rs] for rs in runs.values()]
    assert forwards[0] == forwards[1] and sum(forwards[0]) < 4 * 17  # (it drafted: fewer than a forward a token)
    assert counters["stats"]["unique_graphs"] == compiled_graphs >= 1
