"""Training data: load examples from files or a dataset name, tokenize them with loss masks, batch them.

A large source never sits in memory as text or Python objects: a JSONL file or a dataset is read record by record
(`open_examples`), and its rows are kept as flat int32 tokens with a length per row (`TokenizedData`, about 5
bytes a token), from which each batch is built when it is read.

Batching is a pure function of (seed, epoch or global step), so a resumed run sees the same batches in the same
order as a run that never stopped.
"""

from __future__ import annotations

import logging
import os
import re
from array import array
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mtp.errors import MTPError
from mtp.io import check_messages, is_json_name, parse_json_line, read_json_records, read_text

log = logging.getLogger(__name__)

Format = Literal["auto", "gsm8k", "metamathqa", "text", "jsonl"]

# (prompt column, answer column) of the record layouts we recognise, tried in order by "auto" and "jsonl".
_KNOWN_FIELDS: dict[str, tuple[str, str]] = {
    "gsm8k": ("question", "answer"),
    "metamathqa": ("query", "response"),
    "prompt/completion": ("prompt", "completion"),
    "instruction/output": ("instruction", "output"),
}
# A conversation in a "messages" column ({"role", "content"} dicts; TRL's and OpenAI's chat layout): its last
# assistant message is the answer (`Example`).
MESSAGES_FIELDS = ("messages", "messages")
# Sources with these endings are meant as files, so a missing one is an error rather than a dataset name.
_FILE_SUFFIXES = {".json", ".jsonl", ".txt", ".text", ".md"}
# Tables the datasets package reads from a folder; as a file of their own they are refused, not read as text.
_TABLE_SUFFIXES = {".csv", ".tsv", ".parquet", ".arrow", ".feather"}
# What `datasets.save_to_disk` leaves in a dataset's folder (a DatasetDict: dataset_dict.json).
_SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")


@dataclass
class Example:
    """One training example. Plain text documents have prompt "" and the document as the answer. A conversation
    (a record's "messages") is its last user turn as the prompt, the assistant's answer to it as the answer, and
    the messages before that turn (a system message, earlier turns) as `context`: only the last answer is trained
    on, given everything before it."""

    prompt: str
    answer: str
    context: tuple[dict, ...] = ()


