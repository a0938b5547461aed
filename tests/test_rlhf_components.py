"""ENN reward model, pair selection, policy objective, sampler and config of effjax.rlhf."""

import dataclasses
import functools
import itertools

import chex
import optax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.data.samples import resolve
from effjax.decoding.engine import Engine
from effjax.models import make_config, create_model
from effjax.models.sharding import make_mesh
from effjax.rlhf import enn, pairs, policy, rollout
from effjax.rlhf.config import (ENNConfig, GSM8KConfig, PolicyConfig, RunConfig, apply_override,
                                config_from_dict, load_config)

CFG = make_config("llama", vocab_size=16, dim=32, mlp_dim=64, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position=64, pad_id=0)
ENN = ENNConfig(num_particles=8, point_hidden=(16, 16), prior_hidden=(8, 8), diff_hidden=(16, 16),
                lr=1e-2)


def tiny_policy(seed=0):
  return create_model(CFG, seed)


def soft_policy(seed, cfg=CFG):
  """A random policy with a soft head (a random one is near one-hot): varied tokens and draws."""
  model = create_model(cfg, seed)
  model.embed.set_value(model.embed.get_value() * 0.1)
  return model


@functools.cache
def rm_setup():
  """One reward model and one compiled 5-step update shared by the ENN tests (compiles are slow)."""
  graphdef, params, priors = enn.split(enn.create_reward_model(tiny_policy(), ENN, seed=1))
  opt = enn.rm_optimizer(ENN)
  return graphdef, params, priors, opt, enn.make_rm_update(graphdef, opt)


def five(batch):
  return jax.tree.map(lambda x: jnp.stack([x] * 5), batch)


def pair_batch(key, m=8, p=5, length=4):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return dict(prompts=jax.random.randint(k1, (m, p), 1, 16), prompt_lens=jnp.full((m,), p, jnp.int32),
              a=jax.random.randint(k2, (m, length), 1, 16), a_mask=jnp.ones((m, length), bool),
              b=jax.random.randint(k3, (m, length), 1, 16), b_mask=jnp.ones((m, length), bool),
              choice=jax.random.bernoulli(k4, 0.7, (m,)).astype(jnp.int32),
              num_labels=jnp.float32(4 * m))


# ---- ENN ------------------------------------------------------------------------------------------

def test_priors_never_change():
  graphdef, params, priors, opt, update = rm_setup()
  assert not any(isinstance(v, enn.Prior) for v in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  batch = pair_batch(jax.random.key(0))
  # No gradient reaches the priors, even if someone asked for one.
  g = jax.jit(jax.grad(lambda pr: enn.rm_loss(nnx.merge(graphdef, params, pr), batch)[0]))(priors)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))
  new_params, _, _ = update(params, priors, opt.init(params), five(batch))
  h = jax.random.normal(jax.random.key(1), (4, CFG.dim))
  before = nnx.merge(graphdef, params, priors).prior(h)
  after = nnx.merge(graphdef, new_params, priors).prior(h)
  np.testing.assert_array_equal(before, after)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params, new_params)
  assert max(jax.tree.leaves(moved["diff"])) > 0 and max(jax.tree.leaves(moved["point"])) > 0


def test_frozen_backbone_trains_only_the_heads():
  """enn.backbone_lr_scale = 0: heads on fixed features; the backbone is not a learning parameter
  (no optimizer state) and is the policy's own arrays, not a copy."""
  cfg = dataclasses.replace(ENN, backbone_lr_scale=0.0)
  sft = tiny_policy()
  graphdef, params, frozen = enn.split(enn.create_reward_model(sft, cfg, seed=1))
  assert "backbone" not in params and "backbone" in frozen
  sft_leaves = jax.tree.leaves(nnx.split(sft)[1])
  assert all(a is b for a, b in zip(jax.tree.leaves(frozen["backbone"]), sft_leaves))
  opt = enn.rm_optimizer(cfg)
  new, _, _ = enn.make_rm_update(graphdef, opt)(params, frozen, opt.init(params),
                                                five(pair_batch(jax.random.key(3))))
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new["point"]),
                                                      jax.tree.leaves(params["point"]))]
  assert max(moved) > 1e-3


