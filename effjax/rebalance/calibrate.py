"""Offline ReBalance extraction on a real model, end to end (`effjax rebalance extract`).

1. Greedy generations for the calibration problems through the engine, in batches.
2. A teacher-forced forward over prompt + generation gives each generated token's probability and
   the residual stream entering every layer; both are reduced inside the compiled function to what
   the store keeps (per-token log p, hidden states at the step anchors), so no [T, V] or
   [layers, T, D] array reaches the host.
3. Steps, their confidences and the hidden states go to the CalibrationStore on disk, one problem
   at a time; a store that already holds problems resumes after them.
4. `build_profile` computes quartiles, labels, the layer and S; the profile records the model id.

Where the hidden states are read: at each step's anchor, the token holding the end of the
delimiter before the step (the last prompt token or think tag for the span's first step). That is
the position the online hook steers (the forward that feeds a delimiter) and the one whose output
predicts the step's first token; SEAL, which ReBalance builds on, reads its "\\n\\n" positions the
same way. REBALANCE.md's "first token of each step (the position after a delimiter)" is one
position later; extraction and steering use the same position so that S is added where it was
measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.checkpoints.registry import LoadedModel
from effjax.data.records import Problem
from effjax.decoding.engine import Engine, cache_len_for
from effjax.rebalance import extract as ex
from effjax.rebalance.disjoint import ProblemSet, require_disjoint, shingles
from effjax.rebalance.prompts import encode_problem, eos_ids, think_tag_ids

SEQ_BUCKET = 128  # teacher-forced lengths round up to this (fewer compiled shapes)
STEP_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Calibration:
  """One generation, cut into the steps of its thinking span."""

  prompt: list[int]
  response: list[int]  # without a trailing EOS
  steps: list[ex.Step]  # token indices relative to the span start
  span_start: int  # index of the span's first token in the response

  def anchors(self) -> list[int]:
    """Positions of the steps' anchors in prompt + response."""
    base = len(self.prompt) + self.span_start
    return [base + s.anchor for s in self.steps]


def cut_steps(tokenizer, prompt: Sequence[int], response: Sequence[int], eos: Sequence[int]
              ) -> Calibration:
  response = list(response)
  while response and response[-1] in eos:
    response.pop()
  open_id, close_id = think_tag_ids(tokenizer)
  start, end = ex.thinking_range(response, open_id, close_id) if open_id is not None else (
      0, len(response))
  pieces = tokenizer.batch_decode([[t] for t in response[start:end]])
  return Calibration(list(prompt), response, ex.split_steps(pieces), start)


def _round_up(n: int, to: int) -> int:
  return max(to, -(-n // to) * to)


def teacher_forced(model) -> Callable:
  """fn(tokens [B, T], valid [B, T], anchors [B, K]) -> (log p of each next token [B, T - 1],
  hidden states entering every layer at the anchors [num_layers, B, K, D]), jitted."""
  graphdef, params = nnx.split(model)
  layers = tuple(range(model.cfg.num_layers))

  @jax.jit
  def run(params, tokens, valid, anchors):
    m = nnx.merge(graphdef, params)
    out = m(tokens, input_mask=valid, hidden_layers=layers, compute_logits=False)
    at = lambda h: jnp.take_along_axis(h, anchors[:, :, None], axis=1)
    hidden = jnp.stack([at(h) for h in out.layer_hidden])

    def row_logp(xs):  # one row at a time: the [T, V] logits of a whole batch need not fit
      h, nxt = xs
      logits = m.logits(h[:-1])
      return jnp.take_along_axis(logits, nxt[:, None], axis=1)[:, 0] - jax.nn.logsumexp(
          logits, axis=-1)

    return jax.lax.map(row_logp, (out.hidden, tokens[:, 1:])), hidden

  return lambda tokens, valid, anchors: run(params, tokens, valid, anchors)


def measure(forward: Callable, items: Sequence[Calibration], pad_id: int, rows: int = 0,
            statistic: str = ex.DEFAULT_STATISTIC) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per item: step confidences c [n] (of `statistic`) and hidden states [num_layers, n, D] at the
  anchors. The batch is padded to `rows` rows (a fixed shape for every batch)."""
  t = _round_up(max(len(x.prompt) + len(x.response) for x in items), SEQ_BUCKET)
  k = _round_up(max(len(x.steps) for x in items), STEP_BUCKET)
  b = max(rows, len(items))
  tokens = np.full((b, t), pad_id, np.int32)
  valid = np.zeros((b, t), bool)
  anchors = np.zeros((b, k), np.int32)
  for i, x in enumerate(items):
    seq = x.prompt + x.response
    tokens[i, :len(seq)] = seq
    valid[i, :len(seq)] = True
    anchors[i, :len(x.steps)] = x.anchors()
  logp, hidden = jax.device_get(forward(tokens, valid, anchors))
  out = []
  for i, x in enumerate(items):
    first = len(x.prompt) - 1 + x.span_start  # logp[j] is the probability of token j + 1
    span_logp = logp[i, first:first + len(x.response) - x.span_start]
    out.append((ex.step_confidences(span_logp, x.steps, statistic), hidden[:, i, :len(x.steps)]))
  return out


def fill_store(loaded: LoadedModel, problems: Sequence[Problem], store: ex.CalibrationStore, *,
               max_new_tokens: int, batch_size: int, cache_len: int | None = None,
               disjoint_from: dict[str, ProblemSet] | None = None, mesh=None,
               log: Callable[[str], None] = print) -> None:
  """Generates, measures and appends every problem the store does not hold yet.

  disjoint_from: evaluation sets by name; a calibration problem equal or close to one of theirs is
  refused (disjoint.require_disjoint) before anything is generated. mesh: the model's mesh (its
  parameters already sharded on it, e.g. load_model(..., mesh=mesh)).
  """
  calibration = ProblemSet.of([p.prompt for p in problems], [p.id for p in problems])
  for name, evaluation in (disjoint_from or {}).items():
    require_disjoint(evaluation, calibration, reference_name=name,
                     checked_name="calibration problems")
  tok = loaded.tokenizer
  todo = [p for p in problems if ex.problem_fingerprint(p.prompt) not in store.done]
  if len(todo) < len(problems):
    log(f"store {store.path} already holds {len(problems) - len(todo)} of these problems")
  if not todo:
    return
  prompts = [encode_problem(tok, p.prompt) for p in todo]
  eos = eos_ids(loaded.cfg, tok)
  engine = Engine(loaded.model, eos_ids=eos, mesh=mesh, cache_len=cache_len or cache_len_for(
      [len(p) for p in prompts], max_new_tokens, loaded.cfg.max_position))
  forward = teacher_forced(loaded.model)
  for at in range(0, len(todo), batch_size):
    batch = prompts[at:at + batch_size]
    result = engine.generate(batch, max_new_tokens=max_new_tokens)
    items = [cut_steps(tok, p, r, eos) for p, r in zip(batch, result.tokens)]
    measured = measure(forward, items, loaded.cfg.pad_id, batch_size, store.statistic)
    for problem, item, (c, hidden) in zip(todo[at:at + batch_size], items, measured):
      store.append(ex.problem_fingerprint(problem.prompt), item.steps, c, hidden,
                   shingles(problem.prompt))
    log(f"{min(at + batch_size, len(todo))}/{len(todo)} problems, {store.num_rows} steps "
        f"({result.decode_s:.0f} s decoding)")
