"""What the first use of each compiled step body costs in a new process.

`effjax generate` decodes one prompt per process, so a step body's one-time costs at its first
execution (after compilation, which is timed apart) land in its "tokens/s decoding". Each
measurement here is a fresh process that decodes the README prompt `--generations` times, one
loop step per call, and records every step's wall time and, for auto, the option it ran. The
table compares the first generation with the later ones and lists the first generation's slow
steps. `--xla-flags` adds variants run with those XLA_FLAGS (e.g. without XLA:CPU's YNNPACK dot
fusions, `--xla_cpu_experimental_ynn_fusion_type=`); variants and methods alternate per round.

  python benchmarks/first_steps.py --methods ar,auto --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SLOW = 1.5  # a step is listed when it takes this many times the later generations' median step


def child(args) -> None:
  import effjax  # noqa: F401  first: with libtpu installed, keeps JAX off a TPU this host lacks
  import jax
  import numpy as np
  from forward_cost import PROMPT

  from effjax.checkpoints.registry import load_model
  from effjax.data.chat import encode_prompt
  from effjax.decoding.engine import Engine
  from effjax.decoding.methods import make_strategy, parse_label, prepare

  loaded = load_model(args.model)
  prompt = encode_prompt(loaded.tokenizer, PROMPT, chat=True)
  engine = Engine(loaded.model, cache_len=args.cache_len)
  strategy = prepare(make_strategy(*parse_label(args.child)), loaded.model)
  names = [o.name for o in strategy.options] if hasattr(strategy, "options") else None
  gens = []
  for _ in range(args.generations):
    state = engine.advance(engine.start([prompt], strategy=strategy, max_new_tokens=args.tokens),
                           strategy, 0)  # compiled (or restored) before any step is timed
    jax.block_until_ready(state.length)
    steps, before = [], np.zeros(len(names or ()), np.int64)  # auto's steps run per option
    while not bool(np.asarray(state.done).all()):
      t = time.perf_counter()
      state = engine.advance(state, strategy, 1)
      jax.block_until_ready(state.length)
      ms = (time.perf_counter() - t) * 1e3
      option = args.child
      if names:
        runs = np.asarray(state.extra.runs)
        option, before = names[int(np.argmax(runs - before))], runs
      steps.append((ms, option))
    gens.append(steps)
  print("RESULT " + json.dumps(gens))


def measure(args, method: str, flags: str) -> list:
  env = dict(os.environ, XLA_FLAGS=flags) if flags else dict(os.environ)
  cmd = [sys.executable, __file__, "--child", method, "--model", args.model,
         "--cache-len", str(args.cache_len), "--tokens", str(args.tokens),
         "--generations", str(args.generations)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
  return json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--methods", default="ar,auto")
  ap.add_argument("--xla-flags", action="append", default=[],
                  help="a variant's XLA_FLAGS (repeatable); the default variant runs as well")
  ap.add_argument("--cache-len", type=int, default=384)
  ap.add_argument("--tokens", type=int, default=128, help="max new tokens per generation")
  ap.add_argument("--generations", type=int, default=3)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.generations < 2:
    ap.error("--generations must be >= 2: the later generations are the reference")
  if args.child:
    child(args)
    return 0
  variants = [os.environ.get("XLA_FLAGS", "")] + args.xla_flags
  print(f"{args.model}, README prompt, cache {args.cache_len} slots, up to {args.tokens} new "
        f"tokens, {args.generations} generations per process, one loop step per call; "
        f"1-minute load average {os.getloadavg()[0]:.1f}\n")
  print("| method | XLA_FLAGS | round | steps | first generation ms | later generations ms "
        "(median) | first - later ms | slow steps of the first generation (ms, option) |")
  print("|---|---|---|---|---|---|---|---|")
  for r in range(1, args.rounds + 1):
    for flags in variants:
      for method in args.methods.split(","):
        gens = measure(args, method, flags)
        first = sum(ms for ms, _ in gens[0])
        later = statistics.median(sum(ms for ms, _ in g) for g in gens[1:])
        step = statistics.median(ms for g in gens[1:] for ms, _ in g)
        slow = "; ".join(f"{ms:.0f} {opt}" for ms, opt in gens[0] if ms > SLOW * step)
        print(f"| {method} | {flags or '(default)'} | {r} | {len(gens[0])} | {first:.0f} | "
              f"{later:.0f} | {first - later:.0f} | {slow or '-'} |", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
