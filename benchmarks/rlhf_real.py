"""The real-model online RLHF experiment: info-directed vs online with random pairs on SmolLM2-135M.

    .venv/bin/python benchmarks/rlhf_real.py run [--seeds 0 1] [--agents info_directed online]
    .venv/bin/python benchmarks/rlhf_real.py report --benchmarks BENCHMARKS.md [--notes FILE]

`run` runs (or resumes) each agent x seed of configs/rlhf_arith_smollm2.toml in one process, one
after another (they share the model and the compiled steps); rerun it to continue after a kill.
`report` reads every run's per-prompt evaluations (evals.jsonl) and writes the "Online RLHF (real
model)" section: win rate of greedy and of sampled responses against the SFT model's, the rate of
right answers, each agent's mean over seeds with a 95% bootstrap interval over seeds and held-out
prompts, and info-directed minus online at equal labels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys

import numpy as np

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from effjax.rlhf.config import load_config  # noqa: E402
from rlhf_toy import run_trainer  # noqa: E402

AGENTS = {"info_directed": ("agent.kind=info_directed",), "online": ("agent.kind=online",)}
NAMES = {"info_directed": "info-directed", "online": "online (random pairs)"}
METRICS = (("win_rate", "win rate, greedy"), ("win_rate_sampled", "win rate, sampled"),
           ("reward_greedy", "right answers, greedy"), ("reward_sampled", "right answers, sampled"))
BOOTSTRAP = 2000


def run_dir(out: pathlib.Path, agent: str, seed: int) -> pathlib.Path:
  return out / agent / f"s{seed}"


def cmd_run(args) -> int:
  from effjax.rlhf.agents import make_environment
  out = pathlib.Path(args.out)
  env = None
  for seed in args.seeds:
    for agent in args.agents:
      d = run_dir(out, agent, seed)
      if (d / "result.json").exists():
        continue
      cfg = load_config(args.config, (*AGENTS[agent], *args.set, f"seed={seed}",
                                      f"out_dir={json.dumps(str(d))}"))
      env = env or make_environment(cfg)
      run_trainer(cfg, env, f"{agent} seed {seed}", progress=not args.no_progress)
  return 0


def read_evals(d: pathlib.Path, batch_size: int) -> dict[int, dict[str, np.ndarray]]:
  """labels -> metric -> per-prompt values."""
  out = {}
  for line in (d / "evals.jsonl").read_text().splitlines():
    r = json.loads(line)
    out[(r["batch"] + 1) * batch_size] = {k: np.asarray(v) for k, v in r.items() if k != "batch"}
  return out


def hierarchical_mean(values: np.ndarray, gen: np.random.Generator) -> tuple[float, float, float]:
  """values [seeds, prompts]: the mean, and a 95% interval resampling seeds, then prompts."""
  s, p = values.shape
  boots = []
  for _ in range(BOOTSTRAP):
    rows = values[gen.integers(0, s, s)]
    boots.append(rows[:, gen.integers(0, p, p)].mean())
  return float(values.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def paired_difference(a: np.ndarray, b: np.ndarray, gen) -> tuple[float, float, float]:
  """mean(a) - mean(b) for [seeds, prompts] arrays on the same prompts; seeds resampled per agent,
  prompts resampled jointly (the same held-out prompts serve both)."""
  boots = []
  for _ in range(BOOTSTRAP):
    cols = gen.integers(0, a.shape[1], a.shape[1])
    boots.append(a[gen.integers(0, len(a), len(a))][:, cols].mean()
                 - b[gen.integers(0, len(b), len(b))][:, cols].mean())
  return float(a.mean() - b.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def cmd_report(args) -> int:
  from report import write_section
  out = pathlib.Path(args.out)
  cfg = load_config(args.config)
  bs = cfg.agent.prompts_per_batch
  evals: dict[str, list[dict]] = {}
  seconds, peak = [], []
  for agent in AGENTS:
    for seed in args.seeds:
      d = run_dir(out, agent, seed)
      if (d / "evals.jsonl").exists():
        evals.setdefault(agent, []).append(read_evals(d, bs))
        seconds += [json.loads(l)["seconds"] for l in (d / "metrics.jsonl").read_text().splitlines()
                    if '"seconds"' in l][1:]
  if not evals:
    print("no runs yet")
    return 0
  gen = np.random.default_rng(0)
  labels = sorted(set.intersection(*[set(e) for runs in evals.values() for e in runs]))
  lines = []
  rows = ["| labels | " + " | ".join(f"{NAMES[a]}: {what}" for what in ("greedy win", "sampled win",
                                                                          "right (sampled)")
                                     for a in evals) + " |",
          "|---|" + "---|" * (3 * len(evals))]
  for n in labels:
    cells = []
    for metric in ("win_rate", "win_rate_sampled", "reward_sampled"):
      for agent, runs in evals.items():
        m, lo, hi = hierarchical_mean(np.stack([r[n][metric] for r in runs]), gen)
        cells.append(f"{m:.3f} [{lo:.3f}, {hi:.3f}]")
    rows.append(f"| {n} | " + " | ".join(cells) + " |")
  diffs = []
  if len(evals) == 2:
    for metric, what in METRICS:
      cells = []
      for n in labels:
        if n == 0:
          continue
        a = np.stack([r[n][metric] for r in evals["info_directed"]])
        b = np.stack([r[n][metric] for r in evals["online"]])
        d, lo, hi = paired_difference(a, b, gen)
        cells.append(f"{n}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
      diffs.append(f"- {what}: " + ", ".join(cells))
  per_seed = []
  for agent, runs in evals.items():
    for seed, r in zip(args.seeds, runs):
      per_seed.append(f"- {NAMES[agent]} seed {seed}: greedy win " + ", ".join(
          f"{n}: {r[n]['win_rate'].mean():.3f}" for n in labels if n in r)
          + "; sampled win " + ", ".join(f"{n}: {r[n]['win_rate_sampled'].mean():.3f}" for n in labels if n in r))
  first, last = labels[0], labels[-1]
  goal = []
  for agent, runs in evals.items():
    for metric, what in METRICS[:2]:
      d, lo, hi = paired_difference(np.stack([r[last][metric] for r in runs]),
                                    np.stack([r[first][metric] for r in runs]), gen)
      goal.append(f"- {NAMES[agent]}, {what}: {first} -> {last} labels {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
  lines += rows + [""] + diffs + [""] + goal
  print("\n".join(lines))
  print("\n".join(per_seed))
  if args.benchmarks:
    a, e, p = cfg.agent, cfg.env.arithmetic, cfg.policy
    body = f"""Commands ({datetime.date.today().isoformat()}; resumable; load during the runs: {args.load or 'not recorded'}):

    .venv/bin/python benchmarks/rlhf_real.py run --seeds {' '.join(map(str, args.seeds))}
    .venv/bin/python benchmarks/rlhf_real.py report --seeds {' '.join(map(str, args.seeds))} --benchmarks BENCHMARKS.md --notes benchmarks/notes/rlhf_real.md

