"""Token Recycling (Luo et al. 2024; SPECULATION_BASELINES.md section 1): draft from the model's own
earlier predictions.

Every forward computes logits at every tree node, and most of them are thrown away with the rejected
nodes. Token Recycling keeps them: an adjacency table holds, for each token, the top-k tokens the
model predicted after it the last time it was an input (at any verified position, accepted or
rejected), overwritten every step. The next draft tree is filled from the table level by level along
a static template of child ranks (node (c_1..c_d) gets the c_d-th recorded successor of its parent's
token) and verified by the one-forward tree step, so the output is the model's own decoding: lossless
for greedy and for sampling (the draft depends only on earlier steps).

The table is per row ([B, V, k] token ids with their log-probabilities, -1 = nothing recorded yet:
such a node stays empty, where the reference drafts token 0), carried in the decode loop. Where one
step feeds the same token at several nodes, the last in BFS order writes its row.

As in the reference, the table is never reset: on one `Engine`, each generation starts from the table
the last finished generation of the same strategy left (`inherit`; `Engine.reset_memory` forgets
it). A batch leaves one table: per token, the entry of the last row that wrote it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from effjax.decoding.engine import DecodeState, Strategy, append_tokens, prefill_forward
from effjax.decoding.sampling import GREEDY, Sampler
from effjax.decoding.topk import top_log_probs
from effjax.decoding.tree import Layout, Tree, count_appended, tree_step
from effjax.models.transformer import Transformer

# The authors' tree "2.2.2" (80 nodes, depth 6): how many children (ranks 0..n-1) the node at each
# path of child ranks has; paths not listed have none.
REFERENCE_CHILDREN: dict[tuple[int, ...], int] = {
    (): 8,
    (0,): 8, (1,): 4, (2,): 3, (3,): 2, (4,): 1, (5,): 1, (6,): 1, (7,): 1,
    (0, 0): 8, (0, 1): 3, (0, 2): 2, (0, 3): 1, (0, 4): 1, (0, 5): 1, (0, 6): 1, (0, 7): 1,
    (1, 0): 2, (1, 1): 1, (2, 0): 1, (3, 0): 1, (4, 0): 1, (5, 0): 1,
    (0, 0, 0): 5, (0, 0, 1): 2, (0, 0, 2): 1, (0, 0, 3): 1, (0, 0, 4): 1, (0, 1, 0): 1,
    (0, 2, 0): 1, (1, 0, 0): 1, (2, 0, 0): 1, (3, 0, 0): 1,
    (0, 0, 0, 0): 3, (0, 0, 0, 1): 1, (0, 0, 0, 2): 1, (0, 0, 1, 0): 1, (0, 1, 0, 0): 1,
    (1, 0, 0, 0): 1,
    (0, 0, 0, 0, 0): 2, (0, 0, 0, 1, 0): 1,
}
TOP_K = 8  # successors recorded per token (the reference's --output-id-topk)


@dataclasses.dataclass(frozen=True)
class Template:
  """A static draft tree of child ranks: node i + 1 is child number `ranks[i]` of owner
  `layout.parents[i]` (0 = the root); nodes in BFS order."""

  layout: Layout
  ranks: tuple[int, ...]

  @property
  def num_nodes(self) -> int:
    return self.layout.num_nodes


def _paths(children: dict[tuple[int, ...], int]) -> list[tuple[int, ...]]:
  """Every node's path of child ranks, in BFS order (by depth, then parent order, then rank)."""
  out, level = [], [()]
  while level:
    level = [p + (r,) for p in level for r in range(children.get(p, 0))]
    out += level
  return out


@functools.lru_cache(maxsize=None)
def template(num_nodes: int | None = None) -> Template:
  """The reference template (num_nodes None), or its `num_nodes` cheapest nodes by depth + sum of
  ranks (the most likely paths when deeper and lower-ranked successors are right less often; ties
  in BFS order). A node is never cheaper than its parent, so the cut is a tree."""
  paths = _paths(REFERENCE_CHILDREN)
  if num_nodes is not None:
    if not 1 <= num_nodes <= len(paths):
      raise ValueError(f"a recycling template has 1 to {len(paths)} nodes, got {num_nodes}")
    cost = {p: len(p) + sum(p) for p in paths}
    keep = set(sorted(paths, key=lambda p: (cost[p], paths.index(p)))[:num_nodes])
    paths = [p for p in paths if p in keep]
  index = {p: i + 1 for i, p in enumerate(paths)}
  parents = tuple(index.get(p[:-1], 0) for p in paths)
  return Template(Layout(parents), tuple(p[-1] for p in paths))