def test_particle_spread_shrinks_on_repeated_data():
  graphdef, params, priors, opt, update = rm_setup()
  batch = pair_batch(jax.random.key(3))

  @jax.jit
  def spread(p):
    _, particles = enn.pair_rewards(nnx.merge(graphdef, p, priors), batch)
    return jnp.var(jax.nn.sigmoid(particles[0] - particles[1]), axis=-1).mean()

  state = opt.init(params)
  before = float(spread(params))
  new = params
  for _ in range(10):
    new, state, _ = update(new, priors, state, five(batch))
  assert float(spread(new)) < 0.3 * before, (before, float(spread(new)))


def test_bt_gradient_matches_finite_differences():
  graphdef, params, priors, _, _ = rm_setup()
  batch = pair_batch(jax.random.key(4))
  losses = jax.jit(lambda p: enn.rm_loss(nnx.merge(graphdef, p, priors), batch))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  direction = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  keep_diff = lambda t: jax.tree_util.tree_map_with_path(
      lambda path, d: d if "diff" in jax.tree_util.keystr(path) else jnp.zeros_like(d), t)
  unit = lambda t: jax.tree.map(lambda x: x / optax.tree.norm(t), t)
  h = 1e-3
  # The point loss trains backbone + point head; the particle loss reaches only the diff heads
  # (the backbone and point are detached for it), so check each along the directions it sees.
  # Each direction is half the unit gradient, half random: along a random direction alone the slope
  # can be too small for a float32 finite difference to resolve.
  cases = ((lambda p: losses(p)[1]["rm_loss"], lambda t: t), (lambda p: losses(p)[0], keep_diff))
  for loss, sees in cases:
    grads = jax.jit(jax.grad(loss))(params)
    d = unit(jax.tree.map(jnp.add, unit(sees(grads)), unit(sees(direction))))
    shift = lambda s: jax.tree.map(lambda x, v: x + s * h * v, params, d)
    numeric = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * h)
    analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2)
  # And the BT loss's own derivative: d/dm -log sigmoid(m) (choice 1) = sigmoid(m) - 1.
  m = jnp.linspace(-3, 3, 7)
  np.testing.assert_allclose(jax.vmap(jax.grad(lambda x: enn.bt_nll(x, 1.0)))(m),
                             jax.nn.sigmoid(m) - 1, rtol=1e-5)


def test_non_finite_rm_loss_skips_the_update():
  graphdef, params, priors, opt, update = rm_setup()
  batch = dict(pair_batch(jax.random.key(6)), choice=jnp.full((8,), jnp.nan))
  new, _, metrics = update(params, priors, opt.init(params), five(batch))
  assert int(metrics["rm_skipped"]) == 5
  chex.assert_trees_all_equal(new, params)


