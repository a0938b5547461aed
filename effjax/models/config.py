"""Typed configuration of the decoder family, with presets per architecture.

One `ModelConfig` describes every supported family (Llama, Qwen2, Qwen3, Gemma 2, Gemma 3); the
differences between families are switches on it, so the model code has a single implementation.
Each family's switches and constants come from its table in `families.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from effjax.models.families import Family, LayerKind, family_table


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. `llama3` is Llama 3.1's piecewise scaling; `linear` divides all
  frequencies by `factor` (Gemma 3 global layers of the larger models)."""

  kind: Literal["llama3", "linear"]
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: Family
  vocab_size: int
  dim: int
  mlp_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rope_local_theta: float | None = None  # Gemma 3 sliding layers use their own base
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w)
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3, Gemma 3
  post_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP too
  embed_scale: bool = False  # Gemma: embeddings times sqrt(dim)
  activation: Literal["silu", "gelu_tanh"] = "silu"
  attn_softcap: float | None = None  # Gemma 2
  final_softcap: float | None = None  # Gemma 2
  query_scale: float | None = None  # attention scale; None -> head_dim ** -0.5
  sliding_window: int | None = None
  layer_kinds: tuple[LayerKind, ...] = ()  # empty -> every layer global
  tie_embeddings: bool = True
  max_position: int = 8192
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  dtype: str = "float32"  # activations and parameters; "bfloat16" on TPU/GPU
  # How the weights are stored (models/layout.py, models/quant.py), not what the model computes:
  # one QKV and one gate+up kernel per layer (False: separate kernels, as checkpoints store them),
  # and "int8" for weight-only int8 kernels with per-output-channel scales.
  fused_projections: bool = True
  quant: Literal["int8"] | None = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.layer_kinds and len(self.layer_kinds) != self.num_layers:
      raise ValueError(f"layer_kinds has {len(self.layer_kinds)} entries for {self.num_layers} layers")
    if "sliding" in self.layer_kinds and not self.sliding_window:
      raise ValueError("sliding layers need sliding_window")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"unsupported dtype {self.dtype!r}")
    if self.quant not in (None, "int8"):
      raise ValueError(f"unsupported quant {self.quant!r}; supported: int8 (or none)")

  @property
  def jnp_dtype(self):
    import jax.numpy as jnp  # here, so that reading configs (e.g. `effjax models`) needs no JAX

    return jnp.dtype(self.dtype)

  def layer_kind(self, i: int) -> LayerKind:
    return self.layer_kinds[i] if self.layer_kinds else "global"

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    attn = self.dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.dim * self.mlp_dim
    embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
    return self.num_layers * (attn + mlp) + embed


def make_config(family: Family, **sizes) -> ModelConfig:
  """A config of `family`: the family table's switches, constants and layer pattern, overridden by
  `sizes`."""
  table = family_table(family)
  kw = table.config_defaults()
  kw.update(sizes)
  if "layer_kinds" not in sizes:
    kw["layer_kinds"] = table.layer_kinds(kw["num_layers"])
  return ModelConfig(family=family, **kw)


# Full-size presets: what the named checkpoints are. Loaders build configs from the checkpoint's
# own metadata and tests check that these presets agree with it.
PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": make_config(
        "llama", vocab_size=49152, dim=576, mlp_dim=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100_000.0, norm_eps=1e-5, max_position=8192,
        tie_embeddings=True),
    "gemma3-270m": make_config(
        "gemma3", vocab_size=262144, dim=640, mlp_dim=2048, num_layers=18, num_heads=4,
        num_kv_heads=1, head_dim=256, max_position=32768, sliding_window=512, tie_embeddings=True),
    "llama3.2-1b": make_config(
        "llama", vocab_size=128256, dim=2048, mlp_dim=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rope_theta=500_000.0, max_position=131072,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), tie_embeddings=True),
    "qwen2.5-0.5b": make_config(
        "qwen2", vocab_size=151936, dim=896, mlp_dim=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, max_position=32768, tie_embeddings=True),
    "deepseek-r1-distill-qwen-1.5b": make_config(
        "qwen2", vocab_size=151936, dim=1536, mlp_dim=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, head_dim=128, rope_theta=10_000.0, max_position=131072,
        tie_embeddings=False),
    "qwen3-0.6b": make_config(
        "qwen3", vocab_size=151936, dim=1024, mlp_dim=3072, num_layers=28, num_heads=16,
        num_kv_heads=8, head_dim=128, max_position=40960, tie_embeddings=True),
    "gemma2-2b": make_config(
        "gemma2", vocab_size=256000, dim=2304, mlp_dim=9216, num_layers=26, num_heads=8,
        num_kv_heads=4, head_dim=256, max_position=8192, tie_embeddings=True),
    # Paper-scale models (sizes from each model's config.json), for `effjax plan` recipes.
    "gemma2-9b": make_config(
        "gemma2", vocab_size=256000, dim=3584, mlp_dim=14336, num_layers=42, num_heads=16,
        num_kv_heads=8, head_dim=256, max_position=8192, tie_embeddings=True),
    "llama3.1-8b": make_config(
        "llama", vocab_size=128256, dim=4096, mlp_dim=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500_000.0, max_position=131072,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), tie_embeddings=False),
    "deepseek-r1-distill-qwen-7b": make_config(
        "qwen2", vocab_size=152064, dim=3584, mlp_dim=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rope_theta=10_000.0, max_position=131072,
        tie_embeddings=False),
    "qwq-32b": make_config(
        "qwen2", vocab_size=152064, dim=5120, mlp_dim=27648, num_layers=64, num_heads=40,
        num_kv_heads=8, head_dim=128, norm_eps=1e-5, max_position=40960, tie_embeddings=False),
    "qwen3-32b": make_config(
        "qwen3", vocab_size=151936, dim=5120, mlp_dim=25600, num_layers=64, num_heads=64,
        num_kv_heads=8, head_dim=128, max_position=40960, tie_embeddings=False),
}


def tiny_config(family: Family, **overrides) -> ModelConfig:
  """A small random-init config of `family` for tests (two layer kinds where the family has them)."""
  sizes = dict(vocab_size=128, dim=64, mlp_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
               head_dim=16, max_position=512)
  if family in ("gemma2", "gemma3"):
    sizes["sliding_window"] = 8
    sizes["layer_kinds"] = ("sliding", "global") * 2
  if family == "llama":
    sizes["rope_scaling"] = RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
  sizes.update(overrides)
  return make_config(family, **sizes)
