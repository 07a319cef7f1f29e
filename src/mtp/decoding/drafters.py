"""Drafters: what a decoding step feeds the model and where the next drafts come from.

The decoding loop (`mtp.decoding.generate.iter_generate`) is the same for every MTP method. Each step it hands
the drafter the chain to feed - the tokens emitted last step that the model has not seen yet (`pending`, left
padded) and the drafts proposed after them - and the drafter runs one forward over that chain plus whatever
extra slots its method needs (mask tokens), returning a `StepOutput`:

    verify_logits  (B, 1+d, V)  the model's own next-token logits after the last pending token and after each
                                draft: what a verifier judges the drafts with
    propose(slot, n)            drafts up to n positions ahead after the block's slot w-1+slot (0: the last
                                pending token, i: draft i - or tree node i-1), i.e. after what the verifier kept

    HeadsDrafter  parallel heads (Gloeckle et al.): head 0 verifies, heads 1..n-1 read the hidden state at a
                  slot and propose t+2..t+n; their logits at the kept slot are the next drafts
    MaskDrafter   mask tokens (Kirchenbauer et al. 2026): k-1 mask tokens are appended after chain slots; a
                  mask's logits are the model's guess for the token it stands for. The masks' cache entries
                  are never kept

The loop keeps the pending tokens and the accepted drafts in the cache and forgets every later slot, so a
drafter may lay out anything after the chain.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mtp.decoding.sampling import process_logits, sample
from mtp.decoding.tree import (
    DraftTree,
    DynamicTree,
    block_layout,
    build_tree,
    fallback_rank_accuracy,
    fill_tree,
    ranked_tree_drafts,
)
from mtp.errors import MTPError


@dataclass
class Drafts:
    tokens: torch.Tensor  # (B, m)
    probs: torch.Tensor | None = None  # (B, m, V) the distributions sampled drafts were drawn from
    confidence: torch.Tensor | None = None  # (B, m) top-1 probability of each draft (ConfAdapt)
    tree: DraftTree | None = None  # the tokens are this tree's nodes (None: a chain)

    @property
    def depth(self) -> int:
        """Draft positions ahead of the last emitted token."""
        return self.tree.depth if self.tree is not None else self.tokens.shape[1]

    def select(self, index: torch.Tensor) -> Drafts:
        """The drafts of batch rows `index`."""
        probs = self.probs[index] if self.probs is not None else None
        return Drafts(self.tokens[index], probs, None, self.tree)


@dataclass
class StepOutput:
    verify_logits: torch.Tensor  # (B, 1+d, V)
    block_len: int  # slots the forward wrote into the cache
    propose: Callable[[torch.Tensor, int], Drafts]  # (slot (B,), n) -> drafts n deep after block slot w-1+slot
    trunk: torch.Tensor | None = None  # (B, chain, H) trunk output of the chain slots (heads only)


def draft_tokens(logits: torch.Tensor, mode: str, opts, generator, vocab: torch.Tensor | None = None) -> Drafts:
    """Drafts from logits (B, m, V), or (B, m, K) over the token ids `vocab` (K,) (not when sampling).

    mode "greedy": argmax; "sample": drawn from the processed distribution (kept for speculative sampling);
    "confidence": argmax and its probability.
    """
    if mode == "sample":  # over the whole vocabulary: speculative sampling compares q with the model's p
        probs = process_logits(logits, opts.temperature, opts.top_k, opts.top_p)
        return Drafts(sample(probs, generator), probs)
    if mode == "confidence":
        top_p, top = torch.softmax(logits.float(), -1).max(-1)
        return Drafts(vocab[top] if vocab is not None else top, confidence=top_p)
    top = logits.argmax(-1)
    return Drafts(vocab[top] if vocab is not None else top)


def _slot_rows(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) -> x[b, slot[b]] (B, ...)."""
    return x[torch.arange(x.shape[0], device=x.device), slot]


# ------------------------------------------------------------------------------------------------ parallel heads
@dataclass
class DraftRequest:
    """What a draft source overriding the heads may look at (tests use it for oracle drafts)."""

    model: object
    hidden_at: torch.Tensor  # (B, d, H) heads 1..d at the position of the last accepted token
    rows: torch.Tensor  # (B,) original row index of each active row
    produced: torch.Tensor  # (B,) tokens emitted so far (the last one is not yet fed to the model)
    opts: object
    generator: torch.Generator | None


