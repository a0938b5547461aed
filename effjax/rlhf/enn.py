"""Epistemic neural network reward model: a transformer backbone + point head + Z particles.

The feature h is the backbone's final (normed) hidden state at the last response token: the one
position that has attended to the whole prompt and response. On it sit
  - a point head (MLP, trained with the backbone by the Bradley-Terry loss),
  - Z frozen random prior heads (randomized prior functions: never trained, a `Prior` variable that
    no optimizer sees, read through stop_gradient),
  - Z trainable differential heads, trained by the same loss with the backbone frozen for them,
    each pulled toward its own initial draw (below) and optionally fit to its own bootstrap of the
    labels.
Particle z's reward is r_z = prior_z(h) + diff_z(h) (+ point(h), detached, by default). The Z heads
are stacked weights [Z, out, in] evaluated with one einsum per layer.

Regularisation toward the initial weights: the particle loss is the MAP objective of a Gaussian
prior centred at each differential head's initial weights (anchored ensembles),
    mean BT loss + diff_reg / N * mean_z ||theta_z - theta_z(0)||^2,
N = labels seen so far: the pull fades as data accumulates, as a posterior's would, and keeps
particles apart where the labels say nothing. With enn.bootstrap each particle weighs each label by
its own fixed double-or-nothing draw (0 or 2), so particles also disagree about what the data say.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from effjax.models.config import ModelConfig
from effjax.models.sharding import shard_like
from effjax.models.transformer import Transformer
from effjax.rlhf import rollout
from effjax.rlhf.config import ENNConfig


class Frozen(nnx.Variable):
  """Never trained: not an nnx.Param, so no optimizer ever holds it."""


class Prior(Frozen):
  """Weights of the frozen random prior heads."""


class Initial(Frozen):
  """A copy of a trainable head's initial weights (what the regulariser pulls toward)."""


class StackedMLP(nnx.Module):
  """`num` MLPs of the same shape, d_in -> hidden... -> 1, as stacked [num, out, in] weights."""

  def __init__(self, num: int, d_in: int, hidden: tuple[int, ...], *, rngs: nnx.Rngs,
               variable: type[nnx.Variable] = nnx.Param, keep_initial: bool = False):
    dims = (d_in, *hidden, 1)
    ws, bs = [], []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
      in_axis = "embed" if i == 0 else "mlp"
      out_axis = "mlp" if i < len(dims) - 2 else None
      w = jax.random.normal(rngs.params(), (num, b, a), jnp.float32) / math.sqrt(a)
      ws.append(variable(w, axes=("particles", out_axis, in_axis)))
      bs.append(variable(jnp.zeros((num, b), jnp.float32), axes=("particles", out_axis)))
    self.weights = nnx.List(ws)
    self.biases = nnx.List(bs)
    if keep_initial:
      self.initial = nnx.List([Initial(jnp.copy(v[...]), **v.get_metadata()) for v in (*ws, *bs)])

  def sq_distance_from_initial(self) -> jax.Array:
    """||theta_z - theta_z(0)||^2 per stacked MLP: [num]."""
    now = (*self.weights, *self.biases)
    return sum(jnp.sum((v[...] - v0[...]).reshape(v0.shape[0], -1) ** 2, axis=-1)
               for v, v0 in zip(now, self.initial))

  def __call__(self, h: jax.Array) -> jax.Array:
    """h [N, D] -> [N, num]."""
    x = jnp.einsum("nd,zod->nzo", h, self.weights[0][...]) + self.biases[0][...]
    for w, b in zip(self.weights[1:], self.biases[1:]):
      x = jnp.einsum("nzi,zoi->nzo", jax.nn.relu(x), w[...]) + b[...]
    return x[..., 0]