def _shift_diff(params, delta):
  """params with every differential-head weight and bias moved by delta (a constant)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x + delta if "diff" in jax.tree_util.keystr(path) else x, params)


def test_regulariser_pulls_toward_the_initial_weights_and_fades_with_labels():
  """loss = BT + diff_reg / N * mean_z ||theta_z - theta_z(0)||^2: zero at init, the exact value
  and gradient 2 diff_reg / (N Z) (theta - theta(0)) once moved, and a pull back to the initial
  weights (not to zero)."""
  graphdef, params, frozen, _, _ = rm_setup()
  batch = pair_batch(jax.random.key(8))
  loss = jax.jit(lambda p, b: enn.rm_loss(nnx.merge(graphdef, p, frozen), b))
  base, metrics = loss(params, batch)
  assert float(metrics["rm_diff_distance"]) == 0.0
  n_diff = sum(x.size for x in jax.tree.leaves(params["diff"])) // ENN.num_particles
  delta = 0.01
  moved = _shift_diff(params, delta)
  no_reg = dataclasses.replace(ENN, diff_reg=0.0)
  total = lambda cfg, p, b: enn.rm_loss(_with_enn(graphdef, p, frozen, cfg), b)[0]
  with_reg, m2 = loss(moved, batch)
  want = ENN.diff_reg / float(batch["num_labels"]) * n_diff * delta ** 2
  np.testing.assert_allclose(float(m2["rm_diff_distance"]), n_diff * delta ** 2, rtol=1e-3)
  np.testing.assert_allclose(float(with_reg - total(no_reg, moved, batch)), want, rtol=2e-2)
  # Twice the labels, half the pull.
  twice = dict(batch, num_labels=2 * batch["num_labels"])
  np.testing.assert_allclose(float(with_reg - loss(moved, twice)[0]), want / 2, rtol=2e-2)
  # The regulariser's gradient on the diff heads: 2 diff_reg / (N Z) (theta - theta(0)).
  g_reg = jax.grad(lambda p: total(ENN, p, batch))(moved)["diff"]
  g_plain = jax.grad(lambda p: total(no_reg, p, batch))(moved)["diff"]
  expected = 2 * ENN.diff_reg / (float(batch["num_labels"]) * ENN.num_particles) * delta
  for g, g0 in zip(jax.tree.leaves(g_reg), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(np.asarray(g - g0), expected, rtol=1e-3, atol=1e-9)
  # Where the labels weigh nothing (bootstrap weight 0 for every particle) only the pull acts: plain
  # SGD brings moved heads back to their own initial draw (not to zero), by a factor
  # (1 - 2 * 50 / (32 * 8)) per step, 10 steps.
  strong = dataclasses.replace(ENN, diff_reg=50.0)
  opt = optax.sgd(1.0)
  update = enn.make_rm_update(enn.split(_with_enn(graphdef, moved, frozen, strong))[0], opt)
  ties = dict(batch, particle_weights=jnp.zeros((8, ENN.num_particles)))
  state, p = opt.init(moved), moved
  for _ in range(2):
    p, state, _ = update(p, frozen, state, five(ties))
  dist = lambda q: float(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(q["diff"]),
                                                                   jax.tree.leaves(params["diff"]))))
  np.testing.assert_allclose(dist(p), dist(moved) * (1 - 100 / 256) ** 20, rtol=2e-2)
  init_norm = float(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(params["diff"])))
  assert dist(p) < 1e-3 * init_norm


def _with_enn(graphdef, params, frozen, cfg):
  rm = nnx.merge(graphdef, params, frozen)
  rm.enn = cfg
  return rm


def test_bootstrap_weights_are_fixed_per_label_and_weigh_the_particle_loss():
  key = jax.random.key(3)
  idx = jnp.arange(400).reshape(4, 100)
  w = enn.bootstrap_weights(key, idx, 16)
  chex.assert_shape(w, (4, 100, 16))
  assert set(np.unique(np.asarray(w)).tolist()) == {0.0, 2.0}
  np.testing.assert_allclose(float(w.mean()), 1.0, atol=0.05)
  # The same label (by its log index) gets the same weights in any batch; particles differ.
  again = enn.bootstrap_weights(key, jnp.array([[205, 3]]), 16)
  np.testing.assert_array_equal(again[0, 0], w[2, 5])
  np.testing.assert_array_equal(again[0, 1], w[0, 3])
  assert not bool((w[..., 0] == w[..., 1]).all())
  # A particle that weighs every label 0 gets no gradient from the labels (at its initial weights
  # the regulariser's gradient is zero too); the others do.
  graphdef, params, frozen, _, _ = rm_setup()
  weights = jnp.ones((8, ENN.num_particles)).at[:, 0].set(0.0)
  batch = dict(pair_batch(jax.random.key(9)), particle_weights=weights)
  grads = jax.grad(lambda p: enn.rm_loss(nnx.merge(graphdef, p, frozen), batch)[0])(params)["diff"]
  for g in jax.tree.leaves(grads):
    assert float(jnp.abs(g[0]).max()) == 0.0 and float(jnp.abs(g[1:]).max()) > 0.0


def test_untrained_particles_never_move_but_the_point_head_learns():
  """enn.train_particles = False (the control agent): the differential heads keep their initial
  weights exactly; the point head and backbone still learn from the labels."""
  cfg = dataclasses.replace(ENN, train_particles=False)
  graphdef, params, frozen = enn.split(enn.create_reward_model(tiny_policy(), cfg, seed=1))
  opt = enn.rm_optimizer(cfg)
  new, _, _ = enn.make_rm_update(graphdef, opt)(params, frozen, opt.init(params),
                                                five(pair_batch(jax.random.key(3))))
  chex.assert_trees_all_equal(new["diff"], params["diff"])
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new["point"]),
                                                         jax.tree.leaves(params["point"])))
  assert moved > 1e-3


# ---- pair selection -----------------------------------------------------------------------------

def test_info_directed_picks_the_max_variance_pair():
  z = 50
  noise = jax.random.normal(jax.random.key(0), (z,))
  # Responses 0..3 agree across particles; 4 is uncertain around 1.0 and 5 uncertain around 3.0.
  base = jnp.array([-4.0, 0.0, 1.0, 5.0, 1.0, 3.0])
  spread = jnp.array([0, 0, 0, 0, 1.5, 0.2])
  particles = (base[:, None] + spread[:, None] * noise[None, :])[None]
  pair = pairs.info_directed(None, particles, None)
  var = np.var(1 / (1 + np.exp(-(np.asarray(particles[0])[:, None] - np.asarray(particles[0])[None]))),
               axis=-1)
  brute = max(itertools.combinations(range(6), 2), key=lambda ij: var[ij])
  assert tuple(np.asarray(pair[0])) == brute
  assert 4 in brute  # the uncertain response against a close, certain one
  # Batched: the same selection per prompt.
  batch = jnp.concatenate([particles, particles[:, ::-1]])
  got = np.asarray(pairs.info_directed(None, batch, None))
  assert tuple(got[0]) == brute and set(got[1]) == {5 - brute[0], 5 - brute[1]}


@pytest.mark.parametrize("kind", ["random", "dts", "boltzmann", "info"])
def test_selectors_return_distinct_pairs(kind):
  from effjax.rlhf.config import AgentConfig
  sel = jax.jit(pairs.selector(AgentConfig(selection=kind, dts_tries=3)))
  point = jax.random.normal(jax.random.key(1), (32, 6))
  particles = point[..., None] + 0.1 * jax.random.normal(jax.random.key(2), (32, 6, 10))
  got = np.asarray(sel(point, particles, jax.random.key(3)))
  chex.assert_shape(got, (32, 2))
  assert (got[:, 0] != got[:, 1]).all() and got.min() >= 0 and got.max() < 6


def test_double_thompson_first_pick_is_a_particle_argmax():
  particles = jnp.stack([jnp.eye(4)[i % 4] for i in range(8)], axis=-1)[None]  # particle z likes z % 4
  got = np.asarray(pairs.double_thompson(None, particles, jax.random.key(0), tries=16))
  assert got[0, 0] != got[0, 1]


# ---- policy objective ---------------------------------------------------------------------------

def policy_batch(key, n=6, p=5, length=4):
  k1, k2, k3 = jax.random.split(key, 3)
  return dict(prompts=jax.random.randint(k1, (n, p), 1, 16), prompt_lens=jnp.full((n,), p, jnp.int32),
              y=jax.random.randint(k2, (n, length), 1, 16), y_mask=jnp.ones((n, length), bool),
              p=jax.random.uniform(k3, (n,)))


def test_nudge_adds_eps_grad_log_pi_on_symmetric_pairs():
  model = tiny_policy(1)
  anchor = tiny_policy(2)
  graphdef, params = nnx.split(model)
  b = policy_batch(jax.random.key(0))
  # Symmetric pairs: (Y, Y') and (Y', Y), so p's are q and 1 - q.
  sym = jax.tree.map(lambda x: jnp.concatenate([x, x]), b)
  sym["p"] = jnp.concatenate([b["p"], 1.0 - b["p"]])
  eps, beta = 0.1, 0.3
  grad = jax.jit(lambda e: jax.grad(
      lambda q: policy.pair_loss(nnx.merge(graphdef, q), anchor, sym, e, beta)[0])(params))
  diff = jax.tree.map(lambda a, c: a - c, grad(eps), grad(0.0))

  def mean_logp(q):
    logp, _ = rollout.token_logprobs(nnx.merge(graphdef, q), sym["prompts"], sym["prompt_lens"],
                                     sym["y"], sym["y_mask"])
    return logp.sum(-1).mean()

  expected = jax.tree.map(lambda g: -eps * g, jax.jit(jax.grad(mean_logp))(params))
  chex.assert_trees_all_close(diff, expected, atol=1e-6, rtol=1e-4)


def test_kl_term_is_zero_when_policy_equals_anchor():
  model = tiny_policy(3)
  graphdef, params = nnx.split(model)
  b = dict(policy_batch(jax.random.key(1)), p=jnp.full((6,), 0.5))
  loss_fn = lambda q: policy.pair_loss(nnx.merge(graphdef, q), model, b, 0.0, 1.0)
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, metrics), grads = value_and_grad(params)
  assert abs(float(metrics["kl"])) < 1e-6 and abs(float(loss)) < 1e-6
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-6
  # And positive once they differ.
  (_, m2), _ = value_and_grad(nnx.split(tiny_policy(4))[1])
  assert float(m2["kl"]) > 1e-3


def test_ordered_pairs():
  point = jnp.array([[0.5, 3.0, -1.0, 2.0, 0.0]])
  pa = np.asarray(policy.ordered_pairs_a(jnp.array([[4, 0]]), point))[0]
  assert pa.tolist() == [[4, 0], [0, 4], [1, 2], [2, 1]]
  pb = np.asarray(policy.ordered_pairs_b(point))[0]
  assert pb.tolist() == [[1, 2], [2, 1], [3, 4], [4, 3]]


def _update_inputs(b=8, n=4, p=5, length=4, policy_model=None, pcfg=PolicyConfig()):
  policy_model = policy_model or tiny_policy(5)
  pg, theta, frozen = policy.split_policy(policy_model, pcfg)
  rm = enn.create_reward_model(policy_model, ENN, seed=6)
  rg, phi, priors = enn.split(rm)
  ks = jax.random.split(jax.random.key(7), 4)
  group = lambda k: dict(prompts=jax.random.randint(k, (b, p), 1, 16),
                         prompt_lens=jnp.full((b,), p, jnp.int32),
                         responses=jax.random.randint(jax.random.fold_in(k, 1), (b, n, length), 1, 16),
                         mask=jnp.ones((b, n, length), bool))
  a = dict(group(ks[0]), pair=jnp.tile(jnp.array([[0, 2]]), (b, 1)))
  return pg, theta, rg, phi, priors, a, group(ks[1]), pair_batch(ks[2], m=b), frozen


def assert_sharded_like(grads, params, mesh):
  from effjax.models.sharding import state_shardings
  for g, want in zip(jax.tree.leaves(grads), jax.tree.leaves(state_shardings(params, mesh)), strict=True):
    assert g.sharding.is_equivalent_to(want, g.ndim), (g.shape, g.sharding.spec, want.spec)


def test_sharded_steps_equal_unsharded():
  pg, theta, rg, phi, priors, a, b, rm_batch, frozen = _update_inputs()
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  from effjax.models.sharding import state_shardings
  pcfg = PolicyConfig(lr=1e-2, eps=0.05, beta=0.1, eta=0.9, micro_batch=8)
  # Plain SGD: Adam would turn float-rounding-sized gradients into lr-sized steps of either sign.
  popt = optax.sgd(1.0)
  ropt = optax.sgd(1.0)
  outs = []
  for m in (None, mesh):
    place = (lambda t: t) if m is None else (lambda t: jax.device_put(t, state_shardings(t, m)))
    upd = policy.make_policy_update(pg, rg, pcfg, popt, use_a=True, mesh=m)
    if m is not None:  # micro-batched gradients come back sharded like the parameters, not whole
      assert_sharded_like(
          upd.gradients(place(theta), place(theta), place(phi), place(priors), a, b, frozen)[2],
          theta, m)
    pol, anc, _, met = upd(place(theta), place(theta), place(popt.init(theta)), place(phi),
                           place(priors), a, b, frozen)
    rm_upd = enn.make_rm_update(rg, ropt, mesh=m)
    if m is not None:  # so do the reward model's
      assert_sharded_like(rm_upd.gradients(place(phi), place(priors), rm_batch)[2], phi, m)
    new_phi, _, rm_met = rm_upd(place(phi), place(priors), place(ropt.init(phi)),
                                jax.tree.map(lambda x: jnp.stack([x, x]), rm_batch))
    if m is not None:
      embed = jax.tree.leaves(pol)[0]
      assert len(embed.sharding.device_set) == 8
    outs.append((pol, anc, new_phi, met["policy_loss"], rm_met["rm_loss"]))
  chex.assert_trees_all_close(jax.device_get(outs[0]), jax.device_get(outs[1]), atol=2e-5, rtol=2e-4)
  pol, anc = outs[0][:2]
  moved = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(pol), jax.tree.leaves(theta)))
  assert moved > 1e-4
  # The anchor moved by the EMA: eta * theta + (1 - eta) * new policy.
  chex.assert_trees_all_close(anc, jax.tree.map(lambda t, n: 0.9 * t + 0.1 * n, theta, pol), atol=1e-6)


def test_micro_batched_policy_step_equals_whole_batch():
  """policy.micro_batch accumulates gradients over chunks: the same step, less memory."""
  pg, theta, rg, phi, priors, a, b, _, frozen = _update_inputs()
  popt = optax.sgd(1.0)
  outs = []
  for micro in (0, 8):  # 32 ordered pairs per group -> 4 chunks of 8
    pcfg = PolicyConfig(lr=1e-2, eps=0.05, beta=0.1, eta=0.9, micro_batch=micro)
    upd = policy.make_policy_update(pg, rg, pcfg, popt, use_a=True)
    pol, _, _, met = upd(theta, theta, popt.init(theta), phi, priors, a, b, frozen)
    outs.append((pol, met["policy_loss"], met["kl"], met["grad_norm"], met["rm_margin"]))
  chex.assert_trees_all_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
  assert float(outs[0][3]) > 1e-3  # a real step, not a vacuous equality
  bad = policy.make_policy_update(pg, rg, PolicyConfig(micro_batch=5), popt, use_a=True)
  with pytest.raises(ValueError, match="micro_batch=5 must divide"):
    bad(theta, theta, popt.init(theta), phi, priors, a, b, frozen)


def test_chunked_rewards_equal_one_pass():
  """The policy step scores its groups micro_batch / 4 prompts at a time: the same rewards as one
  pass, also when the chunk does not divide the prompts (micro_batch 12 -> 3 -> 2 prompts)."""
  rm = enn.create_reward_model(tiny_policy(5), ENN, seed=6)
  _, _, _, _, _, _, group, _, _ = _update_inputs()  # 8 prompts x 4 responses
  whole, _ = enn.score(rm, group["prompts"], group["prompt_lens"], group["responses"], group["mask"])
  for micro in (0, 4, 8, 12, 64):
    chex.assert_trees_all_close(policy.chunked_rewards(rm, group, micro), whole, atol=1e-6)
  assert float(jnp.std(whole)) > 1e-3  # distinct rewards: a vacuous equality would not pass


def test_trainable_layers_update_only_the_top_blocks_with_the_full_gradient():
  """policy.trainable_layers = 1 on a 2-block policy: the last block and the final norm learn, by
  exactly the step the whole-model update gives them; the frozen rest is the SFT model's own arrays."""
  model = create_model(CFG.replace(num_layers=2), 5)
  pcfg = PolicyConfig(lr=1e-2, eps=0.05, beta=0.1, eta=0.9)
  top = dataclasses.replace(pcfg, trainable_layers=1)
  popt = optax.sgd(1.0)
  steps = {}
  for cfg in (pcfg, top):
    pg, theta, rg, phi, priors, a, b, _, frozen = _update_inputs(policy_model=model, pcfg=cfg)
    upd = policy.make_policy_update(pg, rg, cfg, popt, use_a=True)
    new, _, _, _ = upd(theta, theta, popt.init(theta), phi, priors, a, b, frozen)
    steps[cfg.trainable_layers] = (theta, frozen, new)
  paths = lambda t: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  theta, frozen, new = steps[1]
  learned = paths(new)
  assert learned and all(k.startswith("['final_norm']") or k.startswith("['layers'][1]") for k in learned)
  assert any(k.startswith("['layers'][0]") for k in paths(frozen)) and "['embed']" in "".join(paths(frozen))
  whole = paths(steps[0][2])
  for k, v in learned.items():
    np.testing.assert_allclose(np.asarray(v), np.asarray(whole[k]), rtol=1e-5, atol=1e-6)
  assert max(float(jnp.abs(v - paths(theta)[k]).max()) for k, v in learned.items()) > 1e-4
  # Not copied: the frozen part holds the model's own arrays.
  own = paths(nnx.split(model)[1])
  assert all(v is own[k] for k, v in paths(frozen).items())
  with pytest.raises(ValueError, match="trainable_layers=3 must be in"):
    policy.split_policy(model, dataclasses.replace(pcfg, trainable_layers=3))


