"""Stream named tensors into an abstract model: no random init, strict about names and shapes.

Every checkpoint reader (HF safetensors, GGUF, Orbax) produces (param path, numpy array) pairs in
effjax's own naming (e.g. "layers.3.attn.q.weight", see `param_names`); `assemble` places each one
on device (with its NamedSharding when a mesh is given) as it arrives, so peak host memory is one
tensor, and fails with a clear error on anything missing, extra or mis-shaped.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.models.config import ModelConfig
from effjax.models.sharding import DEFAULT_RULES, ShardingRules, state_shardings
from effjax.models.transformer import Transformer, abstract_model


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: the message names the file and the tensor."""


def _key(path) -> str:
  return ".".join(str(p) for p in path)


def param_names(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
  """Every parameter of a model of `cfg`: name -> (shape, dtype)."""
  _, state = nnx.split(abstract_model(cfg))
  return {_key(path): (tuple(v.get_value().shape), str(v.get_value().dtype))
          for path, v in nnx.to_flat_state(state)}


def assemble(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], *, source: str,
             mesh=None, rules: ShardingRules = DEFAULT_RULES) -> Transformer:
  """Build a Transformer of `cfg` from (name, array) pairs read from `source` (for messages)."""
  graphdef, abstract = nnx.split(abstract_model(cfg))
  flat = dict((_key(p), v) for p, v in nnx.to_flat_state(abstract))
  shardings = None
  if mesh is not None:
    shardings = dict((_key(p), s) for p, s in nnx.to_flat_state(state_shardings(abstract, mesh, rules)))
  filled: dict[str, jax.Array] = {}
  for name, array in tensors:
    if name not in flat:
      raise CheckpointError(f"{source}: unexpected tensor {name!r} (shape {tuple(array.shape)}); "
                            f"the {cfg.family} model has no such parameter")
    if name in filled:
      raise CheckpointError(f"{source}: tensor {name!r} appears twice")
    want = flat[name].get_value()
    if tuple(array.shape) != tuple(want.shape):
      raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, "
                            f"the config expects {tuple(want.shape)}")
    if not np.all(np.isfinite(array)):
      raise CheckpointError(f"{source}: tensor {name!r} holds NaN or inf values")
    value = jnp.asarray(array, dtype=want.dtype)
    if shardings is not None:
      value = jax.device_put(value, shardings[name])
    filled[name] = value
  missing = sorted(set(flat) - set(filled))
  if missing:
    more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
    raise CheckpointError(f"{source}: missing tensors {missing[:5]}{more}")
  for path, var in nnx.to_flat_state(abstract):
    var.set_value(filled[_key(path)])
  return nnx.merge(graphdef, abstract)
