"""Hugging Face checkpoints: config.json -> ModelConfig, *.safetensors -> Transformer, strictly.

`config_from_hf` parses a config with transformers' own config class of its model type (so absent
keys take the values transformers gives them and legacy keys mean what they mean there), then maps
what effjax implements through the family table (effjax/models/families.py) and refuses the rest: a
key that changes the math in a way effjax does not implement (mlp_bias=true, a yarn rope,
bidirectional attention, ...) and any key it does not know are errors naming the key and the file;
only the keys of `NO_EFFECT_KEYS`, which cannot change the forward pass, pass unread.

`load_hf` streams tensors one at a time from the safetensors files (single or sharded with an
index) into `assemble`, renamed to effjax's names; a tensor that is missing, extra, mis-shaped or
listed in the wrong shard is an error naming the file and the Hugging Face tensor name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from effjax.checkpoints.assemble import assemble, checkpoint_names
from effjax.errors import CheckpointError
from effjax.models.config import LayerKind, ModelConfig, RopeScaling, make_config
from effjax.models.families import FAMILIES, FamilyTable, family_of_model_type
from effjax.models.sharding import DEFAULT_RULES, ShardingRules
from effjax.models.transformer import Transformer

# Keys that cannot change the forward pass: bookkeeping, training-only settings (dropout, init,
# tensor-parallel pretraining split), token ids the tokenizer holds, and generation/runtime defaults.
NO_EFFECT_KEYS = frozenset({
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype",
    "initializer_range", "use_cache", "attention_dropout", "pretraining_tp", "is_llama_config",
    "transformers.js_config", "cache_implementation", "_attn_implementation_autoset",
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict", "torchscript",
    "id2label", "label2id", "problem_type", "tokenizer_class", "finetuning_task", "prefix",
    "task_specific_params", "chunk_size_feed_forward", "pruned_heads", "tf_legacy_loss",
    "use_bfloat16", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "bos_token_id", "sep_token_id", "decoder_start_token_id",
    # generation defaults some old configs carry
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})

# Top-level keys of a Gemma3ForConditionalGeneration config that concern only images: effjax loads
# the text model and skips the vision tower's tensors.
_GEMMA3_VISION_KEYS = frozenset({
    "vision_config", "mm_tokens_per_image", "boi_token_index", "eoi_token_index",
    "image_token_index", "boi_token_id", "eoi_token_id", "image_token_id",
})
_VISION_TENSOR_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                           "model.multi_modal_projector.")
_TEXT_TENSOR_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                         "language_model.lm_head.": "lm_head."}

_NO_O_BIAS = ("attention_bias", (False,), "effjax has no o_proj bias")
_CAUSAL = ("use_bidirectional_attention", (False,), "effjax's attention is causal")


@dataclasses.dataclass(frozen=True)
class _HFKeys:
  """How a family's transformers config class spells what effjax reads."""

  refused: tuple[tuple[str, tuple, str], ...]  # (key, the values effjax implements, why)
  activation: str = "hidden_act"
  query_scale: str | None = None  # attention scale = value ** -0.5 (absent: head_dim ** -0.5)
  # Keys transformers turns into the values read here (legacy rope spellings, the inputs of its
  # layer-type rule); consumed when those values are read.
  derived: tuple[str, ...] = ("rope_theta", "rope_scaling")
  layer_types: bool = True  # the class derives layer_types / sliding_window (False: all global)


_WINDOW_RULE = ("use_sliding_window", "max_window_layers")
_GEMMA = dict(activation="hidden_activation", query_scale="query_pre_attn_scalar")
_HF_KEYS: dict[str, _HFKeys] = {
    "llama": _HFKeys((_NO_O_BIAS, ("mlp_bias", (False,), "effjax's MLP has no biases"),
                      ("rope_interleaved", (False,), "effjax rotates halves, not interleaved pairs")),
                     layer_types=False),
    "qwen2": _HFKeys((("use_mrope", (False,), "multimodal rope is not implemented"),),
                     derived=("rope_theta", "rope_scaling", *_WINDOW_RULE)),
    "qwen3": _HFKeys((_NO_O_BIAS,), derived=("rope_theta", "rope_scaling", *_WINDOW_RULE)),
    "gemma2": _HFKeys((_NO_O_BIAS, _CAUSAL), **_GEMMA),
    "gemma3": _HFKeys((_NO_O_BIAS, _CAUSAL), **_GEMMA,
                      derived=("rope_theta", "rope_scaling", "rope_local_base_freq",
                               "sliding_window_pattern", "_sliding_window_pattern")),
}
# Sizes a top-level config must give (a multimodal config's text_config takes transformers' defaults,
# as transformers does).
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh"}
_LAYER_TYPES: dict[str, LayerKind] = {"full_attention": "global", "sliding_attention": "sliding"}


