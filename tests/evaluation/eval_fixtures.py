"""Fixtures of the evaluation tests (loaded with `pytest_plugins = ["eval_fixtures"]`)."""

from __future__ import annotations

import json

import pytest
from eval_helpers import QUESTIONS, make_model, train_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny MTP model (3 heads) with the tiny tokenizer: loads like any model folder."""
    folder = tmp_path_factory.mktemp("models") / "tiny-mtp"
    make_model(tiny_tokenizer).save_pretrained(folder, tokenizer=tiny_tokenizer)
    return folder


@pytest.fixture
def gsm8k_file(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS),
                    encoding="utf-8")
    return path
