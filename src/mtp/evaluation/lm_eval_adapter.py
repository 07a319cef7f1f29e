"""lm-evaluation-harness model `mtp`: evaluate an MTP model with any decoding strategy.

    pip install lm-eval            # or, in a checkout: pip install '.[lm-eval]'
    lm_eval --include_path ... --model mtp --model_args pretrained=runs/smollm2-mtp4,strategy=speculative \\
        --tasks gsm8k_cot --apply_chat_template --fewshot_as_multiturn

The model name is registered when this module is imported; the `lm_eval` command line does not import it by
itself, so run it through Python (`python -m mtp.evaluation.lm_eval_adapter ...`, same arguments as `lm_eval`) or
`import mtp.evaluation.lm_eval_adapter` before `lm_eval.simple_evaluate(model="mtp", ...)`. Passing an `MTPLM`
instance to `simple_evaluate(model=...)` works too.

`generate_until` decodes with the chosen strategy (greedy, speculative, confadapt, static); `loglikelihood` and
`loglikelihood_rolling` score with the next-token head (head 0), which is the base model's own distribution.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:
    _MISSING = "the lm-evaluation-harness adapter needs lm-eval: pip install lm-eval"
    if __name__ == "__main__":  # `python -m mtp.evaluation.lm_eval_adapter ...`: a command's one line, no traceback
        print(f"mtp: error: {_MISSING}", file=sys.stderr)
        sys.exit(2)
    raise ImportError(_MISSING) from e

from mtp.errors import MTPError
from mtp.evaluation.gen_args import fork_arguments


def _as_int(value: Any, default: int) -> int:
    if value is None or value == "auto":
        return default
    if isinstance(value, str) and value.startswith("auto"):
        return default
    return int(value)


@register_model("mtp")
class MTPLM(TemplateLM):
    """An `mtp` model for lm-eval. `pretrained`: a model argument as `mtp` takes it (folder, .gguf, hub id; None:
    the embedded default), or an `MTPModel` with a tokenizer attached."""

    def __init__(self, pretrained: Any = None, strategy: str = "greedy", tau: float = 0.9, k: int | None = None,
                 num_draft: int | None = None, batch_size: Any = 1, max_gen_toks: int = 256,
                 max_length: int | None = None, quantize: str = "none", dtype: str = "float32",
                 device: str = "cpu", add_bos_token: bool = False, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__()
        from mtp.decoding.generate import STRATEGIES, context_limit

        strategy, tau, k, mask_id = fork_arguments(strategy, tau, k, kwargs)
        if strategy not in STRATEGIES:
            raise MTPError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's command line defaults to cuda; like its HF model, fall back to the CPU
        if isinstance(pretrained, torch.nn.Module):
            self.model = pretrained
        else:
            from mtp.models.loading import load_mtp_model

            self.model = load_mtp_model(pretrained, device=device, dtype=dtype, quantize=quantize,
                                        mask_token_id=mask_id)
        self.model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else getattr(self.model, "tokenizer", None)
        if self.tokenizer is None:
            raise MTPError("the model has no tokenizer; pass one")
        self.strategy, self.tau = strategy, float(tau)
        self.k = None if k in (None, "None", "") else int(k)
        self.num_draft = None if num_draft in (None, "None", "") else int(num_draft)
        self.batch_size = max(1, _as_int(batch_size, 1))
        self.max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length) if max_length else (context_limit(self.model) or 2048)
        self.add_bos_token = str(add_bos_token).lower() == "true" if isinstance(add_bos_token, str) else add_bos_token
        self._device = self.model.device
        self.generation_stats = {"new_tokens": 0, "forward_passes": 0, "row_forwards": 0, "seconds": 0.0}

    # ------------------------------------------------------------------ tokenizer
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos) if eos is not None else 0

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "mtp") or "mtp").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer(string, add_special_tokens=bool(special))["input_ids"])

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ------------------------------------------------------------------ scoring with head 0
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether the continuation is the greedy one), per request: the
        longest first, `batch_size` at a time (`score_rows`: only the continuations' positions are unembedded)."""
        from mtp.decoding.logprobs import score_rows

        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        bar = None
        if not disable_tqdm and len(requests) > self.batch_size:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="mtp loglikelihood")
        for s in range(0, len(order), self.batch_size):
            rows, starts, idx = [], [], []
            for i in order[s:s + self.batch_size]:
                _, context, continuation = requests[i]
                if continuation:  # (an empty one scores 0, greedily)
                    # the model reads context + continuation but its last token, left-truncated to fit
                    full = (list(context) + list(continuation))[-(self.max_length + 1):]
                    rows.append(full)
                    starts.append(len(full) - min(len(continuation), len(full) - 1))
                    idx.append(i)
            for i, scores in zip(idx, score_rows(self.model, rows, starts), strict=True):
                results[i] = (float(scores.logprobs.double().sum()), bool(scores.greedy.all()))
            for i in order[s:s + self.batch_size]:
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            if bar is not None:
                bar.update(len(order[s:s + self.batch_size]))
        if bar is not None:
            bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (string,) in [req.args for req in requests]:
            windows = [(None,) + w for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # ------------------------------------------------------------------ generation with our strategies
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from mtp.decoding.inputs import common_prefix
        from mtp.decoding.queue import decode_queue
        from mtp.evaluation.prompts import pad_id, stop_token_ids

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        stop_ids = stop_token_ids(self.model, self.tokenizer)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        bar = None
        if not disable_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc=f"mtp generate_until ({self.strategy})")
        for members in groups.values():
            gen_kwargs = dict(requests[members[0]].args[1])
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_gen = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 1.0) or 0.0)
            if temperature == 0.0:
                do_sample = False
            top_p = float(gen_kwargs.pop("top_p", 1.0) or 1.0)
            seed = gen_kwargs.pop("seed", None)
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise MTPError(f"max_gen_toks {max_gen} does not fit the context of {self.max_length}")
            encoded = {i: self.tok_encode(requests[i].args[0])[-max_ctx:] or [self.prefix_token_id] for i in members}
            # what the contexts start with (a task's few-shot examples) is fed once
            shared = common_prefix(list(encoded.values())) if len(members) > 1 else None

            def end(i: int, tokens: list[int], scores, stats, until=until) -> None:
                text = self.tok_decode(tokens)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                if bar is not None:
                    bar.update(1)

            # longest first (lm-eval's order), decoded continuously: the next context joins as a row ends
            waiting = deque(sorted(members, key=lambda i: -len(encoded[i])))
            while waiting:  # (one call, unless the strategy takes no joiners or a long context waits for the next)
                result = decode_queue(self.model, waiting, self.batch_size, end, ids_of=encoded.__getitem__,
                                      pad_id=pad_id(self.tokenizer), max_new_tokens=max_gen, strategy=self.strategy,
                                      tau=self.tau, k=self.k, num_draft=self.num_draft, do_sample=do_sample,
                                      temperature=temperature if do_sample else 1.0, top_p=top_p,
                                      seed=None if seed is None else int(seed), stop_token_ids=stop_ids,
                                      stop_strings=[u for u in until if u], tokenizer=self.tokenizer, prefix=shared)
                st = result.stats
                self.generation_stats["new_tokens"] += st.new_tokens
                self.generation_stats["forward_passes"] += st.forward_passes
                self.generation_stats["row_forwards"] += st.row_forwards
                self.generation_stats["seconds"] += st.seconds
        if bar is not None:
            bar.close()
        return [r if r is not None else "" for r in results]

    @property
    def tokens_per_forward(self) -> float:
        st = self.generation_stats
        return st["new_tokens"] / st["row_forwards"] if st["row_forwards"] else 0.0


def main(argv: list[str] | None = None) -> None:
    """`lm_eval` with the `mtp` model registered: `python -m mtp.evaluation.lm_eval_adapter --model mtp ...`."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