class _Keys:
  """A config dict, its values as transformers' config class parsed them, and the keys read (so the
  unread ones can be reported)."""

  def __init__(self, data: dict, parsed: Any, where: str):
    self.data, self.parsed, self.where, self.read = data, parsed, where, set()

  def get(self, key: str) -> Any:
    """The value transformers gives the key (absent keys: its default for this model type)."""
    self.read.add(key)
    return getattr(self.parsed, key, self.data.get(key))

  def refuse(self, key: str, supported, why: str):
    """Error unless `key` is absent or holds a value of `supported`."""
    self.read.add(key)
    value = self.data.get(key)
    if value is not None and value not in supported:
      raise CheckpointError(f"{self.where}: {key}={json.dumps(value)} is not supported ({why})")

  def error(self, message: str) -> CheckpointError:
    return CheckpointError(f"{self.where}: {message}")

  def unread(self) -> list[str]:
    return sorted(set(self.data) - self.read - NO_EFFECT_KEYS)


def _parse(model_type: str, data: dict, where: str):
  """`data` through transformers' config class of `model_type` (its defaults and its checks)."""
  from transformers import CONFIG_MAPPING

  try:
    return CONFIG_MAPPING[model_type](**data)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{where}: transformers refuses the config: {e}") from None


def _rope(params: dict, keys: _Keys, name: str) -> tuple[float, RopeScaling | None]:
  """(theta, scaling) from one standardized rope dict of transformers' `rope_parameters`."""
  p = dict(params)
  kind = p.pop("rope_type", None) or p.pop("type", None) or "default"
  p.pop("type", None)
  theta = float(p.pop("rope_theta"))
  if p.pop("partial_rotary_factor", 1.0) not in (1, 1.0, None):
    raise keys.error(f"{name}.partial_rotary_factor is not supported (effjax rotates every dim)")
  try:
    if kind == "default":
      scaling = None
    elif kind == "linear":
      scaling = RopeScaling("linear", float(p.pop("factor")))
    elif kind == "llama3":
      scaling = RopeScaling("llama3", float(p.pop("factor")), float(p.pop("low_freq_factor")),
                            float(p.pop("high_freq_factor")),
                            int(p.pop("original_max_position_embeddings")))
    else:
      raise keys.error(f"{name} has rope type {kind!r}, which effjax does not support "
                       "(supported: default, linear, llama3)")
  except KeyError as e:
    raise keys.error(f"{name} of rope type {kind!r} lacks {e.args[0]!r}") from None
  if p:
    raise keys.error(f"{name} has keys {sorted(p)} that effjax does not support for rope type "
                     f"{kind!r}")
  return theta, scaling


def _rope_config(keys: _Keys, table: FamilyTable) -> dict:
  """rope_theta / rope_local_theta / rope_scaling from transformers' `rope_parameters` (which it
  builds from legacy rope_theta / rope_scaling / rope_local_base_freq where those are given)."""
  raw = keys.data
  if "rope_parameters" in raw and raw.get("rope_scaling") is not None:
    raise keys.error("both rope_scaling and rope_parameters are given; keep one")
  params = keys.get("rope_parameters")
  local = table.rope_local_theta is not None  # sliding layers rotate with their own base
  if local:
    extra = sorted(set(params) - {"full_attention", "sliding_attention"})
    if "full_attention" not in params or extra:
      raise keys.error(f"{table.name} rope_parameters must be given per layer type "
                       "(full_attention, sliding_attention)")
    theta, scaling = _rope(params["full_attention"], keys, "rope_parameters.full_attention")
    local_theta, local_scaling = _rope(params.get("sliding_attention") or
                                       {"rope_theta": table.rope_local_theta},
                                       keys, "rope_parameters.sliding_attention")
    if local_scaling is not None:
      raise keys.error("rope scaling on sliding layers is not supported (effjax scales the "
                       "global layers only)")
  else:
    theta, scaling = _rope(params, keys, "rope_parameters")
  if "rope_parameters" in raw:  # a legacy key beside it must agree (transformers drops it)
    for key, used in (("rope_theta", theta), ("rope_local_base_freq", local_theta if local else None)):
      given = raw.get(key)
      if given is not None and used is not None and float(given) != used:
        raise keys.error(f"{key}={given} disagrees with rope_parameters ({used})")
  out = dict(rope_theta=theta, rope_scaling=scaling)
  if local:
    out["rope_local_theta"] = local_theta
  return out


