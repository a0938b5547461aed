"""Paper scale: every recipe in configs/recipes compiled for its TPU slice on this CPU host.

    .venv/bin/python benchmarks/paper_scale.py [RECIPE ...] [--force] [--check]

Runs `effjax plan RECIPE --json ...` for each recipe, one at a time, under `nice -n 5` and
`/usr/bin/time -v` (compiling a 9B-32B program takes minutes and GBs of host RAM), keeps each
result in benchmarks/paper_scale/RECIPE.json (a recipe with a result is not rerun without
--force: the run resumes), then writes the "Paper scale" section of BENCHMARKS.md from all results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import write_section  # noqa: E402

OUT = ROOT / "benchmarks" / "paper_scale"
HEADING = "## Paper scale (benchmarks/paper_scale.py)"
# The programs compiled per recipe on this shared 2-core host: those that set the peak and the main
# phases of a step. --all compiles every program of every recipe (the plan cache keeps the ones
# already compiled, so adding programs later costs only the new ones).
PROGRAMS = {
    "rlhf_gemma2_9b": ["rollout", "policy gradients", "policy apply", "rollout prefill",
                       "policy gradients, one micro-batch"],
    "rebalance_r1_qwen_7b": ["rebalance prefill", "rebalance decode", "ar decode"],
    "rebalance_qwq_32b": ["rebalance prefill", "rebalance decode"],
    "esp_llama31_8b": ["esp-bc60 prefill", "esp-bc60 decode", "hybrid-bc60 decode", "ar decode"],
    "esp_llama31_8b_int8": ["esp-bc60 prefill", "esp-bc60 decode", "hybrid-bc60 decode",
                            "ar decode"],
    "esp_qwen3_32b": ["esp-bc60 prefill", "esp-bc60 decode", "ar decode"],
}
# Layer counts compiled and extrapolated from (`effjax plan --layers`), for the RLHF recipe only:
# a full compile of its rollout took 48 min of this shared host; Gemma 2
# alternates sliding and global layers, so it is compiled with whole pairs. Decode programs compile
# in full in about a minute, and extrapolating their temporaries linearly overstated them 14x (the
# Llama-3.1-8B ESP prefill at batch 64: 32.4 GB extrapolated, 2.4 GB compiled), so they compile in full.
LAYERS = {"rlhf_gemma2_9b": "2,4"}
DEFAULT_LAYERS = None
# The check of the extrapolation: programs of one recipe compiled in full (their figures are in the
# plan cache when they were compiled before; otherwise the policy step takes about half an hour
# here): the scanned policy update, whose per-layer growth the plan could not explain until its
# gradients were sharded like the parameters, and the rollout prefill, the recipe's peak.
CHECK = ("rlhf_gemma2_9b", ("policy gradients", "rollout prefill"))
CHECK_NAME = "check_full_compile"
ORDER = ["rlhf_gemma2_9b", "rebalance_r1_qwen_7b", "esp_llama31_8b", "esp_llama31_8b_int8",
         "rebalance_qwq_32b", "esp_qwen3_32b"]


def run_one(name: str, programs: list[str], layers: str | None, out_name: str = "") -> None:
  """`effjax plan name` for `programs` (all when empty), extrapolated from `layers` when given."""
  OUT.mkdir(exist_ok=True)
  out_name = out_name or name
  cmd = [sys.executable, "-m", "effjax.cli", "plan", name, "--json", str(OUT / f"{out_name}.json")]
  cmd += [f"--program={p}" for p in programs]
  if layers:
    cmd += [f"--layers={layers}"]
  print(f"planning {out_name} ...", file=sys.stderr, flush=True)
  start = datetime.datetime.now(datetime.timezone.utc)
  with open(OUT / f"{out_name}.txt", "w") as out, open(OUT / f"{out_name}.log", "w") as err:
    rc = subprocess.call(["nice", "-n", "5", "/usr/bin/time", "-v", *cmd], stdout=out, stderr=err,
                         cwd=ROOT)
  log = (OUT / f"{out_name}.log").read_text()
  rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
  wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", log)
  meta = dict(command=" ".join(["effjax"] + cmd[3:4] + [name] + [c for c in cmd if c.startswith(
      ("--program", "--layers"))]), returncode=rc, date=start.isoformat(),
              max_rss_gb=int(rss.group(1)) / 1e6 if rss else None, wall=wall.group(1) if wall else None)
  (OUT / f"{out_name}.meta.json").write_text(json.dumps(meta, indent=1))
  print(f"  {out_name}: exit {rc}, max RSS {meta['max_rss_gb']} GB, {meta['wall']}", file=sys.stderr)


def gb(x: float) -> str:
  return f"{x / 1e9:.1f}"


def fmt_seconds(s: float) -> str:
  return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def recipe_rows(name: str) -> list[str]:
  data = json.loads((OUT / f"{name}.json").read_text())
  meta = json.loads((OUT / f"{name}.meta.json").read_text())
  from effjax.plan.recipes import load_recipe

  _, recipe = load_recipe(name)
  rows = []
  for r in data["results"]:
    p = next(x for x in r["programs"] if x["name"] == r["peak_program"])
    ins = p["inputs"]
    state = ins["parameters"] + ins["optimizer"] + p["held"]
    kv = ins["kv_cache"] + p["kv_inside"]
    other = p["peak"] - state - kv
    flops = sum(ph["count"] * ph["flops"] for ph in r["phases"])
    hbm = sum(ph["count"] * ph["hbm"] for ph in r["phases"])
    xla = sum(ph["count"] * ph["xla_bytes"] for ph in r["phases"])
    step = f"{fmt_seconds(r['step_seconds'])} ({fmt_seconds(r['step_seconds_xla_bytes'])})"
    dec = r.get("decode")
    if dec:
      step += (f"; decode step {dec['step_ms']:.3g} ms, {dec['tokens_per_s_per_chip_memory']:.4g} "
               "tokens/s per chip")
      if "speedup_at_tau" in dec:
        costs = ", ".join(f"{k} {v:.2f}" for k, v in dec["break_even_tau"].items())
        step += f"; break-even tau {costs}; {dec['speedup_at_tau']:.2f}x plain at the paper's tau"
    rows.append(
        f"| {r['title']} | {r['slice']} ({r['topology']}, {r['chips']} chips, {r['processes']} "
        f"processes) | {r['peak_program']}: {gb(state)} + {gb(kv)} + {gb(other)} = "
        f"**{gb(p['peak'])}** of {gb(r['hbm'])} ({r['margin']:.0%} free) | {flops / 1e12:.4g} | "
        f"{hbm / 1e9:.4g} ({xla / 1e9:.4g}) | {step} | {paper_note(recipe, r)} | "
        f"{meta['max_rss_gb']:.1f} GB, {meta['wall']} |")
  return rows


def paper_note(recipe, r: dict) -> str:
  p = recipe.paper
  parts = [p.hardware] if p.hardware else []
  if p.tokens_per_call:
    parts.append(f"tau {p.tokens_per_call:g}, {p.speedup:g}x (batch 1)")
  if p.mean_tokens and r.get("decode"):
    steps = p.mean_tokens  # one token per step; the batch ends with its longest row
    parts.append(f"{p.mean_tokens:g} mean tokens: {fmt_seconds(steps * r['decode']['step_ms'] / 1e3)} "
                 f"of decode steps per batch at that length")
  if p.labels:
    batches = p.labels / recipe.rlhf.agent.prompts_per_batch
    parts.append(f"{p.labels:,} labels = {batches:.0f} batches: "
                 f"{batches * r['step_seconds'] / 3600:.3g} h at peak")
  if p.note:
    parts.append(p.note)
  return "; ".join(parts)


def check_rows() -> str:
  """The extrapolation against a full compile of the same programs, side by side."""
  full_path, ext_path = OUT / f"{CHECK_NAME}.json", OUT / f"{CHECK[0]}.json"
  if not (full_path.exists() and ext_path.exists()):
    return ""
  programs = lambda path: {p["name"]: p for p in json.loads(path.read_text())["results"][0]["programs"]}
  full, ext = programs(full_path), programs(ext_path)
  names = [n for n in CHECK[1] if n in full and n in ext]
  if not names:
    return ""
  meta = json.loads((OUT / f"{CHECK_NAME}.meta.json").read_text())
  rows = []
  for name in names:
    for key, label in (("peak", "peak GB"), ("temp", "temporaries GB"), ("flops", "TFLOP"),
                       ("bytes", "XLA TB accessed")):
      scale = 1e12 if key in ("flops", "bytes") else 1e9
      f, e = full[name][key], ext[name][key]
      rows.append(f"| {name} | {label} | {f / scale:.4g} | {e / scale:.4g} | {e / f - 1:+.1%} |")
  return f"""Check of the layer extrapolation (`{meta['command']}`, a full compile; the table above
extrapolates from {LAYERS.get(CHECK[0], DEFAULT_LAYERS)} layers): {CHECK[0]}, per device.

