"""Tau of hybrid-tree settings side by side, for choosing them on questions that are not the
benchmark's (benchmarks/tuning/questions.jsonl by default; see its README).

    python benchmarks/hybrid_settings.py [--model smollm2-135m-instruct] [--bc 60]
        [--settings '{}' '{"prior": 0.3}' '{"masked_owners": 3}'] [--data FILE] [--limit N]

Each setting is a JSON object of `Hybrid` fields replaced in `Hybrid.preset(bc)` and runs the
Spec-Bench protocol (`effjax.evals.specbench.Runner`: chat template, both turns, greedy, 128 new
tokens, one warm-up conversation) in a fresh engine. Greedy decoding makes tau independent of the
machine's load, so no plain decoding runs beside it; wall-clock speed is `effjax bench specbench`'s
job. Prints a markdown table of tau per group and overall, with the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import effjax  # noqa: F401  first: with libtpu installed, keeps JAX off a TPU this host lacks
from effjax.checkpoints.registry import load_model
from effjax.data import load_problems
from effjax.decoding.engine import Engine
from effjax.decoding.hybrid import Hybrid
from effjax.decoding.methods import prepare
from effjax.evals import specbench


def tau_of(loaded, fmt, problems, strategy, max_new_tokens: int, warmup: int) -> dict[str, float]:
  """Overall and per-group tau of one strategy on `problems`, in an engine of its own."""
  strategy = prepare(strategy, loaded.model)
  cache_len = specbench.cache_len_for(fmt, problems, max_new_tokens, strategy.block_size)
  runner = specbench.Runner(Engine(loaded.model, cache_len=cache_len, fit_cache=True), fmt,
                            max_new_tokens)
  for _ in range(warmup):
    runner.conversation(problems[0], strategy)
  records = []
  for p in problems:
    category = p.metadata.get("category", "")
    records.append({"question_id": p.id, "category": category,
                    "group": specbench.group_of(category), "method": "hybrid",
                    "equal_to_ar": None,  # no plain decoding here to compare with
                    "turns": [t.record() for t in runner.conversation(p, strategy)]})
  return {g: rows[0]["tau"] for g, rows in specbench.summarize(records).items()}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--bc", type=int, default=60)
  ap.add_argument("--settings", nargs="+", default=["{}"], help="JSON objects of Hybrid fields")
  ap.add_argument("--data", default="benchmarks/tuning/questions.jsonl")
  ap.add_argument("--limit", type=int, default=None, help="questions per group (default: all)")
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--warmup", type=int, default=1)
  args = ap.parse_args(argv)
  settings = [json.loads(s) for s in args.settings]
  fields = {f.name for f in dataclasses.fields(Hybrid)}
  for s in settings:
    if set(s) - fields:
      ap.error(f"unknown Hybrid fields {sorted(set(s) - fields)}")
  problems = specbench.select(load_problems(args.data).problems, args.limit)
  loaded = load_model(args.model, dtype="float32")
  fmt = specbench.PromptFormat.for_tokenizer(loaded.tokenizer, None)
  rows = []
  for s in settings:
    strategy = dataclasses.replace(Hybrid.preset(args.bc), **s)
    taus = tau_of(loaded, fmt, problems, strategy, args.max_new_tokens, args.warmup)
    rows.append((json.dumps(s), taus))
    print(f"{json.dumps(s)}: overall tau {taus['overall']:.3f}", file=sys.stderr, flush=True)
  groups = list(rows[0][1])
  print("`python benchmarks/hybrid_settings.py " + " ".join(
      a if not a.startswith("{") else f"'{a}'" for a in (argv or sys.argv[1:])) + "`\n")
  print(f"{args.model}, hybrid-bc{args.bc}, {len(problems)} questions of {args.data}\n")
  print("| setting | " + " | ".join(groups) + " |")
  print("|---" * (len(groups) + 1) + "|")
  for s, taus in rows:
    print(f"| `{s}` | " + " | ".join(f"{taus[g]:.2f}" for g in groups) + " |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
