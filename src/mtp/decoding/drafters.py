"""Drafters: what a decoding step feeds the model and where the next drafts come from.

The decoding step (`mtp.decoding.step`) is the same for every MTP method. It hands the drafter the chain to feed -
the tokens emitted last step that the model has not seen yet (`pending`; a prompt is left-padded, an emitted run
right-padded) and the drafts proposed after them - and the drafter runs one forward over that chain plus whatever
extra slots its method needs (mask tokens), returning a `StepOutput` of tensors:

    verify_logits  (B, 1+d, V)     the model's own next-token logits after the last pending token (the block's
                                   root) and after each draft: what a verifier judges the drafts with
    draft_hidden   (B, 1+d, D, H)  for the root and each draft, the hidden states D drafts ahead are made from

and `propose(out, slot)` turns the hidden states at the slot the verifier kept (0: the root, i: draft i - or tree
node i-1) into the next drafts, a chain or a tree's nodes:

    HeadsDrafter  parallel heads (Gloeckle et al.): head 0 verifies, heads 1..n-1 read the hidden state at a
                  slot and propose t+2..t+n
    MaskDrafter   mask tokens (Kirchenbauer et al. 2026): k-1 mask tokens are appended after chain slots; a
                  mask's logits are the model's guess for the token it stands for. The masks' cache entries
                  are never kept

A drafter holds no tensors of a step between calls, so a step is a function of its inputs (a CUDA graph can
replay it). The cache keeps the pending tokens and the accepted drafts and forgets every later slot, so a drafter
may lay out anything after the chain. A model names its drafter by its `kind` (`drafter_for`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mtp.arguments import check_draft_counts
from mtp.decoding.sampling import row_probs, sample
from mtp.decoding.tree import (
    DraftTree,
    DynamicTree,
    TreeLayout,
    block_layout,
    build_tree,
    fallback_rank_accuracy,
    fill_tree,
    ranked_tree_drafts,
    sampled_tree_drafts,
)
from mtp.errors import MTPError


@dataclass
class Drafts:
    tokens: torch.Tensor  # (B, N) a chain's drafts, or a tree's node tokens
    probs: torch.Tensor | None = None  # (B, D, V) the distributions sampled drafts at depths 1..D were drawn from
    # (a chain's drafts; a tree's last children, outside their siblings' tokens)
    confidence: torch.Tensor | None = None  # (B, N) top-1 probability of each draft (ConfAdapt)
    tree: DraftTree | None = None  # the nodes of this fixed tree (its layout is built once)
    layout: TreeLayout | None = None  # the nodes' layout (a tree shaped this step has no DraftTree); None: a chain

    def __post_init__(self):
        if self.tree is not None and self.layout is None:
            self.layout = self.tree.layout_on(self.tokens.device)

    @property
    def depth(self) -> int:
        """Draft positions ahead of the last emitted token."""
        return self.layout.max_depth if self.layout is not None else self.tokens.shape[1]

    def truncate(self, depth: int) -> Drafts:
        """The drafts at most `depth` ahead: a chain's first ones, a fixed tree's shallower nodes (its nodes are
        sorted by depth, so they come first). A tree shaped this step keeps its shape."""
        if depth >= self.depth or (self.layout is not None and self.tree is None):
            return self
        probs = self.probs[:, :depth] if self.probs is not None else None
        if self.tree is None:
            return Drafts(self.tokens[:, :depth], probs)
        tree = self.tree.truncate(depth)
        return Drafts(self.tokens[:, : tree.size], probs, tree=tree)


@dataclass
class LeftOut:
    """What a forward that left its drafting layers out keeps for `Drafter.draft_after` (the same block)."""

    context: object  # the trunk forward's context (the block's mask, positions and cache slots)
    chain: torch.Tensor  # (B, w+d) the fed tokens, then the drafts
    pending_valid: torch.Tensor  # (B, w)
    num_drafts: int  # d


@dataclass
class StepOutput:
    verify_logits: torch.Tensor  # (B, 1+d, V) at the root and at each draft
    draft_hidden: torch.Tensor  # (B, 1+d, D, H): hidden states the drafts after each of those slots come from
    trunk: torch.Tensor | None = None  # (B, chain, H) trunk output of the chain slots (heads only)
    verify_argmax: torch.Tensor | None = None  # (B, 1+d) verify_logits' argmax, where the forward needed it already
    left_out: LeftOut | None = None  # where the forward left the drafting to `Drafter.draft_after`

    def argmax(self) -> torch.Tensor:
        """(B, 1+d) the model's own token at the root and at each draft."""
        return self.verify_argmax if self.verify_argmax is not None else self.verify_logits.argmax(-1)


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