`configs/rlhf_arith_smollm2.toml`: SmolLM2-135M-Instruct answering one-step arithmetic items ("What is
47 + 38?", two-digit + and -, two-digit x one-digit) through its chat template, responses of at most
{e.response_len} tokens; rater: Bradley-Terry (temperature {cfg.rater.temperature}) over the verifiable answer
check (1 when the response's answer is the right number, else 0). Per batch {a.prompts_per_batch} prompts x
{a.responses_per_prompt} responses, one label per prompt; ENN {cfg.enn.num_particles} particles on the frozen SFT model's
features (shared, not copied); policy: the last {p.trainable_layers} of 30 blocks learn, lr {p.lr}, nudge eps {p.eps},
KL beta {p.beta}. Both agents get the same label budget ({a.num_batches * a.prompts_per_batch} labels) and the same settings;
only the pair choice differs. Evaluation on {e.num_eval_prompts} held-out items: win rate of the policy's greedy
response against the SFT model's greedy response, and of {a.eval_samples} sampled responses against as many SFT
samples (rater probability, 0.5 = tie); "right" = share of sampled responses with the right number.
Intervals: 95% bootstrap over seeds and held-out prompts (2,000 resamples). Median
{statistics.median(seconds):.0f} s per batch on this shared 2-core CPU{f'; peak RSS {args.rss}' if args.rss else ''}.

{chr(10).join(rows)}

Info-directed minus online (random pairs) at equal labels, [95% interval]:

{chr(10).join(diffs)}

Change from the first to the last evaluation:

{chr(10).join(goal)}

Per seed:

{chr(10).join(per_seed)}
"""
    if args.notes:
      body += "\n" + pathlib.Path(args.notes).read_text()
    write_section(pathlib.Path(args.benchmarks), "## Online RLHF (real model)", body)
  return 0


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  for name in ("run", "report"):
    s = sub.add_parser(name)
    s.add_argument("--config", default="configs/rlhf_arith_smollm2.toml")
    s.add_argument("--out", default="runs/rlhf/arith_smollm2")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  run = sub.choices["run"]
  run.add_argument("--agents", nargs="+", default=list(AGENTS), choices=list(AGENTS))
  run.add_argument("--set", action="append", default=[], help="extra override for every run")
  run.add_argument("--no-progress", action="store_true")
  rep = sub.choices["report"]
  rep.add_argument("--benchmarks", default="")
  rep.add_argument("--notes", default="")
  rep.add_argument("--load", default="")
  rep.add_argument("--rss", default="", help="peak resident memory measured with /usr/bin/time -v")
  args = p.parse_args()
  return cmd_run(args) if args.command == "run" else cmd_report(args)


if __name__ == "__main__":
  sys.exit(main())
