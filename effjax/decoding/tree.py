"""Token trees for speculative decoding: layouts, tree attention, verification and commit.

A draft tree hangs off the root, the last committed token (not yet in the KV cache). Its owners are
the root (index 0) and the nodes 1..N, every parent before its children; `parent[o]` is the owner
index of o's parent. One forward processes the block

  [root | nodes 1..N | k masks of the root | k masks of node 1 | ... | k masks of node N]

with the attention mask and position ids of ESP.md step 3, so one pass verifies the draft and
computes the mask predictions for the next step (k = 0: no masks, e.g. prompt lookup). Shapes are
static: a fixed number of node slots, unused ones marked invalid. The walk that verifies the tree
follows the model's own choice at every node (argmax, or a sample at temperature > 0), so the
output is the model's own decoding: lossless.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from effjax.decoding.engine import (DecodeState, append_tokens, block_steering, hook_choices,
                                    observe_path)
from effjax.decoding.sampling import Sampler
from effjax.models.cache import KVBlock, commit
from effjax.models.transformer import Transformer


@struct.dataclass
class Tree:
  tokens: jax.Array  # [B, O] token of each owner; tokens[:, 0] is the root
  parent: jax.Array  # [B, O] owner index of each owner's parent (the root's entry is unused)
  valid: jax.Array  # [B, O] whether the slot holds a node (the root always does)
  # The static shape every row has (parent == layout's parents; invalid slots only at the end of
  # a chain), whose attention tables are built once; None for trees built per step.
  layout: "Layout | None" = struct.field(pytree_node=False, default=None)

  @property
  def num_owners(self) -> int:
    return self.tokens.shape[1]


@dataclasses.dataclass(frozen=True)
class Layout:
  """A static tree shape: `parents[i]` is the owner index of node i + 1's parent (0 = the root)."""

  parents: tuple[int, ...]

  def __post_init__(self):
    for i, p in enumerate(self.parents):
      if not 0 <= p <= i:
        raise ValueError(f"node {i + 1} has parent {p}: parents must come before their children")

  @classmethod
  def top1(cls, widths: tuple[int, ...]) -> "Layout":
    """Static [K_1..K_k] tree with top-1 expansion: the K_d nodes at depth d are all children of
    the first (most probable) node at depth d - 1."""
    parents, first = [], 0
    for w in widths:
      if w < 1:
        raise ValueError(f"tree widths must be >= 1, got {widths}")
      parents += [first] * w
      first = len(parents) - w + 1
    return cls(tuple(parents))

  @classmethod
  def chain(cls, n: int) -> "Layout":
    return cls(tuple(range(n)))

  @property
  def num_nodes(self) -> int:
    return len(self.parents)

  @property
  def depths(self) -> tuple[int, ...]:
    """Depth of every owner (the root is 0)."""
    d = [0]
    for p in self.parents:
      d.append(d[p] + 1)
    return tuple(d)

  @property
  def depth(self) -> int:
    return max(self.depths)

  def parent_array(self, batch: int) -> jax.Array:
    row = jnp.asarray((0,) + self.parents, jnp.int32)
    return jnp.broadcast_to(row, (batch, self.num_nodes + 1))


def block_length(num_owners: int, num_masks: int) -> int:
  return num_owners * (1 + num_masks)


def _block_index(num_owners: int, num_masks: int) -> tuple[np.ndarray, np.ndarray]:
  """Per block row: its owner, and its mask number (0..k-1; -1 for the owner's own token)."""
  owner = np.concatenate([np.arange(num_owners), np.repeat(np.arange(num_owners), num_masks)])
  j = np.concatenate([np.full(num_owners, -1), np.tile(np.arange(num_masks), num_owners)])
  return owner, j


def ancestors(tree: Tree) -> jax.Array:
  """[B, O, O] bool: anc[b, o, a] is whether a is o or an ancestor of o. Unused slots hang off the
  root (nobody else sees them)."""
  o = tree.num_owners
  nodes = jnp.arange(o)[None, :] > 0
  parent = jnp.where(tree.valid & nodes, tree.parent, 0)
  step = jax.nn.one_hot(parent, o, dtype=jnp.float32) * nodes[..., None]
  reach = jnp.eye(o, dtype=jnp.float32)[None] + step
  # Pointer doubling: after m squarings reach covers paths of length up to 2^m.
  for _ in range(max(1, math.ceil(math.log2(o)))):
    reach = jnp.minimum(jnp.einsum("bij,bjk->bik", reach, reach), 1.0)
  return reach > 0


