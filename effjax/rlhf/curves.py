"""Win-rate curves over seeds: w(n) = 1 - 0.5 (n / a)^(-b) fits, intervals and label efficiency.

log(2 (1 - w)) = b log a - b log n is linear in log n, which gives the starting point (and the
answer when scipy is missing); with scipy the fit is refined by least squares on w itself.

Runs are grouped by name; a run is dict(labels [k], value [k] (the metric at each evaluation),
seed, dir). Intervals are percentile bootstraps over seeds: resample a group's runs with
replacement, recompute the statistic (refitting curves where it needs them), take the 2.5 and 97.5
percentiles.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Callable

import numpy as np

BOOTSTRAP = 2000  # resamples per interval


def win_curve(n, a: float, b: float):
  return 1.0 - 0.5 * (np.asarray(n, np.float64) / a) ** (-b)


def fit_win_curve(n, w) -> tuple[float, float]:
  """(a, b) of w(n) = 1 - 0.5 (n/a)^(-b) from points with n > 0 and w < 1."""
  n = np.asarray(n, np.float64)
  w = np.asarray(w, np.float64)
  keep = (n > 0) & (w < 1.0)
  n, w = n[keep], w[keep]
  if len(n) < 2:
    raise ValueError(f"need at least two points with labels > 0 to fit, got {len(n)}")
  x, y = np.log(n), np.log(2.0 * (1.0 - w))
  slope, intercept = np.polyfit(x, y, 1)
  b = max(-slope, 1e-6)
  log_a = intercept / b
  try:
    from scipy.optimize import curve_fit
  except ImportError:
    return float(math.exp(log_a)), float(b)
  try:
    (log_a, b), _ = curve_fit(lambda n, log_a, b: win_curve(n, np.exp(log_a), b), n, w,
                              p0=(log_a, b), maxfev=20000)
  except RuntimeError:
    pass  # keep the linearised fit
  return float(np.exp(log_a)), float(b)


def labels_to_reach(w: float, a: float, b: float) -> float:
  """n at which the fitted curve reaches w (inf when w >= 1, when the fit does not rise (b <= 0),
  or past float range: a near-flat fit, as a few noisy points give, has b ~ 0 and w**(-1/b)
  overflows)."""
  if w >= 1.0 or b <= 0:
    return math.inf
  try:
    return a * (2.0 * (1.0 - w)) ** (-1.0 / b)
  except OverflowError:
    return math.inf


def read_run(path: str | pathlib.Path, metric: str = "win_rate") -> dict:
  """One run directory's evaluations of `metric`: dict(labels, value, seed, dir, config)."""
  path = pathlib.Path(path)
  cfg = json.loads((path / "config.json").read_text())
  points = []
  for line in (path / "metrics.jsonl").read_text().splitlines():
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    if r.get(metric) is not None:
      points.append((r["labels"], r[metric]))
  return dict(labels=np.asarray([p[0] for p in points]), value=np.asarray([p[1] for p in points]),
              seed=cfg["seed"], dir=str(path), config=cfg)


def load_runs(dirs: list[str], metric: str = "win_rate",
              name: Callable[[dict], str] | None = None) -> dict[str, list[dict]]:
  """Runs grouped by name (default: run_name of the config, e.g. "online eps=0")."""
  groups: dict[str, list[dict]] = {}
  for d in dirs:
    run = read_run(d, metric)
    groups.setdefault((name or run_name)(run["config"]), []).append(run)
  return groups


def run_name(cfg: dict) -> str:
  a = cfg["agent"]
  name = a["kind"]
  sel = a.get("selection")
  if sel and not (a["kind"] == "info_directed" and sel == "info") and not (
      a["kind"] in ("online", "offline", "periodic") and sel == "random"):
    name += f" ({sel})"
  if not cfg["enn"].get("train_particles", True):
    name += " (untrained particles)"
  if a["kind"] in ("online", "info_directed") and cfg["policy"]["eps"] == 0:
    name += " eps=0"
  return name


def mean_curve(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """Mean over seeds at the label counts all runs share."""
  common = set(runs[0]["labels"].tolist())
  for r in runs[1:]:
    common &= set(r["labels"].tolist())
  n = np.asarray(sorted(common))
  v = np.mean([[dict(zip(r["labels"].tolist(), r["value"].tolist()))[k] for k in n] for r in runs], 0)
  return n, v


def value_at(runs: list[dict], labels: int) -> np.ndarray:
  """Each run's value at `labels` (runs without an evaluation there are left out)."""
  return np.asarray([dict(zip(r["labels"].tolist(), r["value"].tolist()))[labels] for r in runs
                     if labels in r["labels"].tolist()])


def fit_runs(runs: list[dict]) -> tuple[float, float]:
  return fit_win_curve(np.concatenate([r["labels"] for r in runs]),
                       np.concatenate([r["value"] for r in runs]))


def resample(runs: list[dict], gen: np.random.Generator) -> list[dict]:
  return [runs[i] for i in gen.integers(0, len(runs), len(runs))]


def interval(samples) -> tuple[float, float]:
  s = np.asarray(samples, np.float64)
  return float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))


def mean_interval(values, seed: int = 0) -> tuple[float, float, float]:
  """(mean, 2.5%, 97.5%) of the mean over seeds."""
  v = np.asarray(values, np.float64)
  gen = np.random.default_rng(seed)
  boots = v[gen.integers(0, len(v), (BOOTSTRAP, len(v)))].mean(1)
  return (float(v.mean()), *interval(boots))


