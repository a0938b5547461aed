"""The toy online-RLHF experiment: every agent variant x several seeds, then the plot and the fit.

    .venv/bin/python benchmarks/rlhf_toy.py --config configs/rlhf_toy.toml --out runs/rlhf/toy \
        --seeds 0 1 2 --plot benchmarks/rlhf_toy.png

Each run is `effjax rlhf run --config CONFIG --set out_dir=OUT/VARIANT/sSEED --set seed=SEED` plus
the variant's overrides below; running them in one process shares the compiled steps. Interrupted?
Run the same command again: finished runs are skipped, an unfinished one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from effjax.rlhf import curves  # noqa: E402
from effjax.rlhf.agents import Trainer, make_environment  # noqa: E402
from effjax.rlhf.config import load_config  # noqa: E402

# Overrides per variant on top of the config file (which holds the shared settings).
VARIANTS: dict[str, tuple[str, ...]] = {
    "info_directed": ("agent.kind=info_directed",),
    "offline": ("agent.kind=offline", "agent.num_batches=400", "agent.retrain_at=[10,40,100,400]"),
    "online": ("agent.kind=online",),
    "online_eps0": ("agent.kind=online", "policy.eps=0"),
    "periodic": ("agent.kind=periodic", "agent.tau=25"),
    "info_directed_dts": ("agent.kind=info_directed", "agent.selection=dts"),
}
DEFAULT_VARIANTS = ("info_directed", "offline", "online", "online_eps0", "periodic")


def describe_environment(env, cfg, out: pathlib.Path) -> None:
  """The toy's SFT reward distribution and near-tie fraction, once, to OUT/environment.json."""
  path = out / "environment.json"
  if cfg.env.kind != "toy" or path.exists():
    return
  from effjax.rlhf.toy import describe
  info = describe(env, env.sft_policy(), top_k=cfg.policy.top_k, temperature=cfg.policy.temperature,
                  rater_temperature=cfg.rater.temperature)
  out.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(info, indent=1))
  print(json.dumps(info, indent=1), flush=True)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/rlhf_toy.toml")
  p.add_argument("--out", default="runs/rlhf/toy")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
  p.add_argument("--set", action="append", default=[], help="extra override for every run")
  p.add_argument("--variant-set", action="append", default=[], metavar="VARIANT:KEY=VALUE",
                 help="extra override for one variant, e.g. offline:agent.num_batches=400")
  p.add_argument("--plot", default="", help="figure path (default: OUT/win_rate.png)")
  p.add_argument("--benchmarks", default="", help="write the '## Online RLHF (toy environment)' "
                 "section of this BENCHMARKS.md")
  p.add_argument("--notes", default="", help="markdown appended to that section (the discussion)")
  args = p.parse_args()
  extra: dict[str, list[str]] = {}
  for item in args.variant_set:
    name, _, assignment = item.partition(":")
    extra.setdefault(name, []).append(assignment)

  out = pathlib.Path(args.out)
  env = None
  dirs = []
  for seed in args.seeds:
    for name in args.variants:
      run_dir = out / name / f"s{seed}"
      dirs.append(str(run_dir))
      if (run_dir / "result.json").exists():
        continue
      overrides = (*VARIANTS[name], *extra.get(name, ()), *args.set, f"seed={seed}",
                   f"out_dir={json.dumps(str(run_dir))}")
      cfg = load_config(args.config, overrides)
      if env is None:
        env = make_environment(cfg)  # the environment is the same for every run
        describe_environment(env, cfg, out)
      t0 = time.perf_counter()
      trainer = Trainer(cfg, env=env, progress=True)
      try:
        result = trainer.run()
      finally:
        trainer.close()
      print(f"{name} seed {seed}: final win {result['final_win_rate']:.3f} with {result['labels']} "
            f"labels in {time.perf_counter() - t0:.0f}s", flush=True)
  groups = curves.load_runs(dirs)
  summary = curves.summarize(groups)
  plot_path = args.plot or str(out / "win_rate.png")
  curves.plot(groups, summary, plot_path)
  (out / "summary.json").write_text(json.dumps(summary, indent=1))
  print("\n".join(curves.summary_lines(summary)))
  print(f"figure: {plot_path}")
  if args.benchmarks:
    write_benchmarks(pathlib.Path(args.benchmarks), summary, out, plot_path, args, sys.argv)
  return 0


