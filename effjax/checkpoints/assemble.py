"""Stream named tensors into an abstract model: no random init, strict about names and shapes.

Every checkpoint reader (HF safetensors, GGUF) produces (name, array) pairs in effjax's naming and
the checkpoints' layout (see `checkpoint_names`): a linear map is "layers.3.attn.q.weight" stored
[out, in], as Hugging Face and GGUF both store it, and the embedding tables are [V, D]. The model
stores them its own way (models/layout.py, models/quant.py): float kernels [in, out] and tables
[D, V]; q, k and v fused into one QKV kernel and gate and up into one (cfg.fused_projections);
int8 codes with per-row scales (cfg.quant). `assemble` converts as tensors arrive, so every load
path gets the same model; an array may also arrive already quantized (`quant.Int8Rows`, e.g. from
GGUF Q8_0). It places each parameter on its devices as soon as it is complete, each device receiving
only its shard when a mesh is given (`place`), so peak host memory is about one fused tensor and no
device holds a whole tensor it does not keep, and fails with a clear error on anything missing,
extra or mis-shaped. `checkpoint_tensors` is the inverse.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.errors import CheckpointError
from effjax.models import layout
from effjax.models.config import ModelConfig
from effjax.models.quant import Int8Rows, dequantize, quantize
from effjax.models.sharding import DEFAULT_RULES, ShardingRules, state_shardings
from effjax.models.transformer import Transformer, abstract_model


def _key(path) -> str:
  return ".".join(str(p) for p in path)


_KERNEL, _WEIGHT = ".kernel", ".weight"
_TABLES = ("embed", "lm_head")  # [D, V] in a float model, [V, D] in checkpoints


def _checkpoint_name(param: str) -> str:
  return param[:-len(_KERNEL)] + _WEIGHT if param.endswith(_KERNEL) else param


def _local(module: str) -> tuple[str, str]:
  """'layers.3.attn.q' -> ('layers.3', 'attn.q'): the layer and the module inside it."""
  parts = module.split(".")
  return ".".join(parts[:-2]), ".".join(parts[-2:])


def _checkpoint_layout(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Checkpoint tensor name -> (parameter of the unfused float model, stored shape): a linear map's
  kernel [in, out] is stored as its weight [out, in], the embedding tables [D, V] as [V, D],
  everything else as is."""
  plain = cfg.replace(fused_projections=False, quant=None)
  out = {}
  for path, v in nnx.to_flat_state(nnx.split(abstract_model(plain))[1]):
    param, shape = _key(path), tuple(v.get_value().shape)
    transposed = param.endswith(_KERNEL) or param in _TABLES
    out[_checkpoint_name(param)] = (param, shape[::-1] if transposed else shape)
  return out


