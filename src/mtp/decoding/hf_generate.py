"""`model.generate(...)` with transformers' conventions, for any mtp model class.

`PreTrainedModel.generate` takes `**tokenizer(...)` (input_ids and attention_mask as keywords), `max_new_tokens`
or `max_length`, `do_sample`, `temperature`, `top_p`, `top_k`, `eos_token_id` (an id or a list), `pad_token_id`
and a `generation_config` whose fields apply when an argument is not given; it returns a LongTensor (B, P + N):
each prompt as given (left padding kept), then its new tokens, rows that stopped early padded on the right with
`pad_token_id`; `return_dict_in_generate=True` returns an output object with `.sequences`. `hf_generate` does the
same over mtp's decoding (`mtp.decoding.generate.generate`, or a model class's own `decode` function with its
keywords and a `GenerationResult`): the object also carries mtp's `.stats`, `.texts` and `.tokens` (new tokens per
row), and mtp's own arguments (`use_speculative`, `strategy`, `tau`, `streamer`, ...) pass through. A passed
config's unset fields are the model's own (`model.generation_config`), as in transformers 5. The config's
`repetition_penalty`, `min_new_tokens`, `min_p` and `stop_strings` apply, as transformers applies them (a stop
string may begin in the prompt, as there); its fields mtp does not apply are named in a warning, and
`output_scores` / `output_logits` are refused. Without a seed, sampling draws from torch's global generator
(`torch.manual_seed` reproduces a call).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from mtp.arguments import check_values
from mtp.decoding.generate import GenerationResult, GenerationStats
from mtp.decoding.inputs import token_batch
from mtp.errors import MTPError

DEFAULT_NEW_TOKENS = 20  # transformers' default when neither max_new_tokens nor max_length is set
# Generation config fields that change what transformers emits and mtp does not apply -> their neutral values (as
# keywords they are refused: `generate()` does not take them); the second group shapes sampling only.
NOT_APPLIED = {"min_length": (0, None), "no_repeat_ngram_size": (0, None),
               "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
               "sequence_bias": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
               "exponential_decay_length_penalty": (None,), "penalty_alpha": (None,), "dola_layers": (None,),
               "guidance_scale": (None, 1.0), "watermarking_config": (None,), "max_time": (None,)}
NOT_APPLIED_SAMPLING = {"typical_p": (1.0, None), "epsilon_cutoff": (0.0, None), "eta_cutoff": (0.0, None)}
IGNORED = frozenset({"token_type_ids", "use_cache"})  # what tokenizers / transformers users pass that changes nothing


@dataclass
class MTPGenerateOutput(GenerateDecoderOnlyOutput):
    """transformers' decoder-only generate output (`.sequences` (B, P + N)) plus mtp's statistics."""

    stats: GenerationStats | None = None
    texts: list[str] | None = None  # decoded new tokens per row (None without a tokenizer)
    tokens: list[list[int]] | None = None  # new tokens per row, without padding
    logprobs: list | None = None  # with logprobs=k: the new tokens' TokenLogprobs per row (`mtp.decoding.logprobs`)


def hf_generate(model, input_ids=None, attention_mask=None, *, decode: Callable[..., GenerationResult] | None = None,
                inputs=None, generation_config=None, max_new_tokens: int | None = None, max_length: int | None = None,
                do_sample: bool | None = None, temperature: float | None = None, top_p: float | None = None,
                top_k: int | None = None, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                return_dict_in_generate: bool | None = None, num_beams: int | None = None,
                num_return_sequences: int | None = None, **kwargs) -> torch.Tensor | MTPGenerateOutput:
    """Decode as `PreTrainedModel.generate` does (see the module docstring); `decode`: the model class's decoding
    function (default `mtp.decoding.generate.generate`). Other keywords go to `decode`."""
    from mtp.decoding.generate import generate

    decode = decode or generate
    if inputs is not None:
        if input_ids is not None:
            raise MTPError("give the prompt once: inputs or input_ids")
        input_ids = inputs
    if isinstance(input_ids, Mapping):  # a BatchEncoding passed whole: model.generate(tokenizer(...))
        attention_mask = input_ids.get("attention_mask") if attention_mask is None else attention_mask
        input_ids = input_ids.get("input_ids")
    if input_ids is None:
        raise MTPError("generate() needs input_ids (token ids, or **tokenizer(text, return_tensors='pt'))")
    _check_keywords(decode, kwargs)
    check_values({"seed": kwargs.get("seed")}, flags=False)
    config = _generation_config(generation_config, model)

    def setting(value, name: str, default=None):
        """The argument when given, else the generation config's field, else transformers' default."""
        if value is not None:
            return value
        field = getattr(config, name, None)
        return field if field is not None else default

    if setting(num_beams, "num_beams", 1) != 1 or setting(num_return_sequences, "num_return_sequences", 1) != 1:
        raise MTPError("beam search and several sequences per prompt are not available: use num_beams=1 and "
                       "num_return_sequences=1")
    ids, mask = token_batch(model, input_ids, attention_mask, left_padded=True)
    sampling = setting(do_sample, "do_sample", False)
    _warn_not_applied(config, sampling)
    for name, neutral, applies in (("repetition_penalty", 1.0, True), ("min_new_tokens", 0, True),
                                   ("min_p", 0.0, sampling)):
        value = getattr(config, name, None)  # (transformers applies its config's, as here)
        if name in kwargs or value in (None, neutral) or not applies:
            continue
        if name not in inspect.signature(decode).parameters:
            raise MTPError(f"the generation config asks for {name}={value}, which this model's decoding does not "
                           f"apply: set generation_config.{name} = {neutral}")
        kwargs[name] = value
    _config_extras(config, kwargs, decode)
    if "stop_token_ids" not in kwargs:  # mtp's own spelling wins; otherwise None: the model's end tokens
        eos = eos_token_id if eos_token_id is not None else getattr(generation_config, "eos_token_id", None)
        kwargs["stop_token_ids"] = [eos] if isinstance(eos, int) else (list(eos) if eos is not None else None)
    elif eos_token_id is not None:
        raise MTPError("give eos_token_id or stop_token_ids, not both")
    as_dict = setting(return_dict_in_generate, "return_dict_in_generate", False)
    if kwargs.get("logprobs") is not None and not as_dict:
        raise MTPError("logprobs come in generate()'s output object (.logprobs): add return_dict_in_generate=True")
    hf_streamer = _transformers_streamer(kwargs, ids)
    try:
        result = decode(model, ids, mask,
                        max_new_tokens=_new_tokens(max_new_tokens, setting(max_length, "max_length"), config,
                                                   ids.shape[1]),
                        do_sample=sampling,
                        temperature=setting(temperature, "temperature", 1.0), top_p=setting(top_p, "top_p", 1.0),
                        top_k=setting(top_k, "top_k", 50), **kwargs)
    finally:
        if hf_streamer is not None:
            hf_streamer.end()
    pad = setting(pad_token_id, "pad_token_id", _fallback_pad(model))
    sequences = prompt_and_new_tokens(ids, result.tokens, pad)
    if not as_dict:
        return sequences
    return MTPGenerateOutput(sequences=sequences, stats=result.stats, texts=result.texts, tokens=result.tokens,
                             logprobs=result.logprobs)


def _config_extras(config, kwargs: dict, decode: Callable) -> None:
    """What else the generation config asks that mtp's decoding does as transformers does: its stop strings (which,
    as there, may begin in the prompt); output_scores / output_logits, which mtp does not return, are refused as
    the keywords are."""
    for name in ("output_scores", "output_logits"):
        if getattr(config, name, None):
            raise MTPError(f"the generation config asks for {name}, which mtp's generate does not return: set "
                           f"generation_config.{name} = False (per-token log-probabilities: logprobs=k)")
    stops = getattr(config, "stop_strings", None)
    if stops and "stop_strings" not in kwargs:
        kwargs["stop_strings"] = [stops] if isinstance(stops, str) else list(stops)
    if kwargs.get("stop_strings") and "stop_in_prompt" in inspect.signature(decode).parameters:
        kwargs.setdefault("stop_in_prompt", True)


def _generation_config(passed, model):
    """The config whose fields apply where an argument is not given: transformers 5's rule, the passed config with
    its unset (None) fields taken from the model's own (`model.generation_config`), or the model's own."""
    own = getattr(model, "generation_config", None)
    if passed is None or own is None:
        return passed if passed is not None else own
    merged = copy.deepcopy(passed)
    merged.update(**own.to_dict(), defaults_only=True)
    return merged


def _transformers_streamer(kwargs: dict, ids: torch.Tensor):
    """A transformers streamer (`TextStreamer`, `TextIteratorStreamer`: `put` and `end`) given as `streamer`: fed
    as transformers feeds it (the prompt, then the new tokens as they come; one prompt only, as there), through
    mtp's streamer callback, which `kwargs` gets instead. Returns it (None: no such streamer), for `end()`."""
    streamer = kwargs.get("streamer")
    if streamer is None or callable(streamer) or not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        return None
    if ids.shape[0] != 1:
        raise MTPError(f"a transformers streamer ({type(streamer).__name__}) takes one prompt, as in transformers; "
                       "for a batch pass streamer=callable(row, new_tokens)")
    streamer.put(ids.cpu())  # (1, P): the prompt first, which `skip_prompt=True` leaves out
    kwargs["streamer"] = lambda row, new, **_: streamer.put(torch.tensor(new, dtype=torch.long))
    return streamer


