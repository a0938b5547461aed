"""Token trees: the block mask and positions against a brute-force reading of ESP.md step 3, the
verification walk on hand-made trees, candidate selection, and commit against a plain forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.decoding.engine import AutoRegressive, Engine
from effjax.decoding.sampling import GREEDY
from effjax.decoding.tree import (Layout, Tree, block_attention, first_child_path, layout_tables,
                                  select_nodes, select_tree, tree_step, verify)
from effjax.models import KVCache, create_model, tiny_config


def _random_tree(rng, owners):
  parent = [0] + [int(rng.integers(0, i)) for i in range(1, owners)]
  valid = [True] + list(rng.random(owners - 1) < 0.8)
  return parent, valid


def _reference(parent, valid, k, root_pos):
  """Mask and positions straight from the definitions, one entry at a time."""
  o = len(parent)
  par = [0 if (i and not valid[i]) else parent[i] for i in range(o)]  # unused slots hang off root

  def line(i):  # i and its ancestors, root included
    out = {i}
    while i:
      i = par[i]
      out.add(i)
    return out

  rows = [("node", i, 0) for i in range(o)] + [("mask", b, j) for b in range(o)
                                               for j in range(1, k + 1)]
  t = len(rows)
  mask = np.zeros((t, t), bool)
  pos = np.zeros(t, int)
  for r, (kind, b, j) in enumerate(rows):
    depth = len(line(b)) - 1
    pos[r] = root_pos + depth + j
    for c, (ckind, cb, cj) in enumerate(rows):
      if ckind == "node":
        mask[r, c] = cb in line(b)  # a node sees root + ancestors + itself; a mask what b sees + b
      else:
        mask[r, c] = kind == "mask" and cb == b and cj <= j  # masks 1..j of its own owner
  return mask, pos


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_block_mask_and_positions_match_brute_force(k):
  rng = np.random.default_rng(k)
  trees = [_random_tree(rng, 9) for _ in range(4)]
  parent = jnp.array([p for p, _ in trees])
  valid = jnp.array([v for _, v in trees])
  tree = Tree(tokens=jnp.zeros(parent.shape, jnp.int32), parent=parent, valid=valid)
  root_pos = jnp.array([0, 5, 17, 3])
  got_mask, got_pos = map(np.asarray, block_attention(tree, k, root_pos))
  for b, (p, v) in enumerate(trees):
    want_mask, want_pos = _reference(p, v, k, int(root_pos[b]))
    np.testing.assert_array_equal(got_mask[b], want_mask)
    np.testing.assert_array_equal(got_pos[b], want_pos)


@pytest.mark.parametrize("layout", [Layout.top1((4,)), Layout.top1((15, 4)), Layout.top1((3, 2, 2)),
                                    Layout.chain(10)], ids=str)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_static_layout_tables_equal_the_per_step_computation(layout, k):
  o = layout.num_nodes + 1
  tree = Tree(tokens=jnp.zeros((2, o), jnp.int32), parent=layout.parent_array(2),
              valid=jnp.ones((2, o), bool))
  root_pos = jnp.array([3, 40])
  mask, offsets = layout_tables(layout, k)
  per_step_mask, per_step_pos = block_attention(tree, k, root_pos)  # no layout: from the parents
  np.testing.assert_array_equal(np.asarray(per_step_mask)[0], mask)
  np.testing.assert_array_equal(np.asarray(per_step_pos),
                                np.asarray(root_pos)[:, None] + offsets[None])
  got_mask, got_pos = block_attention(Tree(tree.tokens, tree.parent, tree.valid, layout), k,
                                      root_pos)
  np.testing.assert_array_equal(got_mask, per_step_mask)
  np.testing.assert_array_equal(got_pos, per_step_pos)


def test_first_child_path_follows_the_first_child_and_stops_at_leaves():
  tree = Tree(tokens=jnp.zeros((2, 6), jnp.int32),
              parent=jnp.array([[0, 0, 0, 2, 2, 4], [0, 0, 1, 2, 3, 4]]),
              valid=jnp.array([[True] * 6, [True, True, True, False, False, False]]))
  np.testing.assert_array_equal(first_child_path(tree, 4), [[0, 1, 1, 1, 1], [0, 1, 2, 2, 2]])


def test_layouts():
  assert Layout.top1((4,)).parents == (0, 0, 0, 0)
  # [3, 2, 2]: depth 2 under node 1 (the best at depth 1), depth 3 under node 4.
  lay = Layout.top1((3, 2, 2))
  assert lay.parents == (0, 0, 0, 1, 1, 4, 4)
  assert lay.depths == (0, 1, 1, 1, 2, 2, 3, 3) and lay.depth == 3
  assert Layout.chain(3).parents == (0, 1, 2)
  with pytest.raises(ValueError, match="before their children"):
    Layout((0, 2))


def test_verify_walks_the_models_choices():
  #        root(0)
  #     /    |     \
  #   1:a   2:b   3:c(unused)
  #   |      |  \
  #  4:d   5:e  6:f
  #              |
  #             7:g
  a, b, c, d, e, f, g = 10, 11, 12, 13, 14, 15, 16
  tree = Tree(tokens=jnp.array([[99, a, b, c, d, e, f, g]] * 4),
              parent=jnp.array([[0, 0, 0, 0, 1, 2, 2, 6]] * 4),
              valid=jnp.array([[True] * 3 + [False] + [True] * 4] * 4))
  choice = jnp.array([
      [b, 0, f, 0, 0, 0, g, 7],  # root->b, b->f, f->g, g: bonus 7
      [a, 5, 0, 0, 0, 0, 0, 0],  # root->a, a proposes 5: not d -> stop; bonus 5
      [c, 0, 0, 0, 0, 0, 0, 0],  # c is an unused slot: nothing accepted, bonus c
      [b, 0, e, 0, 0, 8, 0, 0],  # root->b->e, bonus 8
  ])
  path, accepted = verify(tree, choice, max_depth=3)
  np.testing.assert_array_equal(accepted, [3, 1, 0, 2])
  np.testing.assert_array_equal(path[0], [0, 2, 6, 7])
  np.testing.assert_array_equal(path[1, :2], [0, 1])
  np.testing.assert_array_equal(path[3, :3], [0, 2, 5])
  committed = [np.asarray(choice[i])[np.asarray(path[i, :accepted[i] + 1])].tolist()
               for i in range(4)]
  assert committed == [[b, f, g, 7], [a, 5], [c], [b, e, 8]]


def test_select_tree_merges_duplicates_and_keeps_the_best_closed_set():
  # Candidates: 0: x (root child, score 0), 1: y (root child, -1), 2: x again under root (dup of
  # 0, -0.5), 3: z under 2 (moves under 0, -0.7), 4: w under 1 (-3), 5: v under 0 (-0.9).
  x, y, z, w, v = 20, 21, 22, 23, 24
  parent = jnp.array([[-1, -1, -1, 2, 1, 0]])
  tokens = jnp.array([[x, y, x, z, w, v]])
  score = jnp.array([[0.0, -1.0, -0.5, -0.7, -3.0, -0.9]])
  valid = jnp.ones((1, 6), bool)
  select = jax.jit(select_tree, static_argnums=(5, 6))
  tree = select(jnp.array([7]), parent, tokens, score, valid, (1, 1, 1, 2, 2, 2), 4)
  # Kept: x, y (depth 1), then z, v under x (depth 2); w (-3) drops, the duplicate merged.
  np.testing.assert_array_equal(tree.tokens, [[7, x, y, z, v]])
  np.testing.assert_array_equal(tree.parent, [[0, 0, 0, 1, 1]])
  np.testing.assert_array_equal(tree.valid, [[True] * 5])
  # A budget larger than the valid candidates leaves unused slots.
  tree = select(jnp.array([7]), parent, tokens, score, valid.at[0, 1].set(False),
                     (1, 1, 1, 2, 2, 2), 6)
  assert int(tree.valid.sum()) == 4  # root, x, z, v: y is invalid, w hung under y, the dup merged
  # A merged node keeps the better score of its copies: x at -5 with a copy at -0.5 ranks first.
  tree = select(jnp.array([7]), parent, tokens, score.at[0, 0].set(-5.0), valid,
                (1, 1, 1, 2, 2, 2), 2)
  np.testing.assert_array_equal(tree.tokens, [[7, x, z]])
  np.testing.assert_array_equal(tree.parent, [[0, 0, 1]])


def test_select_nodes_accumulates_path_scores_over_merged_copies():
  # 0: x under the root (p 0.5), 1: x again (p 0.9, another source: merged into 0), 2: y under 0
  # (p 0.5 given x), 3: z under the root (p 0.4). Cumulative: y's path is 0.9 * 0.5 = 0.45 > 0.4.
  x, y, z = 20, 21, 22
  sel = jax.jit(select_nodes, static_argnums=(5, 6), static_argnames="cumulative")(
      jnp.array([7]), jnp.array([[-1, -1, 0, -1]]), jnp.array([[x, x, y, z]]),
      jnp.log(jnp.array([[0.5, 0.9, 0.5, 0.4]])), jnp.ones((1, 4), bool), (1, 1, 2, 1), 2,
      cumulative=True)
  np.testing.assert_array_equal(sel.tree.tokens, [[7, x, y]])
  np.testing.assert_array_equal(sel.tree.parent, [[0, 0, 1]])
  np.testing.assert_array_equal(sel.node, [[1, 1, 2, -1]])  # both copies of x are node 1
  np.testing.assert_array_equal(sel.parent, [[0, 0, 1, 0]])
  np.testing.assert_allclose(np.exp(sel.node_score), [[0.9, 0.45]], rtol=1e-6)


def _tiny(family):
  kinds = dict(layer_kinds=("sliding", "global")) if family.startswith("gemma") else {}
  cfg = tiny_config(family, vocab_size=32, tie_embeddings=False, num_layers=2, **kinds)
  return cfg, create_model(cfg, seed=0)


# Compiled: op-by-op, each plain forward took seconds (most of this file's time).
_written_cache = nnx.jit(lambda model, tokens, cache: model(tokens, cache=cache).cache)


def _check_cache_holds(model, cfg, state, prompts, cache_len):
  """The cache holds exactly prompt + every generated token but the last (the root of the next
  step), as a plain forward of that text writes it, and nothing after it."""
  for i, p in enumerate(prompts):
    text = p + state.tokens[i, :int(state.length[i]) - 1].tolist()
    plain = _written_cache(model, jnp.array([text]), KVCache.init(cfg, 1, cache_len))
    n = len(text)
    assert int(state.cache.index[i]) == n, i
    np.testing.assert_array_equal(state.cache.pos[i, :n], np.arange(n))
    assert (np.asarray(state.cache.pos[i, n:]) == -1).all()
    for layer in range(cfg.num_layers):
      np.testing.assert_allclose(state.cache.k[layer][i, :, :n], plain.k[layer][0, :, :n],
                                 atol=2e-5)
      np.testing.assert_allclose(state.cache.v[layer][i, ..., :n], plain.v[layer][0, ..., :n],
                                 atol=2e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tree_step_commits_exactly_the_appended_path(family):
  """Rows 0-1: branching trees, partly accepted. Rows 2-4: a 4-token chain that the model accepts
  whole, cut inside the step by an EOS token (row 2), a stop sequence (row 3) and the row's limit
  (row 4): only the appended tokens' owners stay in the cache."""
  cfg, model = _tiny(family)
  prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [3, 1, 4], [2, 7, 1, 8, 2, 8], [9, 9, 8, 7],
             [5, 3, 5, 3, 5]]
  free = Engine(model, cache_len=64).generate(prompts, max_new_tokens=6).tokens
  eos, stop = free[2][2], free[3][2:4]
  # The cuts must hit only their own row: rows 0, 1 append 3 and 2 tokens, row 4 one.
  appended_by = {0: 3, 1: 2, 2: 4, 3: 4, 4: 1}
  for i, n in appended_by.items():
    if i != 2:
      assert eos not in free[i][1:1 + n]
    if i != 3:
      assert all(free[i][j:j + 2] != stop for j in range(n))
  # A full-length cache: the hand-built 15-token block below needs more than a plain strategy's
  # ring of window + 1 slots (tree steps on rings: test_ring_cache).
  eng = Engine(model, cache_len=64, eos_ids=[eos], ring_cache=False)
  state = eng.start(prompts, strategy=AutoRegressive(), max_new_tokens=[8, 8, 8, 8, 2],
                    stop_sequences=[stop])
  other = lambda t: (t + 1) % cfg.vocab_size
  # Row 0: the true continuation hangs under node 2, next to a decoy; its depth-3 node misses.
  # Row 1: node 1 is right and has no children; node 2 is a decoy.
  (r0, a0, b0, c0), (r1, a1) = free[0][:4], free[1][:2]
  chain = lambda g: [g[0], g[1], g[2], g[3], g[4]]
  tree = Tree(tokens=jnp.array([[r0, other(a0), a0, b0, other(c0)], [r1, a1, other(a1), 0, 0]]
                               + [chain(free[i]) for i in (2, 3, 4)]),
              parent=jnp.array([[0, 0, 0, 2, 3], [0, 0, 0, 2, 3]] + [[0, 0, 1, 2, 3]] * 3),
              valid=jnp.ones((5, 5), bool))
  masks = jnp.full((5, 2, cfg.dim), 0.1)
  out = nnx.jit(tree_step, static_argnums=(4, 5))(model, state, tree, masks, 4, GREEDY,
                                                  jax.random.key(0))
  np.testing.assert_array_equal(out.accepted, [2, 1, 4, 4, 4])
  # Accepted nodes + the bonus token, unless cut: EOS (kept) is the 2nd token of row 2's step, the
  # stop sequence ends at the 3rd of row 3's, and row 4 has room for one more token.
  np.testing.assert_array_equal(out.appended, [3, 2, 2, 3, 1])
  np.testing.assert_array_equal(out.state.done, [False, False, True, True, True])
  # Mask logits of the deepest accepted node: row 0's (node 3) is off the first-child path and
  # takes the second head pass, the others' are on it. All equal the block forward's own.
  attn_mask, positions = block_attention(tree, 2, state.cache.index)
  block = model(embeddings=jnp.concatenate([model.embed_tokens(tree.tokens),
                                            jnp.tile(masks, (1, 5, 1))], axis=1),
                positions=positions, attn_mask=attn_mask, cache=state.cache,
                advance=False).logits
  for i, deepest in enumerate([3, 1, 4, 4, 4]):
    np.testing.assert_allclose(out.mask_logits[i], block[i, 5 + 2 * deepest + np.arange(2)],
                               rtol=1e-5, atol=1e-5)
  got = out.state
  for i in range(5):
    n = int(got.length[i])
    assert got.tokens[i, :n].tolist() == free[i][:n]
  _check_cache_holds(model, cfg, got, prompts, 64)
  # Masks after two owners per row only (a 9-token block): the same step, and the deepest node's
  # mask logits, equal to the full block's, where it is one of them (rows 0, 2, 4).
  owners = jnp.array([[0, 3], [0, 2], [4, 1], [0, 1], [2, 4]])
  few = nnx.jit(lambda *a: tree_step(*a, mask_owners=owners), static_argnums=(4, 5))(
      model, state, tree, masks, 4, GREEDY, jax.random.key(0))
  np.testing.assert_array_equal(few.accepted, out.accepted)
  np.testing.assert_array_equal(few.state.tokens, got.tokens)
  np.testing.assert_array_equal(few.mask_found, [True, False, True, False, True])
  for i, deepest in [(0, 3), (2, 4), (4, 4)]:
    np.testing.assert_allclose(few.mask_logits[i], block[i, 5 + 2 * deepest + np.arange(2)],
                               rtol=1e-5, atol=1e-5)
  _check_cache_holds(model, cfg, few.state, prompts, 64)
