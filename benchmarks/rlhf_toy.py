"""The toy online-RLHF experiment: every agent x 10 seeds, tuning, the nudge test, intervals.

    # run (resumable; finished runs are skipped, an unfinished one resumes from its checkpoint):
    .venv/bin/python benchmarks/rlhf_toy.py run --study tune_enn tune_offline [--shard 0/2]
    .venv/bin/python benchmarks/rlhf_toy.py run --study main nudge [--shard 0/2]
    # report: tables, intervals, plots, and the BENCHMARKS.md section
    .venv/bin/python benchmarks/rlhf_toy.py report --benchmarks BENCHMARKS.md --notes benchmarks/notes/rlhf_toy.md

Each run is `effjax rlhf run --config configs/rlhf_toy.toml --set seed=S --set out_dir=OUT/STUDY/VARIANT/sS`
plus the variant's overrides below; one process runs many (they share the compiled steps). --shard i/n
takes every n-th run, so n processes split a study; benchmarks/rlhf_toy.sh launches the whole
experiment that way in the background (nice'd, pinned to one core).

Studies:
  tune_enn      the ENN regulariser (enn.diff_reg) and the bootstrap, on info-directed, tuning seeds
  tune_offline  offline's retraining (policy steps, RM epochs, policy lr): the same budget (5
                settings x 2 tuning seeds)
  main          offline, periodic, online (random pairs), online + double TS, online + Boltzmann,
                info-directed, and the control (info-directed whose particles never learn), 10 seeds;
                with the tuning's choices (tuned_overrides), as is the nudge study
  nudge         online with a noisier rater (20% of labels flipped) over twice the horizon, eps = 0
                against eps = 0.05
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from effjax.rlhf import curves  # noqa: E402
from effjax.rlhf.config import load_config  # noqa: E402

OFFLINE_RETRAIN = "agent.retrain_at=[1,4,16,32,100,400]"  # 64 ... 25,600 labels
TUNING_SEEDS = (100, 101)
TUNE_HORIZON = ("agent.num_batches=24", "agent.eval_at=[1,2,4,8,16,24]")  # 1,536 labels: cheaper
NUDGE = ("agent.kind=online", "rater.noise=0.2", "agent.num_batches=64",
         "agent.eval_at=[1,2,4,8,16,32,48,64]")
STUDIES: dict[str, dict] = {
    "tune_enn": dict(seeds=TUNING_SEEDS, variants={
        name: ("agent.kind=info_directed", *TUNE_HORIZON, *o) for name, o in {
            "reg0": ("enn.diff_reg=0",),
            "reg1": ("enn.diff_reg=1",),
            "reg10": ("enn.diff_reg=10",),
            "reg100": ("enn.diff_reg=100",),
            "reg1_bootstrap": ("enn.diff_reg=1", "enn.bootstrap=true"),
        }.items()}),
    "tune_offline": dict(seeds=TUNING_SEEDS, variants={
        name: ("agent.kind=offline", "agent.num_batches=100", "agent.retrain_at=[16,100]", *o)
        for name, o in {
            "steps32_epochs2": ("policy.retrain_steps=32", "enn.retrain_epochs=2"),
            "steps100_epochs2": ("policy.retrain_steps=100", "enn.retrain_epochs=2"),
            "steps200_epochs2": ("policy.retrain_steps=200", "enn.retrain_epochs=2"),
            "steps32_epochs4": ("policy.retrain_steps=32", "enn.retrain_epochs=4"),
            "steps100_epochs2_lr3e-4": ("policy.retrain_steps=100", "enn.retrain_epochs=2",
                                        "policy.lr=3e-4"),
        }.items()}),
    "main": dict(seeds=tuple(range(10)), variants={
        "offline": ("agent.kind=offline", "agent.num_batches=400", OFFLINE_RETRAIN),
        "periodic": ("agent.kind=periodic", "agent.retrain_at=[1,2,4,8,16,24,32]"),
        "online": ("agent.kind=online",),
        "online_dts": ("agent.kind=online", "agent.selection=dts"),
        "online_boltzmann": ("agent.kind=online", "agent.selection=boltzmann"),
        "info_directed": ("agent.kind=info_directed",),
        "info_directed_control": ("agent.kind=info_directed", "enn.train_particles=false"),
    }),
    "nudge": dict(seeds=tuple(range(4)), variants={
        "eps0.05": (*NUDGE, "policy.eps=0.05"),
        "eps0": (*NUDGE, "policy.eps=0"),
    }),
}
# Label count at which each tuning study picks its setting (its last evaluation).
TUNED_AT = {"tune_enn": 1536, "tune_offline": 6400}
# Display names, in the order of the ordering goal.
MAIN_NAMES = {"offline": "offline", "periodic": "periodic", "online": "online (random pairs)",
              "online_dts": "online + double TS", "online_boltzmann": "online + Boltzmann",
              "info_directed": "info-directed",
              "info_directed_control": "control: info-directed, untrained particles"}


def run_list(studies: list[str], variants: list[str] | None = None) -> list[tuple[str, str, int]]:
  """(study, variant, seed), seed-major so that shards get a mix of cheap and dear runs."""
  out = []
  for study in studies:
    spec = STUDIES[study]
    for seed in spec["seeds"]:
      out += [(study, v, seed) for v in spec["variants"] if not variants or v in variants]
  return out


def run_dir(out: pathlib.Path, study: str, variant: str, seed: int) -> pathlib.Path:
  return out / study / variant / f"s{seed}"


def cmd_run(args) -> int:
  from effjax.rlhf.agents import make_environment
  out = pathlib.Path(args.out)
  todo = run_list(args.study, args.variants)
  shard, of = (int(x) for x in args.shard.split("/"))
  env = None
  tuned = tuned_overrides(out) if {"main", "nudge"} & set(args.study) else {}
  for study, variant, seed in todo[shard::of]:
    d = run_dir(out, study, variant, seed)
    if (d / "result.json").exists():
      continue
    variant_overrides = STUDIES[study]["variants"][variant]
    overrides = (*variant_overrides, *tuned_for(tuned, variant_overrides), *args.set, f"seed={seed}",
                 f"out_dir={json.dumps(str(d))}")
    cfg = load_config(args.config, overrides)
    if env is None:
      env = make_environment(cfg)  # one environment (and SFT policy) for every run
      describe_environment(env, cfg, out)
    run_trainer(cfg, env, f"{study}/{variant} seed {seed}", progress=not args.no_progress)
  return 0


def tuned_overrides(out: pathlib.Path) -> dict[str, tuple[str, ...]]:
  """The tuning studies' choices, which the main and nudge studies run with: the ENN setting
  (every agent's reward model) and offline's retraining (offline and periodic, which retrain)."""
  chosen = {}
  for study, labels in TUNED_AT.items():
    spec = STUDIES[study]
    done = sum((run_dir(out, study, v, s) / "result.json").exists()
               for v in spec["variants"] for s in spec["seeds"])
    if done < len(spec["variants"]) * len(spec["seeds"]):
      raise SystemExit(f"{study}: {done} of {len(spec['variants']) * len(spec['seeds'])} runs "
                       "finished; run the tuning studies first (--study tune_enn tune_offline)")
    best = tuning_table(out, study, labels)[1]
    chosen[study] = tuple(o for o in spec["variants"][best] if not o.startswith("agent."))
  return chosen


def tuned_for(tuned: dict[str, tuple[str, ...]], variant_overrides: tuple[str, ...]) -> tuple[str, ...]:
  if not tuned:
    return ()
  retrains = any(o in ("agent.kind=offline", "agent.kind=periodic") for o in variant_overrides)
  return (*tuned["tune_enn"], *(tuned["tune_offline"] if retrains else ()))


def run_trainer(cfg, env, name: str, progress: bool) -> dict:
  """One run of the RLHF Trainer to its end (closed either way), with a one-line summary."""
  from effjax.rlhf.agents import Trainer

  t0 = time.perf_counter()
  trainer = Trainer(cfg, env=env, progress=progress)
  try:
    result = trainer.run()
  finally:
    trainer.close()
  print(f"{name}: final win {result['final_win_rate']:.3f} with {result['labels']} labels in "
        f"{time.perf_counter() - t0:.0f}s", flush=True)
  return result


def describe_environment(env, cfg, out: pathlib.Path) -> None:
  """The toy's SFT reward distribution and near-tie fraction, once, to OUT/environment.json."""
  path = out / "environment.json"
  if path.exists():
    return
  from effjax.rlhf.toy import describe
  info = describe(env, env.sft_policy(), top_k=cfg.policy.top_k, temperature=cfg.policy.temperature,
                  rater_temperature=cfg.rater.temperature)
  out.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(info, indent=1))


