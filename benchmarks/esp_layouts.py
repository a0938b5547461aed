"""Which speculative layouts pay off on this machine: tau, decode time and speedup over plain greedy
decoding for ESP tree layouts, prompt lookup and the hybrid, on a few Spec-Bench dev prompts.

Batch 1, greedy, float32, one prompt per category (the first turn, in the model's chat template).
Each method decodes every prompt once after a compile run; decode time is measured in wall-clock
and in process CPU time (the steadier number on a shared machine). Speedup = plain decoding's
decode time / the method's over all prompts (outputs are checked equal, so the token counts are the
same). Prints a markdown table.

  python benchmarks/esp_layouts.py --max-new-tokens 64 --methods 'ar;esp:4;esp:1,1;pld:10,2'
"""

from __future__ import annotations

import argparse
import time

import effjax  # noqa: F401  first: with libtpu installed, keeps JAX off a TPU this host lacks
import jax
import numpy as np

from effjax.checkpoints.registry import load_model
from effjax.data import load_problems
from effjax.decoding.engine import AutoRegressive, Engine
from effjax.decoding.esp import ESP
from effjax.decoding.hybrid import Hybrid
from effjax.decoding.pld import PromptLookup

CATEGORIES = ("writing", "math_reasoning", "summarization", "rag", "qa", "translation")


def strategy(spec: str):
  """'ar'; 'esp:4' / 'esp:15,4' (static widths); 'espdyn:2,60' (masks, BC); 'pld:10[,min_n]'
  (draft length, shortest n-gram); 'hybrid:1,30[,chain[,prior]]' (masks, BC, chain, chain_prior)."""
  name, _, arg = spec.partition(":")
  nums = [float(x) if "." in x else int(x) for x in arg.split(",")] if arg else []
  if name == "ar":
    return AutoRegressive()
  if name == "esp":
    return ESP(widths=tuple(nums))
  if name == "espdyn":
    return ESP(widths=None, masks=nums[0], budget=nums[1])
  if name == "pld":
    return PromptLookup(draft_len=nums[0], **({"min_ngram": nums[1]} if len(nums) > 1 else {}))
  if name == "hybrid":
    extra = dict(zip(("chain", "chain_prior"), nums[2:]))
    return Hybrid(masks=nums[0], budget=nums[1], **extra)
  raise ValueError(f"unknown method {spec!r}")


def decode(engine: Engine, prompt, strat, max_new: int):
  """(tokens, calls, hist or None, decode wall s, decode CPU s) for one prompt."""
  state = engine.start([prompt], strategy=strat, max_new_tokens=max_new)
  jax.block_until_ready(state.length)
  t, c = time.perf_counter(), time.process_time()
  state = engine.advance(state, strat, max_new)
  jax.block_until_ready(state.length)
  wall, cpu = time.perf_counter() - t, time.process_time() - c
  n = int(state.length[0])
  hist = getattr(state.extra, "hist", None)
  return (np.asarray(state.tokens[0, :n]).tolist(), int(state.calls),
          None if hist is None else np.asarray(hist[0]), wall, cpu)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--data", default="sample:spec_bench")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--cache-len", type=int, default=1024)
  ap.add_argument("--methods", default="ar;esp:4;esp:14;esp:15,4;espdyn:2,60;esp:1;esp:1,1;"
                  "pld:10;pld:10,2;pld:4;hybrid:1,10;hybrid:1,30",
                  help="';'-separated method specs (see `strategy`); the first must be ar")
  args = ap.parse_args(argv)

  loaded = load_model(args.model)
  problems = load_problems(args.data)
  chosen = [next(p for p in problems if p.metadata.get("category") == c) for c in CATEGORIES]
  prompts = [list(loaded.tokenizer.apply_chat_template(
      [{"role": "user", "content": p.prompt}], add_generation_prompt=True)["input_ids"])
      for p in chosen]
  engine = Engine(loaded.model, cache_len=args.cache_len)
  specs = args.methods.split(";")
  if specs[0] != "ar":
    raise ValueError("the first method must be ar (the baseline)")

  rows, base = [], None
  for spec in specs:
    strat = strategy(spec)
    engine.generate([prompts[0]], strategy=strat, max_new_tokens=4)  # compile
    runs = [decode(engine, p, strat, args.max_new_tokens) for p in prompts]
    tokens = sum(len(r[0]) - 1 for r in runs)  # the prefill's token is not a decode token
    calls = sum(r[1] for r in runs)
    wall, cpu = sum(r[3] for r in runs), sum(r[4] for r in runs)
    if base is None:
      base = (runs, wall, cpu)
    same = all(r[0] == b[0] for r, b in zip(runs, base[0]))
    block = getattr(strat, "block_size", 1)
    rows.append((spec, block, tokens / max(calls, 1), tokens / wall, base[1] / wall, base[2] / cpu,
                 same))
    print(f"{spec}: tau {rows[-1][2]:.2f}, wall x{rows[-1][4]:.2f}, CPU x{rows[-1][5]:.2f}",
          flush=True)

  print(f"\n{args.model}, float32, batch 1, greedy, {len(prompts)} Spec-Bench dev prompts "
        f"({', '.join(CATEGORIES)}), {args.max_new_tokens} new tokens, cache {args.cache_len}, "
        f"{jax.devices()[0].platform}\n")
  print("| method | tokens / forward | tau | tokens/s (wall) | speedup (wall) | speedup (CPU time) "
        "| = plain |")
  print("|---|---|---|---|---|---|---|")
  for spec, block, tau, tps, sw, sc, same in rows:
    print(f"| {spec} | {block} | {tau:.2f} | {tps:.1f} | {sw:.2f}x | {sc:.2f}x | "
          f"{'yes' if same else 'NO'} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
