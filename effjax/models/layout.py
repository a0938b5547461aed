"""How the projection weights are laid out in the model, and how checkpoints' matrices map onto them.

Checkpoints (Hugging Face, GGUF) store every linear map as its own [out, in] matrix. With
`cfg.fused_projections` the model holds one QKV kernel and one gate+up kernel per layer instead of
five: a decode step then runs four weight products per layer, not seven, each over more bytes
(BENCHMARKS.md, "Decoding engine").

The fused output axes keep structure rather than concatenating flat blocks:
- QKV: [Kh, g + 2, Dh], for each KV head its g query heads, then its key, then its value. A
  tensor-parallel split over KV heads keeps each group on one device, and attention reads the
  queries as [..., Kh, g, Dh], the grouping it computes scores in.
- gate+up: [2, F], so a split over the MLP dimension keeps gate and up units together.

Functions here work on "rows": arrays whose leading axes are a projection's outputs (weights
[out, in], biases [out], int8 codes [out, in] and their per-row scales [out]), so one function serves
float and quantized weights, numpy and jax arrays.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from effjax.models.config import ModelConfig

# Fused module -> the separate modules it replaces, in the order their rows are laid out.
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "attn.qkv": ("attn.q", "attn.k", "attn.v"),
    "mlp.gate_up": ("mlp.gate", "mlp.up"),
}
# The separate module -> (fused module, part index).
PART_OF: dict[str, tuple[str, int]] = {
    part: (fused, i) for fused, parts in FUSED_PARTS.items() for i, part in enumerate(parts)}

QKV_AXES = ("kv_heads", None, "head_dim")
GATE_UP_AXES = (None, "mlp")


def qkv_shape(cfg: ModelConfig) -> tuple[int, int, int]:
  return (cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads + 2, cfg.head_dim)


def fuse(cfg: ModelConfig, module: str, parts):
  """The fused rows of `module` ("attn.qkv" or "mlp.gate_up") from its parts' rows."""
  xp = np if isinstance(parts[0], np.ndarray) else jnp
  if module == "attn.qkv":
    kh, _, dh = qkv_shape(cfg)
    grouped = [p.reshape(kh, -1, dh, *p.shape[1:]) for p in parts]  # q: g heads, k and v: one
    return xp.concatenate(grouped, axis=1)
  if module == "mlp.gate_up":
    return xp.stack(list(parts), axis=0)
  raise ValueError(f"{module!r} is not a fused projection; fused: {', '.join(FUSED_PARTS)}")


def split(cfg: ModelConfig, module: str, rows) -> tuple:
  """The parts' rows (as checkpoints store them) from the fused rows of `module`."""
  if module == "attn.qkv":
    g = cfg.num_heads // cfg.num_kv_heads
    flat = lambda a: a.reshape(-1, *rows.shape[3:])
    return flat(rows[:, :g]), flat(rows[:, g]), flat(rows[:, g + 1])
  if module == "mlp.gate_up":
    return rows[0], rows[1]
  raise ValueError(f"{module!r} is not a fused projection; fused: {', '.join(FUSED_PARTS)}")
