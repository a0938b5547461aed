"""ReBalance benchmarks: steering overhead, and Pass@1 / tokens of baseline, NoWait and ReBalance.

    python benchmarks/rebalance.py overhead [--model M] [--profile P] [--batch 4] \\
        [--new-tokens 64] [--reps 3] [--steps 60]
    python benchmarks/rebalance.py quality [--model M] [--calib-n 64] [--eval-n 200] \\
        [--max-new-tokens 256] [--batch-size 50] [--work DIR]
    python benchmarks/rebalance.py report [--work DIR] [--out BENCHMARKS.md]

overhead: the same model and prompts decoded without a hook, with the ReBalance hook (trace off)
and with the per-step trace on, no EOS (every run decodes the same number of steps): tokens/s of
interleaved whole runs, and the fastest of many interleaved single decode steps (on a shared
machine the least disturbed estimate of a step's cost).
quality: `effjax rebalance extract` on the first --calib-n problems of the GSM8K dev file (the
calibration split is its first 300), then `effjax rebalance eval` of the three methods on --eval-n
problems from problem 301 on, greedy, through the real commands; both resume from --work when
restarted.
report: writes the section of BENCHMARKS.md from --work, including whatever part of the
evaluation has finished (--notes appends a markdown file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from report import write_section  # noqa: E402

GSM8K = "sample:gsm8k"  # the GSM8K dev subset shipped with effjax
CALIBRATION_SPLIT = 300  # GSM8K dev problems 1..300 calibrate, 301.. evaluate
HEADING = "## ReBalance (benchmarks/rebalance.py)"


def overhead(args) -> dict:
  from effjax.checkpoints.registry import load_model
  from effjax.data import load_problems
  from effjax.decoding.engine import AutoRegressive, Engine
  from effjax.rebalance.confidence import TrackerConfig
  from effjax.rebalance.control import PRESETS
  from effjax.rebalance import extract as ex
  from effjax.rebalance.prompts import encode_problem
  from effjax.rebalance.steering import Delimiters, ReBalanceHook

  loaded = load_model(args.model)
  tok, cfg = loaded.tokenizer, loaded.cfg
  prompts = [encode_problem(tok, p.prompt) for p in load_problems(GSM8K, limit=args.batch)]
  if Path(args.profile).is_file():
    profile = ex.ReBalanceProfile.load(args.profile)
    vector, consts = profile.vector, profile.constants
  else:  # same cost with any vector: a random one at a middle layer
    vector = np.random.default_rng(0).normal(size=cfg.dim).astype(np.float32)
    consts = PRESETS["deepseek-r1-distill-qwen-1.5b"].replace(layer=cfg.num_layers // 2)
  hook = lambda trace: ReBalanceHook(vector, TrackerConfig.create(consts),
                                     Delimiters.from_tokenizer(tok, cfg.vocab_size), True, trace)
  strategies = {"unsteered": AutoRegressive(), "rebalance": AutoRegressive(hook=hook(0)),
                "rebalance + trace": AutoRegressive(hook=hook(args.new_tokens))}
  engine = Engine(loaded.model, cache_len=512, eos_ids=[])
  for s in strategies.values():  # compile
    engine.generate(prompts, strategy=s, max_new_tokens=2)
  rates = {name: [] for name in strategies}
  names = list(strategies)
  for rep in range(args.reps):  # neighbouring runs share the machine's load; rotate the order
    for name in names[rep % len(names):] + names[:rep % len(names)]:
      res = engine.generate(prompts, strategy=strategies[name], max_new_tokens=args.new_tokens)
      rates[name].append(len(prompts) * res.model_calls / res.decode_s)
  ratios = {name: statistics.median(a / b for a, b in zip(r, rates["unsteered"]))
            for name, r in rates.items()}
  best = {name: max(r) / max(rates["unsteered"]) for name, r in rates.items()}
  # Single decode steps, interleaved across the strategies: the fastest of many is the step's
  # cost with the least interference from other jobs on the machine.
  states = {name: engine.start(prompts, strategy=s, max_new_tokens=args.steps + 1)
            for name, s in strategies.items()}
  step_s = {name: [] for name in strategies}
  for _ in range(args.steps):
    for name, s in strategies.items():
      t = time.perf_counter()
      states[name] = engine.advance(states[name], s, 1)
      jax.block_until_ready(states[name].length)
      step_s[name].append(time.perf_counter() - t)
  fastest = {name: min(t) for name, t in step_s.items()}
  out = {"date": str(datetime.date.today()), "device": jax.devices()[0].device_kind,
         "model": args.model, "batch": len(prompts), "new_tokens": args.new_tokens,
         "reps": args.reps, "tokens_per_s": rates, "ratio_to_unsteered": ratios,
         "best_ratio_to_unsteered": best, "single_steps": args.steps,
         "fastest_step_ms": {k: 1e3 * v for k, v in fastest.items()},
         "median_step_ms": {k: 1e3 * statistics.median(v) for k, v in step_s.items()},
         "layer": consts.layer,
         "command": "python benchmarks/rebalance.py " + " ".join(sys.argv[1:])}
  work = Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  (work / "overhead.json").write_text(json.dumps(out, indent=2) + "\n")
  print(json.dumps(out, indent=2))
  return out


def quality(args) -> None:
  from effjax.cli import main

  if args.calib_n > CALIBRATION_SPLIT:
    raise SystemExit(f"--calib-n must stay within the calibration split ({CALIBRATION_SPLIT})")
  work = Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  profile = work / "profile.safetensors"
  common = ["--model", args.model, "--data", GSM8K, "--max-new-tokens",
            str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
  log = {"command": "python benchmarks/rebalance.py " + " ".join(sys.argv[1:]),
         "started": datetime.datetime.now().isoformat(timespec="seconds")}
  t0 = time.perf_counter()
  if not profile.exists():
    rc = main(["rebalance", "extract", *common, "--n", str(args.calib_n), "--out", str(profile)])
    if rc:
      raise SystemExit(rc)
  log["extract_s"] = time.perf_counter() - t0
  (work / "quality.json").write_text(json.dumps(log, indent=2) + "\n")
  t0 = time.perf_counter()
  main(["rebalance", "eval", *common, "--profile", str(profile), "--offset",
        str(CALIBRATION_SPLIT), "--limit", str(args.eval_n), "--method",
        "baseline,nowait,rebalance", "--temperature", "0", "--out", str(work / "eval")])
  log["eval_s"] = time.perf_counter() - t0
  log["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
  (work / "quality.json").write_text(json.dumps(log, indent=2) + "\n")


def report(args) -> None:
  from effjax.rebalance.evaluate import summarize, table
  from effjax.rebalance import extract as ex

  work = Path(args.work)
  lines = []
  over = work / "overhead.json"
  if over.exists():
    o = json.loads(over.read_text())
    lines += [
        f"### Steering overhead\n\nDate: {o['date']}; device: {o['device']} (2 cores shared with "
        f"other jobs); model: {o['model']}; batch {o['batch']}, {o['new_tokens']} new tokens, no "
        f"EOS, steering at layer {o['layer']}, {o['reps']} interleaved repetitions; command: "
        f"`{o['command']}`.", "",
        "| decoding | fastest of single steps, ms (vs unsteered) | median step, ms | "
        "whole runs: tokens/s median (best) | whole runs vs unsteered: median of per-rep "
        "ratios |", "|---|---|---|---|---|",
        *[f"| {name} | {o['fastest_step_ms'][name]:.1f} "
          f"({o['fastest_step_ms'][name] / o['fastest_step_ms']['unsteered'] - 1:+.1%}) | "
          f"{o['median_step_ms'][name]:.1f} | {statistics.median(r):.1f} ({max(r):.1f}) | "
          f"{o['ratio_to_unsteered'][name]:.3f} |" for name, r in o["tokens_per_s"].items()],
        "", f"Single steps: {o['single_steps']} interleaved decode steps per decoding. Whole runs "
        "are noisy on a shared machine; the fastest single step is the least disturbed estimate "
        "of each step's cost.", ""]
  q = work / "quality.json"
  if q.exists():
    log = json.loads(q.read_text())
    profile = ex.ReBalanceProfile.load(work / "profile.safetensors")
    c = profile.constants
    methods = ("baseline", "nowait", "rebalance")
    records = {m: [json.loads(l) for l in (work / "eval" / f"{m}.jsonl").read_text().splitlines()]
               if (work / "eval" / f"{m}.jsonl").exists() else [] for m in methods}
    summaries = summarize(records)
    base = {r["id"]: r["response"] for r in records["baseline"]}
    same = {m: sum(r["id"] in base and r["response"] == base[r["id"]] for r in records[m])
            for m in methods[1:]}
    store = ex.CalibrationStore.open(work / "profile.safetensors.store")
    reflective = ex.has_reflection(store.texts()).mean()
    trace = work / "eval" / "rebalance.trace.jsonl"
    alphas = [json.loads(l)["alpha"] for l in trace.read_text().splitlines()] if trace.exists() \
        else [0.0]
    state = ("finished" if "finished" in log else
             "stopped before the end: the table covers the problems all three methods finished")
    lines += [
        "### Pass@1 and tokens on GSM8K (embedded model, CPU)", "",
        f"Started {log['started']}; command: `{log['command']}`; run {state}.",
        "Profile: extracted by `effjax rebalance extract` on the first "
        f"{profile.counts['problems']} GSM8K dev problems (calibration split: problems 1-{CALIBRATION_SPLIT}), "
        f"{profile.counts['steps']} steps ({profile.counts['overthinking']} overthinking, "
        f"{profile.counts['normal']} normal); layer {c.layer} (held-out R^2 "
        f"{profile.layer_r2[c.layer]:.3f}); q25c={c.q25c:.4f}, q75c={c.q75c:.4f}, "
        f"q25v={c.q25v:.6f}, q75v={c.q75v:.6f}; L1={c.L1}, L2={c.L2}, H2={c.H2}; "
        f"|S|={np.linalg.norm(profile.vector):.2f}.",
        f"Evaluation: GSM8K dev problems from {CALIBRATION_SPLIT + 1} on (disjoint from the "
        "calibration split, checked by `eval`), greedy, same batches for every method.", "",
        table(summaries), "",
        f"Responses identical to the baseline's: NoWait {same['nowait']}, ReBalance "
        f"{same['rebalance']} (of {len(records['rebalance'])}). Calibration steps with a "
        f"reflection word: {reflective:.1%}. ReBalance steps: median alpha {statistics.median(alphas):+.3f}, "
        f"{np.mean(np.array(alphas) < 0):.0%} negative.", ""]
  if args.notes and Path(args.notes).is_file():
    lines += [Path(args.notes).read_text().strip()]
  text = "\n".join(lines)
  print(text)
  write_section(Path(args.out), HEADING, text)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("phase", choices=["overhead", "quality", "report"])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--work", default=str(ROOT / "runs" / "rebalance"))
  ap.add_argument("--profile", default="", help="overhead: a profile to steer with (optional)")
  ap.add_argument("--batch", type=int, default=4, help="overhead: rows decoded together")
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--steps", type=int, default=60, help="overhead: single steps timed per decoding")
  ap.add_argument("--calib-n", type=int, default=64)
  ap.add_argument("--eval-n", type=int, default=200)
  ap.add_argument("--max-new-tokens", type=int, default=256)
  ap.add_argument("--batch-size", type=int, default=50)
  ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
  ap.add_argument("--notes", default="", help="report: a markdown file appended to the section")
  args = ap.parse_args()
  {"overhead": overhead, "quality": quality, "report": report}[args.phase](args)


if __name__ == "__main__":
  main()
