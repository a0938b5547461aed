"""Stream named tensors into an abstract model: no random init, strict about names and shapes.

Every checkpoint reader (HF safetensors, GGUF) produces (name, numpy array) pairs in effjax's
naming and the checkpoints' layout (see `checkpoint_names`): a linear map is "layers.3.attn.q.weight"
stored [out, in], as Hugging Face and GGUF both store it, while the model keeps it as
"layers.3.attn.q.kernel" [in, out], and the embedding tables are [D, V] in the model, [V, D] in
checkpoints; `assemble` transposes those. It places each tensor on device
(with its NamedSharding when a mesh is given) as it arrives, so peak host memory is one tensor, and
fails with a clear error on anything missing, extra or mis-shaped.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.errors import CheckpointError
from effjax.models.config import ModelConfig
from effjax.models.sharding import DEFAULT_RULES, ShardingRules, state_shardings
from effjax.models.transformer import Transformer, abstract_model


def _key(path) -> str:
  return ".".join(str(p) for p in path)


_KERNEL, _WEIGHT = ".kernel", ".weight"
_TABLES = ("embed", "lm_head")  # [D, V] in the model, [V, D] in checkpoints


def _checkpoint_layout(state) -> dict[str, tuple[str, tuple[int, ...], bool]]:
  """Checkpoint tensor name -> (parameter name, stored shape, stored transposed) for an (abstract)
  model state: a linear map's kernel [in, out] is stored as its weight [out, in], the embedding
  tables [D, V] as [V, D], everything else as is."""
  out = {}
  for path, v in nnx.to_flat_state(state):
    param, shape = _key(path), tuple(v.get_value().shape)
    name, transposed = param, param in _TABLES
    if param.endswith(_KERNEL):
      name, transposed = param[:-len(_KERNEL)] + _WEIGHT, True
    out[name] = (param, shape[::-1] if transposed else shape, transposed)
  return out


def checkpoint_names(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
  """Every tensor of a checkpoint of `cfg`, in the checkpoints' layout: name -> (shape, dtype)."""
  _, state = nnx.split(abstract_model(cfg))
  flat = dict((_key(p), v) for p, v in nnx.to_flat_state(state))
  return {name: (shape, str(flat[param].get_value().dtype))
          for name, (param, shape, _) in _checkpoint_layout(state).items()}


def assemble(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], *, source: str,
             mesh=None, rules: ShardingRules = DEFAULT_RULES) -> Transformer:
  """Build a Transformer of `cfg` from (name, array) pairs in the checkpoints' layout read from
  `source` (for messages)."""
  graphdef, abstract = nnx.split(abstract_model(cfg))
  flat = dict((_key(p), v) for p, v in nnx.to_flat_state(abstract))
  layout = _checkpoint_layout(abstract)
  shardings = None
  if mesh is not None:
    shardings = dict((_key(p), s) for p, s in nnx.to_flat_state(state_shardings(abstract, mesh, rules)))
  filled: dict[str, jax.Array] = {}
  for name, array in tensors:
    if name not in layout:
      raise CheckpointError(f"{source}: unexpected tensor {name!r} (shape {tuple(array.shape)}); "
                            f"the {cfg.family} model has no such parameter")
    param, shape, transposed = layout[name]
    if param in filled:
      raise CheckpointError(f"{source}: tensor {name!r} appears twice")
    if tuple(array.shape) != shape:
      raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, "
                            f"the config expects {shape}")
    if not np.all(np.isfinite(array)):
      raise CheckpointError(f"{source}: tensor {name!r} holds NaN or inf values")
    if transposed:
      array = np.asarray(array).T
    value = jnp.asarray(array, dtype=flat[param].get_value().dtype)
    if shardings is not None:
      value = jax.device_put(value, shardings[param])
    filled[param] = value
  missing = sorted(name for name, (param, _, _) in layout.items() if param not in filled)
  if missing:
    more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
    raise CheckpointError(f"{source}: missing tensors {missing[:5]}{more}")
  for path, var in nnx.to_flat_state(abstract):
    var.set_value(filled[_key(path)])
  return nnx.merge(graphdef, abstract)
