"""GGUF files (llama.cpp's format): the config from the metadata, dequantized tensors in effjax names.

The `gguf` package parses the file and dequantizes every block type (Q4_1, Q8_0, Q4_K, Q6_K, F16, ...).
Two things llama.cpp's converter changes are undone here so the weights mean what they mean in Hugging
Face checkpoints (and in effjax): the rows of Llama's attn_q / attn_k are permuted for llama.cpp's
interleaved RoPE (effjax rotates halves), and Gemma's RMSNorm weights are stored with the +1 added.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from effjax.checkpoints.assemble import assemble
from effjax.errors import CheckpointError
from effjax.models.config import LayerKind, ModelConfig, RopeScaling, make_config
from effjax.models.families import FAMILIES, FamilyTable
from effjax.models.quant import Int8Rows, from_q8_0
from effjax.models.sharding import DEFAULT_RULES, ShardingRules
from effjax.models.transformer import Transformer, rope_inv_freq

SUPPORTED_ARCHITECTURES = tuple(FAMILIES)  # GGUF architecture names are effjax's family names

# Architecture metadata (after "<arch>.") that the config reads; anything else is an error, because it
# would describe behaviour the model does not implement (experts, partial RoPE, YaRN, ...).
_COMMON_KEYS = frozenset({
    "vocab_size", "context_length", "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.value_length", "attention.layer_norm_rms_epsilon", "rope.dimension_count",
    "rope.freq_base", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length",
})
_SLIDING_KEYS = frozenset({"attention.sliding_window", "attention.sliding_window_pattern"})
_SOFTCAP_KEYS = frozenset({"attn_logit_softcapping", "final_logit_softcapping"})
_LOCAL_ROPE_KEYS = frozenset({"rope.freq_base_swa"})
_LLAMA_CPP_ROPE_BASE = 10_000.0  # llama.cpp's RoPE base for a file that gives none

# llama.cpp storage quirks: Llama's attn_q / attn_k rows are permuted for its interleaved RoPE, and
# Gemma's queries are scaled by (dim / heads) ** -0.5 at these depths (the 27B models).
_PERMUTED_QK = frozenset({"llama"})
_DIM_QUERY_SCALE_DEPTHS = {"gemma2": (46,), "gemma3": (62,)}


def _arch_keys(table: FamilyTable) -> frozenset[str]:
  """The metadata keys an architecture may carry: the common ones and those of its family's traits."""
  return (_COMMON_KEYS | (_SLIDING_KEYS if table.slides else frozenset())
          | (_SOFTCAP_KEYS if table.softcaps else frozenset())
          | (_LOCAL_ROPE_KEYS if table.rope_local_theta is not None else frozenset()))

# GGUF tensor name -> effjax parameter name ("{i}" is the layer).
_TOP_TENSORS = {"token_embd.weight": "embed", "output.weight": "lm_head",
                "output_norm.weight": "final_norm.scale"}
_BLOCK_TENSORS = {
    "attn_norm.weight": "attn_norm.scale", "ffn_norm.weight": "mlp_norm.scale",
    "post_attention_norm.weight": "attn_post_norm.scale",
    "post_ffw_norm.weight": "mlp_post_norm.scale",
    "attn_q_norm.weight": "attn.q_norm.scale", "attn_k_norm.weight": "attn.k_norm.scale",
    "attn_q.weight": "attn.q.weight", "attn_k.weight": "attn.k.weight",
    "attn_v.weight": "attn.v.weight", "attn_output.weight": "attn.o.weight",
    "attn_q.bias": "attn.q.bias", "attn_k.bias": "attn.k.bias", "attn_v.bias": "attn.v.bias",
    "ffn_gate.weight": "mlp.gate.weight", "ffn_up.weight": "mlp.up.weight",
    "ffn_down.weight": "mlp.down.weight",
}
# Llama 3.1 RoPE scaling is stored as per-frequency divisors, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"


