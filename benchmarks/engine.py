"""Decode at the memory limit: effjax against google-tunix and transformers + torch, side by side.

  python benchmarks/engine.py [--prompts 6] [--new-tokens 128] [--reps 3] [--batches 1,8,32,64]
      [--systems effjax,tunix,torch] [--out BENCHMARKS.md] [--notes benchmarks/notes/engine.md]
  python benchmarks/engine.py --setup    # only create tunix's own virtualenv

One driver, one run. Every system gets the same float32 weights (SmolLM2-135M-Instruct dequantized
from its GGUF, written once as a Hugging Face directory that every system loads), the same chat
prompts as token ids, greedy decoding at batch 1, exactly --new-tokens new tokens (no EOS). Each system
runs in its own process (benchmarks/peers.py; tunix in its own virtualenv, created here from PyPI,
never in effjax's), and the driver interleaves them prompt by prompt, rotating the order each
repetition, so only one runs at a time and machine noise hits all alike. Every prompt bucket and
both call lengths are compiled (or warmed up) before timing.

Accounting, the same for every system: a generate call of 1 new token, T(1), and one of N, T(N),
each timed whole (prompt in, token ids out). Prefill included: N / T(N) tokens/s; prefill excluded:
(N - 1) / (T(N) - T(1)). Median over repetitions per prompt, then per-prompt ratios, median over
prompts.

From the same run: the memory roofline (parameter bytes / copy bandwidth of a large np.copyto) and
the matrix-vector floor (bare XLA products of one vector with every weight matrix of the model,
best of 10; independent of each other, and chained: each waiting for the one before, as a
decode's layers do), each for the effjax variants: float32 with fused projections (the default), float32
with separate projections, and weight-only int8. Then batch 1/8/32/64 decode throughput for float32
and int8. Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from report import write_section  # noqa: E402

TUNIX = "google-tunix==0.1.7"
HEADING = "## Decoding engine (benchmarks/engine.py)"
EFFJAX_VARIANTS = ("f32", "f32-unfused", "int8")
LABELS = {("effjax", "f32"): "effjax float32 (fused projections)",
          ("effjax", "f32-unfused"): "effjax float32 (separate projections)",
          ("effjax", "int8"): "effjax int8 weights",
          ("tunix", "f32"): f"tunix {TUNIX.split('==')[1]} `Sampler`",
          ("torch", "f32"): "transformers + torch `generate`"}


def ensure_tunix_venv(venv: Path) -> Path:
  """tunix's own virtualenv (created once): its pins must not touch effjax's environment. jax is
  pinned to effjax's version so both JAX systems run the same XLA."""
  python = venv / "bin" / "python"
  if python.is_file():
    return python
  import jax
  print(f"creating {venv} with {TUNIX} (once)", file=sys.stderr)
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  subprocess.run([str(python), "-m", "pip", "install", "-q", TUNIX, f"jax=={jax.__version__}",
                  f"jaxlib=={jax.__version__}"], check=True)
  return python


def export_hf(loaded, out: Path) -> Path:
  """The effjax model's float32 weights as a Hugging Face Llama directory (what torch and tunix
  load, and effjax too, so all three read the same tensors)."""
  if (out / "model.safetensors").is_file():
    return out
  from safetensors.numpy import save_file
  from transformers import LlamaConfig

  from effjax.checkpoints.assemble import checkpoint_tensors
  from effjax.checkpoints.hf import hf_names

  cfg = loaded.cfg
  if cfg.family != "llama" or cfg.rope_scaling is not None:
    raise ValueError("the peer benchmark exports Llama models without RoPE scaling (tunix's Llama 3 "
                     "class has no scaling); pick such a model")
  to_hf = {ours: theirs for theirs, ours in hf_names(cfg).items()}
  tmp = out.with_name(out.name + ".tmp")
  tmp.mkdir(parents=True, exist_ok=True)
  save_file({to_hf[name]: value for name, value in checkpoint_tensors(loaded.model)},
            str(tmp / "model.safetensors"))
  LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
              max_position_embeddings=cfg.max_position, tie_word_embeddings=cfg.tie_embeddings,
              bos_token_id=loaded.tokenizer.bos_token_id, eos_token_id=list(cfg.eos_ids) or None,
              pad_token_id=cfg.pad_id).save_pretrained(tmp)
  loaded.tokenizer.save_pretrained(tmp)
  os.replace(tmp, out)
  return out


