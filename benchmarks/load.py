"""Loading and prefill: the embedded models from GGUF (first load) and from the Orbax cache, and
512-token prefill throughput, effjax vs transformers + torch on the same weights, in one run.

    python benchmarks/load.py [--models smollm2-135m-instruct gemma3-270m] [--repeats 5]
                              [--out BENCHMARKS.md]

Every measurement runs in its own subprocess, so its peak memory (ru_maxrss) is its own:
- first load: `load_model(name)` with an empty cache (GGUF parse, dequantize, tokenizer rebuild,
  Orbax write);
- cached load: the same call again (Orbax restore + tokenizer.json);
- prefill: float32, batch 1, 512 prompt tokens, the next-token logits only; effjax jitted, after
  warm-up; transformers + torch (its own GGUF loading, dequantized to dense float32) in the same
  process, timed alternately with effjax so machine noise hits both. Median over --repeats.
Writes a markdown section into BENCHMARKS.md (replacing its previous version).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from report import write_section  # noqa: E402

HEADING = "## Loading and prefill (benchmarks/load.py)"
PROMPT_TOKENS = 512
PARAGRAPH = ("The history of mathematics spans thousands of years, from counting and measurement in "
             "ancient Mesopotamia to the abstract structures of modern algebra. def mean(xs): return "
             "sum(xs) / len(xs)  # 3.14159, 2.71828 and 1.41421 are famous constants. ")


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child_load(name: str) -> dict:
  import jax

  from effjax.checkpoints.registry import load_model

  t = time.perf_counter()
  loaded = load_model(name)
  jax.block_until_ready(jax.tree.leaves(loaded.model))
  return dict(seconds=time.perf_counter() - t, peak_rss_mb=_peak_rss_mb(), source=loaded.source)


def _prompt_ids(tokenizer) -> list[int]:
  ids = tokenizer(PARAGRAPH * 64).input_ids
  assert len(ids) >= PROMPT_TOKENS
  return ids[:PROMPT_TOKENS]


def child_prefill(name: str, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx
  from transformers import AutoModelForCausalLM, GgufConfig

  from effjax.checkpoints.registry import MODELS, load_model

  loaded = load_model(name)
  ids = _prompt_ids(loaded.tokenizer)
  graphdef, state = nnx.split(loaded.model)

  @jax.jit
  def prefill(state, tokens):
    model = nnx.merge(graphdef, state)
    out = model(tokens, compute_logits=False)
    return model.logits(out.hidden[:, -1])

  tokens = jnp.asarray([ids])
  gguf = MODELS[name].gguf_path()
  ref = AutoModelForCausalLM.from_pretrained(
      str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
      quantization_config=GgufConfig(dequantize=True)).eval()
  assert all(p.dtype == torch.float32 for p in ref.parameters())  # dense float32, like effjax
  x = torch.tensor([ids])

  def run_effjax() -> float:
    t = time.perf_counter()
    prefill(state, tokens).block_until_ready()
    return time.perf_counter() - t

  def run_torch() -> float:
    with torch.inference_mode():
      t = time.perf_counter()
      ref(x, use_cache=False, logits_to_keep=1)
      return time.perf_counter() - t

  compile_s = run_effjax()
  run_torch()
  ours, theirs = [], []
  for _ in range(repeats):
    ours.append(run_effjax())
    theirs.append(run_torch())
  with torch.inference_mode():
    want = ref(x, use_cache=False, logits_to_keep=1).logits[0, -1].numpy()
  got = jax.device_get(prefill(state, tokens))[0]
  return dict(effjax_tps=PROMPT_TOKENS / statistics.median(ours),
              torch_tps=PROMPT_TOKENS / statistics.median(theirs), compile_s=compile_s,
              max_abs_logit_diff=float(abs(got - want).max()), torch_threads=torch.get_num_threads())


def run_child(kind: str, name: str, cache: Path, repeats: int) -> dict:
  env = dict(os.environ, EFFJAX_CACHE=str(cache))
  t = time.perf_counter()
  proc = subprocess.run([sys.executable, __file__, "--repeats", str(repeats), "--child", kind, name],
                        env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{kind} {name} failed:\n{proc.stderr[-4000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["process_s"] = time.perf_counter() - t
  return result


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
  ap.add_argument("--child", nargs=2, metavar=("KIND", "NAME"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    kind, name = args.child
    result = child_load(name) if kind == "load" else child_prefill(name, args.repeats)
    print(json.dumps(result))
    return

  import jax
  import torch

  load_before = os.getloadavg()[0]
  rows = []
  with tempfile.TemporaryDirectory(prefix="effjax-bench-cache-") as tmp:
    for name in args.models:
      cache = Path(tmp) / name
      first = run_child("load", name, cache, args.repeats)
      cached = run_child("load", name, cache, args.repeats)
      prefill = run_child("prefill", name, cache, args.repeats)
      rows.append((name, first, cached, prefill))
      print(name, json.dumps(dict(first=first, cached=cached, prefill=prefill)), flush=True)

  lines = [
      "| model | first load from GGUF (s) | peak RSS (MB) | cached load from Orbax (s) | peak RSS (MB) "
      "| prefill 512, effjax (tok/s) | transformers + torch (tok/s) | effjax / torch |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, first, cached, prefill in rows:
    lines.append(
        f"| {name} | {first['seconds']:.1f} | {first['peak_rss_mb']:.0f} | {cached['seconds']:.1f} "
        f"| {cached['peak_rss_mb']:.0f} | {prefill['effjax_tps']:.0f} | {prefill['torch_tps']:.0f} "
        f"| {prefill['effjax_tps'] / prefill['torch_tps']:.2f} |")
  details = "; ".join(
      f"{name}: process wall incl. imports {first['process_s']:.1f} s / {cached['process_s']:.1f} s, "
      f"jit compile {prefill['compile_s']:.1f} s, max |logit diff| vs torch "
      f"{prefill['max_abs_logit_diff']:.1e}" for name, first, cached, prefill in rows)
  body = "\n".join([
      f"Measured {datetime.date.today().isoformat()} on {platform.machine()} with {os.cpu_count()} CPU "
      f"cores ({jax.default_backend()}), jax {jax.__version__}, torch {torch.__version__} "
      f"({rows[0][3]['torch_threads']} threads); 1-minute load average {load_before:.1f} before and "
      f"{os.getloadavg()[0]:.1f} after the run (other jobs share the machine). Command:",
      "",
      "    " + " ".join(["python benchmarks/load.py", *sys.argv[1:]]),
      "",
      *lines,
      "",
      "Load times are `load_model(name)` in a fresh process (imports excluded), first with an empty "
      "cache (GGUF parse, dequantize, tokenizer rebuild, Orbax write), then again (Orbax restore). "
      "Peak RSS is the process's ru_maxrss. Prefill: float32, batch 1, 512 tokens, next-token "
      "logits only, median of " f"{args.repeats} runs after warm-up, alternating effjax (jitted) and "
      "transformers (its own GGUF loading, dequantized to dense float32) in one process.",
      "",
      f"Details: {details}.",
  ])
  write_section(Path(args.out), HEADING, body)
  print(f"wrote {HEADING!r} to {args.out}")


if __name__ == "__main__":
  main()
