"""Rollouts and sequence forwards for RLHF.

Prompts are right-padded [B, P] with lengths [B] (the KV cache's convention: padded tokens get no
cache slot, so every row's response starts right after its own prompt). Responses are [.., L]; after
an end-of-sequence token a row emits padding and its response mask turns False.

`sample` is the rollout signature the RLHF agents use (`Sampler`); the decoding engine serves it
(`engine.generate_arrays`: its prefill and while-loop with top-k sampling, traced inside the
caller's jit, since the policy's parameters change every batch).
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.decoding import engine
from effjax.decoding.sampling import Sampler as TokenSampler
from effjax.models.sharding import DEFAULT_RULES, ShardingRules
from effjax.models.transformer import Transformer


class Sampler(Protocol):
  def __call__(self, model: Transformer, prompts: jax.Array, prompt_lens: jax.Array, rng: jax.Array, *,
               num_samples: int, length: int, top_k: int, temperature: float,
               mesh=None) -> tuple[jax.Array, jax.Array]:
    """-> (responses [B, n, L] int32, mask [B, n, L] bool)."""


def sampling_strategy(top_k: int, temperature: float) -> engine.AutoRegressive:
  """Greedy when temperature == 0 (whatever top_k), else a draw among the top_k (0: all) logits."""
  if temperature == 0.0:
    return engine.PLAIN_GREEDY
  return engine.AutoRegressive(sampler=TokenSampler(temperature=temperature, top_k=top_k))


def sample(model: Transformer, prompts: jax.Array, prompt_lens: jax.Array, rng: jax.Array, *,
           num_samples: int, length: int, top_k: int, temperature: float, mesh=None,
           rules: ShardingRules = DEFAULT_RULES) -> tuple[jax.Array, jax.Array]:
  """num_samples responses of at most `length` tokens per prompt (each prompt repeated n times)."""
  b, n = prompts.shape[0], num_samples
  resp, mask = engine.generate_arrays(
      model, jnp.repeat(prompts, n, axis=0), jnp.repeat(prompt_lens, n, axis=0), rng,
      max_new_tokens=length, strategy=sampling_strategy(top_k, temperature), mesh=mesh, rules=rules)
  return resp.reshape(b, n, length), mask.reshape(b, n, length)


def sequence(prompts: jax.Array, prompt_lens: jax.Array, responses: jax.Array,
             response_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[prompt (right-padded) ; response] as one block: tokens, input mask, positions [N, P + L].

  Padding sits between prompt and response; it is masked out and the response's positions continue
  from the prompt's own length, so the forward equals the cached one used for sampling.
  """
  p = prompts.shape[1]
  length = responses.shape[1]
  lens = prompt_lens.astype(jnp.int32)
  tokens = jnp.concatenate([prompts, responses], axis=1)
  mask = jnp.concatenate([jnp.arange(p)[None, :] < lens[:, None], response_mask], axis=1)
  pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), prompts.shape),
                         lens[:, None] + jnp.arange(length)[None, :]], axis=1)
  return tokens, mask, pos


def response_hidden(model: Transformer, prompts, prompt_lens, responses, response_mask, *, mesh=None,
                    rules: ShardingRules = DEFAULT_RULES, remat: bool = True) -> jax.Array:
  """Final hidden states that predict each response token: [N, L, D] (row l predicts token l).
  remat: recompute each layer in the backward pass instead of keeping its activations."""
  tokens, mask, pos = sequence(prompts, prompt_lens, responses, response_mask)
  p = prompts.shape[1]
  length = responses.shape[1]
  h = model(tokens, positions=pos, input_mask=mask, compute_logits=False, remat=remat, mesh=mesh,
            rules=rules).hidden
  first = jnp.take_along_axis(h, (prompt_lens.astype(jnp.int32) - 1)[:, None, None], axis=1)
  return jnp.concatenate([first, h[:, p:p + length - 1]], axis=1)


def last_hidden(model: Transformer, prompts, prompt_lens, responses, response_mask, *, mesh=None,
                rules: ShardingRules = DEFAULT_RULES, remat: bool = True) -> jax.Array:
  """The final hidden state at the last response token (the reward model's feature): [N, D]."""
  tokens, mask, pos = sequence(prompts, prompt_lens, responses, response_mask)
  h = model(tokens, positions=pos, input_mask=mask, compute_logits=False, remat=remat, mesh=mesh,
            rules=rules).hidden
  p = prompts.shape[1]
  n_resp = response_mask.sum(axis=1).astype(jnp.int32)
  # An empty response (EOS first) is read at the last prompt token.
  idx = jnp.where(n_resp > 0, p + n_resp - 1, prompt_lens.astype(jnp.int32) - 1)
  return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]


def token_logprobs(model: Transformer, prompts, prompt_lens, responses, response_mask, *, mesh=None,
                   rules: ShardingRules = DEFAULT_RULES,
                   remat: bool = True) -> tuple[jax.Array, jax.Array]:
  """(log pi(y_l | x, y_<l) [N, L], full log-softmax [N, L, V]) for each response token."""
  h = response_hidden(model, prompts, prompt_lens, responses, response_mask, mesh=mesh, rules=rules,
                      remat=remat)
  logp_all = jax.nn.log_softmax(model.logits(h), axis=-1)
  logp = jnp.take_along_axis(logp_all, responses[..., None], axis=-1)[..., 0]
  return logp, logp_all


def as_model(graphdef: nnx.GraphDef, params) -> Transformer:
  """The model from its graph and params: one state, or a tuple of states that partition it (a
  policy's trainable and frozen parts)."""
  return nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)


def make_sampler(graphdef: nnx.GraphDef, *, num_samples: int, length: int, top_k: int,
                 temperature: float, mesh=None) -> Callable:
  """A jitted (params, prompts, prompt_lens, rng) -> (responses, mask) for one model graph (params:
  one state or a (trainable, frozen) tuple, see as_model)."""

  @jax.jit
  def run(params, prompts, prompt_lens, rng):
    model = as_model(graphdef, params)
    return sample(model, prompts, prompt_lens, rng, num_samples=num_samples, length=length,
                  top_k=top_k, temperature=temperature, mesh=mesh)

  return run


def make_sequence_logprob(graphdef: nnx.GraphDef, mesh=None) -> Callable:
  """A jitted (params, prompts, prompt_lens, responses [N, L], mask) -> log pi(response | prompt) [N]."""

  @jax.jit
  def run(params, prompts, prompt_lens, responses, response_mask):
    logp, _ = token_logprobs(as_model(graphdef, params), prompts, prompt_lens, responses,
                             response_mask, mesh=mesh)
    return jnp.sum(jnp.where(response_mask, logp, 0.0), axis=-1)

  return run
