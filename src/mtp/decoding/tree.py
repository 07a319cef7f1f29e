"""Draft trees (Medusa / EAGLE-2 style): many candidate continuations verified in one forward.

A tree is a set of paths of candidate ranks, Medusa's notation: (0,) is the first head's best token, (1,) its
second best, (0, 2) the second head's third best after the first head's best, ... Every prefix of a path is a
path. Node i holds one token; its depth is the number of tokens after the last emitted one, so its position id
is the root's + depth, and it attends to the block's root (the last emitted token), its ancestors and itself.
The chain every other strategy uses is the tree of width 1: (0,), (0, 0), (0, 0, 0). Prompt-lookup drafts
(`mtp.decoding.lookup`) are a chain of nodes of rank -1 from the root, after the other nodes.
A shape is fixed for a run ("auto": `build_tree` from the heads' held-out accuracy per rank) or chosen anew every
step from the drafts' own probabilities (`DynamicTree`, EAGLE-2's dynamic tree); the step's tree travels with
its drafts, so verification and the cache never ask which.

Block slots (what a verify forward feeds): slot 0 is the root, slot 1 + i is node i. A fixed tree's nodes are
in depth-first order, lower ranks first (its paths sorted), so a node's ancestors always come before it - which
the cache relies on: after verification the accepted path is moved, in order, to the slots right after the root
and everything else is forgotten. And the rank-0 chain, the path most often accepted, sits where it stays: each
of its nodes attends to its keys at the slots greedy decoding will give them, summed in greedy's order, so in
bf16 (where a sum's grouping shows in the last bits) it computes what greedy computes wherever a block's rows are
computed as one-token steps' are (the static step: docs/benchmarks.md; nodes in breadth-first order matched bf16
greedy less often). A dynamic tree keeps its levels' order.

    paths                     (0,)  (0,0)  (0,0,0)  (0,1)  (1,)  (1,0)
    node                       0     1      2        3      4     5
    parent slot (0 = root)     0     1      2        1      0     5
    depth                      1     2      3        2      1     2

Verification keeps the deepest node whose whole path is accepted:
    greedy    a node is accepted when its token is the model's argmax after its parent (siblings are distinct
              tokens, so at most one path per depth survives); equals greedy decoding token for token.
    sampling  exact multi-candidate speculative sampling (SpecInfer's rule). The last of a node's children from
              the heads (its highest rank; a chain's only one) is drawn from that head's distribution outside
              its siblings' tokens, q'; the others, and lookup nodes, are deterministic (q one-hot at the
              token). At the current node (residual r: first p, the model's distribution there) the one-hot
              children are tried first: child x is taken with probability r(x), and if refused r(x) is set to
              0 and r renormalised; then the drawn child x, taken with probability min(1, r(x)/q'(x)), refused:
              r = max(r - q', 0) renormalised; when every child is refused the token is drawn from r (a q'
              with no mass drew nothing: that node holds a filler, refused). That is
              a sample of p exactly, whatever the candidates are. A chain keeps its drafts as Leviathan et
              al.'s rule does; a wide node keeps the heads' best tokens and draws one more from what they leave
              (on the default model's trained heads this kept more than all one-hot or a drawn best token at
              every width: docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtp.decoding.sampling import race, sample
from mtp.errors import MTPError
from mtp.io import read_text

Path_ = tuple[int, ...]


@dataclass(frozen=True)
class DraftTree:
    paths: tuple[Path_, ...]  # sorted: depth first, lower ranks first (the rank-0 chain first; module docstring)

    def __post_init__(self):
        """`DraftTree(paths)` as `from_paths` would check it (which also sorts them): tuples of ranks, each path's
        parent in the tree (lookup nodes, rank `LOOKUP_RANK`, come from `with_lookup`)."""
        paths = self.paths
        if not isinstance(paths, tuple) or not paths or not all(
                isinstance(p, tuple) and p and all(isinstance(r, int) and r >= LOOKUP_RANK for r in p) for p in paths):
            raise MTPError(f"DraftTree takes a tuple of paths, each a tuple of ranks >= 0, not {paths!r}; "
                           "DraftTree.from_paths([[0], [1], [0, 0]]) takes lists and sorts them")
        known = set(paths)
        for p in paths:
            if len(p) > 1 and p[:-1] not in known:
                raise MTPError(f"tree path {list(p)} has no parent {list(p[:-1])} in the tree")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> DraftTree:
        clean = sorted({tuple(int(r) for r in p) for p in paths})  # depth-first: see the module docstring
        if not clean:
            raise MTPError("a draft tree needs at least one path")
        known = set(clean)
        for p in clean:
            if not p or min(p) < 0:
                raise MTPError(f"tree path {list(p)}: ranks are >= 0 and a path has at least one")
            if len(p) > 1 and p[:-1] not in known:
                raise MTPError(f"tree path {list(p)} has no parent {list(p[:-1])} in the tree")
        return cls(tuple(clean))

    @classmethod
    def chain(cls, depth: int) -> DraftTree:
        return cls.from_paths([(0,) * i for i in range(1, depth + 1)])

    @staticmethod
    def with_lookup(base: DraftTree | None, length: int) -> DraftTree:
        """`base` (None: no other drafts) and a chain of `length` lookup nodes from the root, after base's nodes
        (`mtp.decoding.lookup`). A lookup node's rank is LOOKUP_RANK: no head proposes it."""
        return _with_lookup(base, length)

    # ---------------------------------------------------------------- structure
    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def is_chain(self) -> bool:
        return all(r == 0 for p in self.paths for r in p) and self.size == self.depth

    def widths(self) -> list[int]:
        """Candidates (top-k) each head must give: 1 + the largest rank used at each depth."""
        out: list[int] = []
        for p in self.paths:  # plain loops: a traced step (tests/decoding/test_graphs.py) reads this too
            if p[-1] != LOOKUP_RANK:
                out.extend([0] * (len(p) - len(out)))
                out[len(p) - 1] = max(out[len(p) - 1], p[-1] + 1)
        return out

    def truncate(self, depth: int) -> DraftTree:
        """The nodes of depth <= `depth` (>= 1)."""
        return _truncated(self, max(1, depth))

    @property
    def layout(self) -> TreeLayout:
        """The tree's tensors on the CPU."""
        return _layout_on(self, "cpu")

    def layout_on(self, device) -> TreeLayout:
        """The tree's tensors on `device`, built once (a decoding step must not copy them again)."""
        return _layout_on(self, str(torch.device(device)))

    def to_json(self) -> list[list[int]]:
        return [list(p) for p in self.paths]


