"""One prepared accelerator check: what a speculative step costs on this device, in one command.

    PYTHONPATH=. python benchmarks/device_check.py --out $OUT      # on a GPU / TPU, <= 8 minutes
    python benchmarks/device_check.py --dry-run --out /tmp/dc      # tiny shapes on CPU (a test)

Writes device_check.json and device_check.md into --out:

1. the cost of a k-token forward (k = 1..64; layers plus logits at one token, over a KV cache of
   `--cache-len` slots, each the minimum of `--reps` calls round-robin: effjax.decoding.cost_model)
   for the SmolLM2-135M and Gemma 3 270M shapes and a Llama-3.1-8B shape, all with random weights
   in bfloat16 (the cost of a forward does not depend on the weights' values);
2. plain greedy decoding tokens/s per model (the effjax engine, batch 1, `--decode-tokens` tokens)
   against the memory-bandwidth roofline: the bandwidth of a large on-device copy, divided by the
   bytes one decode step must read (every weight but the embedding rows not looked up, plus the
   KV cache's slots);
3. the speedup over plain decoding each method would have at the tau measured on CPU
   (BENCHMARKS.md, SpecBench), if a step cost exactly the forward of its block: tau x cost(1) /
   cost(block). The Llama-3.1-8B row uses the paper's taus (ESP.md), as no 8B model runs on CPU.

A deadline (`--budget-s`, default 420 s) skips what would not fit; skipped items are listed.
Needs only jax, flax and this repository (no model packages, no network).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Measured in this order (each k compiles) until the model's share of the deadline is spent; the
# blocks of the methods below come early.
KS = (1, 64, 11, 30, 60, 4, 10, 16, 32, 2, 8, 24, 48, 3, 6, 12, 40, 56)
# tau (tokens per model call) measured on this project's CPU, SpecBench dev --limit 3, greedy
# (BENCHMARKS.md, "SpecBench", 2026-11-29 run), with each method's block (tokens per forward).
BLOCKS = {"pld": 11, "lookahead-bc30": 30, "esp-bc10": 10, "esp-bc30": 30, "esp-bc60": 60,
          "hybrid-bc30": 30}
CPU_TAUS = {
    "smollm2-135m": {"pld": 1.56, "lookahead-bc30": 1.38, "esp-bc10": 1.16, "esp-bc30": 1.25,
                     "esp-bc60": 1.28, "hybrid-bc30": 1.78},
    "gemma3-270m": {"pld": 4.77, "lookahead-bc30": 1.68, "esp-bc10": 1.43, "esp-bc30": 1.57,
                    "esp-bc60": 1.65, "hybrid-bc30": 5.22},
    # The paper's LLaMA3.1-8B SpecBench taus (ESP.md): PLD, Lookahead at BC30, ESP BC30 / BC60.
    "llama3.1-8b": {"pld": 1.44, "lookahead-bc30": 1.45, "esp-bc30": 1.63, "esp-bc60": 1.71},
}


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


def copy_bandwidth(n_bytes: int, reps: int) -> float:
  """Bytes per second of an on-device elementwise pass (reads and writes n_bytes each)."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda x: x * 2)
  jax.block_until_ready(f(x))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(x))
    best = min(best, time.perf_counter() - t)
  return 2 * n_bytes / best


