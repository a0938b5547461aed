"""What a forward costs on this device: seconds for k new tokens over a KV cache of S slots.

Whether a speculative step pays depends on the device as much as on the draft: on a 2-core CPU an
11-token forward costs 1.9x a one-token step, on accelerators about 1x (BENCHMARKS.md, "Forward
cost of k tokens"). `CostModel` holds a small table of measured forward times, (cache length S,
tokens k) -> seconds, and answers for any k up to the largest measured and any S:

- in k, the least time measured at k or more tokens: a k-token block can always run padded to a
  larger measured size, so the cost never falls as k grows (monotone by construction);
- in S, linear between the measured cache lengths (every step attends over all slots) and along
  the same line beyond them, never below a tenth of the nearest measurement.

`cost_model_for` measures it with a few timed forwards (layers plus logits at all k tokens, as a
tree step computes them at every draft node; each (S, k) the minimum of `reps` calls, round-robin)
and caches the table on disk per device kind (for CPUs, the processor model and cores), model
architecture (shapes and dtype; the weights do not change the cost) and MEASURE_VERSION under
$EFFJAX_CACHE/cost_models; a later call measures only what is missing. Delete the file to measure
again. A user may give the table instead, as a JSON file:

  {"entries": [[S, k, seconds], ...]}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

# Two cache lengths give the slope in S; capped at the model's max_position.
CACHE_LENS = (256, 2048)
# Part of every cached table's name: raised when what is timed, or the forward itself, changes
# enough to make older tables wrong (2: logits at every token; the cache's attention layouts).
MEASURE_VERSION = 2


@dataclasses.dataclass(frozen=True)
class CostModel:
  entries: tuple[tuple[int, int, float], ...]  # (cache slots S, tokens k, seconds), sorted
  source: str = ""

  def __post_init__(self):
    entries = tuple(sorted((int(s), int(k), float(t)) for s, k, t in self.entries))
    if not entries:
      raise ValueError("a cost model needs at least one (cache length, tokens, seconds) entry")
    for s, k, t in entries:
      if s < 1 or k < 1 or not t > 0 or t == float("inf"):
        raise ValueError(f"bad cost model entry (S={s}, k={k}, seconds={t}): S and k must be >= 1 "
                         "and seconds a positive finite number")
    if len({(s, k) for s, k, _ in entries}) != len(entries):
      raise ValueError("a cost model has two entries for the same (cache length, tokens)")
    object.__setattr__(self, "entries", entries)

  @property
  def cache_lens(self) -> tuple[int, ...]:
    return tuple(sorted({s for s, _, _ in self.entries}))

  def covers(self, k: int) -> bool:
    """Whether every measured cache length has a measurement at k tokens or more."""
    return all(any(kk >= k for ss, kk, _ in self.entries if ss == s) for s in self.cache_lens)

  def _at(self, s: int, k: int) -> float:
    """The monotone envelope at a measured cache length s."""
    times = [t for ss, kk, t in self.entries if ss == s and kk >= k]
    if not times:
      raise ValueError(f"the cost model has no measurement of {k} or more tokens at cache length "
                       f"{s} (it has {sorted({kk for ss, kk, _ in self.entries if ss == s})})")
    return min(times)

  def seconds(self, k: int, cache_len: int) -> float:
    """Seconds for one forward of k tokens over a cache of cache_len slots."""
    lens = self.cache_lens
    if len(lens) == 1:
      return self._at(lens[0], k)
    # The two measured lengths around cache_len (the nearest two at either end).
    i = min(max(sum(s <= cache_len for s in lens) - 1, 0), len(lens) - 2)
    s0, s1 = lens[i], lens[i + 1]
    t0, t1 = self._at(s0, k), self._at(s1, k)
    t = t0 + (t1 - t0) * (cache_len - s0) / (s1 - s0)
    return max(t, 0.1 * (t0 if cache_len < s0 else t1))

  def relative(self, ks: Iterable[int], cache_len: int) -> tuple[float, ...]:
    """Cost of a k-token forward over a one-token forward, for each k."""
    one = self.seconds(1, cache_len)
    return tuple(self.seconds(k, cache_len) / one for k in ks)

  def merge(self, other: "CostModel") -> "CostModel":
    """Both tables; other's measurement wins where both have one."""
    table = {(s, k): t for s, k, t in self.entries}
    table.update({(s, k): t for s, k, t in other.entries})
    return CostModel(tuple((s, k, t) for (s, k), t in table.items()), other.source or self.source)

  def to_json(self) -> dict:
    return {"entries": [list(e) for e in self.entries], "source": self.source}

  @classmethod
  def load(cls, path: str | os.PathLike) -> "CostModel":
    try:
      data = json.loads(Path(path).read_text())
      entries = data["entries"]
      return cls(tuple(tuple(e) for e in entries), str(data.get("source", path)))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path}: not a cost model ({{\"entries\": [[S, k, seconds], ...]}}): "
                       f"{e}") from None

  def save(self, path: str | os.PathLike) -> None:
    _write_json(Path(path), self.to_json())


def _write_json(path: Path, obj) -> None:
  """Write whole or not at all (a killed write leaves the old file)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.replace(path)


def host_cpu() -> str:
  """This host's processor model and the cores this process may use, e.g. "AMD EPYC 9B14 x2":
  JAX names every CPU device kind "cpu", yet two CPU models differ in cost per forward and in
  its growth with k (BENCHMARKS.md, "Forward cost of k tokens")."""
  from effjax.caches import cpuinfo

  model = cpuinfo("model name").get("model name") or platform.processor() or platform.machine()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{model} x{cores}"


def device_name() -> str:
  """The device kind and count, and for CPU devices the host's processor (host_cpu)."""
  import jax

  d = jax.devices()[0]
  name = f"{d.platform}-{getattr(d, 'device_kind', 'device')}-x{jax.device_count()}"
  return f"{name}-{host_cpu()}" if d.platform == "cpu" else name


def default_path(cfg) -> Path:
  """$EFFJAX_CACHE/cost_models/<device>-<family>-<hash of the architecture>-v<MEASURE_VERSION>.json"""
  from effjax.checkpoints.registry import cache_root

  arch = hashlib.sha1(repr(cfg).encode()).hexdigest()[:12]
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_",
                f"{device_name()}-{cfg.family}-{arch}-v{MEASURE_VERSION}")
  return cache_root() / "cost_models" / f"{name}.json"


def measure(model, points: Sequence[tuple[int, int]], *, reps: int = 5) -> CostModel:
  """Time a forward at each (cache length, tokens) point: the minimum of `reps` calls after a
  warm-up call (which compiles), the points taken round-robin so that load changes hit all."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from effjax.models.cache import KVCache

  graphdef, params = nnx.split(model)

  @jax.jit
  def forward(params, cache, tokens):
    m = nnx.merge(graphdef, params)
    return m(tokens, cache=cache, advance=False).logits

  caches = {s: KVCache.init(model.cfg, 1, s) for s in {s for s, _ in points}}
  calls = [(forward, (params, caches[s], jnp.ones((1, k), jnp.int32))) for s, k in points]
  best = [float("inf")] * len(points)
  for r in range(reps + 1):
    for i, (fn, args) in enumerate(calls):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      if r:  # round 0 compiles and warms up
        best[i] = min(best[i], time.perf_counter() - t)
  return CostModel(tuple((s, k, t) for (s, k), t in zip(points, best)),
                   f"measured on {device_name()} {time.strftime('%Y-%m-%d %H:%M')}")


def step_seconds(engine, strategy, prompt: Sequence[int], steps: int) -> tuple[float, float]:
  """(wall s, CPU s) per model call of `steps` decode-loop steps of `strategy` after an untimed
  prefill of `prompt`: what one step of a method costs, to set against the bare forward of its
  block (benchmarks/forward_cost.py, benchmarks/device_check.py)."""
  import jax

  # As many tokens as the steps can append, within the cache (a step that hits the limit still
  # counts as one call).
  room = engine.cache_len - len(prompt) - strategy.block_size
  state = engine.start([list(prompt)], strategy=strategy,
                       max_new_tokens=min(steps * strategy.max_step_tokens, room))
  calls0 = int(jax.device_get(state.calls))
  t, c = time.perf_counter(), time.process_time()
  state = engine.advance(state, strategy, steps)
  jax.block_until_ready(state.length)
  wall, cpu = time.perf_counter() - t, time.process_time() - c
  n = max(int(jax.device_get(state.calls)) - calls0, 1)
  return wall / n, cpu / n


def cost_model_for(model, ks: Iterable[int], *, path: str | os.PathLike | None = None,
                   reps: int = 5, log: Callable[[str], None] | None = None) -> CostModel:
  """The cost model for `model` on this device covering forwards of up to max(ks) tokens.

  path: a user's table (used as given; it must cover max(ks)). Otherwise the table cached for this
  device kind and architecture, measuring (and caching) the (S, k) points it lacks first.
  """
  ks = sorted(set(ks) | {1})
  if path is not None:
    given = CostModel.load(path)
    if not given.covers(ks[-1]):
      raise ValueError(f"{path}: the cost model has no measurement of {ks[-1]} or more tokens at "
                       f"every cache length; add one")
    return given
  cfg = model.cfg
  store = default_path(cfg)
  lens = sorted({min(s, cfg.max_position) for s in CACHE_LENS})
  have = None
  if store.is_file():
    try:
      have = CostModel.load(store)
    except ValueError:
      have = None  # unreadable (e.g. a killed write elsewhere): measured anew below
  known = set() if have is None else {(s, k) for s, k, _ in have.entries}
  missing = [(s, k) for s in lens for k in ks if (s, k) not in known]
  if not missing:
    return have
  if log:
    log(f"measuring forward costs on {device_name()} ({len(missing)} shapes, once per device and "
        f"model; cached in {store})")
  new = measure(model, missing, reps=reps)
  merged = new if have is None else have.merge(new)
  merged.save(store)
  return merged


def load_times_path(cfg) -> Path:
  """Next to the model's cost table: {program name: seconds its last restore took}."""
  path = default_path(cfg)
  return path.with_name(f"{path.stem}-loads.json")


def _load_times(path: Path) -> dict:
  """The table at `path`; empty where it is missing or unreadable."""
  try:
    table = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  return table if isinstance(table, dict) else {}


def remembered_load(cfg, program: str) -> float | None:
  """The seconds the last restore of `program` (e.g. `Auto.program_name`) from effjax's program
  store took for this model on this device (remember_load); None if never recorded."""
  seconds = _load_times(load_times_path(cfg)).get(program)
  return float(seconds) if isinstance(seconds, (int, float)) and seconds >= 0 else None


def remember_load(cfg, program: str, seconds: float) -> None:
  path = load_times_path(cfg)
  table = _load_times(path)
  table[program] = round(float(seconds), 3)
  _write_json(path, table)