@dataclass
class TokenizedData:
    """Rows of token ids and the mask of their target tokens, kept compactly: the tokens of all rows lie back to
    back in one int32 tensor and row i is the span `starts[i] : starts[i] + lengths[i]` of it (padded int64 rows
    took 8 * seq_len bytes a row, whatever their length). `batch` builds the padded tensors of some rows.

    A target token is one the loss predicts; shifting targets to the positions that predict them is the loss's job.
    """

    tokens: torch.Tensor  # (total,) int32: every row's tokens, back to back
    targets: torch.Tensor  # (total,) bool: which of them are targets
    starts: torch.Tensor  # (N,) int64: where each row begins in `tokens`
    lengths: torch.Tensor  # (N,) int64: its length, 1..seq_len
    seq_len: int
    pad_id: int = 0
    # Frozen-trunk outputs of the rows when they come with the data: (N, L, H) with L >= the longest row, or a
    # `mtp.training.features.StoredFeatures` read from disk; indexed as features[rows, :T] either way.
    trunk_features: Any = None
    # Unpacked rows: (N,) which input row each row came from (rows without a target are dropped); None when packed.
    source_rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.lengths.shape[0]

    @classmethod
    def from_dense(cls, input_ids: torch.Tensor, loss_mask: torch.Tensor, attention_mask: torch.Tensor,
                   pad_id: int = 0) -> TokenizedData:
        """Right-padded (N, S) tensors as compact rows (each row's real tokens must come first)."""
        real = attention_mask.bool()
        lengths = real.sum(-1)
        if not torch.equal(real, torch.arange(real.shape[1]) < lengths[:, None]):
            raise MTPError("rows must be right-padded: attention_mask 1 on a prefix of each row")
        starts = torch.cumsum(lengths, 0) - lengths
        return cls(input_ids[real].int(), loss_mask.bool()[real], starts, lengths, real.shape[1], pad_id)

    def batch(self, rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """Rows `rows` (indices or a slice) as right-padded (B, T) tensors, T the longest of them."""
        if isinstance(rows, slice):
            rows = torch.arange(len(self))[rows]
        lengths = self.lengths[rows]  # (B,)
        width = max(int(lengths.max()), 1) if lengths.numel() else 1
        real = torch.arange(width) < lengths[:, None]  # (B, T)
        where = (self.starts[rows, None] + torch.arange(width)).masked_fill(~real, 0)  # (B, T) into tokens
        return {"input_ids": self.tokens[where].long().masked_fill(~real, self.pad_id),
                "loss_mask": self.targets[where] & real,
                "attention_mask": real.long()}

    def row(self, i: int) -> torch.Tensor:
        """Row i's tokens, (length,) int32."""
        start = int(self.starts[i])
        return self.tokens[start:start + int(self.lengths[i])]

    def chunks(self, rows: int = 1024) -> Iterator[dict[str, torch.Tensor]]:
        """Every row in order, as batches of `rows` rows: a pass over the data in bounded memory."""
        for start in range(0, len(self), rows):
            yield self.batch(slice(start, start + rows))

    def target_count(self) -> int:
        return sum(int(b["loss_mask"].sum()) for b in self.chunks())

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        """(V,) how often each token id occurs in the rows."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for b in self.chunks():
            counts += torch.bincount(b["input_ids"][b["attention_mask"].bool()], minlength=vocab_size)[:vocab_size]
        return counts

    # Dense (N, seq_len) views of the whole data, for small data and tests; training reads batches.
    def _dense(self, key: str) -> torch.Tensor:
        full = self.batch(slice(None))[key]
        return torch.nn.functional.pad(full, (0, self.seq_len - full.shape[1]),
                                       value=self.pad_id if key == "input_ids" else 0)

    @property
    def input_ids(self) -> torch.Tensor:
        return self._dense("input_ids")

    @property
    def loss_mask(self) -> torch.Tensor:
        return self._dense("loss_mask")

    @property
    def attention_mask(self) -> torch.Tensor:
        return self._dense("attention_mask")


class Rows:
    """Token rows appended one at a time into growing C arrays (no Python object per token), then turned into a
    `TokenizedData`. Unpacked, a row is cut at `seq_len` as it comes and dropped when no target is left in it;
    packed, rows are kept whole and cut into `seq_len` pieces at the end."""

    def __init__(self, seq_len: int, pad_id: int, pack: bool = False):
        self.seq_len, self.pad_id, self.pack = seq_len, pad_id, pack
        self.tokens, self.targets, self.lengths = array("i"), bytearray(), array("q")
        self.source = array("q")  # unpacked: the input row each kept row came from
        self.added = self.cut = 0

    def add(self, ids: Sequence[int], mask: Sequence[bool]) -> None:
        if not self.pack:
            self.cut += len(ids) > self.seq_len
            ids, mask = ids[: self.seq_len], mask[: self.seq_len]
        if self.pack or any(mask):
            self.tokens.extend(ids)
            self.targets.extend(bytes(bool(m) for m in mask))
            self.lengths.append(len(ids))
            self.source.append(self.added)
        self.added += 1

    def finish(self) -> TokenizedData:
        """The rows; an MTPError when none has a target."""
        tokens = torch.frombuffer(self.tokens, dtype=torch.int32) if self.tokens else torch.zeros(0, dtype=torch.int32)
        targets = torch.frombuffer(self.targets, dtype=torch.bool) if self.targets else torch.zeros(0, dtype=torch.bool)
        if self.pack:
            total = tokens.numel()
            starts = torch.arange(0, total, self.seq_len)
            lengths = (total - starts).clamp(max=self.seq_len)
            # (pieces,) whether a piece holds a target: the targets padded to whole pieces
            any_target = torch.nn.functional.pad(targets, (0, len(starts) * self.seq_len - total))
            keep = any_target.view(-1, self.seq_len).any(1) if len(starts) else torch.zeros(0, dtype=torch.bool)
            starts, lengths, source, pieces = starts[keep], lengths[keep], None, len(keep)
        else:
            lengths = torch.frombuffer(self.lengths, dtype=torch.int64) if self.lengths else torch.zeros(0, dtype=torch.long)
            starts = torch.cumsum(lengths, 0) - lengths
            source, pieces = torch.frombuffer(self.source, dtype=torch.int64) if self.source else None, self.added
        if self.cut:
            log.warning("cut %d of %d rows to seq_len=%d tokens: their ends are not trained on (--pack keeps every "
                        "token; or raise --seq-len)", self.cut, self.added, self.seq_len)
        if len(lengths) < pieces:
            log.warning("dropped %d of %d rows with no target token (seq_len=%d)", pieces - len(lengths), pieces,
                        self.seq_len)
        if not len(lengths):
            raise MTPError("no training tokens: no examples, or every answer is empty or cut off by seq_len")
        return TokenizedData(tokens, targets, starts, lengths, self.seq_len, self.pad_id, source_rows=source)


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_examples(source: str | Path, *args, **kwargs) -> list[Example]:
    """The examples of `open_examples` (same arguments) as a list."""
    return list(open_examples(source, *args, **kwargs))


def open_examples(
    source: str | Path,
    format: Format = "auto",
    question_field: str | None = None,
    answer_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
) -> Sequence[Example] | Examples:
    """Examples from a file (JSONL, JSON array, plain text), the shipped GSM8K ("gsm8k"), a Hugging Face dataset
    name, or a dataset's folder (`datasets.save_to_disk`, or data files `datasets.load_dataset` reads).

    A JSONL file and a dataset come as `Examples`, read record by record each time they are iterated; the other
    sources are small enough to be lists. `format="auto"` looks at the contents (JSON or not; the keys of the
    first record); a file named .json or .jsonl is always read as JSON, so a line that is not JSON is an error
    naming it. `question_field`/`answer_field` choose the columns of JSON records and datasets. `split` applies
    to the shipped GSM8K and to datasets only. Malformed records raise MTPError naming the file and line (a JSONL
    file is checked through once here; a dataset row as it is read).
    """
    if format not in ("auto", "gsm8k", "metamathqa", "text", "jsonl"):
        raise MTPError(f"unknown data format {format!r}")
    if limit is not None and limit < 0:
        raise MTPError(f"limit must be >= 0, got {limit}")
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_hf_dataset(str(path), format, question_field, answer_field, split, limit, folder=True)
    if path.is_file():
        return _load_file(path, format, question_field, answer_field, limit)
    if str(source) == "gsm8k" and format in ("auto", "gsm8k"):
        return _load_shipped_gsm8k(split, limit)
    if path.suffix.lower() in _FILE_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise MTPError(f"{path}: file not found")
    return _load_hf_dataset(str(source), format, question_field, answer_field, split, limit)


class Examples:
    """Examples read one record at a time from a JSONL file or a dataset each time they are iterated; `len`
    without reading them. `records()` yields (where, record) pairs; `fields` picks the prompt and answer."""

    def __init__(self, records, count: int, fields: tuple[str | None, str]):
        self._records, self._count, self.fields = records, count, fields

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Example]:
        for where, record in self._records():
            yield _to_example(record, self.fields, where)


def _load_shipped_gsm8k(split: str, limit: int | None) -> list[Example]:
    from mtp.evaluation.gsm8k import load_gsm8k  # evaluation owns the shipped copy and its checks

    if split not in ("train", "test"):
        raise MTPError(f"GSM8K has splits 'train' and 'test', not {split!r}")
    return [Example(item["question"], item["answer"]) for item in load_gsm8k(split, limit=limit)]


def _load_file(
    path: Path, format: Format, question_field: str | None, answer_field: str | None, limit: int | None
) -> Sequence[Example] | Examples:
    if format == "auto" and path.suffix.lower() in _TABLE_SUFFIXES:  # (a CSV read as text trained on its commas)
        raise MTPError(f"{path}: a {path.suffix[1:]} table is not read as question/answer records; convert it to "
                       "JSONL (one JSON object a line), give a folder holding it (read by the datasets package), "
                       "or --data-format text to train on it as plain text")
    head = _first_character(path)
    if format == "text" or (format == "auto" and head not in ("[", "{") and not is_json_name(path)):
        return _text_documents(read_text(path))
    if head == "[":  # a JSON array is parsed whole
        records = read_json_records(path, limit=limit)
        if not records:
            return []
        fields = _pick_fields(format, question_field, answer_field, records[0][1], where=f"{path}:{records[0][0]}")
        return [_to_example(record, fields, f"{path}:{lineno}") for lineno, record in records]
    return _jsonl_examples(path, format, question_field, answer_field, limit)


def _first_character(path: Path) -> str:
    """The file's first character that is not white space (or a byte-order mark), "" for an empty file."""
    try:
        with path.open("rb") as f:
            while chunk := f.read(4096):
                text = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
                if text:
                    return text[:1].decode("latin-1")
    except OSError as e:
        raise MTPError(f"{path}: cannot read ({e.strerror or e})") from None
    return ""


def _jsonl_lines(path: Path, limit: int | None) -> Iterator[tuple[str, Any]]:
    """(path:line, record) of every non-blank line, read as the file is iterated (the text never whole)."""
    count = 0
    try:
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if limit is not None and count >= limit:
                    return
                if line.strip():
                    count += 1
                    yield f"{path}:{lineno}", parse_json_line(path, lineno, line)
    except UnicodeDecodeError:
        read_text(path)  # raises the MTPError that names the line
        raise
    except OSError as e:
        raise MTPError(f"{path}: cannot read ({e.strerror or e})") from None


def _jsonl_examples(path: Path, format: Format, question_field: str | None, answer_field: str | None,
                    limit: int | None) -> Examples | list[Example]:
    """A JSONL file's examples, checked and counted in one pass now, then read again whenever they are used."""
    fields, count = None, 0
    for where, record in _jsonl_lines(path, limit):
        if fields is None:
            fields = _pick_fields(format, question_field, answer_field, record, where=where)
        _to_example(record, fields, where)
        count += 1
    if fields is None:
        return []
    return Examples(lambda: _jsonl_lines(path, limit), count, fields)


def _text_documents(text: str) -> list[Example]:
    # One document per blank-line-separated block; each is all answer so the whole text is trained on.
    docs = (block.strip() for block in re.split(r"\n[ \t]*\n", text))
    return [Example("", doc) for doc in docs if doc]


def _pick_fields(
    format: Format, question_field: str | None, answer_field: str | None, first: Any, where: str
) -> tuple[str | None, str]:
    """(prompt column or None for text-only records, answer column), from the format or the first record."""
    if not isinstance(first, dict):
        raise MTPError(f"{where}: expected a JSON object, got {type(first).__name__}")
    if format in ("gsm8k", "metamathqa"):
        prompt, answer = _KNOWN_FIELDS[format]
        return question_field or prompt, answer_field or answer
    if question_field or answer_field:
        if not answer_field:
            raise MTPError("--question-field needs --answer-field too (question_field, answer_field in Python)")
        return question_field, answer_field
    for prompt, answer in _KNOWN_FIELDS.values():
        if prompt in first and answer in first:
            return prompt, answer
    if "text" in first:
        return None, "text"
    if "messages" in first:
        return MESSAGES_FIELDS
    raise MTPError(
        f"{where}: cannot tell the record layout from its keys {sorted(first)}; "
        "give --question-field and --answer-field (question_field, answer_field in Python)"
    )


def _to_example(record: Any, fields: tuple[str | None, str], where: str) -> Example:
    if not isinstance(record, dict):
        raise MTPError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fields == MESSAGES_FIELDS:
        return _conversation(record.get("messages"), where)
    values = []
    for key in fields:
        if key is None:
            values.append("")
        elif key not in record:
            raise MTPError(f"{where}: missing key {key!r}")
        elif not isinstance(record[key], str):
            raise MTPError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        else:
            values.append(record[key])
    return Example(values[0], values[1])


def _conversation(messages: Any, where: str) -> Example:
    """A "messages" record as an Example: it must end with a user turn and the assistant's answer to it."""
    check_messages(messages, where)
    roles = [m["role"] for m in messages]
    if len(messages) < 2 or roles[-2:] != ["user", "assistant"]:
        raise MTPError(f"{where}: a conversation must end with a user message and the assistant's answer (its "
                       f"roles: {', '.join(roles) or 'none'})")
    context = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-2])
    return Example(messages[-2]["content"], messages[-1]["content"], context)


