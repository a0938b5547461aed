"""A recipe's compiled programs, built from the runtime's own jitted functions on abstract inputs.

Nothing here re-implements a step: the decode programs are `engine.jitted_programs` for the
strategy the runtime would build; the RLHF programs are the `Steps` that `agents.build_steps` gives
the Trainer (rollout, scoring, pair selection, the RM and policy updates' jitted parts). Inputs are
ShapeDtypeStructs carrying the shardings the runtime gives them: parameters and optimizer states
through `state_shardings` (the rules table), the KV cache as `init_state` constrains it, host data
left to jit as uncommitted arrays are. So a change to the model, the engine or the RLHF steps
changes the plan with it.

XLA's cost analysis counts a loop body once. A `Phase` therefore says how a recipe step is made of
program costs: a decode loop's cost is one step, repeated per generated token; the RLHF rollout's
per-token cost is its program minus the prefill program of the same shapes; a policy update that
scans micro-batches is costed from the same update compiled for one micro-batch of prompts, times
the number of such groups (its cost is linear in the prompts).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.models.cache import K_AXES, V_AXES
from effjax.models.config import PRESETS, ModelConfig, tiny_config
from effjax.models.sharding import array_sharding, state_shardings
from effjax.models.transformer import Transformer, abstract_model
from effjax.plan.recipes import Recipe

# What an input is, for the memory table.
PARAMS, OPTIMIZER, KV_CACHE, GRADIENTS, INPUTS = (
    "parameters", "optimizer", "kv_cache", "gradients", "inputs")


@dataclasses.dataclass
class Arg:
  """One argument of a program: its abstract value, its kind, and whether it is long-lived state
  (`resident`: named state that stays in HBM between programs, e.g. the policy)."""

  value: Any
  kind: str | Callable[[str], str]  # or a function of the leaf's key path
  resident: str = ""


@dataclasses.dataclass
class Program:
  name: str
  fn: Callable  # a jax.jit-wrapped function of the runtime
  args: list[Arg]
  note: str = ""
  shrink: str = ""  # the recipe settings that shrink this program's activations and temporaries
  # Compiled only for its FLOPs and bytes (a loop body's cost, which XLA counts once per loop):
  # the recipe never runs it, so its memory is reported but does not set the peak.
  costs_only: bool = False


@dataclasses.dataclass(frozen=True)
class Phase:
  """`count` runs per recipe step of a cost made of programs' costs: {program: coefficient}."""

  name: str
  count: float
  cost: dict[str, float]


@dataclasses.dataclass
class Plan:
  """What a recipe compiles to: programs, the long-lived state between them, the step's phases,
  and the facts the report needs (rows decoded per step, KV cache inside a program)."""

  title: str
  programs: list[Program]
  resident: dict[str, Any]  # name -> abstract pytree (with shardings) held between programs
  phases: list[Phase]
  tokens_per_step: float = 0.0  # decode: tokens one decode-step phase run appends (batch * tau)
  decode_phase: str = ""
  inner_cache: dict[str, Any] = dataclasses.field(default_factory=dict)  # program -> abstract KV
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


def model_config(recipe: Recipe, layers: int | None = None) -> ModelConfig:
  """The recipe's model preset in its dtype and weight quantization ('tiny:FAMILY': the tests' small
  model of a family); with `layers`, its first `layers` decoder layers (for layer extrapolation,
  planner.py)."""
  if recipe.model.startswith("tiny:"):
    cfg = tiny_config(recipe.model[5:], dtype=recipe.dtype, quant=recipe.quant)
  else:
    cfg = PRESETS[recipe.model].replace(dtype=recipe.dtype, quant=recipe.quant)
  if layers is None:
    return cfg
  return cfg.replace(num_layers=layers, layer_kinds=cfg.layer_kinds[:layers])


def place(tree, shardings):
  """Abstract arrays of `tree` carrying `shardings` (a prefix tree of NamedShardings)."""
  return jax.tree.map(
      lambda sh, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                   sub), shardings, tree)


def placed_state(tree, mesh):
  """`tree` as the runtime places long-lived state (Trainer._place / Engine): by the rules table."""
  return place(tree, state_shardings(tree, mesh))


def _abstract(x):
  return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)


