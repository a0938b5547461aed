"""The real-model online RLHF run: SmolLM2-135M-Instruct on GSM8K with the verifiable scorer as rater.

    .venv/bin/effjax rlhf run --config configs/rlhf_gsm8k_smollm2.toml     # resumable
    .venv/bin/python benchmarks/rlhf_real.py --run runs/rlhf/gsm8k_smollm2 [--notes FILE]

Reads the run directory (config, metrics, label log) and writes the "Online RLHF (real model)"
section of BENCHMARKS.md: win rate at each evaluation, losses, KL to the anchor, seconds per batch.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import write_section  # noqa: E402


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--run", default="runs/rlhf/gsm8k_smollm2")
  ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
  ap.add_argument("--notes", default="", help="a markdown file appended to the section")
  args = ap.parse_args()
  run = pathlib.Path(args.run)
  cfg = json.loads((run / "config.json").read_text())
  metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  n_labels = sum(1 for _ in (run / "labels.jsonl").open())
  batches = [m for m in metrics if m["batch"] >= 0]
  a, g = cfg["agent"], cfg["env"]["gsm8k"]
  rows = ["| batch | labels | win rate vs SFT | RM loss | RM accuracy | policy loss | KL to anchor |",
          "|---|---|---|---|---|---|---|"]
  for m in metrics:
    if "win_rate" in m:
      rows.append(f"| {m['batch'] + 1} | {m['labels']} | {m['win_rate']:.3f} | "
                  f"{m.get('rm_loss', float('nan')):.3f} | {m.get('rm_accuracy', float('nan')):.3f} | "
                  f"{m.get('policy_loss', float('nan')):.3f} | {m.get('kl', float('nan')):.4f} |")
  seconds = [m["seconds"] for m in batches if "seconds" in m]
  body = f"""Command: `.venv/bin/effjax rlhf run --config configs/rlhf_gsm8k_smollm2.toml`, then
`python benchmarks/rlhf_real.py --run {args.run}`. Agent {a['kind']}, {a['prompts_per_batch']} prompts x
{a['responses_per_prompt']} responses of {g['response_len']} tokens per batch (prompts up to
{g['max_prompt_len']} tokens), ENN {cfg['enn']['num_particles']} particles on the
{'frozen ' if cfg['enn']['backbone_lr_scale'] == 0 else ''}SFT backbone, policy lr {cfg['policy']['lr']},
nudge eps {cfg['policy']['eps']}, KL beta {cfg['policy']['beta']}; rater: Bradley-Terry over the GSM8K
scorer (answer correct minus {cfg['rater']['length_coef']} x length beyond {cfg['rater']['target_len']}
tokens, temperature {cfg['rater']['temperature']}). Win rate = mean rater probability that the greedy
policy beats the greedy SFT policy on {g['num_eval_prompts']} held-out prompts (0.5 = tie).

Progress: {len(batches)} of {a['num_batches']} batches, {n_labels} labels in the label log; median
{statistics.median(seconds):.0f} s per batch on this 2-core CPU (first batch incl. compilation
{seconds[0]:.0f} s).

{chr(10).join(rows)}
"""
  if args.notes:
    body += "\n" + pathlib.Path(args.notes).read_text()
  write_section(pathlib.Path(args.out), "## Online RLHF (real model)", body)
  print(body)
  return 0


if __name__ == "__main__":
  sys.exit(main())
