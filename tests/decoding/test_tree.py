"""Draft trees: layout against hand-written trees, tree speculative == greedy, exact sampling, tree shapes."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mask_decoding import mask_model

from conftest import assert_first_two_tokens_follow_the_model, tiny_mtp
from mtp.decoding.generate import DraftRequest, generate, left_pad
from mtp.decoding.reference import reference_greedy
from mtp.decoding.tree import (
    TREE_STATS_KEY,
    DraftTree,
    DynamicTree,
    block_layout,
    build_tree,
    dynamic_tree,
    expected_length,
    layout_paths,
    ranked_tree_drafts,
    resolve_tree,
    sampled_tree_drafts,
    tree_candidates,
    tree_layout,
    verify_tree,
    verify_tree_sampling,
)
from mtp.errors import MTPError
from mtp.models.cache import MTPCache

# The module docstring's example, in node order (depth first, rank 0 first: the rank-0 chain comes first).
EXAMPLE = [(0,), (0, 0), (0, 0, 0), (0, 1), (1,), (1, 0)]


def test_tree_tensors_match_the_hand_written_tree():
    tree = DraftTree.from_paths(reversed(EXAMPLE))  # any order in, sorted by depth then rank
    t = tree.layout
    assert tree.paths == tuple(EXAMPLE) and tree.size == 6 and tree.depth == 3 and tree.widths() == [2, 2, 1]
    assert t.parent_slot.tolist() == [0, 1, 2, 1, 0, 5]
    assert t.depth.tolist() == [1, 2, 3, 2, 1, 2]
    assert t.rank.tolist() == [0, 0, 0, 1, 1, 0]
    assert t.path.tolist() == [[0, 0, 0], [0, 1, 1], [0, 1, 2], [0, 3, 3], [4, 4, 4], [4, 5, 5]]
    assert t.children.tolist() == [[1, 5], [2, 4], [3, -1], [-1, -1], [-1, -1], [6, -1], [-1, -1]]
    assert layout_paths(t) == tree.paths
    # slot q sees kv: the root, its ancestors, itself; the rank-0 chain (slots 1-3) sees what greedy's tokens will
    sees = {q: [kv for kv in range(7) if t.within[q, kv]] for q in range(7)}
    assert sees == {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 4], 5: [0, 5], 6: [0, 5, 6]}


@settings(max_examples=60, deadline=None)
@given(parents=st.lists(st.integers(0, 40), min_size=1, max_size=40))
def test_ancestors_and_paths_follow_the_parents(parents):
    """Any tree (node i's parent drawn among the root and nodes before it): a node's ancestors and path, derived
    in a few tensor ops, are those found by walking its parents."""
    parent = [p % (i + 1) for i, p in enumerate(parents)]  # a slot before node i's own (0: the root)
    depth = []
    for p in parent:
        depth.append(1 if p == 0 else depth[p - 1] + 1)
    layout = tree_layout(torch.tensor(parent), torch.tensor(depth), torch.zeros(len(parent), dtype=torch.long),
                         max(depth))
    for i in range(len(parent)):
        line, j = [], i  # node i and its ancestors, deepest first
        while True:
            line.append(j)
            if parent[j] == 0:
                break
            j = parent[j] - 1
        assert layout.ancestors[i].nonzero().flatten().tolist() == sorted(line), i
        assert layout.path[i].tolist() == line[::-1] + [i] * (max(depth) - len(line)), i


def test_block_layout_puts_the_tree_after_the_pending_tokens():
    tree = DraftTree.from_paths(EXAMPLE)
    within, depth, offsets = block_layout(2, tree)
    assert within.shape == (8, 8) and depth.tolist() == [1, 2, 3, 2, 1, 2]
    assert offsets.tolist() == [0, 1, 2, 3, 4, 3, 2, 3]  # the pending tokens, then each node at root + depth
    assert within[:2, :2].tolist() == [[True, False], [True, True]]
    assert not within[:2, 2:].any()  # pending tokens never see a node
    assert within[2:, :2].all()
    assert within[7].tolist() == [True, True, False, False, False, False, True, True]  # node 5: nodes 4, 5


def test_chain_is_the_tree_of_width_one():
    chain = DraftTree.chain(3)
    assert chain.is_chain and chain.paths == ((0,), (0, 0), (0, 0, 0)) and chain.widths() == [1, 1, 1]
    assert not DraftTree.from_paths(EXAMPLE).is_chain
    assert DraftTree.from_paths(EXAMPLE).truncate(2).paths == tuple(p for p in EXAMPLE if len(p) <= 2)


def test_malformed_trees_are_refused():
    with pytest.raises(MTPError, match="no parent"):
        DraftTree.from_paths([(0,), (1, 0)])
    with pytest.raises(MTPError, match="ranks are >= 0"):
        DraftTree.from_paths([(0,), (0, -1)])
    with pytest.raises(MTPError, match="at least one path"):
        DraftTree.from_paths([])


def test_greedy_tree_verification_keeps_the_deepest_accepted_path():
    tree = DraftTree.from_paths(EXAMPLE)
    v = 10
    # The model's argmax after root, node 0, 1, 2, 3, 4, 5 (slots 0..6).
    target = torch.tensor([[4, 7, 2, 3, 9, 1, 5]])
    logits = torch.nn.functional.one_hot(target, v).float()  # (1, 7, V)
    tokens = torch.tensor([[5, 7, 2, 8, 4, 1]])  # node 4 (=4) right, then node 5 (=1) right, node 0 wrong
    acc = verify_tree(logits, tokens, tree.layout)
    assert acc.count.tolist() == [2] and acc.slot.tolist() == [6] and acc.last.tolist() == [5]
    assert acc.path_tokens(tokens)[0, :2].tolist() == [4, 1]
    assert acc.kept_nodes(6).tolist() == [[False, False, False, False, True, True]]
    none = verify_tree(logits, torch.tensor([[0, 0, 0, 0, 0, 0]]), tree.layout)
    assert none.count.tolist() == [0] and none.slot.tolist() == [0] and none.last.tolist() == [4]


def test_tree_sampling_verification_keeps_the_target_distribution():
    """With deterministic candidates (siblings tried in turn), the first emitted token's law is exactly p."""
    tree = DraftTree.from_paths([(0,), (1,), (2,), (0, 0)])
    v, n = 5, 200_000
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    probs = p.expand(n, 5, v).clone()
    tokens = torch.tensor([[3, 1, 0, 2]]).expand(n, 4)  # candidates 3, 1, 0 at depth 1
    gen = torch.Generator().manual_seed(0)
    acc = verify_tree_sampling(probs, tokens, tree.layout, gen)
    first = torch.where(acc.count > 0, acc.path_tokens(tokens)[:, 0], acc.last)
    freq = torch.bincount(first, minlength=v).float() / n
    assert torch.allclose(freq, p, atol=0.005)
    # after an accepted first candidate (node 0, token 3) the child (token 2) is judged with p again
    second = torch.where(acc.count > 1, acc.path_tokens(tokens)[:, 1], acc.last)[first == 3]
    assert torch.allclose(torch.bincount(second, minlength=v).float() / len(second), p, atol=0.02)


def test_sampled_drafts_draw_each_nodes_last_child_outside_its_siblings_tokens():
    """The last head child of every node is drawn (the module docstring's tree: (0,0,0), (0,1), (1,), (1,0)), from
    its head's q without the tokens of its better-ranked siblings; the others are the heads' ranked tokens, and a
    row that does not sample gets them everywhere."""
    drawn, siblings = DraftTree.from_paths(EXAMPLE).layout.drawn_and_siblings(2)
    assert drawn.tolist() == [False, False, True, True, True, True]
    assert siblings.tolist() == [[False, True], [False, True], [False, False], [True, False], [True, False],
                                 [False, False]]
    tree = DraftTree.from_paths([(0,), (1,), (0, 0)])  # nodes (0,), (0,0), (1,)
    n = 40_000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 1.5, 0.2, 0.1, 0.0]]).expand(n, 2, 5)
    probs = torch.softmax(logits, -1)
    sampled = torch.arange(n) > 0  # row 0 does not sample
    tokens, _ = sampled_tree_drafts(logits, probs, sampled, tree, torch.Generator().manual_seed(0))
    assert tokens[0].tolist() == [0, 1, 1] and (tokens[:, 0] == 0).all()  # the ranked tokens; rank 0 one-hot
    outside = probs[0, 0].clone()
    outside[0] = 0
    assert torch.allclose(torch.bincount(tokens[1:, 2], minlength=5).float() / (n - 1), outside / outside.sum(),
                          atol=0.01)
    assert torch.allclose(torch.bincount(tokens[1:, 1], minlength=5).float() / (n - 1), probs[0, 1], atol=0.01)