def _mask_columns(num_owners: int, num_masks: int, num_masked: int | None = None) -> np.ndarray:
  """[T, M * k] for the block [O owners | k masks of each of M masked owners] (M = O unless
  given): mask j of a masked owner sees masks 1..j of that owner; nothing else sees a mask."""
  m = num_owners if num_masked is None else num_masked
  masked, j = _block_index(m, num_masks)
  masked = np.concatenate([np.full(num_owners, -1), masked[m:]])
  j = np.concatenate([np.full(num_owners, -1), j[m:]])
  o = num_owners
  return ((masked[:, None] == masked[None, o:]) & (j[:, None] >= 0)
          & (j[None, o:] <= j[:, None]))


@functools.lru_cache(maxsize=None)
def layout_tables(layout: Layout, num_masks: int) -> tuple[np.ndarray, np.ndarray]:
  """The block mask [T, T] and position offsets from the root [T] of a static layout, built once
  (block_attention of a tree of that shape with every slot valid)."""
  o = layout.num_nodes + 1
  parents = (0,) + layout.parents
  anc = np.eye(o, dtype=bool)
  for i in range(1, o):
    anc[i] |= anc[parents[i]]
  owner, j = _block_index(o, num_masks)
  mask = np.concatenate([anc[owner], _mask_columns(o, num_masks)], axis=1)
  return mask, (np.asarray(layout.depths)[owner] + j + 1).astype(np.int32)


def block_attention(tree: Tree, num_masks: int, root_pos: jax.Array,
                    mask_owners: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The attention mask [B, T, T] and position ids [B, T] of the block [owners | k masks of each
  owner in mask_owners [B, M]] (None: of every owner, in owner order; T = O + M k). A node sees
  the root, its ancestors and itself, at the root's position + its depth; mask j of an owner sees
  what that owner sees, the owner itself and its masks 1..j, at the owner's position + j + 1.
  Nothing sees another owner's masks.

  A tree with a static layout and masks after every owner takes the layout's tables, else they
  come from its parents. A chain's invalid tail slots may see and be placed as in the full chain:
  no valid slot sees them and they are never committed."""
  b, o = tree.tokens.shape
  if tree.layout is not None and mask_owners is None:
    mask, offsets = layout_tables(tree.layout, num_masks)
    return jnp.broadcast_to(mask, (b,) + mask.shape), root_pos[:, None] + offsets[None, :]
  if mask_owners is None:
    mask_owners = jnp.broadcast_to(jnp.arange(o, dtype=jnp.int32), (b, o))
  anc = ancestors(tree)  # [B, O, O]
  depth = anc.sum(axis=-1).astype(jnp.int32) - 1
  which = jnp.repeat(mask_owners, num_masks, axis=1)  # [B, M k] the owner of each mask row
  to_owners = jnp.concatenate([anc, jnp.take_along_axis(anc, which[:, :, None], axis=1)], axis=1)
  cols = _mask_columns(o, num_masks, mask_owners.shape[1])
  mask = jnp.concatenate([to_owners, jnp.broadcast_to(cols, (b,) + cols.shape)], axis=-1)
  j = np.tile(np.arange(num_masks) + 1, mask_owners.shape[1])
  positions = jnp.concatenate([depth, jnp.take_along_axis(depth, which, axis=1) + j[None, :]],
                              axis=1)
  return mask, root_pos[:, None] + positions


def first_child_path(tree: Tree, max_depth: int) -> jax.Array:
  """[B, max_depth + 1] owners from the root down through each owner's first child (the most
  probable node at each depth in every tree effjax builds); it stays put at a leaf."""
  b, o = tree.tokens.shape
  nodes = jnp.arange(o)[None, :] > 0
  cur = jnp.zeros((b,), jnp.int32)
  path = [cur]
  for _ in range(max_depth):
    child = tree.valid & nodes & (tree.parent == cur[:, None])
    cur = jnp.where(child.any(axis=1), jnp.argmax(child, axis=1).astype(jnp.int32), cur)
    path.append(cur)
  return jnp.stack(path, axis=1)


def model_choices(sampler: Sampler, logits: jax.Array, key: jax.Array) -> jax.Array:
  """[B, O] the model's token at every owner: argmax, or an independent sample per owner from
  `sampler.probs` (each owner on the walk is reached at most once, so the walk draws each token
  with fresh randomness from the right conditional)."""
  b, o, v = logits.shape
  return sampler(logits.reshape(b * o, v), key).reshape(b, o)


def verify(tree: Tree, choice: jax.Array, max_depth: int,
           barrier: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Walk from the root, moving to the child whose token equals the model's choice at the current
  owner, stopping at the first miss (or at a node marked in `barrier` [B, O], which is not
  accepted: its token can only be the step's bonus token).

  Returns the path [B, max_depth + 1] of owner indices (root first; entries past the accepted ones
  repeat the last) and the number of accepted nodes [B]. The tokens committed this step are
  choice[path[:accepted + 1]]: the accepted nodes' tokens and then the bonus token.
  """
  b, o = tree.tokens.shape
  nodes = jnp.arange(o)[None, :] > 0
  cur = jnp.zeros((b,), jnp.int32)
  going = jnp.ones((b,), bool)
  accepted = jnp.zeros((b,), jnp.int32)
  path = [cur]
  for _ in range(max_depth):
    want = jnp.take_along_axis(choice, cur[:, None], axis=1)
    match = tree.valid & nodes & (tree.parent == cur[:, None]) & (tree.tokens == want)
    if barrier is not None:
      match = match & ~barrier
    found = going & match.any(axis=1)
    cur = jnp.where(found, jnp.argmax(match, axis=1).astype(jnp.int32), cur)
    accepted = accepted + found
    going = found
    path.append(cur)
  return jnp.stack(path, axis=1), accepted


