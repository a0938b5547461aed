"""Logical axis names -> mesh axes: one rules table for parameters, caches and activations.

Every parameter carries `axes` metadata (logical names such as "embed" or "mlp"); activations are
constrained with `constrain`. A `ShardingRules` maps each logical name to a mesh axis (or None).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  batch: MeshAxes = ("data", "fsdp")
  seq: MeshAxes = None
  cache_seq: MeshAxes = None
  vocab: MeshAxes = "tensor"
  embed: MeshAxes = "fsdp"  # parameters' model dim: FSDP shards weights
  act_embed: MeshAxes = None  # activations' model dim: activations are sharded by batch instead
  heads: MeshAxes = "tensor"
  kv_heads: MeshAxes = "tensor"
  head_dim: MeshAxes = None
  mlp: MeshAxes = "tensor"
  particles: MeshAxes = None  # ENN reward heads

  def spec(self, logical: tuple[str | None, ...], shape: tuple[int, ...] | None = None,
           mesh: Mesh | None = None) -> P:
    """PartitionSpec for `logical` names; a dim a mesh axis does not divide stays replicated."""
    out, used = [], set()
    for i, name in enumerate(logical):
      axes = getattr(self, name) if name else None
      if axes is not None and mesh is not None:
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a in mesh.shape and a not in used)
        size = 1
        for a in axes_t:
          size *= mesh.shape[a]
        if not axes_t or (shape is not None and shape[i] % size):
          axes = None
        else:
          axes = axes_t[0] if len(axes_t) == 1 else axes_t
          used.update(axes_t)
      out.append(axes)
    return P(*out)


DEFAULT_RULES = ShardingRules()


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); -1 takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  known = 1
  for s in sizes:
    if s != -1:
      known *= s
  if sizes.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not split into mesh {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  total = sizes[0] * sizes[1] * sizes[2]
  if total != len(devices):
    raise ValueError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {total} devices, "
                     f"have {len(devices)}")
  # Auto axes: shardings propagate through jit from the parameters and constraints (GSPMD style).
  return jax.make_mesh(tuple(sizes), ("data", "fsdp", "tensor"), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def parse_mesh(spec: str | None, devices=None) -> Mesh | None:
  """'data=2,fsdp=4,tensor=1' -> Mesh over `devices` (default: all); None or '' -> no mesh."""
  if not spec:
    return None
  kw: dict[str, int] = {}
  for part in spec.split(","):
    name, _, value = part.partition("=")
    if name.strip() not in ("data", "fsdp", "tensor") or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"bad mesh spec {spec!r}; expected e.g. 'data=1,fsdp=-1,tensor=1'")
    kw[name.strip()] = int(value)
  return make_mesh(**{"data": 1, "fsdp": 1, "tensor": 1, **kw}, devices=devices)


def state_shardings(state: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
  """NamedShardings for an nnx.State (or abstract state) from each variable's `axes` metadata."""
  from flax import nnx

  def one(var):
    axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    if axes is None:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, rules.spec(axes, value.shape, mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def array_sharding(logical: tuple[str | None, ...], shape, mesh: Mesh,
                   rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, rules.spec(logical, tuple(shape), mesh))


def constrain(x: jax.Array, logical: tuple[str | None, ...], mesh: Mesh | None,
              rules: ShardingRules = DEFAULT_RULES) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op without a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, array_sharding(logical, x.shape, mesh, rules))