def test_a_drawn_last_child_keeps_the_law_p_and_is_kept_as_often_as_the_rule_says():
    """At the root, rank 0 (the head's best token) and a lookup node are one-hot and the last head child (rank 1)
    is drawn from q outside rank 0's token; below rank 0 its only child is drawn from the next head's q. The first
    token's law is p, and so is the second's after the first candidate; the drawn child is kept with the
    probability sum(min(r, mass q')) of the residual r the one-hot children leave (0.504 here: 0.1 more than a
    one-hot rank 1 would get, p(1) = 0.4 of it)."""
    tree = DraftTree.with_lookup(DraftTree.from_paths([(0,), (1,), (0, 0)]), 2)
    assert list(tree.paths) == [(0,), (0, 0), (1,), (-1,), (-1, -1)]
    v, n = 5, 200_000
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    q = torch.tensor([[0.35, 0.25, 0.1, 0.2, 0.1], [0.1, 0.1, 0.6, 0.1, 0.1]])  # (D=2, V): depth 1's best is 0
    outside = q[0].clone()
    outside[0] = 0  # rank 1 is drawn outside rank 0's token
    gen = torch.Generator().manual_seed(0)
    first = torch.multinomial(outside, n, replacement=True, generator=gen)
    second = torch.multinomial(q[1], n, replacement=True, generator=gen)
    tokens = torch.stack([torch.zeros_like(first), second, first, torch.full_like(first, 3),
                          torch.full_like(first, 4)], 1)  # (n, 5) in node order
    acc = verify_tree_sampling(p.expand(n, 6, v).clone(), tokens, tree.layout, gen, q.expand(n, 2, v))
    emitted = torch.where(acc.count > 0, acc.path_tokens(tokens)[:, 0], acc.last)
    assert torch.allclose(torch.bincount(emitted, minlength=v).float() / n, p, atol=0.005)
    kept_drawn = (acc.count > 0) & (acc.path[:, 0] == 2)
    rest = torch.tensor([0.0, 0.4, 0.25, 0.0, 0.1])  # p less the refused one-hot tokens 0 and 3
    expected = torch.minimum(rest, 0.75 * outside / outside.sum()).sum()
    assert abs(expected - 0.504) < 1e-3 and abs(kept_drawn.float().mean() - expected) < 0.005
    after = (acc.count > 0) & (acc.path[:, 0] == 0)  # the first candidate kept: its child judged against p
    then = torch.where(acc.count > 1, acc.path_tokens(tokens)[:, 1], acc.last)[after]
    assert torch.allclose(torch.bincount(then, minlength=v).float() / len(then), p, atol=0.03)