Proposer = Callable[[DraftRequest], tuple[torch.Tensor, "torch.Tensor | None"]]


class HeadsDrafter:
    """Parallel heads on a shared trunk. Every head's layers run on every fed token (their caches must stay
    complete); only the unembedding of the heads whose logits are needed is computed."""

    def __init__(self, model, opts, proposer: Proposer | None = None):
        n = model.num_heads
        self.model, self.opts, self.proposer = model, opts, proposer
        if opts.strategy == "greedy":
            self.num_drafts = 0
        elif opts.strategy == "speculative":
            self.num_drafts = n - 1 if opts.num_draft is None else opts.num_draft
            if not 0 <= self.num_drafts <= n - 1:
                raise MTPError(f"num_draft must be in [0, {n - 1}] for a {n}-head model, got {self.num_drafts}")
        elif opts.strategy == "static" and opts.k is not None:
            if not 1 <= opts.k <= n:
                raise MTPError(f"static k must be in [1, {n}] for a {n}-head model, got {opts.k}")
            self.num_drafts = opts.k - 1
        else:
            self.num_drafts = n - 1
        self.tree: DraftTree | DynamicTree | None = opts.tree
        if self.tree is not None:
            self.num_drafts = _tree_depth(self.tree, opts, self.num_drafts, "this model drafts")
        self.num_heads = 1 + self.num_drafts
        self.num_proposals = self.num_drafts  # drafts per step without verification (confadapt, static)
        # positions and cache slots past the emitted tokens a block may use (lookup drafts: one more branch)
        self.lookahead = self.num_drafts + opts.lookup
        self.extra_slots = (self.tree.size if self.tree is not None else self.num_drafts) + opts.lookup
        self.rows = self.produced = None  # set by the loop before each forward (for `proposer`)

    def new_cache(self, batch_size: int, max_len: int):
        return self.model.new_cache(batch_size, max_len)

    def forward(self, cache, pending: torch.Tensor, pending_valid: torch.Tensor, drafts: Drafts,
                generator) -> StepOutput:
        model = self.model
        w, d = pending.shape[1], drafts.tokens.shape[1]
        chain = torch.cat([pending, drafts.tokens], 1)  # (B, w+d)
        valid = torch.cat([pending_valid, torch.ones_like(drafts.tokens, dtype=torch.bool)], 1)
        offsets = within = None
        if drafts.tree is not None:  # nodes at the root's position + depth, seeing their ancestors only
            within, depth = block_layout(w, drafts.tree, chain.device)
            pending_offsets = pending_valid.long().cumsum(-1) - 1  # (B, w)
            offsets = torch.cat([pending_offsets, pending_offsets[:, -1:] + depth], 1)  # (B, w+d)
        trunk, ctx = model.trunk_forward(chain, None if bool(valid.all()) else valid, cache, offsets, within)
        hidden = torch.stack([model.head_forward(j, trunk, ctx) for j in range(self.num_heads)], dim=2)
        model.finish_block(ctx)  # hidden: (B, w+d, heads, H)
        verify_logits = model.lm_head(hidden[:, w - 1:, 0]).float()  # (B, 1+d, V)

        def propose(slot: torch.Tensor, n: int) -> Drafts:
            hidden_at = _slot_rows(hidden, w - 1 + slot)[:, 1:1 + n]  # (B, n, H) heads 1..n at the kept slot
            if self.tree is not None:
                return self.tree_drafts(hidden_at, self.tree.truncate(n), generator)
            return self.heads_drafts(hidden_at, generator)

        return StepOutput(verify_logits, w + d, propose, trunk)

    def tree_drafts(self, hidden_at: torch.Tensor, tree: DraftTree | DynamicTree, generator) -> Drafts:
        """The tree's node tokens from heads 1..m's ranked candidates (deterministic, also when sampling: the
        tree verifier is exact for any candidates)."""
        model = self.model
        if self.proposer is not None:  # (B, m, W) ranked candidates per head, no probabilities
            ranked, _ = self.proposer(DraftRequest(model, hidden_at, self.rows, self.produced, self.opts, generator))
            if isinstance(tree, DynamicTree):  # shaped as the held-out statistics' stand-in would be
                tree = build_tree(fallback_rank_accuracy(tree.depth, ranked.shape[-1]), tree.size)
            return Drafts(fill_tree(ranked, tree), tree=tree)
        if model.draft_vocab is not None:
            tokens, tree = ranked_tree_drafts(model.draft_logits(hidden_at), tree, model.draft_vocab)  # K columns
        else:
            tokens, tree = ranked_tree_drafts(model.restrict_to_draft_vocab(model.lm_head(hidden_at)), tree)
        return Drafts(tokens, tree=tree)

    def heads_drafts(self, hidden_at: torch.Tensor, generator, mode: str | None = None) -> Drafts:
        """Draft tokens from heads 1..m's hidden states (B, m, H)."""
        model, opts = self.model, self.opts
        mode = mode or _mode(opts)
        if self.proposer is not None and mode != "confidence":
            tokens, probs = self.proposer(DraftRequest(model, hidden_at, self.rows, self.produced, opts, generator))
            return Drafts(tokens, probs)
        if hidden_at.shape[1] == 0:
            return Drafts(hidden_at.new_zeros(hidden_at.shape[:2], dtype=torch.long))
        if model.draft_vocab is not None and mode != "sample":  # score only the K draft tokens
            return draft_tokens(model.draft_logits(hidden_at).float(), mode, opts, generator, model.draft_vocab)
        logits = model.restrict_to_draft_vocab(model.lm_head(hidden_at).float())  # (B, m, V)
        return draft_tokens(logits, mode, opts, generator)


