"""Suffix drafting (SuffixDecoding, SAM-Decoding; SPECULATION_BASELINES.md sections 2-3): continue the
text the way it continued after the earlier occurrences of its longest repeated suffix.

A suffix tree (SuffixDecoding) or suffix automaton (SAM-Decoding) over prompt + generated tokens
answers one query per step: where did the longest suffix of the text that occurred before occur,
and what followed each occurrence, with how much support. Here that query is answered with fixed
shapes inside the jitted loop, without a pointer structure: the match length of every position i
(the longest common suffix of text[:i + 1] and the whole text, capped at `max_depth`, as the
suffix tree's depth cap) is D vectorised comparisons over the token buffers; the longest match M is
their maximum, and its occurrences are the positions that reach it (the suffix tree node of the
last M tokens; its count is theirs). The continuations of the `occurrences` most recent ones
form the draft tree, merged into a trie: a node's support is the number of occurrences whose
continuation passes through it, its probability p = support / occurrences (the product of the
count ratios along the path, as SuffixDecoding's tree mode scores it). Nodes with p >=
`min_token_prob` are kept best-first, at most min(max_spec, alpha * M + offset): the draft grows
with the match length and splits or ends where the support does. One forward verifies the tree
(lossless, greedy or sampling: the draft depends only on the committed text).

Not modelled: SuffixDecoding's global tree over earlier requests (each generation drafts from its
own prompt and output; a multi-turn conversation's earlier turns are in its prompt).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from effjax.decoding.engine import DecodeState, Strategy
from effjax.decoding.pld import context
from effjax.decoding.sampling import GREEDY, Sampler
from effjax.decoding.tree import Tree, count_appended, select_tree, step_or_root
from effjax.models.transformer import Transformer


def match_lengths(ctx: jax.Array, length: jax.Array, max_depth: int) -> jax.Array:
  """[B, S]: for each i < length - 1, the length of the longest common suffix of ctx[:i + 1] and
  ctx[:length], at most max_depth; 0 elsewhere."""
  b, s = ctx.shape
  pos = jnp.arange(s)[None, :]
  tail = jnp.take_along_axis(ctx, jnp.maximum(length[:, None] - 1 - jnp.arange(max_depth), 0),
                             axis=1)  # [B, D]: the text's last tokens, last first
  run = pos < length[:, None] - 1
  out = jnp.zeros((b, s), jnp.int32)
  for d in range(max_depth):
    shifted = jnp.pad(ctx, ((0, 0), (d, 0)), constant_values=-1)[:, :s]  # ctx[i - d]
    run = run & (shifted == tail[:, d:d + 1]) & (d < length[:, None])
    out = out + run
  return out


@struct.dataclass
class SuffixCandidates:
  """A draft trie as select_tree candidates, [B, K * depth] in depth-major order (candidate
  j * K + k is the (j + 1)-th token after occurrence k); select_tree merges the copies of a
  prefix."""

  parent: jax.Array  # candidate index of the parent, -1 = the root
  tokens: jax.Array
  prob: jax.Array  # support / occurrences (equal on the copies of one prefix)
  ratio: jax.Array  # support / the parent's support
  valid: jax.Array
  first: jax.Array  # candidate index of the first copy of the same prefix (itself if first)
  match: jax.Array  # [B] the chosen match length (0: no draft)
  levels: tuple[int, ...]

  def keep(self, score: jax.Array, wanted: jax.Array, budget: jax.Array) -> jax.Array:
    """The candidates of the budget[b] best distinct prefixes among `wanted` (by score, ties to
    earlier ones), with all their copies (select_tree merges them, re-parenting children)."""
    is_first = self.first == jnp.arange(self.first.shape[1])[None, :]
    best = keep_best(score, self.valid & wanted & is_first, budget)
    return self.valid & jnp.take_along_axis(best, self.first, axis=1)


def _trie(ctx, length, m, ell, k: int, depth: int):
  """One row, one match length ell: the continuations of the k most recent positions whose match
  length is >= ell, merged into a trie. Returns tokens, prob, ratio, valid, first: [depth * k]."""
  s = ctx.shape[0]
  last, _ = jax.lax.top_k(jnp.where(m >= ell, jnp.arange(s), -1), k)  # latest first
  occ = last >= 0
  n_occ = jnp.maximum(occ.sum(), 1)
  at = last[:, None] + 1 + jnp.arange(depth)[None, :]  # [K, depth]
  cont = ctx[jnp.clip(at, 0, s - 1)]
  real = occ[:, None] & (at < length)
  # same[k, k2, j]: occurrences k and k2 continue alike through token j.
  same = jnp.cumprod((cont[:, None, :] == cont[None, :, :]) & real[:, None, :] & real[None, :, :],
                     axis=-1).astype(bool)
  support = same.sum(axis=1)
  first = jnp.argmax(same, axis=1) + k * jnp.arange(depth)[None, :]
  above = jnp.concatenate([jnp.full((k, 1), n_occ), support[:, :-1]], axis=1)
  flat = lambda x: x.T.reshape(-1)  # depth-major
  return (flat(cont), flat(support / n_occ), flat(support / jnp.maximum(above, 1)), flat(real),
          flat(first))


def suffix_candidates(ctx: jax.Array, length: jax.Array, *, occurrences: int, depth: int,
                      max_depth: int, max_spec: int, alpha: float, offset: float,
                      min_token_prob: float) -> SuffixCandidates:
  """SuffixDecoding's choice of match length: for every m = 1..max_depth, the trie of the
  continuations (up to `depth` tokens) of the `occurrences` most recent occurrences of the text's
  last m tokens is scored by the sum of p over its best min(max_spec, alpha * m + offset) nodes
  with p >= min_token_prob (the expected accepted length); the best m wins, ties to the longer."""
  b, s = ctx.shape
  k = min(occurrences, s)
  m = match_lengths(ctx, length, max_depth)
  ells = jnp.arange(1, max_depth + 1)
  per_ell = jax.vmap(lambda ell: jax.vmap(lambda c, n, mm: _trie(c, n, mm, ell, k, depth))(
      ctx, length, m))(ells)  # each [L, B, C]
  tokens, prob, ratio, valid, first = per_ell
  is_first = first == jnp.arange(k * depth)
  p = jnp.where(valid & is_first & (prob >= min_token_prob), prob, 0.0)
  budget = jnp.minimum(max_spec, jnp.floor(alpha * ells + offset)).astype(jnp.int32)  # [L]
  best_p = -jnp.sort(-p, axis=-1)
  score = jnp.where(jnp.arange(k * depth) < budget[:, None, None], best_p, 0.0).sum(-1)  # [L, B]
  chosen = max_depth - 1 - jnp.argmax(score[::-1], axis=0)  # ties to the longer match
  has = score.max(axis=0) > 0
  pick = lambda x: jnp.take_along_axis(x, chosen[None, :, None], axis=0)[0]
  parent = jnp.arange(k * depth) - k
  return SuffixCandidates(
      parent=jnp.broadcast_to(jnp.where(parent >= 0, parent, -1), (b, k * depth)),
      tokens=pick(tokens), prob=pick(prob), ratio=pick(ratio), valid=pick(valid) & has[:, None],
      first=pick(first), match=jnp.where(has, chosen + 1, 0),
      levels=tuple(j + 1 for j in range(depth) for _ in range(k)))


def keep_best(score: jax.Array, valid: jax.Array, budget: jax.Array) -> jax.Array:
  """valid & among the budget[b] best valid scores of its row (ties: earlier candidates first)."""
  c = score.shape[1]
  order = jnp.argsort(jnp.where(valid, -score, jnp.inf), axis=1, stable=True)
  rank = jnp.zeros_like(order).at[jnp.arange(score.shape[0])[:, None], order].set(
      jnp.arange(c)[None, :])
  return valid & (rank < budget[:, None])


@struct.dataclass
class SuffixState:
  hist: jax.Array  # [B, max_spec + 2] model calls by tokens appended


@dataclasses.dataclass(frozen=True, eq=False)
class SuffixDecoding(Strategy):
  """A suffix drafter with SuffixDecoding's defaults (tree mode): up to `max_spec` draft nodes,
  at most alpha * M + offset of them for a longest match of M tokens, nodes of probability below
  `min_token_prob` dropped; match lengths capped at `max_depth`; the continuations of the
  `occurrences` most recent occurrences of the match."""

  max_spec: int = 16
  alpha: float = 1.0
  offset: float = 0.0
  min_token_prob: float = 0.1
  max_depth: int = 64
  occurrences: int = 16
  sampler: Sampler = GREEDY

  def __post_init__(self):
    if self.max_spec < 1 or self.max_depth < 1 or self.occurrences < 1:
      raise ValueError(f"max_spec, max_depth and occurrences must be >= 1, got {self.max_spec}, "
                       f"{self.max_depth}, {self.occurrences}")
    if self.alpha < 0 or not 0 <= self.min_token_prob <= 1:
      raise ValueError(f"need alpha >= 0 and 0 <= min_token_prob <= 1, got {self.alpha}, "
                       f"{self.min_token_prob}")

  @property
  def block_size(self) -> int:
    return self.max_spec + 1

  @property
  def max_step_tokens(self) -> int:
    return self.max_spec + 1

  def prefill(self, model, state, key):
    state = super().prefill(model, state, key)
    return state.replace(extra=SuffixState(jnp.zeros((state.length.shape[0],
                                                      self.max_step_tokens + 1), jnp.int32)))

  def draft(self, state: DecodeState) -> Tree:
    ctx, length = context(state)
    c = suffix_candidates(ctx, length, occurrences=self.occurrences, depth=self.max_spec,
                          max_depth=self.max_depth, max_spec=self.max_spec, alpha=self.alpha,
                          offset=self.offset, min_token_prob=self.min_token_prob)
    budget = jnp.minimum(self.max_spec,
                         jnp.floor(self.alpha * c.match + self.offset).astype(jnp.int32))
    keep = c.keep(c.prob, c.prob >= self.min_token_prob, budget)
    return select_tree(state.last, c.parent, c.tokens, jnp.log(jnp.maximum(c.prob, 1e-30)), keep,
                       c.levels, self.max_spec)

  def step(self, model: Transformer, state: DecodeState, key: jax.Array) -> DecodeState:
    active = ~state.done
    new, appended = step_or_root(model, state, self.draft(state), self.max_spec, self.sampler, key)
    return new.replace(extra=SuffixState(count_appended(state.extra.hist, appended, active)))