@pytest.mark.parametrize("q_outside", [0.0, 1e-3], ids=["no-mass", "some-mass"])
def test_a_drawn_child_whose_q_has_no_mass_outside_its_siblings_is_refused(q_outside):
    """q inside the siblings' tokens (top-k, top-p, min-p or a draft vocabulary no wider than the siblings; a very
    low temperature): outside them there is nothing to draw, so the drawn child is a filler, not a sample of q'.
    The first token's law is still p (the filler was kept whenever r held any of it: nearly always, not p's share)."""
    tree = DraftTree.from_paths([(0,), (1,)])  # rank 0 one-hot, rank 1 drawn from q outside rank 0's token
    v, n = 5, 100_000
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    q = torch.tensor([1.0 - 4 * q_outside] + [q_outside] * 4)  # the heads' best token: 0 (the sibling's)
    logits = q.clamp_min(1e-30).log().expand(n, 1, v)
    gen = torch.Generator().manual_seed(0)
    tokens, layout = sampled_tree_drafts(logits, q.expand(n, 1, v), torch.ones(n, dtype=torch.bool), tree, gen)
    assert (tokens[:, 0] == 0).all() and (tokens[:, 1] != 0).all()
    acc = verify_tree_sampling(p.expand(n, 3, v).clone(), tokens, layout, gen, q.expand(n, 1, v))
    first = torch.where(acc.count > 0, acc.path_tokens(tokens)[:, 0], acc.last)
    assert torch.allclose(torch.bincount(first, minlength=v).float() / n, p, atol=0.006)