def _load_hf_dataset(
    name: str,
    format: Format,
    question_field: str | None,
    answer_field: str | None,
    split: str,
    limit: int | None,
    folder: bool = False,
) -> Examples | list[Example]:
    """A dataset by name (downloaded, or from the Hugging Face cache offline) or from a local folder, read lazily:
    its rows stay in the dataset's memory-mapped Arrow files until each is used."""
    try:
        import datasets  # optional (`pip install datasets`): only needed for data given this way
    except ImportError:
        what = (f"{name}: is a directory; reading a dataset's folder" if folder else
                f"{name!r} is not a file, and loading it as a Hugging Face dataset")
        raise MTPError(f"{what} needs the `datasets` package (pip install datasets)") from None
    if format == "text":
        raise MTPError(f"{name!r}: format 'text' needs a file, not a dataset")
    try:
        if folder and any((Path(name) / f).is_file() for f in _SAVED_DATASET_FILES):
            dataset = datasets.load_from_disk(name)
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise MTPError(f"{name}: no split {split!r} (it has {', '.join(dataset)})")
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, split=split)
    except MTPError:
        raise
    except Exception as e:  # network, offline mode, unknown name or split: all end the same way for a user
        offline = " (HF_DATASETS_OFFLINE is set)" if os.environ.get("HF_DATASETS_OFFLINE") == "1" else ""
        raise MTPError(f"cannot load dataset {name!r} split {split!r}{offline}: {e}") from None
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        return []
    fields = _pick_fields(format, question_field, answer_field, dataset[0], where=f"{name}[0]")

    def records() -> Iterator[tuple[str, Any]]:
        for i, row in zip(range(count), dataset, strict=False):
            yield f"{name}[{i}]", row

    return Examples(records, count, fields)