def _tree_depth(tree: DraftTree | DynamicTree, opts, most: int, who: str) -> int:
    """The draft positions a tree uses, checked against what the drafter can propose (`most` ahead)."""
    if opts.strategy != "speculative":
        raise MTPError("a draft tree is verified: use it with the speculative strategy")
    if tree.depth > most:
        raise MTPError(f"the draft tree is {tree.depth} deep, but {who} at most {most} tokens ahead")
    return tree.depth


def _mode(opts) -> str:
    if opts.strategy in ("confadapt", "static"):
        return "confidence"
    return "sample" if opts.do_sample else "greedy"


# ------------------------------------------------------------------------------------------------ mask tokens
class MaskDrafter:
    """Mask tokens: groups of k-1 masks after chain slots; group g's masks stand for the k-1 tokens after
    chain slot `first + g`.

    Speculative: a group after the last pending token and after every draft, so whatever prefix of the drafts
    the verifier keeps, the masks after it have already drafted the next block (k masks per group: (1+d)(k-1)
    extra slots). ConfAdapt / static: one group after the last emitted token, as the paper decodes.

        chain (pending + drafts)      group 0           group 1        ...
        p_1 .. p_w  d_1 .. d_d   m m m (after p_w)  m m m (after d_1)  ...
    A mask sees the real tokens up to the slot it follows and the masks of its group before it; real tokens
    never see a mask, so the chain computes exactly what it would without the masks. With a draft tree the
    drafts are the tree's nodes (the masks' top candidates), a group follows every node, and a node's group
    sees what the node sees: its path.
    """

    def __init__(self, model, opts):
        self.model, self.opts = model, opts
        self.tree: DraftTree | DynamicTree | None = opts.tree
        k = opts.k if opts.k is not None else model.default_k
        if not 1 <= k <= model.max_k:
            raise MTPError(f"k must be in [1, {model.max_k}] for this mask-token model, got {k}")
        self.num_masks = 0 if opts.strategy == "greedy" else k - 1
        self.num_drafts = self.num_masks if opts.strategy == "speculative" else 0
        if opts.strategy == "speculative" and opts.num_draft is not None:
            if not 0 <= opts.num_draft <= self.num_masks:
                raise MTPError(f"num_draft must be in [0, {self.num_masks}] with k={k}, got {opts.num_draft}")
            self.num_drafts = opts.num_draft
        if self.tree is not None:
            self.num_drafts = _tree_depth(self.tree, opts, self.num_masks, f"k={k} masks draft")
        self.num_proposals = self.num_masks
        self.lookahead = self.num_drafts + opts.lookup + self.num_masks
        fed = (self.tree.size if self.tree is not None else self.num_drafts) + opts.lookup
        groups = fed + 1 if opts.strategy == "speculative" else 1
        self.extra_slots = fed + groups * self.num_masks
        self.rows = self.produced = None

    def new_cache(self, batch_size: int, max_len: int):
        return self.model.new_cache(batch_size, max_len)

    def forward(self, cache, pending, pending_valid, drafts: Drafts, generator) -> StepOutput:
        model, m = self.model, self.num_masks
        tree, drafts = drafts.tree, drafts.tokens
        b, w = pending.shape
        d = drafts.shape[1]
        chain = torch.cat([pending, drafts], 1)  # (B, c)
        chain_valid = torch.cat([pending_valid, torch.ones_like(drafts, dtype=torch.bool)], 1)
        c = w + d
        groups = (d + 1 if self.opts.strategy == "speculative" else 1) if m else 0
        first = c - groups  # chain slot the first group follows (0-based: slots first .. c-1 get groups)
        layout = mask_block_layout(c, first, groups, m, device=chain.device, tree=tree)  # cached by shape
        chain_offsets = chain_valid.long().cumsum(-1) - 1  # (B, c)
        if tree is not None:  # nodes at the root's position + depth
            chain_offsets[:, w:] = chain_offsets[:, w - 1:w] + layout.depth
        offsets = torch.cat([chain_offsets, chain_offsets[:, layout.follows] + layout.step], 1)  # (B, T)
        tokens = torch.cat([chain, chain.new_full((b, groups * m), model.mask_token_id)], 1)  # (B, T)
        valid = torch.cat([chain_valid, chain_valid.new_ones(b, groups * m)], 1)
        hidden = model.block_forward(tokens, valid, cache, offsets, layout.within, layout.is_mask)  # (B, T, H)
        verify_logits = model.lm_head(hidden[:, w - 1:c]).float()  # (B, 1+d, V)
        mask_hidden = hidden[:, c:].reshape(b, groups, m, hidden.shape[-1])  # (B, groups, m, H)

        def propose(slot: torch.Tensor, n: int) -> Drafts:
            g = w - 1 + slot - first  # (B,) the group after the kept slot
            if groups == 0 or n == 0 or bool((g < 0).any()):
                return Drafts(slot.new_zeros(b, 0))
            logits = model.lm_head(_slot_rows(mask_hidden, g)[:, :n]).float()  # (B, n, V)
            if self.tree is not None:  # deterministic ranked candidates (exact when sampling too)
                tokens, tree = ranked_tree_drafts(logits, self.tree.truncate(n))
                return Drafts(tokens, tree=tree)
            return draft_tokens(logits, _mode(self.opts), self.opts, generator)

        return StepOutput(verify_logits, tokens.shape[1], propose)