def difference_interval(a, b, seed: int = 0) -> tuple[float, float, float]:
  """(mean(a) - mean(b), 2.5%, 97.5%), the two groups' seeds resampled independently."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  gen = np.random.default_rng(seed)
  boots = (a[gen.integers(0, len(a), (BOOTSTRAP, len(a)))].mean(1)
           - b[gen.integers(0, len(b), (BOOTSTRAP, len(b)))].mean(1))
  return (float(a.mean() - b.mean()), *interval(boots))


def efficiency(reference: list[dict], runs: list[dict], seed: int = 0) -> dict:
  """Label-efficiency ratio of `runs` against `reference`.

  Target: the reference's fitted win rate at its largest label count N. Ratio: N / the labels the
  runs' fitted curve needs to reach the target. Also the measured ratio (no fit for the runs: N /
  the first evaluated label count where their mean reaches the target) and the bootstrap interval
  of the fitted ratio, both groups' seeds resampled (and refitted) independently; `extrapolated`
  is the share of resamples whose crossing lies beyond the runs' largest label count.
  """
  n_ref = int(max(r["labels"].max() for r in reference))
  n_max = int(max(r["labels"].max() for r in runs))

  def ratio(ref, ours) -> tuple[float, float, float]:
    target = float(win_curve(n_ref, *fit_runs(ref)))
    need = labels_to_reach(target, *fit_runs(ours))
    return target, need, (n_ref / need if need > 0 else math.inf)

  target, need, r = ratio(reference, runs)
  n, mean = mean_curve(runs)
  reached = [int(k) for k, v in zip(n, mean) if k > 0 and v >= target]
  gen = np.random.default_rng(seed)
  boots, beyond = [], 0
  for _ in range(BOOTSTRAP):
    _, need_b, r_b = ratio(resample(reference, gen), resample(runs, gen))
    boots.append(r_b)
    beyond += need_b > n_max
  lo, hi = interval(boots)
  return dict(reference_labels=n_ref, target=target, labels_needed=need, ratio=r, ratio_lo=lo,
              ratio_hi=hi, extrapolated=beyond / BOOTSTRAP,
              measured_labels=reached[0] if reached else None,
              measured_ratio=n_ref / reached[0] if reached else None)


def summarize(groups: dict[str, list[dict]], reference: str = "offline") -> dict:
  """Per group: seeds, mean curve, final mean with its interval, fitted (a, b); and, when the
  reference group is present, each group's efficiency() against it."""
  out: dict = {}
  for name, runs in groups.items():
    n, v = mean_curve(runs)
    mean, lo, hi = mean_interval(value_at(runs, int(n[-1])))
    entry = dict(seeds=[r["seed"] for r in runs], labels=n.tolist(), mean=v.tolist(),
                 final_labels=int(n[-1]), final=mean, final_lo=lo, final_hi=hi)
    try:
      entry["a"], entry["b"] = fit_runs(runs)
    except ValueError:
      pass
    out[name] = entry
  if reference in groups:
    for name, runs in groups.items():
      if name != reference and "a" in out[name]:
        out[name]["efficiency"] = efficiency(groups[reference], runs)
  return out


def plot(panels: list[tuple[str, dict[str, list[dict]], dict]], path: str | pathlib.Path,
         fitted: tuple[bool, ...] = (True,)) -> None:
  """One panel per (y label, groups, summary): each seed faint, the mean as dots, and the fitted
  w(n) on the panels marked in `fitted` (else the means joined by lines)."""
  import matplotlib  # lazy: only plotting needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
  for i, (ylabel, groups, summary) in enumerate(panels):
    ax, fit = axes[0, i], i < len(fitted) and fitted[i]
    for k, (name, runs) in enumerate(sorted(groups.items())):
      color = f"C{k % 10}"
      for r in runs:
        keep = r["labels"] > 0
        ax.plot(r["labels"][keep], r["value"][keep], color=color, alpha=0.15, lw=0.7)
      e = summary[name]
      n = np.asarray(e["labels"])
      keep = n > 0
      ax.plot(n[keep], np.asarray(e["mean"])[keep], "o" if fit else "o-", color=color, ms=3, lw=1)
      if fit and "a" in e:
        grid = np.geomspace(max(1, n[keep].min()), n.max() * 2, 100)
        ax.plot(grid, win_curve(grid, e["a"], e["b"]), color=color, lw=1.5)
      ax.plot([], [], color=color, label=f"{name} ({len(runs)})")
    ax.set_xscale("log")
    ax.set_xlabel("labels")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summary_lines(summary: dict, reference: str = "offline") -> list[str]:
  """One line per group: seeds, final labels and value with its interval, the fit, efficiency."""
  lines = []
  for name, e in sorted(summary.items()):
    line = (f"{name:34s} seeds={len(e['seeds'])} labels={e['final_labels']} "
            f"final={e['final']:.3f} [{e['final_lo']:.3f}, {e['final_hi']:.3f}]")
    if "a" in e:
      line += f" a={e['a']:.3g} b={e['b']:.3f}"
    if "efficiency" in e:
      f = e["efficiency"]
      line += (f" vs {reference}: {f['ratio']:.2f}x [{f['ratio_lo']:.2f}, {f['ratio_hi']:.2f}]"
               f" measured {f['measured_ratio'] or 0:.2f}x")
    lines.append(line)
  return lines
