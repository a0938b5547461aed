"""`effjax bench specbench`: decoding methods on Spec-Bench questions, against plain decoding."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from effjax.cli_args import add_strict_arg, nonnegative_int, positive_int
from effjax.decoding.methods import (ALL_BUDGETS, BC_REQUIRED, METHODS, label, make_strategy,
                                     parse_label, prepare)


def register(subparsers) -> None:
  bench = subparsers.add_parser("bench", help="benchmarks")
  sub = bench.add_subparsers(dest="bench_command", required=True)
  p = sub.add_parser("specbench", description=__doc__,
                     help="Spec-Bench protocol: tau, speedup, equality vs plain decoding")
  p.add_argument("--model", default="smollm2-135m-instruct",
                 help="a named model or a GGUF file / HF dir / effjax checkpoint")
  p.add_argument("--method", nargs="+", default=["esp"],
                 help=f"methods to run: {', '.join(METHODS)}, or one at a single budget such as "
                      "esp-bc60 or esp-dyn-bc30 (plain decoding 'ar' always runs as the baseline; "
                      "lookahead and tr named without a budget run their reference settings)")
  p.add_argument("--bc", nargs="+", type=int, choices=ALL_BUDGETS, default=[30],
                 help=f"budgets for {', '.join(sorted(BC_REQUIRED))} named without one (default 30)")
  p.add_argument("--data", required=True, help="Spec-Bench question JSONL, or sample:spec_bench (shipped with effjax)")
  p.add_argument("--max-new-tokens", type=positive_int, default=1024)
  add_strict_arg(p, default=True)
  p.add_argument("--limit", type=positive_int, default=None,
                 help="at most N questions per category group, evenly spaced (default: all)")
  p.add_argument("--warmup", type=nonnegative_int, default=3, help="warm-up conversations on question 1")
  p.add_argument("--out", default=None,
                 help="output folder (default runs/specbench/<model>-<time>): results.jsonl, "
                      "summary.json, summary.md")
  p.add_argument("--resume", action="store_true",
                 help="continue an interrupted run in --out: keep its records and run what is "
                      "missing, methods added since included (model, data, limits, dtype, cache "
                      "length must be the same)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--quant", default=None, choices=["int8"],
                 help="weight-only int8 weights with per-channel scales (default: as stored)")
  p.add_argument("--cache-len", type=positive_int, default=None,
                 help="the most KV cache slots (default: enough for the longest conversation); "
                      "each turn gets its prompt bucket + max_new_tokens + the block, rounded up "
                      "to 128 slots")
  p.add_argument("--buckets", default=None,
                 help="prompt length buckets, comma separated (default: powers of two)")
  p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                 help="use the chat template (default: when the tokenizer has one, else a plain "
                      "'User: / Assistant:' transcript)")
  p.set_defaults(func=run_specbench)


def command_line(args, out: Path) -> str:
  """The command that repeats this run, every setting spelled out."""
  parts = ["effjax bench specbench", f"--model {args.model}", "--method " + " ".join(args.method),
           "--bc " + " ".join(map(str, args.bc)), f"--data {args.data}",
           f"--max-new-tokens {args.max_new_tokens}", f"--warmup {args.warmup}",
           f"--dtype {args.dtype}", f"--out {out}"]
  parts += [f"--{k.replace('_', '-')} {v}" for k, v in
            (("limit", args.limit), ("cache_len", args.cache_len), ("buckets", args.buckets),
             ("quant", args.quant))
            if v is not None]
  if args.chat is not None:
    parts.append("--chat" if args.chat else "--no-chat")
  return " ".join(parts)


def run_specbench(args) -> int:
  from effjax.checkpoints.registry import load_model
  from effjax.data import load_problems
  from effjax.decoding.engine import Engine
  from effjax.evals import specbench

  t0 = time.perf_counter()
  methods = {}
  for item in args.method:
    m, own = parse_label(item)
    for bc in ([own] if own is not None or m not in BC_REQUIRED else args.bc):
      methods[label(m, bc)] = make_strategy(m, bc)  # a missing method module fails here, early
  problems = load_problems(args.data, strict=args.strict)
  if problems.format != "spec_bench":
    raise ValueError(f"{args.data}: not Spec-Bench questions (format {problems.format})")
  questions = specbench.select(problems.problems, args.limit)

  loaded = load_model(args.model, dtype=args.dtype, quant=args.quant)
  methods = {k: prepare(v, loaded.model, log=lambda s: print(s, flush=True))
             for k, v in methods.items()}
  fmt = specbench.PromptFormat.for_tokenizer(loaded.tokenizer, args.chat)
  block = max(s.block_size for s in methods.values()) if methods else 1
  cache_len = args.cache_len or specbench.cache_len_for(fmt, questions, args.max_new_tokens, block)
  buckets = [int(b) for b in args.buckets.split(",")] if args.buckets else None
  engine = Engine(loaded.model, cache_len=cache_len, buckets=buckets, fit_cache=True)

  stamp = time.strftime("%Y%m%d-%H%M%S")
  out = Path(args.out or f"runs/specbench/{Path(args.model).name}-{stamp}")
  out.mkdir(parents=True, exist_ok=True)
  meta = {"model": args.model, "source": loaded.source, "methods": ["ar", *methods],
          "data": args.data, "questions": len(questions), "per_group_limit": args.limit,
          "max_new_tokens": args.max_new_tokens, "warmup": args.warmup, "dtype": args.dtype,
          "quant": args.quant, "cache_len": cache_len, "cache_per_turn": True, "prompt_format": fmt.name, "started": stamp,
          "command": command_line(args, out)}
  print(f"{len(questions)} questions, methods ar + {', '.join(methods)}; {fmt.name}; "
        f"cache per turn, at most {cache_len}; writing {out}", flush=True)
  results = out / "results.jsonl"
  kept = specbench.read_records(results) if args.resume else []
  before = json.loads((out / "meta.json").read_text()) if args.resume and kept else {}
  same = ("model", "data", "per_group_limit", "max_new_tokens", "dtype", "quant",
          "prompt_format", "cache_len")
  changed = [k for k in same if before and before.get(k) != meta[k]]
  if changed:
    raise ValueError(f"--resume: {out} holds a run with other settings ({', '.join(changed)}: "
                     f"{[before.get(k) for k in changed]} there, {[meta[k] for k in changed]} now)")
  meta["started"] = before.get("started", stamp)
  meta["earlier_minutes"] = before.get("minutes", before.get("earlier_minutes", 0))
  (out / "meta.json").write_text(json.dumps(meta, indent=1))
  done = [r for r in kept if r["method"] in meta["methods"]]
  results.write_text("".join(json.dumps(r) + "\n" for r in kept))  # drops a cut-off last line
  with results.open("a") as f:
    def emit(rec):
      f.write(json.dumps(rec) + "\n")
      f.flush()

    records = specbench.run(engine, fmt, questions, methods, max_new_tokens=args.max_new_tokens,
                            warmup=args.warmup, out=emit, log=lambda s: print(s, flush=True),
                            done=done)
  meta["minutes"] = round(meta.pop("earlier_minutes") + (time.perf_counter() - t0) / 60, 1)
  meta["finished"] = time.strftime("%Y%m%d-%H%M%S")
  meta["load_average"] = round(os.getloadavg()[0], 1)
  _, text = specbench.write_outputs(out, records, meta)
  print(text)
  return 0
