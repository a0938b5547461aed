"""The two-pass vocabulary top-k equals lax.top_k, ties and ragged chunks included."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.decoding.topk import top_k, top_log_probs


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