# ---- report ---------------------------------------------------------------------------------------

def groups_of(out: pathlib.Path, study: str, metric: str, names: dict[str, str] | None = None,
              complete_only: bool = True) -> dict[str, list[dict]]:
  """Finished runs of a study by display name."""
  groups: dict[str, list[dict]] = {}
  for variant in STUDIES[study]["variants"]:
    for seed in STUDIES[study]["seeds"]:
      d = run_dir(out, study, variant, seed)
      if (d / "result.json").exists() or (not complete_only and (d / "metrics.jsonl").exists()):
        groups.setdefault((names or {}).get(variant, variant), []).append(curves.read_run(d, metric))
  return groups


def fmt(m, lo, hi, digits=3) -> str:
  return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_ratio(e: dict | None) -> str:
  if e is None:
    return "-"
  measured = (f"{e['measured_ratio']:.1f}x at {e['measured_labels']}" if e["measured_ratio"]
              else "not reached")
  extra = f"; {100 * e['extrapolated']:.0f}% of resamples extrapolate" if e["extrapolated"] else ""
  return f"{e['ratio']:.1f}x [{e['ratio_lo']:.1f}, {e['ratio_hi']:.1f}] (measured {measured}{extra})"


def tuning_table(out: pathlib.Path, study: str, labels: int) -> tuple[list[str], str | None]:
  win = groups_of(out, study, "win_rate")
  reward = groups_of(out, study, "reward_sampled")
  rows = [f"| setting | seeds | win rate at {labels} | sampled teacher reward at {labels} |",
          "|---|---|---|---|"]
  best, best_key = None, None
  for name in STUDIES[study]["variants"]:
    if name not in win:
      continue
    w = curves.value_at(win[name], labels)
    r = curves.value_at(reward[name], labels)
    rows.append(f"| {name} | {len(w)} | {' / '.join(f'{x:.3f}' for x in w)} (mean {w.mean():.3f}) | "
                f"{' / '.join(f'{x:.2f}' for x in r)} (mean {r.mean():.2f}) |")
    key = (round(float(w.mean()), 3), float(r.mean()))
    if best_key is None or key > best_key:
      best, best_key = name, key
  return rows, best


