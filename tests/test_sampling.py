"""Sampling strategies: filtered distributions against numpy, seeded reproducibility, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.decoding.sampling import Sampler

LOGITS = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0, 0.2, -0.5]], np.float32)


def _np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _np_reference(logits, t, k, p, min_p):
  x = logits / t
  if k:
    x = np.where(x >= np.sort(x)[-k], x, -np.inf)
  if p < 1:
    order = np.argsort(-x)
    probs = _np_softmax(x)[order]
    keep = np.zeros_like(x, bool)
    keep[order] = (np.cumsum(probs) - probs) < p
    x = np.where(keep, x, -np.inf)
  if min_p:
    probs = _np_softmax(x)
    x = np.where(probs >= min_p * probs.max(), x, -np.inf)
  return _np_softmax(x)


@pytest.mark.parametrize("t,k,p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 3, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.3, 0, 1.0, 0.2),
    (0.9, 4, 0.9, 0.05)])
def test_filtered_distribution_matches_numpy(t, k, p, min_p):
  s = Sampler(temperature=t, top_k=k, top_p=p, min_p=min_p)
  want = _np_reference(LOGITS[0], t, k, p, min_p)
  np.testing.assert_allclose(s.probs(jnp.asarray(LOGITS))[0], want, atol=1e-6)
  # Empirical frequencies of 20k draws agree with the distribution.
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = jax.vmap(lambda kk: s(jnp.asarray(LOGITS), kk))(keys)[:, 0]
  freq = np.bincount(np.asarray(draws), minlength=LOGITS.shape[1]) / len(keys)
  np.testing.assert_allclose(freq, want, atol=0.015)
  assert (freq[want == 0] == 0).all()


def test_greedy_and_seeds():
  assert int(Sampler()(jnp.asarray(LOGITS), jax.random.key(0))[0]) == 5
  s = Sampler(temperature=1.0)
  a = s(jnp.tile(jnp.asarray(LOGITS), (64, 1)), jax.random.key(7))
  b = s(jnp.tile(jnp.asarray(LOGITS), (64, 1)), jax.random.key(7))
  c = s(jnp.tile(jnp.asarray(LOGITS), (64, 1)), jax.random.key(8))
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"), (dict(temperature=1.0, top_k=-2), "top_k"),
    (dict(temperature=1.0, min_p=1.0), "min_p"), (dict(top_k=5), "temperature > 0")])
def test_bad_parameters(kw, msg):
  with pytest.raises(ValueError, match=msg):
    Sampler(**kw)