def held_out(n: int, fraction: float = 0.05, seed: int = 0, max_items: int | None = None) -> set[int]:
    """Which of n examples (positions) a deterministic split holds out. At least one if any."""
    if not 0.0 <= fraction < 1.0:
        raise MTPError(f"holdout fraction must be in [0, 1), got {fraction}")
    n_held = int(n * fraction)
    if fraction > 0 and n_held == 0 and n >= 2:
        n_held = 1
    if max_items is not None:
        n_held = min(n_held, max_items)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return set(order[:n_held].tolist())


def split_holdout(
    examples: Sequence, fraction: float = 0.05, seed: int = 0, max_items: int | None = None
) -> tuple[list, list]:
    """A deterministic (train, held-out) split (`held_out`); both keep the input order."""
    held = held_out(len(examples), fraction, seed, max_items)
    return [ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held]


# ----------------------------------------------------------------------------------------------------------
# Tokenization


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _start_tokens(tokenizer: Any) -> list[int]:
    # What the tokenizer puts before any text on its own (a BOS for Llama, nothing for GPT-2), minus any EOS
    # its post-processor would append, since we place the EOS ourselves.
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    return [i for i in ids if i != tokenizer.eos_token_id]


def _example_tokens(tokenizer: Any, ex: Example, template: str, eos_id: int,
                    start: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(prompt token ids, answer token ids) of one example; `start`: `_start_tokens(tokenizer)`, where a caller
    tokenizing many examples computed it once (a tokenizer call each, a third of the plain template's calls)."""
    if template == "chat" and ex.prompt:
        user = [*ex.context, {"role": "user", "content": ex.prompt}]
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": ex.answer}], tokenize=False
        )
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        # The prompt is tokenized on its own, as at generation time; the answer is the rest of the text
        # (with the template's end-of-turn tokens, so the model learns to stop). Templates that rewrite
        # earlier turns when an answer follows (rare) are split at the common prefix instead.
        cut = len(prompt) if full.startswith(prompt) else len(os.path.commonprefix([full, prompt]))
        prompt_ids = _encode(tokenizer, full[:cut])
        return prompt_ids, _answer_ids(tokenizer, full[:cut], prompt_ids, full[cut:])
    # "plain", and plain-text documents (no prompt) even under "chat": prompt, blank line, answer, EOS.
    prompt = "\n\n".join([m["content"] for m in ex.context] + [ex.prompt]) + "\n\n" if ex.prompt else ""
    asked = _encode(tokenizer, prompt)
    start = _start_tokens(tokenizer) if start is None else start
    return start + asked, _answer_ids(tokenizer, prompt, asked, ex.answer) + [eos_id]


def _answer_ids(tokenizer: Any, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
    """The answer's token ids as the tokenizer splits the whole text (prompt and answer), where that begins with
    the prompt's own tokens: the tokens a model writes after the prompt. The answer tokenized alone can differ
    at its start: a SentencePiece tokenizer (Llama 2, Mistral) puts a word-start "▁" (a space) before the
    text's first word, which after the prompt's "\n" has none, so the model would learn to begin its answers
    with a space. Where the prompt's tokens merge with the answer's (the boundary is inside a token), the
    answer alone."""
    if prompt and answer:
        whole = _encode(tokenizer, prompt + answer)
        if whole[:len(prompt_ids)] == prompt_ids:
            return whole[len(prompt_ids):]
    return _encode(tokenizer, answer)


def check_tokenizer(tokenizer: Any, template: str) -> int:
    """The tokenizer's eos id, once it is known to lay out `template`; an MTPError otherwise."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MTPError("the tokenizer has no eos token")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise MTPError("the tokenizer has no chat template; use the plain template (--template plain)")
    return eos


def tokenize_examples(examples: Iterable[Example], tokenizer: Any, *args, **kwargs) -> TokenizedData:
    """Token rows of the examples (`tokenize_split`'s further arguments), none held out."""
    return tokenize_split(examples, (), tokenizer, *args, **kwargs)[0]


def tokenize_split(
    examples: Iterable[Example],
    held: Collection[int],
    tokenizer: Any,
    template: Literal["chat", "plain"] = "chat",
    seq_len: int = 512,
    loss_on: Literal["answer", "all"] = "answer",
    pack: bool = False,
) -> tuple[TokenizedData, TokenizedData | None]:
    """Token rows of at most `seq_len` with a mask of target tokens (the answer's, or all with loss_on="all"):
    of the examples not at the positions `held`, and of those at them (None when there are none), in one pass.

    Unpacked: one row per example, truncated at the end. Packed: all examples concatenated and cut into rows of
    `seq_len` (the last one shorter). Rows with no target at all are dropped. The mask says which tokens are
    targets; shifting targets to the positions that predict them is the loss's job.
    """
    if template not in ("chat", "plain") or loss_on not in ("answer", "all"):
        raise MTPError(f"bad template {template!r} or loss_on {loss_on!r}")
    if seq_len < 2:
        raise MTPError(f"seq_len must be at least 2, got {seq_len}")
    eos_id = check_tokenizer(tokenizer, template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    groups = [Rows(seq_len, pad_id, pack), Rows(seq_len, pad_id, pack)]
    start = _start_tokens(tokenizer)
    for i, ex in enumerate(examples):
        prompt_ids, answer_ids = _example_tokens(tokenizer, ex, template, eos_id, start)
        mask = [loss_on == "all"] * len(prompt_ids) + [True] * len(answer_ids)
        groups[i in held].add(prompt_ids + answer_ids, mask)
    return groups[0].finish(), groups[1].finish() if groups[1].added else None


def rows_to_data(rows: Iterable[tuple[Sequence[int], Sequence[bool]]], seq_len: int, pad_id: int,
                 pack: bool = False) -> TokenizedData:
    """(token ids, target mask) rows -> `TokenizedData`, packed or truncated; rows without a target are dropped
    (they would make a batch's mean loss 0/0; unpacked, `source_rows` says which were kept)."""
    out = Rows(seq_len, pad_id, pack)
    for ids, mask in rows:
        out.add(list(ids), [bool(m) for m in mask])
    return out.finish()


# ----------------------------------------------------------------------------------------------------------
# Batching


def batches_per_epoch(data: TokenizedData | int, batch_size: int) -> int:
    """Batches in one pass over the data (or over that many rows); the last one may be smaller."""
    if batch_size < 1:
        raise MTPError(f"batch_size must be >= 1, got {batch_size}")
    return -(-(data if isinstance(data, int) else len(data)) // batch_size)


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # One generator seed per (seed, epoch): same pair, same order; a new epoch reshuffles.
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=generator)


def batches(data: TokenizedData, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """Row-index tensors of one epoch's batches, in a shuffled order fixed by (seed, epoch)."""
    order = _epoch_order(len(data), seed, epoch)
    for b in range(batches_per_epoch(data, batch_size)):
        yield order[b * batch_size : (b + 1) * batch_size]


def batch_rows(num_rows: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Row indices of global step `step` (0-based) over `num_rows` rows: the batch `batches` yields there, so
    resume can jump to it."""
    if step < 0:
        raise MTPError(f"step must be >= 0, got {step}")
    epoch, b = divmod(step, batches_per_epoch(num_rows, batch_size))
    return _epoch_order(num_rows, seed, epoch)[b * batch_size : (b + 1) * batch_size]


def batch_at(data: TokenizedData, batch_size: int, seed: int, step: int) -> dict[str, torch.Tensor]:
    """The batch of global step `step` (`batch_rows`), padded to its longest row."""
    return data.batch(batch_rows(len(data), batch_size, seed, step))