def cmd_report(args) -> int:
  out = pathlib.Path(args.out)
  lines: list[str] = []
  say = lambda s="": (print(s), lines.append(s))

  env = json.loads((out / "environment.json").read_text()) if (out / "environment.json").exists() else {}
  cfg = load_config(args.config)
  n_final = max(cfg.agent.eval_at or (cfg.agent.num_batches,)) * cfg.agent.prompts_per_batch

  tune_rows = {}
  for study, labels in TUNED_AT.items():
    rows, best = tuning_table(out, study, labels)
    tune_rows[study] = (rows, best)
    say(f"{study}: best {best}")
    for r in rows[2:]:
      say("  " + r)

  win = groups_of(out, "main", "win_rate", MAIN_NAMES)
  reward = groups_of(out, "main", "reward_sampled", MAIN_NAMES)
  if not win:
    say("no finished main-study runs yet")
    return 0
  win_sum = curves.summarize(win, reference="offline")
  reward_sum = curves.summarize(reward, reference="__none__")
  online_name = MAIN_NAMES["online"]
  vs_online = {name: curves.efficiency(win[online_name], runs)
               for name, runs in win.items() if online_name in win and name not in (online_name, "offline")
               and name != "periodic"}
  plot_path = pathlib.Path(args.plot)
  curves.plot([("win rate vs SFT (greedy, rater probability)", win, win_sum),
               ("teacher reward of sampled responses", reward, reward_sum)], plot_path,
              fitted=(True, False))

  rows = [f"| agent | seeds | win rate at {n_final} labels | sampled reward at {n_final} | fit a, b | "
          "labels-efficiency vs offline's fit at 25,600 | vs online (random pairs) at its last point |",
          "|---|---|---|---|---|---|---|"]
  for variant, name in MAIN_NAMES.items():
    if name not in win:
      continue
    w_at = curves.value_at(win[name], n_final)
    r_at = curves.value_at(reward[name], n_final)
    e = win_sum[name]
    fit = f"{e['a']:.3g}, {e['b']:.3f}" if "a" in e else "-"
    rows.append(f"| {name} | {len(win[name])} | {fmt(*curves.mean_interval(w_at))} | "
                f"{fmt(*curves.mean_interval(r_at), digits=2)} | {fit} | {fmt_ratio(e.get('efficiency'))} | "
                f"{fmt_ratio(vs_online.get(name))} |")
  say("\n".join(rows))

  # Mean curves with intervals, per evaluated label count.
  per_label = []
  for name in MAIN_NAMES.values():
    if name not in win:
      continue
    cells = []
    for n in win_sum[name]["labels"]:
      if n > 0:
        m, lo, hi = curves.mean_interval(curves.value_at(win[name], n))
        cells.append(f"{n}: {m:.3f} [{lo:.3f}, {hi:.3f}]")
    per_label.append(f"- {name}: " + ", ".join(cells))

  # Ordering at equal labels: offline < periodic < online < info-directed.
  chain = ["offline", "periodic", online_name, MAIN_NAMES["info_directed"]]
  order_rows = []
  ordering_met = True
  for lo_name, hi_name in zip(chain[:-1], chain[1:]):
    if lo_name in win and hi_name in win:
      d, d_lo, d_hi = curves.difference_interval(curves.value_at(win[hi_name], n_final),
                                                 curves.value_at(win[lo_name], n_final))
      holds = d_lo > 0
      ordering_met &= holds
      order_rows.append(f"- {hi_name} - {lo_name} at {n_final} labels: {d:+.3f} [{d_lo:+.3f}, {d_hi:+.3f}]"
                        f" ({'above zero' if holds else 'interval includes zero or below'})")
  say("\n".join(order_rows))

  # Offline per seed (the collapse diagnosis): win, teacher and RM reward of samples, KL to SFT.
  offline_rows = ["| seed | " + " | ".join(f"win / reward / RM reward / KL at {n}" for n in
                                           win_sum["offline"]["labels"] if n > 0) + " |"] if "offline" in win else []
  if offline_rows:
    offline_rows.append("|---|" + "---|" * (len(offline_rows[0].split("|")) - 3))
    metrics = {m: {r["seed"]: r for r in groups_of(out, "main", m)["offline"]}
               for m in ("win_rate", "reward_sampled", "rm_reward_sampled", "kl_sft")}
    for seed in sorted(metrics["win_rate"]):
      cells = []
      for n in win_sum["offline"]["labels"]:
        if n > 0:
          vals = [dict(zip(metrics[m][seed]["labels"].tolist(), metrics[m][seed]["value"].tolist())).get(n)
                  for m in ("win_rate", "reward_sampled", "rm_reward_sampled", "kl_sft")]
          cells.append(" / ".join("-" if v is None else f"{v:.2f}" for v in vals))
      offline_rows.append(f"| {seed} | " + " | ".join(cells) + " |")

  # The nudge test.
  nudge_rows = []
  for metric, what in (("win_rate", "win rate"), ("reward_sampled", "sampled teacher reward")):
    g = groups_of(out, "nudge", metric)
    if len(g) == 2:
      n = curves.mean_curve(g["eps0"])[0]
      cells = []
      for k in n:
        if k > 0:
          d, d_lo, d_hi = curves.difference_interval(curves.value_at(g["eps0.05"], int(k)),
                                                     curves.value_at(g["eps0"], int(k)))
          cells.append(f"{int(k)}: {d:+.3f} [{d_lo:+.3f}, {d_hi:+.3f}]")
      m5 = curves.mean_interval(curves.value_at(g["eps0.05"], int(n[-1])))
      m0 = curves.mean_interval(curves.value_at(g["eps0"], int(n[-1])))
      nudge_rows.append(f"- {what}, eps = 0.05 minus eps = 0: " + ", ".join(cells)
                        + f". At {int(n[-1])} labels: eps = 0.05 {fmt(*m5)}, eps = 0 {fmt(*m0)}.")
  say("\n".join(nudge_rows))

  info = win_sum.get(MAIN_NAMES["info_directed"], {})
  goal_lines = []
  if "efficiency" in info:
    e = info["efficiency"]
    met = e["ratio"] >= 10 and e["ratio_lo"] >= 5
    goal_lines.append(f"- info-directed >= 10x fewer labels than offline (95% lower bound >= 5x): "
                      f"{fmt_ratio(e)}: **{'met' if met else 'missed'}**.")
  if MAIN_NAMES["info_directed"] in vs_online:
    e = vs_online[MAIN_NAMES["info_directed"]]
    goal_lines.append(f"- info-directed >= 2x fewer labels than online with random pairs: {fmt_ratio(e)}: "
                      f"**{'met' if e['ratio'] >= 2 else 'missed'}**.")
  goal_lines.append(f"- ordering offline < periodic < online < info-directed at {n_final} labels, each "
                    f"step's 95% interval above zero: **{'met' if ordering_met else 'missed'}** (below).")
  say("\n".join(goal_lines))

  if args.benchmarks:
    # The settings the main study ran with: the config plus the tuning's choices.
    cfg = load_config(args.config, tuned_for(tuned_overrides(out), ("agent.kind=offline",)))
    write_benchmarks(pathlib.Path(args.benchmarks), args, env, cfg, n_final, tune_rows, rows, per_label,
                     order_rows, offline_rows, nudge_rows, goal_lines, plot_path)
  return 0