@pytest.mark.parametrize("eps", [0.0, 1e-30, 1e-7])
def test_a_dynamic_tree_keeps_every_chosen_nodes_parent_when_scores_tie(eps):
    """A head whose best token has probability 1 (in fp32: the others below 6e-8) or whose other ranks have none (a
    draft vocabulary smaller than the tree) scores a child exactly as its parent: the tree still holds each node's
    parent, one depth up (a node of depth 2 hanging from the root was verified at the wrong position, and made a
    sampled token's law wrong)."""
    for size, width, depths in itertools.product((3, 4, 6, 16), (2, 4, 16), (2, 3, 4)):
        probs = torch.full((depths, width), eps)
        probs[:, 0] = 1.0
        layout = dynamic_tree(probs, size)
        parent, depth = layout.parent_slot, layout.depth
        parent_depth = torch.cat([depth.new_zeros(1), depth])[parent]
        assert (parent_depth == depth - 1).all(), (size, width, depths, layout_paths(layout), depth.tolist())
        assert len(set(layout_paths(layout))) == layout.size


def test_a_chain_given_as_a_tree_keeps_as_many_sampled_drafts_as_the_chain():
    """Sampling, the chain without --tree and the same chain as a tree draft and accept alike (before the tree
    sampled its rank-0 drafts: 1.09 tokens per forward against the chain's 2.10 on this model)."""
    model = tiny_mtp("llama", num_heads=4, vocab_size=8, seed=3)
    with torch.no_grad():
        model.base.model.norm.weight.mul_(4.0)  # peaked distributions
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]] * 64)
    tpf = {}
    for tree in (None, "[[0],[0,0],[0,0,0]]"):
        out = generate(model, ids, max_new_tokens=40, strategy="speculative", adaptive_draft=False,
                       stop_token_ids=[], do_sample=True, seed=0, tree=tree)
        tpf[tree] = out.stats.tokens_per_forward
    assert tpf[None] > 1.8 and abs(tpf["[[0],[0,0],[0,0,0]]"] - tpf[None]) < 0.15, tpf


def test_tree_candidates_pick_each_nodes_rank():
    tree = DraftTree.from_paths(EXAMPLE)
    ranked = [torch.tensor([[10, 11]]), torch.tensor([[20, 21]]), torch.tensor([[30]])]
    assert tree_candidates(ranked, tree).tolist() == [[10, 20, 30, 21, 11, 20]]


def test_keep_path_moves_the_accepted_nodes_after_the_root():
    cache = MTPCache(batch_size=2, max_len=16, num_stacks=1)
    stack = cache.stack(0)
    prompt = torch.arange(3, dtype=torch.float64).view(1, 1, 3, 1).expand(2, 1, 3, 1)
    cache.prepare_block(torch.ones(2, 3, dtype=torch.bool), torch.float64)
    stack.update(prompt, prompt, 0)
    cache.commit()
    block = 100 + torch.arange(7, dtype=torch.float64).view(1, 1, 7, 1).expand(2, 1, 7, 1)  # root + 6 nodes
    cache.prepare_block(torch.ones(2, 7, dtype=torch.bool), torch.float64)
    stack.update(block, block, 0)
    tree = DraftTree.from_paths(EXAMPLE)
    path = tree.layout.path[torch.tensor([3, 5])]  # row 0 keeps nodes 0, 3; row 1 keeps nodes 4, 5
    cache.keep_path(1, torch.tensor([2, 2]), path)
    assert cache.length.tolist() == [3 + 3, 3 + 3]
    keys = stack.keys[0][:, 0, :, 0]
    assert keys[0, :6].tolist() == [0, 1, 2, 100, 101, 104]
    assert keys[1, :6].tolist() == [0, 1, 2, 100, 105, 106]
    assert cache.next_pos.tolist() == [6, 6]


