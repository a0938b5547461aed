"""Spec-Bench on this machine: tau and speedup of PLD, lookahead, ESP and the hybrid tree over plain
decoding, for SmolLM2-135M-Instruct and Gemma-3-270M.

    python benchmarks/specbench.py [--models smollm2-135m-instruct gemma3-270m]
        [--max-new-tokens 48] [--limit 1] [--warmup 1] [--methods pld lookahead-bc30 ...]
        [--out BENCHMARKS.md]

Each model runs `effjax bench specbench` once with every method (plain decoding interleaved per
question as the baseline) on the shared dev set, with a per-group question limit and a reduced
max_new_tokens so that it fits a CPU budget. Writes the section "## SpecBench
(benchmarks/specbench.py)" of BENCHMARKS.md: the commands, the date, a table per model, and the
issue's goals checked against the overall numbers. Methods whose module is missing are left out.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from report import write_section  # noqa: E402

from effjax import cli  # noqa: E402
from effjax.decoding.methods import parse_label  # noqa: E402

HEADING = "## SpecBench (benchmarks/specbench.py)"
METHODS = ("pld", "lookahead-bc30", "esp-bc10", "esp-bc30", "esp-bc60", "hybrid-bc30")
MODULES = {"pld": "pld", "lookahead": "lookahead", "esp": "esp", "hybrid": "hybrid"}


def available(methods: list[str]) -> list[str]:
  return [m for m in methods if importlib.util.find_spec(
      f"effjax.decoding.{MODULES[parse_label(m)[0]]}") is not None]


def finished(out: Path, argv: list[str]) -> bool:
  """Whether `out` holds the summary of a finished run with the settings of `argv`."""
  want = cli.build_parser().parse_args(argv)
  try:
    meta = json.loads((out / "summary.json").read_text())["meta"]
  except (OSError, ValueError):
    return False
  from effjax.decoding.cli import command_line

  return meta.get("command") == command_line(want, out) and "minutes" in meta


def goals(table: dict) -> list[str]:
  """The issue's goals, checked on the overall row of one model's run."""
  rows = {r["method"]: r for r in table["overall"]}
  tau = lambda prefix: max((r["tau"] for m, r in rows.items() if m.startswith(prefix)), default=None)
  out = []
  baseline = max(filter(None, (tau("pld"), tau("lookahead"))), default=None)
  if baseline and tau("esp"):
    out.append(f"best ESP tau / best of PLD, lookahead = {tau('esp'):.2f} / {baseline:.2f} = "
               f"{tau('esp') / baseline:.2f} (goal >= 1.10)")
  if baseline and tau("hybrid"):
    out.append(f"best hybrid tau / best of PLD, lookahead = {tau('hybrid'):.2f} / {baseline:.2f} = "
               f"{tau('hybrid') / baseline:.2f} (goal >= 1.25)")
  fast = max((r for m, r in rows.items() if m != "ar"), key=lambda r: r["speedup"], default=None)
  if fast:
    out.append(f"fastest wall clock: {fast['method']} at {fast['speedup']:.2f}x plain decoding "
               "(goal > 1.0 for one setting)")
  equal = [f"{m} {r['equal']}/{r['questions']}" for m, r in rows.items() if m != "ar"]
  out.append("questions with exactly plain decoding's output: " + ", ".join(equal))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
  p.add_argument("--methods", nargs="+", default=list(METHODS))
  p.add_argument("--max-new-tokens", type=int, default=48)
  p.add_argument("--limit", type=int, default=1, help="questions per category group")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--runs", default="runs/specbench-bench", help="run folders (JSONL, summaries)")
  p.add_argument("--out", default="BENCHMARKS.md")
  p.add_argument("--reuse", action="store_true",
                 help="use a model's finished run in --runs when it has the same settings")
  args = p.parse_args(argv)
  os.chdir(ROOT)  # the commands below, as written into BENCHMARKS.md, run from the repository root
  methods = available(args.methods)
  data = "sample:spec_bench"  # the Spec-Bench dev subset shipped with effjax
  date = datetime.date.today().isoformat()
  parts = [
      f"Run {date} with `python {' '.join(['benchmarks/specbench.py', *sys.argv[1:]])}`. "
      f"Spec-Bench protocol (chat template, both MT-bench turns with the model's own first answer "
      f"in the conversation, greedy, float32, batch 1, {args.warmup} warm-up conversation(s), "
      f"compiles untimed) on the Spec-Bench sample set shipped with effjax ({data}) with at most {args.limit} "
      f"question(s) per group, evenly spaced (MT-bench is one group of 8 categories), and "
      f"max_new_tokens={args.max_new_tokens} instead of 1024 to fit a CPU budget. Plain decoding "
      f"('ar') runs interleaved with the other methods per question; speedup = mean tokens/s "
      f"(prefill included, as in Spec-Bench) over plain decoding's in the same run; at this "
      f"max_new_tokens the prefill is much of every method's wall time, so 'decode-only speedup' "
      f"gives the same ratio over the tokens after the prefill's first one. This CPU has "
      f"2 cores shared with other jobs: absolute tokens/s vary, the ratios within a run are what "
      f"to compare.",
  ]
  for model in args.models:
    out = Path(args.runs) / model
    argv_model = ["bench", "specbench", "--model", model, "--method", *methods, "--data", data,
                  "--max-new-tokens", str(args.max_new_tokens), "--limit", str(args.limit),
                  "--warmup", str(args.warmup), "--out", str(out)]
    if not (args.reuse and finished(out, argv_model)):
      rc = cli.main(argv_model)
      if rc:
        parts.append(f"### {model}\n\n`effjax {' '.join(argv_model)}` failed (exit {rc}).")
        continue
    summary = json.loads((out / "summary.json").read_text())
    meta = summary["meta"]
    parts.append(
        f"### {model}\n\n`{meta['command']}` ({meta['questions']} questions, "
        f"{meta['prompt_format']}, cache "
        f"{'per turn, at most ' if meta.get('cache_per_turn') else ''}{meta['cache_len']}, "
        f"{meta['minutes']:.0f} min)\n\n"
        f"{(out / 'summary.md').read_text().strip()}\n\n"
        + "\n".join(f"- {line}" for line in goals(summary["table"])))
  write_section(Path(args.out), HEADING, "\n\n".join(parts))
  return 0


if __name__ == "__main__":
  sys.exit(main())
