"""Decoding methods by name: plain decoding, prompt lookup, lookahead, ESP (static and dynamic
trees), Token Recycling, the suffix drafter, the hybrid tree, and `auto` (cost-aware budgets:
effjax.decoding.budget).

Methods with a block-complexity budget (BC: tokens processed per forward) take one of the presets
10 / 30 / 60 (ESP.md), named like 'esp-bc30'; the hybrid also takes 80, the forward size of Token
Recycling's reference tree (80 drafts and the root), to be compared with it at equal cost. ESP has
two trees (ESP.md): 'esp-bcN' is the static top-1 tree (BC10 [4], BC30 [14], BC60 [15, 4]);
'esp-dyn-bcN' the dynamic tree of the paper's Alg. 1 with the same masks and budget. The paper's
result tables report the dynamic tree, and its ablation finds the best static tree within 0.01 tau
of it. `auto` picks its budget every step from the device's cost model. Strategy modules are
imported when a method is asked for, so a method whose module is missing fails by name without
breaking the others.
"""

from __future__ import annotations

import dataclasses

from effjax.decoding.engine import AutoRegressive, Strategy
from effjax.decoding.sampling import GREEDY, Sampler

METHODS: tuple[str, ...] = ("ar", "pld", "lookahead", "esp", "esp-dyn", "tr", "suffix", "hybrid",
                           "auto")
BC_METHODS = frozenset({"lookahead", "esp", "esp-dyn", "tr", "hybrid"})
BC_REQUIRED = frozenset({"esp", "esp-dyn", "hybrid"})  # the others have a reference setting
BC_PRESETS: tuple[int, ...] = (10, 30, 60)
EXTRA_BUDGETS: dict[str, tuple[int, ...]] = {"hybrid": (80,)}


def budgets(method: str) -> tuple[int, ...]:
  """The BC budgets `method` takes (none for a method without one)."""
  return BC_PRESETS + EXTRA_BUDGETS.get(method, ()) if method in BC_METHODS else ()


ALL_BUDGETS: tuple[int, ...] = tuple(sorted({bc for m in BC_METHODS for bc in budgets(m)}))


def label(method: str, bc: int | None = None) -> str:
  """The name a run of `method` is reported under, e.g. 'esp-bc30'."""
  return f"{method}-bc{bc}" if method in BC_METHODS and bc is not None else method


def parse_label(text: str) -> tuple[str, int | None]:
  """'esp-dyn-bc30' -> ('esp-dyn', 30); 'pld' -> ('pld', None). The inverse of `label`."""
  method, sep, bc = text.partition("-bc")
  if method not in METHODS or (sep and not bc.isdigit()):
    raise ValueError(f"unknown decoding method {text!r}; choose from {', '.join(METHODS)}, "
                     f"optionally with a budget: esp-bc30, esp-dyn-bc60")
  return method, int(bc) if sep else None


def all_labels() -> list[str]:
  """Every method name make_strategy builds, each budgeted method at each preset."""
  out = []
  for m in METHODS:
    if m not in BC_REQUIRED:
      out.append(m)
    out += [label(m, bc) for bc in budgets(m)]
  return out


def make_strategy(method: str, bc: int | None = None, sampler: Sampler = GREEDY) -> Strategy:
  """A new strategy object for `method` (at budget `bc` where the method has one).

  Without a BC, lookahead uses Spec-Bench's own setting (N=5, W=7, G=7) and Token Recycling the
  authors' 80-node tree. Each call returns a new object: the engine compiles once per strategy
  object, so keep and reuse it.
  """
  if method not in METHODS:
    raise ValueError(f"unknown decoding method {method!r}; choose from {', '.join(METHODS)}")
  if bc is not None and method not in BC_METHODS:
    raise ValueError(f"{method} has no BC budget; name it without one")
  if bc is not None and bc not in budgets(method):
    choices = ", ".join(map(str, budgets(method)))
    raise ValueError(f"{method}'s BC must be one of {choices}, got {bc}")
  if method in BC_REQUIRED and bc is None:
    raise ValueError(f"{method} needs a BC budget ({', '.join(map(str, budgets(method)))})")
  if method == "ar":
    return AutoRegressive(sampler)
  if method == "auto":
    from effjax.decoding.budget import Auto

    return Auto(sampler=sampler)
  if method == "lookahead":
    from effjax.decoding.lookahead import SPEC_BENCH, Lookahead

    if bc is None:
      n, w, g = SPEC_BENCH
      return Lookahead(level=n, window=w, guess=g, sampler=sampler)
    return Lookahead.preset(bc, sampler=sampler)
  if method == "pld":
    from effjax.decoding.pld import PromptLookup

    return PromptLookup(sampler=sampler)
  if method in ("esp", "esp-dyn"):
    from effjax.decoding.esp import ESP

    return ESP.preset(bc, dynamic=method == "esp-dyn", sampler=sampler)
  if method == "tr":
    from effjax.decoding.recycling import TokenRecycling

    return TokenRecycling(budget=bc, sampler=sampler)
  if method == "suffix":
    from effjax.decoding.suffix import SuffixDecoding

    return SuffixDecoding(sampler=sampler)
  from effjax.decoding.hybrid import Hybrid

  return Hybrid.preset(bc, sampler=sampler)


def prepare(strategy: Strategy, model, *, cost_model: str | None = None, log=None) -> Strategy:
  """The strategy ready for `model` on this device: `auto` gets its cost model (the user's JSON
  file `cost_model`, else the one cached for this device and model, measured on first use) and,
  where one was remembered (`remember_load`), the time its program took to restore as its
  `load_seconds`."""
  from effjax.decoding.budget import Auto

  if not isinstance(strategy, Auto) or strategy.cost_model is not None:
    return strategy
  from effjax.decoding.cost_model import cost_model_for, remembered_load

  strategy = strategy.with_cost_model(cost_model_for(model, strategy.blocks, path=cost_model,
                                                     log=log))
  seconds = remembered_load(model.cfg, strategy.program_name)
  return strategy if seconds is None else dataclasses.replace(strategy, load_seconds=seconds)


def remember_load(strategy: Strategy, model, result) -> None:
  """After `Engine.stream`: remember how long auto's program took to restore at the hand-over,
  for `prepare` to use as its load_seconds next time (a compile, which happens once, is not)."""
  from effjax.decoding.budget import Auto
  from effjax.decoding.cost_model import remember_load as remember

  load = result.hand_over_load
  if isinstance(strategy, Auto) and load is not None and load[1] == "disk":
    remember(model.cfg, strategy.program_name, load[0])
