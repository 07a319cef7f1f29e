"""Shared by the evaluation tests: a tiny tokenizer (trained offline), tiny MTP models, GSM8K records.

The fixtures are in eval_fixtures.py (a test module lists it in `pytest_plugins`)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_mtp

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QUESTIONS = [
    ("Tom has 3 apples and buys 2 more. How many apples does he have?", "3 + 2 = 5\n#### 5"),
    ("A box holds 12 eggs. How many eggs are in 2 boxes?", "12 * 2 = 24\n#### 24"),
    ("Sara had $20 and spent $7. How much money is left?", "20 - 7 = 13\n#### 13"),
    ("There are 4 cats with 4 legs each. How many legs?", "4 * 4 = 16\n#### 16"),
    ("Bob reads 10 pages a day for 3 days. How many pages?", "10 * 3 = 30\n#### 30"),
]


def train_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [q + " " + a for q, a in QUESTIONS] * 5 + ["Q: A: The answer is 42. user assistant"] * 5
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_model(tokenizer, num_heads: int = 3, seed: int = 0):
    model = tiny_mtp("llama", num_heads=num_heads, seed=seed, vocab_size=len(tokenizer), context=4096)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.tokenizer = tokenizer
    return model