# ---- sampler --------------------------------------------------------------------------------------

def test_sampler_matches_uncached_forward_with_ragged_prompts():
  model = tiny_policy(8)
  prompts = jnp.array([[3, 4, 5, 6, 7], [9, 2, 0, 0, 0], [5, 5, 1, 0, 0]])
  lens = jnp.array([5, 2, 3])
  greedy, mask = rollout.sample(model, prompts, lens, jax.random.key(0), num_samples=2, length=6,
                                top_k=1, temperature=0.0)
  chex.assert_shape(greedy, (3, 2, 6))
  assert bool(mask.all()) and bool((greedy[:, 0] == greedy[:, 1]).all())
  graphdef, params = nnx.split(model)
  _, logp_all = jax.jit(lambda q: rollout.token_logprobs(nnx.merge(graphdef, q), prompts, lens,
                                                         greedy[:, 0], mask[:, 0]))(params)
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logp_all, -1)), np.asarray(greedy[:, 0]))
  # Padding does not change a row: the 2-token prompt alone gives the same continuation.
  alone, _ = rollout.sample(model, prompts[1:2, :2], lens[1:2], jax.random.key(0), num_samples=1,
                            length=6, top_k=1, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(alone[0, 0]), np.asarray(greedy[1, 0]))


RAGGED = jnp.array([[3, 4, 5], [9, 2, 0]]), jnp.array([3, 2])  # right-padded prompts, lengths


