"""The two-pass vocabulary top-k equals lax.top_k and the chunked argmax jnp.argmax, ties, NaNs and
ragged chunks included."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.decoding.topk import argmax, top_k, top_log_probs


@pytest.mark.parametrize("shape,k,chunk,levels", [
    ((3, 5, 49152), 8, 128, None),  # SmolLM2's vocabulary, distinct values
    ((4, 3001), 8, 16, 5),  # five values only: ties everywhere; a last chunk of 9 padded entries
    ((2, 2000), 60, 8, 40),  # k larger than a chunk
])
def test_equals_lax_top_k(shape, k, chunk, levels):
  key = jax.random.key(sum(shape) + k)
  x = (jax.random.normal(key, shape) if levels is None
       else jax.random.randint(key, shape, 0, levels).astype(jnp.float32))
  want_v, want_i = jax.lax.top_k(x, k)
  got_v, got_i = jax.jit(top_k, static_argnums=(1, 2))(x, k, chunk)
  chex.assert_shape(got_i, shape[:-1] + (k,))
  np.testing.assert_array_equal(got_v, want_v)
  np.testing.assert_array_equal(got_i, want_i)


def test_top_log_probs_are_log_softmax_top_k():
  logits = 4.0 * jax.random.normal(jax.random.key(0), (2, 3, 49152))
  tokens, logp = top_log_probs(logits, 8)
  want_logp, want_tokens = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), 8)
  chex.assert_type(tokens, jnp.int32)
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_allclose(logp, want_logp, atol=1e-5)


@pytest.mark.parametrize("shape,chunk,levels", [
    ((3, 5, 49152), 128, None),  # SmolLM2's vocabulary, distinct values
    ((6, 3001), 16, 3),  # three values only: the first maximum must win; a ragged last chunk
    ((2, 40), 16, None),  # shorter than four chunks: jnp.argmax itself
])
def test_argmax_equals_jnp_argmax(shape, chunk, levels):
  key = jax.random.key(sum(shape))
  x = (jax.random.normal(key, shape) if levels is None
       else jax.random.randint(key, shape, 0, levels).astype(jnp.float32))
  got = jax.jit(argmax, static_argnums=1)(x, chunk)
  chex.assert_type(got, jnp.int32)
  chex.assert_shape(got, shape[:-1])
  np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))


def test_argmax_of_rows_with_nans_and_infinities():
  x = np.zeros((4, 1000), np.float32)
  x[0, [700, 300]] = np.nan  # the first NaN, as jnp.argmax
  x[1] = -np.inf  # all -inf: index 0
  x[2, 999] = np.inf  # in the ragged last chunk
  x[3, [5, 640]] = 2.0  # a tie across chunks: the first
  got = argmax(jnp.asarray(x), 16)
  np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(x), axis=-1))
  np.testing.assert_array_equal(got, [300, 0, 999, 5])


def test_two_passes_on_cpu_only():
  """The chunked forms are XLA:CPU's: a program lowered for TPU or GPU keeps the whole-row top-k
  and argmax (no chunk gather), and the CPU program holds no conditional between the two."""
  x = jnp.ones((2, 3, 4096))
  for fn in (lambda x: top_k(x, 8), argmax):
    traced = jax.jit(fn).trace(x)
    for platform, chunked in (("cpu", True), ("tpu", False), ("cuda", False)):
      text = traced.lower(lowering_platforms=(platform,)).as_text()
      assert ("gather" in text) == chunked, platform
    assert " conditional(" not in traced.lower().compile().as_text()