@struct.dataclass
class SuccessorTable:
  tokens: jax.Array  # [B, V, k] the top-k tokens predicted after each token, best first; -1 = none
  logp: jax.Array  # [B, V, k] their log-probabilities then
  written: jax.Array  # [B, V] entries written in this generation (not inherited)

  @classmethod
  def empty(cls, batch: int, vocab: int, k: int = TOP_K) -> "SuccessorTable":
    return cls(jnp.full((batch, vocab, k), -1, jnp.int32), jnp.full((batch, vocab, k), -jnp.inf),
               jnp.zeros((batch, vocab), bool))

  @classmethod
  def start(cls, memory: "SuccessorTable | tuple", batch: int, vocab: int,
            k: int = TOP_K) -> "SuccessorTable":
    """A generation's first table: the inherited one ([batch, ...], DecodeState.memory), or an
    empty one where nothing is inherited (memory ())."""
    if isinstance(memory, tuple):
      return cls.empty(batch, vocab, k)
    if memory.tokens.shape != (batch, vocab, k):
      raise ValueError(f"inherited successor table {memory.tokens.shape}, expected "
                       f"{(batch, vocab, k)}")
    return memory.replace(written=jnp.zeros((batch, vocab), bool))

  def merged(self) -> "SuccessorTable":
    """One row ([1, V, k]) for the next generation: per token, the last row that wrote it, else
    row 0 (every row started from the same table)."""
    b = self.written.shape[0]
    last = b - 1 - jnp.argmax(self.written[::-1], axis=0)  # [V]: the last writer (0 if none)
    row = jnp.where(self.written.any(0), last, 0)
    pick = lambda x: jnp.take_along_axis(x, row.reshape((1, -1) + (1,) * (x.ndim - 2)), axis=0)
    return SuccessorTable(pick(self.tokens), pick(self.logp), jnp.zeros_like(self.written[:1]))

  def update(self, fed: jax.Array, logits: jax.Array, valid: jax.Array) -> "SuccessorTable":
    """Record the model's top-k after each fed token: fed [B, O] tokens, logits [B, O, V] there,
    valid [B, O]. Of repeated tokens in a row the last valid one writes."""
    return self.record(fed, *top_log_probs(logits, self.tokens.shape[2]), valid)

  def record(self, fed: jax.Array, top: jax.Array, logp: jax.Array, valid: jax.Array
             ) -> "SuccessorTable":
    """`update` from the top-k already taken: top, logp [B, O, k]."""
    b, o = fed.shape
    v = self.tokens.shape[1]
    later = jnp.triu(jnp.ones((o, o), bool), 1)  # [i, j]: j after i
    shadowed = ((fed[:, :, None] == fed[:, None, :]) & valid[:, None, :] & later[None]).any(-1)
    row = jnp.where(valid & ~shadowed, fed, v)  # v: out of bounds, dropped
    at = (jnp.arange(b)[:, None], row)
    return SuccessorTable(self.tokens.at[at].set(top, mode="drop"),
                          self.logp.at[at].set(logp, mode="drop"),
                          self.written.at[at].set(True, mode="drop"))

  def expand(self, root: jax.Array, tpl: Template) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fill `tpl` from the root [B]: tokens, log-probabilities when recorded, valid; each [B, N]."""
    b = root.shape[0]
    rows = jnp.arange(b)
    tokens, logp, valid = [root], [jnp.zeros((b,))], [jnp.ones((b,), bool)]
    k = self.tokens.shape[2]
    for parent, rank in zip(tpl.layout.parents, tpl.ranks):  # parents come first
      if rank >= k:  # not recorded: an empty node
        tokens.append(jnp.zeros((b,), jnp.int32))
        logp.append(jnp.full((b,), -jnp.inf))
        valid.append(jnp.zeros((b,), bool))
        continue
      tok = self.tokens[rows, tokens[parent], rank]
      tokens.append(jnp.maximum(tok, 0))  # an empty node holds token 0 (never read: not valid)
      logp.append(self.logp[rows, tokens[parent], rank])
      valid.append(valid[parent] & (tok >= 0))
    stack = lambda xs: jnp.stack(xs[1:], axis=1)
    return stack(tokens), stack(logp), stack(valid)


@struct.dataclass
class RecyclingState:
  table: SuccessorTable
  hist: jax.Array  # [B, max_step_tokens + 1] model calls by tokens appended


def prefill_with_table(strategy: Strategy, model: Transformer, state: DecodeState, key: jax.Array,
                       k: int = TOP_K) -> tuple[DecodeState, SuccessorTable]:
  """The plain prefill, with the first table (inherited or empty; see SuccessorTable.start) updated
  by the successors of the last prompt token."""
  logits, _, state = prefill_forward(model, state)
  last = jnp.take_along_axis(state.prompt, (state.prompt_len - 1)[:, None], axis=1)
  table = SuccessorTable.start(state.memory, last.shape[0], model.cfg.vocab_size, k)
  table = table.update(last, logits[:, None], jnp.ones(last.shape, bool))
  state = append_tokens(state, strategy.sampler(logits, key)[:, None], jnp.ones_like(state.length))
  return state.replace(memory=()), table


merged_table = jax.jit(SuccessorTable.merged)


class InheritsTable:
  """Strategy methods that carry a successor table (`state.extra.table`) over between generations,
  for strategies with fields `inherit` and `top_k`."""

  def new_memory(self, cfg):
    return SuccessorTable.empty(1, cfg.vocab_size, self.top_k) if self.inherit else None

  def leave_memory(self, state):
    return merged_table(state.extra.table)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenRecycling(InheritsTable, Strategy):
  """Token Recycling with the reference tree (budget None: 80 nodes, 81 tokens per forward) or its
  cheapest budget - 1 nodes (BC `budget` tokens per forward, e.g. 10 / 30 / 60)."""

  budget: int | None = None
  top_k: int = TOP_K
  sampler: Sampler = GREEDY
  inherit: bool = True  # start from the table the engine's last generation left (the reference)

  def __post_init__(self):
    if self.budget is not None:
      template(self.budget - 1)  # raises on an impossible budget
    if not 1 <= self.top_k:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}")
    if max(self.template.ranks) >= self.top_k:
      raise ValueError(f"the tree uses successor ranks up to {max(self.template.ranks)}, more than "
                       f"top_k={self.top_k} recorded")

  @property
  def template(self) -> Template:
    return template(None if self.budget is None else self.budget - 1)

  @property
  def block_size(self) -> int:
    return self.template.num_nodes + 1

  @property
  def max_step_tokens(self) -> int:
    return self.template.layout.depth + 1

  def prefill(self, model, state, key):
    state, table = prefill_with_table(self, model, state, key, self.top_k)
    hist = jnp.zeros((state.length.shape[0], self.max_step_tokens + 1), jnp.int32)
    return state.replace(extra=RecyclingState(table, hist))

  def draft(self, state: DecodeState) -> Tree:
    tpl = self.template
    tokens, _, valid = state.extra.table.expand(state.last, tpl)
    b = tokens.shape[0]
    return Tree(tokens=jnp.concatenate([state.last[:, None], tokens], axis=1),
                parent=tpl.layout.parent_array(b),
                valid=jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1),
                layout=tpl.layout)  # an empty node's descendants are empty: static tables hold

  def step(self, model: Transformer, state: DecodeState, key: jax.Array) -> DecodeState:
    ex: RecyclingState = state.extra
    tree = self.draft(state)
    active = ~state.done
    out = tree_step(model, state, tree, None, self.template.layout.depth, self.sampler, key)
    table = ex.table.update(tree.tokens, out.logits, tree.valid & active[:, None])
    return out.state.replace(extra=RecyclingState(table, count_appended(ex.hist, out.appended,
                                                                        active)))

