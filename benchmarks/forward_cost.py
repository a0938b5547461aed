"""How the cost of one forward grows with the number of tokens it carries, and what a speculative
step costs over the bare forward of its tokens.

Forward table: for each k, a jitted forward of k new tokens over a KV cache of `--cache-len` slots
holding a `--context`-token prefix (advance=False, as a tree step does), timed as the median and the
minimum of `--reps` calls after a warm-up, in wall-clock and in process CPU time (all threads; the
steadier number on a shared machine). The calls go round-robin over all settings, so a load change
hits every k alike. Two variants: the layers plus logits at every token, and the layers plus logits
at one token (what a tree step needs per owner is in between). Ratios are to k = 1. Each weight
layout in --layouts runs in the same round robin from the same weights: "fused" (one QKV and one
gate+up kernel per layer, the default), "unfused" (separate projections), "int8" (weight-only int8).

Step table (`--methods`): for each decoding method, the cost of one step of its real decode loop
(`--steps` loop iterations after an untimed prefill of the README prompt, divided by the model
calls they made) in an engine whose cache has `--cache-len` slots, against the bare forward of the
step's block (its BC tokens; layers plus logits at one token) over a cache of the same length. A
step attends over every cache slot whatever its fill, so both pay the same attention. Plain
decoding ('ar') is the 1-token reference. Round-robin with the forwards, as above.

Prefill (`--prefill`): the forward of the `--context` prefix and the commit of its K/V into the
empty cache, as the engine's prefill does, in the same round robin.

  python benchmarks/forward_cost.py --model smollm2-135m-instruct --ks 1,4,10,16,30,60
  python benchmarks/forward_cost.py --ks 1 --methods ar,esp-bc10,esp-bc30,esp-bc60,hybrid-bc30
  python benchmarks/forward_cost.py --ks 1 --prefill --context 512 --cache-len 1024
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import effjax  # noqa: F401  first: with libtpu installed, keeps JAX off a TPU this host lacks
import jax
import jax.numpy as jnp
from flax import nnx

from effjax.checkpoints.assemble import assemble, checkpoint_tensors, quantize_model
from effjax.checkpoints.registry import load_model
from effjax.decoding.cost_model import step_seconds
from effjax.models.cache import KVCache, commit

PROMPT = "Explain what a KV cache is in two sentences."  # README's main command


def make_forward(graphdef, all_logits: bool):
  def forward(params, cache, tokens, positions):
    model = nnx.merge(graphdef, params)
    out = model(tokens, positions=positions, cache=cache, advance=False, compute_logits=False)
    hidden = out.hidden if all_logits else out.hidden[:, :1]
    return model.logits(hidden), out.cache

  return jax.jit(forward)


def layouts(model, names: list[str]) -> dict:
  """The same weights in each named layout."""
  make = {"fused": lambda: model,
          "unfused": lambda: assemble(model.cfg.replace(fused_projections=False),
                                      checkpoint_tensors(model), source="forward_cost"),
          "int8": lambda: quantize_model(model)}
  unknown = sorted(set(names) - set(make))
  if unknown:
    raise SystemExit(f"unknown layouts {unknown}; known: {', '.join(make)}")
  return {name: make[name]() for name in names}


def forward_timer(fwd, params, cache, k: int, context: int):
  """A timer: (wall s, CPU s) of one k-token forward."""
  tokens, positions = jnp.ones((1, k), jnp.int32), context + jnp.arange(k)[None, :]

  return call_timer(fwd, params, cache, tokens, positions)


def call_timer(fn, *args):
  """A timer: (wall s, CPU s) of one call of fn(*args)."""

  def timer():
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t, time.process_time() - c

  return timer


def step_timer(engine, strategy, prompt: list[int], steps: int):
  """A timer: (wall s, CPU s) per model call of `steps` decode-loop steps after a prefill."""
  return lambda: step_seconds(engine, strategy, prompt, steps)


def time_round_robin(timers: list, reps: int) -> list[tuple[float, float, float]]:
  """(median wall ms, min wall ms, median CPU ms) per timer, one call of each per round after two
  warm-up calls each (the first compiles)."""
  for timer in timers:
    timer()
    timer()
  wall = [[] for _ in timers]
  cpu = [[] for _ in timers]
  for _ in range(reps):
    for i, timer in enumerate(timers):
      w, c = timer()
      wall[i].append(w)
      cpu[i].append(c)
  return [(statistics.median(w) * 1e3, min(w) * 1e3, statistics.median(c) * 1e3)
          for w, c in zip(wall, cpu)]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--ks", default="1,4,10,16,30,60")
  ap.add_argument("--cache-len", type=int, default=512)
  ap.add_argument("--context", type=int, default=256, help="filled prefix of the cache")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--methods", default="",
                  help="comma-separated decoding methods (ar, pld, esp-bc10, hybrid-bc30, ...) "
                       "whose step cost to compare with the bare forward of their block")
  ap.add_argument("--steps", type=int, default=16, help="decode-loop steps per timed call")
  ap.add_argument("--prefill", action="store_true",
                  help="also time the forward that writes the --context prefix into the empty cache")
  ap.add_argument("--layouts", default="fused",
                  help="weight layouts side by side: fused, unfused, int8 (steps use the first)")
  args = ap.parse_args(argv)
  from effjax.data.chat import encode_prompt
  from effjax.decoding.engine import Engine
  from effjax.decoding.methods import make_strategy, parse_label

  strategies = {m: make_strategy(*parse_label(m)) for m in args.methods.split(",") if m}
  ks = sorted({int(k) for k in args.ks.split(",") if k}
              | {s.block_size for s in strategies.values()})

  loaded = load_model(args.model)
  cfg = loaded.cfg
  names = args.layouts.split(",")
  settings, timers = [], []
  for layout, model in layouts(loaded.model, names).items():
    graphdef, params = nnx.split(model)
    empty = KVCache.init(cfg, 1, args.cache_len)
    fill = jax.jit(lambda p, c, t: commit(  # as engine.prefill_forward: the prefix, then its K/V
        c, nnx.merge(graphdef, p)(t, compute_logits=False).block, jnp.full((1,), t.shape[1])))
    prefix = jnp.ones((1, args.context), jnp.int32)
    cache = fill(params, empty, prefix)
    if args.prefill:
      settings.append((layout, args.context, "prefill"))
      timers.append(call_timer(fill, params, empty, prefix))
    for all_logits in (True, False):
      fwd = make_forward(graphdef, all_logits)
      for k in ks:
        settings.append((layout, k, "every token" if all_logits else "one token"))
        timers.append(forward_timer(fwd, params, cache, k, args.context))
  if strategies:
    engine = Engine(loaded.model, cache_len=args.cache_len)
    prompt = encode_prompt(loaded.tokenizer, PROMPT,
                           chat=bool(getattr(loaded.tokenizer, "chat_template", None)))
    for name, strategy in strategies.items():
      settings.append((name, strategy.block_size, "step"))
      timers.append(step_timer(engine, strategy, prompt, args.steps))
  timed = dict(zip(settings, time_round_robin(timers, args.reps)))

  print(f"{args.model}, {cfg.dtype}, batch 1, cache {args.cache_len} slots with a "
        f"{args.context}-token prefix, {jax.devices()[0].platform} "
        f"({platform.processor() or 'cpu'}, {jax.device_count()} device(s)), {args.reps} reps, "
        f"1-minute load average {os.getloadavg()[0]:.1f}\n")
  print("| layout | k tokens | logits at | wall median ms | wall min ms | CPU median ms "
        "| wall min / k=1 | CPU / k=1 |")
  print("|---|---|---|---|---|---|---|---|")
  for layout in names:
    for where in ("every token", "one token"):
      _, base_min, base_cpu = timed[(layout, ks[0], where)]
      for k in ks:
        med, best, cpu = timed[(layout, k, where)]
        print(f"| {layout} | {k} | {where} | {med:.1f} | {best:.1f} | {cpu:.1f} "
              f"| {best / base_min:.2f}x | {cpu / base_cpu:.2f}x |")
  if args.prefill:
    print(f"\nPrefill: one forward of the {args.context}-token prefix (layers, no logits) and the "
          f"commit of its K/V into the empty cache:\n")
    print("| layout | tokens | wall median ms | wall min ms | CPU median ms |")
    print("|---|---|---|---|---|")
    for layout in names:
      med, best, cpu = timed[(layout, args.context, "prefill")]
      print(f"| {layout} | {args.context} | {med:.1f} | {best:.1f} | {cpu:.1f} |")
  if strategies:
    print(f"\nStep of the decode loop ({args.steps} steps after the prefill of the README prompt) "
          f"against the bare forward of its block with logits at one token, and (last two "
          f"columns) with logits at every token, as a tree step needs at every owner:\n")
    print("| method | block tokens | step wall min ms | forward wall min ms | step / forward "
          "(wall min) | step CPU ms | forward CPU ms | step / forward (CPU) | forward, logits at "
          "every token, wall min ms | step / that forward (wall min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, strategy in strategies.items():
      t = strategy.block_size
      _, s_best, s_cpu = timed[(name, t, "step")]
      _, f_best, f_cpu = timed[(names[0], t, "one token")]
      _, e_best, _ = timed[(names[0], t, "every token")]
      print(f"| {name} | {t} | {s_best:.1f} | {f_best:.1f} | {s_best / f_best:.2f} | {s_cpu:.1f} "
            f"| {f_cpu:.1f} | {s_cpu / f_cpu:.2f} | {e_best:.1f} | {s_best / e_best:.2f} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
