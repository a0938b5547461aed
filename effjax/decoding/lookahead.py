"""Lookahead decoding (LADE; Fu et al. 2024) as an engine strategy.

One forward per step holds two branches behind one attention mask:

- the lookahead branch, a window of W columns and N-1 rows. Row 0 is [root, W-1 guesses], rows
  1..N-2 hold older Jacobi iterates. Token (r, i) sits at position p0 + r + i and sees row 0 up to
  column i and the tokens of column i in rows 1..r: a diagonal trajectory. The outputs of the last
  row are the new Jacobi level. Each column then yields an N-gram (row 0 .. row N-2, new token),
  stored in the pool under its first token, and the rows shift up by one.
- the verification branch, up to G pooled N-grams whose first token is the root: their N-1 other
  tokens follow the root as separate chains (each sees the root and its own earlier tokens).

Verification walks the model's own chain: at each depth the model's token (argmax, or a sample at
temperature > 0) is compared with the chains that still match, so the output is exactly plain
decoding's (greedy) or distributed exactly as plain sampling. The root and the accepted tokens of
the followed chain stay in the KV cache; everything else is dropped by `cache.commit`.

Static shapes throughout: the window, a hashed n-gram pool of fixed size (buckets of G entries,
each entry remembering its key token; a repeated n-gram is refreshed, a new one replaces the
oldest entry), and one block of (N-1)(W+G) tokens per step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from effjax.decoding.engine import DecodeState, Strategy, append_tokens
from effjax.decoding.sampling import GREEDY, Sampler
from effjax.decoding.topk import argmax
from effjax.models.cache import commit
from effjax.models.transformer import Transformer

# (N, W, G) per block complexity BC = (N-1)(W+G) (ESP.md), and Spec-Bench's own setting.
PRESETS: dict[int, tuple[int, int, int]] = {10: (3, 4, 1), 30: (4, 5, 5), 60: (5, 8, 7)}
SPEC_BENCH = (5, 7, 7)


@functools.lru_cache(maxsize=None)
def lookahead_layout(n: int, w: int, g: int) -> tuple[np.ndarray, np.ndarray]:
  """The block's attention mask [T, T] (query, key) and position offsets [T] from the root.

  Order: the window row by row ((r, i) at r*w + i; (0, 0) is the root), then the G chains of N-1
  tokens ((k, j) at (n-1)*w + k*(n-1) + j).
  """
  rows, t = n - 1, (n - 1) * (w + g)
  mask = np.zeros((t, t), bool)
  offset = np.zeros(t, np.int32)
  r, i = np.divmod(np.arange(rows * w), w)
  la = slice(0, rows * w)
  # Lookahead: row 0 up to the same column, and the same column in rows 1..r.
  mask[la, la] = (((r[None, :] == 0) & (i[None, :] <= i[:, None]))
                  | ((r[None, :] >= 1) & (r[None, :] <= r[:, None]) & (i[None, :] == i[:, None])))
  offset[la] = r + i
  k, j = np.divmod(np.arange(g * rows), rows)
  vb = slice(rows * w, t)
  mask[vb, 0] = True  # every chain follows the root
  mask[vb, vb] = (k[None, :] == k[:, None]) & (j[None, :] <= j[:, None])
  offset[vb] = 1 + j
  return mask, offset


@struct.dataclass
class LookaheadState:
  window: jax.Array  # [B, N-1, W] (row 0, column 0 is overwritten by the root each step)
  pool_keys: jax.Array  # [B, K, G] first token of each stored n-gram, -1 = empty
  pool_grams: jax.Array  # [B, K, G, N-1] the tokens that follow it
  pool_stamp: jax.Array  # [B, K, G] step of the last insertion or refresh, -1 = empty
  hist: jax.Array  # [B, N] decode steps by tokens appended (1..N)


def pool_lookup(keys, grams, token, buckets: int):
  """The entries stored under `token` [B]: n-grams [B, G, N-1] and which are real [B, G]."""
  bucket = token % buckets
  k = jnp.take_along_axis(keys, bucket[:, None, None], axis=1)[:, 0]
  gr = jnp.take_along_axis(grams, bucket[:, None, None, None], axis=1)[:, 0]
  return gr, k == token[:, None]


def pool_insert(keys, grams, stamp, key_tok, gram, now, enabled, buckets: int):
  """Insert one n-gram per row (key_tok [B], gram [B, N-1]) where `enabled` [B].

  A bucket entry with the same key and tokens is refreshed; otherwise the empty or oldest entry of
  the bucket is replaced.
  """
  bucket = key_tok % buckets

  def one(keys, grams, stamp, bucket, key_tok, gram, enabled):
    kb, gb, sb = keys[bucket], grams[bucket], stamp[bucket]
    same = (kb == key_tok) & (gb == gram[None, :]).all(axis=-1)
    slot = jnp.where(same.any(), jnp.argmax(same), jnp.argmin(sb))
    # A disabled row writes its bucket back unchanged: one bucket is touched either way.
    def put(buf, row, value):
      return buf.at[bucket].set(jnp.where(enabled, row.at[slot].set(value), row))

    return put(keys, kb, key_tok), put(grams, gb, gram), put(stamp, sb, now)

  return jax.vmap(one)(keys, grams, stamp, bucket, key_tok, gram, enabled)


def walk_chains(sampler: Sampler, root_logits, chain_logits, chains, valid, key):
  """Verify chains that all start after the root by following the model's own tokens.

  root_logits [B, V]; chain_logits [B, G, L, V] at each chain token; chains [B, G, L]; valid [B, G].
  At depth j the model's token is drawn from the logits of the accepted prefix (argmax when
  greedy); a chain that still matches and has that token moves the walk on. Returns the tokens
  [B, L+1] (accepted chain tokens, then the model's token at the first miss or after the last
  depth), the number accepted [B] and the chain followed [B].
  """
  b, g, depth = chains.shape
  rows = jnp.arange(b)
  logits, alive = root_logits, valid
  running = jnp.ones((b,), bool)
  accepted = jnp.zeros((b,), jnp.int32)
  chosen = jnp.zeros((b,), jnp.int32)
  out = []
  for j in range(depth + 1):
    tok = sampler(logits, jax.random.fold_in(key, j))
    out.append(tok)
    if j == depth:
      break
    match = alive & (chains[:, :, j] == tok[:, None])
    hit = running & match.any(axis=1)
    first = jnp.argmax(match, axis=1).astype(jnp.int32)
    accepted = accepted + hit
    chosen = jnp.where(hit, first, chosen)
    logits = jnp.where(hit[:, None], chain_logits[rows, first, j], logits)
    alive = match
    running = hit
  return jnp.stack(out, axis=1), accepted, chosen


@dataclasses.dataclass(frozen=True, eq=False)
class Lookahead(Strategy):
  """Lookahead decoding with N-gram size `level`, window `window`, `guess` verified n-grams."""

  level: int = 5
  window: int = 7
  guess: int = 7
  pool_buckets: int = 4096
  sampler: Sampler = GREEDY

  def __post_init__(self):
    if self.level < 3 or self.window < 2 or self.guess < 1 or self.pool_buckets < 1:
      raise ValueError(f"lookahead needs level >= 3, window >= 2, guess >= 1 and pool_buckets "
                       f">= 1; got N={self.level}, W={self.window}, G={self.guess}, "
                       f"buckets={self.pool_buckets}")

  @classmethod
  def preset(cls, bc: int, **kw) -> "Lookahead":
    if bc not in PRESETS:
      raise ValueError(f"no lookahead preset for BC={bc}; presets: {sorted(PRESETS)}")
    n, w, g = PRESETS[bc]
    return cls(level=n, window=w, guess=g, **kw)

  @property
  def block_size(self) -> int:
    return (self.level - 1) * (self.window + self.guess)

  @property
  def max_step_tokens(self) -> int:
    return self.level

  def _seeds(self, state: DecodeState, key, shape) -> jax.Array:
    """Tokens drawn uniformly from each row's prompt, [B, *shape]."""
    b = state.prompt.shape[0]
    u = jax.random.uniform(key, (b,) + shape)
    idx = (u * state.prompt_len.reshape((b,) + (1,) * len(shape))).astype(jnp.int32)
    return jnp.take_along_axis(state.prompt, idx.reshape(b, -1), axis=1).reshape(idx.shape)

  def prefill(self, model, state, key):
    state = super().prefill(model, state, key)
    n, g, k = self.level, self.guess, self.pool_buckets
    b = state.prompt.shape[0]
    extra = LookaheadState(
        window=self._seeds(state, jax.random.fold_in(key, 1), (n - 1, self.window)),
        pool_keys=jnp.full((b, k, g), -1, jnp.int32),
        pool_grams=jnp.zeros((b, k, g, n - 1), jnp.int32),
        pool_stamp=jnp.full((b, k, g), -1, jnp.int32),
        hist=jnp.zeros((b, n), jnp.int32))
    return state.replace(extra=extra)

  def step(self, model: Transformer, state: DecodeState, key: jax.Array) -> DecodeState:
    n, w, g, nb = self.level, self.window, self.guess, self.pool_buckets
    rows, b = n - 1, state.last.shape[0]
    la: LookaheadState = state.extra
    mask, offset = lookahead_layout(n, w, g)
    chains, valid = pool_lookup(la.pool_keys, la.pool_grams, state.last, nb)
    window = la.window.at[:, 0, 0].set(state.last)
    tokens = jnp.concatenate([window.reshape(b, rows * w), chains.reshape(b, g * rows)], axis=1)
    out = model(tokens, positions=state.cache.index[:, None] + jnp.asarray(offset)[None],
                attn_mask=jnp.broadcast_to(jnp.asarray(mask), (b,) + mask.shape),
                cache=state.cache, advance=False, compute_logits=False)
    # Logits only where they are read: the root, the chains, the window's last row.
    chain_at = rows * w + np.arange(g * rows)
    last_row = (rows - 1) * w + np.arange(w)
    logits = model.logits(out.hidden[:, np.concatenate([[0], chain_at, last_row])])
    chain_logits = logits[:, 1:1 + g * rows].reshape(b, g, rows, -1)

    k_walk, k_seed = jax.random.split(key)
    new, accepted, chosen = walk_chains(self.sampler, logits[:, 0], chain_logits, chains, valid,
                                        k_walk)
    before = state.length
    state = append_tokens(state, new, accepted + 1)
    appended = state.length - before  # 0 for rows already done: their cache does not move
    keep = jnp.concatenate([jnp.zeros((b, 1), jnp.int32),
                            rows * w + chosen[:, None] * rows + jnp.arange(rows)[None]], axis=1)
    cache = commit(state.cache, out.block.take(keep), appended)

    # Next Jacobi level (always greedy, as in LADE); EOS guesses are replaced by prompt tokens.
    level = argmax(logits[:, -w:])
    is_eos = (level[:, :, None] == state.eos[None, None, :]).any(axis=-1)
    level = jnp.where(is_eos, self._seeds(state, k_seed, (w,)), level)
    # Harvest one n-gram per column once the rows hold Jacobi iterates (after N-2 steps).
    grams = jnp.concatenate([jnp.swapaxes(window[:, 1:], 1, 2), level[:, :, None]], axis=2)
    enabled = (state.calls >= n - 2) & (appended > 0)
    keys, pgrams, stamp = la.pool_keys, la.pool_grams, la.pool_stamp
    for i in range(w):
      keys, pgrams, stamp = pool_insert(keys, pgrams, stamp, window[:, 0, i], grams[:, i],
                                        state.calls, enabled, nb)
    hist = la.hist.at[jnp.arange(b), jnp.maximum(appended - 1, 0)].add(
        (appended > 0).astype(jnp.int32))
    extra = LookaheadState(window=jnp.concatenate([window[:, 1:], level[:, None]], axis=1),
                           pool_keys=keys, pool_grams=pgrams, pool_stamp=stamp, hist=hist)
    return state.replace(cache=cache, calls=state.calls + 1, extra=extra)