def _layer_config(keys: _Keys, hf: _HFKeys, num_layers: int) -> dict:
  """layer_kinds and sliding_window, as transformers decides which layers slide (its layer_types,
  derived from use_sliding_window / max_window_layers / sliding_window_pattern where absent)."""
  if not hf.layer_types:  # every layer global (the key stays unread: unknown if given)
    return dict(layer_kinds=(), sliding_window=None)
  types = keys.get("layer_types")
  window = keys.get("sliding_window")
  if len(types) != num_layers:
    raise keys.error(f"layer_types has {len(types)} entries for num_hidden_layers={num_layers}")
  unknown = sorted(set(types) - set(_LAYER_TYPES))
  if unknown:
    raise keys.error(f"layer_types {unknown} are not supported (supported: {sorted(_LAYER_TYPES)})")
  kinds = tuple(_LAYER_TYPES[t] if window is not None else "global" for t in types)
  if "sliding" not in kinds:
    return dict(layer_kinds=(), sliding_window=None)
  return dict(layer_kinds=kinds, sliding_window=int(window))


def _text_config(keys: _Keys, table: FamilyTable, dtype: str, sizes_required: bool) -> ModelConfig:
  if sizes_required:
    missing = [k for k in _SIZES if keys.data.get(k) is None]
    if missing:
      raise keys.error(f"required key {missing[0]!r} is missing")
  dim = keys.get("hidden_size")
  heads = keys.get("num_attention_heads")
  num_layers = keys.get("num_hidden_layers")
  hf = _HF_KEYS[table.name]
  keys.read.add("hidden_act")  # Gemma's legacy key: its modeling reads hidden_activation only
  act = keys.get(hf.activation)
  if act not in _ACTIVATIONS:
    raise keys.error(f"{hf.activation}={act!r} is not supported (supported: {sorted(_ACTIVATIONS)})")
  for key, supported, why in hf.refused:
    keys.refuse(key, supported, why)
  keys.read.update(hf.derived)
  eos = keys.get("eos_token_id")
  kw = dict(
      vocab_size=keys.get("vocab_size"), dim=dim, mlp_dim=keys.get("intermediate_size"),
      num_layers=num_layers, num_heads=heads,
      num_kv_heads=keys.get("num_key_value_heads") or heads,
      head_dim=keys.get("head_dim") or dim // heads,
      norm_eps=float(keys.get("rms_norm_eps")), activation=_ACTIVATIONS[act],
      tie_embeddings=bool(keys.get("tie_word_embeddings")),
      max_position=keys.get("max_position_embeddings"),
      eos_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
      dtype=dtype, **_rope_config(keys, table), **_layer_config(keys, hf, num_layers))
  pad = keys.get("pad_token_id")
  if pad is not None:
    kw["pad_id"] = pad
  if hf.query_scale is not None and float(keys.get(hf.query_scale)) != kw["head_dim"]:
    kw["query_scale"] = float(keys.get(hf.query_scale)) ** -0.5
  if table.softcaps:
    kw["attn_softcap"] = keys.get("attn_logit_softcapping")
    kw["final_softcap"] = keys.get("final_logit_softcapping")
  try:
    return make_config(table.name, **kw)
  except ValueError as e:
    raise keys.error(str(e)) from None


