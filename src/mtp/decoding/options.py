"""The option groups the decoding commands share (`mtp generate`, `chat`, `serve`): the drafts, sampling, and the
weights and where they run. Each group is a dataclass: a flag per field under the group's heading
(`mtp.options`), one docstring line per flag, one place that turns them into `mtp.generate`'s arguments.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mtp.arguments import bias_pair, check_output
from mtp.errors import MTPError
from mtp.io import input_file
from mtp.runtime import DType, Graphs, Runtime, graphs_option, resolve_runtime, set_threads


@dataclass(frozen=True)
class DraftOptions:
    """drafts: speculative, ConfAdapt and static-k decoding

    Args:
        tau: ConfAdapt confidence threshold.
        k: tokens a step reads ahead: the heads used (a mask-token model: k - 1 masks); static emits k,
            ConfAdapt at most k, speculative verifies k - 1 drafts (default: all heads; the model's k).
        num_draft: speculative: draft tokens per step (default: all extra heads).
        adaptive_draft: speculative: verify fewer drafts while recent ones were rarely accepted, and in a batch
            none while plain steps emit tokens faster (same greedy output; a sampled batch's draws follow the
            timed steps: --no-adaptive-draft for a seed that reproduces them).
        tree: speculative: verify a tree of the heads' top candidates per step instead of a chain: "auto" (the
            best shape for --tree-size nodes from the accuracy per rank `mtp train` measured), "dynamic" (a new
            shape every step from the drafts' probabilities, EAGLE-2), a .json file or JSON list of paths of
            ranks (e.g. "[[0], [1], [0, 0]]"), or "chain" (the default, unless --tree-size asks an auto tree).
            Same output, more tokens per forward; each node costs a token of the verify forward.
        tree_size: nodes of the "auto" or "dynamic" tree (default 16; alone it implies --tree auto).
        lookup: speculative: also verify up to this many tokens copied from earlier in the prompt and answer
            (prompt lookup), one more branch of the draft tree; 0: none.
        lookup_corpus: with --lookup, where the answer's last tokens matched at most one earlier token, copy what
            the model said after them in earlier answers instead: none, auto (the model folder's
            lookup_corpus.safetensors, which `mtp train --targets self` writes from the answers it trained on) or
            such a file. Same answers; more tokens per forward for a model without heads (the default model with
            6 lookup drafts: 1.76 -> 2.09), a few percent with trained heads.
        grow_corpus: with --lookup, add every answer this command decodes to the lookup corpus (from
            --lookup-corpus's, or empty), so later prompts draft from earlier answers: a server's requests, a
            --prompts file, a conversation's turns. Same answers.
        save_corpus: with --grow-corpus, write the grown corpus to this file (safetensors) as it is rebuilt and
            when the command ends (a server: as it stops); --lookup-corpus FILE reads it back, so a restarted
            server drafts from the answers of the last (give both the same file to keep growing it).
    """

    tau: float = 0.9
    k: int | None = None
    num_draft: int | None = None
    adaptive_draft: bool = True
    tree: str | None = None
    tree_size: int | None = None
    lookup: int = 0
    lookup_corpus: str = "none"
    grow_corpus: bool = False
    save_corpus: str | None = None

    def check(self) -> None:
        check_tree_spec(self.tree)
        from mtp.decoding.corpus import check_corpus_choice

        check_corpus_choice(self.lookup_corpus)
        if self.grow_corpus and not self.lookup:
            raise MTPError("--grow-corpus adds answers to the drafts of --lookup: give --lookup N too")
        if self.save_corpus is not None:
            if not self.grow_corpus:
                raise MTPError("--save-corpus writes the corpus --grow-corpus grows: give --grow-corpus (and "
                               "--lookup N) too")
            check_output(self.save_corpus, "file", "--save-corpus")

    def corpus(self, model, seeded: bool = False):
        """--lookup-corpus for `model` (a `mtp.decoding.corpus.LookupCorpus`, or None: without --lookup, with
        "none", or "auto" for a model whose folder has none); with --grow-corpus a `GrowingCorpus` from it
        (`seeded`: a seeded sampling run, whose draws follow the drafts: rebuilt as answers come, never on a
        thread, so the same run drafts alike)."""
        from mtp.decoding.corpus import GrowingCorpus, chosen_corpus

        if not self.lookup:
            return None
        corpus = chosen_corpus(self.lookup_corpus, model)
        return GrowingCorpus(corpus, background=not seeded, path=self.save_corpus) if self.grow_corpus else corpus

    def generate_kwargs(self) -> dict:
        return dict(tau=self.tau, k=self.k, num_draft=self.num_draft, adaptive_draft=self.adaptive_draft,
                    tree=None if self.tree in (None, "chain") else self.tree, tree_size=self.tree_size,
                    lookup=self.lookup)


def check_tree_spec(tree: str | None) -> None:
    """A --tree that names a file names one that is there (the other values are words or a JSON list)."""
    if tree in (None, "chain", "auto", "dynamic") or tree.lstrip().startswith("["):
        return
    if not Path(tree).exists():
        raise MTPError(f"--tree {tree}: file not found (or give auto, dynamic, chain, or a JSON list of paths)")
    input_file(tree, "draft tree")


@dataclass(frozen=True)
class SamplingOptions:
    """sampling and penalties

    Args:
        do_sample: sample instead of greedy (exact speculative sampling with --strategy speculative).
        temperature: with --do-sample: divides the logits (below 1: closer to greedy; above: more varied).
        top_p: with --do-sample: draw from the smallest set of tokens whose probabilities add up to this (1: all).
        top_k: with --do-sample: draw from the k most likely tokens only (0: all).
        min_p: with --do-sample: draw only from tokens at least this times as likely as the most likely one (0: all).
        seed: with --do-sample: the random seed (default: a new one each run).
        repetition_penalty: greedy or speculative: divide the logit of each token the prompt or answer already
            holds by this (transformers' repetition_penalty, 0.01 to 100; 1: none, 1.1-1.3: fewer loops in a small
            model).
        presence_penalty: greedy or speculative: subtract this from the logit of each token the answer holds
            (OpenAI's, -2 to 2; 0: none).
        frequency_penalty: greedy or speculative: subtract this once per time the answer holds a token (OpenAI's,
            -2 to 2; 0: none). Speculative decoding stays equal to greedy decoding with the same penalties.
        min_new_tokens: greedy or speculative: no end token before the answer has this many tokens (0: none).
        logit_bias: greedy or speculative: TOKEN_ID:BIAS pairs, each bias (-100 to 100) added to that token's logit
            (OpenAI's logit_bias; -100 bans the token), e.g. --logit-bias 198:-100 13:2.5.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_new_tokens: int = 0
    logit_bias: list[str] | None = None

    @property
    def seeded(self) -> bool:
        """Sampling with a seed: its draws follow the drafts, so they must not depend on timing."""
        return self.do_sample and self.seed is not None

    def bias(self) -> dict[int, float] | None:
        """--logit-bias as {token id: bias}, or an MTPError naming the pair that is not one (checked before the
        model loads; the ids against its vocabulary when it decodes)."""
        if not self.logit_bias:
            return None
        out = {}
        for pair in self.logit_bias:
            try:
                token, value = bias_pair(pair)
            except ValueError:
                raise MTPError(f"--logit-bias takes TOKEN_ID:BIAS pairs (e.g. 198:-100), got {pair!r}") from None
            if not -100 <= value <= 100:
                raise MTPError(f"--logit-bias: the bias of token {token} must be in [-100, 100], got {value}")
            out[token] = value
        return out

    def generate_kwargs(self) -> dict:
        return dict(do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    min_p=self.min_p, seed=self.seed, repetition_penalty=self.repetition_penalty,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    min_new_tokens=self.min_new_tokens, logit_bias=self.bias())


@dataclass(frozen=True)
class WeightOptions:
    """weights and device

    Args:
        dtype: the weights' dtype: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 or float16
        quantize: CPU weight format for decoding (none: fp32, exact): fp16 (packed: half the memory, faster;
            speculative stays exactly equal to greedy) or int8 (dynamic quantisation; speculative may differ).
        device: auto (CUDA when available), cpu, cuda or cuda:N
        threads: torch CPU threads (default: torch's choice).
        mask_token_id: decode a plain model that has a mask token with it (checkpoints trained with the
            self-distillation authors' code ship one)
        mask_token: the same, naming the token (e.g. "<|mtp_special_token_0|>")
        graphs: replay the decoding steps as CUDA graphs: auto (on CUDA), on, off (eager steps, same output),
            compile (graphs of the step torch.compile fused, gpt-fast's way: faster; compiling takes tens of
            seconds for each of the first few step shapes).
    """

    dtype: DType = "auto"
    quantize: Literal["none", "fp16", "int8"] = "none"
    device: str = "auto"
    threads: int | None = None
    mask_token_id: int | None = None
    mask_token: str | None = None
    graphs: Graphs = "auto"

    def runtime(self) -> tuple[Runtime, bool | str | None]:
        """The device and dtype these options resolve to and generate's `graphs`, checked (and the threads set):
        before anything loads."""
        set_threads(self.threads)
        runtime = resolve_runtime(self.device, self.dtype, self.quantize)
        return runtime, graphs_option(self.graphs, runtime.device)

    def load(self, model: str | None, runtime: Runtime, strategy: str, num_heads: int | None = None):
        """The model to decode with `strategy`, on `runtime`; one without a tokenizer is an error (commands
        decode text), and a plain model's new heads are pointed out where the strategy uses them."""
        from mtp.models.loading import load_mtp_model

        m = load_mtp_model(model, num_heads=num_heads, device=runtime.device, dtype=runtime.dtype,
                           quantize=self.quantize, mask_token_id=self.mask_token_id, mask_token=self.mask_token,
                           decode_only=True)
        if m.tokenizer is None:
            raise MTPError("this model has no tokenizer; save one with the model folder")
        if (note := untrained_heads_note(m, strategy)) is not None:
            print(f"mtp: note: {note}", file=sys.stderr, flush=True)
        return m

    def describe(self, runtime: Runtime) -> str:
        """Where it decodes, in words: "cpu, float32, fp16-packed"."""
        return runtime.describe() + ("" if self.quantize == "none" else f", {self.quantize}-packed")


def untrained_heads_note(model, strategy: str) -> str | None:
    """What a strategy that drafts gets from a plain model's extra heads, which nothing trained yet (each starts as
    a copy of the last layer, which predicts the next token again): None when the heads were trained (an mtp
    folder, a Meta checkpoint), the model drafts with a mask token, or the strategy does not draft."""
    from mtp.models.parallel_heads import MTPModel

    source = getattr(model, "source", None)
    if strategy == "greedy" or not isinstance(model, MTPModel) or model.num_heads < 2 or source is None or \
            source.kind in ("mtp_folder", "meta"):
        return None
    what = ("greedy's answers at about greedy's speed" if strategy == "speculative" else
            "the untrained heads' guesses: answers unlike greedy's")
    return (f"the model's {model.num_heads - 1} extra heads are new, not trained: {strategy} decoding gives {what}; "
            "train them with `mtp train` (or `make demo`) and decode the folder it writes")
