"""Loading, tokenizing and batching training data, with a tiny tokenizer trained offline in the test."""

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mtp.errors import MTPError
from mtp.training.data import (
    Example,
    Examples,
    TokenizedData,
    batch_at,
    batches,
    batches_per_epoch,
    load_examples,
    open_examples,
    split_holdout,
    tokenize_examples,
    tokenize_split,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # Byte-level BPE, so any text round-trips exactly through encode/decode.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["What is the capital of France?", "Paris is the capital.", "user assistant 1 2 3 4 5"] * 10
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# --- loading ------------------------------------------------------------------------------------------------


def test_gsm8k_jsonl(tmp_path) -> None:
    path = tmp_path / "g.jsonl"
    write_jsonl(
        path, [{"question": "q1", "answer": "a1\n#### 1"}, {"question": "q2", "answer": "a2\n#### 2"}]
    )
    assert load_examples(str(path), format="gsm8k") == [
        Example("q1", "a1\n#### 1"),
        Example("q2", "a2\n#### 2"),
    ]
    assert load_examples(str(path)) == load_examples(str(path), format="gsm8k")
    assert load_examples(str(path), limit=1) == [Example("q1", "a1\n#### 1")]


def test_metamathqa_json_array_and_jsonl(tmp_path) -> None:
    records = [{"query": "q1", "response": "r1", "type": "GSM_Rephrased"}, {"query": "q2", "response": "r2"}]
    array = tmp_path / "MetaMathQA-395K.json"
    array.write_text(json.dumps(records, indent=2), encoding="utf-8")
    lines = tmp_path / "mm.jsonl"
    write_jsonl(lines, records)
    expected = [Example("q1", "r1"), Example("q2", "r2")]
    assert load_examples(str(array)) == expected
    assert load_examples(str(array), format="metamathqa") == expected
    assert load_examples(str(lines), format="metamathqa") == expected


def test_text_documents(tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("First doc\nline two.\n\n  \nSecond doc.\n\n\n", encoding="utf-8")
    expected = [Example("", "First doc\nline two."), Example("", "Second doc.")]
    assert load_examples(str(path)) == expected
    assert load_examples(str(path), format="text") == expected


def test_auto_detects_by_contents_and_a_json_name_must_hold_json(tmp_path) -> None:
    # A .txt holding MetaMathQA records is read as records; a .jsonl holding prose is an error at its line.
    looks_text = tmp_path / "data.txt"
    write_jsonl(looks_text, [{"query": "q", "response": "r"}])
    assert load_examples(str(looks_text)) == [Example("q", "r")]
    prose = tmp_path / "data.txt"
    prose.write_text("just some prose\n", encoding="utf-8")
    assert load_examples(str(prose)) == [Example("", "just some prose")]
    for name in ("data.jsonl", "data.json"):
        damaged = tmp_path / name
        damaged.write_text("\njust some prose\n", encoding="utf-8")
        with pytest.raises(MTPError, match=rf"{name}:2: not valid JSON"):
            load_examples(str(damaged))
    custom = tmp_path / "custom.jsonl"
    write_jsonl(custom, [{"problem": "p", "solution": "s"}])
    assert load_examples(str(custom), question_field="problem", answer_field="solution") == [
        Example("p", "s")
    ]
    with pytest.raises(MTPError, match=r"custom\.jsonl:1: .*question_field"):
        load_examples(str(custom))


def test_shipped_gsm8k_by_name() -> None:
    train = load_examples("gsm8k", limit=3)
    assert len(train) == 3 and train[0].prompt.startswith("Natalia")
    assert len(load_examples("gsm8k", split="test")) == 1319


def test_malformed_line_has_line_number(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q", "answer": \n', encoding="utf-8")
    with pytest.raises(MTPError, match=r"bad\.jsonl:3: not valid JSON"):
        load_examples(str(path))


def test_malformed_json_array_element_has_line_number(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"query": "q", "response": "r"},\n {"query": "q"}\n]\n', encoding="utf-8")
    with pytest.raises(MTPError, match=r"bad\.json:3: missing key 'response'"):
        load_examples(str(path))
    path.write_text(
        '[\n {"query": "q", "response": "r"},\n {"query": "q" "response": "r"}\n]\n', encoding="utf-8"
    )
    with pytest.raises(MTPError, match=r"bad\.json:3: not valid JSON"):
        load_examples(str(path))


def test_missing_key_and_non_string(tmp_path) -> None:
    path = tmp_path / "g.jsonl"
    write_jsonl(path, [{"question": "q", "answer": "a"}, {"question": "q"}])
    with pytest.raises(MTPError, match=r"g\.jsonl:2: missing key 'answer'"):
        load_examples(str(path), format="gsm8k")
    write_jsonl(path, [{"question": "q", "answer": "a"}, {"question": "q", "answer": 7}])
    with pytest.raises(MTPError, match=r"g\.jsonl:2: 'answer' must be a string"):
        load_examples(str(path))
    write_jsonl(path, [["not", "an", "object"]])
    with pytest.raises(MTPError, match=r"g\.jsonl:1: expected a JSON object"):
        load_examples(str(path))


def test_missing_file(tmp_path) -> None:
    with pytest.raises(MTPError, match="not found"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_dataset_name_offline_is_mtperror(monkeypatch) -> None:
    # Works whether or not `datasets` is installed: offline it fails fast, absent it is reported as such.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MTPError, match="not-a-real-org/no-such-dataset"):
        load_examples("not-a-real-org/no-such-dataset")


def test_dataset_name_without_datasets_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(MTPError, match="pip install datasets"):
        load_examples("meta-math/MetaMathQA")


def test_dataset_folder_without_datasets_package(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MTPError, match="is a directory.*pip install datasets"):
        load_examples(str(tmp_path))


def test_dataset_folder_saved_or_of_data_files(tmp_path, monkeypatch) -> None:
    """A folder `save_to_disk` wrote is loaded from disk (a DatasetDict: its split); any other folder is given to
    `load_dataset` (data files). A stand-in `datasets` module: the real one is optional."""
    fake = types.ModuleType("datasets")
    fake.DatasetDict = type("DatasetDict", (dict,), {})
    saved = fake.DatasetDict(train=[{"query": "q1", "response": "r1"}], test=[{"query": "q2", "response": "r2"}])
    fake.load_from_disk = lambda path: saved
    fake.load_dataset = lambda path, split: [{"prompt": f"{split} of {Path(path).name}", "completion": "c"}]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text("{}")
    assert load_examples(str(tmp_path / "saved"), split="test") == [Example("q2", "r2")]
    with pytest.raises(MTPError, match="no split 'validation'.*train, test"):
        load_examples(str(tmp_path / "saved"), split="validation")
    (tmp_path / "files").mkdir()
    assert load_examples(str(tmp_path / "files")) == [Example("train of files", "c")]


def test_dataset_folder_with_the_datasets_package(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_list([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}])
    rows.save_to_disk(str(tmp_path / "saved"))
    assert load_examples(str(tmp_path / "saved"), limit=1) == [Example("q1", "a1")]
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    assert load_examples(str(tmp_path / "files")) == [Example("p", "c")]


def test_jsonl_is_read_record_by_record_each_time(tmp_path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps({"question": f"q{i}", "answer": "a"}).encode() + b"\n"
                                                for i in range(5)))  # a byte-order mark first
    examples = open_examples(str(path), limit=4)
    assert isinstance(examples, Examples) and len(examples) == 4
    assert [ex.prompt for ex in examples] == [ex.prompt for ex in examples] == ["q0", "q1", "q2", "q3"]
    path.write_bytes(path.read_bytes() + b'{"question": "\xff", "answer": "a"}\n')
    with pytest.raises(MTPError, match=r"g\.jsonl:6: not UTF-8"):
        open_examples(str(path))


def test_tokenized_rows_take_a_few_bytes_a_token(tokenizer, tmp_path) -> None:
    """Loading and tokenizing 10x the rows costs their int32 tokens (and mask bytes), not Python objects: the
    traced peak (Python's allocations and the rows' arrays) grows by under 8 bytes a token; a list of ints per
    row would take 36."""
    import tracemalloc

    def peak_and_tokens(n: int) -> tuple[int, int]:
        path = tmp_path / f"d{n}.jsonl"
        write_jsonl(path, [{"question": f"What is {i} plus {i % 9}?", "answer": f"{i + i % 9}"} for i in range(n)])
        tracemalloc.start()
        train, held = tokenize_split(open_examples(str(path)), {0, 1}, tokenizer, "plain", seq_len=64)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(train) == n - 2 and len(held) == 2
        return peak, int(train.lengths.sum())

    (small, small_tokens), (large, large_tokens) = peak_and_tokens(500), peak_and_tokens(5_000)
    assert large - small < 8 * (large_tokens - small_tokens), (small, large, large_tokens)


class FakeDataset(list):
    def select(self, indices):
        return FakeDataset(self[i] for i in indices)


def test_dataset_name_with_fields(monkeypatch) -> None:
    fake = types.ModuleType("datasets")
    rows = FakeDataset([{"problem": "p1", "sol": "s1"}, {"problem": "p2", "sol": "s2"}])
    fake.load_dataset = lambda name, split: rows
    monkeypatch.setitem(sys.modules, "datasets", fake)
    got = load_examples("org/ds", question_field="problem", answer_field="sol", limit=1)
    assert got == [Example("p1", "s1")]

    def offline(name, split):
        raise ConnectionError("Couldn't reach the Hub")

    fake.load_dataset = offline
    with pytest.raises(MTPError, match="cannot load dataset 'org/ds'"):
        load_examples("org/ds")


def test_split_holdout_is_deterministic() -> None:
    examples = [Example(f"q{i}", f"a{i}") for i in range(100)]
    train, held = split_holdout(examples, fraction=0.1, seed=3)
    assert (train, held) == split_holdout(examples, fraction=0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert set(e.prompt for e in train).isdisjoint(e.prompt for e in held)
    assert split_holdout(examples, fraction=0.1, seed=4)[1] != held
    assert len(split_holdout(examples, fraction=0.5, max_items=7)[1]) == 7
    assert len(split_holdout(examples[:3], fraction=0.05)[1]) == 1


# --- tokenization -----------------------------------------------------------------------------------------


def test_chat_mask_covers_exactly_the_answer(tokenizer) -> None:
    ex = Example("What is the capital of France?", "Paris is the capital.")
    data = tokenize_examples([ex], tokenizer, template="chat", seq_len=64)
    assert isinstance(data, TokenizedData)
    assert data.input_ids.shape == data.loss_mask.shape == data.attention_mask.shape == (1, 64)
    assert data.input_ids.dtype == torch.long and data.loss_mask.dtype == torch.bool
    ids, mask, attn = data.input_ids[0], data.loss_mask[0], data.attention_mask[0].bool()
    assert tokenizer.decode(ids[mask]) == "Paris is the capital.<|im_end|>\n"
    assert (
        tokenizer.decode(ids[attn & ~mask])
        == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not (mask & ~attn).any()  # padding is never a target
    assert (ids[~attn] == tokenizer.pad_token_id).all()
    assert attn[: int(attn.sum())].all()  # right padding


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_answer_tokens_are_the_whole_texts_not_the_answers_alone(template) -> None:
    """A SentencePiece tokenizer gives a text's first word a "▁" (a space): the answer tokenized alone began
    with one, which the prompt and answer as one text (what the model reads, and writes after the prompt) do not
    have after the prompt's "\n": the model learnt to begin its answers with a space."""
    from conftest import tiny_sentencepiece_tokenizer

    tok = tiny_sentencepiece_tokenizer()
    ex = Example("What is 7 + 5?", "The answer is 12.")
    data = tokenize_examples([ex], tok, template=template, seq_len=96)
    ids, mask, attn = data.input_ids[0], data.loss_mask[0], data.attention_mask[0].bool()
    prompt, answer = ids[attn & ~mask].tolist(), ids[mask].tolist()
    whole = tok.apply_chat_template([{"role": "user", "content": ex.prompt}, {"role": "assistant",
                                    "content": ex.answer}], tokenize=False) if template == "chat" else \
        "What is 7 + 5?\n\nThe answer is 12."
    expected = tok(whole, add_special_tokens=template == "plain").input_ids
    assert prompt + answer == expected + ([tok.eos_token_id] if template == "plain" else [])
    assert tok.convert_ids_to_tokens(answer[0]) != "▁"  # (alone: "▁", "Th", "e", ...)


def test_conversations_train_on_their_last_answer_given_everything_before(tokenizer, tmp_path) -> None:
    """A "messages" record (TRL's and OpenAI's chat layout): the last assistant message is the target, the
    system message and earlier turns its context, laid out by the chat template (plain: contents, blank lines);
    the prompt the model is asked for self-targets is the same tokens."""
    from mtp.training.targets import prompt_token_ids

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "the capital of France?"},
             {"role": "assistant", "content": "Paris is the capital."}]
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [{"messages": turns}, {"messages": turns[1:3], "id": 7}])
    first, second = load_examples(str(path))
    assert (first.prompt, first.answer, first.context) == ("the capital of France?", "Paris is the capital.",
                                                           tuple(turns[:3]))
    assert (second.prompt, second.answer, second.context) == ("What is 2", "4", ())
    data = tokenize_examples([first], tokenizer, template="chat", seq_len=96)
    ids, mask, attn = data.input_ids[0], data.loss_mask[0], data.attention_mask[0].bool()
    assert tokenizer.decode(ids[mask]) == "Paris is the capital.<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(turns[:4], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[attn & ~mask]) == prompt
    asked = prompt_token_ids(tokenizer, first.prompt, "chat", first.context)
    assert ids[attn & ~mask].tolist() == asked
    plain = tokenize_examples([first], tokenizer, template="plain", seq_len=96)
    assert tokenizer.decode(plain.input_ids[0][plain.attention_mask[0].bool()]) == (
        "Be brief.\n\nWhat is 2\n\n4\n\nthe capital of France?\n\nParis is the capital.</s>")


@pytest.mark.parametrize("messages,error", [
    ("hi", "'messages' must be a list of"),
    ([{"role": "user", "content": 3}], "'messages' must be a list of"),
    ([{"role": "user", "content": "hi"}], "must end with a user message and the assistant's answer"),
    ([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "(its roles: assistant, "),
])
def test_malformed_conversations_say_where_and_what(tmp_path, messages, error) -> None:
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                       {"messages": messages}])
    with pytest.raises(MTPError, match=rf"chat.jsonl:2: .*{re.escape(error)}"):
        list(load_examples(str(path)))