def test_greedy_rollout_equals_engine_generate():
  """The rollout is the engine's loop: Engine.generate's tokens, then pad_id with the mask False."""
  rows = [[3, 4, 5, 6, 7], [9, 2], [5, 5, 1], [11]]
  free = Engine(soft_policy(9), cache_len=32).generate(rows, max_new_tokens=8).tokens
  model = soft_policy(9, CFG.replace(eos_ids=(free[0][2],)))  # row 0 ends by its third token
  prompts = jnp.array([r + [0] * (5 - len(r)) for r in rows])
  resp, mask = rollout.sample(model, prompts, jnp.array([len(r) for r in rows]), jax.random.key(1),
                              num_samples=2, length=8, top_k=5, temperature=0.0)
  chex.assert_shape([resp, mask], (4, 2, 8))
  chex.assert_type([resp, mask], [jnp.int32, bool])
  want = Engine(model, cache_len=32).generate(rows, max_new_tokens=8).tokens
  assert len(want[0]) <= 3 and any(len(w) > 1 for w in want)
  for w, r, m in zip(want, np.asarray(resp), np.asarray(mask)):
    for row, mrow in zip(r, m):
      assert row[:len(w)].tolist() == w and mrow[:len(w)].all()
      assert not mrow[len(w):].any() and (row[len(w):] == CFG.pad_id).all()


