"""Online ReBalance inside the engine: a StepHook that tracks step confidence and steers.

After each forward the hook sees the logits and the token sampled from them. It runs the
confidence tracker on that token (`confidence.update`); when the token is a step delimiter inside
the thinking span, the forward that feeds it adds alpha * S to the residual stream entering layer L
at that one position (`steering`). Later tokens see the steered state through the KV cache.

Delimiters: a token whose text contains "\\n\\n", or a token starting with "\\n" right after one
ending with "\\n" (tokenizers such as SmolLM2's emit a paragraph break as two "\\n" tokens). Every
delimiter token is steered; the second of two in a row closes no step and reuses the last alpha.

With `trace_len` > 0 the hook also records, per generated token, the applied and computed alpha and
the c, v and token count of the step it closes; `step_trace` turns that into one record per step.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from effjax.decoding.engine import StepHook
from effjax.models.transformer import Steering
from effjax.rebalance import confidence
from effjax.rebalance.confidence import TrackerConfig, TrackerState

NEWLINE = "\n"


def token_texts(tokenizer, vocab_size: int) -> list[str]:
  """Decoded text of every token id below vocab_size ("" for ids past the tokenizer's vocabulary,
  e.g. padded embedding rows)."""
  size = min(vocab_size, len(tokenizer))
  return list(tokenizer.batch_decode([[i] for i in range(size)])) + [""] * (vocab_size - size)


@dataclasses.dataclass(frozen=True, eq=False)
class Delimiters:
  """Per-token [V] bool masks that locate step delimiters."""

  inside: np.ndarray  # the token's text contains "\n\n"
  ends: np.ndarray  # ... ends with "\n"
  starts: np.ndarray  # ... starts with "\n"

  @classmethod
  def from_texts(cls, texts: Sequence[str], delimiter: str = confidence.DELIMITER) -> "Delimiters":
    return cls(inside=np.array([delimiter in t for t in texts], bool),
               ends=np.array([t.endswith(NEWLINE) for t in texts], bool),
               starts=np.array([t.startswith(NEWLINE) for t in texts], bool))

  @classmethod
  def from_tokenizer(cls, tokenizer, vocab_size: int) -> "Delimiters":
    return cls.from_texts(token_texts(tokenizer, vocab_size))

  def is_delimiter(self, prev_ends_newline: jax.Array, token: jax.Array) -> jax.Array:
    return jnp.asarray(self.inside)[token] | (prev_ends_newline & jnp.asarray(self.starts)[token])

  def barrier(self, in_span: jax.Array, tokens: jax.Array, parent_tokens: jax.Array,
              think_open: int | None) -> jax.Array:
    """[B, O] the tree nodes a steering hook must not accept (StepHook.barrier): delimiters while
    the span is open (feeding them would be steered), and the open tag while it is closed (the
    delimiters after it would be). in_span [B] at the start of the step."""
    delim = self.is_delimiter(jnp.asarray(self.ends)[parent_tokens], tokens)
    out = delim & in_span[:, None]
    if think_open is not None:
      out = out | ((tokens == think_open) & ~in_span[:, None])
    return out


@struct.dataclass
class StepTrace:
  """Per generated token j, each [B, N]: whether it is a delimiter, the alpha applied when feeding
  it, the alpha computed at the step it closes, and that step's c, v and token count (meaningful
  where closed)."""

  delimiter: jax.Array
  applied: jax.Array
  alpha: jax.Array
  closed: jax.Array
  c: jax.Array
  v: jax.Array
  tokens: jax.Array

  @classmethod
  def zeros(cls, batch: int, length: int) -> "StepTrace":
    f = lambda dtype: jnp.zeros((batch, length), dtype)
    return cls(delimiter=f(bool), applied=f(jnp.float32), alpha=f(jnp.float32), closed=f(bool),
               c=f(jnp.float32), v=f(jnp.float32), tokens=f(jnp.int32))


@struct.dataclass
class SteerState:
  tracker: TrackerState
  coef: jax.Array  # [B] alpha for the forward that feeds the last sampled token
  prev_newline: jax.Array  # [B] the last sampled token ends with "\n"
  position: jax.Array  # [B] tokens observed per row (index into the trace)
  trace: StepTrace | None


@dataclasses.dataclass(frozen=True, eq=False)
class ReBalanceHook(StepHook):
  """ReBalance steering for `AutoRegressive(sampler, hook=ReBalanceHook(...))`.

  vector: S [D]; tracker: the constants (layer L included) and settings; starts_in_span: whether
  generation starts inside the thinking span (the chat template opened it, or the model has no think
  tags and the whole response is the span); trace_len: tokens to trace per row (0 = no trace).
  """

  vector: np.ndarray
  tracker: TrackerConfig
  delimiters: Delimiters
  starts_in_span: bool = True
  trace_len: int = 0

  def init(self, batch: int) -> SteerState:
    return SteerState(
        tracker=confidence.init_state(self.tracker, batch, jnp.full((batch,), self.starts_in_span)),
        coef=jnp.zeros((batch,), jnp.float32), prev_newline=jnp.zeros((batch,), bool),
        position=jnp.zeros((batch,), jnp.int32),
        trace=StepTrace.zeros(batch, self.trace_len) if self.trace_len else None)

  def steering(self, state: SteerState) -> Steering:
    return Steering(jnp.asarray(self.vector), state.coef[:, None], self.tracker.constants.layer)

  def barrier(self, state: SteerState, tokens, parent_tokens):
    return self.delimiters.barrier(state.tracker.in_span, tokens, parent_tokens,
                                   self.tracker.think_open_id)

  def observe(self, state: SteerState, logits, layer_hidden, fed, sampled, active) -> SteerState:
    is_delim = self.delimiters.is_delimiter(state.prev_newline, sampled)
    tracker, signal = confidence.update(state.tracker, logits, sampled, jnp.asarray(
        self.delimiters.inside), self.tracker, active, is_delimiter=is_delim)
    trace = state.trace
    if trace is not None:
      rows = jnp.arange(sampled.shape[0])
      at = jnp.minimum(state.position, self.trace_len - 1)
      put = lambda buf, x: buf.at[rows, at].set(jnp.where(active, x, buf[rows, at]))
      trace = StepTrace(delimiter=put(trace.delimiter, is_delim),
                        applied=put(trace.applied, signal.alpha),
                        alpha=put(trace.alpha, jnp.where(signal.closed, tracker.alpha, 0.0)),
                        closed=put(trace.closed, signal.closed), c=put(trace.c, signal.c),
                        v=put(trace.v, signal.v), tokens=put(trace.tokens, signal.tokens))
    return SteerState(
        tracker=tracker, coef=signal.alpha,
        prev_newline=jnp.where(active, jnp.asarray(self.delimiters.ends)[sampled],
                               state.prev_newline),
        position=state.position + active.astype(jnp.int32), trace=trace)


def step_trace(tokens: Sequence[int], trace: StepTrace, row: int, decode) -> list[dict]:
  """One record per closed step of one row: its index, the delimiter token's index in the
  response, c, v, computed and applied alpha, the step's token count and text (from the token after
  the previous delimiter through this one)."""
  n = min(len(tokens), trace.closed.shape[1])
  out, start = [], 0
  for j in np.nonzero(np.asarray(trace.delimiter[row, :n]))[0]:
    if trace.closed[row, j]:
      out.append({"step": len(out), "token": int(j), "c": float(trace.c[row, j]),
                  "v": float(trace.v[row, j]), "alpha": float(trace.alpha[row, j]),
                  "applied": float(trace.applied[row, j]), "tokens": int(trace.tokens[row, j]),
                  "text": decode(list(tokens[start:j + 1])).strip()})
    start = int(j) + 1
  return out


def write_trace(path: str | Path, problem_id: str, steps: Sequence[dict], mode: str = "a"):
  """Appends one JSONL line per step, tagged with the problem id."""
  with open(path, mode) as f:
    for s in steps:
      f.write(json.dumps({"problem": problem_id, **s}) + "\n")


def read_trace(path: str | Path, problem_id: str | None = None) -> tuple[str, list[dict]]:
  """The steps of one problem in a trace file (the first problem when problem_id is None)."""
  rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
  if not rows:
    raise ValueError(f"{path}: no steps traced")
  problem_id = rows[0]["problem"] if problem_id is None else problem_id
  steps = [r for r in rows if r["problem"] == problem_id]
  if not steps:
    raise ValueError(f"{path}: no steps for problem {problem_id!r}")
  return problem_id, steps


def plot_trace(steps: Sequence[dict], path: str | Path, title: str = ""):
  """Confidence c, variance v (right axis) and alpha over the steps of one problem, saved to
  `path`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  x = [s["step"] for s in steps]
  fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
  top.plot(x, [s["c"] for s in steps], marker="o", color="tab:blue")
  top.set_ylabel("confidence c", color="tab:blue")
  right = top.twinx()  # v is orders of magnitude smaller than c
  right.plot(x, [s["v"] for s in steps], marker=".", linestyle="--", color="tab:orange")
  right.set_ylabel("variance v", color="tab:orange")
  bottom.bar(x, [s["alpha"] for s in steps], color=["tab:red" if s["alpha"] < 0 else "tab:green"
                                                    for s in steps])
  bottom.axhline(0.0, color="black", linewidth=0.5)
  bottom.set_ylabel("alpha")
  bottom.set_xlabel("step")
  if title:
    top.set_title(title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
