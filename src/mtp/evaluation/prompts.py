"""Prompts as token ids, stop conditions and left-padded batches: shared by `mtp eval`, `mtp bench` and the
lm-eval adapter, so every method in a comparison sees exactly the same tokens and stops at the same places."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtp.decoding.generate import left_pad  # noqa: F401  (re-exported for evaluation modules)
from mtp.decoding.row_options import RECORD_SETTINGS
from mtp.errors import MTPError
from mtp.evaluation.gsm8k import STOP_SEQUENCES, build_chat_messages, build_prompt, load_gsm8k
from mtp.io import input_file, is_json_name, read_json_records, read_text, text_lines


@dataclass
class Prompt:
    """One prompt of an evaluation or benchmark. `reference` is set for GSM8K problems (scored), else None."""

    id: int
    text: str  # the question (GSM8K) or the prompt text as given
    token_ids: list[int] = field(default_factory=list)
    reference: str | None = None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat(tokenizer, chat: bool | None) -> bool:
    """`--chat` as given, or (None) the chat template when the tokenizer has one."""
    if chat is None:
        return has_chat_template(tokenizer)
    if chat and not has_chat_template(tokenizer):
        raise MTPError("--chat: the model's tokenizer has no chat template (no chat_template.jinja, nor one in "
                       "tokenizer_config.json); use --no-chat")
    return chat


def _ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a plain list.
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if isinstance(encoded, torch.Tensor):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(t) for t in encoded]


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def encode_plain(tokenizer, text: str) -> list[int]:
    # The tokenizer's own special tokens (a BOS for Llama 2 style tokenizers, nothing for SmolLM2).
    return _ids(tokenizer(text))


def encode_gsm8k_question(tokenizer, question: str, shots: int = 8, chat: bool = True) -> list[int]:
    """The gsm8k_cot prompt of `question` as token ids: chat turns (as lm-eval's --apply_chat_template
    --fewshot_as_multiturn) or the plain "Q: .. A: .." text."""
    if chat:
        return encode_chat(tokenizer, build_chat_messages(question, shots))
    return encode_plain(tokenizer, build_prompt(question, shots))


def gsm8k_prompts(tokenizer, *, path: str | Path | None = None, split: str = "test", limit: int | None = None,
                  shots: int = 8, chat: bool = True) -> list[Prompt]:
    """The first `limit` GSM8K problems (file order) as encoded prompts with their reference answers."""
    if limit is not None and limit < 1:
        raise MTPError(f"--limit must be >= 1, got {limit}")
    items = load_gsm8k(split, path=Path(path) if path is not None else None, limit=limit)  # type: ignore[arg-type]
    if not items:
        raise MTPError(f"{path or 'GSM8K ' + split}: no problems")
    return [Prompt(it["id"], it["question"], encode_gsm8k_question(tokenizer, it["question"], shots, chat),
                   it["reference"]) for it in items]


def file_prompts(tokenizer, path: str | Path, *, limit: int | None = None, shots: int = 8,
                 chat: bool = True) -> list[Prompt]:
    """Prompts from a file. A .jsonl whose records have "question" and "answer" is GSM8K (scored); records with
    "prompt" or "text" are free prompts; any other file holds one prompt per non-empty line."""
    texts = file_prompt_texts(path, limit=limit)
    if texts is None:
        return gsm8k_prompts(tokenizer, path=path, limit=limit, shots=shots, chat=chat)
    out = []
    for i, text in enumerate(texts):
        ids = encode_chat(tokenizer, [{"role": "user", "content": text}]) if chat else encode_plain(tokenizer, text)
        out.append(Prompt(i, text, ids, None))
    return out


def file_prompt_texts(path: str | Path, *, limit: int | None = None, settings: bool = True) -> list[str] | None:
    """The prompts of a file as `file_prompts` reads them, checked, without a tokenizer (what a command checks
    before it loads a model); None for a GSM8K file, whose problems are checked here too (`load_gsm8k`).
    `settings` False: a record that sets a decoding setting of its own (`mtp generate --prompts`' fields) is an
    error (every method decodes every prompt alike)."""
    path = input_file(path, "prompts")
    if limit is not None and limit < 1:
        raise MTPError(f"--limit must be >= 1, got {limit}")
    text = read_text(path)
    if is_json_name(path):
        records = read_json_records(path, text)
        if not records:
            raise MTPError(f"{path}: no prompts")
        first = records[0][1]
        if isinstance(first, dict) and "question" in first and "answer" in first:
            if not load_gsm8k(path=path, limit=limit):
                raise MTPError(f"{path}: no problems")
            return None
        texts = []
        for lineno, record in records:
            text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise MTPError(f"{path}:{lineno}: expected a JSON object with a non-empty \"prompt\" or \"text\"")
            if not settings and (own := [k for k in RECORD_SETTINGS if k in record]):
                raise MTPError(f"{path}:{lineno}: a record's own {own[0]!r} is for `mtp generate --prompts`; a bench "
                               "decodes every prompt with the same settings (its flags)")
            texts.append(text)
    else:
        texts = [line for line in text_lines(text) if line.strip()]
        if not texts:
            raise MTPError(f"{path}: no prompts")
    return texts[:limit] if limit is not None else texts


def stop_token_ids(model, tokenizer) -> list[int]:
    """The model's end tokens, plus any stop sequence that is a single token of the vocabulary ("<|im_end|>")."""
    from mtp.decoding.generate import default_stop_token_ids

    ids = set(default_stop_token_ids(model, tokenizer))
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    for s in STOP_SEQUENCES:
        if s in vocab:
            ids.add(int(vocab[s]))
    return sorted(ids)


def pad_id(tokenizer) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def truncate_output(text: str) -> str:
    """The scored part of a generation: everything before the first stop sequence (as lm-eval's `until`)."""
    from mtp.evaluation.gsm8k import truncate_at_stop

    return truncate_at_stop(text, STOP_SEQUENCES)