class GGUFFile:
  """An opened GGUF file: its metadata (plain Python values) and its tensors (memory-mapped)."""

  def __init__(self, path: str | os.PathLike):
    import gguf

    self.path = Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"{self.path}: no such GGUF file")
    size = self.path.stat().st_size
    with self.path.open("rb") as f:
      magic = f.read(4)
    if magic != b"GGUF":
      raise CheckpointError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
      self.reader = gguf.GGUFReader(self.path)
      self.metadata: dict[str, Any] = {k: f.contents() for k, f in self.reader.fields.items()}
    except Exception as e:  # the reader reports a short file as reshape / mmap / view errors
      raise CheckpointError(f"{self.path}: truncated or corrupt GGUF file ({size} bytes): "
                            f"{type(e).__name__}: {e}") from e
    self.tensors = {t.name: t for t in self.reader.tensors}
    end = max((t.data_offset + t.n_bytes for t in self.reader.tensors), default=0)
    if end > size:
      raise CheckpointError(f"{self.path}: truncated GGUF file: tensor data ends at byte {end}, "
                            f"the file has {size} bytes")

  @property
  def architecture(self) -> str:
    return self.metadata.get("general.architecture", "")

  def __repr__(self) -> str:
    return f"GGUFFile({str(self.path)!r}, architecture={self.architecture!r})"

  def array(self, name: str) -> np.ndarray:
    """Tensor `name` dequantized to float32, in numpy order ([out, in] for matrices)."""
    import gguf

    t = self.tensors[name]
    try:
      return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    except NotImplementedError as e:
      raise CheckpointError(f"{self.path}: tensor {name!r} has block type {t.tensor_type.name}, "
                            f"which the gguf package cannot dequantize") from e

  def int8_rows(self, name: str) -> Int8Rows | None:
    """A Q8_0 matrix as int8 codes with one scale per row (None for other block types)."""
    import gguf

    t = self.tensors[name]
    if t.tensor_type != gguf.GGMLQuantizationType.Q8_0 or len(t.shape) != 2:
      return None
    return from_q8_0(t.data, (int(t.shape[1]), int(t.shape[0])))  # GGUF lists the fastest dim first


def as_gguf(src: str | os.PathLike | GGUFFile) -> GGUFFile:
  return src if isinstance(src, GGUFFile) else GGUFFile(src)


def _single(value, what: str, source: str) -> int:
  """Per-layer arrays (some files store head counts per layer) must be uniform here."""
  if isinstance(value, list):
    if len(set(value)) != 1:
      raise CheckpointError(f"{source}: per-layer {what} {value} differ; not supported")
    return int(value[0])
  return int(value)


def _f32(value) -> float:
  """GGUF stores floats as float32: read back the shortest decimal (1e-05, not 9.9999997e-06)."""
  return float(str(np.float32(value)))


def _layer_kinds(table: FamilyTable, num_layers: int, pattern) -> tuple[LayerKind, ...]:
  """llama.cpp writes the pattern as a period (every n-th layer global), as a per-layer list of
  'is sliding' flags, or not at all (the family's own period)."""
  if isinstance(pattern, list):
    return tuple("sliding" if p else "global" for p in pattern)
  return table.layer_kinds(num_layers, None if pattern is None else int(pattern))


def _divisors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
  probe = make_config("llama", vocab_size=1, dim=head_dim, mlp_dim=1, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=head_dim, rope_scaling=scaling)
  plain, scaled = (rope_inv_freq(probe, theta, scaled=s) for s in (False, True))
  return np.asarray(plain / scaled)


