"""Cold start: the wall clock of a fresh `effjax generate` process with a short answer, per phase, for
both embedded models, against a plain transformers + torch script generating the same tokens, in
one run; plus `effjax --help` / `effjax models`, and the cached-model load (memory-mapped
safetensors vs Orbax restore).

    python benchmarks/cold_start.py [--models smollm2-135m-instruct gemma3-270m] [--repeats 5]
                                    [--out BENCHMARKS.md]

Every measurement is a new process. The model cache and effjax's stored programs are warmed first
(one untimed run of each command), as are the page cache and a safetensors copy of each model for
the torch script's best case; then the commands run round-robin, `--repeats` times each, so machine
noise hits all alike. Reported: the median wall clock (min-max), the child's CPU seconds, effjax's
own `--verbose` phases, the torch script's phases, and whether the generated tokens are equal.
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

HEADING = "## Cold start (benchmarks/cold_start.py)"
PROMPT = "What is the capital of France? Answer in one word."
MAX_NEW = 24
PHASES = ("start", "import", "load", "prompt", "compile", "prefill", "decode")


def timed(cmd: list[str], env: dict | None = None) -> dict:
  """Run `cmd` to completion: wall seconds, the child's CPU seconds, stdout, stderr."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  wall = time.perf_counter() - t
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return dict(wall=wall, cpu=cpu, out=proc.stdout, err=proc.stderr)


def effjax_phases(stderr: str) -> dict[str, float]:
  """The wall seconds per phase of `effjax generate --verbose` (compile rows summed)."""
  phases: dict[str, float] = {}
  for line in stderr.splitlines():
    parts = line.split()
    if len(parts) >= 3 and parts[0] in PHASES:
      phases[parts[0]] = phases.get(parts[0], 0.0) + float(parts[1])
  return phases


def commands(name: str, gguf: Path, st_dir: Path, chat: bool) -> dict[str, list[str]]:
  chat_flag = [] if chat else ["--no-chat"]
  py = sys.executable
  torch_script = [py, str(ROOT / "benchmarks" / "torch_generate.py"), "--prompt", PROMPT,
                  "--max-new-tokens", str(MAX_NEW), *chat_flag]
  return {
      f"effjax generate {name}": [py, "-m", "effjax.cli", "generate", "--model", name, "--prompt",
                                  PROMPT, "--max-new-tokens", str(MAX_NEW), "--verbose", *chat_flag],
      f"torch script {name} (GGUF)": [*torch_script, "--gguf", str(gguf)],
      f"torch script {name} (safetensors)": [*torch_script, "--model-dir", str(st_dir)],
  }


def prepare_torch_dir(gguf: Path, out: Path) -> None:
  """The model as transformers saves it (safetensors): the torch script's fastest load."""
  code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
          "p, out = sys.argv[1], sys.argv[2]\nd, f = p.rsplit('/', 1)\n"
          "AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(out)\n"
          "m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)\n"
          # transformers refuses save_pretrained on a GGUF-loaded model: write the dense weights
          # (safetensors handles the tied embedding) and the config without the GGUF marker.
          "del m.config.quantization_config\nm.config.save_pretrained(out)\n"
          "from safetensors.torch import save_model\n"
          "save_model(m, out + '/model.safetensors', metadata={'format': 'pt'})\n")
  proc = subprocess.run([sys.executable, "-c", code, str(gguf), str(out)], capture_output=True,
                        text=True)
  if proc.returncode:
    raise RuntimeError(f"converting {gguf} for transformers failed:\n{proc.stderr[-3000:]}")


def load_child(path: str, params: str) -> None:
  """Child process: time restoring a checkpoint directory's parameters (no tokenizer)."""
  t0, c0 = time.perf_counter(), time.process_time()
  import jax

  from effjax.checkpoints.checkpoint_dir import restore_checkpoint

  t1, c1 = time.perf_counter(), time.process_time()
  _, model = restore_checkpoint(path)
  from flax import nnx

  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  t2, c2 = time.perf_counter(), time.process_time()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(dict(params=params, import_s=t1 - t0, restore_s=t2 - t1,
                        restore_cpu_s=c2 - c1, peak_rss_mb=peak)))


