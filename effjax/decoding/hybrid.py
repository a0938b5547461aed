"""Hybrid drafting (beyond the paper): a prompt-lookup chain and ESP mask candidates in one tree.

Each step drafts the prompt-lookup chain (effjax.decoding.pld) and the ESP dynamic-tree candidates
from the mask distributions, merges them into one tree of the same BC budget (the chain first; an
ESP candidate equal to a chain token under the same node is merged into it and its children move
over), and verifies it with masks after every owner in one forward. Copying wins where the text
repeats (summarization, RAG), probing where it does not (math, open writing), at the cost of one.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from effjax.decoding.esp import ESP, PRESETS, dynamic_candidates
from effjax.decoding.pld import context, lookup
from effjax.decoding.tree import Tree, select_tree


@dataclasses.dataclass(frozen=True, eq=False)
class Hybrid(ESP):
  """ESP with the dynamic tree (`masks`, `budget`) plus a prompt-lookup chain of up to `chain`
  tokens (at most the tree's node slots).

  chain_prior None: the chain takes priority within the budget. A probability p instead scores
  the chain token at depth d as p^d, on the scale of the ESP paths' P = prod q_i, and the budget
  goes to the nodes most likely to be reached (the expected accepted length is the sum of those).
  """

  widths: None = None
  budget: int = 30
  chain: int = 10
  max_ngram: int = 3
  chain_prior: float | None = None

  def __post_init__(self):
    if self.widths is not None:
      raise ValueError("the hybrid uses the dynamic tree: leave widths None")
    super().__post_init__()
    if self.chain < 1 or self.max_ngram < 1:
      raise ValueError(f"chain and max_ngram must be >= 1, got {self.chain}, {self.max_ngram}")
    if self.chain_prior is not None and not 0 < self.chain_prior <= 1:
      raise ValueError(f"chain_prior must be in (0, 1] or None, got {self.chain_prior}")

  @classmethod
  def preset(cls, bc: int, **kw) -> "Hybrid":
    if bc not in PRESETS:
      raise ValueError(f"no hybrid preset for BC{bc}; choose one of {sorted(PRESETS)}")
    return cls(masks=len(PRESETS[bc]), budget=bc, **kw)

  @property
  def chain_len(self) -> int:
    return min(self.chain, self.num_nodes)

  @property
  def depth(self) -> int:
    return max(self.chain_len, self.masks)

  def draft(self, state) -> Tree:
    ctx, length = context(state)
    n = self.chain_len
    chain, valid_len = lookup(ctx, length, self.max_ngram, n)
    b = chain.shape[0]
    ex = state.extra
    parent, tokens, score, valid, levels = dynamic_candidates(
        state.last, ex.cand_tokens, ex.cand_logp, self.num_nodes + 1)
    chain_parent = jnp.broadcast_to(jnp.arange(-1, n - 1, dtype=jnp.int32), (b, n))
    if self.chain_prior is None:
      chain_score = jnp.full((b, n), jnp.inf)
    else:
      chain_score = jnp.broadcast_to(jnp.arange(1, n + 1) * jnp.log(self.chain_prior), (b, n))
    return select_tree(
        state.last,
        jnp.concatenate([chain_parent, jnp.where(parent >= 0, parent + n, -1)], axis=1),
        jnp.concatenate([chain, tokens], axis=1),
        jnp.concatenate([chain_score, score], axis=1),
        jnp.concatenate([jnp.arange(n)[None, :] < valid_len[:, None], valid], axis=1),
        tuple(range(1, n + 1)) + levels, self.num_nodes)
