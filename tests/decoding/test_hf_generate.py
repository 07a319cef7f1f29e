"""`MTPModel.generate` follows transformers: prompt + new tokens as a LongTensor, `**tokenizer(...)`, config."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from conftest import tiny_mtp, tiny_tokenizer
from mtp import MTPModel
from mtp.decoding.generate import generate
from mtp.decoding.hf_generate import MTPGenerateOutput
from mtp.errors import MTPError


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    m = tiny_mtp("llama", num_heads=3, vocab_size=len(tokenizer), dtype=torch.float64)  # float64: spec == greedy
    m.tokenizer = tokenizer
    return m


def test_seed_000_snippet_runs_as_written(model, tokenizer):
    prompt = "What is the derivative of f(x) = x^3?"
    input_ids = tokenizer.encode(prompt, return_tensors="pt")
    generated = model.generate(input_ids, max_new_tokens=50, use_speculative=False)
    generated_fast = model.generate(input_ids, max_new_tokens=50, use_speculative=True)
    text = tokenizer.decode(generated[0], skip_special_tokens=True)

    rich = generate(model, input_ids, max_new_tokens=50)
    p = input_ids.shape[1]
    assert generated.dtype == torch.long and generated.shape == (1, p + len(rich.tokens[0]))
    assert torch.equal(generated[:, :p], input_ids) and generated[0, p:].tolist() == rich.tokens[0]
    assert torch.equal(generated_fast, generated)
    # mtp's own keywords pass through transformers' signature: a draft tree and prompt-lookup drafts
    assert torch.equal(model.generate(input_ids, max_new_tokens=50, use_speculative=True, tree_size=4, lookup=5),
                       generated)
    assert text.startswith(prompt) and text == prompt + rich.texts[0]


def test_seed_002_snippet_with_a_saved_folder(tiny_mtp_folder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_mtp_folder)
    model = MTPModel.from_pretrained(tiny_mtp_folder)
    inputs = tokenizer("What is 7 + 5?", return_tensors="pt")
    outputs = model.generate(**inputs, max_new_tokens=50)
    text = tokenizer.decode(outputs[0], skip_special_tokens=True)

    rich = generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=50)
    p = inputs["input_ids"].shape[1]
    assert outputs[0, p:].tolist() == rich.tokens[0] and text.startswith("What is 7 + 5?")
    assert torch.equal(model.generate(inputs, max_new_tokens=50), outputs)  # the BatchEncoding itself, too


def test_left_padded_batch_rows_that_stop_early_are_padded_on_the_right(model):
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    inputs = tok(["What is 7 + 5?", "Janet has 3 eggs and 4 ducks."], padding=True, return_tensors="pt")
    free = generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=8, stop_token_ids=[])
    eos = free.tokens[0][0]  # row 0 stops at once, row 1 (which never emits it) runs on
    pad = 4
    out = model.generate(**inputs, max_new_tokens=8, eos_token_id=eos, pad_token_id=pad)
    expected = generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=8,
                        stop_token_ids=[eos]).tokens
    p = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :p], inputs["input_ids"])  # left padding kept
    assert out.shape == (2, p + max(len(t) for t in expected))
    assert expected[0] == [eos] and len(expected[1]) == 8
    for row, tokens in enumerate(expected):
        assert out[row, p:p + len(tokens)].tolist() == tokens
        assert (out[row, p + len(tokens):] == pad).all()
    as_list = model.generate(**inputs, max_new_tokens=8, eos_token_id=[eos, 10**6 % len(tok)], pad_token_id=pad)
    assert torch.equal(as_list[0], out[0])


def test_generation_config_fields_apply_unless_given(model, tokenizer):
    ids = tokenizer.encode("What is 7 + 5?", return_tensors="pt")
    p = ids.shape[1]
    config = GenerationConfig(max_new_tokens=5, eos_token_id=[])  # eos_token_id=[]: no end token
    assert model.generate(ids, generation_config=config).shape == (1, p + 5)
    assert model.generate(ids, generation_config=config, max_new_tokens=3).shape == (1, p + 3)
    assert model.generate(ids, max_length=p + 4, eos_token_id=[]).shape == (1, p + 4)
    assert model.generate(ids, eos_token_id=[]).shape == (1, p + 20)  # transformers' default: 20 new tokens
    sampled = model.generate(ids, generation_config=GenerationConfig(do_sample=True, temperature=0.7, top_k=0,
                                                                     max_new_tokens=6), seed=3, eos_token_id=[])
    rich = generate(model, ids, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=0, seed=3,
                    stop_token_ids=[])
    assert sampled[0, p:].tolist() == rich.tokens[0]


def test_generation_config_fields_mtp_does_not_apply_are_named_in_a_warning(model, recwarn):
    """A config that would make transformers emit something else (no_repeat_ngram_size, min_length; typical_p
    when sampling) says so; neutral values, sampling fields without sampling, and the fields mtp applies
    (min_new_tokens, repetition_penalty) say nothing."""
    ids = torch.tensor([[5, 6, 7]])
    model.generate(ids, generation_config=GenerationConfig(max_new_tokens=3, typical_p=0.5, min_new_tokens=2,
                                                           repetition_penalty=1.2), eos_token_id=[])
    assert not [w for w in recwarn if "mtp does not apply" in str(w.message)]
    with pytest.warns(RuntimeWarning, match=r"sets min_length=5, no_repeat_ngram_size=3, which mtp does not "
                                            r"apply: its answers may differ from transformers'"):
        model.generate(ids, generation_config=GenerationConfig(max_new_tokens=3, no_repeat_ngram_size=3,
                                                               min_length=5), eos_token_id=[])
    with pytest.warns(RuntimeWarning, match=r"sets typical_p=0.5, which"):
        model.generate(ids, generation_config=GenerationConfig(max_new_tokens=3, do_sample=True, typical_p=0.5),
                       eos_token_id=[])


def test_return_dict_in_generate_has_sequences_and_our_statistics(model, tokenizer):
    ids = tokenizer.encode("What is 7 + 5?", return_tensors="pt")
    out = model.generate(ids, max_new_tokens=6, use_speculative=True, return_dict_in_generate=True)
    assert isinstance(out, MTPGenerateOutput) and isinstance(out, GenerateDecoderOnlyOutput)
    assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=6)) and out["sequences"] is out.sequences
    assert out.stats.new_tokens == len(out.tokens[0]) == out.sequences.shape[1] - ids.shape[1]
    assert out.texts == [tokenizer.decode(out.tokens[0], skip_special_tokens=True)]


def test_logprobs_come_in_the_output_object_and_streamers_still_stream(model, tokenizer, capsys):
    from transformers import TextStreamer

    ids = tokenizer.encode("What is 7 + 5?", return_tensors="pt")
    out = model.generate(ids, max_new_tokens=6, use_speculative=True, logprobs=2, return_dict_in_generate=True,
                         streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    rich = generate(model, ids, max_new_tokens=6, logprobs=2)
    assert [[e.token for e in row] for row in out.logprobs] == out.tokens == rich.tokens
    assert [e.logprob for e in out.logprobs[0]] == pytest.approx([e.logprob for e in rich.logprobs[0]], abs=1e-6)
    assert capsys.readouterr().out == tokenizer.decode(out.tokens[0], skip_special_tokens=True) + "\n"
    with pytest.raises(MTPError, match="add return_dict_in_generate=True"):
        model.generate(ids, max_new_tokens=6, logprobs=2)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_beams": 2}, "beam search"),
    ({"output_scores": True}, "does not take output_scores"),
    ({"max_length": 3}, "max_length is 3"),
    ({"eos_token_id": 2, "stop_token_ids": [2]}, "not both"),
])
def test_what_is_not_available_is_an_mtp_error(model, kwargs, message):
    with pytest.raises(MTPError, match=message):
        model.generate(torch.tensor([[5, 6, 7]]), **kwargs)


@pytest.mark.parametrize("adapter", ["full", "gated-lora"])
def test_mask_token_models_generate_as_transformers_does_too(adapter):
    """`MaskTokenModel.generate` (seed 002's snippet for a self-distilled model): prompt + new tokens; speculative
    decoding (`use_speculative=True`) equals greedy, ConfAdapt passes through as mtp's keywords."""
    from test_mask_decoding import mask_model

    model = mask_model("llama", adapter, seed=5, vocab=40)
    ids = torch.tensor([[1, 2, 3, 4, 5, 1, 2]])
    plain = model.generate(ids, max_new_tokens=12, use_speculative=False)
    fast = model.generate(ids, max_new_tokens=12, use_speculative=True)
    rich = generate(model, ids, max_new_tokens=12, stop_token_ids=[])
    assert plain.dtype == torch.long and torch.equal(plain[:, :7], ids)
    assert plain[0, 7:].tolist() == rich.tokens[0] and torch.equal(fast, plain)
    confident = model.generate(ids, max_new_tokens=12, strategy="confadapt", tau=0.0, k=3)
    assert confident[0, 7:].tolist() == generate(model, ids, max_new_tokens=12, strategy="confadapt", tau=0.0,
                                                 k=3, stop_token_ids=[]).tokens[0]


def test_transformers_streamers_stream_as_in_transformers(model, tokenizer, capsys):
    """`streamer=TextStreamer(tokenizer)` (what transformers users pass) prints the new text; a
    `TextIteratorStreamer` yields it; mtp's callable streamer still gets (row, tokens); a batch is refused, as
    transformers refuses it."""
    from threading import Thread

    from transformers import TextIteratorStreamer, TextStreamer

    ids = tokenizer("What is 7 + 5?", return_tensors="pt")["input_ids"]
    plain = model.generate(ids, max_new_tokens=12, use_speculative=True)
    new_text = tokenizer.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)
    capsys.readouterr()
    streamed = model.generate(ids, max_new_tokens=12, use_speculative=True,
                              streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    assert torch.equal(streamed, plain) and capsys.readouterr().out == new_text + "\n"
    iterator = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = Thread(target=model.generate, args=(ids,), kwargs={"max_new_tokens": 12, "streamer": iterator})
    worker.start()
    assert "".join(iterator) == new_text
    worker.join()
    rows: list = []
    model.generate(ids, max_new_tokens=12, streamer=lambda row, new: rows.append((row, new)))
    assert [t for _, new in rows for t in new] == plain[0, ids.shape[1]:].tolist()
    with pytest.raises(MTPError, match="takes one prompt"):
        model.generate(torch.cat([ids, ids]), max_new_tokens=4, streamer=TextStreamer(tokenizer))


def _fresh(tokenizer):
    m = tiny_mtp("llama", num_heads=3, vocab_size=len(tokenizer), dtype=torch.float64, seed=11)
    m.tokenizer = tokenizer
    return m


def test_a_passed_configs_unset_fields_are_the_models_own(tokenizer):
    """transformers 5: a generation config passed to generate() takes the fields it leaves unset from the
    model's own config (a shipped generation_config.json's repetition penalty, minimum length, end tokens):
    the same tokens as transformers' generate on the same weights."""
    model = _fresh(tokenizer)
    ids = tokenizer("Janet has 3 eggs", return_tensors="pt")
    p = ids["input_ids"].shape[1]
    third = int(model.generate(**ids, max_new_tokens=3, eos_token_id=[])[0, p + 2])
    own = model.generation_config
    own.repetition_penalty, own.min_new_tokens, own.eos_token_id = 3.0, 5, [third]
    lengths = []
    for passed in (GenerationConfig(max_new_tokens=10), GenerationConfig(max_new_tokens=10, min_new_tokens=1)):
        ours = model.generate(**ids, generation_config=passed, use_speculative=True)
        theirs = model.base.generate(**ids, generation_config=passed)
        assert ours.tolist() == theirs.tolist()
        lengths.append(ours.shape[1] - p)
    assert lengths[0] > 3 and lengths[1] <= lengths[0]  # the model's minimum length held its end token back


def test_stop_strings_as_transformers_applies_them(tokenizer):
    """A stop string (a keyword or the config's) ends a row as in transformers: where the sequence, the prompt's
    end included, first ends with it; mtp's own `generate` matches the new text only (as servers do)."""
    model = _fresh(tokenizer)
    prompt = "What is 7 + 5?"
    ids = tokenizer(prompt, return_tensors="pt")
    p = ids["input_ids"].shape[1]
    free = model.generate(**ids, max_new_tokens=12, eos_token_id=[])
    new_text = tokenizer.decode(free[0, p:])
    assert len(new_text) >= 3
    spanning, inside = prompt[-2:] + new_text[:2], new_text[1:3]  # (one begins in the prompt)
    for stop in (spanning, inside):
        for kw in ({"stop_strings": [stop]}, {"generation_config": GenerationConfig(max_new_tokens=12,
                                                                                   stop_strings=stop)}):
            kw = {"max_new_tokens": 12, **kw} if "stop_strings" in kw else kw
            ours = model.generate(**ids, tokenizer=tokenizer, eos_token_id=[], use_speculative=True, **kw)
            theirs = model.base.generate(**ids, tokenizer=tokenizer, eos_token_id=[], pad_token_id=0, **kw)
            assert ours.tolist() == theirs.tolist(), stop
            assert ours.shape[1] < free.shape[1]
    alone = generate(model, ids["input_ids"], max_new_tokens=12, stop_strings=[spanning], tokenizer=tokenizer,
                     stop_token_ids=[])
    assert spanning not in new_text and len(alone.tokens[0]) == 12  # (the new text alone never holds it)


def test_torch_manual_seed_reproduces_sampling_and_leaves_the_global_generator_seeded(tokenizer):
    """Without a seed, sampling draws from torch's global generator: `torch.manual_seed` reproduces a call, and the
    caller's own draws after it are reproducible too (torch.seed() used to reseed it from the system)."""
    model = _fresh(tokenizer)
    ids = tokenizer("Janet has", return_tensors="pt")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        out = model.generate(**ids, max_new_tokens=8, do_sample=True, top_k=0, eos_token_id=[])
        runs.append((out.tolist(), torch.rand(3).tolist()))
    assert runs[0] == runs[1]
    torch.manual_seed(1)
    assert model.generate(**ids, max_new_tokens=8, do_sample=True, top_k=0, eos_token_id=[]).tolist() != runs[0][0]


def test_a_config_asking_for_scores_is_refused_and_max_time_named(model):
    with pytest.raises(MTPError, match="asks for output_scores, which mtp's generate does not return"):
        model.generate(torch.tensor([[5, 6, 7]]), generation_config=GenerationConfig(output_scores=True,
                                                                                     return_dict_in_generate=True))
    with pytest.warns(RuntimeWarning, match=r"sets max_time=1.0, which mtp does not apply"):
        model.generate(torch.tensor([[5, 6, 7]]), generation_config=GenerationConfig(max_new_tokens=2, max_time=1.0))


def test_a_text_generation_pipeline_takes_the_model(model, tokenizer):
    """transformers' `pipeline("text-generation", model=m)` asks `can_generate()` and calls `generate`: the text
    transformers' generate gives on the same weights."""
    from transformers import pipeline

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    got = pipe("What is 7 + 5?", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    ids = tokenizer("What is 7 + 5?", return_tensors="pt")
    assert got == tokenizer.decode(model.base.generate(**ids, max_new_tokens=5, do_sample=False)[0],
                                   skip_special_tokens=True)
