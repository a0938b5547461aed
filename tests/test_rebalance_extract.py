"""Offline extraction: step split, confidences, labels, planted layer selection, profile round trip."""

import math

import numpy as np
import pytest

from effjax.rebalance import extract as ex
from effjax.rebalance.disjoint import ProblemSet, clashes, shingles
from effjax.rebalance.control import solve_k


def test_split_steps_token_level():
  pieces = ["First", " step", ".\n\n", "Wait", ",", " second", "\n\n\n", "Third", " x", "\n", "\n",
            "Four", " \n\n", "\n\nHmm", " ok"]
  steps = ex.split_steps(pieces)
  assert [s.text for s in steps] == ["First step.", "Wait, second", "Third x", "Four ", "Hmm ok"]
  assert [(s.start, s.end) for s in steps] == [(0, 3), (3, 6), (7, 9), (11, 13), (13, 15)]
  # Whitespace-only segments are not steps; a leading delimiter makes no empty first step.
  assert [s.text for s in ex.split_steps(["\n\n", "a", "\n\n", " ", "\n\n", "b"])] == ["a", "b"]


def test_thinking_range():
  assert ex.thinking_range([5, 6, 2, 7], 1, 2) == (0, 2)  # prompt opened the span
  assert ex.thinking_range([1, 5, 6, 2, 7], 1, 2) == (1, 3)
  assert ex.thinking_range([5, 6], 1, 2) == (0, 2)


def test_confidences_variances_labels():
  logp = np.log(np.array([0.9, 0.8, 0.5, 0.5, 0.99, 0.97, 0.2]))
  steps = [ex.Step(0, 2, "a"), ex.Step(2, 4, "b"), ex.Step(4, 7, "c")]
  c = ex.step_confidences(logp, steps)
  np.testing.assert_allclose(c, [math.sqrt(0.72), 0.5, (0.99 * 0.97 * 0.2) ** (1 / 3)])
  np.testing.assert_allclose(ex.step_variances(c), [(c[1] - c[0]) ** 2 / 4, (c[2] - c[1]) ** 2 / 4])
  texts = ["So x = 2.", "Wait, that is wrong.", "Let me double-check this.", "Thus y = 3.",
           "Hmm.", "Butter costs 3.", "Done.", "But then"]
  refl = ex.has_reflection(texts)
  np.testing.assert_array_equal(refl, [0, 1, 1, 0, 1, 0, 0, 1])
  stats = ex.StepStats(q25c=0.5, q75c=0.9, q25v=0.0, q75v=0.01)
  cc = np.array([0.95, 0.95, 0.7, 0.3, 0.6, 0.92, 0.7, 0.99])
  np.testing.assert_array_equal(ex.label_steps(cc, refl, stats), [0, 1, 1, 1, 1, 0, -1, 1])


def fill_store(path, n_problems=60, num_layers=5, dim=80, planted=3, seed=0):
  """Synthetic store where only layer `planted` encodes c linearly (strongly) and layer 1 weakly."""
  rng = np.random.default_rng(seed)
  direction = rng.normal(size=dim)
  direction /= np.linalg.norm(direction)
  weak = rng.normal(size=dim) / math.sqrt(dim)
  store = ex.CalibrationStore.create(path, num_layers, dim)
  for p in range(n_problems):
    n = int(rng.integers(4, 12))
    c = rng.uniform(0.3, 1.0, size=n)
    texts = [("Wait, " if rng.random() < 0.3 else "") + f"step {j}" for j in range(n)]
    steps = [ex.Step(j, j + 1, t) for j, t in enumerate(texts)]
    hidden = rng.normal(size=(num_layers, n, dim))
    hidden[planted] += 20.0 * (c - 0.65)[:, None] * direction
    hidden[1] += 4.0 * (c - 0.65)[:, None] * weak
    store.append(ex.problem_fingerprint(f"problem {p}"), steps, c, hidden,
                 shingles(f"problem {p}"))
  return store, direction


