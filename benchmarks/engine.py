"""Engine throughput: effjax vs transformers + torch on the same weights, in one run.

    python benchmarks/engine.py [--model smollm2-135m-instruct] [--new-tokens 64] [--out BENCHMARKS.md]
        [--cache-len N] [--skip-torch] [--notes benchmarks/notes/engine.md]

Measures (float32, CPU unless an accelerator is present):
- greedy batch-1 decode tokens/s on SpecBench prompts, effjax vs transformers `generate` (torch),
  interleaved per prompt so machine noise hits both, and the memory-bandwidth roofline
  (parameter bytes read per token / measured copy bandwidth);
- batched decode throughput for batch 1, 8, 32, 64;
- time to first token, including compilation, for a fresh engine.
Writes a markdown section into BENCHMARKS.md (replacing its previous version).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from report import write_section  # noqa: E402

from effjax.checkpoints.registry import MODELS, load_model  # noqa: E402
from effjax.data import load_problems  # noqa: E402
from effjax.data.chat import encode_prompt  # noqa: E402
from effjax.decoding.engine import Engine, cache_len_for  # noqa: E402


def copy_bandwidth_gbs(mb: int = 512) -> float:
  a = np.ones(mb * 2**20 // 8)
  b = np.empty_like(a)
  best = 0.0
  for _ in range(5):
    t = time.perf_counter()
    np.copyto(b, a)
    best = max(best, 2 * a.nbytes / (time.perf_counter() - t))  # read + write
  return best / 1e9


def torch_model(name: str):
  import torch
  from transformers import AutoModelForCausalLM

  gguf = MODELS[name].gguf_path()
  model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               torch_dtype=torch.float32)
  return model.eval()


def torch_decode_tps(model, ids: list[int], new_tokens: int) -> float:
  import torch

  x = torch.tensor([ids])
  with torch.inference_mode():
    t = time.perf_counter()
    out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    dt = time.perf_counter() - t
  return (out.shape[1] - len(ids)) / dt


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--data", default="sample:spec_bench")
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--batches", default="1,8,32,64")
  ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--cache-len", type=int, default=0, help="engine cache slots (0: sized to the job)")
  ap.add_argument("--notes", default="", help="a markdown file appended to the section")
  args = ap.parse_args()
  command = "python benchmarks/engine.py " + " ".join(sys.argv[1:])

  t0 = time.perf_counter()
  loaded = load_model(args.model)
  load_s = time.perf_counter() - t0
  tok = loaded.tokenizer
  problems = load_problems(args.data)
  prompts = [encode_prompt(tok, p.prompt) for p in problems[:args.prompts]]
  # A cache sized to the job, as `effjax generate` does (transformers' dynamic cache grows instead).
  cache_len = args.cache_len or cache_len_for([len(p) for p in prompts], args.new_tokens,
                                              loaded.cfg.max_position)
  # Decode must run new_tokens steps for every method: no EOS.
  make_engine = lambda: Engine(loaded.model, cache_len=cache_len, eos_ids=[])

  t0 = time.perf_counter()
  engine = make_engine()
  first = engine.generate([prompts[0]], max_new_tokens=1)
  ttft_cold = time.perf_counter() - t0
  engine.generate([prompts[0]], max_new_tokens=args.new_tokens)  # compile the decode loop
  t0 = time.perf_counter()
  engine.generate([prompts[0]], max_new_tokens=1)
  ttft_warm = time.perf_counter() - t0
  del first

  tm = None if args.skip_torch else torch_model(args.model)
  ours, theirs = [], []
  for ids in prompts:
    res = engine.generate([ids], max_new_tokens=args.new_tokens)
    ours.append((len(res.tokens[0]) - 1) / res.decode_s)
    if tm is not None:
      theirs.append(torch_decode_tps(tm, ids, args.new_tokens))

  param_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.params))
  bw = copy_bandwidth_gbs()
  roofline_ms = param_bytes / (bw * 1e9) * 1e3
  ms_per_token = 1e3 / statistics.median(ours)

  batch_rows = []
  for b in [int(x) for x in args.batches.split(",")]:
    rows = [prompts[i % len(prompts)] for i in range(b)]
    engine.generate(rows, max_new_tokens=4)  # compile for this batch shape
    res = engine.generate(rows, max_new_tokens=args.new_tokens)
    batch_rows.append((b, b * (args.new_tokens - 1) / res.decode_s))

  lines = [
      f"Date: {datetime.date.today()}; device: {jax.devices()[0].device_kind}; model: {args.model} "
      f"(float32, {param_bytes / 2**20:.0f} MiB of parameters); engine cache {cache_len} slots; "
      f"command: `{command}`.",
      f"Model load: {load_s:.1f} s. Time to first token, fresh engine incl. compilation: "
      f"{ttft_cold:.1f} s; warm: {ttft_warm * 1e3:.0f} ms.",
      "",
      "| greedy batch-1 decode | tokens/s (median of prompts) | ms/token |",
      "|---|---|---|",
      f"| effjax | {statistics.median(ours):.1f} | {ms_per_token:.1f} |",
  ]
  if theirs:
    lines.append(f"| transformers + torch `generate` | {statistics.median(theirs):.1f} | "
                 f"{1e3 / statistics.median(theirs):.1f} |")
    ratio = statistics.median([a / b for a, b in zip(ours, theirs)])
    lines += ["", f"effjax / torch, per-prompt median ratio: **{ratio:.2f}x**."]
  lines += [
      f"Roofline: {param_bytes / 1e6:.0f} MB read per token / {bw:.1f} GB/s copy bandwidth = "
      f"{roofline_ms:.1f} ms per token; effjax reaches **{roofline_ms / ms_per_token:.0%}** of it.",
      "", "| batch | decode tokens/s (all rows) |", "|---|---|",
      *[f"| {b} | {tps:.1f} |" for b, tps in batch_rows],
  ]
  text = "\n".join(lines)
  print(text)
  if args.notes:
    text += "\n\n" + Path(args.notes).read_text().strip()
  write_section(Path(args.out), "## Decoding engine (benchmarks/engine.py)", text)


if __name__ == "__main__":
  main()