LOOKUP_RANK = -1  # the rank of a lookup node in a tree's paths: (-1,), (-1, -1), ...


@functools.lru_cache(maxsize=1024)  # a few shapes per run (a dynamic tree: a few hundred), layouts stay cached
def _with_lookup(base: DraftTree | None, length: int) -> DraftTree:
    lookup = tuple((LOOKUP_RANK,) * i for i in range(1, length + 1))
    return DraftTree((base.paths if base is not None else ()) + lookup)


@functools.lru_cache(maxsize=1024)
def _truncated(tree: DraftTree, depth: int) -> DraftTree:
    if depth >= tree.depth:
        return tree
    return DraftTree(tuple(p for p in tree.paths if len(p) <= depth))


@dataclass(frozen=True, eq=False)
class TreeLayout:
    """A tree's tensors on the decoding device, N nodes of depth at most D (slot 0: root, slot 1 + i: node i),
    from each node's parent, depth and rank (`tree_layout`): once for a fixed tree, on the device every step for a
    dynamic one, so a decoding step never copies a tree from the host. What verification reads (ancestors, paths,
    children) is derived on first use, in ops whose shapes depend only on (N, D): a dynamic tree's step builds
    three layouts (its drafts' shape, then with the lookup chain) and verifies with one."""

    parent_slot: torch.Tensor  # (N,) slot of each node's parent (0: the root; a parent comes before its children)
    depth: torch.Tensor  # (N,) 1..D
    rank: torch.Tensor  # (N,) the node's candidate rank at its depth (LOOKUP_RANK: a lookup node)
    max_depth: int  # D
    max_children: int | None = None  # C below (None: N)
    # what has been derived, by name (a plain dict: torch.compile traces it, not functools.cached_property)
    derived: dict = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        return self.parent_slot.shape[0]

    def _once(self, name: str, make) -> torch.Tensor:
        value = self.derived.get(name)
        if value is None:
            value = self.derived[name] = make()
        return value

    @property
    def ancestors(self) -> torch.Tensor:
        """(N, N) bool: [i, j] node j is node i or one of its ancestors."""
        return self._once("ancestors", self._ancestors)

    @property
    def on_path_of(self) -> torch.Tensor:
        """(N, N) float: ancestors transposed; (B, N) failures @ it counts the failures on each node's path."""
        return self._once("on_path_of", lambda: self.ancestors.T.float())

    @property
    def slot_depth(self) -> torch.Tensor:
        """(1+N,) each block slot's depth: 0 the root, then the nodes'."""
        return self._once("slot_depth", lambda: torch.cat([self.depth.new_zeros(1), self.depth]))

    @property
    def path(self) -> torch.Tensor:
        """(N, D) nodes from depth 1 to the node's depth, then repeats of the node."""
        return self._once("path", self._path)

    @property
    def children(self) -> torch.Tensor:
        """(1+N, C) child slots of each slot in rank order (lookup nodes last), -1 padded (exact tree sampling walks
        them: the heads' children before lookup ones, the drawn one - the highest rank - last of those)."""
        return self._once("children", self._children)

    def _ancestors(self) -> torch.Tensor:
        # reach[i, j] > 0: node j is node i or an ancestor at most 2^k generations up, after k squarings (a path
        # count: small whole numbers, exact in fp32); log2(D) small matmuls, not D passes (a dynamic tree's
        # layout is built every step)
        eye = torch.eye(self.size + 1, device=self.parent_slot.device)  # slots: the root, then the nodes
        reach = eye[1:, 1:] + eye[self.parent_slot][:, 1:]  # itself and its parent (the root is no node)
        for _ in range(max(self.max_depth - 2, 0).bit_length()):  # D - 1 generations at most
            reach = reach @ reach
        return reach > 0

    def _path(self) -> torch.Tensor:
        n, device = self.size, self.parent_slot.device
        levels = torch.arange(1, self.max_depth + 1, device=device)
        at_level = self.ancestors[:, None, :] & (self.depth[None, None, :] == levels[None, :, None])  # (N, D, N)
        return torch.where(at_level.any(-1), at_level.float().argmax(-1), torch.arange(n, device=device)[:, None])

    def _children(self) -> torch.Tensor:
        n, device = self.size, self.parent_slot.device
        slots = torch.arange(1 + n, device=device)
        # children first, in rank order (lookup nodes last), then node order
        rank = torch.where(self.rank == LOOKUP_RANK, n, self.rank)  # (N,)
        none = (n + 1) * n  # above every child's key
        key = torch.where(self.parent_slot[None, :] == slots[:, None], (rank * n + torch.arange(n, device=device)), none)
        order = key.sort(-1).values[:, : self.max_children or n]  # (1+N, C)
        return torch.where(order < none, order % n + 1, -1)

    def drawn_and_siblings(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """((N,) bool: the node is the last of its parent's children from the heads - their highest rank - which
        sampling draws; (N, width) bool: the ranks of its head siblings)."""
        return self._once(f"drawn_{width}", lambda: self._drawn_and_siblings(width))

    def _drawn_and_siblings(self, width: int):
        n, device = self.size, self.parent_slot.device
        head = self.rank != LOOKUP_RANK  # (N,)
        family = (self.parent_slot[:, None] == self.parent_slot[None, :]) & head[None, :] & head[:, None]  # (N, N)
        family &= ~torch.eye(n, dtype=torch.bool, device=device)
        drawn = head & ~(family & (self.rank[None, :] > self.rank[:, None])).any(-1)
        ranks = torch.arange(width, device=device)
        siblings = (family[:, :, None] & (self.rank[None, :, None] == ranks)).any(1)  # (N, W)
        return drawn, siblings

    @property
    def within(self) -> torch.Tensor:
        """(1+N, 1+N) bool: block slot q may attend to block slot kv (the root, its ancestors, itself)."""
        return block_layout(1, self)[0]


def tree_layout(parent_slot: torch.Tensor, depth: torch.Tensor, rank: torch.Tensor, max_depth: int,
                max_children: int | None = None) -> TreeLayout:
    """The layout of N nodes given each one's parent slot (0: the root; a parent always comes before its
    children), depth and rank; what is derived from them is computed when first read (`TreeLayout`)."""
    return TreeLayout(parent_slot, depth, rank, max_depth, max_children)


@functools.lru_cache(maxsize=1024)
def _layout_on(tree: DraftTree, device: str) -> TreeLayout:
    index = {p: i for i, p in enumerate(tree.paths)}
    parent = [0 if len(p) == 1 else 1 + index[p[:-1]] for p in tree.paths]
    kids = max(parent.count(s) for s in range(1 + tree.size))
    as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
    layout = tree_layout(as_tensor(parent), as_tensor([len(p) for p in tree.paths]),
                         as_tensor([p[-1] for p in tree.paths]), tree.depth, kids)
    # A fixed tree's ancestors from its paths, on the host: a compiled step (which traces through this function's
    # cache) then holds them as a constant instead of squaring a matrix on the device every step.
    layout.derived["ancestors"] = torch.tensor([[q == p[:len(q)] for q in tree.paths] for p in tree.paths],
                                               dtype=torch.bool, device=device)
    return layout


# ------------------------------------------------------------------------------------------------ tree shapes
def build_tree(rank_accuracy: Sequence[Sequence[float]], size: int) -> DraftTree:
    """The tree of `size` nodes with the largest expected accepted length (Medusa's greedy construction).

    rank_accuracy[h][r]: how often head h+1's rank-r candidate is the right token (held-out, marginal). A path's
    chance of being accepted in full is taken as the product of its ranks' accuracies, so the expected accepted
    length is the sum of the chances of its nodes; adding nodes best-first keeps every parent before its
    children (a child's chance never exceeds its parent's), which makes the greedy tree optimal for that model.
    """
    if size < 1:
        raise MTPError(f"tree size must be >= 1, got {size}")
    if not rank_accuracy or not all(len(r) for r in rank_accuracy):
        raise MTPError("building a tree needs each head's accuracy per candidate rank")
    heap: list[tuple[float, Path_]] = [(-rank_accuracy[0][r], (r,)) for r in range(len(rank_accuracy[0]))]
    heapq.heapify(heap)
    chosen: list[Path_] = []
    while heap and len(chosen) < size:
        neg, p = heapq.heappop(heap)
        chosen.append(p)
        if len(p) < len(rank_accuracy):
            heads = rank_accuracy[len(p)]
            for r in range(len(heads)):
                heapq.heappush(heap, (neg * heads[r], p + (r,)))
    return DraftTree.from_paths(chosen)


@dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2's dynamic draft tree: a new shape every step, the `size` nodes with the largest chance of being
    accepted by the drafts' own probabilities at that step (`build_tree` over this step's top-k probabilities,
    averaged over the batch rows, which share one tree) instead of one shape from held-out statistics. When
    the first draft is sure the tree goes deep; when it is not, it spends the nodes on alternatives. Any shape
    is verified exactly, so output stays identical to greedy decoding (and exact when sampling)."""

    size: int  # nodes per step at most
    depth: int  # draft positions at most

    def truncate(self, depth: int) -> DynamicTree:
        return DynamicTree(self.size, max(1, min(self.depth, depth)))

    def widths(self) -> list[int]:
        """Candidates each head must rank: a node of a `size`-node tree has a rank below `size`."""
        return [self.size] * self.depth

    def for_step(self, top_probs: torch.Tensor) -> TreeLayout:
        """This step's tree from top_probs (B, D, W), each row's draft probabilities of its top-W candidates at
        depths 1..D, on their device and with no host copy (`build_tree`'s result, in fixed-shape ops)."""
        return dynamic_tree(top_probs.float().mean(0), self.size)


def dynamic_tree(rank_probs: torch.Tensor, size: int) -> TreeLayout:
    """The `size` paths of candidate ranks with the largest product of `rank_probs` (D, W) along them - the tree
    `build_tree` picks best-first - found depth by depth: the best `size` paths of depth h + 1 extend the best
    `size` of depth h (a path never scores above its parent, so none of the overall best is missed)."""
    depths, width = rank_probs.shape
    levels, depth, slots = _candidates(size, depths, width, str(rank_probs.device))
    logp = rank_probs.clamp_min(1e-30).log()
    scores, parents, ranks = [], [], []
    for h, (parent, rank) in enumerate(levels):  # candidates of depth h + 1: every kept path of depth h x every rank
        level = logp[0] if h == 0 else (scores[-1][:, None] + logp[h][None, :]).flatten()
        top = level.topk(min(size, level.shape[0])).indices
        scores.append(level[top])
        parents.append(parent[top])
        ranks.append(rank[top])
    parent = torch.cat(parents)  # (M,) each candidate's parent among all M (-1: the root)
    score = torch.cat(scores)  # (M,) by depth: a parent comes before its children, which never score above it
    # (a + logp <= a in any rounding); a stable sort keeps a parent before a child that ties it (a probability
    # that rounds to 1, or to 0 beside a draft vocabulary smaller than the tree), so each chosen node's parent is
    # chosen (a tiny cost per depth did not: in fp32 it vanishes beside a score of -8 or less)
    chosen = score.sort(descending=True, stable=True).indices[: min(size, score.shape[0])]
    chosen = chosen[depth[chosen].sort(stable=True).indices]  # by depth, best first within a depth
    slot_of = torch.zeros(score.shape[0] + 1, dtype=torch.long, device=rank_probs.device)  # candidate -> slot (+1)
    slot_of[chosen + 1] = slots[: chosen.shape[0]]
    parent_slot = slot_of[parent[chosen] + 1]  # parent -1 (the root) -> slot_of[0] = 0
    return tree_layout(parent_slot, depth[chosen], torch.cat(ranks)[chosen], depths)


@functools.lru_cache(maxsize=64)
def _candidates(size: int, depths: int, width: int, device: str):
    """What `dynamic_tree` reads that depends only on its shapes, built once: per depth, each candidate's parent
    (an index into the candidates of all depths, -1 the root) and rank; each candidate's depth; the slot numbers
    1..size."""
    levels, depth, start, kept = [], [], 0, 0  # kept: candidates of the depth before that stay
    for h in range(depths):
        if h == 0:
            parent, rank = torch.full((width,), -1, dtype=torch.long), torch.arange(width)
        else:
            parent = (start - kept) + torch.arange(kept).repeat_interleave(width)
            rank = torch.arange(width).repeat(kept)
        kept = min(size, parent.shape[0])
        start += kept
        levels.append((parent.to(device), rank.to(device)))
        depth.append(torch.full((kept,), h + 1, dtype=torch.long))
    depth = torch.cat(depth).to(device)
    return tuple(levels), depth, torch.arange(1, size + 1, device=device)


def layout_paths(layout: TreeLayout) -> tuple[Path_, ...]:
    """The paths of candidate ranks a layout holds, node by node (host-side: tests and reports)."""
    parent, rank = layout.parent_slot.tolist(), layout.rank.tolist()
    paths: list[Path_] = []
    for i in range(len(parent)):
        paths.append((paths[parent[i] - 1] if parent[i] else ()) + (rank[i],))
    return tuple(paths)


def ranked_tree_drafts(logits: torch.Tensor, tree: DraftTree | DynamicTree,
                       vocab: torch.Tensor | None = None) -> tuple[torch.Tensor, TreeLayout]:
    """The node tokens (B, N) and the layout they fill, from draft logits (B, D, V) at depths 1..D (over the token
    ids `vocab` (K,) when given): each depth's ranked candidates; a `DynamicTree` is shaped from their
    probabilities first."""
    tokens, layout, _ = _ranked(logits, tree, vocab)
    return tokens, layout


def _ranked(logits, tree, vocab):
    if isinstance(tree, DynamicTree):
        top_probs, ranked = torch.softmax(logits.float(), -1).topk(min(tree.size, logits.shape[-1]), -1)  # (B, D, W)
        layout = tree.for_step(top_probs)
    else:
        ranked = logits.topk(max(tree.widths()), -1).indices  # (B, D, W)
        layout = tree.layout_on(logits.device)
    if vocab is not None:
        ranked = vocab[ranked]
    return fill_tree(ranked, layout), layout, ranked


def sampled_tree_drafts(logits: torch.Tensor, probs: torch.Tensor, sampled: torch.Tensor,
                        tree: DraftTree | DynamicTree, generator) -> tuple[torch.Tensor, TreeLayout]:
    """`ranked_tree_drafts` of full-vocabulary draft logits (B, D, V) for rows that sample (`sampled` (B,) bool):
    the last of every node's children from the heads (its highest rank) is drawn from its depth's distribution
    `probs` (B, D, V) outside its siblings' tokens (the heads' better-ranked ones), the others are those tokens
    (see the module docstring: verified with the rule of `verify_tree_sampling`). A chain's drafts are all drawn
    from their heads. One exponential race per depth serves every node there (a node's draw: the first of the
    race's winners that is not a sibling's token); nodes at one depth have different parents, only one of which
    is ever on the kept path."""
    tokens, layout, ranked = _ranked(logits, tree, None)
    w = ranked.shape[-1]
    drawn, siblings = layout.drawn_and_siblings(w)  # (N,) bool, (N, W) bool
    winners = race(probs, generator).topk(w, -1).indices  # (B, D, W): the race's winners, best first (the first: a draw of probs)
    at = layout.depth - 1  # (N,)
    taken = torch.where(siblings, ranked[:, at], -1)  # (B, N, W) the siblings' tokens
    free = ~(winners[:, at, :, None] == taken[:, :, None, :]).any(-1)  # (B, N, W) winners no sibling holds
    draw = winners[:, at].gather(2, free.float().argmax(-1, keepdim=True)).squeeze(2)  # (B, N)
    return torch.where(drawn & sampled[:, None], draw, tokens), layout


def fill_tree(ranked: torch.Tensor, layout: TreeLayout) -> torch.Tensor:
    """Node tokens (B, N) from ranked candidates (B, D, W) per depth (W above every node's rank): node i takes
    the candidate of its rank at its depth."""
    b, d, w = ranked.shape
    index = layout._once(f"fill_index_{w}", lambda: (layout.depth - 1) * w + layout.rank.clamp_min(0))  # (N,)
    return ranked.reshape(b, d * w)[:, index]  # (a fixed tree's index is computed once)


def expected_length(tree: DraftTree, rank_accuracy: Sequence[Sequence[float]]) -> float:
    """Expected accepted drafts per step under `build_tree`'s independence model."""
    total = 0.0
    for p in tree.paths:
        chance = 1.0
        for depth, r in enumerate(p):
            accuracy = rank_accuracy[depth]
            chance *= accuracy[r] if 0 <= r < len(accuracy) else 0.0
        total += chance
    return total


TREE_STATS_KEY = "head_rank_accuracy"  # in a trained folder's eval.json: per extra head, accuracy per rank


def rank_accuracy_from_folder(folder: str | Path, num_drafts: int) -> list[list[float]] | None:
    """The per-head, per-rank held-out accuracy `mtp train` wrote into the folder's eval.json, if any."""
    path = Path(folder) / "eval.json"
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8")).get(TREE_STATS_KEY)
    except (ValueError, AttributeError):
        return None
    if not isinstance(stats, list) or len(stats) < num_drafts:
        return None
    return [[float(x) for x in head] for head in stats[:num_drafts]]


def fallback_rank_accuracy(num_drafts: int, ranks: int = 8) -> list[list[float]]:
    """A stand-in when a folder has no measured statistics: accuracy falls with depth and halves per rank."""
    return [[0.6 * 0.75 ** h * 0.5 ** r for r in range(ranks)] for h in range(num_drafts)]


DEFAULT_TREE_SIZE = 16  # nodes of an "auto" or "dynamic" tree given without a size


def resolve_tree(spec: str | DraftTree | DynamicTree | None, size: int | None, num_drafts: int,
                 folder: str | Path | None, ranks: int | None = None) -> DraftTree | DynamicTree | None:
    """A `--tree` value -> a tree (None: the plain chain, no tree machinery).

    "chain": None; "auto": `build_tree` of `size` nodes (default `DEFAULT_TREE_SIZE`) from the folder's measured
    accuracy per rank (eval.json written by `mtp train`), or a stand-in when there is none, from the first `ranks`
    candidates a head ranks (a small draft vocabulary has fewer than the tree's nodes); "dynamic": a
    `DynamicTree` of `size` nodes, shaped every step from the drafts' probabilities; a .json file: a list of
    paths; a JSON list literal: the same inline.
    """
    if spec is None or isinstance(spec, DraftTree | DynamicTree):
        return spec
    if not isinstance(spec, str):
        raise MTPError(f"tree must be 'auto', 'dynamic', 'chain', a JSON list of paths, a .json file or a DraftTree, "
                       f"got {type(spec).__name__} {spec!r}")
    if num_drafts < 1:
        raise MTPError("a draft tree needs at least one draft position (a model with extra heads)")
    if spec == "chain":
        return None
    if spec == "dynamic":
        return DynamicTree(size or DEFAULT_TREE_SIZE, num_drafts)
    if spec == "auto":
        stats = rank_accuracy_from_folder(folder, num_drafts) if folder is not None else None
        stats = stats or fallback_rank_accuracy(num_drafts)
        return build_tree([row[:ranks] for row in stats] if ranks else stats, size or DEFAULT_TREE_SIZE)
    text = spec
    if not spec.lstrip().startswith("["):
        path = Path(spec)
        if not path.is_file():
            raise MTPError(f"--tree {spec}: not 'auto', 'dynamic', 'chain', a JSON list of paths or a .json file")
        text = read_text(path)
    try:
        paths = json.loads(text)
    except ValueError as e:
        raise MTPError(f"--tree {spec}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(paths, list) or not all(isinstance(p, list) and all(isinstance(r, int) for r in p)
                                              for p in paths):
        raise MTPError(f"--tree {spec}: expected a list of paths, each a list of candidate ranks")
    tree = DraftTree.from_paths(paths)
    if tree.depth > num_drafts:
        raise MTPError(f"--tree has depth {tree.depth}, but the model drafts at most {num_drafts} "
                       f"token{'' if num_drafts == 1 else 's'} ahead")
    if size is not None and tree.size > size:
        raise MTPError(f"--tree has {tree.size} nodes, more than --tree-size {size}")
    return tree


# ------------------------------------------------------------------------------------------------ verification
@dataclass
class Acceptance:
    """What a verifier kept of one step's drafts (a chain is the tree of width 1: `path` None)."""

    count: torch.Tensor  # (B,) accepted drafts (the depth of the kept node)
    last: torch.Tensor  # (B,) the model's own token after them
    slot: torch.Tensor  # (B,) block slot of the last kept token: 0 the root (nothing accepted), i draft i
    path: torch.Tensor | None  # (B, D) tree nodes of the kept path, depth 1.. (past `count`: repeats)

    def path_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The drafts along the kept path (B, D); only the first `count` of each row are accepted."""
        return tokens if self.path is None else tokens.gather(1, self.path)

    def scoring_slots(self, width: int) -> torch.Tensor:
        """(B, width) the block slot whose logits scored each emitted token: the root's for the first, then each
        kept draft's (past `count`: unused)."""
        if self.path is None:  # a chain: draft i is slot i
            return torch.arange(width, device=self.count.device).expand(self.count.shape[0], -1)
        return torch.cat([torch.zeros_like(self.path[:, :1]), self.path[:, : width - 1] + 1], 1)

    def where(self, rows: torch.Tensor, other: Acceptance) -> Acceptance:
        """This acceptance for `rows` (B,) bool, `other`'s for the rest (a batch whose rows verify differently)."""
        def pick(a, b):
            return a if a is None else torch.where(rows[:, None] if a.dim() == 2 else rows, a, b)

        return Acceptance(*(pick(getattr(self, f), getattr(other, f)) for f in ("count", "last", "slot", "path")))

    def kept_nodes(self, num_drafts: int) -> torch.Tensor:
        """(B, num_drafts) bool: which fed drafts stay in the sequence."""
        b, device = self.count.shape[0], self.count.device
        on_path = torch.arange(self.path.shape[1] if self.path is not None else num_drafts, device=device)
        on_path = on_path[None, :] < self.count[:, None]  # (B, D)
        if self.path is None:
            return on_path
        kept = torch.zeros(b, num_drafts, dtype=torch.long, device=device)
        return kept.scatter_add_(1, self.path, on_path.long()) > 0


def verify_tree(logits: torch.Tensor, tokens: torch.Tensor, layout: TreeLayout,
                target: torch.Tensor | None = None) -> Acceptance:
    """Greedy: the deepest path of nodes that each equal the model's own token after their parent. logits: (B, 1+N,
    V) the model's next-token logits at the root and at every node; tokens: (B, N); target: their argmax (B, 1+N)
    where the caller has it."""
    target = target if target is not None else logits.argmax(-1)  # (B, 1+N)
    ok = tokens == target[:, layout.parent_slot]  # (B, N)
    # A node is accepted when no node on its path failed: count the failures among its ancestors.
    failures = (~ok).float() @ layout.on_path_of  # (B, N)
    score = torch.where(failures == 0, layout.depth, 0)  # (B, N) depth of accepted nodes, else 0
    count, node = score.max(-1)  # (B,), (B,): the first deepest accepted node (best ranks come first)
    slot = torch.where(count > 0, node + 1, 0)
    last = target.gather(1, slot[:, None]).squeeze(1)
    return Acceptance(count, last, slot, layout.path[node])


def verify_tree_sampling(probs: torch.Tensor, tokens: torch.Tensor, layout: TreeLayout, generator,
                         draft_probs: torch.Tensor | None = None) -> Acceptance:
    """probs: (B, 1+N, V) the model's processed distributions; draft_probs: (B, D, V) the heads' distributions at
    depths 1..D, which each node's last head child was drawn from outside its siblings' tokens
    (`sampled_tree_drafts`; None: every node a one-hot candidate). See the module docstring for the rule. A fixed
    number of tensor ops a depth, no host reads: a row whose walk has stopped just stops moving.

    A node's one-hot children are judged at once: trying them in turn takes child j with probability
    r(x_j) / (mass left after the refused ones), so child j is taken with probability r(x_j) / mass overall - one
    uniform draw against the running sum of r over the children (a token met twice counts once). The drawn child
    comes last. The residual is kept unnormalised, with its mass."""
    b, device = tokens.shape[0], tokens.device
    rows = torch.arange(b, device=device)
    children = layout.children  # (1+N, C): the heads' in rank order, then lookup nodes
    c = children.shape[1]
    before = layout._once("before", lambda: torch.ones(c, c, device=device).tril(-1))  # (C, C) [j, i]: i < j
    columns = torch.arange(c, device=device)
    slot_tokens = torch.cat([tokens.new_zeros(b, 1), tokens], 1)  # (B, 1+N): a token per block slot
    cur = torch.zeros(b, dtype=torch.long, device=device)  # current slot
    active = torch.ones(b, dtype=torch.bool, device=device)
    count = torch.zeros(b, dtype=torch.long, device=device)
    residual = probs[:, 0].float().clone()  # (B, V) unnormalised
    mass = residual.sum(-1)  # (B,)
    for _ in range(layout.max_depth):
        kids = children[cur]  # (B, C) child slots, -1 none
        node = (kids - 1).clamp_min(0)  # (B, C)
        open_ = active[:, None] & (kids >= 0)  # (B, C)
        x = slot_tokens.gather(1, kids.clamp_min(0))  # (B, C)
        hot = open_  # the one-hot children
        if draft_probs is not None:  # the last head child (a chain's only one) was drawn: it comes last
            head = open_ & (layout.rank[node] != LOOKUP_RANK)
            drawn = head & (columns == head.sum(-1, keepdim=True) - 1)  # (B, C)
            hot = open_ & ~drawn
        # one-hot children: child j taken where a uniform over the mass falls in r(x_j)'s share of the running sum
        repeat = ((x[:, :, None] == x[:, None, :]) & hot[:, None, :]).float().mul(before).sum(-1) > 0
        share = torch.where(hot & ~repeat, residual.gather(1, x), 0.0)  # (B, C)
        u = torch.rand(b, generator=generator, device=device)[:, None] * mass[:, None]  # (B, 1)
        hit = u < share.cumsum(-1)  # (B, C) true from the chosen child on
        took = hit.any(-1)
        nxt = kids.gather(1, hit.float().argmax(-1, keepdim=True)).squeeze(1)  # the first such child
        refused = active & ~took  # every one-hot child refused: r(x) = 0 for each of them
        residual.scatter_(1, x, _zeroed_at(residual, x, refused[:, None] & hot))
        mass = torch.where(refused, mass - share.sum(-1), mass)
        if draft_probs is not None:  # then the drawn child x ~ q' (q outside its siblings' tokens): kept with
            # probability min(1, r(x)/q'(x)) of the normalised residual; refused, r = max(r - q', 0)
            has = refused & drawn.any(-1)
            col = drawn.float().argmax(-1, keepdim=True)  # (B, 1)
            depth = layout.depth[node.gather(1, col).squeeze(1)]  # (B,)
            q = draft_probs[rows, (depth - 1).clamp_max(draft_probs.shape[1] - 1)].float()  # (B, V)
            q = q.scatter(1, x, _zeroed_at(q, x, head & ~drawn))  # q', unnormalised
            z = q.sum(-1).clamp_min(1e-30)  # (B,)
            x_d = x.gather(1, col).squeeze(1)
            u = torch.rand(b, generator=generator, device=device)
            # u < (r/mass) / (q'/z); q' with no mass (q inside its siblings' tokens: a top-k, top-p, min-p or
            # draft vocabulary that small) drew no token, only a filler, which is refused (r stays as it is)
            q_d = q[rows, x_d]
            kept = has & (q_d > 0) & (u * q_d * mass < residual[rows, x_d] * z)
            less = torch.addcmul(residual, q, (mass / z)[:, None], value=-1).clamp_min_(0)
            residual = torch.where((has & ~kept)[:, None], less, residual)
            mass = torch.where(has & ~kept, less.sum(-1), mass)
            nxt = torch.where(kept, kids.gather(1, col).squeeze(1), nxt)
            took |= kept
        cur = torch.where(took, nxt, cur)
        # rows that moved start afresh from their new node's p; the others keep their residual
        residual = torch.where(took[:, None], probs[rows, cur].float(), residual)
        mass = torch.where(took, residual.sum(-1), mass)
        count += took.long()
        active &= took
    # Rounding can leave a refused row without mass; p at the current node is then the answer (mass 0 exactly
    # has probability 0 in exact arithmetic). `sample` takes unnormalised weights.
    empty = (residual.sum(-1) <= 0) | (mass <= 0)
    residual = torch.where(empty[:, None], probs[rows, cur].float(), residual)
    node = (cur - 1).clamp_min(0)
    return Acceptance(count, sample(residual, generator), cur, layout.path[node])


def _zeroed_at(t: torch.Tensor, x: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """What `t` (B, V) scatters at `x` (B, C) to hold 0 at the tokens of the columns `zero` (B, C) and keep its
    values elsewhere: a token that several columns hold gets one value from all of them."""
    zeroed = ((x[:, :, None] == x[:, None, :]) & zero[:, None, :]).any(-1)  # (B, C)
    return torch.where(zeroed, 0.0, t.gather(1, x))


def tree_candidates(topk_tokens: Sequence[torch.Tensor], tree: DraftTree) -> torch.Tensor:
    """Node tokens (B, N) from each head's ranked candidates: topk_tokens[h] (B, widths[h])."""
    width = max(c.shape[1] for c in topk_tokens)
    ranked = torch.stack([torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in topk_tokens], 1)
    return fill_tree(ranked, tree.layout_on(ranked.device))


def block_layout(pending: int, layout: TreeLayout | DraftTree,
                 device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(within (w+N, w+N) bool, node depth (N,), offsets (w+N,)) for a block of `pending` chain slots then the
    tree's nodes, whose root is the last pending slot; `offsets`: each slot's position after the first when every
    pending slot is valid (a node sits at its root's position + its depth). A fixed tree's is built once per
    pending width."""
    if isinstance(layout, DraftTree):
        return _block_layout(pending, layout, str(torch.device(device or "cpu")))
    return _within(pending, layout), layout.depth, _offsets(pending, layout)


@functools.lru_cache(maxsize=1024)
def _block_layout(pending: int, tree: DraftTree, device: str):
    layout = tree.layout_on(device)
    return _within(pending, layout), layout.depth, _offsets(pending, layout)


def _offsets(w: int, layout: TreeLayout) -> torch.Tensor:
    return torch.cat([torch.arange(w, device=layout.depth.device), layout.depth + (w - 1)])


def _within(w: int, layout: TreeLayout) -> torch.Tensor:
    n, device = layout.size, layout.depth.device
    causal = torch.ones(w, w, dtype=torch.bool, device=device).tril()
    top = torch.cat([causal, torch.zeros(w, n, dtype=torch.bool, device=device)], 1)  # pending never see a node
    bottom = torch.cat([torch.ones(n, w, dtype=torch.bool, device=device), layout.ancestors], 1)  # all pending
    return torch.cat([top, bottom])