def test_layer_selection_picks_planted_signal(tmp_path):
  store, _ = fill_store(tmp_path / "store")
  layer, scores = ex.select_layer(store, seed=0)
  assert layer == 3
  assert scores[3] > 0.9
  assert 0.2 < scores[1] < 0.8  # the weaker signal is seen, and ranked below the planted one
  assert max(scores[0], scores[2], scores[4]) < 0.05


def test_layer_r2_matches_closed_form_without_pca():
  # With as many components as dims PCA is a rotation: ridge on it equals ridge on centred x.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 6))
  y = x @ rng.normal(size=6) + 0.3 * rng.normal(size=200)
  train = ex.split_mask(200, seed=3)
  assert train.sum() == 160
  xt, yt = x[train], y[train]
  mu = xt.mean(0)
  beta = np.linalg.solve((xt - mu).T @ (xt - mu) + np.eye(6), (xt - mu).T @ (yt - yt.mean()))
  pred = (x[~train] - mu) @ beta + yt.mean()
  want = 1 - ((y[~train] - pred) ** 2).sum() / ((y[~train] - y[~train].mean()) ** 2).sum()
  assert ex.layer_r2(x, y, train, n_components=64) == pytest.approx(want, rel=1e-10)


def test_profile_from_synthetic_store_round_trips(tmp_path):
  store, direction = fill_store(tmp_path / "store")
  # Reopening (resume) sees the same rows and drops bytes of an interrupted append.
  with open(tmp_path / "store" / "layer_000.bin", "ab") as f:
    f.write(b"\0" * 12)
  reopened = ex.CalibrationStore.open(tmp_path / "store")
  assert reopened.num_rows == store.num_rows and reopened.done == store.done
  np.testing.assert_array_equal(reopened.layer(3), store.layer(3))

  profile = ex.build_profile(reopened, "synthetic/tiny", seed=0)
  c = store.confidences()
  consts = profile.constants
  assert consts.layer == 3
  assert (consts.q25c, consts.q75c) == pytest.approx(tuple(np.quantile(c, [0.25, 0.75])))
  v = np.concatenate([ex.step_variances(p["c"]) for p in store.problems])
  assert (consts.q25v, consts.q75v) == pytest.approx(tuple(np.quantile(v, [0.25, 0.75])))
  assert (consts.L1, consts.L2, consts.H2) == (-1.02, -1.91, 0.1)
  solve_k(consts)  # the extracted constants admit a control function

  labels = ex.label_steps(c, ex.has_reflection(store.texts()), ex.step_stats(c, v))
  x = np.asarray(store.layer(3), np.float64)
  want = x[labels == 1].mean(0) - x[labels == 0].mean(0)
  np.testing.assert_allclose(profile.vector, want, rtol=1e-5, atol=1e-5)
  # Overthinking steps have lower c, so S points against the planted confidence direction.
  assert np.dot(profile.vector, direction) / np.linalg.norm(profile.vector) < -0.9
  assert profile.counts["overthinking"] + profile.counts["normal"] < profile.counts["steps"]

  profile.save(tmp_path / "profile.safetensors")
  loaded = ex.ReBalanceProfile.load(tmp_path / "profile.safetensors")
  np.testing.assert_array_equal(loaded.vector, profile.vector)
  assert loaded.constants == profile.constants and loaded.model_id == "synthetic/tiny"
  assert loaded.calibration_hash == profile.calibration_hash and loaded.layer_r2 == profile.layer_r2
  assert loaded.statistic == "geometric" and loaded.seal.layer == consts.layer
  np.testing.assert_array_equal(loaded.seal.vector, profile.seal.vector)
  found = clashes(loaded.calibration, ProblemSet.of(["an unseen problem", "Problem   1",
                                                     "problem 7"]))
  assert [(c.problem, c.overlap) for c in found] == [(1, 1.0), (2, 1.0)]


def test_store_rejects_bad_shapes(tmp_path):
  store = ex.CalibrationStore.create(tmp_path / "s", num_layers=2, dim=4)
  with pytest.raises(ValueError):
    store.append("p", [ex.Step(0, 1, "a")], np.array([0.5]), np.zeros((2, 2, 4)))
  with pytest.raises(FileExistsError):
    ex.CalibrationStore.create(tmp_path / "s", num_layers=2, dim=4)
