"""Training data: load examples from files or a dataset name, tokenize them with loss masks, batch them.

Batching is a pure function of (seed, epoch or global step), so a resumed run sees the same batches in the same
order as a run that never stopped.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mtp.errors import MTPError
from mtp.io import is_json_name, read_json_records, read_text

log = logging.getLogger(__name__)

Format = Literal["auto", "gsm8k", "metamathqa", "text", "jsonl"]

# (prompt column, answer column) of the record layouts we recognise, tried in order by "auto" and "jsonl".
_KNOWN_FIELDS: dict[str, tuple[str, str]] = {
    "gsm8k": ("question", "answer"),
    "metamathqa": ("query", "response"),
    "prompt/completion": ("prompt", "completion"),
    "instruction/output": ("instruction", "output"),
}
# Sources with these endings are meant as files, so a missing one is an error rather than a dataset name.
_FILE_SUFFIXES = {".json", ".jsonl", ".txt", ".text", ".md"}


@dataclass
class Example:
    """One training example. Plain text documents have prompt "" and the document as the answer."""

    prompt: str
    answer: str


@dataclass
class TokenizedData:
    """Equal-length rows. `loss_mask` marks the positions whose token is a prediction target."""

    input_ids: torch.Tensor  # (N, seq_len) long
    loss_mask: torch.Tensor  # (N, seq_len) bool; never True on padding
    attention_mask: torch.Tensor  # (N, seq_len) long; 0 on padding
    # (N, L, H) frozen-trunk outputs of each row when they came with the data (self-distilled answers keep what
    # the trunk computed while writing them); L covers the longest row, positions past a row's end are 0.
    trunk_features: torch.Tensor | None = None
    # Unpacked rows: which input row each row came from (rows without a target are dropped); None when packed.
    source_rows: list[int] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_examples(
    source: str | Path,
    format: Format = "auto",
    question_field: str | None = None,
    answer_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
) -> list[Example]:
    """Examples from a file (JSONL, JSON array, plain text), the shipped GSM8K ("gsm8k"), or a HF dataset name.

    `format="auto"` looks at the contents (JSON or not; the keys of the first record); a file named .json or
    .jsonl is always read as JSON, so a line that is not JSON is an error naming it.
    `question_field`/`answer_field` choose the columns of JSON records and datasets. `split` applies to the
    shipped GSM8K and to datasets only. Malformed records raise MTPError naming the file and line.
    """
    if format not in ("auto", "gsm8k", "metamathqa", "text", "jsonl"):
        raise MTPError(f"unknown data format {format!r}")
    if limit is not None and limit < 0:
        raise MTPError(f"limit must be >= 0, got {limit}")
    path = Path(source).expanduser()
    if path.is_dir():
        raise MTPError(f"{path}: is a directory; give a .jsonl, .json or .txt file")
    if path.is_file():
        examples = _load_file(path, format, question_field, answer_field, limit)
    elif str(source) == "gsm8k" and format in ("auto", "gsm8k"):
        examples = _load_shipped_gsm8k(split, limit)
    elif path.suffix.lower() in _FILE_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise MTPError(f"{path}: file not found")
    else:
        examples = _load_hf_dataset(str(source), format, question_field, answer_field, split, limit)
    return examples[:limit] if limit is not None else examples


def _load_shipped_gsm8k(split: str, limit: int | None) -> list[Example]:
    from mtp.evaluation.gsm8k import load_gsm8k  # evaluation owns the shipped copy and its checks

    if split not in ("train", "test"):
        raise MTPError(f"GSM8K has splits 'train' and 'test', not {split!r}")
    return [Example(item["question"], item["answer"]) for item in load_gsm8k(split, limit=limit)]


def _load_file(
    path: Path, format: Format, question_field: str | None, answer_field: str | None, limit: int | None
) -> list[Example]:
    text = read_text(path)
    head = text.lstrip()[:1]
    if format == "text" or (format == "auto" and head not in ("[", "{") and not is_json_name(path)):
        return _text_documents(text)
    records = read_json_records(path, text, limit)
    if not records:
        return []
    fields = _pick_fields(
        format, question_field, answer_field, records[0][1], where=f"{path}:{records[0][0]}"
    )
    return [_to_example(record, fields, f"{path}:{lineno}") for lineno, record in records]


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
            raise MTPError("question_field needs answer_field too")
        return question_field, answer_field
    for prompt, answer in _KNOWN_FIELDS.values():
        if prompt in first and answer in first:
            return prompt, answer
    if "text" in first:
        return None, "text"
    raise MTPError(
        f"{where}: cannot tell the record layout from its keys {sorted(first)}; "
        "pass question_field and answer_field"
    )


def _to_example(record: Any, fields: tuple[str | None, str], where: str) -> Example:
    if not isinstance(record, dict):
        raise MTPError(f"{where}: expected a JSON object, got {type(record).__name__}")
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


def _load_hf_dataset(
    name: str,
    format: Format,
    question_field: str | None,
    answer_field: str | None,
    split: str,
    limit: int | None,
) -> list[Example]:
    try:
        import datasets  # optional: only needed for data given by name
    except ImportError:
        raise MTPError(
            f"{name!r} is not a file, and loading it as a Hugging Face dataset needs the `datasets` "
            "package (pip install datasets)"
        ) from None
    if format == "text":
        raise MTPError(f"{name!r}: format 'text' needs a file, not a dataset name")
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, offline mode, unknown name or split: all end the same way for a user
        offline = " (HF_DATASETS_OFFLINE is set)" if os.environ.get("HF_DATASETS_OFFLINE") == "1" else ""
        raise MTPError(f"cannot load dataset {name!r} split {split!r}{offline}: {e}") from None
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    rows = list(dataset)
    if not rows:
        return []
    fields = _pick_fields(format, question_field, answer_field, rows[0], where=f"{name}[0]")
    return [_to_example(row, fields, f"{name}[{i}]") for i, row in enumerate(rows)]


def split_holdout(
    examples: list[Example], fraction: float = 0.05, seed: int = 0, max_items: int | None = None
) -> tuple[list[Example], list[Example]]:
    """A deterministic (train, held-out) split; both keep the input order. At least one held item if any."""
    if not 0.0 <= fraction < 1.0:
        raise MTPError(f"holdout fraction must be in [0, 1), got {fraction}")
    n_held = int(len(examples) * fraction)
    if fraction > 0 and n_held == 0 and len(examples) >= 2:
        n_held = 1
    if max_items is not None:
        n_held = min(n_held, max_items)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    held_idx = set(order[:n_held].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in held_idx]
    held = [ex for i, ex in enumerate(examples) if i in held_idx]
    return train, held


# ----------------------------------------------------------------------------------------------------------
# Tokenization


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _start_tokens(tokenizer: Any) -> list[int]:
    # What the tokenizer puts before any text on its own (a BOS for Llama, nothing for GPT-2), minus any EOS
    # its post-processor would append, since we place the EOS ourselves.
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    return [i for i in ids if i != tokenizer.eos_token_id]


def _example_tokens(tokenizer: Any, ex: Example, template: str, eos_id: int) -> tuple[list[int], list[int]]:
    """(prompt token ids, answer token ids) of one example."""
    if template == "chat" and ex.prompt:
        user = [{"role": "user", "content": ex.prompt}]
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": ex.answer}], tokenize=False
        )
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        # The prompt is tokenized on its own, as at generation time; the answer is the rest of the text
        # (with the template's end-of-turn tokens, so the model learns to stop). Templates that rewrite
        # earlier turns when an answer follows (rare) are split at the common prefix instead.
        cut = len(prompt) if full.startswith(prompt) else len(os.path.commonprefix([full, prompt]))
        return _encode(tokenizer, full[:cut]), _encode(tokenizer, full[cut:])
    # "plain", and plain-text documents (no prompt) even under "chat": prompt, blank line, answer, EOS.
    prompt_ids = _start_tokens(tokenizer) + _encode(tokenizer, ex.prompt + "\n\n" if ex.prompt else "")
    return prompt_ids, _encode(tokenizer, ex.answer) + [eos_id]


def tokenize_examples(
    examples: list[Example],
    tokenizer: Any,
    template: Literal["chat", "plain"] = "chat",
    seq_len: int = 512,
    loss_on: Literal["answer", "all"] = "answer",
    pack: bool = False,
) -> TokenizedData:
    """Token rows of `seq_len` with a mask of target tokens (the answer's, or all with loss_on="all").

    Unpacked: one row per example, truncated at the end, right-padded. Packed: all examples concatenated and
    cut into rows; only the last row is padded. Rows with no target at all are dropped. The mask says which
    tokens are targets; shifting targets to the positions that predict them is the loss's job.
    """
    if template not in ("chat", "plain") or loss_on not in ("answer", "all"):
        raise MTPError(f"bad template {template!r} or loss_on {loss_on!r}")
    if seq_len < 2:
        raise MTPError(f"seq_len must be at least 2, got {seq_len}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise MTPError("the tokenizer has no eos token")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise MTPError("the tokenizer has no chat template; use template='plain'")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    rows: list[tuple[list[int], list[bool]]] = []
    for ex in examples:
        prompt_ids, answer_ids = _example_tokens(tokenizer, ex, template, eos_id)
        prompt_mask = [loss_on == "all"] * len(prompt_ids)
        rows.append((prompt_ids + answer_ids, prompt_mask + [True] * len(answer_ids)))

    return rows_to_data(rows, seq_len, pad_id, pack)


def rows_to_data(rows: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int,
                 pack: bool = False) -> TokenizedData:
    """(token ids, target mask) rows -> right-padded tensors of `seq_len`, packed or truncated; rows without a
    target are dropped (they would make a batch's mean loss 0/0; unpacked, `source_rows` says which were kept)."""
    rows = [(list(ids), [bool(m) for m in mask]) for ids, mask in rows]
    if pack:
        ids = [t for r in rows for t in r[0]]
        mask = [m for r in rows for m in r[1]]
        rows = [(ids[i : i + seq_len], mask[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
    else:
        cut = sum(len(ids) > seq_len for ids, _ in rows)
        if cut:
            log.warning("cut %d of %d rows to seq_len=%d tokens: their ends are not trained on (--pack keeps every "
                        "token; or raise --seq-len)", cut, len(rows), seq_len)
        rows = [(ids[:seq_len], mask[:seq_len]) for ids, mask in rows]
    keep = [i for i, r in enumerate(rows) if any(r[1])]
    kept = [rows[i] for i in keep]
    if len(kept) < len(rows):
        log.warning(
            "dropped %d of %d rows with no target token (seq_len=%d)",
            len(rows) - len(kept),
            len(rows),
            seq_len,
        )
    rows = kept
    if not rows:
        raise MTPError("no training tokens: no examples, or every answer is empty or cut off by seq_len")

    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n, seq_len), dtype=torch.bool)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        loss_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
        attention_mask[i, : len(ids)] = 1
    return TokenizedData(input_ids, loss_mask, attention_mask, source_rows=None if pack else keep)


# ----------------------------------------------------------------------------------------------------------
# Batching


def batches_per_epoch(data: TokenizedData, batch_size: int) -> int:
    """Batches in one pass over the data; the last one may be smaller."""
    if batch_size < 1:
        raise MTPError(f"batch_size must be >= 1, got {batch_size}")
    return -(-len(data) // batch_size)


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # One generator seed per (seed, epoch): same pair, same order; a new epoch reshuffles.
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=generator)


def batches(data: TokenizedData, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """Row-index tensors of one epoch's batches, in a shuffled order fixed by (seed, epoch)."""
    order = _epoch_order(len(data), seed, epoch)
    for b in range(batches_per_epoch(data, batch_size)):
        yield order[b * batch_size : (b + 1) * batch_size]


def batch_at(data: TokenizedData, batch_size: int, seed: int, step: int) -> dict[str, torch.Tensor]:
    """The batch of global step `step` (0-based), the same one `batches` yields, so resume can jump to it."""
    if step < 0:
        raise MTPError(f"step must be >= 0, got {step}")
    per_epoch = batches_per_epoch(data, batch_size)
    epoch, b = divmod(step, per_epoch)
    index = _epoch_order(len(data), seed, epoch)[b * batch_size : (b + 1) * batch_size]
    return {
        "input_ids": data.input_ids[index],
        "loss_mask": data.loss_mask[index],
        "attention_mask": data.attention_mask[index],
    }