def random_tree(draw, depth: int) -> DraftTree:
    """A random prefix-closed tree of at most `depth` levels: children added under random existing nodes."""
    paths = {(0,)}
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.sampled_from(sorted(paths) + [()]))
        if len(parent) < depth:
            paths.add(parent + (draw(st.integers(0, 3)),))
    return DraftTree.from_paths(paths)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_fixed_trees_rank_0_chain_comes_first_and_parents_before_children(data):
    """Nodes depth-first, lower ranks first: the rank-0 chain takes the slots right after the root (where greedy's
    tokens will sit: in bf16 its nodes then sum their keys as greedy's steps do), and every parent comes before
    its children (what the cache's path moves rely on)."""
    tree = random_tree(data.draw, data.draw(st.integers(1, 4)))
    chain = [p for p in tree.paths if set(p) == {0}]
    assert list(tree.paths[:len(chain)]) == sorted(chain, key=len)
    parent = tree.layout.parent_slot.tolist()
    assert all(parent[i] <= i for i in range(tree.size))  # slot parent[i] holds node parent[i] - 1 < i


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_fixed_trees_ancestors_from_its_paths_are_the_derived_ones(data):
    """A fixed tree's ancestors are written from its paths on the host (a compiled step holds them as a
    constant); they are what the layout derives on the device from the parents, with lookup nodes too."""
    tree = DraftTree.with_lookup(random_tree(data.draw, data.draw(st.integers(1, 4))), data.draw(st.integers(0, 3)))
    fixed = tree.layout
    derived = tree_layout(fixed.parent_slot, fixed.depth, fixed.rank, fixed.max_depth)
    assert torch.equal(fixed.ancestors, derived.ancestors)


