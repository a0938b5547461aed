"""Logical axis names -> mesh axes: one rules table for parameters, caches and activations.

Every parameter carries `axes` metadata (logical names such as "embed" or "mlp"); activations are
constrained with `constrain`. A `ShardingRules` maps each logical name to a mesh axis (or None).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
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
    return P(*(axes for axes, _ in self._place(logical, shape, mesh)))

  def _place(self, logical, shape, mesh):
    """Per dim: (the mesh axes it is split over or None, the axes its rule names that would split
    it but do not divide its size)."""
    out, used = [], set()
    for i, name in enumerate(logical):
      axes = getattr(self, name) if name else None
      undivided = ()
      if axes is not None and mesh is not None:
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a in mesh.shape and a not in used)
        size = 1
        for a in axes_t:
          size *= mesh.shape[a]
        if not axes_t or (shape is not None and shape[i] % size):
          undivided = axes_t if axes_t and size > 1 else ()
          axes = None
        else:
          axes = axes_t[0] if len(axes_t) == 1 else axes_t
          used.update(axes_t)
      out.append((axes, undivided))
    return out

  def replicated_dims(self, logical: tuple[str | None, ...], shape: tuple[int, ...],
                      mesh: Mesh) -> list[str]:
    """The dims that stay whole on every device because the mesh axes their rule names do not
    divide their size, described for a warning: 'dim 1 (kv_heads, 3) over tensor=2'."""
    return [f"dim {i} ({logical[i]}, {shape[i]}) over "
            + ",".join(f"{a}={mesh.shape[a]}" for a in undivided)
            for i, (_, undivided) in enumerate(self._place(logical, shape, mesh)) if undivided]


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


def state_shardings(state: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES, *,
                    warn: bool = False) -> Any:
  """NamedShardings for an nnx.State (or abstract state) from each variable's `axes` metadata.
  `warn`: warn once, naming every parameter dim that stays replicated because its mesh axes do not
  divide it (loaders set it: a silently replicated weight can exhaust device memory)."""
  from flax import nnx

  def one(var):
    axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    if axes is None:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, rules.spec(axes, value.shape, mesh))

  is_var = lambda x: isinstance(x, nnx.Variable)
  if warn:
    found: dict[str, None] = {}  # ordered set; layers folded into "layers.*"
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_var):
      axes = var.get_metadata().get("axes") if is_var(var) else None
      if axes is not None:
        name = re.sub(r"\.\d+\.", ".*.", ".".join(str(getattr(k, "key", k)) for k in path))
        for dim in rules.replicated_dims(axes, var.get_value().shape, mesh):
          found[f"{name} {dim}"] = None
    if found:
      warnings.warn("replicated on every device because the mesh axes do not divide them: "
                    + "; ".join(found), ReplicatedWarning, stacklevel=2)
  return jax.tree.map(one, state, is_leaf=is_var)


class ReplicatedWarning(UserWarning):
  """Parameter dims kept whole on every device because their mesh axes do not divide them."""


def array_sharding(logical: tuple[str | None, ...], shape, mesh: Mesh,
                   rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, rules.spec(logical, tuple(shape), mesh))


def constrain(x: jax.Array, logical: tuple[str | None, ...], mesh: Mesh | None,
              rules: ShardingRules = DEFAULT_RULES) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op without a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, array_sharding(logical, x.shape, mesh, rules))


def shard_like(grads: Any, params: Any, mesh: Mesh | None, rules: ShardingRules = DEFAULT_RULES) -> Any:
  """Gradients (or any pytree shaped like `params`) constrained to the parameters' shardings; a
  no-op without a mesh. Left to propagation, the policy and RM steps returned their gradients whole
  on every device (the Gemma-2-9B policy step planned for v5p-32: 18.5 GB of bfloat16 per chip)."""
  if mesh is None:
    return grads
  return jax.lax.with_sharding_constraint(grads, state_shardings(params, mesh, rules))