def test_sampled_rollouts_are_top_k_and_keyed():
  model = soft_policy(8)
  prompts, lens = RAGGED
  run = lambda key: rollout.sample(model, prompts, lens, key, num_samples=16, length=6, top_k=3,
                                   temperature=2.0)
  resp, mask = run(jax.random.key(0))
  chex.assert_trees_all_equal((resp, mask), run(jax.random.key(0)))
  assert not bool((resp == run(jax.random.key(1))[0]).all())
  flat = lambda x: x.reshape(-1, 6)
  _, logp_all = rollout.token_logprobs(model, jnp.repeat(prompts, 16, axis=0), jnp.repeat(lens, 16),
                                       flat(resp), flat(mask))
  top3 = np.asarray(jax.lax.top_k(logp_all, 3)[1])
  assert (top3 == np.asarray(flat(resp))[..., None]).any(-1).all()
  assert len(np.unique(np.asarray(resp[:, :, 0]))) > 2  # not greedy in disguise


def test_jitted_sampler_takes_changing_params():
  """make_sampler's jit takes the policy's params as an argument: a new policy, no recompile."""
  graphdef, p0 = nnx.split(soft_policy(8))
  p1 = nnx.split(soft_policy(9))[1]
  prompts, lens = RAGGED
  run = rollout.make_sampler(graphdef, num_samples=2, length=6, top_k=3, temperature=1.0)
  a, b = run(p0, prompts, lens, jax.random.key(0)), run(p1, prompts, lens, jax.random.key(0))
  assert run._cache_size() == 1
  assert not bool((a[0] == b[0]).all())
  chex.assert_trees_all_equal(a, rollout.sample(nnx.merge(graphdef, p0), prompts, lens,
                                                jax.random.key(0), num_samples=2, length=6,
                                                top_k=3, temperature=1.0))


