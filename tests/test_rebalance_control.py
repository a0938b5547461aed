"""alpha(c, v) against a plain-Python evaluation of the REBALANCE.md formula."""

import math

import jax
import numpy as np
import pytest
from scipy.optimize import brentq

from effjax.rebalance import control
from effjax.rebalance.control import PRESETS, ReBalanceConstants, preset_for, solve_k

R1_1P5B = PRESETS["deepseek-r1-distill-qwen-1.5b"]


def ref_k(q25c, q75c, L1):
  m, s = (q25c + q75c) / 2, (q75c - q25c) / 2
  f1_at_1 = lambda k: L1 / 2 - L1 / (2 * math.tanh(k * s)) * math.tanh(k * (1 - m))
  return brentq(lambda k: f1_at_1(k) - 0.01, 1e-6, 1e4, xtol=1e-14)


def ref_alpha(c, v, q25c, q75c, L1, q25v, q75v, L2, H2):
  """REBALANCE.md 'Control function', written out with the math module."""
  k = ref_k(q25c, q75c, L1)
  m, s = (q25c + q75c) / 2, (q75c - q25c) / 2
  a, b = L1 / 2, -L1 / (2 * math.tanh(k * s))
  F1 = lambda x: a + b * math.tanh(k * (x - m))
  sigma = lambda x: 1 / (1 + math.exp(-x)) if x > -700 else 0.0  # math.exp overflows
  iqr_c, iqr_v = q75c - q25c, q75v - q25v
  gLc = sigma(1200 * (q25c - c) / iqr_c)
  gHc = sigma(1200 * (c - q75c) / iqr_c)
  gHv = sigma(1200 * (v - q75v) / iqr_v)
  gLv = sigma(1200 * (q25v - v) / iqr_v)
  gp, gm = 0.25, 0.5 * sigma(12 * (1 - q75c) / iqr_c)
  w_low = min(1, gLc * gHv / gp)
  w_high = min(1, gHc * gLv / gm)
  out = F1(c) + (L2 - F1(q25c)) * w_low + (H2 - F1(1)) * w_high
  return min(max(out, min(L1, L2)), max(0.01, H2)), F1(c)


def consts_args(k):
  return (k.q25c, k.q75c, k.L1, k.q25v, k.q75v, k.L2, k.H2)


def test_solve_k_matches_brentq_and_anchors():
  for consts in PRESETS.values():
    k = solve_k(consts)
    assert k == pytest.approx(ref_k(consts.q25c, consts.q75c, consts.L1), rel=1e-9)
    f = lambda c: float(control.f1(np.float64(c), consts, k))
    assert f(consts.q25c) == pytest.approx(consts.L1, abs=1e-6)
    assert f(consts.q75c) == pytest.approx(0.0, abs=1e-6)
    assert f(1.0) == pytest.approx(0.01, abs=1e-6)


def test_alpha_grid_matches_reference_for_1p5b():
  cs = [0.1, 0.3, 0.5, 0.6, 0.65, 0.662293, 0.68, 0.7, 0.75, 0.8, 0.85, 0.9, 0.94, 0.94805, 0.96,
        0.98, 0.99, 1.0]
  vs = [0.0, 0.0003, 0.00056, 0.001, 0.003, 0.006, 0.011, 0.011597, 0.012, 0.02, 0.05, 0.2]
  c, v = np.meshgrid(np.array(cs), np.array(vs), indexing="ij")
  got = np.asarray(jax.jit(control.alpha, static_argnums=(2, 3))(c, v, R1_1P5B, solve_k(R1_1P5B)))
  want = np.array([[ref_alpha(ci, vi, *consts_args(R1_1P5B))[0] for vi in vs] for ci in cs])
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert got.min() == pytest.approx(-1.91, abs=1e-6) and got.max() == pytest.approx(0.1, abs=1e-3)


def test_alpha_regimes_1p5b():
  k = solve_k(R1_1P5B)
  a = lambda c, v: float(control.alpha(c, v, R1_1P5B, k))
  # Overthinking: low confidence, high variance -> L2.
  assert a(0.4, 0.03) == pytest.approx(-1.91, abs=1e-5)
  assert a(R1_1P5B.q25c, R1_1P5B.q75v) == pytest.approx(-1.91, abs=1e-5)
  # Underthinking: c ~ 0.99, v ~ 0 -> H2.
  assert a(0.99, 0.0) == pytest.approx(0.1, abs=2e-3)
  # In between: F1(c) within [L1, 0].
  for c in (0.7, 0.8, 0.9):
    want_alpha, want_f1 = ref_alpha(c, 0.001, *consts_args(R1_1P5B))
    assert a(c, 0.001) == pytest.approx(want_f1, abs=1e-5) == pytest.approx(want_alpha, abs=1e-5)
    assert -1.02 <= a(c, 0.001) <= 0.0
  # Interior values reported for the authors' own implementation (independent port).
  assert [a(c, 0.001) for c in (0.7, 0.8, 0.9)] == pytest.approx(
      [-0.99339795, -0.55161738, -0.04057819], abs=2e-5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_matches_reference(name):
  consts = PRESETS[name]
  k = solve_k(consts)
  for c in (0.2, consts.q25c, 0.75, 0.85, consts.q75c, 0.99):
    for v in (0.0, consts.q25v, 0.002, consts.q75v, 0.03):
      assert float(control.alpha(c, v, consts, k)) == pytest.approx(
          ref_alpha(c, v, *consts_args(consts))[0], abs=2e-5)


def test_presets_and_lookup():
  assert preset_for("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B").layer == 22
  assert preset_for("/ckpt/QwQ-32B/").L2 == -2.73
  assert preset_for("Qwen/Qwen3-14B").layer == 35  # published 34, authors' Qwen3 code steers +1
  assert preset_for("unknown/model") is None
  with pytest.raises(ValueError):
    ReBalanceConstants(q25c=0.9, q75c=0.8, L1=-1, q25v=0, q75v=0.01, L2=-2, H2=0.1, layer=0)