class RewardModel(nnx.Module):
  def __init__(self, backbone: Transformer, enn: ENNConfig, *, rngs: nnx.Rngs):
    d = backbone.cfg.dim
    self.backbone = backbone
    self.enn = enn
    self.point = StackedMLP(1, d, enn.point_hidden, rngs=rngs)
    self.prior = StackedMLP(enn.num_particles, d, enn.prior_hidden, rngs=rngs, variable=Prior)
    self.diff = StackedMLP(enn.num_particles, d, enn.diff_hidden, rngs=rngs, keep_initial=True)

  def features(self, prompts, prompt_lens, responses, response_mask, *, mesh=None) -> jax.Array:
    h = rollout.last_hidden(self.backbone, prompts, prompt_lens, responses, response_mask,
                            mesh=mesh, remat=self.enn.remat).astype(jnp.float32)
    # A frozen backbone (heads on fixed features, as in the predecessor paper): no backward through it.
    return jax.lax.stop_gradient(h) if self.enn.backbone_lr_scale == 0 else h

  def heads(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """h [N, D] -> (point reward [N], particle rewards [N, Z])."""
    point = self.point(h)[:, 0]
    frozen = jax.lax.stop_gradient(h)
    prior = jax.lax.stop_gradient(self.prior(frozen)) * self.enn.prior_scale
    particles = prior + self.diff(frozen)
    if self.enn.particles_include_point:
      particles = particles + jax.lax.stop_gradient(point)[:, None]
    return point, particles

  def __call__(self, prompts, prompt_lens, responses, response_mask, *, mesh=None):
    return self.heads(self.features(prompts, prompt_lens, responses, response_mask, mesh=mesh))


def create_reward_model(backbone: Transformer, enn: ENNConfig, seed: int) -> RewardModel:
  """Heads drawn from `seed` on `backbone` (the SFT policy's weights: copied when the RM trains
  them, shared when it does not, enn.backbone_lr_scale = 0)."""
  graphdef, state = nnx.split(backbone)
  if enn.backbone_lr_scale != 0:
    state = jax.tree.map(jnp.array, state)
  return RewardModel(nnx.merge(graphdef, state), enn, rngs=nnx.Rngs(seed))


def split(rm: RewardModel):
  """(graphdef, trainable params, frozen variables: priors, initial weights and, when it does not
  learn (enn.backbone_lr_scale = 0), the backbone)."""
  frozen_backbone = rm.enn.backbone_lr_scale == 0
  learns = lambda path, x: isinstance(x, nnx.Param) and not (frozen_backbone and path[0] == "backbone")
  return nnx.split(rm, learns, ...)


def bt_nll(margin: jax.Array, choice: jax.Array) -> jax.Array:
  """Bradley-Terry negative log-likelihood of choice (1: first preferred, 0: second; soft allowed)."""
  return -(choice * jax.nn.log_sigmoid(margin) + (1.0 - choice) * jax.nn.log_sigmoid(-margin))


def pair_rewards(rm: RewardModel, batch: dict, mesh=None):
  """Rewards of both sides of a pair batch: (point [2, M], particles [2, M, Z])."""
  prompts = jnp.concatenate([batch["prompts"], batch["prompts"]])
  lens = jnp.concatenate([batch["prompt_lens"], batch["prompt_lens"]])
  resp = jnp.concatenate([batch["a"], batch["b"]])
  mask = jnp.concatenate([batch["a_mask"], batch["b_mask"]])
  point, particles = rm(prompts, lens, resp, mask, mesh=mesh)
  m = batch["prompts"].shape[0]
  return point.reshape(2, m), particles.reshape(2, m, -1)


def rm_loss(rm: RewardModel, batch: dict, mesh=None) -> tuple[jax.Array, dict]:
  """Point BT loss + particle BT loss (bootstrap-weighted when the batch carries particle_weights
  [M, Z]) + diff_reg / num_labels * mean squared distance of the particles from their initial weights."""
  point, particles = pair_rewards(rm, batch, mesh)
  c = batch["choice"].astype(jnp.float32)
  point_loss = bt_nll(point[0] - point[1], c).mean()
  particle_nll = bt_nll(particles[0] - particles[1], c[:, None])
  if "particle_weights" in batch:
    particle_nll = particle_nll * batch["particle_weights"]
  particle_loss = particle_nll.mean()
  reg = rm.diff.sq_distance_from_initial().mean()
  loss = point_loss + particle_loss + rm.enn.diff_reg * reg / batch["num_labels"]
  accuracy = jnp.mean((point[0] > point[1]) == (c > 0.5))
  return loss, dict(rm_loss=point_loss, rm_particle_loss=particle_loss, rm_accuracy=accuracy,
                    rm_diff_distance=reg)


def bootstrap_weights(key: jax.Array, label_index, num_particles: int) -> jax.Array:
  """Double-or-nothing bootstrap: weight 0 or 2 per (label, particle), fixed by the label's index in
  the run's label log, so every step that replays a label weighs it the same: [..., Z] float32."""
  idx = jnp.asarray(label_index)
  draw = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), 0.5, (num_particles,)))
  return 2.0 * draw(idx.reshape(-1)).reshape(*idx.shape, num_particles).astype(jnp.float32)


def _top_level_mask(name: str):
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: str(getattr(path[0], "key", "")) == name, params)


def rm_optimizer(enn: ENNConfig) -> optax.GradientTransformation:
  """Adam on heads; the backbone's updates scaled by backbone_lr_scale. Frozen variables are not
  params. With train_particles off the differential heads' gradients are zeroed before anything
  else sees them (the control agent: particle disagreement that labels never inform)."""
  return optax.chain(
      *([] if enn.train_particles else [optax.masked(optax.set_to_zero(), _top_level_mask("diff"))]),
      optax.clip_by_global_norm(enn.clip_norm),
      optax.adam(enn.lr),
      optax.masked(optax.scale(enn.backbone_lr_scale), _top_level_mask("backbone")),
  )