class Worker:
  """A benchmarks/peers.py process: one JSON request per line, one reply per line."""

  def __init__(self, system: str, python: str, hf_dir: Path, cache_len: int, env: dict):
    self.system = system
    cmd = [python, str(Path(__file__).parent / "peers.py"), "--system", system,
           "--hf-dir", str(hf_dir), "--cache-len", str(cache_len)]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env, cwd=ROOT)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the {self.system} worker exited (code {self.proc.wait()}); see its stderr")
    return json.loads(line)

  def __call__(self, op: str, **kw) -> dict:
    self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def median(xs):
  return statistics.median(xs)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--data", default="sample:spec_bench")
  ap.add_argument("--prompts", type=int, default=6)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--batches", default="1,8,32,64")
  ap.add_argument("--batch-new-tokens", type=int, default=32)
  ap.add_argument("--systems", default="effjax,tunix,torch")
  ap.add_argument("--tunix-venv", default=str(ROOT.parent / "venvs" / "tunix"))
  ap.add_argument("--setup", action="store_true", help="only create tunix's virtualenv")
  ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
  ap.add_argument("--notes", default="", help="a markdown file appended to the section")
  ap.add_argument("--raw", default=str(ROOT / "benchmarks" / "notes" / "engine_raw.json"),
                  help="every timing of the run, as JSON")
  args = ap.parse_args()
  command = "python benchmarks/engine.py " + " ".join(sys.argv[1:])
  systems = args.systems.split(",")
  if "tunix" in systems or args.setup:
    tunix_python = ensure_tunix_venv(Path(args.tunix_venv))
    if args.setup:
      return

  from effjax.checkpoints.registry import cache_root, load_model
  from effjax.data import load_problems
  from effjax.data.chat import encode_prompt
  from effjax.decoding.engine import cache_len_for

  loaded = load_model(args.model)
  prompts = [encode_prompt(loaded.tokenizer, p.prompt)
             for p in load_problems(args.data)[:args.prompts]]
  hf_dir = export_hf(loaded, cache_root() / "bench" / f"{args.model}-hf")
  # One cache length for the JAX systems: effjax's sizing, or more if tunix's power-of-two prompt
  # bucket plus the new tokens needs it (transformers grows its cache instead).
  bucket = lambda n: 1 << (n - 1).bit_length()
  cache_len = max(cache_len_for([len(p) for p in prompts], args.new_tokens, loaded.cfg.max_position),
                  max(bucket(len(p)) for p in prompts) + args.new_tokens)
  del loaded
  uptime_before = os.getloadavg()

  env = dict(os.environ, PYTHONPATH=str(ROOT))
  pythons = {"effjax": sys.executable, "torch": sys.executable}
  if "tunix" in systems:
    pythons["tunix"] = str(tunix_python)
  workers = {}
  try:
    for s in systems:
      workers[s] = Worker(s, pythons[s], hf_dir, cache_len, env)
      print(f"{s} ready: {workers[s].info}", file=sys.stderr, flush=True)
    runs = [(s, v) for s in systems for v in (EFFJAX_VARIANTS if s == "effjax" else ("f32",))]
    n = args.new_tokens
    for s, v in runs:  # compile every bucket and both call lengths; warm torch up
      for ids in prompts:
        for new in (1, n):
          workers[s]("generate", variant=v, rows=[ids], new=new)
    print("warm", file=sys.stderr, flush=True)

    times = {(r, i, new): [] for r in runs for i in range(len(prompts)) for new in (1, n)}
    tokens = {}
    floors = {v: [] for v in EFFJAX_VARIANTS}
    copies = []
    for rep in range(args.reps):
      for i, ids in enumerate(prompts):
        k = (rep * len(prompts) + i) % len(runs)
        for s, v in runs[k:] + runs[:k]:
          for new in (1, n):
            out = workers[s]("generate", variant=v, rows=[ids], new=new)
            times[((s, v), i, new)].append(out["s"])
            if new == n:
              tokens[(s, v), i] = out["tokens"][0]
        if "effjax" in workers:
          for v in EFFJAX_VARIANTS:
            floors[v].append(workers["effjax"]("floor", variant=v))
          copies.append(workers["effjax"]("copy")["gbs"])
        print(f"rep {rep} prompt {i} done", file=sys.stderr, flush=True)

    batch_rows = []
    if "effjax" in workers:
      bn = args.batch_new_tokens
      for b in [int(x) for x in args.batches.split(",")]:
        rows = [prompts[i % len(prompts)] for i in range(b)]
        row = [b]
        for v in ("f32", "int8"):
          # The first call compiles this batch shape and length (max_new_tokens is static).
          workers["effjax"]("generate", variant=v, rows=rows, new=bn)
          out = workers["effjax"]("generate", variant=v, rows=rows, new=bn)
          row += [b * bn / out["s"], b * (bn - 1) / out["decode_s"]]
        batch_rows.append(row)
        print(f"batch {b} done", file=sys.stderr, flush=True)
    infos = {s: w.info for s, w in workers.items()}
  finally:
    for w in workers.values():
      w.close()
  uptime_after = os.getloadavg()

  # -- tables --
  def rate(r, i):
    t1, tn = median(times[(r, i, 1)]), median(times[(r, i, n)])
    return n / tn, (n - 1) / (tn - t1), (tn - t1) / (n - 1) * 1e3

  per = {r: [rate(r, i) for i in range(len(prompts))] for r in runs}
  ref = ("effjax", "f32")
  lines = [
      f"Date: {datetime.date.today()}; {infos.get('effjax', {}).get('device', 'cpu')}, "
      f"{os.cpu_count()} cores; model {args.model} (float32 weights, one Hugging Face directory "
      f"for all systems); {len(prompts)} SpecBench chat prompts ({min(map(len, prompts))}-"
      f"{max(map(len, prompts))} tokens), greedy, batch 1, {n} new tokens, no EOS; JAX cache "
      f"{cache_len} slots; {args.reps} repetitions. 1-minute load average "
      f"{uptime_before[0]:.1f} before, {uptime_after[0]:.1f} after (the machine is shared).",
      f"Versions: {json.dumps(infos)}.",
      f"Command: `{command}`", "",
      "| system | tokens/s, prefill included | tokens/s, prefill excluded | ms/token (decode) "
      "| effjax f32 / system, incl. | effjax f32 / system, excl. | same greedy tokens as effjax f32 |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in runs:
    inc, exc, ms = (median([p[j] for p in per[r]]) for j in range(3))
    ratio_inc = median([a[0] / b[0] for a, b in zip(per[ref], per[r])]) if ref in per else float("nan")
    ratio_exc = median([a[1] / b[1] for a, b in zip(per[ref], per[r])]) if ref in per else float("nan")
    same = sum(tokens.get((r, i)) == tokens.get((ref, i)) for i in range(len(prompts)))
    lines.append(f"| {LABELS[r]} | {inc:.1f} | {exc:.1f} | {ms:.1f} | {ratio_inc:.2f}x | "
                 f"{ratio_exc:.2f}x | {same}/{len(prompts)} prompts |")
  if "effjax" in workers:
    bw = max(copies)
    lines += ["", "| effjax variant | decode ms/token | weight bytes read per token (MB) | "
              "matvec floor ms (best) | floor / decode | chained matvec floor ms (best) | "
              "chained floor / decode | roofline ms (bytes / copy bandwidth) | roofline / decode |",
              "|---|---|---|---|---|---|---|---|---|"]
    for v in EFFJAX_VARIANTS:
      ms = median([p[2] for p in per[("effjax", v)]])
      best = min(f["ms"] for f in floors[v])
      chained = min(f["chained_ms"] for f in floors[v])
      nbytes = floors[v][0]["param_bytes"]
      roof = nbytes / (bw * 1e9) * 1e3
      lines.append(f"| {v} | {ms:.1f} | {nbytes / 1e6:.0f} | {best:.1f} | {best / ms:.0%} | "
                   f"{chained:.1f} | {chained / ms:.0%} | {roof:.1f} | {roof / ms:.0%} |")
    lines += ["", f"Copy bandwidth (best np.copyto of 512 MiB, read + write): {bw:.1f} GB/s."]
    lines += ["", f"Batched decode, {args.batch_new_tokens} new tokens per row (tokens/s, all rows):",
              "", "| batch | float32 incl. prefill | float32 decode only | int8 incl. prefill | "
              "int8 decode only | int8 / float32 (decode) |", "|---|---|---|---|---|---|"]
    for b, fi, fd, qi, qd in batch_rows:
      lines.append(f"| {b} | {fi:.1f} | {fd:.1f} | {qi:.1f} | {qd:.1f} | {qd / fd:.2f}x |")
  raw = {"times": {f"{r[0]}/{r[1]}/{i}/{new}": t for (r, i, new), t in times.items()},
         "floors": floors, "copies": copies, "batches": batch_rows}
  Path(args.raw).write_text(json.dumps(raw, indent=1) + "\n")
  text = "\n".join(lines)
  print(text)
  if args.notes:
    text += "\n\n" + Path(args.notes).read_text().strip()
  write_section(Path(args.out), HEADING, text)


if __name__ == "__main__":
  main()