def draft_tokens(logits: torch.Tensor, mode: str, opts, generator, vocab: torch.Tensor | None = None,
                 sampling: torch.Tensor | None = None) -> Drafts:
    """Drafts from logits (B, m, V), or (B, m, K) over the token ids `vocab` (K,) (not when sampling).

    mode "greedy": argmax; "sample": drawn from each row's processed distribution (`sampling` (B, SAMPLING_COLUMNS):
    its settings; kept for speculative sampling; a greedy row's: its argmax); "confidence": argmax and its
    probability.
    """
    if mode == "sample":  # over the whole vocabulary: speculative sampling compares q with the model's p
        probs = row_probs(logits, sampling, opts)
        drawn = torch.where(sampling[:, :1] > 0, sample(probs, generator), logits.argmax(-1))
        return Drafts(drawn, probs)
    if mode == "confidence":
        top_p, top = torch.softmax(logits.float(), -1).max(-1)
        return Drafts(vocab[top] if vocab is not None else top, confidence=top_p)
    top = logits.argmax(-1)
    return Drafts(vocab[top] if vocab is not None else top)


def _mode(opts) -> str:
    if opts.strategy in ("confadapt", "static"):
        return "confidence"
    return "sample" if opts.do_sample else "greedy"


def _tree_depth(tree: DraftTree | DynamicTree, opts, most: int, who: str) -> int:
    """The draft positions a tree uses, checked against what the drafter can propose (`most` ahead)."""
    if opts.strategy != "speculative":
        raise MTPError("a draft tree is verified: use it with the speculative strategy")
    if tree.depth > most:
        raise MTPError(f"the draft tree is {tree.depth} deep, but {who} at most {most} "
                       f"token{'' if most == 1 else 's'} ahead")
    return tree.depth