def test_plain_template_and_loss_on_all(tokenizer) -> None:
    ex = Example("What is 2", "4")
    data = tokenize_examples([ex], tokenizer, template="plain", seq_len=32)
    ids, mask, attn = data.input_ids[0], data.loss_mask[0], data.attention_mask[0].bool()
    assert tokenizer.decode(ids[mask]) == "4</s>"
    assert tokenizer.decode(ids[attn]) == "What is 2\n\n4</s>"
    everything = tokenize_examples([ex], tokenizer, template="plain", seq_len=32, loss_on="all")
    assert torch.equal(everything.loss_mask[0], attn)


def test_text_documents_are_all_target_even_under_chat(tokenizer) -> None:
    data = tokenize_examples([Example("", "Paris is the capital.")], tokenizer, template="chat", seq_len=16)
    ids, mask = data.input_ids[0], data.loss_mask[0]
    assert tokenizer.decode(ids[mask]) == "Paris is the capital.</s>"


def test_truncation_keeps_the_start(tokenizer) -> None:
    ex = Example("What is the capital of France?", "Paris is the capital. " * 5)
    full = tokenize_examples([ex], tokenizer, seq_len=256)
    n = int(full.attention_mask.sum())
    short = tokenize_examples([ex], tokenizer, seq_len=n - 5)
    assert torch.equal(short.input_ids[0], full.input_ids[0, : n - 5])
    assert bool(short.attention_mask.all())
    # An example whose answer would start past seq_len has no target, so it is dropped.
    with pytest.raises(MTPError, match="no training tokens"):
        tokenize_examples([ex], tokenizer, seq_len=4)