def ranked_oracle(reference: list[list[int]], tree: DraftTree, corrupt: float, seed: int, vocab: int):
    """Ranked candidates per head: the true token at a random rank (sometimes nowhere), others off by one."""
    gen = torch.Generator().manual_seed(seed)

    def propose(req: DraftRequest):
        d = req.hidden_at.shape[1]
        width = 4
        ranked = torch.zeros(len(req.rows), d, width, dtype=torch.long)
        for i, (row, done) in enumerate(zip(req.rows.tolist(), req.produced.tolist(), strict=True)):
            future = reference[row][done:done + d] + [0] * d
            for h in range(d):
                wrong = [(future[h] + 1 + r) % vocab for r in range(width)]
                ranked[i, h] = torch.tensor(wrong)
                if torch.rand((), generator=gen) >= corrupt:
                    ranked[i, h, int(torch.randint(0, width, (), generator=gen))] = future[h]
        return ranked, None

    return propose


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_tree_speculative_equals_greedy_equals_reference(data):
    family = data.draw(st.sampled_from(["llama", "gpt2"]))
    num_heads = data.draw(st.integers(2, 5))
    vocab = data.draw(st.integers(8, 48))
    seed = data.draw(st.integers(0, 10_000))
    model = tiny_mtp(family, num_heads=num_heads, seed=seed, dtype=torch.float64, vocab_size=vocab)
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=9))
               for _ in range(data.draw(st.integers(1, 3)))]
    max_new = data.draw(st.integers(1, 16))
    stop = data.draw(st.lists(st.integers(0, vocab - 1), max_size=1))
    if data.draw(st.booleans()):
        tree = random_tree(data.draw, num_heads - 1)
    else:  # a new shape every step from the heads' probabilities
        tree = DynamicTree(data.draw(st.integers(1, 10)), data.draw(st.integers(1, num_heads - 1)))
    lookup = data.draw(st.sampled_from([0, 0, 1, 3, 6]))  # prompt-lookup drafts: one more branch of the tree
    ids, mask = left_pad(prompts)
    reference = [reference_greedy(model, p, max_new, stop) for p in prompts]
    if data.draw(st.booleans()):
        model.set_draft_vocab(data.draw(st.lists(st.integers(0, vocab - 1), min_size=4, max_size=vocab,
                                                 unique=True)))
    adaptive = data.draw(st.booleans())
    spec = generate(model, ids, mask, max_new_tokens=max_new, strategy="speculative", stop_token_ids=stop,
                    tree=tree, adaptive_draft=adaptive, lookup=lookup)
    assert spec.tokens == reference
    if lookup:  # the chain with lookup drafts too (it becomes a tree of width one plus the lookup branch)
        chain = generate(model, ids, mask, max_new_tokens=max_new, strategy="speculative", stop_token_ids=stop,
                         adaptive_draft=adaptive, lookup=lookup)
        assert chain.tokens == reference
    # Drafts that are often right somewhere in the tree: rows keep different paths and lengths.
    corrupt = data.draw(st.sampled_from([0.0, 0.3, 0.7]))
    oracle = generate(model, ids, mask, max_new_tokens=max_new, strategy="speculative", stop_token_ids=stop,
                      tree=tree, adaptive_draft=adaptive, proposer=ranked_oracle(reference, tree, corrupt, seed, vocab),
                      lookup=lookup)
    assert oracle.tokens == reference


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_perfect_candidates_accept_the_whole_deepest_path(family):
    """The truth always sits at the ranks of one deepest path (1, 0, 2): every step keeps all three."""
    model = tiny_mtp(family, num_heads=4, dtype=torch.float64, vocab_size=32)
    prompts = [[1, 2, 3], [4, 5], [6]]
    reference = [reference_greedy(model, p, 40) for p in prompts]
    tree = DraftTree.from_paths([(0,), (1,), (1, 0), (0, 1), (1, 0, 2), (1, 0, 0)])

    def propose(req: DraftRequest):
        d = req.hidden_at.shape[1]
        ranked = torch.zeros(len(req.rows), d, 3, dtype=torch.long)
        for i, (row, done) in enumerate(zip(req.rows.tolist(), req.produced.tolist(), strict=True)):
            future = reference[row][done:done + d] + [0] * d
            for h, rank in enumerate((1, 0, 2)[:d]):
                ranked[i, h] = torch.tensor([(future[h] + 1 + r) % 32 for r in range(3)])
                ranked[i, h, rank] = future[h]
        return ranked, None

    ids, mask = left_pad(prompts)
    # (adaptive_draft off: no timed plain steps in this batch, whose forwards are counted)
    out = generate(model, ids, mask, max_new_tokens=40, strategy="speculative", stop_token_ids=[], tree=tree,
                   proposer=propose, adaptive_draft=False)
    assert out.tokens == reference
    assert out.stats.acceptance == [1.0, 1.0, 1.0]
    assert out.stats.forward_passes == 1 + 10  # the prefill's token, then 4 per forward


@pytest.mark.parametrize("tree", [DraftTree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0)]),
                                  DynamicTree(4, 2)], ids=["static", "dynamic"])
def test_tree_sampling_matches_the_model_distribution(tree):
    """3000 sampled continuations through a tree: the first two tokens' joint law is the model's."""
    model = tiny_mtp("llama", num_heads=3, vocab_size=6, seed=3)
    prompt, n = [1, 2], 3000
    out = generate(model, torch.tensor([prompt] * n), max_new_tokens=2, strategy="speculative", do_sample=True,
                   seed=0, stop_token_ids=[], tree=tree)
    assert_first_two_tokens_follow_the_model(model, prompt, out.tokens)


