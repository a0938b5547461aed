"""The top-k of a distribution over the vocabulary, for drafting from every verified position.

XLA:CPU's TopK reads the whole last axis keeping a heap per row, and `lax.top_k` of `log_softmax`
would also write and read the normalised copy. Here one pass takes the maximum of each chunk of
`chunk` entries, and the top k are sought only in the k chunks with the largest maxima: a value
among the k largest lies in one of them, since each chunk ranked above its own holds a value at
least as large. With the log-sum-exp, 54 rows take 0.55x the old form's time over SmolLM2's
vocabulary and 0.40x over Gemma 3's (`python benchmarks/topk.py`, BENCHMARKS.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 128


def top_k(x: jax.Array, k: int, chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k(x, k)` (values and indices over the last axis, equal values in index order),
  in two passes over chunks; rows shorter than 4 k chunks go to `lax.top_k` directly."""
  v = x.shape[-1]
  if v < 4 * k * chunk:
    return jax.lax.top_k(x, k)
  n = -(-v // chunk)
  pad = [(0, 0)] * (x.ndim - 1) + [(0, n * chunk - v)]
  chunks = jnp.pad(x, pad, constant_values=-jnp.inf).reshape(x.shape[:-1] + (n, chunk))
  # Chunks with equal maxima rank by index (lax.top_k's order), and the chosen ones stay in index
  # order, so ties among values resolve as over the whole row.
  best = jnp.sort(jax.lax.top_k(chunks.max(axis=-1), k)[1], axis=-1)
  pool = jnp.take_along_axis(chunks, best[..., None], axis=-2).reshape(x.shape[:-1] + (k * chunk,))
  values, at = jax.lax.top_k(pool, k)
  return values, jnp.take_along_axis(best, at // chunk, axis=-1) * chunk + at % chunk


def top_log_probs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k most probable tokens of each distribution [..., V] (int32) and their log-probabilities,
  best first: log_softmax's values without writing a normalised copy of the logits."""
  logits = logits.astype(jnp.float32)
  top, tokens = top_k(logits, k)
  return tokens.astype(jnp.int32), top - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