def test_packing_shapes(tokenizer) -> None:
    examples = [Example("What is the capital of France?", "Paris is the capital.")] * 5
    unpacked = tokenize_examples(examples, tokenizer, seq_len=64, loss_on="all")
    total = int(unpacked.attention_mask.sum())
    packed = tokenize_examples(examples, tokenizer, seq_len=16, loss_on="all", pack=True)
    assert packed.input_ids.shape == (-(-total // 16), 16)
    assert bool(packed.attention_mask[:-1].all())  # only the last row is padded
    assert int(packed.attention_mask.sum()) == total
    # The stream of real tokens is the examples one after another.
    real = packed.attention_mask.bool()
    assert torch.equal(packed.input_ids[real], unpacked.input_ids[unpacked.attention_mask.bool()])
    assert torch.equal(packed.loss_mask, real)


def test_packing_answer_mask(tokenizer) -> None:
    examples = [Example("What is the capital of France?", "Paris is the capital.")] * 5
    unpacked = tokenize_examples(examples, tokenizer, seq_len=64)
    packed = tokenize_examples(examples, tokenizer, seq_len=16, pack=True)
    assert int(packed.loss_mask.sum()) == int(unpacked.loss_mask.sum())
    assert not (packed.loss_mask & ~packed.attention_mask.bool()).any()
    assert bool(packed.loss_mask.any(dim=1).all())  # rows of prompt only are dropped: they teach nothing


# --- batching -----------------------------------------------------------------------------------------------


def _data(n: int) -> TokenizedData:
    ids = torch.arange(n).unsqueeze(1).repeat(1, 4)
    return TokenizedData.from_dense(ids, torch.ones(n, 4, dtype=torch.bool), torch.ones(n, 4, dtype=torch.long))


def test_batches_cover_each_epoch_once() -> None:
    data = _data(10)
    assert batches_per_epoch(data, 4) == 3
    epoch0 = list(batches(data, 4, seed=1, epoch=0))
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(torch.cat(epoch0).tolist()) == list(range(10))
    epoch1 = torch.cat(list(batches(data, 4, seed=1, epoch=1)))
    assert not torch.equal(torch.cat(epoch0), epoch1)  # epochs reshuffle
    assert torch.equal(torch.cat(epoch0), torch.cat(list(batches(data, 4, seed=1, epoch=0))))


def test_batch_at_matches_batches_and_is_deterministic() -> None:
    data = _data(10)
    for step in range(7):
        epoch, b = divmod(step, 3)
        index = list(batches(data, 4, seed=5, epoch=epoch))[b]
        batch = batch_at(data, 4, seed=5, step=step)
        assert torch.equal(batch["input_ids"][:, 0], index)
        assert set(batch) == {"input_ids", "loss_mask", "attention_mask"}
    assert torch.equal(batch_at(data, 4, 5, 4)["input_ids"], batch_at(data, 4, 5, 4)["input_ids"])
    assert not torch.equal(batch_at(data, 4, 5, 0)["input_ids"], batch_at(data, 4, 6, 0)["input_ids"])


@pytest.mark.parametrize("name, content", [("qa.csv", b"question,answer\nWhat is 2+2?,4\n"),
                                           ("qa.tsv", b"question\tanswer\nWhat is 2+2?\t4\n"),
                                           ("qa.parquet", b"PAR1\x15\x04\x15\x10PAR1")])
def test_table_files_are_named_not_trained_on_as_text(tmp_path, name, content) -> None:
    """A CSV of question/answer columns was read as plain text documents, its header and commas trained on
    without a word (a Parquet file failed as text that is not UTF-8); a file datasets reads is refused by name,
    and --data-format text still reads it as text."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(MTPError, match=f"{name}: .* not read as question/answer records"):
        open_examples(str(path))
    if name != "qa.parquet":
        assert len(open_examples(str(path), format="text")) == 1
