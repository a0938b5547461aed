"""ReBalance control function alpha(c, v): the signed steering strength of one reasoning step.

F1 maps confidence c to [L1, 0.01] through a tanh centred between the confidence quartiles;
two sigmoid gates add the overthinking (low c, high v -> L2) and underthinking (high c, low v -> H2)
amplitudes on top. Negative alpha pushes away from overthinking, positive alpha encourages
exploration. The constants come from a model's calibration statistics (REBALANCE.md).

Choosing L1, L2, H2 for a new model (the paper derives them from statistics it does not publish):
alpha multiplies the unnormalised class-mean difference S, so alpha = -1 moves a hidden state by one
full overthinking-to-normal gap whatever the model's scale, consistent with the published values
staying within a small range across 1.5B..32B models. Start from the preset of the closest model size
(L1 ~ -1, L2 ~ -2, H2 = 0.1), keep L2 < L1 < 0 < H2, and tune |L1| on a small dev split while
watching Pass@1 and mean tokens: larger magnitudes are expected to shorten reasoning more and
eventually to hurt accuracy.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# F1 passes through (1, F1_AT_ONE): the value of a fully confident step without the H2 gate.
F1_AT_ONE = 0.01
# Sharpness of the regime gates (authors' values).
GATE_SLOPE = 1200.0
GATE_P = 0.25


@dataclasses.dataclass(frozen=True)
class ReBalanceConstants:
  """Per-model calibration constants.

  q25c/q75c: quartiles of step confidence; q25v/q75v: quartiles of step confidence variance.
  L1: alpha at c = q25c in the normal regime; L2: alpha for overthinking (low c, high v);
  H2: alpha for underthinking (high c, low v).
  layer: index of the decoder layer whose input residual stream is steered (HF hidden_states[layer]).
  """

  q25c: float
  q75c: float
  L1: float
  q25v: float
  q75v: float
  L2: float
  H2: float
  layer: int

  def __post_init__(self):
    if not 0.0 <= self.q25c < self.q75c < 1.0:
      raise ValueError(f"need 0 <= q25c < q75c < 1, got {self.q25c}, {self.q75c}")
    if not 0.0 <= self.q25v < self.q75v:
      raise ValueError(f"need 0 <= q25v < q75v, got {self.q25v}, {self.q75v}")
    if not self.L1 < 0.0:
      raise ValueError(f"L1 must be negative, got {self.L1}")

  def replace(self, **kw) -> "ReBalanceConstants":
    return dataclasses.replace(self, **kw)


# The authors' released constants (REBALANCE.md table). Qwen2-family layers are the published ones;
# for Qwen3 the authors' code steers one layer later than the published index (34 -> 35): the preset
# reproduces that code, and `preset(name, layer="paper")` gives the published layer.
PRESETS: dict[str, ReBalanceConstants] = {
    "deepseek-r1-distill-qwen-1.5b": ReBalanceConstants(
        q25c=0.662293, q75c=0.94805, L1=-1.02, q25v=0.000560, q75v=0.011597, L2=-1.91, H2=0.1,
        layer=19),
    "deepseek-r1-distill-qwen-7b": ReBalanceConstants(
        q25c=0.666017, q75c=0.927745, L1=-1.19, q25v=0.000488, q75v=0.009931, L2=-2.34, H2=0.1,
        layer=22),
    "qwq-32b": ReBalanceConstants(
        q25c=0.700670, q75c=0.917506, L1=-1.31, q25v=0.000386, q75v=0.007279, L2=-2.73, H2=0.1,
        layer=58),
    "qwen3-14b": ReBalanceConstants(
        q25c=0.816174, q75c=0.965398, L1=-1.03, q25v=0.000149, q75v=0.003593, L2=-1.13, H2=0.1,
        layer=35),
}


# Where the paper's published layer differs from the one the authors' code steers.
PAPER_LAYERS: dict[str, int] = {"qwen3-14b": 34}
LAYER_SOURCES = ("code", "paper")


def preset(name: str, layer: str = "code") -> ReBalanceConstants:
  """A model's published constants with the layer of the authors' code (default) or the paper."""
  if name not in PRESETS:
    raise ValueError(f"no ReBalance preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
  if layer not in LAYER_SOURCES:
    raise ValueError(f"layer must be one of {LAYER_SOURCES}, got {layer!r}")
  consts = PRESETS[name]
  return consts.replace(layer=PAPER_LAYERS.get(name, consts.layer)) if layer == "paper" else consts


def preset_for(model_id: str) -> ReBalanceConstants | None:
  """The preset whose name is the last path component of `model_id` (case-insensitive), if any."""
  return PRESETS.get(model_id.rstrip("/").rsplit("/", 1)[-1].lower())


def _f1_at_one(k: float, m: float, s: float, L1: float) -> float:
  a, b = L1 / 2, -L1 / (2 * math.tanh(k * s))
  return a + b * math.tanh(k * (1.0 - m))


def solve_k(consts: ReBalanceConstants, tol: float = 1e-12) -> float:
  """The tanh slope k with F1(1) = 0.01, by bisection on the host (once, at setup).

  F1(1) = L1/2 * (1 - tanh(k (1 - m)) / tanh(k s)) falls monotonically from
  L1/2 * (1 - (1 - m)/s) (k -> 0) towards 0 (k -> inf), so a root exists when that limit is
  above 0.01.
  """
  m, s = (consts.q25c + consts.q75c) / 2, (consts.q75c - consts.q25c) / 2
  f = lambda k: _f1_at_one(k, m, s, consts.L1) - F1_AT_ONE
  lo, hi = 1e-9, 1.0
  if f(lo) <= 0:
    raise ValueError(f"no k gives F1(1) = {F1_AT_ONE} for {consts}")
  while f(hi) > 0:
    lo, hi = hi, 2 * hi
  while hi - lo > tol * hi:
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
  return (lo + hi) / 2


def f1(c: jax.Array, consts: ReBalanceConstants, k: float) -> jax.Array:
  m, s = (consts.q25c + consts.q75c) / 2, (consts.q75c - consts.q25c) / 2
  a, b = consts.L1 / 2, -consts.L1 / (2 * math.tanh(k * s))
  return a + b * jnp.tanh(k * (c - m))


def alpha(c: jax.Array, v: jax.Array, consts: ReBalanceConstants, k: float) -> jax.Array:
  """Steering strength for step confidence c and confidence variance v (any matching shapes).

  consts and k are host constants (k from solve_k): the function is pure jnp and jittable.
  """
  c = jnp.asarray(c, jnp.float32)
  v = jnp.asarray(v, jnp.float32)
  iqr_c = consts.q75c - consts.q25c
  iqr_v = consts.q75v - consts.q25v
  sig = jax.nn.sigmoid
  low_c = sig(GATE_SLOPE * (consts.q25c - c) / iqr_c)
  high_c = sig(GATE_SLOPE * (c - consts.q75c) / iqr_c)
  high_v = sig(GATE_SLOPE * (v - consts.q75v) / iqr_v)
  low_v = sig(GATE_SLOPE * (consts.q25v - v) / iqr_v)
  g_minus = 0.5 * sig(12.0 * (1.0 - consts.q75c) / iqr_c)
  w_low = jnp.minimum(1.0, low_c * high_v / GATE_P)
  w_high = jnp.minimum(1.0, high_c * low_v / g_minus)
  out = (f1(c, consts, k) + (consts.L2 - f1(consts.q25c, consts, k)) * w_low
         + (consts.H2 - f1(1.0, consts, k)) * w_high)
  return jnp.clip(out, min(consts.L1, consts.L2), max(F1_AT_ONE, consts.H2))
