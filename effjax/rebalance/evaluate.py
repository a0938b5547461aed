"""Math evaluation of decoding methods (`effjax rebalance eval`): Pass@1 and response length.

Grading is exact (effjax.evals.math_grading): the answer is read only from the answer region (after
the thinking span of a model with think tags), as the last \\boxed{} or "####" line; a response
without one is wrong and counted as truncated.

Every method decodes the same batches of problems with the same seeds (batch i uses seed + i), so
sampled runs differ only by the method. Results are appended per batch to `<out>/<method>.jsonl`
(one line per problem) and, for ReBalance, `<out>/<method>.trace.jsonl` (one line per step); a
rerun with the same `out` skips the problems already there. The summary compares the methods on
the problems every one of them has finished.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from effjax.checkpoints.registry import LoadedModel
from effjax.data.records import Problem
from effjax.decoding.engine import Engine, Strategy, cache_len_for, with_hook
from effjax.decoding.methods import make_strategy, parse_label
from effjax.decoding.sampling import Sampler
from effjax.evals.math_grading import grade
from effjax.rebalance.deer import DEER
from effjax.rebalance.disjoint import ProblemSet
from effjax.rebalance.extract import ReBalanceProfile
from effjax.rebalance.nowait import NoWaitHook, reflection_token_ids
from effjax.rebalance.prompts import (answer_tokens, encode_problem, eos_ids, starts_in_span,
                                     think_tag_ids)
from effjax.rebalance.seal import SealHook
from effjax.rebalance.steering import Delimiters, ReBalanceHook, step_trace, write_trace

METHODS = ("baseline", "nowait", "seal", "deer", "rebalance")
PROFILE_HOOKS = (ReBalanceHook, SealHook)  # hooks built from a profile's calibration set


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  max_new_tokens: int = 1024
  sampler: Sampler = Sampler(temperature=0.7, top_p=0.95)  # REBALANCE.md's decoding
  seed: int = 0
  batch_size: int = 8
  cache_len: int | None = None  # default: longest prompt + max_new_tokens, rounded up
  mesh: Any = None  # the model's device mesh (None: one device)


def problem_set(problems: Sequence[Problem]) -> ProblemSet:
  return ProblemSet.of([p.prompt for p in problems], [p.id for p in problems])


def check_model(profile: ReBalanceProfile, loaded: LoadedModel, model_id: str) -> list[str]:
  """Refuses a profile that cannot steer this model; returns warnings (a different model id with
  matching shapes)."""
  cfg = loaded.cfg
  if profile.vector.shape != (cfg.dim,):
    raise ValueError(f"the profile's vector has shape {profile.vector.shape}; the model's hidden "
                     f"size is {cfg.dim} (profile made for {profile.model_id!r})")
  layers = [profile.constants.layer] + ([profile.seal.layer] if profile.seal else [])
  if not all(0 <= layer < cfg.num_layers for layer in layers):
    raise ValueError(f"the profile steers layer {max(layers)}; the model has {cfg.num_layers}")
  if profile.model_id != model_id:
    return [f"the profile was extracted from {profile.model_id!r}, not {model_id!r}"]
  return []


def make_strategies(methods: Sequence[str], loaded: LoadedModel, sampler: Sampler, *,
                    profile: ReBalanceProfile | None = None, first_prompt: Sequence[int] = (),
                    trace_len: int = 0, confidence: str | None = None, window: int = 2,
                    decoding: str = "ar", deer: dict | None = None) -> dict[str, Strategy]:
  """One strategy per method name (baseline, nowait, seal, deer, rebalance), each decoding with
  `decoding` ("ar", or a tree strategy such as "pld" or "esp-bc30", which the steering and NoWait
  hooks compose with exactly). deer: DEER's settings (threshold, think_ratio, ...)."""
  unknown = set(methods) - set(METHODS)
  if unknown:
    raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
  method, bc = parse_label(decoding)
  if "deer" in methods and method != "ar":
    raise ValueError("DEER is its own decoding strategy; evaluate it with --decoding ar")
  tok, cfg = loaded.tokenizer, loaded.cfg
  open_id, close_id = think_tag_ids(tok)
  in_span = starts_in_span(first_prompt, open_id, close_id)
  if {"rebalance", "seal"} & set(methods) and profile is None:
    raise ValueError("--method rebalance / seal need --profile (made by `effjax rebalance "
                     "extract`)")
  if "seal" in methods and profile.seal is None:
    raise ValueError("the profile has no SEAL vector: its calibration traces had no "
                     f"reflection/transition thoughts or no execution ones ({profile.counts})")
  delimiters = Delimiters.from_tokenizer(tok, cfg.vocab_size) if {"rebalance", "seal"} & set(
      methods) else None
  out = {}
  for name in methods:
    if name == "deer":
      out[name] = DEER.from_tokenizer(tok, cfg.vocab_size, (open_id, close_id), sampler=sampler,
                                      **(deer or {}))
      continue
    hook = None
    if name == "nowait":
      hook = NoWaitHook(reflection_token_ids(tok), cfg.vocab_size)
    elif name == "seal":
      hook = SealHook(profile.seal, delimiters, open_id, close_id, in_span)
    elif name == "rebalance":
      tracker = profile.tracker_config(confidence, window=window, think_open_id=open_id,
                                       think_close_id=close_id)
      hook = ReBalanceHook(profile.vector, tracker, delimiters, in_span, trace_len)
    out[name] = with_hook(make_strategy(method, bc, sampler), hook)
  return out


