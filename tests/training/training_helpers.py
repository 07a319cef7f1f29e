"""Tiny random models and an offline tokenizer for the training tests (each test runs in seconds).

A module of its own (not conftest.py) so that `from conftest import ...` elsewhere in the suite stays unambiguous.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mtp.models.parallel_heads import MTPModel

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["How many apples does Tom have? Tom has 3 + 4 = 7 apples. The answer is 7.",
              "user assistant 1 2 3 4 5 6 7 8 9 0 plus minus times equals"] * 20
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_llama(vocab_size: int = 97, num_heads: int = 3, seed: int = 0, num_layers: int = 3,
               tokenizer=None) -> MTPModel:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=256,
                         tie_word_embeddings=False)
    if tokenizer is not None:
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model = MTPModel(LlamaForCausalLM(config).eval(), num_heads=num_heads)
    model.tokenizer = tokenizer
    return model


def tiny_gpt2(vocab_size: int = 97, num_heads: int = 3, seed: int = 0) -> MTPModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=vocab_size, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return MTPModel(GPT2LMHeadModel(config).eval(), num_heads=num_heads)


def random_batch(vocab_size: int = 97, batch: int = 3, length: int = 12, seed: int = 1) -> dict:
    """Right-padded rows of different lengths; the loss covers the second half of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=g)
    lengths = torch.tensor([length - 3 * i for i in range(batch)]).clamp_min(4)
    pos = torch.arange(length)[None, :]
    attention = (pos < lengths[:, None]).long()
    loss_mask = (pos >= (lengths[:, None] // 2)) & attention.bool()
    return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": attention}


def folder_tensors(folder) -> dict[str, torch.Tensor]:
    """A model folder's tensors, from model.safetensors or its shards (a frozen part kept apart)."""
    from mtp.models.safetensors_io import FolderWeights

    with FolderWeights(folder) as weights:
        return {name: weights.read(name) for name in weights.tensors}
