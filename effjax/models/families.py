"""One table per model family: what makes a family what it is. Read by the config presets
(`make_config`), the Hugging Face reader (checkpoints/hf.py) and the GGUF reader
(checkpoints/gguf_reader.py), so each family's math is written once; how a format spells or stores
it (key names, llama.cpp's row permutation) stays with that format's reader.

Sizes come from a checkpoint or a preset. A family fixes the switches of its block (norms, biases,
QK-norm, activation, embedding scale), the constants a checkpoint may leave out (norm epsilon, RoPE
bases, soft-caps, the sliding window), which layers slide and its RoPE rules.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Family = Literal["llama", "qwen2", "qwen3", "gemma2", "gemma3"]
LayerKind = Literal["global", "sliding"]


@dataclasses.dataclass(frozen=True)
class FamilyTable:
  name: Family  # also its GGUF architecture name
  hf_model_types: tuple[str, ...]  # config.json model_type values of this family (text models)
  # The block.
  norm_plus_one: bool = False  # RMSNorm scales by (1 + w) (GGUF stores w + 1)
  qkv_bias: bool = False
  qk_norm: bool = False
  post_norms: bool = False  # norms after attention and after the MLP too
  embed_scale: bool = False  # embeddings times sqrt(dim)
  activation: Literal["silu", "gelu_tanh"] = "silu"
  softcaps: bool = False  # attention / final logits may be soft-capped (values below, or stored)
  # Constants where a checkpoint does not give them.
  norm_eps: float = 1e-5
  rope_theta: float = 10_000.0
  attn_softcap: float | None = None
  final_softcap: float | None = None
  sliding_window: int | None = None
  # Which layers slide: every `global_every`-th layer is global, the others slide (None: all global
  # unless a checkpoint says otherwise).
  global_every: int | None = None
  # RoPE rules: sliding layers rotate with their own base and no scaling (None: the global base);
  # RoPE scaling (linear, llama3) applies to the global layers.
  rope_local_theta: float | None = None

  @property
  def slides(self) -> bool:
    return self.global_every is not None

  def layer_kinds(self, num_layers: int, global_every: int | None = None) -> tuple[LayerKind, ...]:
    """The family's layer pattern (or one with another period); () when every layer is global."""
    every = global_every or self.global_every
    if every is None:
      return ()
    return tuple("global" if (i + 1) % every == 0 else "sliding" for i in range(num_layers))

  def config_defaults(self) -> dict:
    """ModelConfig fields the family sets before sizes and checkpoint values override them."""
    return dict(norm_plus_one=self.norm_plus_one, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm,
                post_norms=self.post_norms, embed_scale=self.embed_scale, activation=self.activation,
                norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                rope_local_theta=self.rope_local_theta, attn_softcap=self.attn_softcap,
                final_softcap=self.final_softcap, sliding_window=self.sliding_window)


_GEMMA = dict(norm_plus_one=True, post_norms=True, embed_scale=True, activation="gelu_tanh",
              softcaps=True, norm_eps=1e-6)

FAMILIES: dict[str, FamilyTable] = {f.name: f for f in (
    FamilyTable("llama", ("llama",)),
    FamilyTable("qwen2", ("qwen2",), qkv_bias=True, norm_eps=1e-6, rope_theta=1_000_000.0),
    FamilyTable("qwen3", ("qwen3",), qk_norm=True, norm_eps=1e-6, rope_theta=1_000_000.0),
    FamilyTable("gemma2", ("gemma2",), **_GEMMA, attn_softcap=50.0, final_softcap=30.0,
           sliding_window=4096, global_every=2),
    FamilyTable("gemma3", ("gemma3_text", "gemma3"), **_GEMMA, qk_norm=True, rope_theta=1_000_000.0,
           rope_local_theta=10_000.0, sliding_window=4096, global_every=6),
)}


def family_table(name: str) -> FamilyTable:
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
  return FAMILIES[name]


def family_of_model_type(model_type: str) -> FamilyTable | None:
  """The family of a Hugging Face config's model_type, None when effjax has none."""
  return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)