def test_sharded_rollout_equals_unsharded():
  from effjax.models.sharding import state_shardings
  graphdef, params = nnx.split(soft_policy(8))
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  prompts, lens = RAGGED
  kw = dict(num_samples=4, length=6, top_k=3, temperature=1.0)
  want = rollout.make_sampler(graphdef, **kw)(params, prompts, lens, jax.random.key(0))
  sharded = jax.device_put(params, state_shardings(params, mesh))
  got = rollout.make_sampler(graphdef, mesh=mesh, **kw)(sharded, prompts, lens, jax.random.key(0))
  chex.assert_trees_all_equal(jax.device_get(got), jax.device_get(want))


def test_eos_masks_the_rest():
  """A row draws the same tokens with or without an EOS id until its first EOS (kept, mask True);
  after it come pad_id and mask False."""
  prompts, lens = jnp.array([[1, 2, 3]]), jnp.array([3])
  # A hot draw over all tokens: rows hit EOS at various steps.
  draw = lambda cfg: rollout.sample(soft_policy(9, cfg), prompts, lens, jax.random.key(0),
                                    num_samples=8, length=8, top_k=0, temperature=5.0)
  free, free_mask = draw(CFG)
  assert bool(free_mask.all())
  eos = int(free[0, 0, 2])  # row 0 ends by its third token
  resp, mask = draw(CFG.replace(eos_ids=(eos,)))
  ends = []
  for f, row, mrow in zip(np.asarray(free[0]), np.asarray(resp[0]), np.asarray(mask[0])):
    n = (np.nonzero(f == eos)[0].tolist() + [7])[0] + 1
    ends.append(n)
    assert row[:n].tolist() == f[:n].tolist() and mrow[:n].all()
    assert not mrow[n:].any() and (row[n:] == CFG.pad_id).all()
  assert ends[0] <= 3 and len(set(ends)) > 1


