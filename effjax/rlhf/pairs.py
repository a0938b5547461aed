"""Which pair of a prompt's n responses to show the rater: jittable and batched over prompts.

Every selector maps (point rewards [B, n], particle rewards [B, n, Z], rng) to indices [B, 2] of two
distinct responses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.rlhf.config import AgentConfig


def choice_variance(particles: jax.Array) -> jax.Array:
  """Var over particles of p_z(i > j) = sigmoid(r_z(i) - r_z(j)): [B, n, n] (0 on the diagonal)."""
  p = jax.nn.sigmoid(particles[:, :, None, :] - particles[:, None, :, :])
  return jnp.var(p, axis=-1)


def info_directed(point, particles, rng) -> jax.Array:
  """The pair with the largest variance of the choice probability over all C(n, 2) pairs."""
  del point, rng
  b, n, _ = particles.shape
  var = choice_variance(particles)
  upper = jnp.triu(jnp.ones((n, n), bool), k=1)
  flat = jnp.where(upper, var, -jnp.inf).reshape(b, n * n)
  best = jnp.argmax(flat, axis=-1)
  return jnp.stack([best // n, best % n], axis=-1).astype(jnp.int32)


def random_pair(point, particles, rng) -> jax.Array:
  del particles
  b, n = point.shape
  keys = jax.random.split(rng, b)
  return jax.vmap(lambda k: jax.random.choice(k, n, (2,), replace=False))(keys).astype(jnp.int32)


def double_thompson(point, particles, rng, tries: int = 8) -> jax.Array:
  """Two particles each pick their best response; redraw the second (up to `tries` times) while it
  agrees with the first, then fall back to a uniform other response."""
  del point
  b, n, z = particles.shape
  k1, k2, k3 = jax.random.split(rng, 3)
  z1 = jax.random.randint(k1, (b,), 0, z)
  first = jnp.argmax(jnp.take_along_axis(particles, z1[:, None, None], axis=2)[..., 0], axis=-1)
  z2 = jax.random.randint(k2, (b, tries), 0, z)
  cand = jnp.argmax(jnp.take_along_axis(particles, z2[:, None, :], axis=2), axis=1)  # [B, tries]
  differs = cand != first[:, None]
  pick = jnp.take_along_axis(cand, jnp.argmax(differs, axis=1)[:, None], axis=1)[:, 0]
  other = (first + jax.random.randint(k3, (b,), 1, n)) % n
  second = jnp.where(differs.any(axis=1), pick, other)
  return jnp.stack([first, second], axis=-1).astype(jnp.int32)


def boltzmann(point, particles, rng, temperature: float = 1.0) -> jax.Array:
  """Two distinct responses drawn without replacement from softmax(point reward / temperature)."""
  del particles
  g = jax.random.gumbel(rng, point.shape)
  _, idx = jax.lax.top_k(point / temperature + g, 2)
  return idx.astype(jnp.int32)


def selector(agent: AgentConfig):
  kind = agent.pair_selection
  if kind == "info":
    return info_directed
  if kind == "random":
    return random_pair
  if kind == "dts":
    return lambda point, particles, rng: double_thompson(point, particles, rng, agent.dts_tries)
  if kind == "boltzmann":
    return lambda point, particles, rng: boltzmann(point, particles, rng,
                                                   agent.boltzmann_temperature)
  raise ValueError(f"unknown pair selection {kind!r}")
