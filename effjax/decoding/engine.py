"""The decoding engine: a jitted prefill, then a jitted `lax.while_loop` of strategy steps.

Everything the loop carries is one pytree, `DecodeState`, donated between calls. A `Strategy` owns
the loop body: plain autoregressive decoding, or a speculative method that drafts, verifies a token
tree in one forward and commits the accepted tokens (ESP, prompt lookup, lookahead). Strategies
append tokens through `append_tokens`, which applies EOS, stop sequences and per-row limits the
same way for all.

A `StepHook` observes every committed token and may steer the forward that feeds it or edit the
logits it is sampled from (ReBalance, SEAL, NoWait). It rides in the state (`DecodeState.hook`, its
own state in `hook_state`), so plain decoding and every tree strategy apply it the same way:
`AutoRegressive(hook=...)`, or `Steered(strategy, hook)` for a strategy with `hooks = True`. A tree
step stops accepting at the hook's `barrier` nodes, so the hook's state changes only between steps
and steered speculative decoding commits exactly the tokens of steered plain decoding (greedy).

Shapes are static: a fixed cache length, prompts right-padded to length buckets, fixed blocks.

`Engine` holds one model's parameters and compiles per strategy and bucket; `generate_arrays` is the
same prefill and loop as a pure function of a model and device arrays, for a caller's own jit (RLHF
rollouts, whose policy parameters change every call).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Generator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from effjax import program_cache
from effjax.decoding.compiled import DEFAULT_MAX_STRATEGIES, StrategyCache
from effjax.decoding.sampling import GREEDY, Sampler
from effjax.models.cache import K_AXES, V_AXES, KVCache, commit
from effjax.models.config import ModelConfig
from effjax.models.sharding import DEFAULT_RULES, ShardingRules, constrain, state_shardings
from effjax.models.transformer import Steering, Transformer


@struct.dataclass
class DecodeState:
  prompt: jax.Array  # [B, P] prompt tokens, right-padded to a bucket
  prompt_len: jax.Array  # [B]
  tokens: jax.Array  # [B, N] generated tokens (N = max_new_tokens + the most one step appends)
  length: jax.Array  # [B] tokens generated so far
  last: jax.Array  # [B] last generated token; not yet in the cache
  cache: KVCache
  done: jax.Array  # [B]
  limit: jax.Array  # [B] max new tokens per row
  eos: jax.Array  # [n_eos] end-of-sequence token ids
  stop: jax.Array  # [n_stop, L] stop sequences, left-padded with -1
  rng: jax.Array
  calls: jax.Array  # [] model forwards after the prefill
  extra: Any  # the strategy's own state
  hook: "StepHook | None" = struct.field(pytree_node=False, default=None)  # observes every token
  hook_state: Any = ()  # the hook's own state (after the prefill)
  memory: Any = ()  # what the engine's last generation with this strategy left it, [B, ...] (until
  # the prefill takes it; () = nothing: see Strategy.new_memory)


class StepHook:
  """Per-token observer of decoding that may steer the forward feeding a token (ReBalance, SEAL) or
  edit the logits before sampling (NoWait). All methods are traced inside the decode loop.

  With a tree strategy, one forward feeds the root (steered as plain decoding would) and the draft
  nodes (never steered), every owner's logits go through `process_logits` with the state at the
  start of the step, and `observe` then runs once per committed token, in order. That equals plain
  decoding as long as no accepted node would have been fed differently: `barrier` marks the nodes
  that must not be accepted (a rejected node's token can still be committed as the step's last,
  bonus token, whose forward happens in the next step). The default accepts no node at all (one
  token per step, always exact); a hook that knows where its steering and logit edits can change
  says so.
  """

  hidden_layers: tuple[int, ...] = ()

  def init(self, batch: int) -> Any:
    """The state: a pytree whose leaves all have a leading batch dimension [B, ...]."""
    return ()

  def steering(self, state: Any) -> Steering | None:
    """Steering for the forward that feeds the current last token."""
    return None

  def process_logits(self, state: Any, logits: jax.Array) -> jax.Array:
    return logits

  def observe(self, state: Any, logits: jax.Array, layer_hidden: tuple[jax.Array, ...],
              fed: jax.Array, sampled: jax.Array, active: jax.Array) -> Any:
    """After a forward: logits [B, V] at the fed token, hidden [B, D] per requested layer."""
    return state

  def barrier(self, state: Any, tokens: jax.Array, parent_tokens: jax.Array) -> jax.Array | None:
    """[B, O] bool: draft nodes (token, and its parent's token) that a tree step must not accept
    from `state`; None: accept any. Default: all (exact for any hook, no speed-up)."""
    return jnp.ones(tokens.shape, bool)


def hook_choices(hook: StepHook, state: Any, logits: jax.Array) -> jax.Array:
  """process_logits over every owner of a tree, [B, O, V], with one state."""
  return jax.vmap(lambda x: hook.process_logits(state, x), in_axes=1, out_axes=1)(logits)


def block_steering(hook: StepHook, state: Any, length: int) -> Steering | None:
  """The hook's steering of the fed (root) token at block position 0; the other `length` - 1
  positions (draft nodes, masks) unsteered."""
  steer = hook.steering(state)
  if steer is None:
    return None
  coef = jnp.pad(steer.coef[:, :1], ((0, 0), (0, length - 1)))
  return Steering(steer.vector, coef, steer.layer)


def observe_path(hook: StepHook, state: Any, logits: jax.Array, layer_hidden, owner_tokens,
                 path: jax.Array, committed: jax.Array, count: jax.Array) -> Any:
  """Runs `observe` for the committed tokens of a tree step, in order: token j (committed[:, j],
  j < count) was chosen from the logits at owner path[:, j], whose own token was fed.
  logits [B, O, V]; layer_hidden: per requested layer [B, T, D]; owner_tokens [B, O]."""
  at = lambda x: jnp.moveaxis(jnp.take_along_axis(x, path.reshape(path.shape + (1,) * (
      x.ndim - 2)), axis=1), 1, 0)
  xs = (at(logits), tuple(at(h) for h in layer_hidden), at(owner_tokens),
        jnp.moveaxis(committed, 1, 0), jnp.arange(path.shape[1])[:, None] < count[None, :])

  def one(hs, x):
    lg, hidden, fed, tok, active = x
    new = hook.observe(hs, lg, hidden, fed, tok, active)
    # Rows past their committed tokens keep their state whatever the hook does with inactive rows.
    keep = lambda n, o: jnp.where(active.reshape(active.shape + (1,) * (n.ndim - 1)), n, o)
    return jax.tree.map(keep, new, hs), None

  return jax.lax.scan(one, state, xs)[0]


class Strategy:
  """A decode-loop body. `block_size` is the most cache slots one step writes past the committed
  context; `max_step_tokens` the most tokens one step appends. `hooks`: the strategy applies a
  StepHook (it samples its first token with `sample_first` and commits through `tree_step` or as
  AutoRegressive does); `hook`: the hook it runs with (None: none)."""

  block_size: int = 1
  max_step_tokens: int = 1
  sampler: Sampler = GREEDY
  hooks: bool = False
  hook: StepHook | None = None

  def prefill(self, model: Transformer, state: DecodeState, key: jax.Array) -> DecodeState:
    logits, hidden, state = prefill_forward(model, state)
    return sample_first(state, logits, hidden, self.sampler, key)

  def step(self, model: Transformer, state: DecodeState, key: jax.Array) -> DecodeState:
    raise NotImplementedError

  def max_calls(self, max_new_tokens: int) -> int:
    """Loop steps `generate` allows for max_new_tokens (more where steps may commit nothing)."""
    return max_new_tokens

  def new_memory(self, cfg: ModelConfig) -> Any:
    """What one generation leaves to the next on the same engine (Token Recycling's successor
    table), empty, with a leading batch dimension of 1; None: nothing carries over. The engine puts
    it, broadcast to the batch, in `DecodeState.memory` before the prefill."""
    return None

  def leave_memory(self, state: DecodeState) -> Any:
    """The memory a finished generation leaves (shaped like new_memory's), from its final state."""
    return None

  def starter(self) -> "Strategy | None":
    """A strategy with this one's loop state (the same pytree and shapes) whose decode program
    loads faster, for `Engine.stream` to decode with while this one's loads; None: none."""
    return None

  def load_now(self, state: DecodeState) -> bool:
    """For a starter's state (on the host, between chunks): whether the full strategy's program is
    worth loading yet."""
    return True


@dataclasses.dataclass(frozen=True, eq=False)
class AutoRegressive(Strategy):
  """One token per forward, with an optional StepHook."""

  sampler: Sampler = GREEDY
  hook: StepHook | None = None
  hooks = True

  def step(self, model, state, key):
    hook = state.hook
    out = model(state.last[:, None], cache=state.cache,
                steering=None if hook is None else hook.steering(state.hook_state),
                hidden_layers=() if hook is None else hook.hidden_layers)
    state = state.replace(cache=out.cache, calls=state.calls + 1)
    return sample_next(state, out.logits[:, 0], tuple(h[:, 0] for h in out.layer_hidden),
                       state.last, self.sampler, key)


@dataclasses.dataclass(frozen=True, eq=False)
class Steered(Strategy):
  """`base` (a strategy with hooks = True, e.g. a tree strategy) run with `hook`."""

  base: Strategy
  hook: StepHook
  hooks = True

  def __post_init__(self):
    if not self.base.hooks:
      raise ValueError(f"{type(self.base).__name__} does not support step hooks (steering, "
                       "NoWait); use plain decoding or a tree strategy")
    if self.base.hook is not None:
      raise ValueError(f"{type(self.base).__name__} already runs with a hook")

  @property
  def block_size(self) -> int:
    return self.base.block_size

  @property
  def max_step_tokens(self) -> int:
    return self.base.max_step_tokens

  @property
  def sampler(self) -> Sampler:
    return self.base.sampler

  def prefill(self, model, state, key):
    return self.base.prefill(model, state, key)

  def step(self, model, state, key):
    return self.base.step(model, state, key)

  def max_calls(self, max_new_tokens: int) -> int:
    return self.base.max_calls(max_new_tokens)

  def new_memory(self, cfg):
    return self.base.new_memory(cfg)

  def leave_memory(self, state):
    return self.base.leave_memory(state)


def with_hook(strategy: Strategy, hook: StepHook | None) -> Strategy:
  """`strategy` run with `hook` (itself when hook is None)."""
  if hook is None:
    return strategy
  if type(strategy) is AutoRegressive and strategy.hook is None:
    return AutoRegressive(strategy.sampler, hook)
  return Steered(strategy, hook)


PLAIN_GREEDY = AutoRegressive()  # the default strategy


def _last_prompt_token(state: DecodeState) -> jax.Array:
  return jnp.take_along_axis(state.prompt, (state.prompt_len - 1)[:, None], axis=1)[:, 0]


def sample_next(state: DecodeState, logits: jax.Array, hidden: tuple[jax.Array, ...],
                fed: jax.Array, sampler: Sampler, key: jax.Array) -> DecodeState:
  """Sample a token per row from logits [B, V] (through the hook, which observes it) and append."""
  hook = state.hook
  if hook is None:
    return append_tokens(state, sampler(logits, key)[:, None], jnp.ones_like(state.length))
  tok = sampler(hook.process_logits(state.hook_state, logits), key)
  hs = hook.observe(state.hook_state, logits, hidden, fed, tok, ~state.done)
  return append_tokens(state.replace(hook_state=hs), tok[:, None], jnp.ones_like(state.length))


def sample_first(state: DecodeState, logits: jax.Array, hidden: tuple[jax.Array, ...],
                 sampler: Sampler, key: jax.Array) -> DecodeState:
  """After the prefill: start the hook's state and sample the first token from the logits at the
  last prompt token (`prefill_forward`'s outputs)."""
  if state.hook is not None:
    state = state.replace(hook_state=state.hook.init(state.last.shape[0]))
  return sample_next(state, logits, hidden, _last_prompt_token(state), sampler, key)


def prefill_forward(model: Transformer, state: DecodeState,
                    hidden_layers: tuple[int, ...] | None = None):
  """Forward the padded prompt into the empty cache.

  Returns the logits [B, V] and requested hidden states [B, D] at each row's last prompt token
  (default: the layers the state's hook asks for), and the state with the filled cache. Logits are
  computed for that one position only.
  """
  if hidden_layers is None:
    hidden_layers = () if state.hook is None else state.hook.hidden_layers
  b, p = state.prompt.shape
  valid = jnp.arange(p)[None, :] < state.prompt_len[:, None]
  # The prompt attends to itself alone (the cache is empty: attending over its slots too would cost
  # P x S more scores), then its K/V enter the cache.
  out = model(state.prompt, input_mask=valid, hidden_layers=hidden_layers, compute_logits=False)
  at_last = lambda h: jnp.take_along_axis(h, (state.prompt_len - 1)[:, None, None], axis=1)[:, 0]
  logits = model.logits(at_last(out.hidden))
  return (logits, tuple(at_last(h) for h in out.layer_hidden),
          state.replace(cache=commit(state.cache, out.block, state.prompt_len)))


def append_tokens(state: DecodeState, new: jax.Array, count: jax.Array) -> DecodeState:
  """Append the first count[b] of new[b] ([B, n]) to each active row.

  A row stops at its first EOS token (kept), at a completed stop sequence (kept) or at its limit;
  tokens after the stop point are not appended. `last` becomes the last appended token.
  """
  b, n = new.shape
  new = new.astype(jnp.int32)
  count = jnp.where(state.done, 0, jnp.minimum(count, state.limit - state.length))
  j = jnp.arange(n)[None, :]
  within = j < count[:, None]
  ends = within & (new[:, :, None] == state.eos[None, None, :]).any(axis=-1)
  tokens = jax.vmap(lambda row, upd, s: jax.lax.dynamic_update_slice_in_dim(row, upd, s, 0))(
      state.tokens, new, state.length)
  if state.stop.shape[0]:
    ends = ends | (within & _stop_hits(tokens, state.length, n, state.stop))
  first_end = jnp.where(ends.any(axis=1), jnp.argmax(ends, axis=1), n)
  stopped = first_end < count
  count = jnp.minimum(count, first_end + 1)
  length = state.length + count
  last = jnp.take_along_axis(new, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
  last = jnp.where(count > 0, last, state.last)
  done = state.done | stopped | (length >= state.limit)
  return state.replace(tokens=tokens, length=length, last=last, done=done)


def _stop_hits(tokens, length, n, stop):
  """[B, n]: whether the text ending at appended token j ends with one of the stop sequences."""
  ls = stop.shape[1]
  end = length[:, None] + jnp.arange(n)[None, :] + 1  # [B, n] exclusive end in the buffer
  idx = end[:, :, None] - ls + jnp.arange(ls)[None, None, :]  # [B, n, L]
  window = jnp.take_along_axis(tokens[:, None, :], jnp.clip(idx, 0, tokens.shape[1] - 1), axis=2)
  window = jnp.where(idx >= 0, window, -2)
  # Left padding (-1) matches anything; a real token must match exactly.
  match = (stop[None, None] == -1) | (window[:, :, None, :] == stop[None, None])
  before_start = (idx[:, :, None, :] < 0) & (stop[None, None] != -1)
  return (match & ~before_start).all(axis=-1).any(axis=-1)


def stop_array(stop_sequences: Sequence[Sequence[int]]) -> np.ndarray:
  """[n_stop, L] stop sequences, left-padded with -1 (an empty list gives [0, 1])."""
  seqs = [list(s) for s in stop_sequences if len(s)]
  if any(t < 0 for s in seqs for t in s):  # -1 pads: a stop of them would end every row at once
    raise ValueError(f"stop sequences hold token ids >= 0, got {[s for s in seqs if min(s) < 0]}")
  width = max((len(s) for s in seqs), default=1)
  arr = np.full((len(seqs), width), -1, np.int32)
  for i, s in enumerate(seqs):
    arr[i, width - len(s):] = s
  return arr


def init_state(cfg: ModelConfig, prompt, prompt_len, limit, rng: jax.Array, *, max_new_tokens: int,
               cache_len: int, eos, stop, strategy: Strategy, mesh=None,
               rules: ShardingRules = DEFAULT_RULES, ring_cache: bool = True) -> DecodeState:
  """A fresh DecodeState from arrays (host or traced): prompts [B, P] right-padded, prompt_len [B],
  limit [B] or scalar (<= max_new_tokens, which sizes the token buffer), eos [n_eos], stop [n, L].
  ring_cache: sliding-window layers keep window + the strategy's block slots, not cache_len."""
  b = prompt.shape[0]
  cache = KVCache.init(cfg, b, cache_len, block=strategy.block_size if ring_cache else None)
  shard = lambda xs, axes: tuple(constrain(x, axes, mesh, rules) for x in xs)
  return DecodeState(
      prompt=jnp.asarray(prompt, jnp.int32), prompt_len=jnp.asarray(prompt_len, jnp.int32),
      tokens=jnp.zeros((b, max_new_tokens + strategy.max_step_tokens), jnp.int32),
      length=jnp.zeros((b,), jnp.int32), last=jnp.zeros((b,), jnp.int32),
      cache=cache.replace(k=shard(cache.k, K_AXES), v=shard(cache.v, V_AXES)),
      done=jnp.zeros((b,), bool), limit=jnp.broadcast_to(jnp.asarray(limit, jnp.int32), (b,)),
      eos=jnp.asarray(eos, jnp.int32).reshape(-1), stop=jnp.asarray(stop, jnp.int32), rng=rng,
      calls=jnp.zeros((), jnp.int32), extra=())


def run_prefill(model: Transformer, strategy: Strategy, state: DecodeState) -> DecodeState:
  """The strategy's prefill; the state takes the strategy's hook here, inside the traced function,
  so that the state a compiled loop carries holds the hook of the strategy it was compiled for."""
  state = state.replace(hook=strategy.hook)
  return strategy.prefill(model, state, jax.random.fold_in(state.rng, 0))


def run_loop(model: Transformer, strategy: Strategy, state: DecodeState, until) -> DecodeState:
  """Strategy steps until every row is done or `until` forwards have run since the prefill."""

  def cond(s):
    return (~s.done.all()) & (s.calls < until)

  def body(s):
    return strategy.step(model, s, jax.random.fold_in(s.rng, s.calls + 1))

  return jax.lax.while_loop(cond, body, state)


def generate_arrays(model: Transformer, prompt: jax.Array, prompt_len: jax.Array, rng: jax.Array, *,
                    max_new_tokens: int, strategy: Strategy | None = None, mesh=None,
                    rules: ShardingRules = DEFAULT_RULES) -> tuple[jax.Array, jax.Array]:
  """Engine.generate as a pure, traceable function, for use inside a caller's jit with parameters
  that change between calls (no input checks; the model's EOS ids, no stop sequences).

  prompt [B, P] right-padded with lengths prompt_len [B]. Returns tokens [B, L] (L = max_new_tokens;
  cfg.pad_id after each row's end) and mask [B, L], True for generated tokens (EOS included).
  """
  strategy = strategy or PLAIN_GREEDY
  cfg = model.cfg
  cache_len = prompt.shape[1] + max_new_tokens + strategy.block_size
  state = init_state(cfg, prompt, prompt_len, max_new_tokens, rng, max_new_tokens=max_new_tokens,
                     cache_len=cache_len, eos=cfg.eos_ids, stop=stop_array(()), strategy=strategy,
                     mesh=mesh, rules=rules)
  state = run_loop(model, strategy, run_prefill(model, strategy, state), max_new_tokens)
  mask = jnp.arange(max_new_tokens)[None, :] < state.length[:, None]
  return jnp.where(mask, state.tokens[:, :max_new_tokens], cfg.pad_id), mask


def engine_functions(graphdef: nnx.GraphDef, strategy: Strategy):
  """The engine's two programs for one model graph and strategy, as functions of arrays only:
  prefill(params, state) -> state and decode(params, state, steps) -> state after at most `steps`
  more strategy steps (the limit computed inside, so advancing dispatches nothing else)."""

  def prefill(params, state):
    return run_prefill(nnx.merge(graphdef, params), strategy, state)

  def decode(params, state, steps):
    return run_loop(nnx.merge(graphdef, params), strategy, state, state.calls + steps)

  return prefill, decode


def jitted_programs(graphdef: nnx.GraphDef, strategy: Strategy):
  """`engine_functions` jitted, the decode state donated. `Engine` runs the same two (compiled
  ahead of time and stored, effjax/program_cache.py); `effjax plan` compiles them for a TPU
  topology."""
  prefill, decode = engine_functions(graphdef, strategy)
  return jax.jit(prefill, donate_argnums=1), jax.jit(decode, donate_argnums=1)


@dataclasses.dataclass
class GenerationResult:
  tokens: list[list[int]]  # generated tokens per row (the EOS / stop sequence included)
  prompt_tokens: list[int]
  model_calls: int  # decode forwards after the prefill
  prefill_s: float
  decode_s: float
  extra: Any = None  # the strategy's final state (counters), as numpy
  hook_state: Any = None  # the hook's final state, as numpy
  handed_over: int | None = None  # Engine.stream: forwards its starter ran before the strategy's
  # own program took over (None: no starter ran; model_calls: it never took over)
  hand_over_load: tuple[float, str] | None = None  # Engine.stream: seconds the hand-over spent
  # loading the strategy's program and how it came ("disk", "compiled" or "memory")

  @property
  def new_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def tokens_per_call(self) -> float:
    """Mean tokens appended per decode forward (tau; the prefill's first token not counted)."""
    return (max(len(t) for t in self.tokens) - 1) / max(self.model_calls, 1)


def fetch(tree):
  """Arrays to host numpy; across processes, each process gets the global values."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def cache_len_for(prompt_lens: Sequence[int], max_new_tokens: int, max_position: int, *,
                  multiple: int = 128) -> int:
  """A cache sized to the job: the longest prompt + max_new_tokens + 1, rounded up to `multiple`
  and capped at max_position. Every decode step attends over all cache slots, so an oversized cache
  costs time per token (SmolLM2 on CPU: 28.4 ms/token with 1024 slots, 24.5 with 512)."""
  need = max(prompt_lens) + max_new_tokens + 1
  return min(-(-need // multiple) * multiple, max_position)


def default_buckets(cache_len: int, smallest: int = 16) -> tuple[int, ...]:
  out, b = [], smallest
  while b < cache_len:
    out.append(b)
    b *= 2
  return tuple(out) + (cache_len,)


class Engine:
  """Jitted generation for one model. Compiled loops are cached per shape bucket and per strategy
  value (equal strategies share them; at most `max_strategies`, least recently used dropped)."""

  def __init__(self, model: Transformer, *, cache_len: int = 2048,
               eos_ids: Sequence[int] | None = None, mesh=None,
               rules: ShardingRules = DEFAULT_RULES, buckets: Sequence[int] | None = None,
               max_strategies: int = DEFAULT_MAX_STRATEGIES, fit_cache: bool = False,
               ring_cache: bool = True):
    """fit_cache: give each call a cache of its prompt bucket + max_new_tokens + the strategy's
    block, rounded up to 128 slots (at most cache_len), instead of cache_len slots: every step
    attends over all slots, so a job of short prompts runs faster, at one compile per bucket.
    ring_cache: sliding-window layers keep window + the strategy's block slots (see KVCache)."""
    cfg = model.cfg
    if cache_len > cfg.max_position:
      raise ValueError(f"cache_len {cache_len} exceeds the model's max_position {cfg.max_position}")
    self.cfg = cfg
    self.cache_len = cache_len
    self.eos_ids = tuple(cfg.eos_ids if eos_ids is None else eos_ids)
    self.mesh = mesh
    self.rules = rules
    self.buckets = tuple(sorted(buckets)) if buckets else default_buckets(cache_len)
    self.fit_cache = fit_cache
    self.ring_cache = ring_cache
    self.graphdef, params = nnx.split(model)
    if mesh is not None:
      params = jax.device_put(params, state_shardings(params, mesh, rules))
    self.params = params
    self._compiled = StrategyCache(max_strategies)
    # Per strategy, a one-item list: the memory its last finished generation left (new_memory).
    self._memory = StrategyCache(max_strategies)

  def check(self, prompts: Sequence[Sequence[int]], max_new_tokens,
            strategy: Strategy) -> np.ndarray:
    """The inputs' errors, raised before any compilation (every call checks them); the per-row
    limits."""
    if not prompts:
      raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise ValueError(f"prompt {i} is empty: give at least one token (e.g. the BOS token)")
      bad = [t for t in p if not 0 <= int(t) < self.cfg.vocab_size]
      if bad:
        raise ValueError(f"prompt {i} has token ids outside the vocabulary: {bad[:5]}")
    limits = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (len(prompts),))
    if (limits < 1).any():
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, (p, lim) in enumerate(zip(prompts, limits)):
      need = len(p) + int(lim) + strategy.block_size
      if need > self.cache_len:
        raise ValueError(
            f"prompt {i} has {len(p)} tokens; with max_new_tokens={int(lim)} and a block of "
            f"{strategy.block_size} it needs {need} cache slots, more than cache_len="
            f"{self.cache_len}. Shorten the prompt, lower max_new_tokens or raise cache_len.")
    return limits

  def _bucket(self, n: int) -> int:
    return next(b for b in self.buckets if b >= n)

  def _inputs(self, prompts, limits, stop: np.ndarray, seed: int, strategy: Strategy) -> tuple:
    """The init program's host inputs: prompts right-padded to their bucket, what sizes and ends
    each row, and the cache length (static, as max_new_tokens)."""
    p = self._bucket(max(len(x) for x in prompts))
    prompt = np.full((len(prompts), p), self.cfg.pad_id, np.int32)
    for i, x in enumerate(prompts):
      prompt[i, :len(x)] = x
    cache_len = self.cache_len
    if self.fit_cache:
      cache_len = min(cache_len, -(-(p + int(limits.max()) + strategy.block_size) // 128) * 128)
    return (prompt, np.asarray([len(x) for x in prompts], np.int32), np.asarray(limits, np.int32),
            np.int32(seed), np.asarray(self.eos_ids, np.int32), stop, int(limits.max()), cache_len)

  def _functions(self, strategy: Strategy):
    return self._compiled.get(strategy, self._programs)

  def _programs(self, strategy: Strategy):
    """(init, prefill, decode) for `strategy`: init builds the initial state from host arrays in
    one program (no per-array dispatch); prefill and decode are `engine_functions`."""
    cfg, ring_cache, mesh, rules = self.cfg, self.ring_cache, self.mesh, self.rules

    def init(prompt, prompt_len, limit, seed, eos, stop, max_new_tokens, cache_len):
      return init_state(cfg, prompt, prompt_len, limit, jax.random.key(seed),
                        max_new_tokens=max_new_tokens, cache_len=cache_len, eos=eos, stop=stop,
                        strategy=strategy, mesh=mesh, rules=rules, ring_cache=ring_cache)

    prefill, decode = engine_functions(self.graphdef, strategy)
    # Everything the programs close over, by value; a strategy holding arrays or other objects
    # (e.g. a steering hook) has no such description and its programs stay in this process.
    described = program_cache.describe(strategy)
    devices = None if mesh is None else (repr(mesh), mesh.device_ids.tolist())
    key = None if described is None else repr((cfg, repr(self.graphdef), ring_cache, devices,
                                               rules, described))
    return (program_cache.CachedJit(init, name="init", program_key=key, static_argnums=(6, 7)),
            program_cache.CachedJit(prefill, name="prefill", program_key=key, donate_argnums=(1,)),
            program_cache.CachedJit(decode, name="decode", program_key=key, donate_argnums=(1,)))

  def start(self, prompts, *, strategy: Strategy | None = None, max_new_tokens=256,
            stop_sequences: Sequence[Sequence[int]] = (), seed: int = 0,
            run: Strategy | None = None) -> DecodeState:
    """Check inputs, then prefill: the state holds the first generated token. run: the programs
    to start with (strategy's starter; default strategy's own)."""
    strategy = strategy or PLAIN_GREEDY
    limits = self.check(prompts, max_new_tokens, strategy)
    stop = stop_array(stop_sequences)
    init, prefill, _ = self._functions(run or strategy)
    state = init(*self._inputs(prompts, limits, stop, seed, strategy))
    memory = self._memory_of(strategy)[0]
    if memory is not None:
      # A copy per row: the prefill donates the state, and the engine keeps the memory until a
      # generation finishes (a start that is never decoded to the end leaves it as it was).
      rows = lambda x: jnp.array(jnp.broadcast_to(x, (len(prompts),) + x.shape[1:]))
      state = state.replace(memory=jax.tree.map(rows, memory))
    return prefill(self.params, state)

  def _memory_of(self, strategy: Strategy) -> list:
    return self._memory.get(strategy, lambda s: [s.new_memory(self.cfg)])

  def reset_memory(self) -> None:
    """Forget what earlier generations left (e.g. Token Recycling's successor tables)."""
    self._memory = StrategyCache(self._memory.max_size)

  def advance(self, state: DecodeState, strategy: Strategy, steps: int) -> DecodeState:
    """Run up to `steps` more loop iterations (fewer if every row is done)."""
    *_, decode = self._functions(strategy)
    return decode(self.params, state, np.int32(steps))

  def generate(self, prompts: Sequence[Sequence[int]], *, strategy: Strategy | None = None,
               max_new_tokens=256, stop_sequences: Sequence[Sequence[int]] = (),
               seed: int = 0) -> GenerationResult:
    strategy = strategy or PLAIN_GREEDY
    t0 = time.perf_counter()
    state = self.start(prompts, strategy=strategy, max_new_tokens=max_new_tokens,
                       stop_sequences=stop_sequences, seed=seed)
    jax.block_until_ready(state.length)
    t1 = time.perf_counter()
    state = self.advance(state, strategy, strategy.max_calls(int(state.limit.max())))
    jax.block_until_ready(state.length)
    t2 = time.perf_counter()
    return self._result(state, strategy, prompts, t1 - t0, t2 - t1)

  def stream(self, prompts, *, strategy: Strategy | None = None, max_new_tokens=256,
             stop_sequences=(), seed: int = 0, chunk: int = 8, hand_over: bool = True
             ) -> Generator[list[list[int]], None, GenerationResult]:
    """Yield each row's newly generated tokens every `chunk` loop steps (one host trip per chunk).

    hand_over: where the strategy has a starter (`Strategy.starter`) and its own decode program is
    not loaded in this process yet, decode with the starter until its state says the strategy's
    program is worth loading (`Strategy.load_now`), then load it and go on with it from the same
    state (GenerationResult.handed_over). A strategy whose program is slow to load (auto's) then
    costs nothing where it would not pay.

    The generator's return value is the GenerationResult: prefill_s covers the prefill and loading
    or compiling the loop's programs, decode_s the loop (host trips included)."""
    strategy = strategy or PLAIN_GREEDY
    starter = strategy.starter() if hand_over and not self.loaded(strategy) else None
    run = starter or strategy
    t0 = time.perf_counter()
    state = self.start(prompts, strategy=strategy, max_new_tokens=max_new_tokens,
                       stop_sequences=stop_sequences, seed=seed, run=run)
    state = self.advance(state, run, 0)  # compiles the loop before decoding is timed
    jax.block_until_ready(state.length)
    t1 = time.perf_counter()
    sent = np.zeros(len(prompts), np.int64)
    handed_over, load_s, load = None, 0.0, None
    while True:
      tokens, length, done, calls = fetch((state.tokens, state.length, state.done, state.calls))
      yield [tokens[i, sent[i]:length[i]].tolist() for i in range(len(prompts))]
      sent = length.astype(np.int64)
      if done.all():
        break
      if run is starter and starter.load_now(state):
        t, seen = time.perf_counter(), len(program_cache.events)
        run, handed_over = strategy, int(calls)
        state = self.advance(state, run, 0)  # loads its programs
        jax.block_until_ready(state.length)
        load_s = time.perf_counter() - t
        sources = {e.source for e in program_cache.events[seen:]}
        load = (load_s, "compiled" if "compiled" in sources else "disk" if sources else "memory")
      state = self.advance(state, run, chunk)
    if starter is not None and handed_over is None:
      handed_over = int(calls)
    return self._result(state, strategy, prompts, t1 - t0 + load_s,
                        time.perf_counter() - t1 - load_s, handed_over=handed_over,
                        hand_over_load=load)

  def loaded(self, strategy: Strategy) -> bool:
    """Whether a decode program of `strategy` is loaded in this process."""
    return self._functions(strategy)[2].cache_size() > 0

  def _result(self, state, strategy, prompts, prefill_s, decode_s, handed_over: int | None = None,
              hand_over_load: tuple[float, str] | None = None) -> GenerationResult:
    box = self._memory_of(strategy)
    if box[0] is not None:
      box[0] = strategy.leave_memory(state)
    tokens, length, calls, extra, hook_state = fetch(
        (state.tokens, state.length, state.calls, state.extra, state.hook_state))
    return GenerationResult(tokens=[tokens[i, :length[i]].tolist() for i in range(len(prompts))],
                            prompt_tokens=[len(p) for p in prompts], model_calls=int(calls),
                            prefill_s=prefill_s, decode_s=decode_s, extra=extra,
                            hook_state=hook_state, handed_over=handed_over,
                            hand_over_load=hand_over_load)