# ---- config ---------------------------------------------------------------------------------------

def test_config_rejects_unknown_keys_and_bad_values():
  with pytest.raises(ValueError, match="unknown key"):
    config_from_dict({"agent": {"kindd": "online"}})
  with pytest.raises(ValueError, match="not one of"):
    config_from_dict({"agent": {"kind": "onlin"}})
  with pytest.raises(ValueError, match="expected int"):
    config_from_dict({"seed": "3"})
  cfg = config_from_dict({"enn": {"point_hidden": [8, 8], "lr": 1}})
  assert cfg.enn.point_hidden == (8, 8) and cfg.enn.lr == 1.0
  d = {}
  apply_override(d, "agent.kind=online")
  apply_override(d, "policy.eps=0")
  assert config_from_dict(d).agent.kind == "online" and config_from_dict(d).policy.eps == 0.0
  assert RunConfig().agent.pair_selection == "info"


def test_shipped_configs_load():
  import pathlib
  files = sorted(pathlib.Path(__file__).parents[1].glob("configs/rlhf_*.toml"))
  assert files
  for f in files:
    cfg = load_config(f)
    if cfg.env.kind == "gsm8k":  # its data ships with effjax (no path outside the package)
      assert pathlib.Path(resolve(cfg.env.gsm8k.data)).is_file(), cfg.env.gsm8k.data
  assert pathlib.Path(resolve(GSM8KConfig().data)).is_file()
