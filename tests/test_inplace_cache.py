"""The compiled decode loop updates the KV cache in place: no copy of a whole per-layer K or V buffer.

XLA:CPU copies every buffer a `lax.cond` / `lax.switch` branch writes (one copy in the branch and
one at the operand, each step), so a step that wrote the cache inside a conditional would move the
whole cache twice. Tree steps only read the cache and commit the kept K/V after any conditional:
pld and suffix choose the tree or the root alone with `lax.cond`, auto its budget with `lax.switch`.
"""

import pytest

from effjax.decoding.cost_model import CostModel
from effjax.decoding.methods import make_strategy
from effjax.models import create_model, tiny_config
from decode_hlo import decode_loop_hlo


def whole_cache_copies(method: str, bc: int | None) -> int:
  strategy = make_strategy(method, bc)
  if method == "auto":  # a cost model under which every budget can win
    strategy = strategy.with_cost_model(CostModel(tuple((128, k, 1e-3 * (1 + 0.01 * k))
                                                        for k in sorted(set(strategy.blocks)))))
  hlo, shapes = decode_loop_hlo(create_model(tiny_config("llama")), strategy)
  buffer = "f32[" + ",".join(map(str, shapes.cache.k[0].shape)) + "]"
  return sum(1 for line in hlo.splitlines()
             if " copy(" in line and line.split(" copy(")[0].split("= ")[-1].startswith(buffer))


@pytest.mark.parametrize("method,bc", [("ar", None), ("esp", 10), ("hybrid", 30), ("tr", 30),
                                       ("pld", None), ("suffix", None), ("lookahead", None),
                                       ("auto", None)])
def test_decode_loop_updates_the_cache_in_place(method, bc):
  assert whole_cache_copies(method, bc) == 0