def summary(xs: list[float]) -> str:
  return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
  ap.add_argument("--load-child", nargs=2, metavar=("PATH", "PARAMS"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.load_child:
    load_child(*args.load_child)
    return

  from effjax.checkpoints.checkpoint_dir import read_meta, save_checkpoint
  from effjax.checkpoints.registry import MODELS, load_model

  load_before = os.getloadavg()
  tmp = Path(tempfile.mkdtemp(prefix="effjax-cold-start-"))
  cmds: dict[str, list[str]] = {}
  orbax_dirs: dict[str, Path] = {}
  for name in args.models:
    m = MODELS[name]
    loaded = load_model(name)  # converts into the cache if needed
    chat = loaded.tokenizer.chat_template is not None
    orbax_dirs[name] = save_checkpoint(tmp / f"{name}-orbax", loaded.cfg, loaded.model,
                                       loaded.tokenizer, params="orbax")
    prepare_torch_dir(m.gguf_path(), tmp / f"{name}-hf")
    cmds.update(commands(name, m.gguf_path(), tmp / f"{name}-hf", chat))
    del loaded
  py = sys.executable
  cmds["effjax --help"] = [py, "-m", "effjax.cli", "--help"]
  cmds["effjax models"] = [py, "-m", "effjax.cli", "models"]
  loads = {f"load {name} ({p})": [py, __file__, "--load-child",
                                  str(MODELS[name].cache_dir if p == "safetensors"
                                      else orbax_dirs[name]), p]
           for name in args.models for p in ("safetensors", "orbax")}
  for name in args.models:
    assert read_meta(MODELS[name].cache_dir)["params"] == "safetensors"

  everything = {**cmds, **loads}
  for label, cmd in everything.items():  # warm-up: caches, stored programs, page cache
    timed(cmd)
    print("warmed", label, flush=True)
  runs: dict[str, list[dict]] = {label: [] for label in everything}
  for r in range(args.repeats):
    for label, cmd in everything.items():
      runs[label].append(timed(cmd))
    print(f"round {r + 1}/{args.repeats} done", flush=True)
  load_after = os.getloadavg()

  gen_rows, torch_rows, same = [], [], {}
  for name in args.models:
    ours = runs[f"effjax generate {name}"]
    phases = [effjax_phases(x["err"]) for x in ours]
    gen_rows.append(
        f"| effjax generate | {name} | {summary([x['wall'] for x in ours])} | "
        f"{statistics.median(x['cpu'] for x in ours):.2f} | "
        + " | ".join(f"{statistics.median(p.get(k, 0.0) for p in phases):.2f}" for k in PHASES)
        + " |")
    for kind in ("GGUF", "safetensors"):
      theirs = runs[f"torch script {name} ({kind})"]
      info = [json.loads(x["err"].strip().splitlines()[-1]) for x in theirs]
      torch_rows.append(
          f"| torch script, {kind} | {name} | {summary([x['wall'] for x in theirs])} | "
          f"{statistics.median(x['cpu'] for x in theirs):.2f} | "
          f"{statistics.median(i['import_s'] for i in info):.2f} | "
          f"{statistics.median(i['load_s'] for i in info):.2f} | "
          f"{statistics.median(i['generate_s'] for i in info):.2f} | "
          f"{statistics.median(x['wall'] for x in ours) / statistics.median(x['wall'] for x in theirs):.2f} |")
      same[(name, kind)] = all(x["out"] == ours[0]["out"] for x in theirs + ours)
  answers = "; ".join(f"{name}: {runs[f'effjax generate {name}'][0]['out']!r}"
                      for name in args.models)
  equal = ", ".join(f"{n} vs torch ({k}): {'same text' if v else 'DIFFERENT text'}"
                    for (n, k), v in same.items())
  cli_rows = [f"| `{label}` | {summary([x['wall'] for x in runs[label]])} | "
              f"{statistics.median(x['cpu'] for x in runs[label]):.2f} |"
              for label in ("effjax --help", "effjax models")]
  load_rows = []
  for name in args.models:
    res = {p: [json.loads(x["out"].strip().splitlines()[-1])
               for x in runs[f"load {name} ({p})"]] for p in ("safetensors", "orbax")}
    fast, orbax = (statistics.median(r["restore_s"] for r in res[p]) for p in ("safetensors", "orbax"))
    load_rows.append(
        f"| {name} | {summary([r['restore_s'] for r in res['safetensors']])} | "
        f"{statistics.median(r['restore_cpu_s'] for r in res['safetensors']):.2f} | "
        f"{summary([r['restore_s'] for r in res['orbax']])} | "
        f"{statistics.median(r['restore_cpu_s'] for r in res['orbax']):.2f} | {orbax / fast:.1f}x |")

  import jax
  import torch
  body = "\n".join([
      f"Measured {datetime.date.today().isoformat()} on {platform.machine()} with {os.cpu_count()} "
      f"CPU cores ({jax.default_backend()}), jax {jax.__version__}, torch {torch.__version__}; "
      f"load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in load_before)} before and "
      f"{'/'.join(f'{x:.1f}' for x in load_after)} after the run (other jobs share the machine). "
      "Command:",
      "",
      "    " + " ".join(["python benchmarks/cold_start.py", *sys.argv[1:]]),
      "",
      f"Each cell: median of {args.repeats} fresh processes (min-max), run round-robin after one "
      f"warm-up each; CPU = the child's user+sys seconds. Prompt {PROMPT!r}, "
      f"`--max-new-tokens {MAX_NEW}`, greedy, float32.",
      "",
      "| command | model | wall s | CPU s | " + " | ".join(PHASES) + " |",
      "|---|---|---|---|" + "---|" * len(PHASES),
      *gen_rows,
      "",
      "Phases are effjax's own `--verbose` rows (wall seconds): start = interpreter start-up and "
      "argument parsing, compile = restoring the stored prefill and decode programs.",
      "",
      "| reference | model | wall s | CPU s | import | load | generate | effjax / torch wall |",
      "|---|---|---|---|---|---|---|---|",
      *torch_rows,
      "",
      f"Answers: {answers}. {equal}.",
      "",
      "| command | wall s | CPU s |",
      "|---|---|---|",
      *cli_rows,
      "",
      "Cached-model load in a fresh process (parameters only, imports excluded): the memory-mapped "
      "safetensors file effjax's cache now holds vs the same parameters restored with Orbax.",
      "",
      "| model | safetensors wall s | CPU s | Orbax wall s | CPU s | Orbax / safetensors |",
      "|---|---|---|---|---|---|",
      *load_rows,
  ])
  write_section(Path(args.out), HEADING, body)
  print(body)


if __name__ == "__main__":
  main()
