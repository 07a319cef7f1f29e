"""`load_mtp_model` of a plain Hugging Face folder that has a mask token (as checkpoints trained with the
self-distillation authors' code ship one): named by id or by token, it loads as a mask-token model that decodes
with that token; a model with heads of its own is refused."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_base, tiny_mtp, tiny_tokenizer
from mtp import MaskTokenModel
from mtp.decoding.generate import generate
from mtp.decoding.reference import reference_greedy
from mtp.errors import MTPError
from mtp.models.loading import load_mtp_model


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain") / "hf"
    tok = tiny_tokenizer()
    tiny_base("llama", vocab_size=len(tok), seed=3).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok


@pytest.mark.parametrize("by", ["id", "token"])
def test_a_plain_model_with_a_mask_token_loads_as_a_mask_token_model(plain_folder, by):
    folder, tok = plain_folder
    mask = tok.convert_tokens_to_ids("<|im_end|>")  # a token the model has (here, one it never writes)
    kw = {"mask_token_id": mask} if by == "id" else {"mask_token": "<|im_end|>"}
    model = load_mtp_model(str(folder), **kw)
    assert isinstance(model, MaskTokenModel) and model.mask_token_id == mask
    assert model.source.kind == "hf_folder" and model.tokenizer is not None
    prompt = tok("Janet has 3 eggs")["input_ids"]
    ids = torch.tensor([prompt])
    speculative = generate(model, ids, max_new_tokens=8, strategy="speculative", k=3, stop_token_ids=[])
    assert speculative.tokens == [reference_greedy(model, prompt, 8)]  # decoding reads the mask token: lossless
    confident = generate(model, ids, max_new_tokens=8, strategy="confadapt", k=3, tau=0.0, stop_token_ids=[])
    assert confident.stats.tokens_per_forward > 1  # tau 0: every mask's guess is emitted


def test_a_mask_token_for_a_model_with_heads_or_one_it_lacks_is_refused(plain_folder, tmp_path):
    folder, tok = plain_folder
    with pytest.raises(MTPError, match="has no token '<nope>'"):
        load_mtp_model(str(folder), mask_token="<nope>")
    heads = tiny_mtp("llama", num_heads=2, vocab_size=len(tok))
    heads.save_pretrained(tmp_path / "heads")
    tok.save_pretrained(tmp_path / "heads")
    with pytest.raises(MTPError, match="a mask token applies to a plain model"):
        load_mtp_model(str(tmp_path / "heads"), mask_token_id=5)


def test_decoding_commands_say_when_a_strategy_drafts_with_new_heads(plain_folder, tiny_mtp_folder, capsys):
    """A plain model's extra heads are new: speculative decoding of it says it keeps greedy's speed, the lossy
    strategies that their answers are guesses; greedy, a trained folder and a mask token say nothing."""
    from test_cli import run_cli

    folder, _ = plain_folder
    generate_args = ["generate", "--prompt", "hi", "--max-new-tokens", "2"]
    _, _, err = run_cli([*generate_args, "--model", str(folder), "--strategy", "speculative"], capsys)
    assert "note: the model's 3 extra heads are new, not trained: speculative decoding gives greedy's answers " \
           "at about greedy's speed" in err
    _, _, err = run_cli([*generate_args, "--model", str(folder), "--strategy", "static"], capsys)
    assert "static decoding gives the untrained heads' guesses" in err
    quiet = [[*generate_args, "--model", str(folder)], [*generate_args, "--model", str(tiny_mtp_folder),
                                                        "--strategy", "speculative"],
             [*generate_args, "--model", str(folder), "--strategy", "speculative", "--mask-token", "<|im_end|>"]]
    for args in quiet:
        code, _, err = run_cli(args, capsys)
        assert code == 0 and "note:" not in err, err
