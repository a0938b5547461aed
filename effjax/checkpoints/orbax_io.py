"""effjax checkpoints: a converted model as an Orbax checkpoint, its config and its tokenizer.

Layout of a checkpoint directory (what `effjax convert` writes and the model cache holds):

    effjax.json   format marker, the ModelConfig, where the weights came from
    params/       Orbax (StandardCheckpointer) checkpoint of the model's parameters
    tokenizer/    the tokenizer as transformers saves it (tokenizer.json, chat template, ...)

Restoring builds the abstract model and lets Orbax place every array straight into its sharding
(and dtype), so nothing is initialised or held twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from effjax.errors import CheckpointError
from effjax.models.config import ModelConfig, RopeScaling
from effjax.models.sharding import DEFAULT_RULES, ShardingRules, state_shardings
from effjax.models.transformer import Transformer, abstract_model

FORMAT = "effjax-orbax"
# 3: fused QKV and gate+up kernels, int8 weights when the config says so (models/layout.py, quant.py)
# 2: linear kernels [in, out] and embedding tables [D, V] (1: as in checkpoints)
VERSION = 3
MARKER = "effjax.json"


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any], *, source: str = "") -> ModelConfig:
  d = dict(d)
  d.pop("bos_id", None)  # written by earlier versions; the tokenizer holds the BOS token
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise CheckpointError(f"{source}: unknown config keys {unknown}")
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  for key in ("layer_kinds", "eos_ids"):
    if key in d:
      d[key] = tuple(d[key])
  try:
    return ModelConfig(**d)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{source}: invalid config: {e}") from e


def is_checkpoint(path: str | os.PathLike) -> bool:
  return (Path(path) / MARKER).is_file()


def save_checkpoint(out: str | os.PathLike, cfg: ModelConfig, model: Transformer, tokenizer, *,
                    source: str = "", overwrite: bool = False) -> Path:
  """Write model, config and tokenizer to `out`, atomically: a partly written directory never
  takes the final name, so an interrupted conversion cannot leave a broken cache."""
  import orbax.checkpoint as ocp

  out = Path(out).absolute()
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} already exists")
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp / "params", nnx.to_pure_dict(state))
      ckpt.wait_until_finished()
    tokenizer.save_pretrained(tmp / "tokenizer")
    meta = dict(format=FORMAT, version=VERSION, config=config_to_dict(cfg), source=source)
    (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
      shutil.rmtree(out)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  path = Path(path)
  if not is_checkpoint(path):
    raise CheckpointError(f"{path}: not an effjax checkpoint (no {MARKER})")
  meta = json.loads((path / MARKER).read_text())
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise CheckpointError(f"{path}: {MARKER} says format {meta.get('format')!r} version "
                          f"{meta.get('version')!r}; this effjax reads {FORMAT!r} version {VERSION}")
  return meta


def restore_checkpoint(path: str | os.PathLike, *, dtype: str | None = None, mesh=None,
                       rules: ShardingRules = DEFAULT_RULES) -> tuple[ModelConfig, Transformer]:
  """Config and model from an effjax checkpoint; `dtype` (default: as saved) casts on restore."""
  import orbax.checkpoint as ocp

  path = Path(path).absolute()
  meta = read_meta(path)
  cfg = config_from_dict(meta["config"], source=str(path / MARKER))
  if dtype is not None:
    cfg = cfg.replace(dtype=dtype)
  graphdef, abstract = nnx.split(abstract_model(cfg))
  if mesh is not None:
    shardings = state_shardings(abstract, mesh, rules)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings))
  try:
    with ocp.StandardCheckpointer() as ckpt:
      params = ckpt.restore(path / "params", target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"{path / 'params'}: cannot restore the parameters of the config in "
                          f"{MARKER}: {e}") from e
  nnx.replace_by_pure_dict(abstract, params)
  return cfg, nnx.merge(graphdef, abstract)


def restore_tokenizer(path: str | os.PathLike):
  """The checkpoint's tokenizer. It is saved as a fast tokenizer (tokenizer.json), so that class loads
  it directly: AutoTokenizer would import torch (seconds) only to pick the same class."""
  from transformers import PreTrainedTokenizerFast

  path = Path(path) / "tokenizer"
  if not (path / "tokenizer.json").is_file():
    raise CheckpointError(f"{path}: the checkpoint has no tokenizer (tokenizer.json)")
  return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