def _read(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() \
      else []


def evaluate(loaded: LoadedModel, problems: Sequence[Problem], strategies: dict[str, Strategy],
             out: str | Path, settings: EvalSettings, *, profile: ReBalanceProfile | None = None,
             log: Callable[[str], None] = print) -> dict[str, dict]:
  """Decodes every problem with every strategy, grades, writes results; returns the summaries.

  A strategy steered by a profile (ReBalance, SEAL) needs that `profile`: problems equal or close
  to its calibration problems are refused before anything is decoded.
  """
  steered = [m for m, s in strategies.items() if isinstance(s.hook, PROFILE_HOOKS)]
  if steered and profile is None:
    raise ValueError(f"{', '.join(steered)} steer with a calibrated profile: pass it (profile=) so "
                     "that the evaluation problems are checked against its calibration set")
  if profile is not None:
    profile.check_disjoint(problem_set(problems))
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tok = loaded.tokenizer
  prompts = [encode_problem(tok, p.prompt) for p in problems]
  eos = eos_ids(loaded.cfg, tok)
  block = max(s.block_size for s in strategies.values())
  engine = Engine(loaded.model, eos_ids=eos, mesh=settings.mesh,
                  cache_len=settings.cache_len or cache_len_for(
                      [len(p) for p in prompts], settings.max_new_tokens + block - 1,
                      loaded.cfg.max_position))
  done = {m: {r["id"] for r in _read(out / f"{m}.jsonl")} for m in strategies}
  think_open, think_close = think_tag_ids(tok)
  decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
  bs = settings.batch_size
  for batch, at in enumerate(range(0, len(problems), bs)):
    rows = problems[at:at + bs]
    seed = settings.seed + batch
    for method, strategy in strategies.items():
      if all(p.id in done[method] for p in rows):
        continue
      result = engine.generate(prompts[at:at + bs], strategy=strategy,
                               max_new_tokens=settings.max_new_tokens, seed=seed)
      trace = getattr(result.hook_state, "trace", None)
      records, steps = [], []
      for i, (problem, tokens) in enumerate(zip(rows, result.tokens)):
        if problem.id in done[method]:
          continue
        text = decode(tokens)
        region = answer_tokens(prompts[at + i], tokens, think_open, think_close)
        g = grade("" if region is None else decode(region), problem.answer or "")
        record = {"id": problem.id, "method": method, "seed": seed, "correct": g.correct,
                  "predicted": g.predicted, "reference": g.reference, "answered": g.answered,
                  "tokens": len(tokens), "finished": bool(tokens) and tokens[-1] in eos,
                  "response": text}
        if trace is not None:
          steps.append((problem.id, step_trace(tokens, trace, i, decode)))
          record["steps"] = len(steps[-1][1])
          record["steered"] = int(np.count_nonzero(trace.applied[i, :len(tokens)]))
        elif hasattr(result.hook_state, "steered"):  # SEAL
          record["steered"] = int(result.hook_state.steered[i])
        if isinstance(strategy, DEER):
          record.update(trials=int(result.extra.trials[i]),
                        early_exit=bool(result.extra.early_exit[i]),
                        trial_forwards=int(result.extra.trial_calls[i]))
        records.append(record)
      with open(out / f"{method}.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
      for problem_id, s in steps:
        write_trace(out / f"{method}.trace.jsonl", problem_id, s)
      done[method].update(r["id"] for r in records)
      correct = sum(r["correct"] for r in records)
      log(f"[{method}] problems {at + 1}-{at + len(rows)}: {correct}/{len(records)} correct, "
          f"{result.new_tokens} tokens in {result.decode_s:.0f} s")
  summaries = summarize({m: _read(out / f"{m}.jsonl") for m in strategies},
                        {p.id for p in problems})
  (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
  return summaries


def summarize(records: dict[str, list[dict]], ids: set[str] | None = None) -> dict[str, dict]:
  """Per method: Pass@1 and token statistics over the problems every method has (within ids)."""
  common = set.intersection(*({r["id"] for r in rs} for rs in records.values()))
  if ids is not None:
    common &= ids
  out = {}
  for method, rs in records.items():
    rs = [r for r in rs if r["id"] in common]
    tokens = [r["tokens"] for r in rs]
    out[method] = {
        "problems": len(rs),
        "pass@1": sum(r["correct"] for r in rs) / len(rs) if rs else float("nan"),
        "mean_tokens": statistics.fmean(tokens) if rs else float("nan"),
        "median_tokens": statistics.median(tokens) if rs else float("nan"),
        "finished": sum(r["finished"] for r in rs) / len(rs) if rs else float("nan"),
        # No answer reached (records written before exact grading lack the field: not counted).
        "truncated": sum(not r.get("answered", True) for r in rs),
    }
    if rs and "steps" in rs[0]:
      out[method]["mean_steps"] = statistics.fmean(r["steps"] for r in rs)
    if rs and "steered" in rs[0]:
      out[method]["mean_steered"] = statistics.fmean(r["steered"] for r in rs)
    if rs and "trials" in rs[0]:
      out[method]["mean_trials"] = statistics.fmean(r["trials"] for r in rs)
      out[method]["early_exits"] = sum(r["early_exit"] for r in rs)
      out[method]["mean_trial_forwards"] = statistics.fmean(r["trial_forwards"] for r in rs)
  return out


def table(summaries: dict[str, dict]) -> str:
  """The summaries as a markdown table."""
  lines = ["| method | problems | Pass@1 | truncated (no answer) | mean tokens | median tokens |"
           " ended by EOS | steps (steered) |", "|---|---|---|---|---|---|---|---|"]
  for method, s in summaries.items():
    steps = (f"{s['mean_steps']:.1f} ({s['mean_steered']:.1f})" if "mean_steps" in s else
             f"- ({s['mean_steered']:.1f})" if "mean_steered" in s else
             f"DEER: {s['mean_trials']:.1f} trials, {s['early_exits']} early exits"
             if "mean_trials" in s else "-")
    lines.append(f"| {method} | {s['problems']} | {100 * s['pass@1']:.1f}% | {s['truncated']} | "
                 f"{s['mean_tokens']:.1f} | {s['median_tokens']:.0f} | "
                 f"{100 * s['finished']:.0f}% | {steps} |")
  return "\n".join(lines)