def cache_kind(path: str) -> str:
  return KV_CACHE if ".cache.k" in path or ".cache.v" in path else INPUTS


def decode_state(cfg: ModelConfig, strategy, mesh, *, rows: int, prompt_len: int,
                 max_new_tokens: int, cache_len: int):
  """The abstract DecodeState `engine.init_state` makes, its KV cache sharded as init_state
  constrains it (the rest is left to jit, as the runtime's uncommitted arrays are)."""
  from effjax.decoding import engine

  def make():
    return engine.init_state(
        cfg, np.zeros((rows, prompt_len), np.int32), np.full((rows,), prompt_len, np.int32),
        max_new_tokens, jax.random.key(0), max_new_tokens=max_new_tokens, cache_len=cache_len,
        eos=cfg.eos_ids or (0,), stop=engine.stop_array(()), strategy=strategy, mesh=mesh)

  state = jax.eval_shape(make)
  cache = state.cache.replace(k=kv_shapes(state.cache.k, K_AXES, mesh),
                              v=kv_shapes(state.cache.v, V_AXES, mesh))
  return state.replace(cache=cache)


def kv_shapes(xs, axes, mesh) -> tuple:
  """The cache's per-layer K or V shapes, sharded over `mesh` by their logical axes."""
  return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=array_sharding(axes, x.shape, mesh))
               for x in xs)


def kv_cache_of(state) -> dict:
  return dict(k=state.cache.k, v=state.cache.v)


# ---- decoding (ESP, hybrid, ReBalance, plain) ------------------------------------------------------


def decode_strategy(recipe: Recipe, cfg: ModelConfig, method: str):
  """The strategy the runtime builds for `method` with the recipe's sampler and budget."""
  from effjax.decoding.methods import make_strategy
  from effjax.decoding.sampling import Sampler

  d = recipe.decode
  sampler = Sampler(temperature=d.temperature, top_p=d.top_p)
  if method != "rebalance":
    return make_strategy(method, d.bc if method in ("esp", "hybrid") else None, sampler)
  from effjax.decoding.engine import AutoRegressive
  from effjax.rebalance.confidence import TrackerConfig
  from effjax.rebalance.control import PRESETS as CONSTANTS
  from effjax.rebalance.steering import Delimiters, ReBalanceHook

  if recipe.model not in CONSTANTS:
    raise ValueError(f"no ReBalance constants for {recipe.model!r}; known: {sorted(CONSTANTS)}")
  # The steering vector and the delimiter table come from an extracted profile and the tokenizer;
  # their values do not change the program's shapes, memory or cost, so zeros stand in for them.
  hook = ReBalanceHook(np.zeros((cfg.dim,), np.float32),
                       TrackerConfig.create(CONSTANTS[recipe.model]),
                       Delimiters.from_texts([""] * cfg.vocab_size))
  return AutoRegressive(sampler, hook)


def decode_cache_len(cfg: ModelConfig, strategy, prompt_len: int, max_new_tokens: int) -> int:
  """The cache the runtime sizes for the job (engine.cache_len_for), with room for one block."""
  from effjax.decoding.engine import cache_len_for

  return cache_len_for([prompt_len + strategy.block_size - 1], max_new_tokens, cfg.max_position)


def engine_programs(cfg: ModelConfig, graphdef, params, strategy, mesh, *, label: str, rows: int,
                    prompt_len: int, max_new_tokens: int, cache_len: int,
                    with_prefill: bool = True) -> list[Program]:
  """The Engine's prefill and decode-loop programs for `strategy` at `rows` x `prompt_len`.

  The decode program takes the state the prefill returns (a strategy's own state, ESP's candidates
  say, is made there): its shapes come from tracing the prefill, its KV cache keeps init_state's
  sharding.
  """
  from effjax.decoding.engine import jitted_programs

  prefill, decode = jitted_programs(graphdef, strategy)
  state = decode_state(cfg, strategy, mesh, rows=rows, prompt_len=prompt_len,
                       max_new_tokens=max_new_tokens, cache_len=cache_len)
  steps = jax.ShapeDtypeStruct((), jnp.int32)  # decode runs at most this many more steps
  after = jax.eval_shape(prefill, params, state)
  after = after.replace(cache=after.cache.replace(k=state.cache.k, v=state.cache.v))
  shrink = "a smaller batch (decode.batches) or shorter prompts (decode.prompt_len)"
  out = [Program(f"{label} decode", decode,
                 [Arg(params, PARAMS, "params"), Arg(after, cache_kind), Arg(steps, INPUTS)],
                 shrink=shrink)]
  if with_prefill:
    out.insert(0, Program(f"{label} prefill", prefill,
                          [Arg(params, PARAMS, "params"), Arg(state, cache_kind)], shrink=shrink))
  return out


