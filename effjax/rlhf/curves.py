"""Win-rate curves: w(n) = 1 - 0.5 (n / a)^(-b) fits and the label-efficiency ratio.

log(2 (1 - w)) = b log a - b log n is linear in log n, which gives the starting point (and the
answer when scipy is missing); with scipy the fit is refined by least squares on w itself.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np


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
  """n at which the fitted curve reaches w (inf when w >= 1, or past float range: a near-flat fit,
  as a few noisy points give, has b ~ 0 and w**(-1/b) overflows)."""
  if w >= 1.0:
    return math.inf
  try:
    return a * (2.0 * (1.0 - w)) ** (-1.0 / b)
  except OverflowError:
    return math.inf


def load_runs(dirs: list[str]) -> dict[str, list[dict]]:
  """Runs grouped by name ("<agent>" or "<agent> eps=0" etc.): each {labels, win, seed, dir}."""
  groups: dict[str, list[dict]] = {}
  for d in dirs:
    path = pathlib.Path(d)
    cfg = json.loads((path / "config.json").read_text())
    points = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "win_rate" in r and r.get("win_rate") is not None:
        points.append((r["labels"], r["win_rate"]))
    name = run_name(cfg)
    groups.setdefault(name, []).append(dict(labels=np.asarray([p[0] for p in points]),
                                            win=np.asarray([p[1] for p in points]),
                                            seed=cfg["seed"], dir=str(path)))
  return groups


def run_name(cfg: dict) -> str:
  a = cfg["agent"]
  name = a["kind"]
  sel = a.get("selection")
  if sel and not (a["kind"] == "info_directed" and sel == "info") and not (
      a["kind"] in ("online", "offline", "periodic") and sel == "random"):
    name += f" ({sel})"
  if a["kind"] in ("online", "info_directed") and cfg["policy"]["eps"] == 0:
    name += " eps=0"
  return name


def mean_curve(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """Mean win rate over seeds at the label counts all runs share."""
  common = set(runs[0]["labels"].tolist())
  for r in runs[1:]:
    common &= set(r["labels"].tolist())
  n = np.asarray(sorted(common))
  w = np.mean([[dict(zip(r["labels"].tolist(), r["win"].tolist()))[k] for k in n] for r in runs], 0)
  return n, w


def summarize(groups: dict[str, list[dict]], reference: str = "offline") -> dict:
  """Per group: seeds, final mean win rate, fitted (a, b); and each group's label-efficiency ratio
  versus `reference`: the reference's final label count / labels the group needs (by its fitted
  curve) to reach the reference's final mean win rate."""
  out: dict = {}
  for name, runs in groups.items():
    n, w = mean_curve(runs)
    entry = dict(seeds=[r["seed"] for r in runs], labels=n.tolist(), mean_win=w.tolist(),
                 final_labels=int(n[-1]), final_win=float(w[-1]),
                 final_win_std=float(np.std([r["win"][-1] for r in runs])))
    try:
      entry["a"], entry["b"] = fit_win_curve(np.concatenate([r["labels"] for r in runs]),
                                             np.concatenate([r["win"] for r in runs]))
    except ValueError:
      pass
    out[name] = entry
  ref = out.get(reference)
  if ref is not None:
    for name, e in out.items():
      if name == reference or "a" not in e:
        continue
      need = labels_to_reach(ref["final_win"], e["a"], e["b"])
      e["labels_to_reach_reference"] = need
      e["efficiency_vs_reference"] = ref["final_labels"] / need if need > 0 else math.inf
      # Without extrapolation: the first measured label count where the mean curve reaches it.
      reached = [int(k) for k, v in zip(e["labels"], e["mean_win"]) if v >= ref["final_win"]]
      e["measured_labels_to_reach_reference"] = reached[0] if reached else None
  return out


def plot(groups: dict[str, list[dict]], summary: dict, path: str | pathlib.Path) -> None:
  import matplotlib  # lazy: only plotting needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (name, runs) in enumerate(sorted(groups.items())):
    color = f"C{i}"
    for r in runs:
      keep = r["labels"] > 0
      ax.plot(r["labels"][keep], r["win"][keep], color=color, alpha=0.25, lw=0.8)
    e = summary[name]
    n = np.asarray(e["labels"])
    keep = n > 0
    ax.plot(n[keep], np.asarray(e["mean_win"])[keep], "o", color=color, ms=3)
    label = f"{name} ({len(runs)} seeds)"
    if "a" in e:
      grid = np.geomspace(max(1, n[keep].min()), n.max() * 3, 100)
      ax.plot(grid, win_curve(grid, e["a"], e["b"]), color=color, lw=1.5)
      label += f": a={e['a']:.3g}, b={e['b']:.2f}"
    ax.plot([], [], color=color, label=label)
  ax.axhline(0.5, color="gray", lw=0.5, ls="--")
  ax.set_xscale("log")
  ax.set_xlabel("labels")
  ax.set_ylabel("win rate vs SFT (rater probability)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=130)
  plt.close(fig)


def summary_lines(summary: dict, reference: str = "offline") -> list[str]:
  """One line per agent: seeds, final labels and win rate, the fit, and the efficiency ratio."""
  lines = []
  for name, e in sorted(summary.items()):
    line = f"{name:26s} seeds={len(e['seeds'])} labels={e['final_labels']} " \
           f"win={e['final_win']:.3f}+-{e['final_win_std']:.3f}"
    if "a" in e:
      line += f" a={e['a']:.3g} b={e['b']:.3f}"
    if "efficiency_vs_reference" in e:
      line += f" efficiency vs {reference}={e['efficiency_vs_reference']:.2f}x" \
              f" (measured: reached at {e['measured_labels_to_reach_reference']})"
    lines.append(line)
  return lines
