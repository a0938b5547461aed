"""`effjax rebalance extract|eval|plot`.

Calibration and evaluation must use disjoint problems. For the embedded models the documented
split is the GSM8K sample set shipped with effjax (`--data sample:gsm8k`): its first 300 problems
calibrate (`extract --n 300`), the rest evaluate (`eval --offset 300`); MATH-500 for calibration
with GSM8K for evaluation is disjoint by construction. `eval` refuses any problem equal or near-identical (5-gram overlap) to one of the
profile's calibration set, and `extract --disjoint-from EVAL.jsonl` refuses to calibrate on
evaluation problems.

`--mesh data=1,fsdp=-1,tensor=1` loads the model sharded over the devices (a TPU slice, several
GPUs) and decodes on that mesh; steered tokens are the same as on one device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effjax.cli_args import add_strict_arg, nonnegative_int, positive_int
from effjax.rebalance.confidence import DEFAULT_STATISTIC, STATISTICS
from effjax.rebalance.control import LAYER_SOURCES, PRESETS
from effjax.rebalance.extract import DEFAULT_H2, DEFAULT_L1, DEFAULT_L2
from effjax.rebalance.seal import DEFAULT_STRENGTH


def _model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="smollm2-135m-instruct",
                 help="a named model or a GGUF file / HF dir / effjax checkpoint")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--mesh", default=None,
                 help="device mesh, e.g. 'data=1,fsdp=-1,tensor=1' (default: one device)")
  p.add_argument("--data", required=True,
                 help="problem JSONL (GSM8K, MATH-500, ...), sample:gsm8k / sample:math500 "
                      "(shipped with effjax) or tfds:NAME[:SPLIT]")
  add_strict_arg(p, default=True)
  p.add_argument("--offset", type=nonnegative_int, default=0,
                 help="skip this many problems of --data first")
  p.add_argument("--max-new-tokens", type=positive_int, default=1024)
  p.add_argument("--batch-size", type=positive_int, default=8, help="problems decoded together")
  p.add_argument("--cache-len", type=positive_int, default=None,
                 help="KV cache slots per row (default: longest prompt + max new tokens)")


def register(sub) -> None:
  rb = sub.add_parser("rebalance", help="ReBalance: extract a steering profile, evaluate methods")
  cmds = rb.add_subparsers(dest="rebalance_command", required=True)

  p = cmds.add_parser("extract", help="calibrate a profile (vector, constants, layer) for a model")
  _model_args(p)
  p.add_argument("--n", type=positive_int, default=500, help="calibration problems (after --offset)")
  p.add_argument("--out", required=True, help="profile file to write (.safetensors)")
  p.add_argument("--store", default=None,
                 help="hidden-state store directory (default: OUT.store); an existing one resumes")
  p.add_argument("--disjoint-from", action="append", default=[], metavar="JSONL",
                 help="evaluation problems the calibration set must not contain (repeatable)")
  p.add_argument("--confidence", default=DEFAULT_STATISTIC, choices=STATISTICS,
                 help="step confidence statistic of the quartiles, stored in the profile and used "
                      "when decoding: geometric mean of p_max (paper) or arithmetic (authors' "
                      "code)")
  p.add_argument("--L1", type=float, default=DEFAULT_L1)
  p.add_argument("--L2", type=float, default=DEFAULT_L2)
  p.add_argument("--H2", type=float, default=DEFAULT_H2)
  p.add_argument("--seed", type=int, default=0, help="seed of the layer-selection split")
  p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                 help="keep a model's published constants (quartiles, layer, L1/L2/H2): only S is "
                      "extracted")
  p.add_argument("--preset-layer", default="code", choices=LAYER_SOURCES,
                 help="with --preset: the layer the authors' code steers (default) or the paper's "
                      "(they differ for qwen3-14b: 35 vs 34)")
  p.add_argument("--seal-layer", type=int, default=None,
                 help="layer of the SEAL vector extracted alongside (default: ReBalance's layer)")
  p.add_argument("--seal-strength", type=float, default=DEFAULT_STRENGTH,
                 help="SEAL's fixed steering strength (authors: -1)")
  p.set_defaults(func=run_extract)

  p = cmds.add_parser("eval", help="Pass@1 and tokens of baseline / nowait / seal / deer / "
                                   "rebalance decoding")
  _model_args(p)
  p.add_argument("--method", default="rebalance",
                 help="baseline, nowait, seal, deer, rebalance, or several separated by commas")
  p.add_argument("--profile", default=None,
                 help="profile from `extract` (needed for rebalance and seal)")
  p.add_argument("--decoding", default="ar",
                 help="ar (plain), or a tree strategy the methods steer exactly: pld, esp-bc10, "
                      "esp-bc30, hybrid-bc30, ... (greedy output equals plain decoding's)")
  p.add_argument("--limit", type=positive_int, default=None, help="evaluate this many problems")
  p.add_argument("--out", default="rebalance_eval", help="directory for results (resumable)")
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--top-p", type=float, default=None, help="default 0.95 when sampling")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--confidence", default=None, choices=STATISTICS,
                 help="step confidence statistic (default: the profile's; another is an error)")
  p.add_argument("--window", type=positive_int, default=2,
                 help="steps in the confidence-variance window")
  p.add_argument("--deer-threshold", type=float, default=0.95,
                 help="DEER: exit thinking when a trial answer's confidence exceeds this")
  p.add_argument("--deer-think-ratio", type=float, default=0.6,
                 help="DEER: thinking budget as a fraction of --max-new-tokens (R1: 0.6, "
                      "Qwen3: 0.8)")
  p.set_defaults(func=run_eval)

  p = cmds.add_parser("plot", help="confidence and alpha over the steps of one traced problem")
  p.add_argument("--trace", required=True, help="<eval out>/rebalance.trace.jsonl")
  p.add_argument("--problem", default=None, help="problem id (default: the first traced)")
  p.add_argument("--out", required=True, help="image file (.png, .pdf, .svg)")
  p.set_defaults(func=run_plot)


def _problems(args, limit):
  from effjax.data import load_problems

  problems = load_problems(args.data, limit=None if limit is None else args.offset + limit,
                           strict=args.strict)
  problems = list(problems)[args.offset:]
  if not problems:
    raise ValueError(f"{args.data}: no problems after --offset {args.offset}")
  return problems


def _load(args):
  """The model, sharded over --mesh when given, and the mesh."""
  from effjax.checkpoints.registry import load_model
  from effjax.distributed import maybe_initialize
  from effjax.models.sharding import parse_mesh

  maybe_initialize()
  mesh = parse_mesh(args.mesh)
  return load_model(args.model, dtype=args.dtype, mesh=mesh), mesh


def run_extract(args) -> int:
  from effjax.data import load_problems
  from effjax.rebalance import extract as ex
  from effjax.rebalance.calibrate import fill_store
  from effjax.rebalance.control import preset
  from effjax.rebalance.disjoint import ProblemSet

  problems = _problems(args, args.n)
  fingerprints = {ex.problem_fingerprint(p.prompt) for p in problems}
  evaluation = {}
  for path in args.disjoint_from:
    rows = load_problems(path, strict=args.strict)
    evaluation[path] = ProblemSet.of([p.prompt for p in rows], [p.id for p in rows])
  consts = preset(args.preset, args.preset_layer) if args.preset else None
  store_path = Path(args.store or f"{args.out}.store")
  if (store_path / "meta.json").exists():
    store = ex.CalibrationStore.open(store_path)
    if store.statistic != args.confidence:
      raise ValueError(f"{store_path} holds {store.statistic} confidences; use a fresh --store "
                       f"for --confidence {args.confidence}")
    # Only this run's problems: a store holding other problems would mix calibration sets.
    extra = store.done - fingerprints
    if extra:
      raise ValueError(f"{store_path} holds {len(extra)} problems outside this calibration set; "
                       "use a fresh --store")
    loaded, mesh = _load(args)
  else:
    loaded, mesh = _load(args)
    store = ex.CalibrationStore.create(store_path, loaded.cfg.num_layers, loaded.cfg.dim,
                                       statistic=args.confidence)
  print(f"calibrating {args.model} on {len(problems)} problems of {args.data}", file=sys.stderr)
  fill_store(loaded, problems, store, max_new_tokens=args.max_new_tokens,
             batch_size=args.batch_size, cache_len=args.cache_len, disjoint_from=evaluation,
             mesh=mesh, log=lambda m: print(m, file=sys.stderr))
  profile = ex.build_profile(store, args.model, L1=args.L1, L2=args.L2, H2=args.H2,
                             seed=args.seed, preset=consts, seal_layer=args.seal_layer,
                             seal_strength=args.seal_strength)
  profile.save(args.out)
  c = profile.constants
  r2 = f" (held-out R^2 {profile.layer_r2[c.layer]:.3f})" if profile.layer_r2 else " (preset)"
  seal = (f"; SEAL vector at layer {profile.seal.layer}" if profile.seal else
          "; no SEAL vector (the traces lack reflection/transition or execution thoughts)")
  print(f"wrote {args.out}: layer {c.layer}{r2}, {profile.statistic} confidence, "
        f"q25c={c.q25c:.4f} q75c={c.q75c:.4f} q25v={c.q25v:.6f} q75v={c.q75v:.6f}, "
        f"{profile.counts}{seal}")
  return 0


def run_eval(args) -> int:
  from effjax.decoding.sampling import Sampler
  from effjax.rebalance.evaluate import (EvalSettings, check_model, evaluate, make_strategies,
                                         problem_set, table)
  from effjax.rebalance.extract import ReBalanceProfile
  from effjax.rebalance.prompts import encode_problem

  methods = [m.strip() for m in args.method.split(",") if m.strip()]
  top_p = args.top_p if args.top_p is not None else (0.95 if args.temperature > 0 else 1.0)
  sampler = Sampler(temperature=args.temperature, top_p=top_p)
  problems = _problems(args, args.limit)
  profile = ReBalanceProfile.load(args.profile) if args.profile else None
  if {"rebalance", "seal"} & set(methods) and profile is None:
    raise ValueError("--method rebalance / seal need --profile (made by `effjax rebalance "
                     "extract`)")
  if profile is not None:  # before loading the model: refuse early
    profile.tracker_config(args.confidence)
    profile.check_disjoint(problem_set(problems))
  loaded, mesh = _load(args)
  if profile is not None:
    for warning in check_model(profile, loaded, args.model):
      print(f"warning: {warning}", file=sys.stderr)
  settings = EvalSettings(max_new_tokens=args.max_new_tokens, sampler=sampler, seed=args.seed,
                          batch_size=args.batch_size, cache_len=args.cache_len, mesh=mesh)
  strategies = make_strategies(
      methods, loaded, sampler, profile=profile,
      first_prompt=encode_problem(loaded.tokenizer, problems[0].prompt),
      trace_len=args.max_new_tokens, confidence=args.confidence, window=args.window,
      decoding=args.decoding, deer={"threshold": args.deer_threshold,
                                    "think_ratio": args.deer_think_ratio})
  summaries = evaluate(loaded, problems, strategies, args.out, settings, profile=profile,
                       log=lambda m: print(m, file=sys.stderr))
  print(table(summaries))
  print(f"per-problem results and traces in {args.out}/", file=sys.stderr)
  return 0


def run_plot(args) -> int:
  from effjax.rebalance.steering import plot_trace, read_trace

  problem, steps = read_trace(args.trace, args.problem)
  plot_trace(steps, args.out, title=f"{problem}: {len(steps)} steps")
  print(f"wrote {args.out}", file=sys.stderr)
  return 0