def decode_plan(recipe: Recipe, mesh, batch: int, layers: int | None = None) -> Plan:
  d = recipe.decode
  cfg = model_config(recipe, layers)
  graphdef, params = nnx.split(abstract_model(cfg))
  params = placed_state(params, mesh)
  tau = recipe.paper.tokens_per_call or 1.0
  programs, phases, info = [], [], dict(batch=batch, tau=tau, labels=[])
  for i, method in enumerate(d.methods):
    strategy = decode_strategy(recipe, cfg, method)
    cache_len = decode_cache_len(cfg, strategy, d.prompt_len, d.max_new_tokens)
    label = method_label(method, d.bc)
    # The step: one prefill, then max_new_tokens / tau decode steps (the loop runs until the
    # longest row is done). The other methods are references for the decode step (0 runs).
    programs += engine_programs(cfg, graphdef, params, strategy, mesh, label=label, rows=batch,
                                prompt_len=d.prompt_len, max_new_tokens=d.max_new_tokens,
                                cache_len=cache_len, with_prefill=i == 0)
    if i == 0:
      phases.append(Phase(f"{label} prefill", 1, {f"{label} prefill": 1.0}))
    phases.append(Phase(f"{label} decode step", d.max_new_tokens / tau if i == 0 else 0,
                        {f"{label} decode": 1.0}))
    info["labels"].append(label)
    info[label] = dict(cache_len=cache_len, block=strategy.block_size)
  main = method_label(d.methods[0], d.bc)
  weights = f", {recipe.quant} weights" if recipe.quant else ""
  return Plan(title=f"{recipe.model} {main}, batch {batch}{weights}", programs=programs,
              resident=dict(params=params), phases=phases, tokens_per_step=batch * tau,
              decode_phase=f"{main} decode step", info=info)


def method_label(method: str, bc: int | None) -> str:
  return f"{method}-bc{bc}" if method in ("esp", "hybrid") else method


# ---- online RLHF ---------------------------------------------------------------------------------


