"""effjax checkpoints: a converted model as a directory with its config, parameters and tokenizer.

Layout (what `effjax convert` writes and the model cache holds):

    effjax.json          format marker, the ModelConfig, where the weights came from, the params format
    params.safetensors   the parameters, memory-mapped on load (checkpoints/param_file.py), or
    params/              the parameters as an Orbax checkpoint (for multi-host and training states)
    tokenizer/           the tokenizer as transformers saves it (tokenizer.json, chat template, ...)

Restoring builds the abstract model and places every array straight into its sharding (and dtype),
so nothing is initialised or held twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from effjax.errors import CheckpointError
from effjax.models.config import ModelConfig, RopeScaling

if TYPE_CHECKING:  # reading metadata (`effjax models`) must not import JAX
  from effjax.models.sharding import ShardingRules
  from effjax.models.transformer import Transformer

FORMAT = "effjax"
# 4: the model's own parameter tree (fused QKV and gate+up kernels, int8 weights when the config says
# so) as safetensors (default) or Orbax, named in effjax.json. Earlier: "effjax-orbax" 3, the same
# tree in Orbax only (still read); 2 and 1: unfused layouts, no longer read (a named model's cache is
# rebuilt, never misread).
VERSION = 4
_ORBAX_ONLY = ("effjax-orbax", 3)
MARKER = "effjax.json"
PARAMS_FILE = "params.safetensors"
ParamsFormat = Literal["safetensors", "orbax"]


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
                    source: str = "", overwrite: bool = False,
                    params: ParamsFormat = "safetensors") -> Path:
  """Write model, config and tokenizer to `out`, atomically: a partly written directory never
  takes the final name, so an interrupted conversion cannot leave a broken cache."""
  from flax import nnx

  from effjax.checkpoints import orbax_io, param_file

  out = Path(out).absolute()
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} already exists")
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    _, state = nnx.split(model)
    if params == "safetensors":
      param_file.save(tmp / PARAMS_FILE, ((".".join(map(str, path)), v.get_value())
                                          for path, v in nnx.to_flat_state(state)))
    else:
      orbax_io.save_params(tmp / "params", state)
    tokenizer.save_pretrained(tmp / "tokenizer")
    meta = dict(format=FORMAT, version=VERSION, params=params, config=config_to_dict(cfg),
                source=source)
    (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
      shutil.rmtree(out)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  """effjax.json, checked; "effjax-orbax" version 3 checkpoints read as Orbax params."""
  path = Path(path)
  if not is_checkpoint(path):
    raise CheckpointError(f"{path}: not an effjax checkpoint (no {MARKER})")
  try:
    meta = json.loads((path / MARKER).read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path / MARKER}: unreadable ({e})") from None
  if not isinstance(meta, dict):
    raise CheckpointError(f"{path / MARKER}: not a JSON object")
  if (meta.get("format"), meta.get("version")) == _ORBAX_ONLY:
    meta = dict(meta, params="orbax")
  elif meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise CheckpointError(f"{path}: {MARKER} says format {meta.get('format')!r} version "
                          f"{meta.get('version')!r}; this effjax reads {FORMAT!r} version {VERSION} "
                          f"(convert the model again)")
  if meta.get("params") not in ("safetensors", "orbax"):
    raise CheckpointError(f"{path / MARKER}: unknown params format {meta.get('params')!r}")
  return meta


def restore_checkpoint(path: str | os.PathLike, *, dtype: str | None = None, mesh=None,
                       rules: ShardingRules | None = None) -> tuple[ModelConfig, Transformer]:
  """Config and model from an effjax checkpoint; `dtype` (default: as saved) casts floating-point
  parameters on restore, `mesh` shards them by `rules` (default: effjax's)."""
  from effjax.checkpoints import orbax_io, param_file
  from effjax.checkpoints.assemble import abstract_params, fill
  from effjax.models.sharding import DEFAULT_RULES

  path = Path(path).absolute()
  meta = read_meta(path)
  cfg = config_from_dict(meta["config"], source=str(path / MARKER))
  if dtype is not None:
    cfg = cfg.replace(dtype=dtype)
  graphdef, abstract, targets, shardings = abstract_params(cfg, mesh, rules or DEFAULT_RULES)
  if meta["params"] == "safetensors":
    values = param_file.load(path / PARAMS_FILE, targets, shardings)
  else:
    values = orbax_io.restore_params(path / "params", abstract, targets, shardings)
  return cfg, fill(graphdef, abstract, values)


def restore_tokenizer(path: str | os.PathLike):
  """The checkpoint's tokenizer. It is saved as a fast tokenizer (tokenizer.json), so that class loads
  it directly: AutoTokenizer would import torch (seconds) only to pick the same class."""
  from transformers import PreTrainedTokenizerFast

  path = Path(path) / "tokenizer"
  if not (path / "tokenizer.json").is_file():
    raise CheckpointError(f"{path}: the checkpoint has no tokenizer (tokenizer.json)")
  return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
