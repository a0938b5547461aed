"""One prepared accelerator check: what a speculative step costs on this device, in one command.

    PYTHONPATH=. python benchmarks/device_check.py --out $OUT      # on a GPU / TPU, <= 8 minutes
    python benchmarks/device_check.py --dry-run --out /tmp/dc      # tiny shapes on CPU (a test)

Writes device_check.json and device_check.md into --out:

1. the cost of a k-token forward (k = 1..64, and 81 for Token Recycling's tree; layers plus logits
   at every token, over a KV cache of `--cache-len` slots, each the minimum of `--reps` calls
   round-robin: effjax.decoding.cost_model) for the SmolLM2-135M and Gemma 3 270M shapes and a
   Llama-3.1-8B shape, all with random weights in bfloat16 (the cost of a forward does not depend
   on the weights' values);
2. plain greedy decoding tokens/s per model (the effjax engine, batch 1, `--decode-tokens` tokens)
   against the memory-bandwidth roofline: the faster of two on-device passes over 4 GiB (a sum,
   which only reads, and an elementwise product), divided by the bytes one decode step must read
   (every weight but the embedding rows not looked up, plus the KV cache's slots); the same for the
   model's weight-only int8 form (models/quant.py; `--no-int8` skips it), which reads each weight
   as one byte;
3. one step of each method's real decode loop (the effjax engine, `--steps` steps after a prefill,
   per model call; the minimum of `--reps` runs round-robin), against the bare forward of its block;
4. the speedup over plain decoding each method would have at the tau measured on CPU
   (BENCHMARKS.md, SpecBench): from the forwards, tau x cost(1) / cost(block) (a step costing
   exactly the forward of its block), and from the steps, tau x step(ar) / step(method). The
   Llama-3.1-8B rows use the paper's taus (ESP.md), as no 8B model runs on CPU. A method's step
   with random weights accepts next to nothing; what it costs barely depends on what it accepts.

A deadline (`--budget-s`, default 420 s) skips what would not fit; skipped items are listed. The
JSON and markdown are rewritten after each model, so a run stopped early keeps what it measured,
and an error in one model's part is recorded in its entry and the others still run.
Needs only jax, flax and this repository (no model packages, no network).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()
sys.path.insert(0, str(ROOT))

# Measured in this order (each k compiles, 6-7 s on an H200) until the forwards' part of the
# model's share of the deadline is spent: the blocks of the methods below first.
KS = (1, 11, 30, 60, 81, 64, 4, 10, 16, 32, 2, 8, 24, 48, 3, 6, 12, 40, 56)
FORWARDS_SHARE = 0.35  # the rest for the decode run and the steps (16-38 s to compile each there)
# tau (tokens per model call) measured on this project's CPU, SpecBench dev --limit 3, 128 new
# tokens, greedy (BENCHMARKS.md, "SpecBench": prompt lookup and ESP from the 2026-12-02 / 12-03
# tables, Token Recycling with its table carried over, the hybrid from "The hybrid's suffix
# matches capped at 8 tokens" and, at BC80, "The hybrid at Token Recycling's forward size", both
# 2026-12-04). Gemma's ESP at BC60 ran as the dynamic tree only.
# Steps are timed in this order, as time allows.
CPU_TAUS = {
    "smollm2-135m": {"hybrid-bc30": 2.57, "pld": 1.65, "esp-bc30": 1.27, "tr": 2.31,
                     "hybrid-bc60": 2.84, "esp-bc60": 1.29, "hybrid-bc80": 3.00},
    "gemma3-270m": {"hybrid-bc30": 10.80, "pld": 6.22, "esp-bc30": 1.59, "tr": 3.30,
                    "hybrid-bc60": 13.61, "esp-dyn-bc60": 1.68, "hybrid-bc80": 14.34},
    # The paper's LLaMA3.1-8B SpecBench taus (ESP.md): PLD, Lookahead at BC30, ESP BC30 / BC60.
    "llama3.1-8b": {"esp-bc30": 1.63, "pld": 1.44, "lookahead-bc30": 1.45, "esp-bc60": 1.71},
}
DRY_RUN_METHODS = ("pld",)  # steps in the dry run: plain decoding and this (cheap to compile)


def model_configs(dry_run: bool) -> dict:
  from effjax.models.config import PRESETS, RopeScaling, make_config, tiny_config

  if dry_run:
    return {"smollm2-135m": tiny_config("llama", num_layers=2, dtype="bfloat16"),
            "gemma3-270m": tiny_config("gemma3", num_layers=2, layer_kinds=("sliding", "global"),
                               dtype="bfloat16"),
            "llama3.1-8b": tiny_config("llama", num_layers=3, dtype="bfloat16")}
  llama8b = PRESETS.get("llama3.1-8b") or make_config(
      "llama", vocab_size=128256, dim=4096, mlp_dim=14336, num_layers=32, num_heads=32,
      num_kv_heads=8, head_dim=128, rope_theta=500_000.0, max_position=131072,
      rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), tie_embeddings=False)
  return {name: dataclasses.replace(cfg, dtype="bfloat16") for name, cfg in
          (("smollm2-135m", PRESETS["smollm2-135m"]), ("gemma3-270m", PRESETS["gemma3-270m"]),
           ("llama3.1-8b", llama8b))}


def memory_bandwidth(n_bytes: int, reps: int) -> dict:
  """Bytes per second of two on-device passes over n_bytes: an elementwise pass (reads and writes
  n_bytes each) and a sum (reads them once, as a decode step reads its weights); each the best
  of `reps` calls."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((n_bytes // 4,), jnp.float32)
  passes = {"elementwise": (jax.jit(lambda x: x * 2), 2 * n_bytes),
            "read": (jax.jit(jnp.sum), n_bytes)}
  out = {}
  for name, (f, moved) in passes.items():
    jax.block_until_ready(f(x))
    best = float("inf")
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(f(x))
      best = min(best, time.perf_counter() - t)
    out[name] = moved / best
  return out