def rlhf_plan(recipe: Recipe, mesh, layers: int | None = None) -> Plan:
  """One batch of the incremental agents (ONLINE_RLHF.md "one online step"), as Trainer runs it."""
  from effjax.rlhf import agents, enn, labels, policy, rollout

  r = recipe.rlhf
  cfg = model_config(recipe, layers)
  agent, ecfg, pcfg = r.agent, r.enn, r.policy
  b, n, p, length = agent.prompts_per_batch, agent.responses_per_prompt, r.prompt_len, r.response_len
  abstract = abstract_model(cfg)
  # The policy's learning part (theta) and its frozen rest (empty unless policy.trainable_layers).
  policy_graphdef, theta, frozen = policy.split_policy(abstract, pcfg)
  engine_graphdef, engine_params = nnx.split(abstract)  # the decoding engine's view: one state
  rm_abstract = nnx.eval_shape(
      lambda: enn.create_reward_model(Transformer(cfg, rngs=nnx.Rngs(0)), ecfg, seed=0))
  rm_graphdef, phi, priors = enn.split(rm_abstract)
  steps = agents.build_steps(agents.step_settings(agent), pcfg, ecfg, policy_graphdef, rm_graphdef,
                             length, mesh)
  theta, frozen, engine_params, phi, priors = (placed_state(t, mesh)
                                               for t in (theta, frozen, engine_params, phi, priors))
  policy_opt = placed_state(jax.eval_shape(partial(enn.init_optimizer, steps.policy_opt), theta), mesh)
  rm_opt = placed_state(jax.eval_shape(partial(enn.init_optimizer, steps.rm_opt), phi), mesh)
  # Trainer holds theta_0 and phi_0 (the retraining origin) besides the training state.
  resident = dict(policy=theta, anchor=theta, policy_opt=policy_opt, rm=phi, rm_opt=rm_opt,
                  priors=priors, theta0=theta, phi0=phi, policy_frozen=frozen)

  key = jax.eval_shape(lambda: jax.random.key(0))
  prompts = jax.ShapeDtypeStruct((b, p), jnp.int32)
  lens = jax.ShapeDtypeStruct((b,), jnp.int32)
  resp, mask = jax.eval_shape(steps.sample, (theta, frozen), prompts, lens, key)
  point, particles = jax.eval_shape(steps.score, phi, priors, prompts, lens, resp, mask)
  pair = jax.eval_shape(steps.select, point, particles, key)
  # The RM's pair batch as Trainer.pair_batches builds it: the new labels plus the replayed ones.
  m = b + ecfg.replay
  records = [dict(prompt_id=0, a=[], b=[], a_len=0, b_len=0, choice=0)] * m
  arrays = labels.to_arrays(records, length)
  pairs = dict(prompts=jax.ShapeDtypeStruct((m, p), jnp.int32),
               prompt_lens=jax.ShapeDtypeStruct((m,), jnp.int32),
               num_labels=jax.ShapeDtypeStruct((), jnp.float32),
               **{k: _abstract(arrays[k]) for k in ("a", "a_mask", "b", "b_mask", "choice")})
  rm_loss, _, rm_grads = jax.eval_shape(steps.rm_update.gradients, phi, priors, pairs)

  def groups(prompts_n):
    pr = jax.ShapeDtypeStruct((prompts_n, p), jnp.int32)
    ln = jax.ShapeDtypeStruct((prompts_n,), jnp.int32)
    rs = jax.ShapeDtypeStruct((prompts_n, n, length), resp.dtype)
    mk = jax.ShapeDtypeStruct((prompts_n, n, length), mask.dtype)
    a = dict(prompts=pr, prompt_lens=ln, responses=rs, mask=mk,
             pair=jax.ShapeDtypeStruct((prompts_n, 2), pair.dtype))
    return a, dict(prompts=pr, prompt_lens=ln, responses=rs, mask=mk)

  group_a, group_b = groups(b)
  pol_loss, _, pol_grads = jax.eval_shape(steps.policy_update.gradients, theta, theta, phi, priors,
                                          group_a, group_b, frozen)
  strategy = rollout.sampling_strategy(pcfg.top_k, pcfg.temperature)
  cache_len = p + length + strategy.block_size  # as engine.generate_arrays sizes it
  prefill = engine_programs(cfg, engine_graphdef, engine_params, strategy, mesh, label="rollout",
                            rows=b * n, prompt_len=p, max_new_tokens=length, cache_len=cache_len)[0]
  prefill.args[0].resident = "policy"
  prefill.shrink = "shorter prompts or responses (rlhf.prompt_len, rlhf.response_len)"
  # Memory-critical programs first (a partial plan with --program keeps this order).
  programs = [
      Program("rollout", steps.sample, [Arg((theta, frozen), PARAMS, "policy"), Arg(prompts, INPUTS),
                                        Arg(lens, INPUTS), Arg(key, INPUTS)],
              note=f"{b} prompts x {n} responses of {length} tokens",
              shrink="shorter prompts or responses (rlhf.prompt_len, rlhf.response_len), fewer "
                     "rows per rollout (rlhf.agent.prompts_per_batch x responses_per_prompt)"),
      Program("policy gradients", steps.policy_update.gradients,
              [Arg(theta, PARAMS, "policy"), Arg(theta, PARAMS, "anchor"), Arg(phi, PARAMS, "rm"),
               Arg(priors, PARAMS, "priors"), Arg(group_a, INPUTS), Arg(group_b, INPUTS),
               Arg(frozen, PARAMS, "policy_frozen")],
              note=f"micro_batch={pcfg.micro_batch}",
              shrink="smaller policy micro-batches (rlhf.policy.micro_batch)"),
      Program("policy apply", steps.policy_update.apply,
              [Arg(theta, PARAMS, "policy"), Arg(theta, PARAMS, "anchor"),
               Arg(policy_opt, OPTIMIZER, "policy_opt"), Arg(pol_grads, GRADIENTS),
               Arg(pol_loss, INPUTS)]),
      prefill,
      Program("rm score", steps.score, [Arg(phi, PARAMS, "rm"), Arg(priors, PARAMS, "priors"),
                                        Arg(prompts, INPUTS), Arg(lens, INPUTS), Arg(resp, INPUTS),
                                        Arg(mask, INPUTS)]),
      Program("pair selection", steps.select, [Arg(point, INPUTS), Arg(particles, INPUTS),
                                               Arg(key, INPUTS)]),
      Program("rm gradients", steps.rm_update.gradients,
              [Arg(phi, PARAMS, "rm"), Arg(priors, PARAMS, "priors"), Arg(pairs, INPUTS)],
              note=f"{m} labelled pairs (new + replay)",
              shrink="fewer pairs per RM step (rlhf.enn.replay)"),
      Program("rm apply", steps.rm_update.apply,
              [Arg(phi, PARAMS, "rm"), Arg(rm_opt, OPTIMIZER, "rm_opt"),
               Arg(rm_grads, GRADIENTS), Arg(rm_loss, INPUTS)]),
  ]
  per_prompt = policy.PAIRS_PER_PROMPT
  rows = per_prompt * b  # ordered pairs per group
  chunk = pcfg.micro_batch if 0 < pcfg.micro_batch < rows else rows
  policy_cost = {"policy gradients": 1.0}
  if chunk < rows:
    if chunk % per_prompt:
      raise ValueError(f"rlhf.policy.micro_batch={chunk} must be a multiple of {per_prompt} "
                       f"({per_prompt} ordered pairs per prompt) for the plan to cost it")
    one_a, one_b = groups(chunk // per_prompt)
    programs.append(Program(
        "policy gradients, one micro-batch", steps.policy_update.gradients,
        [Arg(theta, PARAMS, "policy"), Arg(theta, PARAMS, "anchor"), Arg(phi, PARAMS, "rm"),
         Arg(priors, PARAMS, "priors"), Arg(one_a, INPUTS), Arg(one_b, INPUTS),
         Arg(frozen, PARAMS, "policy_frozen")],
        note=f"{chunk // per_prompt} prompts: costs the scanned update (x {rows // chunk})",
        costs_only=True))
    policy_cost = {"policy gradients, one micro-batch": rows / chunk}
  s = ecfg.steps_per_batch
  phases = [
      Phase("rollout prefill (query + fresh prompts)", 2, {"rollout prefill": 1.0}),
      Phase("rollout decode step", 2 * length, {"rollout": 1.0, "rollout prefill": -1.0}),
      Phase("rm score (query)", 1, {"rm score": 1.0}),
      Phase("pair selection", 1, {"pair selection": 1.0}),
      Phase("rm gradients", s, {"rm gradients": 1.0}),
      Phase("rm apply", s, {"rm apply": 1.0}),
      Phase("policy gradients (scores both groups)", 1, policy_cost),
      Phase("policy apply + anchor EMA", 1, {"policy apply": 1.0}),
  ]
  kv = jax.eval_shape(lambda: _kv_init(cfg, b * n, cache_len))
  kv = dict(k=kv_shapes(kv["k"], K_AXES, mesh), v=kv_shapes(kv["v"], V_AXES, mesh))
  return Plan(title=f"{recipe.model} online RLHF batch ({b} x {n}, {p}+{length} tokens)",
              programs=programs, resident=resident, phases=phases,
              inner_cache={"rollout": kv},
              info=dict(prompts=b, responses=n, rows=rows, micro_batch=chunk,
                        rollout_cache_len=cache_len, particles=ecfg.num_particles,
                        policy_params=cfg.num_params()))


def _kv_init(cfg: ModelConfig, rows: int, cache_len: int) -> dict:
  from effjax.models.cache import KVCache

  c = KVCache.init(cfg, rows, cache_len)
  return dict(k=c.k, v=c.v)


def build_plans(recipe: Recipe, mesh, layers: int | None = None) -> list[Plan]:
  if recipe.kind == "rlhf":
    return [rlhf_plan(recipe, mesh, layers)]
  return [decode_plan(recipe, mesh, batch, layers) for batch in recipe.decode.batches]

