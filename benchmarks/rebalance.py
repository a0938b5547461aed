"""ReBalance benchmarks: per-step overhead of each hook, steered speculative decoding against
steered plain decoding, and Pass@1 / tokens of baseline, NoWait, SEAL, DEER and ReBalance.

    python benchmarks/rebalance.py overhead [--model M] [--profile P] [--batch 4] \\
        [--new-tokens 64] [--reps 3] [--steps 60]
    python benchmarks/rebalance.py quality [--model M] [--calib-n 64] [--eval-n 100] \\
        [--max-new-tokens 256] [--batch-size 50] [--work DIR]
    python benchmarks/rebalance.py speculative [--prompts 16] [--spec-tokens 128] [--work DIR]
    python benchmarks/rebalance.py report [--work DIR] [--out BENCHMARKS.md]

overhead: the same model and prompts decoded without a hook and with each hook (ReBalance, with
and without its trace, SEAL, NoWait, and DEER, whose loop runs without triggering), no EOS (every
run decodes the same number of steps): tokens/s of interleaved whole runs, and the fastest of many
interleaved single decode steps (on a shared machine the least disturbed estimate of a step's cost).
quality: `effjax rebalance extract` on the first --calib-n problems of the GSM8K dev file (the
calibration split is its first 300), then `effjax rebalance eval` of the five methods on --eval-n
problems from problem 301 on, greedy, through the real commands; both resume from --work when
restarted, and a refused or failed command fails the benchmark.
speculative: GSM8K evaluation prompts decoded one at a time, greedy, by ReBalance (the profile of
`quality`) and NoWait with plain decoding and with each tree strategy, interleaved per prompt: how
many outputs equal the steered plain decoding's, and tokens/s against it (unsteered alongside).
report: writes the section of BENCHMARKS.md from --work, including whatever part of the
evaluation has finished (--notes appends a markdown file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import effjax  # noqa: F401  first: with libtpu installed, keeps JAX off a TPU this host lacks
import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from report import write_section  # noqa: E402

GSM8K = "sample:gsm8k"  # the GSM8K dev subset shipped with effjax
CALIBRATION_SPLIT = 300  # GSM8K dev problems 1..300 calibrate, 301.. evaluate
HEADING = "## ReBalance (benchmarks/rebalance.py)"
METHODS = ("baseline", "nowait", "seal", "deer", "rebalance")
SPEC_DECODINGS = ("pld", "esp-bc10", "hybrid-bc30")


def _command() -> str:
  return "python benchmarks/rebalance.py " + " ".join(sys.argv[1:])


def _profile_or_random(path, cfg):
  """The extracted profile, or (same cost with any vector) a random one at a middle layer."""
  from effjax.rebalance import extract as ex
  from effjax.rebalance.control import PRESETS
  from effjax.rebalance.disjoint import ProblemSet
  from effjax.rebalance.seal import SealVector

  if path and Path(path).is_file():
    return ex.ReBalanceProfile.load(path)
  rng = np.random.default_rng(0)
  vector = rng.normal(size=cfg.dim).astype(np.float32)
  layer = cfg.num_layers // 2
  return ex.ReBalanceProfile(vector, PRESETS["deepseek-r1-distill-qwen-1.5b"].replace(layer=layer),
                             "random", ProblemSet.of([]), seal=SealVector(vector, layer))


def overhead(args) -> dict:
  from effjax.checkpoints.registry import load_model
  from effjax.data import load_problems
  from effjax.decoding.engine import AutoRegressive, Engine
  from effjax.rebalance.deer import DEER, Vocabulary
  from effjax.rebalance.nowait import NoWaitHook, reflection_token_ids
  from effjax.rebalance.prompts import encode_problem
  from effjax.rebalance.seal import SealHook, SealVector
  from effjax.rebalance.steering import Delimiters, ReBalanceHook, token_texts

  loaded = load_model(args.model)
  tok, cfg = loaded.tokenizer, loaded.cfg
  prompts = [encode_problem(tok, p.prompt) for p in load_problems(GSM8K, limit=args.batch)]
  profile = _profile_or_random(args.profile, cfg)
  delims = Delimiters.from_tokenizer(tok, cfg.vocab_size)
  hook = lambda trace: ReBalanceHook(profile.vector, profile.tracker_config(), delims, True, trace)
  texts = token_texts(tok, cfg.vocab_size)
  # DEER's per-step work with its trigger never firing (a vocabulary without "Wait"): the loop,
  # the state machine and the probability it scores, without the trials' extra forwards.
  deer = DEER(Vocabulary.from_texts([t.replace("Wait", "W") for t in texts]),
              tuple(tok.encode("\\boxed", add_special_tokens=False)),
              tuple(tok.encode("\\boxed", add_special_tokens=False)), think_ratio=1.0)
  strategies = {"unsteered": AutoRegressive(), "rebalance": AutoRegressive(hook=hook(0)),
                "rebalance + trace": AutoRegressive(hook=hook(args.new_tokens)),
                # SEAL's per-step cost does not depend on its vector: time it with S where the
                # profile has none.
                "seal": AutoRegressive(hook=SealHook(
                    profile.seal or SealVector(profile.vector, profile.constants.layer), delims)),
                "nowait": AutoRegressive(hook=NoWaitHook(reflection_token_ids(tok),
                                                         cfg.vocab_size)),
                "deer (no trigger)": deer}
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
         "layer": profile.constants.layer, "load": os.getloadavg(), "command": _command()}
  work = Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  (work / "overhead.json").write_text(json.dumps(out, indent=2) + "\n")
  print(json.dumps(out, indent=2))
  return out


def speculative(args) -> dict:
  """Steered speculative vs steered plain decoding, prompt by prompt, interleaved."""
  from effjax.checkpoints.registry import load_model
  from effjax.data import load_problems
  from effjax.decoding.engine import AutoRegressive, Engine, with_hook
  from effjax.decoding.methods import make_strategy, parse_label
  from effjax.rebalance.evaluate import problem_set
  from effjax.rebalance.nowait import NoWaitHook, reflection_token_ids
  from effjax.rebalance.prompts import encode_problem, eos_ids, starts_in_span, think_tag_ids
  from effjax.rebalance.steering import Delimiters, ReBalanceHook

  work = Path(args.work)
  loaded = load_model(args.model)
  tok, cfg = loaded.tokenizer, loaded.cfg
  problems = list(load_problems(GSM8K, limit=CALIBRATION_SPLIT + args.prompts))
  problems = problems[CALIBRATION_SPLIT:]
  profile = _profile_or_random(work / "profile.safetensors", cfg)
  profile.check_disjoint(problem_set(problems))
  prompts = [encode_problem(tok, p.prompt) for p in problems]
  open_id, close_id = think_tag_ids(tok)
  delims = Delimiters.from_tokenizer(tok, cfg.vocab_size)
  hooks = {"unsteered": lambda: None,
           "rebalance": lambda: ReBalanceHook(profile.vector, profile.tracker_config(
               think_open_id=open_id, think_close_id=close_id), delims,
               starts_in_span(prompts[0], open_id, close_id)),
           "nowait": lambda: NoWaitHook(reflection_token_ids(tok), cfg.vocab_size)}
  decodings = ("ar",) + tuple(args.spec_decodings.split(","))
  strategies = {(h, d): with_hook(make_strategy(*parse_label(d)) if d != "ar" else
                                  AutoRegressive(), make())
                for h, make in hooks.items() for d in decodings}
  block = max(s.block_size for s in strategies.values())
  engine = Engine(loaded.model, eos_ids=eos_ids(cfg, tok), cache_len=max(map(len, prompts))
                  + args.spec_tokens + block + 1)
  for s in strategies.values():  # compile
    engine.generate(prompts[:1], strategy=s, max_new_tokens=4)
  rows = []
  for i, prompt in enumerate(prompts):
    row = {"id": problems[i].id}
    order = list(strategies)
    order = order[i % len(order):] + order[:i % len(order)]  # rotate: no fixed neighbour
    for key in order:
      res = engine.generate([prompt], strategy=strategies[key], max_new_tokens=args.spec_tokens)
      row["|".join(key)] = {"tokens": res.tokens[0], "decode_s": res.decode_s,
                            "calls": res.model_calls}
    rows.append(row)
    print(f"prompt {i + 1}/{len(prompts)}", file=sys.stderr)
  out = {"date": str(datetime.date.today()), "model": args.model, "prompts": len(prompts),
         "new_tokens": args.spec_tokens, "decodings": list(decodings),
         "hooks": list(hooks), "load": os.getloadavg(), "command": _command(),
         "profile": "extracted" if (work / "profile.safetensors").is_file() else "random",
         "summary": {}}
  for h in hooks:
    for d in decodings:
      runs = [r[f"{h}|{d}"] for r in rows]
      plain = [r[f"{h}|ar"] for r in rows]
      tokens = sum(len(x["tokens"]) for x in runs)
      out["summary"][f"{h}|{d}"] = {
          "equal": sum(a["tokens"] == b["tokens"] for a, b in zip(runs, plain)),
          "tokens": tokens, "tokens_per_s": tokens / sum(x["decode_s"] for x in runs),
          "tokens_per_call": sum(len(x["tokens"]) - 1 for x in runs)
          / max(1, sum(x["calls"] for x in runs))}
    base = out["summary"][f"{h}|ar"]["tokens_per_s"]
    for d in decodings:
      out["summary"][f"{h}|{d}"]["speedup"] = out["summary"][f"{h}|{d}"]["tokens_per_s"] / base
  work.mkdir(parents=True, exist_ok=True)
  (work / "speculative.json").write_text(json.dumps(out, indent=2) + "\n")
  print(json.dumps(out["summary"], indent=2))
  return out


def _methods(profile) -> tuple[str, ...]:
  """The methods a profile can evaluate: SEAL only where extraction found its thoughts."""
  if profile.seal is None:
    print("no SEAL vector in the profile (its traces lack reflection / transition thoughts): "
          "SEAL is left out", file=sys.stderr)
  return tuple(m for m in METHODS if m != "seal" or profile.seal is not None)


def quality(args) -> None:
  from effjax.cli import main
  from effjax.rebalance.extract import ReBalanceProfile

  if args.calib_n > CALIBRATION_SPLIT:
    raise SystemExit(f"--calib-n must stay within the calibration split ({CALIBRATION_SPLIT})")
  work = Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  profile = work / "profile.safetensors"
  common = ["--model", args.model, "--data", GSM8K, "--max-new-tokens",
            str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
  log = {"command": _command(), "started": datetime.datetime.now().isoformat(timespec="seconds")}
  t0 = time.perf_counter()
  if not profile.exists():
    rc = main(["rebalance", "extract", *common, "--n", str(args.calib_n), "--out", str(profile)])
    if rc:
      raise SystemExit(f"extract failed (exit code {rc})")
  log["extract_s"] = time.perf_counter() - t0
  methods = _methods(ReBalanceProfile.load(profile))
  log["methods"] = list(methods)
  (work / "quality.json").write_text(json.dumps(log, indent=2) + "\n")
  t0 = time.perf_counter()
  rc = main(["rebalance", "eval", *common, "--profile", str(profile), "--offset",
             str(CALIBRATION_SPLIT), "--limit", str(args.eval_n), "--method", ",".join(methods),
             "--temperature", "0", "--out", str(work / "eval")])
  if rc:
    raise SystemExit(f"eval failed (exit code {rc}); nothing is recorded as finished")
  log["eval_s"] = time.perf_counter() - t0
  log["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
  log["load"] = os.getloadavg()
  (work / "quality.json").write_text(json.dumps(log, indent=2) + "\n")


def _overhead_lines(o) -> list[str]:
  return [
      f"### Overhead per decode step of each hook\n\nDate: {o['date']}; device: {o['device']} "
      f"(2 cores shared with other jobs; load average {o['load'][0]:.1f}); model: {o['model']}; "
      f"batch {o['batch']}, {o['new_tokens']} new tokens, no EOS, steering at layer {o['layer']}, "
      f"{o['reps']} interleaved repetitions; command: `{o['command']}`.", "",
      "| decoding | fastest of single steps, ms (vs unsteered) | median step, ms | "
      "whole runs: tokens/s median (best) | whole runs vs unsteered: median of per-rep ratios |",
      "|---|---|---|---|---|",
      *[f"| {name} | {o['fastest_step_ms'][name]:.1f} "
        f"({o['fastest_step_ms'][name] / o['fastest_step_ms']['unsteered'] - 1:+.1%}) | "
        f"{o['median_step_ms'][name]:.1f} | {statistics.median(r):.1f} ({max(r):.1f}) | "
        f"{o['ratio_to_unsteered'][name]:.3f} |" for name, r in o["tokens_per_s"].items()],
      "", f"Single steps: {o['single_steps']} interleaved decode steps per decoding. Whole runs "
      "are noisy on a shared machine; the fastest single step is the least disturbed estimate "
      "of each step's cost. DEER is measured without triggers (its state machine and scoring "
      "per step); its trials cost extra forwards, counted in the GSM8K table.", ""]


def _speculative_lines(o) -> list[str]:
  lines = [
      f"### Steered speculative decoding vs steered plain decoding\n\nDate: {o['date']}; model: "
      f"{o['model']} (CPU, load average {o['load'][0]:.1f}); {o['prompts']} GSM8K dev prompts "
      f"from problem {CALIBRATION_SPLIT + 1} on, one at a time, greedy, {o['new_tokens']} new "
      f"tokens; ReBalance with the {o['profile']} profile; every decoding of a prompt run "
      f"back to back in rotating order; command: `{o['command']}`.", "",
      "| hook | decoding | outputs equal to the hook's plain decoding | tokens per forward | "
      "tokens/s | vs the hook's plain decoding |", "|---|---|---|---|---|---|"]
  for key, v in o["summary"].items():
    hook, dec = key.split("|")
    lines.append(f"| {hook} | {dec} | {v['equal']}/{o['prompts']} | {v['tokens_per_call']:.2f} | "
                 f"{v['tokens_per_s']:.1f} | {v['speedup']:.2f}x |")
  return lines + [""]


def report(args) -> None:
  from effjax.rebalance.evaluate import summarize, table
  from effjax.rebalance import extract as ex

  work = Path(args.work)
  lines = []
  for name, fmt in (("speculative.json", _speculative_lines), ("overhead.json", _overhead_lines)):
    if (work / name).exists():
      lines += fmt(json.loads((work / name).read_text()))
  q = work / "quality.json"
  if q.exists():
    log = json.loads(q.read_text())
    profile = ex.ReBalanceProfile.load(work / "profile.safetensors")
    c = profile.constants
    records = {m: [json.loads(l) for l in (work / "eval" / f"{m}.jsonl").read_text().splitlines()]
               if (work / "eval" / f"{m}.jsonl").exists() else [] for m in _methods(profile)}
    summaries = summarize(records)
    base = {r["id"]: r["response"] for r in records["baseline"]}
    same = {m: sum(r["id"] in base and r["response"] == base[r["id"]] for r in records[m])
            for m in list(records)[1:]}
    store = ex.CalibrationStore.open(work / "profile.safetensors.store")
    reflective = ex.has_reflection(store.texts()).mean()
    trace = work / "eval" / "rebalance.trace.jsonl"
    alphas = [json.loads(l)["alpha"] for l in trace.read_text().splitlines()] if trace.exists() \
        else [0.0]
    state = ("finished" if "finished" in log else
             "stopped before the end: the table covers the problems all methods finished")
    seal = (f"SEAL vector at layer {profile.seal.layer}, strength {profile.seal.strength}, from "
            f"{profile.counts.get('seal_reflection', 0)} reflection, "
            f"{profile.counts.get('seal_transition', 0)} transition and "
            f"{profile.counts.get('seal_execution', 0)} execution thoughts, "
            f"|v|={np.linalg.norm(profile.seal.vector):.2f}" if profile.seal else "no SEAL vector")
    lines += [
        "### Pass@1 and tokens on GSM8K (embedded model, CPU, exact grading)", "",
        f"Started {log['started']}; command: `{log['command']}`; run {state}.",
        "Profile: extracted by `effjax rebalance extract` on the first "
        f"{profile.counts['problems']} GSM8K dev problems (calibration split: problems "
        f"1-{CALIBRATION_SPLIT}), {profile.counts['steps']} steps "
        f"({profile.counts['overthinking']} overthinking, {profile.counts['normal']} normal); "
        f"{profile.statistic} step confidence; layer {c.layer} (held-out R^2 "
        f"{profile.layer_r2[c.layer]:.3f}); q25c={c.q25c:.4f}, q75c={c.q75c:.4f}, "
        f"q25v={c.q25v:.6f}, q75v={c.q75v:.6f}; L1={c.L1}, L2={c.L2}, H2={c.H2}; "
        f"|S|={np.linalg.norm(profile.vector):.2f}; {seal}.",
        f"Evaluation: GSM8K dev problems from {CALIBRATION_SPLIT + 1} on (disjoint from the "
        "calibration split, exact and near-duplicate, checked by `eval`), greedy, same batches "
        "for every method. Grading reads the answer only from a \\boxed{} or `####` line; "
        "\"truncated\" counts the responses that never gave one. DEER: threshold 0.95, thinking "
        "budget 0.6 x the token limit.", "",
        table(summaries), "",
        "Responses identical to the baseline's: " + ", ".join(
            f"{m} {same[m]}" for m in same) + f" (of {len(records['baseline'])}). "
        f"Calibration steps with a reflection word: {reflective:.1%}. ReBalance steps: median "
        f"alpha {statistics.median(alphas):+.3f}, {np.mean(np.array(alphas) < 0):.0%} negative.",
        ""]
  if args.notes and Path(args.notes).is_file():
    lines += [Path(args.notes).read_text().strip()]
  text = "\n".join(lines)
  print(text)
  write_section(Path(args.out), HEADING, text)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("phase", choices=["overhead", "quality", "speculative", "report"])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--work", default=str(ROOT / "runs" / "rebalance"))
  ap.add_argument("--profile", default="", help="overhead: a profile to steer with (optional)")
  ap.add_argument("--batch", type=int, default=4, help="overhead: rows decoded together")
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--steps", type=int, default=60, help="overhead: single steps timed per decoding")
  ap.add_argument("--calib-n", type=int, default=64)
  ap.add_argument("--eval-n", type=int, default=100)
  ap.add_argument("--max-new-tokens", type=int, default=256)
  ap.add_argument("--batch-size", type=int, default=50)
  ap.add_argument("--prompts", type=int, default=16, help="speculative: GSM8K prompts")
  ap.add_argument("--spec-tokens", type=int, default=128, help="speculative: new tokens")
  ap.add_argument("--spec-decodings", default=",".join(SPEC_DECODINGS))
  ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
  ap.add_argument("--notes", default="", help="report: a markdown file appended to the section")
  args = ap.parse_args()
  {"overhead": overhead, "quality": quality, "speculative": speculative,
   "report": report}[args.phase](args)


if __name__ == "__main__":
  main()
