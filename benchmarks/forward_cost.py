"""How the cost of one forward grows with the number of tokens it carries (tree verification).

For each k, a jitted forward of k new tokens over a KV cache of `--cache-len` slots holding a
`--context`-token prefix (advance=False, as a tree step does), timed as the median and the minimum
of `--reps` calls after a warm-up, in wall-clock and in process CPU time (all threads; the steadier
number on a shared machine). The calls go round-robin over all settings, so a load change hits
every k alike. Two variants: the layers plus logits at every token, and the
layers plus logits at one token (what a tree step needs per owner is in between). Prints a markdown
table: ms per forward and the ratios to k = 1.

  python benchmarks/forward_cost.py --model smollm2-135m-instruct --ks 1,4,10,16,30,60
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.checkpoints.registry import load_model
from effjax.models.cache import KVCache


def make_forward(graphdef, all_logits: bool):
  def forward(params, cache, tokens, positions):
    model = nnx.merge(graphdef, params)
    out = model(tokens, positions=positions, cache=cache, advance=False, compute_logits=False)
    hidden = out.hidden if all_logits else out.hidden[:, :1]
    return model.logits(hidden), out.cache

  return jax.jit(forward)


def time_round_robin(calls: list, reps: int) -> list[tuple[float, float, float]]:
  """(median wall ms, min wall ms, median CPU ms) per (fn, args), one call of each per round."""
  for fn, args in calls:  # compile + warm-up
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  wall = [[] for _ in calls]
  cpu = [[] for _ in calls]
  for _ in range(reps):
    for i, (fn, args) in enumerate(calls):
      t, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      wall[i].append(time.perf_counter() - t)
      cpu[i].append(time.process_time() - c)
  return [(statistics.median(w) * 1e3, min(w) * 1e3, statistics.median(c) * 1e3)
          for w, c in zip(wall, cpu)]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--ks", default="1,4,10,16,30,60")
  ap.add_argument("--cache-len", type=int, default=512)
  ap.add_argument("--context", type=int, default=256, help="filled prefix of the cache")
  ap.add_argument("--reps", type=int, default=20)
  args = ap.parse_args(argv)
  ks = [int(k) for k in args.ks.split(",")]

  loaded = load_model(args.model)
  cfg = loaded.cfg
  graphdef, params = nnx.split(loaded.model)
  cache = KVCache.init(cfg, 1, args.cache_len)
  fill = jax.jit(lambda p, c, t: nnx.merge(graphdef, p)(t, cache=c, compute_logits=False).cache)
  cache = fill(params, cache, jnp.ones((1, args.context), jnp.int32))

  settings, calls = [], []
  for all_logits in (True, False):
    fwd = make_forward(graphdef, all_logits)
    for k in ks:
      settings.append((k, "every token" if all_logits else "one token"))
      calls.append((fwd, (params, cache, jnp.ones((1, k), jnp.int32),
                          args.context + jnp.arange(k)[None, :])))
  timed = time_round_robin(calls, args.reps)
  rows = []
  for (k, where), (med, best, cpu) in zip(settings, timed):
    _, base_min, base_cpu = timed[settings.index((ks[0], where))]
    rows.append((k, where, med, best, cpu, best / base_min, cpu / base_cpu))

  print(f"{args.model}, {cfg.dtype}, batch 1, cache {args.cache_len} slots with a "
        f"{args.context}-token prefix, {jax.devices()[0].platform} "
        f"({platform.processor() or 'cpu'}, {jax.device_count()} device(s)), {args.reps} reps\n")
  print("| k tokens | logits at | wall median ms | wall min ms | CPU median ms | wall min / k=1 "
        "| CPU / k=1 |")
  print("|---|---|---|---|---|---|---|")
  for k, where, med, best, cpu, rbest, rcpu in rows:
    print(f"| {k} | {where} | {med:.1f} | {best:.1f} | {cpu:.1f} | {rbest:.2f}x | {rcpu:.2f}x |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
