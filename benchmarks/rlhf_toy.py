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
  p.add_argument("--config", default=str(ROOT / "configs/rlhf_toy.toml"))
  p.add_argument("--out", default=str(ROOT / "runs/rlhf/toy"))
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
  p.add_argument("--set", action="append", default=[], help="extra override for every run")
  p.add_argument("--variant-set", action="append", default=[], metavar="VARIANT:KEY=VALUE",
                 help="extra override for one variant, e.g. offline:agent.num_batches=400")
  p.add_argument("--plot", default="", help="figure path (default: OUT/win_rate.png)")
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
  for name, e in sorted(summary.items()):
    line = f"{name:26s} seeds={len(e['seeds'])} labels={e['final_labels']} win={e['final_win']:.3f}" \
           f"+-{e['final_win_std']:.3f}"
    if "a" in e:
      line += f" a={e['a']:.3g} b={e['b']:.3f}"
    if "efficiency_vs_reference" in e:
      line += f" efficiency vs offline={e['efficiency_vs_reference']:.2f}x" \
              f" (measured: reached at {e['measured_labels_to_reach_reference']})"
    print(line)
  print(f"figure: {plot_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