# Depth to which the first head pass of a tree step includes mask rows (see tree_step): a mask row
# costs about 7% of a whole head pass on a CPU (the head's weights are read once per pass), and
# deeper acceptances are rare except in copied text, where speculation pays anyway.
SPINE_DEPTH = 4


@struct.dataclass
class StepOutcome:
  state: DecodeState
  path: jax.Array  # [B, D + 1]
  accepted: jax.Array  # [B] accepted nodes
  tokens: jax.Array  # [B, D + 1] the model's choices along the path; the first `appended` went in
  appended: jax.Array  # [B] tokens appended this step (0 for rows done before it)
  mask_logits: jax.Array | None  # [B, k, V] logits at the masks of the deepest accepted node
  logits: jax.Array  # [B, O, V] the model's logits at every owner (Token Recycling records them)
  kept: KVBlock  # [B, D + 1] the K/V of the path's owners, the first `appended` of them committed
  # [B] whether the deepest accepted node had masks (always, unless tree_step got mask_owners);
  # where not, mask_logits is that row's first masked owner's and means nothing.
  mask_found: jax.Array | None = None


def tree_step(model: Transformer, state: DecodeState, tree: Tree, masks: jax.Array | None,
              max_depth: int, sampler: Sampler, key: jax.Array, *,
              commit_cache: bool = True, mask_owners: jax.Array | None = None) -> StepOutcome:
  """One speculative step: forward [root | nodes | masks], verify, append, commit.

  masks: [B, k, D] input embeddings of the k masks placed after every owner (None: no masks), or
  only after the owners in mask_owners [B, M] (distinct owner indices): a smaller block, whose
  mask logits exist only where the deepest accepted node is one of them (StepOutcome.mask_found).
  Rows done before the step keep their cache as it was. commit_cache=False leaves the cache out
  of the returned state (None): the caller commits `kept` and `appended` (cache.commit), once after
  a lax.cond / lax.switch between steps, so that no branch writes, and XLA never copies, the cache.

  One LM-head pass serves the step: the owners (all of which the walk may read) and the masks of
  the owners on the first-child path down to depth SPINE_DEPTH, where the deepest accepted node
  mostly is (the root when nothing is accepted, else the best candidate or the lookup chain at
  each depth). Only when a row's deepest accepted node is elsewhere does a second pass compute its
  k mask rows.

  With a StepHook in the state (engine.StepHook), the root is steered, the owners' choices go
  through its logits processing, its barrier caps acceptance and it observes the committed tokens.
  """
  b, o = tree.tokens.shape
  k = 0 if masks is None else masks.shape[1]
  hook, hs = state.hook, state.hook_state
  emb = model.embed_tokens(tree.tokens)
  masked = o if mask_owners is None else mask_owners.shape[1]
  if k:
    emb = jnp.concatenate([emb, jnp.tile(masks.astype(emb.dtype), (1, masked, 1))], axis=1)
  attn_mask, positions = block_attention(tree, k, state.cache.index,
                                        mask_owners if k else None)
  out = model(embeddings=emb, positions=positions, attn_mask=attn_mask, cache=state.cache,
              advance=False, compute_logits=False,
              steering=None if hook is None else block_steering(hook, hs, emb.shape[1]),
              hidden_layers=() if hook is None else hook.hidden_layers)
  if k and mask_owners is not None:  # few mask rows: the whole block in the one head pass
    logits = model.logits(out.hidden)
  else:
    rows = jnp.broadcast_to(jnp.arange(o), (b, o))
    if k:
      spine = first_child_path(tree, min(max_depth, SPINE_DEPTH))  # [B, d + 1]
      spine_rows = o + spine[:, :, None] * k + jnp.arange(k)[None, None, :]
      rows = jnp.concatenate([rows, spine_rows.reshape(b, -1)], axis=1)
    logits = model.logits(jnp.take_along_axis(out.hidden, rows[:, :, None], axis=1))
  owner_logits = logits[:, :o]
  choice = model_choices(
      sampler, owner_logits if hook is None else hook_choices(hook, hs, owner_logits), key)
  barrier = None if hook is None else hook.barrier(
      hs, tree.tokens, jnp.take_along_axis(tree.tokens, tree.parent, axis=1))
  path, accepted = verify(tree, choice, max_depth, barrier)
  new = jnp.take_along_axis(choice, path, axis=1)
  after = append_tokens(state.replace(calls=state.calls + 1), new, accepted + 1)
  # Keep the KV of the owners whose successor token was appended: the root and the accepted nodes
  # before an EOS, a stop sequence or the row's limit cut the step (none for rows done before it),
  # so the cache always holds the prompt and every generated token but the last.
  appended = after.length - state.length
  kept = out.block.take(path)
  after = after.replace(cache=commit(state.cache, kept, appended) if commit_cache else None)
  if hook is not None:
    after = after.replace(hook_state=observe_path(
        hook, hs, owner_logits, out.layer_hidden, tree.tokens, path, new, appended))
  mask_logits, mask_found = None, None
  if k:
    deepest = jnp.take_along_axis(path, accepted[:, None], axis=1)[:, 0]
    if mask_owners is not None:
      hit = mask_owners == deepest[:, None]
      mask_found = hit.any(axis=1)
      by_owner = logits[:, o:].reshape(b, masked, k, -1)
      mask_logits = jnp.take_along_axis(by_owner, jnp.argmax(hit, axis=1)[:, None, None, None],
                                        axis=1)[:, 0]
    else:
      mask_found = jnp.ones((b,), bool)
      at = jnp.minimum(accepted, spine.shape[1] - 1)[:, None]
      on_spine = jnp.take_along_axis(spine, at, axis=1)[:, 0] == deepest
      spine_logits = logits[:, o:].reshape(b, spine.shape[1], k, -1)
      mask_logits = jnp.take_along_axis(spine_logits, at[:, :, None, None], axis=1)[:, 0]
      off = ~state.done & ~on_spine

      def second_pass(mask_logits):
        idx = o + deepest[:, None] * k + jnp.arange(k)[None, :]
        hidden = jnp.take_along_axis(out.hidden, idx[:, :, None], axis=1)
        return jnp.where(off[:, None, None], model.logits(hidden), mask_logits)

      mask_logits = jax.lax.cond(off.any(), second_pass, lambda x: x, mask_logits)
  return StepOutcome(state=after, path=path, accepted=accepted, tokens=new, appended=appended,
                     mask_logits=mask_logits, logits=owner_logits, kept=kept,
                     mask_found=mask_found)