def step_bytes(cfg, cache_len: int) -> int:
  """Bytes one plain decode step reads: the weights as stored (int8 codes and their scales where
  cfg.quant says; the input embedding: one row, unless tied as the head) and the whole KV cache
  (the engine attends over every slot)."""
  import jax.numpy as jnp
  from flax import nnx

  from effjax.models.transformer import abstract_model

  total = 0
  for path, var in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param)):
    x = var.get_value()
    n = int(x.size) * x.dtype.itemsize
    if path[0] in ("embed", "embed_scales") and not cfg.tie_embeddings:
      n //= cfg.vocab_size  # the input table: one row per step
    total += n
  kv = 2 * cfg.num_layers * cache_len * cfg.num_kv_heads * cfg.head_dim
  return total + kv * jnp.dtype(cfg.jnp_dtype).itemsize


def decode_rate(model, cache_len: int, prompt_len: int, new_tokens: int) -> float:
  """Plain greedy tokens/s after the prefill (second run; the first compiles)."""
  from effjax.decoding.engine import Engine

  eng = Engine(model, cache_len=cache_len, eos_ids=[])
  prompt = [[1 + i % 100 for i in range(prompt_len)]]
  eng.generate(prompt, max_new_tokens=new_tokens)
  res = eng.generate(prompt, max_new_tokens=new_tokens)
  return (len(res.tokens[0]) - 1) / res.decode_s


def log(text: str) -> None:
  """Progress on stderr, with the seconds since the start."""
  print(f"[{time.perf_counter() - T0:6.1f} s] {text}", file=sys.stderr, flush=True)


