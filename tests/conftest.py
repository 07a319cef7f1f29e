"""Tiny random models shared by the tests: seconds each, no downloads."""

from __future__ import annotations

import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from mtp import MTPModel


def tiny_config(family: str = "llama", vocab_size: int = 61, layers: int = 3, hidden: int = 32, context: int = 256,
                intermediate: int | None = None):
    if family == "llama":
        return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=intermediate or 2 * hidden, vocab_size=vocab_size, max_position_embeddings=context,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab_size, n_positions=context,
                          bos_token_id=None, eos_token_id=None)
    raise ValueError(family)


def tiny_base(family: str = "llama", seed: int = 0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **kwargs)).to(dtype).eval()


def tiny_mtp(family: str = "llama", num_heads: int = 3, seed: int = 0, dtype=torch.float32,
             num_trunk_layers: int | None = None, **kwargs) -> MTPModel:
    """A tiny MTP model whose extra heads are randomised (not copies of head 0), so they disagree with it."""
    model = MTPModel(tiny_base(family, seed, dtype, **kwargs), num_heads=num_heads,
                     num_trunk_layers=num_trunk_layers)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.extra_heads.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return model.eval()


def reading_next_token(model: MTPModel, seed: int = 0, scale: float = 0.5) -> MTPModel:
    """`model` with a random (not zero) next-token projection, so the heads' drafts depend on it."""
    model.add_next_token_input()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.next_token_in.weight
        w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * scale)
    return model


def assert_first_two_tokens_follow_the_model(model, prompt: list[int], tokens: list[list[int]]) -> None:
    """Many sampled continuations of `prompt` (at least two tokens each): the first token's frequencies are the
    model's next-token probabilities, and so are the second token's after the most likely first one."""
    from mtp.decoding.reference import reference_next_token_probs

    vocab, n = model.config.vocab_size, len(tokens)
    first = torch.tensor([t[0] for t in tokens])
    second = torch.tensor([t[1] for t in tokens])
    p1 = reference_next_token_probs(model, prompt)
    assert torch.allclose(torch.bincount(first, minlength=vocab).float() / n, p1, atol=0.03)
    top = int(p1.argmax())
    p2 = reference_next_token_probs(model, prompt + [top])
    picked = second[first == top]
    assert torch.allclose(torch.bincount(picked, minlength=vocab).float() / len(picked), p2, atol=0.05)


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `-n auto`) each worker process gets its share of the cores: torch's
    default of one thread a core in every worker would oversubscribe them, which makes torch several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        share = max(1, cores // workers)
        torch.set_num_threads(share)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))  # (the processes tests start: commands, torchrun)


def pytest_collection_modifyitems(config, items):
    """`cuda` tests run where torch sees a GPU and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (run `pytest -m cuda` on a machine with a GPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    """The tests not marked `cuda` are CPU tests: on a GPU machine --device auto must still mean the CPU there."""
    if torch.cuda.is_available() and request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def _no_machine_load(request, monkeypatch):
    """Commands note when other processes took their cores (`mtp.runtime.CoreWait`): a test's output must not
    depend on what else the machine runs, so only tests marked `machine_load` read the kernel's figures."""
    if request.node.get_closest_marker("machine_load") is None:
        import mtp.runtime

        monkeypatch.setattr(mtp.runtime, "_thread_times", lambda: None)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands take --threads and set torch's thread count for the process; a test must not leak it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama_mtp():
    return tiny_mtp("llama")


@pytest.fixture
def gpt2_mtp():
    return tiny_mtp("gpt2")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in memory (no downloads), with a ChatML-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>",
                                                                         "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 7 + 5? The answer is 12.", "Janet has 3 eggs and 4 ducks."] * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_sentencepiece_tokenizer(vocab_size: int = 300):
    """A SentencePiece-style tokenizer (Llama 2's, Mistral's) trained in memory: words start with "▁", the text's
    first word gets one too (a "dummy prefix"), which decoding drops again; bytes outside the vocabulary are
    "<0x..>" tokens; a BOS before every text. The same ChatML-style chat template as `tiny_tokenizer`'s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(["What is 7 + 5? The answer is 12.", "Janet has 3 eggs and 4 ducks."] * 20, trainer)
    tok = _ordinary_byte_tokens(tok)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _ordinary_byte_tokens(tok):
    """`tok` with its "<0x..>" tokens as plain vocabulary, as Llama's and Mistral's tokenizer.json hold them: the
    trainer adds them as special tokens, which decode(skip_special_tokens=True), as answers are decoded, drops
    (an emoji's bytes vanished instead of reading as the emoji)."""
    import json

    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not re.fullmatch(r"<0x[0-9A-F]{2}>", t["content"])]
    return Tokenizer.from_str(json.dumps(spec))


@pytest.fixture
def tiny_mtp_folder(tmp_path):
    """A saved tiny MTP model with a tokenizer: what every command can load."""
    tok = tiny_tokenizer()
    model = tiny_mtp("llama", num_heads=3, vocab_size=len(tok))
    model.tokenizer = tok
    return model.save_pretrained(tmp_path / "tiny-mtp")
