"""KV cache memory of sliding-window layers: a ring of window + block slots vs the full length.

    python benchmarks/ring_cache.py [--model gemma3-270m] [--prompt-tokens 1536] [--cache-len 2048]
        [--new-tokens 32] [--reps 3] [--out BENCHMARKS.md]

1. Bytes of the KV cache of the model's config (the arrays KVCache.init allocates, shapes from
   jax.eval_shape) for several context lengths and batch sizes, for plain decoding (block 1) and a
   speculative block of 31 slots (ESP at BC30, hybrid).
2. A real run of the named model: greedy decoding of one long prompt (Spec-Bench sample questions
   joined) with the ring and with the full cache, interleaved `--reps` times: the bytes the live
   cache arrays hold, the median decode step time, and whether the tokens are the same.
Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
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

from effjax.checkpoints.registry import MODELS, load_model  # noqa: E402
from effjax.data import load_problems  # noqa: E402
from effjax.decoding.engine import PLAIN_GREEDY, Engine  # noqa: E402
from effjax.models import PRESETS, KVCache  # noqa: E402

HEADING = "## Ring-buffer KV cache (benchmarks/ring_cache.py)"
CONTEXTS = (2048, 8192, 32768)
BATCHES = (1, 8)
BLOCKS = (1, 31)


def cache_bytes(cfg, batch: int, length: int, block: int | None) -> int:
  shapes = jax.eval_shape(lambda: KVCache.init(cfg, batch, length, block=block))
  return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(shapes))


def mib(n: float) -> str:
  return f"{n / 2**20:,.1f}"


def size_table(preset: str) -> list[str]:
  cfg = PRESETS[preset].replace(dtype="bfloat16")  # what an accelerator would hold
  sliding = sum(k == "sliding" for k in cfg.layer_kinds)
  rows = [f"Config `{preset}` in bfloat16: {cfg.num_layers} layers, {sliding} sliding (window "
          f"{cfg.sliding_window}), {cfg.num_kv_heads} KV head(s) x {cfg.head_dim}. Bytes of every "
          "array of `KVCache.init` (from `jax.eval_shape`):", "",
          "| context | batch | full cache MiB | ring, block 1 MiB | saving | ring, block 31 MiB | saving |",
          "|---|---|---|---|---|---|---|"]
  for length in CONTEXTS:
    for batch in BATCHES:
      full = cache_bytes(cfg, batch, length, None)
      cells = [f"{length:,}", str(batch), mib(full)]
      for block in BLOCKS:
        ring = cache_bytes(cfg, batch, length, block)
        cells += [mib(ring), f"{full / ring:.2f}x"]
      rows.append("| " + " | ".join(cells) + " |")
  return rows


def long_prompt(tokenizer, n: int) -> list[int]:
  ids: list[int] = []
  for problem in load_problems("sample:spec_bench"):
    ids += tokenizer(problem.prompt + "\n\n").input_ids
    if len(ids) >= n:
      return ids[:n]
  raise ValueError(f"the Spec-Bench sample holds fewer than {n} tokens")


def timed_run(engine: Engine, prompt: list[int], new_tokens: int):
  """Prefill, then decode one step at a time: (tokens, cache bytes, median step seconds)."""
  state = engine.start([prompt], max_new_tokens=new_tokens)
  steps = []
  for _ in range(new_tokens - 1):
    t = time.perf_counter()
    state = engine.advance(state, PLAIN_GREEDY, 1)
    jax.block_until_ready(state.length)
    steps.append(time.perf_counter() - t)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state.cache))
  tokens = np.asarray(state.tokens[0, :int(state.length[0])]).tolist()
  return tokens, nbytes, statistics.median(steps[1:])  # the first step compiles


def real_run(args) -> list[str]:
  loaded = load_model(args.model)
  prompt = long_prompt(loaded.tokenizer, args.prompt_tokens)
  engines = {ring: Engine(loaded.model, cache_len=args.cache_len, eos_ids=(), ring_cache=ring,
                          buckets=[args.cache_len]) for ring in (False, True)}
  results = {ring: [] for ring in engines}
  for rep in range(args.reps):  # interleaved: load changes hit both
    for ring, engine in engines.items():
      results[ring].append(timed_run(engine, prompt, args.new_tokens))
      print(f"rep {rep} ring={ring}: {results[ring][-1][1]} bytes, "
            f"{results[ring][-1][2] * 1e3:.1f} ms/step", flush=True)
  (full_tok, full_bytes, _), (ring_tok, ring_bytes, _) = results[False][0], results[True][0]
  same = all(r[0] == full_tok for runs in results.values() for r in runs)
  step = {ring: statistics.median(r[2] for r in runs) for ring, runs in results.items()}
  return [
      f"Real run: `{args.model}` (float32, CPU), one prompt of {len(prompt)} tokens (Spec-Bench "
      f"sample questions joined), cache {args.cache_len} slots, {args.new_tokens} greedy tokens, "
      f"{args.reps} interleaved repetitions; machine load before: {args.load}.", "",
      "| cache | live cache arrays MiB | median decode step ms |", "|---|---|---|",
      f"| full length | {mib(full_bytes)} | {step[False] * 1e3:.1f} |",
      f"| ring (sliding layers: window + 1 slots) | {mib(ring_bytes)} | {step[True] * 1e3:.1f} |",
      "", f"Cache memory {full_bytes / ring_bytes:.2f}x smaller with the ring; decode step time "
      f"ratio full / ring = {step[False] / step[True]:.2f}; generated tokens identical: "
      f"{'yes' if same else 'NO'}."]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="gemma3-270m")
  ap.add_argument("--prompt-tokens", type=int, default=1536)
  ap.add_argument("--cache-len", type=int, default=2048)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
  args = ap.parse_args()
  args.load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
  preset = MODELS[args.model].preset
  command = " ".join(["python", "benchmarks/ring_cache.py", *sys.argv[1:]])
  lines = [f"Run {datetime.date.today().isoformat()} with `{command}`.", "", *size_table(preset), "",
           *real_run(args)]
  text = "\n".join(lines)
  print(text)
  write_section(Path(args.out), HEADING, text)


if __name__ == "__main__":
  main()
