"""The optimized HLO of a model's compiled decode loop, for tests that inspect what XLA made of it
(copies of the KV cache, of int8 weights)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.decoding.engine import init_state, jitted_programs


def decode_loop_hlo(model, strategy, *, max_new_tokens: int = 32, cache_len: int = 128):
  """(HLO text of the decode loop after a 10-token prompt at batch 1, the state's shapes)."""
  cfg = model.cfg
  graphdef, params = nnx.split(model)
  prefill, decode = jitted_programs(graphdef, strategy)
  state = init_state(cfg, jnp.zeros((1, 16), jnp.int32), jnp.array([10]), max_new_tokens,
                     jax.random.key(0), max_new_tokens=max_new_tokens, cache_len=cache_len,
                     eos=np.array([1]), stop=np.zeros((0, 1), np.int32), strategy=strategy)
  shapes = jax.eval_shape(prefill, params, state)
  return decode.lower(params, shapes, jnp.int32(4)).compile().as_text(), shapes
