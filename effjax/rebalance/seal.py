"""SEAL (Chen et al., COLM 2025) in the ReBalance harness: a fixed-strength steering vector.

Offline (REASONING_BASELINES.md section 1): every thought of the calibration traces is labelled
reflection, transition or execution from its text, and v = mean(reflection and transition features)
- mean(execution features), the residual stream entering decoder layer L at the delimiter that opens
the thought. The features are the ones ReBalance's extraction already stores (the same anchors,
every layer), so one calibration run gives both profiles. The text before the first delimiter opens
no thought and is not used.

Online: at every delimiter inside the thinking span, strength * v is added to the residual stream
entering layer L at that position (the authors' default strength is -1: the step moves towards
execution, away from reflection and transition), nothing else. Delimiters are the harness's (a
token containing "\\n\\n", or a "\\n"-token pair for tokenizers that split it); for the R1 and Qwen
tokenizers these are SEAL's own "any token containing ĊĊ".

Differences from the authors' set-up: their 1,000 traces are the first 500 correct and 500
incorrect greedy MATH-train generations; this harness takes every trace of the calibration set
(it does not grade calibration problems).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from effjax.decoding.engine import StepHook
from effjax.models.transformer import Steering
from effjax.rebalance.confidence import next_in_span

REFLECTION_PREFIX = "wait"
REFLECTION_MARKS = ("verify", "make sure", "hold on", "think again", "'s correct", "'s incorrect",
                    "let me check", "seems right")
TRANSITION_PREFIX = "alternatively"
# "think differenly" is the authors' code's spelling (so "differently" never matches).
TRANSITION_MARKS = ("think differenly", "another way", "another approach", "another method",
                    "another solution", "another strategy", "another technique")
EXECUTION, TRANSITION, REFLECTION = 0, 1, 2
DEFAULT_STRENGTH = -1.0


def thought_kind(text: str) -> int:
  """SEAL's label of one thought (reflection is tested first; case-insensitive)."""
  t = text.strip().lower()
  if t.startswith(REFLECTION_PREFIX) or any(m in t for m in REFLECTION_MARKS):
    return REFLECTION
  if t.startswith(TRANSITION_PREFIX) or any(m in t for m in TRANSITION_MARKS):
    return TRANSITION
  return EXECUTION


@dataclasses.dataclass(frozen=True)
class SealVector:
  """v [D] (fp32, unnormalised: the strength is tied to its norm), the layer whose input it steers,
  the strength c, and the thought counts it was built from (extract.build_profile makes it)."""

  vector: np.ndarray
  layer: int
  strength: float = DEFAULT_STRENGTH
  counts: dict[str, int] = dataclasses.field(default_factory=dict)


def seal_labels(problems) -> tuple[np.ndarray, dict[str, int]]:
  """Per calibration step (CalibrationStore.problems order): 1 reflection or transition thought,
  0 execution, -1 unused (a problem's first step, which no delimiter opens); and the counts."""
  kinds = np.array([thought_kind(t) for p in problems for t in p["text"]], np.int8)
  used = np.array([j > 0 for p in problems for j in range(len(p["text"]))], bool)
  labels = np.where(used, (kinds != EXECUTION).astype(np.int8), -1).astype(np.int8)
  counts = {name: int((used & (kinds == k)).sum())
            for name, k in (("reflection", REFLECTION), ("transition", TRANSITION),
                            ("execution", EXECUTION))}
  return labels, counts


@struct.dataclass
class SealState:
  in_span: jax.Array  # [B] inside the thinking span after the last sampled token
  prev_newline: jax.Array  # [B] the last sampled token ends with "\n"
  coef: jax.Array  # [B] strength for the forward that feeds the last sampled token
  steered: jax.Array  # [B] positions steered so far


@dataclasses.dataclass(frozen=True, eq=False)
class SealHook(StepHook):
  """SEAL steering: strength * vector at every delimiter inside the thinking span.

  delimiters: steering.Delimiters; think_open/think_close: the span's tags (None: the whole response
  is the span); starts_in_span: the prompt opened the span.
  """

  seal: SealVector
  delimiters: object
  think_open: int | None = None
  think_close: int | None = None
  starts_in_span: bool = True

  def init(self, batch: int) -> SealState:
    return SealState(in_span=jnp.full((batch,), self.starts_in_span),
                     prev_newline=jnp.zeros((batch,), bool), coef=jnp.zeros((batch,), jnp.float32),
                     steered=jnp.zeros((batch,), jnp.int32))

  def steering(self, state: SealState) -> Steering:
    return Steering(jnp.asarray(self.seal.vector), state.coef[:, None], self.seal.layer)

  def observe(self, state: SealState, logits, layer_hidden, fed, sampled, active) -> SealState:
    delim = self.delimiters.is_delimiter(state.prev_newline, sampled) & active
    in_span = next_in_span(state.in_span, sampled, active, self.think_open, self.think_close)
    steer = delim & in_span
    return SealState(
        in_span=in_span,
        prev_newline=jnp.where(active, jnp.asarray(self.delimiters.ends)[sampled],
                               state.prev_newline),
        coef=jnp.where(steer, jnp.float32(self.seal.strength), 0.0),
        steered=state.steered + steer.astype(jnp.int32))

  def barrier(self, state: SealState, tokens, parent_tokens):
    return self.delimiters.barrier(state.in_span, tokens, parent_tokens, self.think_open)