def _llama3_scaling(freqs: np.ndarray, theta: float, head_dim: int, original: int,
                    source: str) -> RopeScaling:
  """Llama 3.1 scaling read from llama.cpp's stored per-frequency divisors `freqs`: the factor is the
  largest divisor; the low / high frequency factors come from the divisors between 1 and the factor,
  where 1 / divisor moves linearly in original / wavelength, with `original` the file's original
  context length. Every divisor is then checked against the recovered parameters."""
  factor = float(freqs.max())
  wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
  between = (freqs > 1 + 1e-6) & (freqs < factor * (1 - 1e-6))
  low, high = 1.0, 4.0  # Llama 3's, where no divisor falls between (any pair then fits the file)
  if between.sum() >= 2:
    # smooth = (original / wavelen - low) / (high - low), and 1 / d = (1 - smooth) / factor + smooth.
    smooth = (1 / freqs[between] - 1 / factor) / (1 - 1 / factor)
    slope, offset = np.polyfit(original / wavelen[between], smooth, 1)
    low = float(-offset / slope)
    high = float(low + 1 / slope)
  scaling = RopeScaling("llama3", factor, round(low, 4), round(high, 4), original)
  want = _divisors(scaling, theta, head_dim)
  if freqs.shape != want.shape or not np.allclose(freqs, want, rtol=1e-4):
    raise CheckpointError(f"{source}: tensor {_ROPE_FREQS!r} holds RoPE divisors that are not Llama 3 "
                          f"scaling (closest: factor {factor}, low/high {low:.4g}/{high:.4g}, original "
                          f"length {original})")
  return scaling


