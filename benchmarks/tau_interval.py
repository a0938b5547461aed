"""Tau ratios between methods with a 95% interval over questions, from SpecBench run folders.

    python benchmarks/tau_interval.py --runs runs/specbench-pooled/smollm2-135m-instruct \
        --pairs hybrid-bc60/tr hybrid-bc30/tr

Reads each folder's results.jsonl (written by `effjax bench specbench`); greedy tau depends on
neither the machine nor its load, so methods from several runs over the same questions compare
(a method in more than one folder is taken from the last). For each pair NUM/DEN prints
tau(NUM) / tau(DEN) pooled over the questions both answered, and a paired bootstrap interval:
questions redrawn with replacement within each Spec-Bench group, the same draw for both methods
(effjax.evals.specbench.tau_ratio_interval).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effjax.evals import specbench


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--runs", nargs="+", required=True, help="run folders holding results.jsonl")
  p.add_argument("--pairs", nargs="+", required=True, help="NUM/DEN method names, e.g. hybrid-bc60/tr")
  p.add_argument("--resamples", type=int, default=4000)
  args = p.parse_args(argv)
  records = {}
  for run in args.runs:
    path = Path(run) / "results.jsonl"
    if not path.is_file():
      p.error(f"{path}: no such file (a folder written by `effjax bench specbench`)")
    for r in specbench.read_records(path):
      records[(r["question_id"], r["method"])] = r
  records = list(records.values())
  print(f"`python benchmarks/tau_interval.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
  print("| ratio | tau ratio | 95% interval over questions | questions |")
  print("|---|---|---|---|")
  for pair in args.pairs:
    num, sep, den = pair.partition("/")
    if not sep:
      p.error(f"{pair!r}: name a pair as NUM/DEN, e.g. hybrid-bc60/tr")
    try:
      ratio, low, high, n = specbench.tau_ratio_interval(records, num, den,
                                                         resamples=args.resamples)
    except ValueError as e:
      p.error(str(e))
    print(f"| {num} / {den} | {ratio:.3f} | {low:.3f}-{high:.3f} | {n} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