@dataclass
class MaskBlockLayout:
    within: torch.Tensor  # (T, T) bool: which block slots each block slot may attend to
    is_mask: torch.Tensor  # (T,) bool
    follows: torch.Tensor  # (groups * m,) chain slot each mask's group follows
    step: torch.Tensor  # (groups * m,) 1..m: how many tokens after that slot the mask stands for
    depth: torch.Tensor | None = None  # (N,) with a tree: each node's depth below the root


@functools.lru_cache(maxsize=1024)  # a step reuses one of a few shapes (a dynamic tree: a few hundred per run)
def mask_block_layout(chain: int, first: int, groups: int, m: int, device=None,
                      tree: DraftTree | None = None) -> MaskBlockLayout:
    """A decoding block of `chain` real slots, then `groups` groups of m masks; group g follows slot first+g.
    The chain is causal, or with `tree` its last `tree.size` slots are the tree's nodes below the slot before
    them (`mtp.decoding.tree.block_layout`). The tensors are shared between calls: read them, never write."""
    t = chain + groups * m
    idx = torch.arange(t, device=device)
    follows = (first + torch.arange(groups, device=device)).repeat_interleave(m)  # (groups*m,)
    step = torch.arange(1, m + 1, device=device).repeat(groups)
    group = torch.arange(groups, device=device).repeat_interleave(m)
    within = idx[None, :] <= idx[:, None]  # causal among the chain (T, T)
    depth = None
    if tree is not None:
        within[:chain, :chain], depth = block_layout(chain - tree.size, tree, device)
    within[chain:, chain:] = (group[:, None] == group[None, :]) & (step[None, :] <= step[:, None])
    within[chain:, :chain] = within[follows, :chain]  # what the followed slot sees, and that slot
    within[:chain, chain:] = False  # real tokens never see a mask
    is_mask = idx >= chain
    return MaskBlockLayout(within, is_mask, follows, step, depth)