def prompt_and_new_tokens(ids: torch.Tensor, new: list[list[int]], pad: int) -> torch.Tensor:
    """(B, P + N): each prompt row, then its new tokens, right-padded with `pad` to the longest row's N."""
    width = max((len(t) for t in new), default=0)
    out = torch.full((ids.shape[0], ids.shape[1] + width), pad, dtype=torch.long, device=ids.device)
    out[:, :ids.shape[1]] = ids
    for i, tokens in enumerate(new):
        out[i, ids.shape[1]:ids.shape[1] + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


def _new_tokens(max_new_tokens: int | None, max_length: int | None, config, prompt_len: int) -> int:
    """transformers' rule: max_new_tokens (the argument, else the config's) wins over max_length, which counts
    the prompt; neither: 20 new tokens."""
    if max_new_tokens is None:
        max_new_tokens = getattr(config, "max_new_tokens", None)
    if max_new_tokens is not None:
        return max_new_tokens
    if max_length is None:
        return DEFAULT_NEW_TOKENS
    if max_length <= prompt_len:
        raise MTPError(f"the prompt has {prompt_len} tokens and max_length is {max_length} (prompt included): "
                       "increase max_length, or set max_new_tokens")
    return max_length - prompt_len


def _fallback_pad(model) -> int:
    """No pad_token_id given or configured: the model's or tokenizer's pad token, else its end token, else 0."""
    tokenizer = getattr(model, "tokenizer", None)
    for candidate in (getattr(model.config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None),
                      getattr(model.config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, list | tuple):
            candidate = candidate[0] if candidate else None
        if isinstance(candidate, int):
            return candidate
    return 0


def _warn_not_applied(config, sampling: bool) -> None:
    """A warning naming the generation config's fields that would change transformers' output and that mtp does not
    apply (a model's shipped config may set some): the answers may then differ from transformers'."""
    fields = NOT_APPLIED | (NOT_APPLIED_SAMPLING if sampling else {})
    set_ = [f"{name}={getattr(config, name)!r}" for name, neutral in fields.items()
            if getattr(config, name, None) not in neutral]
    if set_:
        warnings.warn(f"model.generate: the generation config sets {', '.join(set_)}, which mtp does not apply: "
                      "its answers may differ from transformers' (set them to their defaults to silence this)",
                      RuntimeWarning, stacklevel=3)


def _check_keywords(decode: Callable, kwargs: dict) -> None:
    for name in IGNORED & kwargs.keys():
        kwargs.pop(name)
    known = set(inspect.signature(decode).parameters) - {"model", "input_ids", "attention_mask"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise MTPError(f"generate() does not take {', '.join(unknown)} (mtp's own arguments: "
                       f"{', '.join(sorted(known))})")