def config_from_gguf(src: str | os.PathLike | GGUFFile, *, dtype: str = "float32") -> ModelConfig:
  """The ModelConfig a GGUF file describes, strict about metadata it does not understand."""
  f = as_gguf(src)
  meta, source, arch = f.metadata, str(f.path), f.architecture
  if arch not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(f"{source}: architecture {arch!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  table = FAMILIES[arch]
  known = _arch_keys(table)
  unknown = sorted(k for k in meta if k.startswith(arch + ".") and k[len(arch) + 1:] not in known)
  if unknown:
    raise CheckpointError(f"{source}: unsupported {arch} metadata keys {unknown}")

  def get(key: str, default=None):
    return meta.get(f"{arch}.{key}", default)

  def need(key: str):
    if f"{arch}.{key}" not in meta:
      raise CheckpointError(f"{source}: metadata key {arch}.{key} is missing")
    return meta[f"{arch}.{key}"]

  if "token_embd.weight" not in f.tensors:
    raise CheckpointError(f"{source}: tensor 'token_embd.weight' is missing")
  vocab_size = int(f.tensors["token_embd.weight"].shape[-1])  # GGUF shapes list the fastest dim first
  if get("vocab_size") is not None and int(get("vocab_size")) != vocab_size:
    raise CheckpointError(f"{source}: {arch}.vocab_size={get('vocab_size')} but token_embd.weight has "
                          f"{vocab_size} rows")
  dim = int(need("embedding_length"))
  num_heads = _single(need("attention.head_count"), "head counts", source)
  num_layers = int(need("block_count"))
  head_dim = int(get("attention.key_length", dim // num_heads))
  for key in ("attention.value_length", "rope.dimension_count"):
    if get(key) is not None and int(get(key)) != head_dim:
      raise CheckpointError(f"{source}: {arch}.{key}={get(key)} differs from the head size "
                            f"{head_dim}; not supported")
  theta = _f32(get("rope.freq_base", _LLAMA_CPP_ROPE_BASE))
  kw: dict[str, Any] = dict(
      vocab_size=vocab_size, dim=dim, num_layers=num_layers, num_heads=num_heads,
      mlp_dim=_single(need("feed_forward_length"), "MLP sizes", source),
      num_kv_heads=_single(get("attention.head_count_kv", num_heads), "KV head counts", source),
      head_dim=head_dim, rope_theta=theta, norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
      max_position=int(get("context_length", 8192)), tie_embeddings="output.weight" not in f.tensors,
      dtype=dtype, pad_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)))
  eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
  kw["eos_ids"] = tuple(dict.fromkeys(int(e) for e in eos))

  scaling_type = get("rope.scaling.type", "none")
  if scaling_type == "linear":
    kw["rope_scaling"] = RopeScaling("linear", _f32(need("rope.scaling.factor")))
  elif scaling_type != "none":
    raise CheckpointError(f"{source}: RoPE scaling {scaling_type!r} is not supported "
                          "(linear, llama3)")
  if _ROPE_FREQS in f.tensors:
    if arch != "llama" or scaling_type != "none":
      raise CheckpointError(f"{source}: tensor {_ROPE_FREQS!r} is only supported for llama without "
                            "other RoPE scaling")
    original = int(get("rope.scaling.original_context_length", 8192))  # Llama 3's, if not written
    kw["rope_scaling"] = _llama3_scaling(f.array(_ROPE_FREQS), theta, head_dim, original, source)

  if table.slides:
    kw["sliding_window"] = int(need("attention.sliding_window"))
    kw["layer_kinds"] = _layer_kinds(table, num_layers, get("attention.sliding_window_pattern"))
  if num_layers in _DIM_QUERY_SCALE_DEPTHS.get(arch, ()):
    kw["query_scale"] = (dim // num_heads) ** -0.5
  if table.softcaps:
    for key, field in (("attn_logit_softcapping", "attn_softcap"),
                       ("final_logit_softcapping", "final_softcap")):
      value = get(key, getattr(table, field))
      kw[field] = None if value is None else _f32(value)
  if table.rope_local_theta is not None:
    kw["rope_local_theta"] = _f32(get("rope.freq_base_swa", table.rope_local_theta))
  kw["qkv_bias"] = "blk.0.attn_q.bias" in f.tensors
  return make_config(arch, **kw)


def effjax_name(gguf_name: str, source: str) -> str:
  if gguf_name in _TOP_TENSORS:
    return _TOP_TENSORS[gguf_name]
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
    return f"layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}"
  raise CheckpointError(f"{source}: tensor {gguf_name!r} has no counterpart in effjax models")


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Invert llama.cpp's Q/K permutation: per head it interleaves the two RoPE halves row-wise."""
  rows = np.arange(w.shape[0]).reshape(n_head, w.shape[0] // n_head // 2, 2).swapaxes(1, 2).reshape(-1)
  return w.take_rows(rows) if isinstance(w, Int8Rows) else w[rows]


def gguf_tensors(src: str | os.PathLike | GGUFFile,
                 cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray | Int8Rows]]:
  """(effjax name, float32 array) for every tensor of the file, one at a time. With cfg.quant
  "int8", Q8_0 matrices come as Int8Rows, their codes rescaled per row, never dequantized."""
  f = as_gguf(src)
  source = str(f.path)
  for name in f.tensors:
    if name == _ROPE_FREQS:  # read into cfg.rope_scaling
      continue
    target = effjax_name(name, source)
    w = f.int8_rows(name) if cfg.quant == "int8" else None
    w = f.array(name) if w is None else w
    if f.architecture in _PERMUTED_QK and (".attn_q." in name or ".attn_k." in name):
      w = _unpermute_rows(w, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
    if cfg.norm_plus_one and name.endswith("norm.weight"):
      w = w - 1.0
    yield target, w


def load_gguf(src: str | os.PathLike | GGUFFile, *, dtype: str = "float32", mesh=None,
              rules: ShardingRules = DEFAULT_RULES,
              quant: str | None = None) -> tuple[ModelConfig, Transformer]:
  """Config and model from a GGUF file; tensors are dequantized (or, for quant="int8", Q8_0 ones
  rescaled) and placed one at a time (each device receiving its shard when `mesh` is given, split
  by `rules`)."""
  f = as_gguf(src)
  cfg = config_from_gguf(f, dtype=dtype).replace(quant=quant)
  return cfg, assemble(cfg, gguf_tensors(f, cfg), source=str(f.path), mesh=mesh, rules=rules)
