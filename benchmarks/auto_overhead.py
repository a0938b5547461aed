"""What a plain step of `auto` costs over plain decoding's step.

`auto` picks its budget per step inside the jitted loop (lax.switch over compiled step bodies) and
drafts every step (lookup chain, mask candidates, estimates) whatever it then runs. Here its cost
model makes every speculative option look ruinous, so it always takes the plain option, and its
loop step is timed against plain decoding's (forward_cost.step_timer: the README prompt, then
`--steps` loop steps per timed call, round-robin): with all six default options (with and without
the recycled successors), with plain alone (no choice to make), and with plain and one draft tree.

  python benchmarks/auto_overhead.py
"""

from __future__ import annotations

import argparse
import dataclasses

import effjax  # noqa: F401  first: with libtpu installed, keeps JAX off a TPU this host lacks
from forward_cost import PROMPT, step_timer, time_round_robin

from effjax.checkpoints.registry import load_model
from effjax.data.chat import encode_prompt
from effjax.decoding.budget import Auto, Option
from effjax.decoding.cost_model import CostModel
from effjax.decoding.engine import Engine
from effjax.decoding.methods import make_strategy


def always_plain(auto: Auto, cache_len: int) -> Auto:
  """auto with a cost model under which a k-token forward costs k^3 plain steps, every option
  compiled (pruning would drop the trees such costs rule out)."""
  return dataclasses.replace(auto, prune=False, cost_model=CostModel(
      tuple((cache_len, k, float(k) ** 3) for k in sorted(set(auto.blocks)))))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--cache-len", type=int, default=512)
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--reps", type=int, default=10)
  args = ap.parse_args(argv)
  loaded = load_model(args.model)
  engine = Engine(loaded.model, cache_len=args.cache_len)
  prompt = encode_prompt(loaded.tokenizer, PROMPT,
                         chat=bool(getattr(loaded.tokenizer, "chat_template", None)))
  strategies = {
      "ar": make_strategy("ar"),
      "auto, 6 default options": always_plain(Auto(), args.cache_len),
      "auto, 6 default options, recycled successors": always_plain(Auto(recycled=10),
                                                                  args.cache_len),
      "auto, plain only": always_plain(Auto(options=(Option("plain"),)), args.cache_len),
      "auto's starter (6 options' state, plain steps)": always_plain(Auto(),
                                                                     args.cache_len).starter(),
      "auto, plain and draft-3": always_plain(Auto(options=(Option("plain"), Option("draft", 3))),
                                              args.cache_len),
  }
  timers = [step_timer(engine, s, prompt, args.steps) for s in strategies.values()]
  timed = time_round_robin(timers, args.reps)
  base = timed[0][1]
  print(f"{args.model}, cache {args.cache_len} slots, {args.steps} steps per call, "
        f"{args.reps} reps; auto always takes its plain option\n")
  print("| loop | wall median ms | wall min ms | CPU median ms | wall min / ar |")
  print("|---|---|---|---|---|")
  for name, (med, best, cpu) in zip(strategies, timed):
    print(f"| {name} | {med:.1f} | {best:.1f} | {cpu:.1f} | {best / base:.2f}x |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