def config_from_hf(config: dict, *, dtype: str = "float32", source: str = "config.json",
                   allow_unknown_keys: bool = False) -> ModelConfig:
  """The ModelConfig of a Hugging Face config.json (already parsed); `source` names it in errors.

  A Gemma3ForConditionalGeneration config is accepted for its text_config (text only).
  """
  model_type = config.get("model_type")
  table = family_of_model_type(model_type)
  if table is None:
    supported = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise CheckpointError(f"{source}: model_type {model_type!r} is not supported "
                          f"(supported: {supported})")
  outer = None
  text, text_type, where = dict(config), model_type, source
  if model_type == "gemma3":
    outer = _Keys(config, None, source)
    text = outer.get("text_config")
    if not isinstance(text, dict):
      raise outer.error("a gemma3 config needs a text_config")
    outer.read.update(_GEMMA3_VISION_KEYS | {"model_type"})
    text = dict(text)
    # Keys the text model reads that the multimodal config may keep at its top level.
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
      if key in config:
        outer.read.add(key)
        if key in text and text[key] != config[key]:
          raise outer.error(f"{key} is {config[key]} at the top level but {text[key]} in "
                            "text_config")
        text[key] = config[key]
    text_type = text.pop("model_type", "gemma3_text")
    if text_type != "gemma3_text":
      raise outer.error("text_config.model_type must be gemma3_text")
    where = f"{source} (text_config)"
  text.pop("model_type", None)
  keys = _Keys(text, _parse(text_type, text, where), where)
  cfg = _text_config(keys, table, dtype, sizes_required=outer is None)
  unknown = keys.unread() + ([] if outer is None else outer.unread())
  if unknown and not allow_unknown_keys:
    raise CheckpointError(f"{source}: unknown config keys {unknown}; effjax cannot tell whether "
                          "they change the model (allow_unknown_keys=True ignores them)")
  return cfg


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
  """HF suffix after model.layers.N. -> effjax suffix after layers.N."""
  names = {f"self_attn.{p}_proj.weight": f"attn.{p}.weight" for p in "qkvo"}
  names.update({f"mlp.{p}_proj.weight": f"mlp.{p}.weight" for p in ("gate", "up", "down")})
  names["input_layernorm.weight"] = "attn_norm.scale"
  if cfg.qkv_bias:
    names.update({f"self_attn.{p}_proj.bias": f"attn.{p}.bias" for p in "qkv"})
  if cfg.qk_norm:
    names.update({f"self_attn.{p}_norm.weight": f"attn.{p}_norm.scale" for p in "qk"})
  if cfg.post_norms:
    # Gemma 2/3: post_attention_layernorm normalises the attention output, the pre-MLP norm is
    # pre_feedforward_layernorm; in Llama/Qwen post_attention_layernorm *is* the pre-MLP norm.
    names.update({"post_attention_layernorm.weight": "attn_post_norm.scale",
                  "pre_feedforward_layernorm.weight": "mlp_norm.scale",
                  "post_feedforward_layernorm.weight": "mlp_post_norm.scale"})
  else:
    names["post_attention_layernorm.weight"] = "mlp_norm.scale"
  return names


def hf_names(cfg: ModelConfig) -> dict[str, str]:
  """Hugging Face tensor name -> effjax parameter name, for every parameter of `cfg`."""
  names = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm.scale"}
  if not cfg.tie_embeddings:
    names["lm_head.weight"] = "lm_head"
  for i in range(cfg.num_layers):
    names.update({f"model.layers.{i}.{hf}": f"layers.{i}.{ours}"
                  for hf, ours in _layer_names(cfg).items()})
  return names


def _canonical(hf_name: str) -> str:
  """A text-model tensor name without a multimodal wrapper's prefix."""
  for prefix, repl in _TEXT_TENSOR_PREFIXES.items():
    if hf_name.startswith(prefix):
      return repl + hf_name[len(prefix):]
  return hf_name


def _skipped(cfg: ModelConfig, hf_name: str) -> bool:
  """Tensors effjax deliberately does not load: a Gemma 3 vision tower (text only) and the RoPE
  frequency buffers old checkpoints saved (recomputed from the config)."""
  return ((cfg.family == "gemma3" and hf_name.startswith(_VISION_TENSOR_PREFIXES))
          or hf_name.endswith("rotary_emb.inv_freq"))


def read_config(path: str | Path) -> dict:
  file = Path(path) / "config.json"
  if not file.is_file():
    raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory?)")
  try:
    return json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def safetensors_files(path: str | Path) -> dict[Path, set[str] | None]:
  """The weight files of a model directory: file -> the tensor names the index assigns it (None
  when there is no index, i.e. a single file or unindexed *.safetensors)."""
  path = Path(path)
  index = path / "model.safetensors.index.json"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
    files: dict[Path, set[str] | None] = {}
    for name, file in sorted(weight_map.items()):
      files.setdefault(path / file, set()).add(name)
    for file in files:
      if not file.is_file():
        raise CheckpointError(f"{index}: lists {file.name}, which does not exist")
    return files
  found = sorted(path.glob("*.safetensors"))
  if not found:
    raise CheckpointError(f"{path}: no *.safetensors files")
  return {f: None for f in found}