| program | figure | full compile | extrapolated | difference |
|---|---|---|---|---|
{chr(10).join(rows)}
"""


def write(names: list[str]) -> None:
  done = [n for n in names if (OUT / f"{n}.json").exists() and (OUT / f"{n}.meta.json").exists()]
  dates = sorted(json.loads((OUT / f"{n}.meta.json").read_text())["date"][:10] for n in done)
  rows = [r for n in done for r in recipe_rows(n)]
  compiled = []
  for n in done:
    meta = json.loads((OUT / f"{n}.meta.json").read_text())
    for r in json.loads((OUT / f"{n}.json").read_text())["results"]:
      progs = ", ".join(p["name"] for p in r["programs"])
      phases = ", ".join(f"{p['name']} x{p['count']:g}" for p in r["phases"] if p["count"])
      compiled.append(f"- {r['title']} (`{meta['command']}`): compiled {progs}; step = {phases}")
  missing = sorted(set(names) - set(done))
  check = check_rows()
  body = f"""Command: `.venv/bin/python benchmarks/paper_scale.py` (each recipe: `effjax plan RECIPE`),
run {', '.join(sorted(set(dates)))} on this 2-core CPU host with libtpu {libtpu_version()}: each
recipe's real programs (the runtime's own jitted functions) compiled ahead of time for its TPU
slice's compile-only topology, with abstract parameters and the runtime's sharding rules. No TPU
was used; every figure is per device (chip) and comes from XLA's memory and cost analyses, but
FLOPs: the larger of XLA's count and the count of the program's own matrix products, read from its
jaxpr (effjax/plan/flops.py; XLA counted fewer for the tree steps at batch 32-64).