def step_bytes(cfg, cache_len: int) -> int:
  """Bytes one plain decode step reads: the weights (embedding: one row, unless tied as the head)
  and the whole KV cache (the engine attends over every slot)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from effjax.models.transformer import abstract_model

  itemsize = jnp.dtype(cfg.jnp_dtype).itemsize
  params = nnx.state(abstract_model(cfg), nnx.Param)
  total = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
  if not cfg.tie_embeddings:
    total -= cfg.vocab_size * cfg.dim - cfg.dim  # the input table: one row per step
  kv = 2 * cfg.num_layers * cache_len * cfg.num_kv_heads * cfg.head_dim
  return (total + kv) * itemsize


def decode_rate(model, cache_len: int, prompt_len: int, new_tokens: int) -> float:
  """Plain greedy tokens/s after the prefill (second run; the first compiles)."""
  from effjax.decoding.engine import Engine

  eng = Engine(model, cache_len=cache_len, eos_ids=[])
  prompt = [[1 + i % 100 for i in range(prompt_len)]]
  eng.generate(prompt, max_new_tokens=new_tokens)
  res = eng.generate(prompt, max_new_tokens=new_tokens)
  return (len(res.tokens[0]) - 1) / res.decode_s


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default="runs/device_check")
  p.add_argument("--dry-run", action="store_true", help="tiny shapes, few calls (CPU test)")
  p.add_argument("--cache-len", type=int, default=1024)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--decode-tokens", type=int, default=256)
  p.add_argument("--budget-s", type=float, default=420.0)
  args = p.parse_args(argv)
  import jax

  from effjax.decoding.cost_model import device_name, measure
  from effjax.models.transformer import create_model

  t0 = time.perf_counter()
  deadline = t0 + args.budget_s
  ks = (1, 11, 4, 2) if args.dry_run else KS
  cache_len = 64 if args.dry_run else args.cache_len
  reps = 2 if args.dry_run else args.reps
  new_tokens = 8 if args.dry_run else args.decode_tokens
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = jax.devices()[0]
  result = {"device": device_name(), "device_kind": getattr(device, "device_kind", ""),
            "platform": device.platform, "jax": jax.__version__, "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": args.dry_run,
            "cache_len": cache_len, "reps": reps, "command": " ".join(["python", *sys.argv]),
            "models": {}, "skipped": []}
  bw_bytes = (8 << 20) if args.dry_run else (4 << 30)
  result["copy_bandwidth_GBps"] = copy_bandwidth(bw_bytes, reps) / 1e9

  configs = model_configs(args.dry_run)
  for i, (name, cfg) in enumerate(configs.items()):
    now = time.perf_counter()
    share = (deadline - now) / (len(configs) - i)  # what is left, shared by the models left
    if share <= 0:
      result["skipped"].append(name)
      continue
    model = create_model(cfg)
    entry = {"params_dtype": cfg.dtype, "layers": cfg.num_layers, "dim": cfg.dim,
             "vocab": cfg.vocab_size}
    costs = {}
    for k in ks:  # a third of the share stays for the decode run
      if costs and time.perf_counter() > now + share * 2 / 3:
        result["skipped"].append(f"{name} k={k}")
        continue
      costs[k] = measure(model, [(cache_len, k)], reps=reps).seconds(k, cache_len)
    costs = dict(sorted(costs.items()))
    entry["forward_ms"] = {str(k): round(v * 1e3, 4) for k, v in costs.items()}
    entry["forward_vs_k1"] = {str(k): round(v / costs[1], 3) for k, v in costs.items()}
    if time.perf_counter() < now + share:
      rate = decode_rate(model, cache_len, min(128, cache_len // 4), new_tokens)
      roof = result["copy_bandwidth_GBps"] * 1e9 / step_bytes(cfg, cache_len)
      entry.update(decode_tokens_per_s=round(rate, 2), roofline_tokens_per_s=round(roof, 2),
                   roofline_fraction=round(rate / roof, 3))
    else:
      result["skipped"].append(f"{name} decode")
    implied = {}
    for method, tau in CPU_TAUS[name].items():
      block = BLOCKS[method]
      have = [k for k in costs if k >= block]
      if have:
        implied[method] = {"tau": tau, "block": block,
                           "speedup": round(tau * costs[1] / costs[min(have)], 3)}
    entry["implied_speedup"] = implied
    result["models"][name] = entry
    del model

  result["seconds"] = round(time.perf_counter() - t0, 1)
  (out / "device_check.json").write_text(json.dumps(result, indent=1))
  (out / "device_check.md").write_text(markdown(result))
  print(markdown(result))
  return 0


def markdown(r: dict) -> str:
  lines = [f"Device check on {r['device']} ({r['device_kind']}, jax {r['jax']}), {r['date']}, "
           f"`{r['command']}`, {r['seconds'] if 'seconds' in r else '?'} s"
           + (" (DRY RUN: tiny shapes)" if r["dry_run"] else "") + ".", "",
           f"Copy bandwidth: {r['copy_bandwidth_GBps']:.0f} GB/s. Forwards: k tokens over a "
           f"{r['cache_len']}-slot cache, layers + logits at one token, min of {r['reps']} calls.",
           ""]
  models = r["models"]
  ks = sorted({int(k) for m in models.values() for k in m["forward_ms"]})
  lines.append("| model | " + " | ".join(f"k={k}" for k in ks) + " |")
  lines.append("|---|" + "---|" * len(ks))
  for name, m in models.items():
    cells = [f"{m['forward_ms'][str(k)]:.2f} ms ({m['forward_vs_k1'][str(k)]:.2f}x)"
             if str(k) in m["forward_ms"] else "-" for k in ks]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "| model | decode tokens/s | roofline tokens/s | fraction |", "|---|---|---|---|"]
  for name, m in models.items():
    if "decode_tokens_per_s" in m:
      lines.append(f"| {name} | {m['decode_tokens_per_s']:.1f} | "
                   f"{m['roofline_tokens_per_s']:.1f} | "
                   f"{m['roofline_fraction']:.2f} |")
  lines += ["", "Speedup implied by the CPU-measured tau (tau x cost(1) / cost(block)):", "",
            "| model | method | tau | block | implied speedup |", "|---|---|---|---|---|"]
  for name, m in models.items():
    for method, v in m["implied_speedup"].items():
      lines.append(f"| {name} | {method} | {v['tau']:.2f} | {v['block']} | {v['speedup']:.2f}x |")
  if r["skipped"]:
    lines += ["", "Skipped (deadline): " + ", ".join(r["skipped"])]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.exit(main())