def step_or_root(model: Transformer, state: DecodeState, tree: Tree, max_depth: int,
                 sampler: Sampler, key: jax.Array) -> tuple[DecodeState, jax.Array]:
  """tree_step without masks, or the root alone when no active row has a draft node (a plain
  decode step's cost). Returns the new state and the tokens appended per row."""

  def step(tree, depth):
    def run(s):
      out = tree_step(model, s, tree, None, depth, sampler, key, commit_cache=False)
      return out.state, out.kept.pad(max_depth + 1), out.appended
    return run

  root = Tree(tree.tokens[:, :1], tree.parent[:, :1], tree.valid[:, :1])
  drafted = (~state.done & tree.valid[:, 1:].any(axis=1)).any()
  new, kept, appended = jax.lax.cond(drafted, step(tree, max_depth), step(root, 0), state)
  return new.replace(cache=commit(state.cache, kept, appended)), appended


def count_appended(hist: jax.Array, appended: jax.Array, active: jax.Array) -> jax.Array:
  """Add one step to the per-row histogram [B, H] of tokens appended per model call."""
  h = hist.shape[1]
  return hist + jax.nn.one_hot(jnp.minimum(appended, h - 1), h, dtype=hist.dtype) * active[:, None]


@struct.dataclass
class Selection:
  """A tree chosen from candidates, and where each candidate ended up in it."""

  tree: Tree
  node: jax.Array  # [B, C] tree slot of the candidate's node (its merged copy's); -1: not kept
  parent: jax.Array  # [B, C] tree slot of its parent node (0 = the root); -1: parent not kept
  score: jax.Array  # [B, C] the score each candidate was ranked by (a merged copy's is its node's)
  node_score: jax.Array  # [B, num_nodes] that score per tree slot 1..num_nodes (-inf: unused)