def test_build_tree_is_optimal_for_its_model():
    """Against every prefix-closed tree of the same size over 3 ranks x 2 depths."""
    stats = [[0.5, 0.2, 0.1], [0.6, 0.15, 0.05]]
    candidates = [(r,) for r in range(3)] + [(r, s) for r in range(3) for s in range(3)]
    for size in (1, 3, 5):
        best = expected_length(build_tree(stats, size), stats)
        for subset in itertools.combinations(candidates, size):
            if all(len(p) == 1 or p[:1] in subset for p in subset):
                assert expected_length(DraftTree.from_paths(subset), stats) <= best + 1e-12
    assert build_tree(stats, 2).paths == ((0,), (0, 0))


def test_dynamic_tree_goes_deep_when_the_drafts_are_sure_and_wide_when_not():
    sure = torch.tensor([[[0.95, 0.03, 0.01], [0.9, 0.05, 0.02]]])  # (B=1, D=2, W=3) top-3 probabilities
    unsure = torch.tensor([[[0.4, 0.35, 0.1], [0.3, 0.2, 0.1]]])
    tree = DynamicTree(size=2, depth=2)
    assert layout_paths(tree.for_step(sure)) == ((0,), (0, 0))
    assert layout_paths(tree.for_step(unsure)) == ((0,), (1,))
    # rows share one tree: the shape of the batch's mean probabilities
    assert layout_paths(tree.for_step(torch.cat([sure, unsure]))) == build_tree(
        [[0.675, 0.19, 0.055], [0.6, 0.125, 0.06]], 2).paths
    assert tree.truncate(1) == DynamicTree(2, 1) and tree.truncate(5) == tree
    assert tree.widths() == [2, 2]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_dynamic_tree_on_the_device_is_the_best_first_tree(data):
    """`dynamic_tree` (fixed-shape ops) picks the paths `build_tree` (best-first on the host) picks, and its
    layout is the one the same paths give a fixed tree."""
    depth, width, size = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 12))
    probs = torch.tensor(data.draw(st.lists(st.lists(st.floats(0.01, 1.0), min_size=width, max_size=width),
                                            min_size=depth, max_size=depth)), dtype=torch.float64)
    probs = probs.sort(-1, descending=True).values
    layout = dynamic_tree(probs, size)
    reordered = DraftTree.from_paths(layout_paths(layout))
    best = build_tree(probs.tolist(), size)  # paths that tie may differ; the expected accepted length may not
    assert reordered.size == best.size
    assert abs(expected_length(reordered, probs.tolist()) - expected_length(best, probs.tolist())) < 1e-9
    fixed = reordered.layout
    assert reordered.size == layout.size and layout.depth.tolist() == sorted(layout.depth.tolist())
    for i, p in enumerate(layout_paths(layout)):  # node for node, the same ancestors and path
        j = reordered.paths.index(p)
        anc = {layout_paths(layout)[k] for k in range(layout.size) if layout.ancestors[i, k]}
        assert anc == {reordered.paths[k] for k in range(fixed.size) if fixed.ancestors[j, k]}
        assert [layout_paths(layout)[k] for k in layout.path[i, : fixed.max_depth].tolist()] == [
            reordered.paths[k] for k in fixed.path[j].tolist()]  # (a layout keeps room for `depth` levels)


def test_ranked_tree_drafts_fill_each_node_with_its_rank():
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 1.0]]])  # (B=1, D=2, V=4); ranks: 1,3,2,0 / 0,3,..
    static = DraftTree.from_paths([(0,), (1,), (0, 0), (0, 1)])  # node order (0,), (0, 0), (0, 1), (1,)
    tokens, layout = ranked_tree_drafts(logits, static)
    assert layout is static.layout and tokens.tolist() == [[1, 0, 3, 3]]
    vocab = torch.tensor([10, 11, 12, 13])  # logits over these token ids
    tokens, layout = ranked_tree_drafts(logits, DynamicTree(3, 2), vocab)
    # probabilities: depth 1 ~(0.64, 0.24, 0.09), depth 2 ~(0.97, ...): the chain (0,), (0, 0) then (1,)
    assert layout_paths(layout) == ((0,), (1,), (0, 0))
    assert tokens.tolist() == [[11, 13, 10]]


