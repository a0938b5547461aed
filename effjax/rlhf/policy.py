"""The policy objective: REINFORCE with the 1/2 baseline, affirmative nudge, KL to an EMA anchor.

Per ordered pair (Y, Y') the ascent direction is
    (p(Y > Y') - 1/2 + eps) * grad log pi(Y | X)  -  beta * grad sum_l KL(pi(.|X, Y_<l) || pi_bar(.|X, Y_<l))
where p is the reward model's (point head) preference probability and pi_bar the anchor. The KL is
the exact one over the vocabulary at every response token of Y. One update sums the gradients of
  (a) the queried prompts: the queried pair both ways and (best, worst) by the updated RM both ways;
  (b) fresh prompts: (best, worst), (worst, best), (2nd best, 2nd worst), (2nd worst, 2nd best);
then clips and applies them with optax, and moves the anchor: theta_bar <- eta theta_bar + (1-eta) theta.

With policy.trainable_layers = k > 0 only the last k blocks and the final norm learn: the policy's
parameters are split once into a trainable part (what the optimizer, the anchor and checkpoints hold)
and a frozen part shared with the SFT model (never copied); gradients are taken with respect to the
trainable part only, so nothing runs backward below the first trainable block.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from effjax.models.sharding import shard_like
from effjax.rlhf import enn, rollout
from effjax.rlhf.config import PolicyConfig


def trainable(cfg: PolicyConfig, num_layers: int):
  """nnx filter of the learning parameters: all (trainable_layers = 0) or the last k blocks and
  the final norm."""
  k = cfg.trainable_layers
  if not 0 <= k <= num_layers:
    raise ValueError(f"policy.trainable_layers={k} must be in [0, {num_layers}]")

  def keep(path, x) -> bool:
    if not isinstance(x, nnx.Param):
      return False
    if k == 0:
      return True
    return path[0] == "final_norm" or (path[0] == "layers" and int(path[1]) >= num_layers - k)

  return keep


def split_policy(model, cfg: PolicyConfig):
  """(graphdef, trainable params, frozen params) of a policy model (the frozen arrays are the
  model's own: not copied)."""
  return nnx.split(model, trainable(cfg, model.cfg.num_layers), ...)


def policy_optimizer(cfg: PolicyConfig) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.lr))


def ranked(point: jax.Array) -> jax.Array:
  """Response indices per prompt from best to worst by point reward: [B, n]."""
  return jnp.argsort(-point, axis=-1)


PAIRS_PER_PROMPT = 4  # ordered pairs per prompt in each group (ordered_pairs_a / _b)


def ordered_pairs_a(pair: jax.Array, point: jax.Array) -> jax.Array:
  """(a): [B, 4, 2] = queried both ways, (best, worst) both ways."""
  order = ranked(point)
  best, worst = order[:, 0], order[:, -1]
  q0, q1 = pair[:, 0], pair[:, 1]
  return jnp.stack([jnp.stack([q0, q1], -1), jnp.stack([q1, q0], -1),
                    jnp.stack([best, worst], -1), jnp.stack([worst, best], -1)], axis=1)


def ordered_pairs_b(point: jax.Array) -> jax.Array:
  """(b): [B, 4, 2] = (best, worst), (worst, best), (2nd best, 2nd worst), (2nd worst, 2nd best)."""
  order = ranked(point)
  b1, b2, w1, w2 = order[:, 0], order[:, 1], order[:, -1], order[:, -2]
  return jnp.stack([jnp.stack([b1, w1], -1), jnp.stack([w1, b1], -1),
                    jnp.stack([b2, w2], -1), jnp.stack([w2, b2], -1)], axis=1)


def gather_pairs(prompts, prompt_lens, responses, mask, point, pairs):
  """Flatten ordered pairs [B, k, 2] to the first responses and their p(first > second)."""
  b, k, _ = pairs.shape
  first = pairs[..., 0]
  y = jnp.take_along_axis(responses, first[..., None], axis=1)  # [B, k, L]
  y_mask = jnp.take_along_axis(mask, first[..., None], axis=1)
  r1 = jnp.take_along_axis(point, pairs[..., 0], axis=1)
  r2 = jnp.take_along_axis(point, pairs[..., 1], axis=1)
  length = responses.shape[-1]
  return dict(prompts=jnp.repeat(prompts, k, axis=0), prompt_lens=jnp.repeat(prompt_lens, k, axis=0),
              y=y.reshape(b * k, length), y_mask=y_mask.reshape(b * k, length),
              p=jax.nn.sigmoid(r1 - r2).reshape(b * k))


