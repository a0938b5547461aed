"""The compiled decode loop updates the KV cache in place: no copy of a whole per-layer K or V buffer.

XLA:CPU copies every buffer a `lax.cond` / `lax.switch` branch writes (one copy in the branch and
one at the operand, each step), so a step that wrote the cache inside a conditional would move the
whole cache twice. Tree steps only read the cache and commit the kept K/V after any conditional:
pld and suffix choose the tree or the root alone with `lax.cond`, auto its budget with `lax.switch`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.decoding.cost_model import CostModel
from effjax.decoding.engine import init_state, jitted_programs
from effjax.decoding.methods import make_strategy
from effjax.models import create_model, tiny_config


def whole_cache_copies(method: str, bc: int | None) -> int:
  cfg = tiny_config("llama")
  graphdef, params = nnx.split(create_model(cfg))
  strategy = make_strategy(method, bc)
  if method == "auto":  # a cost model under which every budget can win
    strategy = strategy.with_cost_model(CostModel(tuple((128, k, 1e-3 * (1 + 0.01 * k))
                                                        for k in sorted(set(strategy.blocks)))))
  prefill, decode = jitted_programs(graphdef, strategy)
  state = init_state(cfg, jnp.zeros((1, 16), jnp.int32), jnp.array([10]), 32, jax.random.key(0),
                     max_new_tokens=32, cache_len=128, eos=np.array([1]),
                     stop=np.zeros((0, 1), np.int32), strategy=strategy)
  shapes = jax.eval_shape(prefill, params, state)
  hlo = decode.lower(params, shapes, jnp.int32(4)).compile().as_text()
  buffer = "f32[" + ",".join(map(str, shapes.cache.k[0].shape)) + "]"
  return sum(1 for line in hlo.splitlines()
             if " copy(" in line and line.split(" copy(")[0].split("= ")[-1].startswith(buffer))


@pytest.mark.parametrize("method,bc", [("ar", None), ("esp", 10), ("hybrid", 30), ("tr", 30),
                                       ("pld", None), ("suffix", None), ("lookahead", None),
                                       ("auto", None)])
def test_decode_loop_updates_the_cache_in_place(method, bc):
  assert whole_cache_copies(method, bc) == 0