def write_benchmarks(path: pathlib.Path, summary: dict, out: pathlib.Path, plot_path: str, args,
                     argv: list[str]) -> None:
  sys.path.insert(0, str(ROOT / "benchmarks"))
  from report import write_section
  cfg = load_config(args.config)
  a = cfg.agent
  env = json.loads((out / "environment.json").read_text()) if (out / "environment.json").exists() else {}
  rows = ["| agent | seeds | labels | final win rate (mean +- std over seeds) | fit a | fit b | "
          "labels to reach offline's final win (fit / measured) | efficiency vs offline |",
          "|---|---|---|---|---|---|---|---|"]
  for name, e in sorted(summary.items(), key=lambda kv: kv[0]):
    fit_a = f"{e['a']:.3g}" if "a" in e else "-"
    fit_b = f"{e['b']:.3f}" if "b" in e else "-"
    reach = "-"
    eff = "-"
    if "labels_to_reach_reference" in e:
      measured = e["measured_labels_to_reach_reference"]
      reach = f"{e['labels_to_reach_reference']:.0f} / {measured if measured else 'not reached'}"
      eff = f"{e['efficiency_vs_reference']:.1f}x"
    rows.append(f"| {name} | {len(e['seeds'])} | {e['final_labels']} | {e['final_win']:.3f} +- "
                f"{e['final_win_std']:.3f} | {fit_a} | {fit_b} | {reach} | {eff} |")
  curves_txt = "\n".join(
      f"- {name}: " + ", ".join(f"{n}: {w:.3f}" for n, w in zip(e["labels"], e["mean_win"]) if n > 0)
      for name, e in sorted(summary.items()))
  env_txt = ""
  if env:
    q = env["sft_reward_quantiles_10_50_90_99"]
    env_txt = (
        f"SFT policy (top-{cfg.policy.top_k} samples, rewards standardised on the SFT data): quantiles "
        f"10/50/90/99% = {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f} / {q[3]:.2f}, within-prompt std "
        f"{env['sft_reward_std_within_prompt']:.2f}; greedy SFT reward {env['sft_greedy_reward']:.2f}; "
        f"the teacher's best response scores {env['best_response_reward']:.2f} and has median SFT "
        f"log-probability {env['best_response_sft_logprob_median']:.1f}. Random pairs of SFT samples: "
        f"{100 * env['near_tie_fraction']:.0f}% near ties (|P - 1/2| < 0.1), "
        f"{100 * env['clear_pair_fraction']:.0f}% clear (|P - 1/2| > 0.4).")
  rel_plot = os.path.relpath(pathlib.Path(plot_path).resolve(), path.resolve().parent)
  body = f"""Command (resumable; finished runs are skipped):

    {' '.join(['.venv/bin/python', 'benchmarks/rlhf_toy.py', *argv[1:]])}

Settings: `{args.config}` plus the per-agent overrides in
`benchmarks/rlhf_toy.py` (VARIANTS); seeds {' '.join(map(str, args.seeds))}. Batch {a.prompts_per_batch} prompts x
{a.responses_per_prompt} responses (the paper's size), one label per prompt; ENN with {cfg.enn.num_particles}
particles; policy lr {cfg.policy.lr}, nudge eps {cfg.policy.eps}, KL beta {cfg.policy.beta}, anchor eta
{cfg.policy.eta}; offline/periodic retrain the policy for {cfg.policy.retrain_steps} steps. Win rate = mean
rater probability that the greedy policy beats the greedy SFT policy on {cfg.env.toy.num_eval_prompts}
held-out prompts (0.5 = tie).

{env_txt}

![win rate vs labels]({rel_plot})

{chr(10).join(rows)}

Mean win rate per evaluated label count:

{curves_txt}
"""
  if args.notes:
    body += "\n" + pathlib.Path(args.notes).read_text()
  write_section(path, "## Online RLHF (toy environment)", body)


if __name__ == "__main__":
  sys.exit(main())