def pair_loss(policy, anchor, batch: dict, eps: float, beta: float, mesh=None, remat: bool = True):
  """Mean over ordered pairs of -(p - 1/2 + eps) log pi(Y) + beta * sum_l KL_l(pi || anchor)."""
  logp, logp_all = rollout.token_logprobs(policy, batch["prompts"], batch["prompt_lens"], batch["y"],
                                          batch["y_mask"], mesh=mesh, remat=remat)
  _, anchor_all = rollout.token_logprobs(anchor, batch["prompts"], batch["prompt_lens"], batch["y"],
                                         batch["y_mask"], mesh=mesh)
  anchor_all = jax.lax.stop_gradient(anchor_all)
  m = batch["y_mask"].astype(jnp.float32)
  seq_logp = jnp.sum(logp * m, axis=-1)
  kl = jnp.sum(jnp.sum(jnp.exp(logp_all) * (logp_all - anchor_all), axis=-1) * m, axis=-1)
  weight = jax.lax.stop_gradient(batch["p"] - 0.5 + eps)
  loss = jnp.mean(-weight * seq_logp + beta * kl)
  return loss, dict(kl=jnp.mean(kl), logp=jnp.mean(seq_logp))


def chunked_value_and_grad(loss_fn: Callable, params, rows: dict, micro_batch: int, consts=(),
                           mesh=None):
  """value_and_grad in params of a mean-over-rows loss(params, rows, consts) -> (loss, aux),
  micro_batch rows at a time.

  The chunks run in a lax.scan and their (loss, aux, grads) are averaged, which equals the whole-batch
  result; peak activation memory is that of one chunk. micro_batch <= 0 or >= rows: one chunk.
  consts: the other weights the loss reads (the anchor, frozen layers); see `loop_variant`.
  mesh: the gradients and their running sum are sharded like the parameters (`shard_like`).
  """
  n = jax.tree.leaves(rows)[0].shape[0]
  m = n if micro_batch <= 0 or micro_batch >= n else micro_batch
  if n % m:
    raise ValueError(f"policy.micro_batch={micro_batch} must divide the {n} rows of a policy step")
  vg = jax.value_and_grad(loss_fn, has_aux=True)

  def value_and_grad(p, chunk, c):
    value, grads = vg(p, chunk, c)
    return value, shard_like(grads, params, mesh)

  if m == n:
    return value_and_grad(params, rows, consts)
  chunks = jax.tree.map(lambda x: x.reshape(n // m, m, *x.shape[1:]), rows)

  def body(acc, chunk):
    p, c, chunk = loop_variant((params, consts), chunk)
    out = value_and_grad(p, chunk, c)
    return jax.tree.map(lambda a, o: a + o * (m / n), acc, out), None

  shapes = jax.eval_shape(vg, params, jax.tree.map(lambda x: x[0], chunks), consts)
  value0, grads0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(body, (value0, shard_like(grads0, params, mesh)), chunks)
  return total


def loop_variant(weights, chunk):
  """(weights, chunk) through one optimization barrier inside a loop body. Weights a loop only
  reads are loop-invariant, and XLA may hoist their FSDP all-gathers out of the loop, so that
  every layer's gathered weights live at once for the whole loop; tied to the chunk, the gathers
  stay in the body. Measured on the Gemma-2-9B policy step planned for v5p-32: +1.98 GB per layer
  without the barrier, +1.72 with it (one micro-batch alone: +0.59)."""
  weights, chunk = jax.lax.optimization_barrier((weights, chunk))
  return (*weights, chunk)


def chunked_rewards(rm, group: dict, micro_batch: int, mesh=None) -> jax.Array:
  """Point rewards [B, n] of a group's responses [B, n, L], scored in a lax.map over the prompts of
  one policy micro-batch at a time (micro_batch ordered pairs = micro_batch / PAIRS_PER_PROMPT
  prompts), so the RM's activations peak at one chunk's rather than the whole group's (1,024
  sequences at the paper's batch). micro_batch <= 0: all at once."""
  b, n, _ = group["responses"].shape
  per = b if micro_batch <= 0 else min(b, max(1, micro_batch // PAIRS_PER_PROMPT))
  while b % per:  # whole prompts per chunk, equal chunks
    per -= 1

  def score(model, g):
    return enn.score(model, g["prompts"], g["prompt_lens"], g["responses"], g["mask"], mesh)[0]

  if per == b:
    return score(rm, group)
  keys = ("prompts", "prompt_lens", "responses", "mask")
  chunks = {k: group[k].reshape(b // per, per, *group[k].shape[1:]) for k in keys}
  graphdef, state = nnx.split(rm)

  def body(g):
    st, g = loop_variant((state,), g)
    return score(nnx.merge(graphdef, st), g)

  return jax.lax.map(body, chunks).reshape(b, n)


def make_policy_update(policy_graphdef, rm_graphdef, cfg: PolicyConfig,
                       optimizer: optax.GradientTransformation, *, use_a: bool, mesh=None,
                       eps: float | None = None) -> Callable:
  """(policy, anchor, opt_state, rm_params, rm_frozen, a, b, frozen) -> (policy, anchor, opt_state,
  metrics): a jitted gradient, then a jitted optimizer step (see enn.apply_if_finite). policy, anchor
  and opt_state are over the trainable parameters; `frozen` is the rest of the policy (split_policy).

  a: queried prompts {prompts, prompt_lens, responses [B, n, L], mask, pair [B, 2]} (ignored unless
  use_a); b: fresh prompts {prompts, prompt_lens, responses, mask}. The RM ranks responses inside.
  A non-finite loss or gradient skips the whole update (policy, anchor, optimizer state kept).
  """
  eps = cfg.eps if eps is None else eps

  def rewards(rm, g):
    return jax.lax.stop_gradient(chunked_rewards(rm, g, cfg.micro_batch, mesh))

  @jax.jit
  def gradients(policy, anchor, rm_params, rm_frozen, a, b, frozen):
    rm = nnx.merge(rm_graphdef, rm_params, rm_frozen)
    groups = []
    if use_a:
      point_a = rewards(rm, a)
      groups.append(gather_pairs(a["prompts"], a["prompt_lens"], a["responses"], a["mask"], point_a,
                                 ordered_pairs_a(a["pair"], point_a)))
    point_b = rewards(rm, b)
    groups.append(gather_pairs(b["prompts"], b["prompt_lens"], b["responses"], b["mask"], point_b,
                               ordered_pairs_b(point_b)))

    def loss(params, rows, consts):
      anchor_params, frozen_params = consts
      return pair_loss(nnx.merge(policy_graphdef, params, frozen_params),
                       nnx.merge(policy_graphdef, anchor_params, frozen_params), rows, eps,
                       cfg.beta, mesh, cfg.remat)

    def group_value_and_grad(g):
      return chunked_value_and_grad(loss, policy, g, cfg.micro_batch, (anchor, frozen), mesh)

    per_group = [group_value_and_grad(g) for g in groups]
    loss = sum(l for (l, _), _ in per_group)
    grads = jax.tree.map(lambda *gs: sum(gs), *[gr for _, gr in per_group])
    metrics = dict(per_group[-1][0][1], policy_loss=loss, grad_norm=optax.tree.norm(grads),
                   rm_margin=jnp.mean(point_b.max(-1) - point_b.min(-1)))
    return loss, metrics, grads

  @jax.jit
  def apply(policy, anchor, opt_state, grads, loss):
    new_policy, new_opt, ok = enn.apply_if_finite(optimizer, policy, opt_state, grads, loss)
    new_anchor = jax.tree.map(lambda t_bar, t: cfg.eta * t_bar + (1.0 - cfg.eta) * t, anchor,
                              new_policy)
    return new_policy, enn.keep_if(ok, new_anchor, anchor), new_opt, (~ok).astype(jnp.int32)

  def update(policy, anchor, opt_state, rm_params, rm_frozen, a, b, frozen):
    loss, metrics, grads = gradients(policy, anchor, rm_params, rm_frozen, a, b, frozen)
    policy, anchor, opt_state, skipped = apply(policy, anchor, opt_state, grads, loss)
    return policy, anchor, opt_state, dict(metrics, policy_skipped=skipped)

  update.gradients, update.apply = gradients, apply  # the jitted parts, for `effjax plan`
  return update
