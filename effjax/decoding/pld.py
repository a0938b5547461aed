"""Prompt lookup decoding (PLD): draft by copying what followed the last n-gram earlier in the text.

The last n tokens of prompt + generated text (n = 3, then 2, then 1) are searched for in that same
text; the first earlier occurrence's next `draft_len` tokens become a chain that one forward
verifies (greedy, or the sampling walk at temperature > 0: lossless either way). The search is a
vectorised comparison over the fixed prompt and token buffers, so the step stays jittable. A step in
which no row has a draft forwards the root alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from effjax.decoding.engine import DecodeState, Strategy
from effjax.decoding.sampling import GREEDY, Sampler
from effjax.decoding.tree import Layout, Tree, count_appended, step_or_root
from effjax.models.transformer import Transformer


@struct.dataclass
class PLDState:
  hist: jax.Array  # [B, draft_len + 2] model calls by tokens appended


def context(state: DecodeState) -> tuple[jax.Array, jax.Array]:
  """Prompt + generated tokens contiguous per row: [B, P + N] and the lengths [B]."""
  b, p = state.prompt.shape
  n = state.tokens.shape[1]
  i = jnp.arange(p + n)[None, :]
  plen = state.prompt_len[:, None]
  from_prompt = jnp.take_along_axis(state.prompt, jnp.minimum(i, p - 1), axis=1)
  from_tokens = jnp.take_along_axis(state.tokens, jnp.clip(i - plen, 0, n - 1), axis=1)
  return jnp.where(i < plen, from_prompt, from_tokens), state.prompt_len + state.length


def lookup(ctx: jax.Array, length: jax.Array, max_ngram: int, draft_len: int, min_ngram: int = 1):
  """Draft [B, draft_len] and its valid length [B] for text ctx[:, :length] (lookup_match)."""
  return lookup_match(ctx, length, max_ngram, draft_len, min_ngram)[:2]


def lookup_match(ctx: jax.Array, length: jax.Array, max_ngram: int, draft_len: int,
                 min_ngram: int = 1):
  """Draft [B, draft_len], its valid length [B] and the matched n-gram's length [B] for text
  ctx[:, :length].

  For n = max_ngram..min_ngram: the first position i where ctx[i:i+n] equals the last n tokens
  and the copy starts before that n-gram (i + n < length - n), as the reference implementation
  does; the draft is what follows, cut at the end of the text. Rows without a match get length 0
  (and n = 0).
  """
  b, s = ctx.shape
  pos = jnp.arange(s)[None, :]
  draft = jnp.zeros((b, draft_len), jnp.int32)
  valid_len = jnp.zeros((b,), jnp.int32)
  found_any = jnp.zeros((b,), bool)
  ngram = jnp.zeros((b,), jnp.int32)
  for n in range(max_ngram, min_ngram - 1, -1):
    gram = jnp.take_along_axis(ctx, jnp.maximum(length[:, None] - n + jnp.arange(n)[None, :], 0),
                               axis=1)
    match = pos + n < length[:, None] - n
    for j in range(n):
      shifted = jnp.take_along_axis(ctx, jnp.minimum(pos + j, s - 1), axis=1)
      match = match & (shifted == gram[:, j:j + 1])
    found = match.any(axis=1) & ~found_any
    begin = jnp.argmax(match, axis=1) + n
    copy = jnp.take_along_axis(ctx, jnp.minimum(begin[:, None] + jnp.arange(draft_len)[None, :],
                                                 s - 1), axis=1)
    draft = jnp.where(found[:, None], copy, draft)
    valid_len = jnp.where(found, jnp.minimum(draft_len, length - begin), valid_len)
    ngram = jnp.where(found, n, ngram)
    found_any = found_any | found
  return draft.astype(jnp.int32), valid_len, ngram


def chain_tree(root: jax.Array, draft: jax.Array, valid_len: jax.Array) -> Tree:
  b, n = draft.shape
  layout = Layout.chain(n)
  return Tree(tokens=jnp.concatenate([root[:, None], draft], axis=1).astype(jnp.int32),
              parent=layout.parent_array(b), valid=jnp.arange(n + 1)[None, :] <= valid_len[:, None],
              layout=layout)


@dataclasses.dataclass(frozen=True, eq=False)
class PromptLookup(Strategy):
  """PLD with the reference settings (n = 3..1, 10 tokens). min_ngram > 1 drafts only on longer
  matches, which are right more often: fewer multi-token forwards where they cost much (CPU)."""

  max_ngram: int = 3
  draft_len: int = 10
  min_ngram: int = 1
  sampler: Sampler = GREEDY
  hooks = True

  def __post_init__(self):
    if not 1 <= self.min_ngram <= self.max_ngram or self.draft_len < 1:
      raise ValueError(f"need 1 <= min_ngram <= max_ngram and draft_len >= 1, got min_ngram="
                       f"{self.min_ngram}, max_ngram={self.max_ngram}, draft_len={self.draft_len}")

  @property
  def block_size(self) -> int:
    return self.draft_len + 1

  @property
  def max_step_tokens(self) -> int:
    return self.draft_len + 1

  def prefill(self, model, state, key):
    state = super().prefill(model, state, key)
    return state.replace(extra=PLDState(jnp.zeros((state.length.shape[0],
                                                   self.max_step_tokens + 1), jnp.int32)))

  def step(self, model: Transformer, state: DecodeState, key: jax.Array) -> DecodeState:
    ctx, length = context(state)
    draft, valid_len = lookup(ctx, length, self.max_ngram, self.draft_len, self.min_ngram)
    tree = chain_tree(state.last, draft, valid_len)
    new, appended = step_or_root(model, state, tree, self.draft_len, self.sampler, key)
    return new.replace(extra=PLDState(count_appended(state.extra.hist, appended, ~state.done)))