def write_benchmarks(path, args, env, cfg, n_final, tune_rows, rows, per_label, order_rows, offline_rows,
                     nudge_rows, goal_lines, plot_path) -> None:
  sys.path.insert(0, str(ROOT / "benchmarks"))
  from report import write_section
  a = cfg.agent
  env_txt = ""
  if env:
    q = env["sft_reward_quantiles_10_50_90_99"]
    env_txt = (
        f"The toy: SFT policy samples (top-{cfg.policy.top_k}; rewards standardised on the SFT data) have "
        f"teacher-reward quantiles 10/50/90/99% = {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f} / {q[3]:.2f}, "
        f"within-prompt std {env['sft_reward_std_within_prompt']:.2f}; greedy SFT reward "
        f"{env['sft_greedy_reward']:.2f}; the teacher's best response scores {env['best_response_reward']:.2f} "
        f"with median SFT log-probability {env['best_response_sft_logprob_median']:.1f}. Random pairs of SFT "
        f"samples: {100 * env['near_tie_fraction']:.0f}% near ties (|P - 1/2| < 0.1), "
        f"{100 * env['clear_pair_fraction']:.0f}% clear (|P - 1/2| > 0.4).")
  rel_plot = os.path.relpath(plot_path.resolve(), path.resolve().parent)
  (enn_rows, enn_best), (off_rows, off_best) = tune_rows["tune_enn"], tune_rows["tune_offline"]
  body = f"""Commands ({datetime.date.today().isoformat()}; `uptime` load during the runs: {args.load or 'not recorded'}):

    CORE= WORKERS=2 bash benchmarks/rlhf_toy.sh   # tuning, then main + nudge: 2 nice'd workers, any core
    .venv/bin/python benchmarks/rlhf_toy.py report --benchmarks BENCHMARKS.md --notes benchmarks/notes/rlhf_toy.md

Settings: `configs/rlhf_toy.toml` plus each study's overrides in `benchmarks/rlhf_toy.py` (STUDIES).
Batch {a.prompts_per_batch} prompts x {a.responses_per_prompt} responses (the paper's size), one label per prompt;
ENN with {cfg.enn.num_particles} particles, regulariser toward the initial weights diff_reg = {cfg.enn.diff_reg}
(bootstrap {'on' if cfg.enn.bootstrap else 'off'}: the ENN tuning's choice, every agent); policy lr {cfg.policy.lr}, nudge eps {cfg.policy.eps}, KL beta
{cfg.policy.beta}, anchor eta {cfg.policy.eta}. Online agents: {a.num_batches} batches = {n_final} labels, evaluated at
{', '.join(str(b * a.prompts_per_batch) for b in a.eval_at)} labels. Offline: random pairs from the SFT
policy up to 25,600 labels, RM retrained from its initial weights ({cfg.enn.retrain_epochs} epochs) and the
policy from theta_0 ({cfg.policy.retrain_steps} steps; offline's tuning's choice, periodic too) at 64 / 256 / 1,024 / 2,048 / 6,400 / 25,600 labels.
Periodic: the same retraining at 64, 128, 256, 512, 1,024, 1,536, 2,048 labels, each time
collecting from the newest policy. Win rate = mean rater probability that the greedy policy beats the
greedy SFT policy on {cfg.env.toy.num_eval_prompts} held-out prompts (0.5 = tie; saturates near 0.97
here). Non-saturating metric: mean teacher reward of {a.eval_samples} sampled responses per held-out prompt
(SFT: ~0). Intervals: 95% percentile bootstrap over seeds (2,000 resamples; ratios refit both
curves per resample).

{env_txt}

**Tuning** (tuning seeds {', '.join(map(str, TUNING_SEEDS))}, not among the reported seeds; 5 settings x 2 seeds
each for the ENN agents and for offline; the main and nudge studies run with the chosen settings). ENN regulariser on info-directed, 1,536 labels (chosen: `{enn_best}`):

{chr(10).join(enn_rows)}

Offline's retraining, evaluated at 6,400 labels (chosen: `{off_best}`):

{chr(10).join(off_rows)}

**Main study.** ![win rate and sampled reward vs labels]({rel_plot})

{chr(10).join(rows)}

Goals:

{chr(10).join(goal_lines)}

Ordering (difference of means at {n_final} labels, 95% interval):

{chr(10).join(order_rows)}

Mean greedy win rate [95% interval] per evaluated label count:

{chr(10).join(per_label)}

Offline per seed (greedy win rate / sampled teacher reward / the RM's own reward of those samples /
MC KL(policy || SFT) per response, at each retraining):

{chr(10).join(offline_rows)}

**The nudge test** (online, random pairs, 20% of labels flipped, {STUDIES['nudge']['variants']['eps0'][2].split('=')[1]}
batches, seeds {', '.join(map(str, STUDIES['nudge']['seeds']))}):

{chr(10).join(nudge_rows)}
"""
  if args.notes:
    body += "\n" + pathlib.Path(args.notes).read_text()
  write_section(path, "## Online RLHF (toy environment)", body)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  for name in ("run", "report"):
    s = sub.add_parser(name)
    s.add_argument("--config", default="configs/rlhf_toy.toml")
    s.add_argument("--out", default="runs/rlhf/toy")
  run = sub.choices["run"]
  run.add_argument("--study", nargs="+", default=["main"], choices=list(STUDIES))
  run.add_argument("--variants", nargs="+", help="only these variants of the studies")
  run.add_argument("--shard", default="0/1", help="i/n: this process runs every n-th run from the i-th")
  run.add_argument("--set", action="append", default=[], help="extra override for every run")
  run.add_argument("--no-progress", action="store_true")
  rep = sub.choices["report"]
  rep.add_argument("--plot", default="benchmarks/rlhf_toy.png")
  rep.add_argument("--benchmarks", default="", help="write the toy section of this BENCHMARKS.md")
  rep.add_argument("--notes", default="", help="markdown appended to that section (the discussion)")
  rep.add_argument("--load", default="", help="the machine load during the runs, for the record")
  args = p.parse_args()
  return cmd_run(args) if args.command == "run" else cmd_report(args)


if __name__ == "__main__":
  sys.exit(main())
