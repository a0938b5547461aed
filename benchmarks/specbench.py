"""Spec-Bench on this machine: tau and speedup of the training-free drafters (prompt lookup, the
suffix drafter, lookahead, Token Recycling), ESP's static and dynamic trees and the hybrid tree over
plain decoding, for SmolLM2-135M-Instruct and Gemma-3-270M.

    python benchmarks/specbench.py [--models smollm2-135m-instruct gemma3-270m]
        [--max-new-tokens 128] [--limit 3] [--warmup 1] [--methods pld suffix ...]
        [--out BENCHMARKS.md]

Each model runs `effjax bench specbench` once with every method (plain decoding interleaved per
question as the baseline) on the shared dev set, with a per-group question limit and a reduced
max_new_tokens so that it fits a CPU budget. A run is resumable: rerunning the same command
continues each model's run from its records (`--resume`), a finished one is reused. Writes the
section "## SpecBench (benchmarks/specbench.py)" of BENCHMARKS.md: the commands, the date, a table
per model, and the issue's goals checked against the overall numbers. Methods whose module is
missing are left out.
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
from effjax.evals import specbench  # noqa: E402

HEADING = "## SpecBench (benchmarks/specbench.py)"
METHODS = ("pld", "suffix", "lookahead", "tr", "esp-bc30", "esp-dyn-bc30", "esp-bc60",
           "esp-dyn-bc60", "hybrid-bc30", "hybrid-bc60", "hybrid-bc80")
MODULES = {"pld": "pld", "suffix": "suffix", "lookahead": "lookahead", "tr": "recycling",
           "esp": "esp", "esp-dyn": "esp", "hybrid": "hybrid", "auto": "budget"}
BASELINES = ("pld", "lookahead", "tr", "suffix")  # the single training-free drafters


def available(methods: list[str]) -> list[str]:
  """The methods this checkout knows by name and has the module of."""
  out = []
  for m in methods:
    try:
      name = parse_label(m)[0]
    except ValueError:
      continue
    if importlib.util.find_spec(f"effjax.decoding.{MODULES.get(name, name)}") is not None:
      out.append(m)
  return out


def finished(out: Path, argv: list[str]) -> bool:
  """Whether `out` holds the summary of a finished run with the settings of `argv`."""
  want = cli.build_parser().parse_args(argv)
  try:
    meta = json.loads((out / "summary.json").read_text())["meta"]
  except (OSError, ValueError):
    return False
  from effjax.decoding.cli import command_line

  return meta.get("command") == command_line(want, out) and "minutes" in meta


def goals(table: dict, records: list[dict] = ()) -> list[str]:
  """The issue's goals, checked on the overall row of one model's run, each with its ratio (and,
  given the run's records, the ratio's 95% interval over questions: specbench.tau_ratio_interval)."""
  rows = {r["method"]: r for r in table["overall"]}
  name = lambda m: parse_label(m)[0] if m in rows else None

  def best(kinds):
    got = [(r["tau"], m) for m, r in rows.items() if name(m) in kinds]
    return max(got) if got else (None, None)

  def verdict(num: str, den: str, goal: float) -> str:
    ratio = rows[num]["tau"] / rows[den]["tau"]
    text = f"{ratio:.2f} (goal >= {goal:.2f}: {'met' if ratio >= goal else 'MISSED'}"
    if records:
      _, low, high, n = specbench.tau_ratio_interval(records, num, den)
      text += f"; 95% interval over the {n} questions {low:.2f}-{high:.2f}"
    return text + ")"

  out = []
  base_tau, base = best(BASELINES)
  hyb_tau, hyb = best({"hybrid"})
  if base and hyb:
    out.append(f"hybrid tau / best single training-free baseline: {hyb} {hyb_tau:.2f} / {base} "
               f"{base_tau:.2f} = {verdict(hyb, base, 1.25)}")
  pl_tau, pl = best({"pld", "lookahead"})
  esp_tau, esp = best({"esp", "esp-dyn"})
  if pl and esp:
    static, dynamic = best({"esp"}), best({"esp-dyn"})
    trees = ", ".join(f"{kind} {m} {t:.2f}" for kind, (t, m) in (("static", static),
                                                                 ("dynamic", dynamic)) if m)
    out.append(f"ESP's best tree tau / best of PLD and lookahead: {esp} {esp_tau:.2f} / {pl} "
               f"{pl_tau:.2f} = {verdict(esp, pl, 1.10)}; best of each tree: {trees}")
  unequal = [f"{m} {r['equal']}/{r['questions']}" for m, r in rows.items()
             if m != "ar" and r["equal"] < r["questions"]]
  n = max((r["questions"] for r in rows.values()), default=0)
  out.append("output equal to plain decoding on every question: " + (
      f"met ({len(rows) - 1} methods x {n} questions)" if not unequal
      else "MISSED: " + ", ".join(unequal)))
  fast = max((r for m, r in rows.items() if m != "ar"), key=lambda r: r["speedup"], default=None)
  if fast:
    out.append(f"fastest wall clock: {fast['method']} at {fast['speedup']:.2f}x plain decoding "
               f"({fast['decode_speedup']:.2f}x decode only)")
  return out


def partial_section(model: str, out: Path) -> str:
  """A model's section from the records of an unfinished run: only the questions that every
  method of the run has finished, so that each ratio compares the same questions."""
  meta = json.loads((out / "meta.json").read_text())
  records = specbench.read_records(out / "results.jsonl")
  have = {}
  for r in records:
    have.setdefault(r["question_id"], set()).add(r["method"])
  full = {q for q, m in have.items() if set(meta["methods"]) <= m}
  kept = [r for r in records if r["question_id"] in full]
  if not kept:
    return f"### {model}\n\nPARTIAL: no question finished by every method yet (`{meta['command']}`)."
  table = specbench.summarize(kept)
  return (f"### {model}\n\nPARTIAL run, cut short: {len(full)} of {meta['questions']} questions "
          f"finished by every method (`{meta['command']} --resume`, started {meta['started']}; "
          f"load average {os.getloadavg()[0]:.1f} when summarized)\n\n"
          f"{specbench.format_table(table).strip()}\n\n"
          + "\n".join(f"- {line}" for line in goals(table, kept)))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
  p.add_argument("--methods", nargs="+", default=list(METHODS))
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--limit", type=int, default=3, help="questions per category group")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--runs", default="runs/specbench-bench", help="run folders (JSONL, summaries)")
  p.add_argument("--out", default="BENCHMARKS.md")
  p.add_argument("--reuse", action="store_true",
                 help="use a model's finished run in --runs as it is when it has the same "
                      "settings (otherwise its run is continued from its records)")
  p.add_argument("--partial", action="store_true",
                 help="run nothing: write the tables of the questions every method has finished "
                      "in each model's run so far, marked partial (for a run cut short)")
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
    if args.partial:
      parts.append(partial_section(model, out))
      continue
    if not (args.reuse and finished(out, argv_model)):
      rc = cli.main(argv_model + ["--resume"])
      if rc:
        parts.append(f"### {model}\n\n`effjax {' '.join(argv_model)}` failed (exit {rc}).")
        continue
    summary = json.loads((out / "summary.json").read_text())
    meta = summary["meta"]
    parts.append(
        f"### {model}\n\n`{meta['command']}` ({meta['questions']} questions, "
        f"{meta['prompt_format']}, cache "
        f"{'per turn, at most ' if meta.get('cache_per_turn') else ''}{meta['cache_len']}, "
        f"{meta['minutes']:.0f} min; {meta['started']} to {meta.get('finished', '?')}, load "
        f"average {meta.get('load_average', '?')} at the end)\n\n"
        f"{(out / 'summary.md').read_text().strip()}\n\n"
        + "\n".join(f"- {line}" for line in goals(
            summary["table"], specbench.read_records(out / "results.jsonl"))))
  if args.partial:
    parts.append(previous_full_run(Path(args.out)))
  write_section(Path(args.out), HEADING, "\n\n".join(p for p in parts if p))
  return 0


KEPT = "<!-- the last full run, kept below a partial one -->"


def previous_full_run(path: Path) -> str:
  """The section's last full run (its headings one level down), kept below a partial run's tables
  until a full run replaces both."""
  text = path.read_text() if path.exists() else ""
  start = text.find(HEADING + "\n")
  if start < 0:
    return ""
  end = text.find("\n## ", start + len(HEADING))
  body = text[start + len(HEADING):end if end >= 0 else len(text)].strip()
  if KEPT in body:
    return body[body.index(KEPT):]
  if not body:
    return ""
  return (f"{KEPT}\n### The last full run (earlier code and settings)\n\n"
          + body.replace("\n### ", "\n#### "))


if __name__ == "__main__":
  sys.exit(main())