def _open(file: Path):
  try:
    return safe_open(str(file), framework="numpy")
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def _same_tensor(a: tuple[Path, str], b: tuple[Path, str], rows: int = 4096) -> bool:
  """Whether two stored tensors are equal, compared a block of rows at a time."""
  with _open(a[0]) as fa, _open(b[0]) as fb:
    sa, sb = fa.get_slice(a[1]), fb.get_slice(b[1])
    if sa.get_shape() != sb.get_shape():
      return False
    n = sa.get_shape()[0]
    return all(np.array_equal(sa[i:min(i + rows, n)], sb[i:min(i + rows, n)])
               for i in range(0, n, rows))


def hf_tensors(path: str | Path, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(effjax name, array) for every parameter of `cfg` in the directory, one tensor at a time,
  checking names, shapes and the index on the way (errors name the file and the HF tensor)."""
  shapes = {name: shape for name, (shape, _) in checkpoint_names(cfg).items()}
  wanted = hf_names(cfg)
  seen: dict[str, tuple[Path, str]] = {}  # canonical HF name -> where it was read
  redundant_head = None
  for file, listed in safetensors_files(path).items():
    with _open(file) as f:
      names = list(f.keys())
      if listed is not None:
        absent = sorted(listed - set(names))
        if absent:
          raise CheckpointError(f"{file}: the index lists {absent[:5]} in this file, "
                                "which does not hold them")
      for stored in names:
        if listed is not None and stored not in listed:
          raise CheckpointError(f"{file}: tensor {stored!r} is not in the index for this file")
        if _skipped(cfg, stored):
          continue
        hf_name = _canonical(stored)
        if hf_name == "lm_head.weight" and cfg.tie_embeddings:
          redundant_head = (file, stored)  # must equal the embeddings; checked at the end
          continue
        if hf_name not in wanted:
          raise CheckpointError(f"{file}: unexpected tensor {stored!r}; a {cfg.family} model "
                                "of this config has no such parameter")
        if hf_name in seen:
          raise CheckpointError(f"{file}: tensor {stored!r} is also in {seen[hf_name][0]}")
        name = wanted[hf_name]
        shape = tuple(f.get_slice(stored).get_shape())
        if shape != shapes[name]:
          raise CheckpointError(f"{file}: tensor {stored!r} has shape {shape}, the config "
                                f"expects {shapes[name]}")
        seen[hf_name] = (file, stored)
        yield name, f.get_tensor(stored)
  missing = sorted(set(wanted) - set(seen))
  if missing:
    more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
    raise CheckpointError(f"{path}: missing tensors {missing[:5]}{more}")
  if redundant_head is not None and not _same_tensor(redundant_head,
                                                     seen["model.embed_tokens.weight"]):
    raise CheckpointError(f"{redundant_head[0]}: {redundant_head[1]!r} differs from the "
                          "embeddings but the config ties them (tie_word_embeddings=true)")


def hf_config(path: str | Path, *, dtype: str = "float32",
              allow_unknown_keys: bool = False) -> ModelConfig:
  """The ModelConfig of a Hugging Face model directory's config.json, strictly."""
  return config_from_hf(read_config(path), dtype=dtype, source=str(Path(path) / "config.json"),
                        allow_unknown_keys=allow_unknown_keys)


def load_hf(path: str | Path, *, dtype: str = "float32", mesh=None,
            rules: ShardingRules = DEFAULT_RULES, allow_unknown_keys: bool = False,
            quant: str | None = None) -> tuple[ModelConfig, Transformer]:
  """Load a Hugging Face model directory (config.json + *.safetensors) as an effjax Transformer,
  parameters in `dtype` (weights int8 with quant="int8"), sharded over `mesh` when given."""
  path = Path(path)
  cfg = hf_config(path, dtype=dtype, allow_unknown_keys=allow_unknown_keys).replace(quant=quant)
  return cfg, assemble(cfg, hf_tensors(path, cfg), source=str(path), mesh=mesh, rules=rules)