def test_resolve_tree(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    assert resolve_tree("chain", 8, 3, folder) is None
    assert resolve_tree("dynamic", 5, 3, folder) == DynamicTree(5, 3)
    assert resolve_tree("dynamic", None, 2, folder) == DynamicTree(16, 2)
    assert resolve_tree("auto", 5, 3, folder).size == 5  # no statistics: the stand-in
    (folder / "eval.json").write_text(json.dumps({TREE_STATS_KEY: [[0.9, 0.05], [0.1, 0.8], [0.5, 0.1]]}))
    assert resolve_tree("auto", 2, 3, folder).paths == ((0,), (0, 1))
    assert resolve_tree("[[0], [0, 1]]", None, 3, None).paths == ((0,), (0, 1))
    spec = tmp_path / "tree.json"
    spec.write_text("[[0], [1], [0, 0]]")
    assert resolve_tree(str(spec), None, 3, None).size == 3
    with pytest.raises(MTPError, match="depth 4"):
        resolve_tree("[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]", None, 3, None)
    with pytest.raises(MTPError, match="not valid JSON"):
        resolve_tree("[[0],", None, 3, None)
    with pytest.raises(MTPError, match="not 'auto'"):
        resolve_tree(str(tmp_path / "missing.json"), None, 3, None)
    with pytest.raises(MTPError, match="more than --tree-size"):
        resolve_tree("[[0], [1], [2]]", 2, 3, None)


def test_generate_refuses_trees_where_they_do_not_apply():
    model = tiny_mtp("llama", num_heads=3)
    with pytest.raises(MTPError, match="speculative"):
        generate(model, torch.tensor([[1, 2]]), max_new_tokens=4, strategy="confadapt", tree="auto")
    with pytest.raises(MTPError, match="drafts at most"):
        generate(model, torch.tensor([[1, 2]]), max_new_tokens=4, strategy="speculative",
                 tree="[[0], [0, 0], [0, 0, 0]]")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mask_token_tree_speculative_equals_greedy(data):
    """The same tree machinery with mask tokens drafting: a group of masks after every node."""
    family = data.draw(st.sampled_from(["llama", "gpt2"]))
    adapter = data.draw(st.sampled_from(["full", "gated-lora"]))
    vocab = data.draw(st.integers(8, 40))
    model = mask_model(family, adapter, data.draw(st.integers(0, 10_000)), vocab)
    k = data.draw(st.integers(2, 4))
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=7))
               for _ in range(data.draw(st.integers(1, 2)))]
    max_new = data.draw(st.integers(1, 16))
    ids, mask = left_pad(prompts)
    reference = [reference_greedy(model, p, max_new) for p in prompts]
    tree = data.draw(st.sampled_from([None, random_tree(data.draw, k - 1), DynamicTree(data.draw(st.integers(1, 8)),
                                                                                      k - 1)]))
    lookup = data.draw(st.sampled_from([0, 2, 5]))
    spec = generate(model, ids, mask, max_new_tokens=max_new, strategy="speculative", k=k, stop_token_ids=[],
                    tree=tree, lookup=lookup)
    assert spec.tokens == reference


def test_mask_block_layout_with_a_tree():
    from mtp.decoding.drafters import mask_block_layout

    tree = DraftTree.from_paths([(0,), (1,), (0, 0)])  # pending 1 slot (the root), 3 nodes, groups of 1 mask
    lay = mask_block_layout(4, 0, 4, 1, tree=tree)  # nodes (0,), (0, 0), (1,) in slots 1-3
    w = lay.within.int().tolist()
    assert lay.depth.tolist() == [1, 2, 1]
    assert w[2] == [1, 1, 1, 0, 0, 0, 0, 0]  # node (0, 0): root, node 0, itself
    assert w[6] == [1, 1, 1, 0, 0, 0, 1, 0]  # the mask after node (0, 0): what that node sees, itself
    assert w[7] == [1, 0, 0, 1, 0, 0, 0, 1]  # the mask after node (1,)
