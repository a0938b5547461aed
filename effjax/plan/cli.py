"""`effjax plan RECIPE --topology v5e:8x8`: compile a recipe's programs for a TPU slice and report
per-device memory against HBM, FLOPs and bytes per step and the step time at the chip's peak.

Registration imports nothing heavy; jax and the planner load when the command runs.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "plan", help="compile a recipe for a TPU slice (no TPU needed) and report memory and time",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("recipe", help="recipe file (TOML/JSON/YAML) or a name in configs/recipes/")
  p.add_argument("--topology", default=None,
                 help="TPU slice to plan for: v5e:8x8, v5p:2x2x4, v5litepod-64, v5p-32, ... or "
                      "'cpu' (this host's CPU devices); default: the recipe's slice")
  p.add_argument("--mesh", default=None,
                 help="override the recipe's mesh, e.g. 'data=1,fsdp=-1,tensor=1'")
  p.add_argument("--batch", type=int, action="append", default=None,
                 help="decode recipes: plan this batch size instead of the recipe's (repeatable)")
  p.add_argument("--quant", choices=("int8",), default=None,
                 help="plan the model with weight-only int8 weights instead of the recipe's")
  p.add_argument("--program", action="append", default=None, metavar="NAME",
                 help="compile only this program (repeatable; e.g. 'rollout'): a partial plan")
  p.add_argument("--layers", default=None, metavar="L1,L2",
                 help="compile with L1 and L2 decoder layers and extrapolate linearly to the "
                      "model's (minutes instead of an hour per 9B-32B program; parameters, "
                      "optimizer state and KV cache stay exact)")
  p.add_argument("--json", default=None, help="also write the figures to this JSON file")
  p.add_argument("--no-cache", action="store_true",
                 help="compile every program again (by default a program's figures are kept in "
                      "$EFFJAX_CACHE/plan, keyed by its StableHLO, and reused while it is unchanged)")
  p.set_defaults(func=run)


def run(args) -> int:
  import dataclasses
  import json
  import sys

  from effjax.plan import planner, report
  from effjax.plan.recipes import load_recipe

  name, recipe = load_recipe(args.recipe)
  if args.batch:
    recipe = recipe.replace(decode=dataclasses.replace(recipe.decode, batches=tuple(args.batch)))
  if args.quant:
    recipe = recipe.replace(quant=args.quant)
  target = planner.target_for(args.topology or recipe.slice)
  print(f"recipe {name}: {recipe.description}" if recipe.description else f"recipe {name}")
  results = planner.plan_recipe(recipe, target, args.mesh,
                                only=set(args.program) if args.program else None,
                                cache_dir=None if args.no_cache else planner.default_cache_dir(),
                                layers=parse_layers(args.layers))
  failures, warnings = [], []
  for r in results:
    print(report.format_result(recipe, r))
    try:
      w = planner.check_fit(recipe, r)
    except planner.PlanError as e:
      failures.append(str(e))
    else:
      if w:
        warnings.append(f"{r.plan.title}: {w}")
  if recipe.launch and target.platform == "tpu":
    print("launch on a Cloud TPU VM:")
    print("\n".join(f"  {line}" for line in recipe.launch))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(recipe=name, results=[report.to_dict(recipe, r) for r in results]), f,
                indent=1)
  for w in warnings:
    print(f"warning: {w}", file=sys.stderr)
  if failures:
    raise planner.PlanError("; ".join(failures))
  return 0


def parse_layers(text: str | None) -> tuple[int, int] | None:
  if not text:
    return None
  parts = text.split(",")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise ValueError(f"--layers takes two layer counts, e.g. 2,4; got {text!r}")
  return int(parts[0]), int(parts[1])