Peak = the largest program's bytes per device: model state (parameters, float32 optimizer state,
and the long-lived copies held meanwhile) + KV cache + the rest (activations, temporaries,
outputs, other inputs), against the chip's HBM (published figure, chips.py). Step at peak: per
phase max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), bytes = each program's inputs read once and
outputs written once (in brackets: with XLA's bytes accessed, which counts on-chip copies too);
no collectives or overlap losses: a lower bound. Decode tokens/s per chip: tokens per step / the
step's memory-bound time / chips (the memory roofline). A recipe step: RLHF, one batch (two
rollouts, RM scoring and updates, policy update); decoding, one batch generated to the token
budget at the paper's tau.

| recipe | slice | peak per device (GB): state + KV + rest | TFLOP per step | GB per step (XLA) | step at peak | paper | plan host RSS, wall |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Programs compiled and the phases a step is made of (a phase whose program was not compiled is left
out of the step):

{chr(10).join(compiled)}
"""
  if check:
    body += "\n" + check
  if missing:
    body += f"\nNot planned yet: {', '.join(missing)}.\n"
  notes = ROOT / "benchmarks" / "notes" / "paper_scale.md"
  if notes.exists():
    body += "\n" + notes.read_text()
  write_section(ROOT / "BENCHMARKS.md", HEADING, body)


def libtpu_version() -> str:
  from importlib.metadata import PackageNotFoundError, version
  try:
    return version("libtpu")
  except PackageNotFoundError:
    return "(from TPU_LIBRARY_PATH)"


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("recipes", nargs="*", help="default: every configs/recipes/*.toml")
  ap.add_argument("--force", action="store_true", help="replan recipes that have a result")
  ap.add_argument("--write-only", action="store_true", help="only rewrite the section")
  ap.add_argument("--all", action="store_true", help="compile every program of each recipe")
  ap.add_argument("--check", action="store_true",
                  help="also compile the check program in full (the better part of an hour)")
  args = ap.parse_args()
  recipes = sorted(p.stem for p in (ROOT / "configs" / "recipes").glob("*.toml"))
  names = args.recipes or [n for n in ORDER if n in recipes] + sorted(set(recipes) - set(ORDER))
  if not args.write_only:
    for name in names:
      if args.force or not (OUT / f"{name}.json").exists():
        run_one(name, [] if args.all else PROGRAMS.get(name, []),
                LAYERS.get(name, DEFAULT_LAYERS))
    if args.check and (args.force or not (OUT / f"{CHECK_NAME}.json").exists()):
      run_one(CHECK[0], list(CHECK[1]), None, out_name=CHECK_NAME)
  write(sorted(p.stem for p in (ROOT / "configs" / "recipes").glob("*.toml")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