def chain_positions(pending_valid: torch.Tensor, drafts: int,
                    depth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid (B, w+d), offsets (B, w+d)) of a block of pending slots (left-padded prompt, or right-padded run)
    then `drafts` draft slots: each slot's position after the row's next one, consecutive over the valid slots;
    with a tree's node depths (d,), a node at its root's (the last pending slot's) position + its depth. What a
    block that is not all real tokens needs (`Drafter.all_valid` blocks take their layout's offsets)."""
    b, w = pending_valid.shape
    valid = torch.cat([pending_valid, pending_valid.new_ones(b, drafts)], 1) if drafts else pending_valid
    offsets = valid.long().cumsum(-1) - 1  # (B, w+d)
    if depth is not None:
        offsets = torch.cat([offsets[:, :w], offsets[:, w - 1:w] + depth], 1)
    return valid, offsets


def block_rows(pending_valid: torch.Tensor, drafts: int) -> torch.Tensor:
    """(B, 1+d) block slots of the root (the last valid pending slot: the last of a left-padded prompt, the count
    of a right-padded run less one) and of the d drafts after the pending slots."""
    b, w = pending_valid.shape
    slots = torch.arange(w + drafts, device=pending_valid.device)
    root = (pending_valid.long() * slots[:w]).amax(-1, keepdim=True)  # (B, 1)
    return torch.cat([root, slots[w:].expand(b, drafts)], 1)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) -> x[b, index[b, j]] (B, J, ...)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def at_block_rows(x: torch.Tensor, pending_valid: torch.Tensor, drafts: int) -> torch.Tensor:
    """x (B, T, ...) at the root's and the d drafts' block slots (`block_rows`): (B, 1+d, ...). A one-token
    pending block (every verifying step after the prompt) has its root in slot 0: a view, where finding each
    row's root costs six kernels."""
    if pending_valid.shape[1] == 1:
        return x[:, : 1 + drafts]
    return _take(x, block_rows(pending_valid, drafts))


class Drafter:
    """What every drafter shares: how many drafts a step verifies, and turning draft hidden states into drafts.
    A subclass runs its forward (`forward`) and scores hidden states (`draft_logits`)."""

    model: object
    opts: object
    tree: DraftTree | DynamicTree | None
    num_drafts: int  # draft positions a verified step feeds (0: greedy, confadapt, static)
    lookahead: int  # positions past the emitted tokens a block may use
    extra_slots: int  # cache slots past the emitted tokens a block may use
    catches_up = False  # plain steps leave out layers of its own, computed later (`catch_up`)
    # The keys a step writes at a position depend on the token after it, which the step takes to be the model's
    # own (heads that read the next token) ...
    reads_next_token = False
    # ... unless the step may emit another one (sampling, penalties): the forward then leaves the drafting layers
    # to `draft_after`, which runs them once the step's tokens are known
    reads_emitted = False
    proposer: Proposer | None = None  # a custom proposer (host-side drafts), which reads a `DraftRequest`

    def new_cache(self, batch_size: int, max_len: int, static: bool = False):
        return self.model.new_cache(batch_size, max_len, static=static)

    def forward(self, cache, pending: torch.Tensor, pending_valid: torch.Tensor, drafts: Drafts,
                drafting: bool = True) -> StepOutput:
        """One forward over the pending tokens and the drafts. `drafting` False: a plain step, whose drafting
        work (extra heads, mask tokens) is left out; its output then has no draft hidden states."""
        raise NotImplementedError

    def fill(self, cache, tokens: torch.Tensor) -> None:
        """Write the keys and values of real tokens (B, T), all but the last one, into every stack a step reads:
        a prompt prefix computed once for the prompts that start with it. The last token is left for the prompt's
        own step to feed with what follows it (a head that reads the token after a position then reads the right
        one, as it does when the whole prompt is fed at once)."""
        out = self.forward(cache, tokens, torch.ones_like(tokens, dtype=torch.bool), Drafts(tokens[:, :0]))
        if out.left_out is not None:  # (the last token's successor: any, its slot is the prompt step's to write)
            self.draft_after(out, tokens[:, -1:])
        cache.commit(torch.full_like(cache.length, tokens.shape[1] - 1))

    def draft_after(self, out: StepOutput, after: torch.Tensor) -> StepOutput:
        """The drafting layers a forward left out (`reads_emitted`), run over the same block before the cache
        keeps its path, each slot reading the token the step emits after it: `after` (B, 1+d), after the root
        and each draft (a slot off the kept path: any token, never read). Returns `out` with draft hidden states."""
        raise NotImplementedError

    def catch_up(self, cache, trunk: torch.Tensor, next_ids: torch.Tensor, count: torch.Tensor, width: int) -> None:
        """Compute the drafting layers for the last count[b] positions of each row (at most `width`) that plain
        steps left out, from their trunk outputs (B, C, H) and next tokens (B, C): for drafters that
        `catches_up`."""
        raise NotImplementedError

    def draft_logits(self, hidden: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft hidden states (B, D, H) -> (logits (B, D, K) fp32, the K token ids or None for all V)."""
        raise NotImplementedError

    def all_valid(self, pending_width: int) -> bool:
        """Whether every slot of a block is a real token: a verifying step after the prompt feeds one pending
        token, always valid (`mtp.decoding.step.Decoder`), then drafts (a confident run's block may be a
        finished row's empty one). The cache then counts no positions (kernels a GPU step saves)."""
        return pending_width == 1 and self.opts.strategy in ("greedy", "speculative")

    def propose(self, out: StepOutput, slot: torch.Tensor, generator, request: DraftRequest | None = None,
                mode: str | None = None, sampling: torch.Tensor | None = None) -> Drafts:
        """The next drafts, as many positions ahead as `out` has, after block slot `slot` (B,); `sampling`: each
        row's settings where the batch samples (`DecodeState.sampling`)."""
        mode = mode or _mode(self.opts)
        if 0 in out.draft_hidden.shape[1:3]:  # nothing drafts (greedy)
            return Drafts(slot.new_zeros(slot.shape[0], 0))
        hidden_at = out.draft_hidden[torch.arange(slot.shape[0], device=slot.device), slot]  # (B, D, H)
        logits, vocab = self.draft_logits(hidden_at, mode)
        if self.tree is None:
            return draft_tokens(logits, mode, self.opts, generator, vocab, sampling)
        probs = None
        if mode == "sample":  # each node's last child drawn from its head (a chain's drafts all are)
            probs = row_probs(logits, sampling, self.opts)  # (B, D, V)
            tokens, layout = sampled_tree_drafts(logits, probs, sampling[:, 0] > 0, self.tree, generator)
        else:  # the heads' ranked candidates
            tokens, layout = ranked_tree_drafts(logits, self.tree, vocab)  # (B, N)
        return Drafts(tokens, probs, tree=self.tree if isinstance(self.tree, DraftTree) else None, layout=layout)


# ------------------------------------------------------------------------------------------------ parallel heads
class HeadsDrafter(Drafter):
    """Parallel heads on a shared trunk. Every head's layers run on every fed token (their caches must stay
    complete); only the unembedding of the heads whose logits are needed is computed."""

    def __init__(self, model, opts, proposer: Proposer | None = None):
        n = model.num_heads
        self.model, self.opts, self.proposer = model, opts, proposer
        # k: the heads a step reads, the next-token head and k - 1 extra ones (a mask-token model's k - 1 masks)
        spec_drafts = opts.num_draft if opts.strategy == "speculative" else None
        k = check_draft_counts(n, n, None if opts.strategy == "greedy" else opts.k, spec_drafts, f"{n}-head model",
                               flags=False)
        if opts.strategy == "greedy":
            self.num_drafts = 0
        else:
            self.num_drafts = k - 1 if spec_drafts is None else spec_drafts
        self.tree: DraftTree | DynamicTree | None = opts.tree
        if self.tree is not None:
            self.num_drafts = _tree_depth(self.tree, opts, self.num_drafts, "this model drafts")
        self.num_heads = 1 + self.num_drafts
        self.lookahead = self.num_drafts + opts.lookup
        self.extra_slots = (self.tree.size if self.tree is not None else self.num_drafts) + opts.lookup
        if opts.strategy in ("confadapt", "static"):
            self.num_drafts = 0  # nothing is verified: the heads' proposals are emitted
        self.catches_up = self.num_heads > 1  # the extra heads keep caches: a plain step's positions are caught up
        self.reads_next_token = self.num_heads > 1 and model.reads_next_token
        self.reads_emitted = self.reads_next_token and opts.strategy == "speculative" and (
            opts.do_sample or opts.penalties is not None)

    def forward(self, cache, pending, pending_valid, drafts: Drafts, drafting: bool = True) -> StepOutput:
        model = self.model
        w, d = pending.shape[1], drafts.tokens.shape[1]
        chain = torch.cat([pending, drafts.tokens], 1) if d else pending  # (B, w+d): the pending tokens, the drafts
        all_valid, valid = self.all_valid(w), None  # None: every slot a token
        offsets = within = depth = None
        if drafts.layout is not None:  # nodes at the root's position + depth, seeing their ancestors only
            within, depth, offsets = block_layout(w, drafts.tree or drafts.layout, chain.device)  # offsets (w+d,)
        if not all_valid:  # (a chain's positions: counted from `valid` by the cache)
            valid, tree_offsets = chain_positions(pending_valid, d, depth)
            offsets = tree_offsets if depth is not None else None
        trunk, ctx = model.trunk_forward(chain, valid, cache, offsets, within)
        first = model.head_forward(0, trunk, ctx)  # (B, w+d, H)
        verify_logits = model.lm_head(at_block_rows(first, pending_valid, d)).float()  # (B, 1+d, V)
        if not drafting:  # a plain step: the extra heads run later, over its position (`catch_up`)
            return StepOutput(verify_logits, trunk[:, : 1 + d, None][:, :, :0], trunk)  # (B, 1+d, 0, H)
        if self.reads_emitted:  # the extra heads once the step's tokens are known (`draft_after`)
            return StepOutput(verify_logits, trunk[:, : 1 + d, None][:, :, :0], trunk,
                              left_out=LeftOut(ctx, chain, pending_valid, d))
        next_ids = own = None
        if self.reads_next_token:
            own = verify_logits.argmax(-1)  # (B, 1+d), which greedy verification reads too
            next_ids = self._next_ids(chain, pending_valid, d, own)
        extra = model.extra_heads_forward(self.num_heads, trunk, ctx, next_ids)  # (B, w+d, heads - 1, H)
        return StepOutput(verify_logits, at_block_rows(extra, pending_valid, d), trunk, own)

    def draft_after(self, out, after):
        left = out.left_out
        next_ids = self._next_ids(left.chain, left.pending_valid, left.num_drafts, after)
        extra = self.model.extra_heads_forward(self.num_heads, out.trunk, left.context, next_ids)  # (B, w+d, heads-1, H)
        return StepOutput(out.verify_logits, at_block_rows(extra, left.pending_valid, left.num_drafts), out.trunk)

    def catch_up(self, cache, trunk, next_ids, count, width):
        # Entry j < count[b] of row b is the position at slot length - count + j (the plain steps' tokens, in
        # order); entries past the count repeat the last one (the same keys, written twice), and a row with none
        # writes at its length, which the step's own block then writes over.
        j = torch.arange(width, device=count.device)[None, :]  # (1, W)
        entry = torch.minimum(j, (count - 1).clamp_min(0)[:, None])  # (B, W)
        back = count[:, None] - entry  # (B, W) how far before the row's length
        slots = cache.length[:, None] - back
        positions = (cache.next_pos[:, None] - back).clamp_min(0)
        hidden = _take(trunk, entry)  # (B, W, H)
        ids = next_ids.gather(1, entry) if self.reads_next_token else None
        self.model.rewrite_extra_heads(self.num_heads, hidden, ids, cache, slots, positions)

    @staticmethod
    def _next_ids(chain, pending_valid, d: int, own: torch.Tensor) -> torch.Tensor:
        """The token after each block slot, for heads that read it (B, w+d): a pending token's successor, and
        after the root and each draft `own` (B, 1+d): head 0's own token there, or where the step may emit
        another (`reads_emitted`), the one it emitted. Where the verifier keeps a slot, the token after it is that
        one; a slot it drops is overwritten later."""
        if pending_valid.shape[1] == 1:  # every verifying step after the prompt: the block is the root + drafts
            return own
        return torch.cat([chain[:, 1:], chain[:, :1]], 1).scatter(1, block_rows(pending_valid, d), own)

    def draft_logits(self, hidden, mode):
        model = self.model
        if model.draft_vocab is not None and mode != "sample":  # score only the K draft tokens
            return model.draft_logits(hidden).float(), model.draft_vocab
        return model.restrict_to_draft_vocab(model.lm_head(hidden).float()), None  # (B, D, V)

    def propose(self, out, slot, generator, request=None, mode=None, sampling=None):
        if self.proposer is None or (mode or _mode(self.opts)) == "confidence" or 0 in out.draft_hidden.shape[1:3]:
            return super().propose(out, slot, generator, request, mode, sampling)
        hidden_at = out.draft_hidden[torch.arange(slot.shape[0], device=slot.device), slot]  # (B, D, H)
        request.hidden_at = hidden_at
        if self.tree is None:
            return Drafts(*self.proposer(request))
        ranked, _ = self.proposer(request)  # (B, D, W) ranked candidates per head, no probabilities
        tree = self.tree
        if isinstance(tree, DynamicTree):  # shaped as the held-out statistics' stand-in would be
            tree = build_tree(fallback_rank_accuracy(tree.depth, ranked.shape[-1]), tree.size)
        return Drafts(fill_tree(ranked, tree.layout_on(ranked.device)), tree=tree)


# ------------------------------------------------------------------------------------------------ mask tokens
class MaskDrafter(Drafter):
    """Mask tokens: groups of k-1 masks after chain slots; group g's masks stand for the k-1 tokens after
    chain slot `first + g`.

    Speculative: a group after the last pending token and after every draft, so whatever prefix of the drafts
    the verifier keeps, the masks after it have already drafted the next block (k-1 masks per group: (1+d)(k-1)
    extra slots). ConfAdapt / static: one group after the last emitted token, as the paper decodes.

        chain (pending + drafts)      group 0           group 1        ...
        p_1 .. p_w  d_1 .. d_d   m m m (after p_w)  m m m (after d_1)  ...
    A mask sees the real tokens up to the slot it follows and the masks of its group before it; real tokens
    never see a mask, so the chain computes exactly what it would without the masks. With a draft tree the
    drafts are the tree's nodes (the masks' top candidates), a group follows every node, and a node's group
    sees what the node sees: its path.
    """

    def __init__(self, model, opts, proposer: Proposer | None = None):
        if proposer is not None:
            raise MTPError("a custom proposer drafts for parallel heads; a mask-token model drafts with its masks")
        self.model, self.opts = model, opts
        self.tree: DraftTree | DynamicTree | None = opts.tree
        spec_drafts = opts.num_draft if opts.strategy == "speculative" else None
        k = check_draft_counts(model.max_k, model.default_k, opts.k, spec_drafts, "mask-token model", flags=False)
        self.num_masks = 0 if opts.strategy == "greedy" else k - 1
        self.num_drafts = self.num_masks if opts.strategy == "speculative" else 0
        if spec_drafts is not None:
            self.num_drafts = spec_drafts
        if self.tree is not None:
            self.num_drafts = _tree_depth(self.tree, opts, self.num_masks, f"k={k} masks draft")
        self.lookahead = self.num_drafts + opts.lookup + self.num_masks
        fed = (self.tree.size if self.tree is not None else self.num_drafts) + opts.lookup
        groups = fed + 1 if opts.strategy == "speculative" else 1
        self.extra_slots = fed + groups * self.num_masks

    def forward(self, cache, pending, pending_valid, drafts: Drafts, drafting: bool = True) -> StepOutput:
        model, m = self.model, (self.num_masks if drafting else 0)
        b, w = pending.shape
        d = drafts.tokens.shape[1]
        chain = torch.cat([pending, drafts.tokens], 1)  # (B, c)
        c = w + d
        groups = (d + 1 if self.opts.strategy == "speculative" else 1) if m else 0
        first = c - groups  # chain slot the first group follows (0-based: slots first .. c-1 get groups)
        layout = mask_block_layout(c, first, groups, m, chain.device, drafts.tree or drafts.layout)
        tokens = torch.cat([chain, chain.new_full((b, groups * m), model.mask_token_id)], 1)  # (B, T)
        valid, offsets = None, layout.offsets  # (T,) every slot valid
        if not self.all_valid(w):
            chain_valid, chain_offsets = chain_positions(pending_valid, d, layout.depth)  # (B, c) each
            offsets = torch.cat([chain_offsets, chain_offsets[:, layout.follows] + layout.step], 1)  # (B, T)
            valid = torch.cat([chain_valid, chain_valid.new_ones(b, groups * m)], 1)
        is_mask = layout.is_mask if groups * m else None  # no masks: no adapters to gate
        hidden = model.block_forward(tokens, valid, cache, offsets, layout.within, is_mask)  # (B, T, H)
        verify_logits = model.lm_head(at_block_rows(hidden, pending_valid, d)).float()  # (B, 1+d, V)
        mask_hidden = hidden[:, c:].reshape(b, groups, m, hidden.shape[-1])  # (B, groups, m, H)
        return StepOutput(verify_logits, mask_hidden)

    def draft_logits(self, hidden, mode):
        return self.model.lm_head(hidden).float(), None


@dataclass
class MaskBlockLayout:
    within: torch.Tensor  # (T, T) bool: which block slots each block slot may attend to
    is_mask: torch.Tensor  # (T,) bool
    follows: torch.Tensor  # (groups * m,) chain slot each mask's group follows
    step: torch.Tensor  # (groups * m,) 1..m: how many tokens after that slot the mask stands for
    offsets: torch.Tensor  # (T,) each slot's position after the first when every chain slot is valid
    depth: torch.Tensor | None = None  # (N,) with a tree: each node's depth below the root


def mask_block_layout(chain: int, first: int, groups: int, m: int, device=None,
                      tree: DraftTree | TreeLayout | None = None) -> MaskBlockLayout:
    """A decoding block of `chain` real slots, then `groups` groups of m masks; group g follows slot first+g.
    The chain is causal, or with `tree` its last `tree.size` slots are the tree's nodes below the slot before
    them (`mtp.decoding.tree.block_layout`). A fixed tree's layout is built once per shape and shared between
    calls: read it, never write."""
    if isinstance(tree, TreeLayout):  # shaped this step, on the device
        return _mask_block_layout(chain, first, groups, m, tree.depth.device, tree)
    return _cached_mask_block_layout(chain, first, groups, m, None if device is None else str(device), tree)


@functools.lru_cache(maxsize=1024)  # a step reuses one of a few shapes
def _cached_mask_block_layout(chain, first, groups, m, device, tree):
    return _mask_block_layout(chain, first, groups, m, device, tree)


def _mask_block_layout(chain, first, groups, m, device, tree) -> MaskBlockLayout:
    t = chain + groups * m
    idx = torch.arange(t, device=device)
    follows = (first + torch.arange(groups, device=device)).repeat_interleave(m)  # (groups*m,)
    step = torch.arange(1, m + 1, device=device).repeat(groups)
    group = torch.arange(groups, device=device).repeat_interleave(m)
    within = idx[None, :] <= idx[:, None]  # causal among the chain (T, T)
    depth, chain_offsets = None, idx[:chain]
    if tree is not None:
        within[:chain, :chain], depth, chain_offsets = block_layout(chain - tree.size, tree, device)
    within[chain:, chain:] = (group[:, None] == group[None, :]) & (step[None, :] <= step[:, None])
    within[chain:, :chain] = within[follows, :chain]  # what the followed slot sees, and that slot
    within[:chain, chain:] = False  # real tokens never see a mask
    is_mask = idx >= chain
    offsets = torch.cat([chain_offsets, chain_offsets[follows] + step])  # a mask: the slot it follows + its step
    return MaskBlockLayout(within, is_mask, follows, step, offsets, depth)


# ------------------------------------------------------------------------------------------------ by model kind
DRAFTERS: dict[str, type[Drafter]] = {"parallel_heads": HeadsDrafter, "mask_tokens": MaskDrafter}


def drafter_for(model, opts, proposer: Proposer | None = None) -> Drafter:
    """The decoding drafter of a model, by its `kind`: a new method registers its drafter here."""
    try:
        cls = DRAFTERS[model.kind]
    except (AttributeError, KeyError):
        raise MTPError(f"no drafter for a model of kind {getattr(model, 'kind', type(model).__name__)!r}") from None
    return cls(model, opts, proposer)