def concat_parents(parents: list[jax.Array]) -> jax.Array:
  """The parent indices [B, C] of candidate lists joined in order: each list's own indices (-1 =
  the root) shifted by the candidates before it."""
  offset, out = 0, []
  for p in parents:
    out.append(jnp.where(p >= 0, p + offset, -1))
    offset += p.shape[1]
  return jnp.concatenate(out, axis=1)


def select_tree(root: jax.Array, parent: jax.Array, tokens: jax.Array, score: jax.Array,
                valid: jax.Array, levels: tuple[int, ...], num_nodes: int) -> Tree:
  """select_nodes(...).tree: the tree of the best candidates by their (path) score."""
  return select_nodes(root, parent, tokens, score, valid, levels, num_nodes).tree


def select_nodes(root: jax.Array, parent: jax.Array, tokens: jax.Array, score: jax.Array,
                 valid: jax.Array, levels: tuple[int, ...], num_nodes: int, *,
                 cumulative: bool = False) -> Selection:
  """Build a tree of `num_nodes` node slots from a candidate list.

  Candidates c (static order, parents first): parent [B, C] candidate index (-1 = the root),
  token, score (higher is kept first), valid, and a static depth `levels[c]`. A candidate equal to
  an earlier one (same token under the same node) is merged into it (keeping the better score),
  its children move over. cumulative=True: `score` is each candidate's own log-probability given
  its parent, and a node ranks by the sum along its path in the merged tree (so children of a
  merged node gain from its best copy). The best `num_nodes` valid candidates are kept,
  ancestor-closed (a child never scores above its parent, ties prefer earlier candidates; a kept
  node whose parent is not kept is dropped), and laid out in BFS order.
  """
  b, c = tokens.shape
  lv = np.asarray(levels)
  rows = jnp.arange(b)[:, None]
  canon = jnp.broadcast_to(jnp.arange(c), (b, c))
  cparent = parent
  for level in range(1, int(lv.max()) + 1):
    idx = np.flatnonzero(lv == level)
    # Parents sit at lower levels, so their canonical ids are final.
    p = parent[:, idx]
    cp = jnp.where(p >= 0, jnp.take_along_axis(canon, jnp.maximum(p, 0), axis=1), -1)
    pvalid = jnp.where(cp >= 0, jnp.take_along_axis(valid, jnp.maximum(cp, 0), axis=1), True)
    v = valid[:, idx] & pvalid
    t = tokens[:, idx]
    earlier = np.arange(len(idx))[None, :] < np.arange(len(idx))[:, None]  # [i, j]: j before i
    same = (cp[:, :, None] == cp[:, None, :]) & (t[:, :, None] == t[:, None, :]) & v[:, None, :]
    dup = same & v[:, :, None] & earlier[None]
    first = jnp.argmax(dup, axis=2)
    is_dup = dup.any(axis=2)
    target = jnp.where(is_dup, jnp.asarray(idx)[first], jnp.asarray(idx))
    canon = canon.at[:, idx].set(target)
    cparent = cparent.at[:, idx].set(cp)
    valid = valid.at[:, idx].set(v & ~is_dup)
    # A merged node keeps the best score of its copies.
    score = score.at[rows, target].max(jnp.where(is_dup & v, score[:, idx], -jnp.inf))
  if cumulative:
    for level in range(1, int(lv.max()) + 1):
      idx = np.flatnonzero(lv == level)
      cp = cparent[:, idx]
      above = jnp.where(cp >= 0, jnp.take_along_axis(score, jnp.maximum(cp, 0), axis=1), 0.0)
      score = score.at[:, idx].add(above)
  n = min(num_nodes, c)
  _, best = jax.lax.top_k(jnp.where(valid, score, -jnp.inf), n)
  kept = jnp.zeros((b, c), bool).at[rows, best].set(True) & valid
  for level in range(1, int(lv.max()) + 1):
    idx = np.flatnonzero(lv == level)
    cp = cparent[:, idx]
    pk = jnp.where(cp >= 0, jnp.take_along_axis(kept, jnp.maximum(cp, 0), axis=1), True)
    kept = kept.at[:, idx].set(kept[:, idx] & pk)
  # BFS order: by depth, then candidate order; unkept candidates last.
  key = jnp.where(kept, jnp.asarray(lv * c + np.arange(c))[None, :], 2 * c * (lv.max() + 1))
  order = jnp.argsort(key, axis=1)[:, :n]  # candidate index of node slot 1..n
  slot = jnp.zeros((b, c), jnp.int32).at[rows, order].set(
      jnp.arange(1, n + 1, dtype=jnp.int32)[None, :])
  slot = jnp.where(kept, slot, -1)  # of canonical candidates
  node_valid = jnp.take_along_axis(kept, order, axis=1)
  cp = jnp.take_along_axis(cparent, order, axis=1)
  node_parent = jnp.where(cp >= 0, jnp.take_along_axis(slot, jnp.maximum(cp, 0), axis=1), 0)
  node_tokens = jnp.take_along_axis(tokens, order, axis=1)
  node_score = jnp.where(node_valid, jnp.take_along_axis(score, order, axis=1), -jnp.inf)
  pad = num_nodes - n
  tree = Tree(tokens=jnp.concatenate([root[:, None], node_tokens], axis=1).astype(jnp.int32),
              parent=jnp.concatenate([jnp.zeros((b, 1), jnp.int32),
                                      jnp.maximum(node_parent, 0)], axis=1),
              valid=jnp.concatenate([jnp.ones((b, 1), bool), node_valid], axis=1))
  if pad:
    tree = Tree(tokens=jnp.pad(tree.tokens, ((0, 0), (0, pad))),
                parent=jnp.pad(tree.parent, ((0, 0), (0, pad))),
                valid=jnp.pad(tree.valid, ((0, 0), (0, pad))))
  at = lambda x, i: jnp.take_along_axis(x, jnp.maximum(i, 0), axis=1)
  return Selection(tree=tree, node=at(slot, canon),
                   parent=jnp.where(cparent >= 0, at(slot, cparent), 0), score=at(score, canon),
                   node_score=jnp.pad(node_score, ((0, 0), (0, pad)), constant_values=-jnp.inf))
