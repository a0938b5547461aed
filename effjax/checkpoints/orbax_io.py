"""A model's parameters as an Orbax checkpoint: the format for multi-host jobs and training states.

`save_params` writes an nnx state with Orbax's StandardCheckpointer (as a nested dict of arrays);
`restore_params` reads it back with every array placed straight into its sharding and dtype.
Single-host model caches use the faster memory-mapped format (checkpoints/param_file.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import jax
from flax import nnx

from effjax.errors import CheckpointError


def _name(path) -> str:
  return ".".join(str(getattr(k, "key", k)) for k in path)


def save_params(directory: str | os.PathLike, state: nnx.State) -> None:
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(Path(directory).absolute(), nnx.to_pure_dict(state))
    ckpt.wait_until_finished()


def restore_params(directory: str | os.PathLike, abstract: nnx.State,
                   targets: Mapping[str, tuple[tuple[int, ...], object]],
                   shardings: Mapping[str, jax.sharding.Sharding]) -> dict[str, jax.Array]:
  """The parameters of `abstract` (an abstract nnx state whose leaves are named as in `targets`),
  each restored in its target dtype and sharding."""
  import orbax.checkpoint as ocp

  directory = Path(directory).absolute()
  target = jax.tree_util.tree_map_with_path(
      lambda p, _: jax.ShapeDtypeStruct(*targets[_name(p)], sharding=shardings[_name(p)]),
      nnx.to_pure_dict(abstract))
  try:
    with ocp.StandardCheckpointer() as ckpt:
      restored = ckpt.restore(directory, target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"{directory}: cannot restore the parameters of the config: {e}") from e
  return {_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(restored)}
