"""The top-k and the argmax of distributions over the vocabulary, for drafting from every verified
position and for greedy choices.

XLA:CPU's TopK reads the whole last axis keeping a heap per row, and `lax.top_k` of `log_softmax`
would also write and read the normalised copy. Here one pass takes the maximum of each chunk of
`chunk` entries, and the top k are sought only in the k chunks with the largest maxima: a value
among the k largest lies in one of them, since each chunk ranked above its own holds a value at
least as large. With the log-sum-exp, 54 rows take 0.55x the old form's time over SmolLM2's
vocabulary and 0.40x over Gemma 3's (`python benchmarks/topk.py`, BENCHMARKS.md). XLA:CPU's
argmax is a variadic (value, index) reduce that is not vectorised; the same chunking makes it a
vectorised max and an argmax over the chunks and over one chunk (54 x 49152 logits: 0.19 ms
against 5.30 ms, same script).

Both forms are XLA:CPU's, chosen when a program is lowered for its devices: TPU and GPU programs
keep `lax.top_k` and `jnp.argmax`, which those compilers implement themselves (and libtpu 0.0.42.1
rejects the chunk gather inside the hybrid's batch-64 decode loop, a RET_CHECK after layout
assignment: benchmarks/notes/paper_scale.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 128


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """x [..., V] as [..., ceil(V / chunk), chunk], padded with -inf."""
  v = x.shape[-1]
  n = -(-v // chunk)
  pad = [(0, 0)] * (x.ndim - 1) + [(0, n * chunk - v)]
  return jnp.pad(x, pad, constant_values=-jnp.inf).reshape(x.shape[:-1] + (n, chunk))


def top_k(x: jax.Array, k: int, chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k(x, k)` (values and indices over the last axis, equal values in index order),
  on CPU in two passes over chunks; rows shorter than 4 k chunks go to `lax.top_k` directly."""
  if x.shape[-1] < 4 * k * chunk:
    return jax.lax.top_k(x, k)
  return jax.lax.platform_dependent(x, cpu=lambda x: _two_pass_top_k(x, k, chunk),
                                    default=lambda x: tuple(jax.lax.top_k(x, k)))


def _two_pass_top_k(x: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
  chunks = _chunks(x, chunk)
  # Chunks with equal maxima rank by index (lax.top_k's order), and the chosen ones stay in index
  # order, so ties among values resolve as over the whole row.
  best = jnp.sort(jax.lax.top_k(chunks.max(axis=-1), k)[1], axis=-1)
  pool = jnp.take_along_axis(chunks, best[..., None], axis=-2).reshape(x.shape[:-1] + (k * chunk,))
  values, at = jax.lax.top_k(pool, k)
  return values, jnp.take_along_axis(best, at // chunk, axis=-1) * chunk + at % chunk


def argmax(x: jax.Array, chunk: int = CHUNK) -> jax.Array:
  """`jnp.argmax(x, axis=-1)` as int32 (the first maximum; the first NaN where there is one); on CPU
  the first chunk holding the row's maximum, then the first maximum within it."""
  whole = lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)
  if x.shape[-1] < 4 * chunk:
    return whole(x)
  return jax.lax.platform_dependent(x, cpu=lambda x: _two_pass_argmax(x, chunk), default=whole)


def _two_pass_argmax(x: jax.Array, chunk: int) -> jax.Array:
  chunks = _chunks(x, chunk)
  best = jnp.argmax(chunks.max(axis=-1), axis=-1)
  within = jnp.take_along_axis(chunks, best[..., None, None], axis=-2)[..., 0, :]
  return (best * chunk + jnp.argmax(within, axis=-1)).astype(jnp.int32)


def top_log_probs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k most probable tokens of each distribution [..., V] (int32) and their log-probabilities,
  best first: log_softmax's values without writing a normalised copy of the logits."""
  logits = logits.astype(jnp.float32)
  top, tokens = top_k(logits, k)
  return tokens.astype(jnp.int32), top - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
