"""Online step bookkeeping for ReBalance: a jittable per-token update over a batch of rows.

Call `update` once per decoded token, between sampling it and feeding it to the model:

  state = init_state(cfg, batch, prompt_tokens, prompt_mask)
  loop:
    token = sample(logits)                                  # logits [B, V] that produced token
    state, sig = update(state, logits, token, delimiter_mask, cfg, active)
    model(token, steering=Steering(S, sig.alpha[:, None], cfg.constants.layer))
    logits = ...

Each token carries the confidence p_max of the distribution it was sampled from (temperature 1,
before top-p/top-k). A non-delimiter token adds it to its step's running statistic; a delimiter
token closes the step (if the step has tokens): c is its mean (the profile's statistic: geometric,
exp(mean log p_max), as the paper and the extraction; or arithmetic, the authors' decoding code),
v the variance of the last W step
confidences, alpha = control(c, v). The delimiter is then fed with alpha * S added at layer L when
it lies inside the thinking span. A delimiter that closes no step (e.g. two in a row) reuses the
last alpha (`initial_alpha` before the first step).

Variance over a window W: the population variance (ddof 0) of the last min(W, n) step
confidences including the current one, where n is the number of steps closed so far. W = 2 is the
authors' (c - c_prev)^2 / 4, and 0 for the first step.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from effjax.rebalance.control import ReBalanceConstants, alpha, solve_k

DELIMITER = "\n\n"
# Step confidence statistics: the paper's geometric mean of p_max (the default, used by calibration
# and decoding alike) and the authors' decoding code's arithmetic mean. A profile records the one
# its quartiles were computed with, and decoding must use the same (ReBalanceProfile.tracker_config).
STATISTICS = ("geometric", "arithmetic")
DEFAULT_STATISTIC = "geometric"


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
  """Static settings of the online bookkeeping (hashable: usable as a jit static argument).

  mean: the step confidence statistic, "geometric" (paper: exp(mean log p_max), default) or
    "arithmetic" (authors' decoding code); it must be the one the constants were calibrated with.
  think_open_id/think_close_id: the thinking span's tags; both None: the whole response is the span.
  """

  constants: ReBalanceConstants
  k: float
  mean: Literal["geometric", "arithmetic"] = DEFAULT_STATISTIC
  window: int = 2
  think_open_id: int | None = None
  think_close_id: int | None = None
  initial_alpha: float = 0.0

  def __post_init__(self):
    if self.mean not in STATISTICS:
      raise ValueError(f"mean must be one of {STATISTICS}, got {self.mean!r}")
    if self.window < 1:
      raise ValueError(f"window must be >= 1, got {self.window}")
    if (self.think_open_id is None) != (self.think_close_id is None):
      raise ValueError("give both think_open_id and think_close_id, or neither")

  @classmethod
  def create(cls, constants: ReBalanceConstants, **kw) -> "TrackerConfig":
    """Solves k for `constants` on the host."""
    return cls(constants=constants, k=solve_k(constants), **kw)

  @property
  def whole_response(self) -> bool:
    return self.think_open_id is None


@struct.dataclass
class TrackerState:
  """Per-row running statistics, all with a leading [B] dim.

  total/count: sum of p_max (or log p_max) and token count of the open step.
  history: the last `window` step confidences, most recent last (valid where steps says so).
  steps: number of steps closed so far. in_span: inside the thinking span.
  alpha: the last computed alpha.
  """

  total: jax.Array
  count: jax.Array
  history: jax.Array
  steps: jax.Array
  in_span: jax.Array
  alpha: jax.Array


@struct.dataclass
class StepSignal:
  """What `update` reports for the fed token, each [B].

  alpha: steering coefficient at this position (0 unless a delimiter inside the span).
  closed: a step was closed here; c, v, tokens (its token count) are meaningful only there.
  """

  alpha: jax.Array
  closed: jax.Array
  c: jax.Array
  v: jax.Array
  tokens: jax.Array


def span_from_prompt(cfg: TrackerConfig, prompt_tokens: jax.Array,
                     prompt_mask: jax.Array | None = None) -> jax.Array:
  """[B] bool: whether generation starts inside the thinking span (prompt ends after an open tag,
  e.g. R1 chat templates ending in "<think>\\n")."""
  b = prompt_tokens.shape[0]
  if cfg.whole_response:
    return jnp.ones((b,), bool)
  valid = jnp.ones(prompt_tokens.shape, bool) if prompt_mask is None else prompt_mask.astype(bool)
  idx = jnp.arange(prompt_tokens.shape[1])
  last = lambda tag: jnp.max(jnp.where(valid & (prompt_tokens == tag), idx, -1), axis=1)
  return last(cfg.think_open_id) > last(cfg.think_close_id)


def init_state(cfg: TrackerConfig, batch: int, in_span: jax.Array | None = None) -> TrackerState:
  """Fresh state. in_span [B] (see span_from_prompt); default: the whole-response setting."""
  if in_span is None:
    in_span = jnp.full((batch,), cfg.whole_response)
  return TrackerState(
      total=jnp.zeros((batch,), jnp.float32),
      count=jnp.zeros((batch,), jnp.int32),
      history=jnp.zeros((batch, cfg.window), jnp.float32),
      steps=jnp.zeros((batch,), jnp.int32),
      in_span=jnp.asarray(in_span, bool),
      alpha=jnp.full((batch,), cfg.initial_alpha, jnp.float32),
  )


def window_variance(history: jax.Array, n: jax.Array) -> jax.Array:
  """Population variance of the last min(W, n) entries of history [B, W] (most recent last)."""
  w = history.shape[1]
  used = (jnp.arange(w)[None, :] >= (w - jnp.minimum(n, w))[:, None]).astype(jnp.float32)
  size = jnp.maximum(used.sum(axis=1), 1.0)
  mean = (history * used).sum(axis=1) / size
  return (((history - mean[:, None]) ** 2) * used).sum(axis=1) / size


def next_in_span(in_span: jax.Array, token: jax.Array, active: jax.Array, think_open: int | None,
                 think_close: int | None) -> jax.Array:
  """[B] whether the thinking span is open after `token` (unchanged without think tags)."""
  if think_open is None:
    return in_span
  in_span = jnp.where(active & (token == think_open), True, in_span)
  return jnp.where(active & (token == think_close), False, in_span)


def update(state: TrackerState, logits: jax.Array, fed_token: jax.Array, delimiter_mask: jax.Array,
           cfg: TrackerConfig, active: jax.Array | None = None,
           is_delimiter: jax.Array | None = None) -> tuple[TrackerState, StepSignal]:
  """One token of bookkeeping.

  logits [B, V]: the distribution fed_token [B] was sampled from. delimiter_mask [V] bool.
  active [B] (default all): rows that really decode this token; the others keep their state and get
  alpha 0. is_delimiter [B] (optional) replaces delimiter_mask[fed_token], for delimiters that span
  two tokens ("\n" "\n" in tokenizers that split the pair).
  """
  b = fed_token.shape[0]
  active = jnp.ones((b,), bool) if active is None else active.astype(bool)
  logits = logits.astype(jnp.float32)
  log_pmax = jnp.max(logits, axis=-1) - jax.nn.logsumexp(logits, axis=-1)
  conf = jnp.exp(log_pmax) if cfg.mean == "arithmetic" else log_pmax

  is_delim = (delimiter_mask[fed_token] if is_delimiter is None else is_delimiter) & active
  closes = is_delim & (state.count > 0)
  mean = state.total / jnp.maximum(state.count, 1).astype(jnp.float32)
  c = jnp.clip(mean if cfg.mean == "arithmetic" else jnp.exp(mean), 0.0, 1.0)
  history = jnp.where(closes[:, None],
                      jnp.concatenate([state.history[:, 1:], c[:, None]], axis=1), state.history)
  steps = state.steps + closes.astype(jnp.int32)
  v = window_variance(history, steps)
  new_alpha = jnp.where(closes, alpha(c, v, cfg.constants, cfg.k), state.alpha)
  applied = jnp.where(is_delim & state.in_span, new_alpha, 0.0)

  grow = active & ~is_delim
  total = jnp.where(is_delim, 0.0, state.total + jnp.where(grow, conf, 0.0))
  count = jnp.where(is_delim, 0, state.count + grow.astype(jnp.int32))
  in_span = next_in_span(state.in_span, fed_token, active, cfg.think_open_id, cfg.think_close_id)
  new_state = TrackerState(total=total, count=count, history=history, steps=steps,
                           in_span=in_span, alpha=new_alpha)
  signal = StepSignal(alpha=applied, closed=closes, c=c, v=v, tokens=state.count)
  return new_state, signal


def delimiter_mask(tokenizer, vocab_size: int, delimiter: str = DELIMITER) -> np.ndarray:
  """[vocab_size] bool: token ids whose decoded text contains `delimiter`.

  tokenizer: anything with decode(list[int]) -> str (a `tokenizers.Tokenizer` or a transformers
  tokenizer). Ids past the tokenizer's vocabulary (padded embedding rows) are never delimiters.
  """
  size = min(vocab_size, tokenizer.get_vocab_size() if hasattr(tokenizer, "get_vocab_size")
             else len(tokenizer))
  mask = np.zeros((vocab_size,), bool)
  for i in range(size):
    mask[i] = delimiter in tokenizer.decode([i])
  return mask