def checkpoint_names(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
  """Every tensor of a checkpoint of `cfg`, in the checkpoints' layout: name -> (shape, dtype)."""
  return {name: (shape, cfg.dtype) for name, (_, shape) in _checkpoint_layout(cfg).items()}


def abstract_params(cfg: ModelConfig, mesh=None, rules: ShardingRules = DEFAULT_RULES):
  """The abstract model of `cfg` split as (graphdef, abstract state), with every parameter's
  target {name: (shape, dtype)} and sharding {name: sharding} by name ("layers.3.attn.q.kernel").
  Without a mesh everything goes to the first device; with one, a warning names each dim that stays
  replicated because its mesh axes do not divide it."""
  graphdef, abstract = nnx.split(abstract_model(cfg))
  flat = [(_key(p), v.get_value()) for p, v in nnx.to_flat_state(abstract)]
  targets = {name: (tuple(v.shape), v.dtype) for name, v in flat}
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {name: device for name in targets}
  else:
    shardings = dict((_key(p), s) for p, s in nnx.to_flat_state(
        state_shardings(abstract, mesh, rules, warn=True)))
  return graphdef, abstract, targets, shardings


def place(host: np.ndarray, dtype, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array on the devices of `sharding`, in `dtype`: each device receives only its own shard
  (cast on the host, shard by shard), never a copy of the whole tensor first."""
  dtype = np.dtype(dtype)

  def shard(index) -> np.ndarray:
    part = host[index]
    return part if part.dtype == dtype else np.asarray(part, dtype=dtype)

  return jax.make_array_from_callback(host.shape, sharding, shard)


def fill(graphdef, abstract, values: Mapping[str, jax.Array]) -> Transformer:
  """The model with each abstract parameter replaced by its array in `values` (by name)."""
  for path, var in nnx.to_flat_state(abstract):
    var.set_value(values[_key(path)])
  return nnx.merge(graphdef, abstract)


def _destination(cfg: ModelConfig, param: str) -> tuple[str, str, int, int]:
  """Parameter of the unfused model -> (module of the model, leaf, part index, number of parts)."""
  module, _, leaf = param.rpartition(".")
  layer, local = _local(module)
  if cfg.fused_projections and leaf in ("kernel", "bias") and local in layout.PART_OF:
    fused, index = layout.PART_OF[local]
    return f"{layer}.{fused}", leaf, index, len(layout.FUSED_PARTS[fused])
  return module, leaf, 0, 1


def _as_float(part) -> np.ndarray:
  return dequantize(part.codes, part.scales) if isinstance(part, Int8Rows) else np.asarray(part)


def _model_arrays(cfg: ModelConfig, module: str, leaf: str, parts: list) -> dict[str, np.ndarray]:
  """The model's parameters (name -> array) holding one module's weight, bias, table or norm, from
  its parts as checkpoints store them ([out, in] weights, [out] biases, [V, D] tables; float
  arrays or Int8Rows)."""
  name = f"{module}.{leaf}" if module else leaf
  local = _local(module)[1]
  combine = ((lambda xs: layout.fuse(cfg, local, xs)) if local in layout.FUSED_PARTS
             else (lambda xs: xs[0]))
  table = name in _TABLES
  if leaf != "kernel" and not table:  # biases, norms
    return {name: combine([_as_float(p) for p in parts])}
  if cfg.quant is None:
    rows = combine([_as_float(p) for p in parts])  # [*out, in]
    return {name: rows.T if table else np.moveaxis(rows, -1, 0)}
  quantized = [(p.codes, p.scales) if isinstance(p, Int8Rows) else quantize(_as_float(p))
               for p in parts]
  scales_name = f"{name}_scales" if table else f"{module}.kernel_scales"
  return {name: combine([c for c, _ in quantized]), scales_name: combine([s for _, s in quantized])}


def assemble(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray | Int8Rows]], *, source: str,
             mesh=None, rules: ShardingRules = DEFAULT_RULES) -> Transformer:
  """Build a Transformer of `cfg` from (name, array) pairs in the checkpoints' layout read from
  `source` (for messages), sharded over `mesh` by `rules` when given."""
  graphdef, abstract, targets, shardings = abstract_params(cfg, mesh, rules)
  ckpt = _checkpoint_layout(cfg)
  seen: set[str] = set()
  pending: dict[tuple[str, str], list] = {}  # parts of fused weights waiting for the others
  filled: dict[str, jax.Array] = {}
  for name, array in tensors:
    if name not in ckpt:
      raise CheckpointError(f"{source}: unexpected tensor {name!r} (shape {tuple(array.shape)}); "
                            f"the {cfg.family} model has no such parameter")
    if name in seen:
      raise CheckpointError(f"{source}: tensor {name!r} appears twice")
    seen.add(name)
    param, shape = ckpt[name]
    if tuple(array.shape) != shape:
      raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, "
                            f"the config expects {shape}")
    if not np.all(np.isfinite(array.scales if isinstance(array, Int8Rows) else array)):
      raise CheckpointError(f"{source}: tensor {name!r} holds NaN or inf values")
    module, leaf, index, count = _destination(cfg, param)
    parts = pending.setdefault((module, leaf), [None] * count)
    parts[index] = array
    if any(p is None for p in parts):
      continue
    del pending[(module, leaf)]
    for key, value in _model_arrays(cfg, module, leaf, parts).items():
      filled[key] = place(np.asarray(value), targets[key][1], shardings[key])
  missing = sorted(name for name in ckpt if name not in seen)
  if missing:
    more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
    raise CheckpointError(f"{source}: missing tensors {missing[:5]}{more}")
  return fill(graphdef, abstract, filled)


def checkpoint_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
  """The model's weights as checkpoints store them, the inverse of `assemble`: separate [out, in]
  float matrices and [V, D] tables (int8 weights dequantized)."""
  cfg = model.cfg
  flat = dict((_key(p), np.asarray(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(model)))
  for param, value in flat.items():
    module, _, leaf = param.rpartition(".")
    if leaf == "kernel_scales" or param in (f"{t}_scales" for t in _TABLES):
      continue
    table = param in _TABLES
    rows = value
    if leaf == "kernel" or table:
      scales = flat.get(f"{param}_scales" if table else f"{module}.kernel_scales")
      if scales is not None:
        rows = dequantize(value, scales)
      else:
        rows = value.T if table else np.moveaxis(value, 0, -1)
    layer, local = _local(module)
    if local in layout.FUSED_PARTS:
      for part, part_rows in zip(layout.FUSED_PARTS[local], layout.split(cfg, local, rows)):
        yield _checkpoint_name(f"{layer}.{part}.{leaf}"), np.ascontiguousarray(part_rows)
    else:
      yield _checkpoint_name(param), np.ascontiguousarray(rows)


def quantize_model(model: Transformer, *, mesh=None,
                   rules: ShardingRules = DEFAULT_RULES) -> Transformer:
  """The int8 model of a float one: a transform of the assembled tree, so every load path (cached
  ones included) can quantize. Each weight is quantized on device where it lies; an int8 model is
  returned as is."""
  if model.cfg.quant == "int8":
    return model
  cfg = model.cfg.replace(quant="int8")
  graphdef, abstract = nnx.split(abstract_model(cfg))
  src = dict((_key(p), v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model)))
  shardings = None
  if mesh is not None:
    shardings = dict((_key(p), s) for p, s in nnx.to_flat_state(state_shardings(abstract, mesh, rules)))
  rows_of = jax.jit(lambda w, table: quantize(w.T if table else jnp.moveaxis(w, 0, -1)),
                    static_argnums=1)
  out = {}
  for name, value in src.items():
    module, _, leaf = name.rpartition(".")
    if leaf == "kernel" or name in _TABLES:
      codes, scales = rows_of(value, name in _TABLES)
      out[name] = codes
      out[f"{name}_scales" if name in _TABLES else f"{module}.kernel_scales"] = scales
    else:
      out[name] = value
  for path, var in nnx.to_flat_state(abstract):
    key = _key(path)
    value = out[key] if shardings is None else jax.device_put(out[key], shardings[key])
    var.set_value(value)
  return nnx.merge(graphdef, abstract)