def step_costs(model, methods: list[str], cache_len: int, steps: int, reps: int,
               until: float) -> tuple[dict, list[str]]:
  """Seconds per model call of each method's decode loop (plain decoding 'ar' first), the minimum
  of `reps` runs round-robin after a warm-up run each (which compiles); methods whose warm-up
  would start after `until` are left out and returned second."""
  from effjax.decoding.cost_model import step_seconds
  from effjax.decoding.engine import Engine
  from effjax.decoding.methods import make_strategy, parse_label

  engine = Engine(model, cache_len=cache_len, eos_ids=[])
  prompt = [1 + i % 100 for i in range(min(128, cache_len // 4))]
  timers, skipped = {}, []
  for method in ["ar", *(m for m in methods if m != "ar")]:
    if timers and time.perf_counter() > until:
      skipped.append(method)
      continue
    strategy = make_strategy(*parse_label(method))
    timers[method] = lambda strategy=strategy: step_seconds(engine, strategy, prompt, steps)[0]
    timers[method]()
    log(f"step {method} compiled")
  best = dict.fromkeys(timers, float("inf"))
  for _ in range(reps):
    for method, timer in timers.items():
      best[method] = min(best[method], timer())
  return best, skipped


def check_model(name: str, cfg, args, result: dict, until: float) -> dict:
  """One model's forwards, decode rate, steps and implied speedups (what fits before `until`)."""
  from effjax.decoding.cost_model import measure
  from effjax.decoding.methods import make_strategy, parse_label
  from effjax.models.transformer import create_model

  start = time.perf_counter()
  share = until - start
  model = create_model(cfg)
  entry = {"params_dtype": cfg.dtype, "layers": cfg.num_layers, "dim": cfg.dim,
           "vocab": cfg.vocab_size}
  costs = {}
  for k in args.ks:
    if costs and time.perf_counter() > start + share * FORWARDS_SHARE:
      result["skipped"].append(f"{name} k={k}")
      continue
    costs[k] = measure(model, [(args.cache_len, k)], reps=args.reps).seconds(k, args.cache_len)
    log(f"{name} forward k={k}: {costs[k] * 1e3:.2f} ms")
  costs = dict(sorted(costs.items()))
  entry["forward_ms"] = {str(k): round(v * 1e3, 4) for k, v in costs.items()}
  entry["forward_vs_k1"] = {str(k): round(v / costs[1], 3) for k, v in costs.items()}
  # The int8 variant's random codes: a decode step's cost does not depend on the weights' values.
  # Its model is made only when its decode runs (an 8B model's init takes seconds of the lease).
  variants = [("", cfg, 0.1)] + ([("int8_", cfg.replace(quant="int8"), 0.15)] if args.int8 else [])
  for prefix, c, until_share in variants:
    what = f"{name} {prefix or 'bf16_'}decode"
    if time.perf_counter() > start + share * (FORWARDS_SHARE + until_share):
      result["skipped"].append(what)
      continue
    m = create_model(c) if prefix else model
    rate = decode_rate(m, args.cache_len, min(128, args.cache_len // 4), args.decode_tokens)
    roof = result["copy_bandwidth_GBps"] * 1e9 / step_bytes(c, args.cache_len)
    entry.update({f"{prefix}decode_tokens_per_s": round(rate, 2),
                  f"{prefix}roofline_tokens_per_s": round(roof, 2),
                  f"{prefix}roofline_fraction": round(rate / roof, 3)})
    log(f"{what}: {rate:.1f} tokens/s, roofline {roof:.1f}")
  taus = CPU_TAUS[name]
  methods = args.methods.split(",") if args.methods else list(taus)
  steps, skipped = step_costs(model, methods, args.cache_len, args.steps, args.reps, until)
  result["skipped"] += [f"{name} step {m}" for m in skipped]
  entry["step_ms"] = {m: round(v * 1e3, 4) for m, v in steps.items()}
  blocks = {m: make_strategy(*parse_label(m)).block_size for m in {*taus, *steps}}
  entry["step_vs_forward"] = {m: round(v / costs[min(k for k in costs if k >= blocks[m])], 3)
                              for m, v in steps.items()
                              if m in blocks and any(k >= blocks[m] for k in costs)}
  implied = {}
  for method, tau in taus.items():
    block = blocks[method]
    have = [k for k in costs if k >= block]
    row = {"tau": tau, "block": block}
    if have:
      row["speedup"] = round(tau * costs[1] / costs[min(have)], 3)
    if method in steps:
      row["step_speedup"] = round(tau * steps["ar"] / steps[method], 3)
    implied[method] = row
  entry["implied_speedup"] = implied
  return entry


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default="runs/device_check")
  p.add_argument("--dry-run", action="store_true", help="tiny shapes, few calls (CPU test)")
  p.add_argument("--cache-len", type=int, default=1024)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--decode-tokens", type=int, default=256)
  p.add_argument("--steps", type=int, default=16, help="decode-loop steps per timed step run")
  p.add_argument("--budget-s", type=float, default=420.0)
  p.add_argument("--ks", default=",".join(map(str, KS)),
                 help="forward sizes, measured in this order until each model's share is spent")
  p.add_argument("--methods", default="",
                 help="methods whose step to time (default: those with a CPU tau for the model)")
  p.add_argument("--models", default="", help="default: all three")
  p.add_argument("--no-int8", dest="int8", action="store_false",
                 help="skip the int8 weights' decode rate")
  args = p.parse_args(argv)
  import jax

  from effjax.decoding.cost_model import device_name

  t0 = time.perf_counter()
  deadline = t0 + args.budget_s
  args.ks = [int(k) for k in args.ks.split(",") if k]
  if args.dry_run:
    args.ks, args.cache_len, args.reps, args.decode_tokens, args.steps = (1, 11, 4, 2), 64, 2, 8, 4
    args.methods = args.methods or ",".join(DRY_RUN_METHODS)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = jax.devices()[0]
  result = {"device": device_name(), "device_kind": getattr(device, "device_kind", ""),
            "platform": device.platform, "jax": jax.__version__, "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": args.dry_run,
            "cache_len": args.cache_len, "reps": args.reps, "steps": args.steps,
            "command": " ".join(["python", *sys.argv]), "models": {}, "skipped": []}
  bw_bytes = (8 << 20) if args.dry_run else (4 << 30)
  bandwidth = memory_bandwidth(bw_bytes, args.reps)
  result["bandwidth_pass_bytes"] = bw_bytes
  result["elementwise_bandwidth_GBps"] = round(bandwidth["elementwise"] / 1e9, 1)
  # The roofline's bandwidth: the faster pass (a decode step mostly reads).
  result["copy_bandwidth_GBps"] = round(max(bandwidth.values()) / 1e9, 1)
  log(f"bandwidth {bandwidth}")

  configs = model_configs(args.dry_run)
  if args.models:
    configs = {n: configs[n] for n in args.models.split(",")}
  for i, (name, cfg) in enumerate(configs.items()):
    now = time.perf_counter()
    share = (deadline - now) / (len(configs) - i)  # what is left, shared by the models left
    if share <= 0:
      result["skipped"].append(name)
      continue
    try:
      result["models"][name] = check_model(name, cfg, args, result, now + share)
    except Exception as e:  # keep the other models' numbers; the error is in the report
      result["models"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      traceback.print_exc()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "device_check.json").write_text(json.dumps(result, indent=1))
    (out / "device_check.md").write_text(markdown(result))
  print(markdown(result))
  return 0 if all("error" not in m for m in result["models"].values()) else 1


def markdown(r: dict) -> str:
  lines = [f"Device check on {r['device']} ({r['device_kind']}, jax {r['jax']}), {r['date']}, "
           f"`{r['command']}`, {r['seconds'] if 'seconds' in r else '?'} s"
           + (" (DRY RUN: tiny shapes)" if r["dry_run"] else "") + ".", "",
           f"Memory bandwidth (roofline): {r['copy_bandwidth_GBps']:.0f} GB/s, the faster of a "
           f"sum over {r['bandwidth_pass_bytes'] / 2**30:g} GiB and an elementwise pass "
           f"({r.get('elementwise_bandwidth_GBps', float('nan')):.0f} GB/s). Forwards: k tokens "
           f"over a {r['cache_len']}-slot cache, layers + logits at every token, min of "
           f"{r['reps']} calls.", ""]
  models = {n: m for n, m in r["models"].items() if "error" not in m}
  for name, m in r["models"].items():
    if "error" in m:
      lines += [f"**{name} failed**: {m['error']}", ""]
  ks = sorted({int(k) for m in models.values() for k in m["forward_ms"]})
  lines.append("| model | " + " | ".join(f"k={k}" for k in ks) + " |")
  lines.append("|---|" + "---|" * len(ks))
  for name, m in models.items():
    cells = [f"{m['forward_ms'][str(k)]:.2f} ms ({m['forward_vs_k1'][str(k)]:.2f}x)"
             if str(k) in m["forward_ms"] else "-" for k in ks]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "Plain decoding with bfloat16 and with int8 weights (int8 / bf16: the ratio of "
            "their tokens/s):", "",
            "| model | weights | decode tokens/s | roofline tokens/s | fraction | int8 / bf16 |",
            "|---|---|---|---|---|---|"]
  for name, m in models.items():
    for prefix, weights in (("", "bfloat16"), ("int8_", "int8")):
      if f"{prefix}decode_tokens_per_s" in m:
        ratio = (f"{m['int8_decode_tokens_per_s'] / m['decode_tokens_per_s']:.2f}x"
                 if prefix and "decode_tokens_per_s" in m else "-")
        lines.append(f"| {name} | {weights} | {m[f'{prefix}decode_tokens_per_s']:.1f} | "
                     f"{m[f'{prefix}roofline_tokens_per_s']:.1f} | "
                     f"{m[f'{prefix}roofline_fraction']:.2f} | {ratio} |")
  lines += ["", f"One step of each method's decode loop ({r['steps']} steps after a prefill, per "
            f"model call, min of {r['reps']} runs), against the forward of its block:", "",
            "| model | method | step ms | step / forward of its block |", "|---|---|---|---|"]
  for name, m in models.items():
    for method, ms in m["step_ms"].items():
      ratio = m["step_vs_forward"].get(method)
      lines.append(f"| {name} | {method} | {ms:.2f} | "
                   + ("-" if ratio is None else f"{ratio:.2f}") + " |")
  lines += ["", "Speedup over plain decoding implied by the CPU-measured tau: from the forwards "
            "(tau x cost(1) / cost(block)) and from the steps (tau x step(ar) / step(method)):",
            "", "| model | method | tau | block | from forwards | from steps |",
            "|---|---|---|---|---|---|"]
  for name, m in models.items():
    for method, v in m["implied_speedup"].items():
      cells = [f"{v[key]:.2f}x" if key in v else "-" for key in ("speedup", "step_speedup")]
      lines.append(f"| {name} | {method} | {v['tau']:.2f} | {v['block']} | "
                   + " | ".join(cells) + " |")
  if r["skipped"]:
    lines += ["", "Skipped (deadline): " + ", ".join(r["skipped"])]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.exit(main())