def init_optimizer(optimizer: optax.GradientTransformation, params):
  """optimizer.init with its state (Adam's moments) in float32 whatever the parameters' dtype:
  bfloat16 moments lose the small second moments. Updates are applied in the parameters' dtype."""
  return optimizer.init(jax.tree.map(lambda x: x.astype(jnp.float32), params))


def finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def keep_if(ok: jax.Array, new, old):
  """`new` where ok, else `old`, leaf by leaf (a non-finite update is skipped)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_rm_update(graphdef, optimizer: optax.GradientTransformation, mesh=None) -> Callable:
  """(params, frozen, opt_state, batches) -> (params, opt_state, metrics).

  batches: a pair batch (pair_rewards' fields, choice, num_labels, optionally particle_weights) with a
  leading [S] axis; S gradient steps, one after another. A step whose
  loss or gradient is not finite is skipped (state kept) and counted in metrics["rm_skipped"].
  """

  @jax.jit
  def gradients(params, frozen, batch):
    def loss_fn(p):
      return rm_loss(nnx.merge(graphdef, p, frozen), batch, mesh)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, shard_like(grads, params, mesh)

  apply = jax.jit(functools.partial(apply_if_finite, optimizer))

  def update(params, frozen, opt_state, batches):
    skipped = 0
    for s in range(jax.tree.leaves(batches)[0].shape[0]):
      loss, metrics, grads = gradients(params, frozen, jax.tree.map(lambda x: x[s], batches))
      params, opt_state, ok = apply(params, opt_state, grads, loss)
      skipped += 1 - ok.astype(jnp.int32)
    return params, opt_state, dict(metrics, rm_total_loss=loss, rm_skipped=skipped)

  update.gradients, update.apply = gradients, apply  # the jitted parts, for `effjax plan`
  return update


def apply_if_finite(optimizer: optax.GradientTransformation, params, opt_state, grads, loss):
  """One optimizer step, or none when the loss or a gradient is not finite: (params, opt_state, ok).

  Kept out of the jitted gradient on purpose: compiled together with it, XLA:CPU keeps every layer's
  activations alive despite remat (6 SmolLM2 layers x 32 sequences: 2.4 GB of temporaries vs 0.6).
  """
  updates, new_opt = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  ok = jnp.isfinite(loss) & finite(grads)
  return keep_if(ok, new_params, params), keep_if(ok, new_opt, opt_state), ok


def score(rm: RewardModel, prompts, prompt_lens, responses, response_mask, mesh=None):
  """Rewards of n responses per prompt: responses [B, n, L] -> (point [B, n], particles [B, n, Z])."""
  b, n, length = responses.shape
  point, particles = rm(jnp.repeat(prompts, n, axis=0), jnp.repeat(prompt_lens, n, axis=0),
                        responses.reshape(b * n, length), response_mask.reshape(b * n, length),
                        mesh=mesh)
  return point.reshape(b, n), particles.reshape(b, n, -1)


def make_scorer(graphdef, mesh=None) -> Callable:
  @jax.jit
  def run(params, frozen, prompts, prompt_lens, responses, response_mask):
    return score(nnx.merge(graphdef, params, frozen), prompts, prompt_lens, responses, response_mask,
                 mesh)

  return run


def save_reward_model(path: str | pathlib.Path, rm: RewardModel, model_cfg: ModelConfig) -> None:
  """An Orbax checkpoint of the whole RM plus its configs (what the checkpoint rater loads)."""
  import dataclasses

  import orbax.checkpoint as ocp
  path = pathlib.Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  meta = dict(model=dataclasses.asdict(model_cfg), enn=dataclasses.asdict(rm.enn))
  (path / "reward_model.json").write_text(json.dumps(meta, indent=1))
  _, state = nnx.split(rm)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path / "state", nnx.to_pure_dict(state), force=True)


def load_reward_model(path: str | pathlib.Path) -> RewardModel:
  import orbax.checkpoint as ocp

  from effjax.models.config import ModelConfig, RopeScaling
  from effjax.rlhf.config import _build
  path = pathlib.Path(path).absolute()
  meta_file = path / "reward_model.json"
  if not meta_file.exists():
    raise FileNotFoundError(f"{meta_file}: not a reward model checkpoint")
  meta = json.loads(meta_file.read_text())
  mc = dict(meta["model"])
  mc["rope_scaling"] = RopeScaling(**mc["rope_scaling"]) if mc.get("rope_scaling") else None
  for k in ("layer_kinds", "eos_ids"):
    mc[k] = tuple(mc[k])
  model_cfg = ModelConfig(**mc)
  enn = _build(ENNConfig, meta["enn"], "enn")
  abstract = nnx.eval_shape(lambda: RewardModel(Transformer(model_cfg, rngs=nnx.Rngs(0)), enn,
                                                rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  with ocp.StandardCheckpointer() as ckpt:
    pure = ckpt.restore(path / "state", nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)
