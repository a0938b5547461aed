"""Compile a recipe's programs for a TPU slice (or the local CPU mesh) and account for them.

For a TPU slice the devices are libtpu's compile-only topology (jax.experimental.topologies), so a
CPU host compiles exactly what the slice would run, multi-host slices included; this is what
maxtext's train_compile.py does. Per program and per device the report gives the bytes of its
inputs by kind (parameters, optimizer state, KV cache, gradients, other inputs), the long-lived
state it does not take but that stays in HBM meanwhile ("held"), XLA's temporaries and
non-aliased outputs, their sum (the peak) against the chip's HBM, and XLA's FLOPs and bytes
accessed. A recipe step's time at the chip's published peak is, per phase, the larger of
FLOPs / peak compute and bytes / HBM bandwidth (a roofline: no overlap losses, no collectives),
with the least bytes a run moves (its inputs read once, its outputs written once) and, as an upper
estimate, with XLA's bytes accessed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import jax

from effjax.plan.chips import Chip, Slice, parse_slice
from effjax.plan.flops import product_flops
from effjax.plan.programs import (GRADIENTS, INPUTS, KV_CACHE, OPTIMIZER, PARAMS, Plan, Program,
                                  build_plans)
from effjax.plan.recipes import Recipe

MARGIN_GOAL = 0.10  # fit with at least 10% of HBM free
KINDS = (PARAMS, OPTIMIZER, KV_CACHE, GRADIENTS, INPUTS)


class PlanError(ValueError):
  """The recipe does not fit, or cannot be compiled for the slice."""


@contextlib.contextmanager
def _captured_stderr():
  """File-descriptor-level capture of stderr (libtpu logs its start-up to fd 2). Yields a function
  that returns what was written."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as f:
    os.dup2(f.fileno(), 2)
    try:
      yield lambda: (f.seek(0), f.read().decode(errors="replace"))[1]
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def _no_local_tpu() -> bool:
  try:
    from jax._src import hardware_utils
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0
  except Exception:  # a jax without this helper: assume a host without TPU chips
    return True


def tpu_devices(sl: Slice) -> list:
  """The compile-only devices of a TPU topology (libtpu, no TPU needed)."""
  from jax.experimental import topologies

  if _no_local_tpu():
    # libtpu takes a lock file for the chips it would drive; compile-only use drives none, and
    # other processes on this host may hold the lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  with _captured_stderr() as logged:
    try:
      return list(topologies.get_topology_desc(sl.topology_name, "tpu").devices)
    except RuntimeError as e:
      if "not installed" in str(e):
        raise PlanError("libtpu is not installed: planning for a TPU slice needs it "
                        "(pip install 'effjax[tpu]'); --topology cpu plans on this host") from None
      raise PlanError(f"libtpu could not describe {sl.topology_name}: {e}\n{logged()}") from None


@dataclasses.dataclass
class Target:
  slice: Slice
  chip: Chip
  devices: list
  platform: str  # "tpu" or "cpu"

  @property
  def num_chips(self) -> int:
    return len(self.devices)

  @property
  def num_processes(self) -> int:
    return len({d.process_index for d in self.devices})

  @property
  def hbm(self) -> float:
    """Memory of one device (a CPU mesh's devices share the host's RAM)."""
    return self.chip.hbm_bytes / (self.num_chips if self.platform == "cpu" else 1)

  def describe(self) -> str:
    if self.platform == "cpu":
      return f"CPU mesh of {self.num_chips} device(s) on this host"
    s = self.slice
    return (f"{s.accelerator_type} ({s.topology_name}: {self.num_chips} chips, "
            f"{self.num_processes} processes)")


def target_for(text: str) -> Target:
  sl = parse_slice(text)
  if sl.chip.name == "cpu":
    devices = jax.devices("cpu")
    return Target(dataclasses.replace(sl, chips=len(devices)), sl.chip, devices, "cpu")
  return Target(sl, sl.chip, tpu_devices(sl), "tpu")


def leaf_bytes(x, sharding) -> int:
  """Bytes of one device's shard of abstract array `x`."""
  shape = tuple(x.shape)
  if sharding is not None and hasattr(sharding, "shard_shape"):
    shape = sharding.shard_shape(shape)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return math.prod(shape) * 8  # threefry: two uint32
  return math.prod(shape) * x.dtype.itemsize


def tree_bytes(tree) -> int:
  return sum(leaf_bytes(x, getattr(x, "sharding", None)) for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Compiled:
  program: Program
  seconds: float
  inputs: dict[str, int]  # kind -> bytes per device
  held: int  # resident state not among the inputs
  temp: int
  output: int  # outputs not aliased to inputs
  code: int
  flops: float
  bytes_accessed: float
  arguments: int = 0  # XLA's own count of the input bytes (tiles padded)
  kv_inside: int = 0  # KV cache built inside the program (part of temp)
  product_flops: float = 0.0  # per device, its matrix products' own count (flops.py)
  in_shardings: list = dataclasses.field(default_factory=list)  # per input leaf, as compiled
  cached: bool = False  # figures from the plan cache (compiled by an earlier run)
  extrapolated_from: tuple[int, ...] = ()  # layer counts compiled, when extrapolated

  @property
  def peak(self) -> int:
    return sum(self.inputs.values()) + self.held + self.temp + self.output + self.code

  @property
  def counted_flops(self) -> float:
    """FLOPs per device: XLA's count, or its products' count where XLA's is lower."""
    return max(self.flops, self.product_flops)

  @property
  def min_bytes(self) -> int:
    """HBM traffic of one run at the least: every input (and a KV cache built inside) read once,
    every output that is not an input's buffer written once."""
    return sum(self.inputs.values()) + self.kv_inside + self.output


FIGURES = ("seconds", "inputs", "temp", "output", "code", "arguments", "flops", "bytes_accessed")


def compile_program(program: Program, target: Target, resident: dict, inner_kv=None,
                    cache_dir: pathlib.Path | None = None) -> Compiled:
  """Compile one program and read its figures. With `cache_dir`, figures are kept per lowered
  program (a hash of its StableHLO and the target): an unchanged program is not compiled again."""
  args = tuple(a.value for a in program.args)
  t0 = time.perf_counter()
  traced = program.fn.trace(*args)
  lowered = (traced.lower(lowering_platforms=("tpu",)) if target.platform == "tpu"
             else traced.lower())
  products = product_flops(traced.jaxpr, target.platform) / target.num_chips
  held = sum(tree_bytes(resident[n]) for n in set(resident) - {a.resident for a in program.args})
  kv_inside = tree_bytes(inner_kv) if inner_kv is not None else 0
  path = None
  if cache_dir is not None:
    key = hashlib.sha256("\n".join([
        lowered.as_text(), target.platform, target.slice.topology_name, str(target.num_chips),
        jax.__version__, _libtpu_version()]).encode()).hexdigest()[:32]
    path = cache_dir / f"{key}.json"
    if path.exists():
      figures = json.loads(path.read_text())
      return Compiled(program=program, held=held, kv_inside=kv_inside, cached=True,
                      product_flops=products, **figures)
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA reports a program over HBM as RESOURCE_EXHAUSTED
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise PlanError(f"{program.name} does not compile for {target.describe()}: {first}") from None
  seconds = time.perf_counter() - t0
  in_shardings = jax.tree.leaves(compiled.input_shardings[0])
  leaves = []
  for a in program.args:
    flat, _ = jax.tree_util.tree_flatten_with_path(a.value)
    leaves += [(a, jax.tree_util.keystr(p), x) for p, x in flat]
  if len(leaves) != len(in_shardings):
    # jit dropped unused inputs: count each by the sharding it was given (whole when unspecified)
    in_shardings = [getattr(x, "sharding", None) for _, _, x in leaves]
  inputs = dict.fromkeys(KINDS, 0)
  for (a, p, x), sh in zip(leaves, in_shardings):
    inputs[a.kind(p) if callable(a.kind) else a.kind] += leaf_bytes(x, sh)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  figures = dict(
      seconds=seconds, inputs=inputs, temp=int(mem.temp_size_in_bytes),
      output=int(mem.output_size_in_bytes - mem.alias_size_in_bytes),
      code=int(mem.generated_code_size_in_bytes), arguments=int(mem.argument_size_in_bytes),
      flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)))
  if path is not None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures))
  return Compiled(program=program, held=held, kv_inside=kv_inside, product_flops=products,
                  in_shardings=list(in_shardings), **figures)


def _libtpu_version() -> str:
  from importlib.metadata import PackageNotFoundError, version
  try:
    return version("libtpu")
  except PackageNotFoundError:
    return os.environ.get("TPU_LIBRARY_PATH", "")


@dataclasses.dataclass
class PhaseCost:
  """Per run and per device: FLOPs (`Compiled.counted_flops`); `hbm`, the least HBM traffic
  (programs' inputs read once, outputs written once: the roofline's bytes); `xla_bytes`, XLA's
  bytes accessed, which counts every operand of every op, on-chip staging copies included (an
  upper estimate)."""

  name: str
  count: float
  flops: float
  hbm: float
  xla_bytes: float

  def seconds(self, chip: Chip) -> tuple[float, float]:
    """(compute-bound, memory-bound) seconds of one run at the chip's peak (the roofline)."""
    return self.flops / chip.peak_flops, self.hbm / chip.hbm_bandwidth

  def xla_seconds(self, chip: Chip) -> float:
    return max(self.flops / chip.peak_flops, self.xla_bytes / chip.hbm_bandwidth)


@dataclasses.dataclass
class PlanResult:
  plan: Plan
  compiled: list[Compiled]
  phases: list[PhaseCost]
  target: Target

  @property
  def peak(self) -> Compiled:
    """The program that needs the most memory of those the recipe runs."""
    runs = [c for c in self.compiled if not c.program.costs_only] or self.compiled
    return max(runs, key=lambda c: c.peak)

  @property
  def margin(self) -> float:
    return 1.0 - self.peak.peak / self.target.hbm

  def step_seconds(self, xla_bytes: bool = False) -> float:
    chip = self.target.chip
    return sum(p.count * (p.xla_seconds(chip) if xla_bytes else max(p.seconds(chip)))
               for p in self.phases)

  def phase(self, name: str) -> PhaseCost:
    return next(p for p in self.phases if p.name == name)

  def has_phase(self, name: str) -> bool:
    """Whether phase `name` was costed (its programs compiled: --program may leave some out)."""
    return any(p.name == name for p in self.phases)


def run_plan(plan: Plan, target: Target, log=None, only: set[str] | None = None,
             cache_dir: pathlib.Path | None = None) -> PlanResult:
  """Compile the programs of `plan` (those in `only`, if given; the phases costed from the others
  are left out)."""
  log = log or (lambda msg: print(msg, file=sys.stderr))
  out: list[Compiled] = []
  by_name: dict[str, Compiled] = {}
  for program in plan.programs:
    if only is not None and program.name not in only:
      continue
    log(f"  {program.name}: lowering and compiling for {target.describe()} ...")
    c = compile_program(program, target, plan.resident, plan.inner_cache.get(program.name),
                        cache_dir)
    log(f"    {'from the plan cache' if c.cached else f'{c.seconds:.0f} s'}; "
        f"peak {gb(c.peak)} GB per device")
    out.append(c)
  return PlanResult(plan, out, phase_costs(plan, out), target)


def phase_costs(plan: Plan, compiled: list[Compiled]) -> list[PhaseCost]:
  """The plan's phases from its compiled programs' costs (phases of missing programs left out)."""
  by_name = {c.program.name: c for c in compiled}
  phases = []
  for ph in plan.phases:
    if not set(ph.cost) <= set(by_name):
      continue
    flops = sum(k * by_name[n].counted_flops for n, k in ph.cost.items())
    nbytes = sum(k * by_name[n].bytes_accessed for n, k in ph.cost.items())
    # A cost made as a difference (a loop body = program - its prefill) reads what the first
    # program reads: the positive terms.
    hbm = sum(k * by_name[n].min_bytes for n, k in ph.cost.items() if k > 0)
    phases.append(PhaseCost(ph.name, ph.count, max(flops, 0.0), hbm, max(nbytes, 0.0)))
  return phases


def _explicit_bytes(program: Program) -> dict[str, int]:
  """Per kind, the bytes of the inputs whose sharding the plan fixes (exact without compiling)."""
  out = dict.fromkeys(KINDS, 0)
  for a in program.args:
    for p, x in jax.tree_util.tree_flatten_with_path(a.value)[0]:
      if getattr(x, "sharding", None) is not None:
        out[a.kind(jax.tree_util.keystr(p)) if callable(a.kind) else a.kind] += leaf_bytes(
            x, x.sharding)
  return out


def extrapolate(plan: Plan, small: tuple[PlanResult, PlanResult], layers: tuple[int, int],
                num_layers: int) -> PlanResult:
  """`plan` (the full model, not compiled) with figures from compiles of the same programs with
  fewer decoder layers, taken linearly to the model's `num_layers`: XLA's temporaries, outputs,
  code, FLOPs and bytes, and inputs whose sharding jit chose. What the plan fixes is exact: the
  parameters, optimizer state and KV cache it shards, the state held meanwhile, a KV cache built
  inside a program, the FLOPs of its products (traced in full: tracing is cheap)."""
  (l1, l2), (r1, r2) = layers, small
  t = (num_layers - l1) / (l2 - l1)
  lin = lambda a, b: max(a + (b - a) * t, 0.0)
  by1 = {c.program.name: c for c in r1.compiled}
  by2 = {c.program.name: c for c in r2.compiled}
  out = []
  for program in plan.programs:
    if program.name not in by1 or program.name not in by2:
      continue
    c1, c2 = by1[program.name], by2[program.name]
    exact = _explicit_bytes(program)
    e1, e2 = _explicit_bytes(c1.program), _explicit_bytes(c2.program)
    inputs = {k: exact[k] + int(lin(c1.inputs[k] - e1[k], c2.inputs[k] - e2[k])) for k in KINDS}
    held = set(plan.resident) - {a.resident for a in program.args}
    inner = plan.inner_cache.get(program.name)
    traced = program.fn.trace(*(a.value for a in program.args))
    out.append(Compiled(
        program=program, seconds=c1.seconds + c2.seconds, inputs=inputs,
        held=sum(tree_bytes(plan.resident[n]) for n in held),
        temp=int(lin(c1.temp - c1.kv_inside, c2.temp - c2.kv_inside)) + (
            tree_bytes(inner) if inner is not None else 0),
        output=int(lin(c1.output, c2.output)), code=int(lin(c1.code, c2.code)),
        arguments=int(lin(c1.arguments, c2.arguments)), flops=lin(c1.flops, c2.flops),
        bytes_accessed=lin(c1.bytes_accessed, c2.bytes_accessed),
        product_flops=product_flops(traced.jaxpr, r1.target.platform) / r1.target.num_chips,
        kv_inside=tree_bytes(inner) if inner is not None else 0, cached=c1.cached and c2.cached,
        extrapolated_from=layers))
  return PlanResult(plan, out, phase_costs(plan, out), r1.target)


def gb(x: float) -> str:
  return f"{x / 1e9:.2f}"


def advice(recipe: Recipe, c: Compiled) -> str:
  """What to change, by what dominates the program's peak."""
  state = c.inputs[PARAMS] + c.inputs[OPTIMIZER] + c.held
  kv = c.inputs[KV_CACHE] + c.kv_inside
  work = c.temp - c.kv_inside + c.output + c.inputs[INPUTS] + c.inputs[GRADIENTS]
  parts = {"model state (parameters, optimizer state, held copies)": state, "the KV cache": kv,
           "activations and temporaries": work}
  worst = max(parts, key=parts.get)
  if worst.startswith("model state"):
    fix = "more chips (a larger slice) or more FSDP sharding (mesh fsdp=-1 over all chips)"
  elif worst == "the KV cache":
    fix = ("a smaller batch or a shorter cache (" + ("rlhf.response_len, rlhf.prompt_len"
           if recipe.kind == "rlhf" else "decode.batches, decode.max_new_tokens") +
           "), or more chips to spread the batch over (a larger slice)")
  else:
    fix = f"{c.program.shrink or 'smaller batches'}, or more chips (a larger slice)"
  shares = ", ".join(f"{k} {gb(v)} GB" for k, v in parts.items())
  return f"largest in {c.program.name}: {worst} ({shares}); change: {fix}"


def check_fit(recipe: Recipe, result: PlanResult) -> str | None:
  """None when the plan fits with the margin goal; a warning when it fits with less; raises
  PlanError when it does not fit."""
  c = result.peak
  hbm = result.target.hbm
  if c.peak > hbm:
    raise PlanError(f"{result.plan.title} does not fit {result.target.describe()}: "
                    f"{c.program.name} needs {gb(c.peak)} GB per device, the chip has {gb(hbm)} GB. "
                    + advice(recipe, c))
  if result.margin < MARGIN_GOAL:
    return (f"fits, but with {result.margin:.1%} of HBM free, under the {MARGIN_GOAL:.0%} goal: "
            + advice(recipe, c))
  return None


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("EFFJAX_CACHE", pathlib.Path.home() / ".cache" / "effjax")) / "plan"


def plan_recipe(recipe: Recipe, target: Target, mesh_spec: str | None = None, log=None,
                only: set[str] | None = None, cache_dir: pathlib.Path | None = None,
                layers: tuple[int, int] | None = None) -> list[PlanResult]:
  """Compile the recipe's programs for `target`; with `layers` (l1 < l2), compile them with l1 and
  l2 decoder layers and extrapolate to the model's (see `extrapolate`): a full compile of a 9B-32B
  program can take an hour of a shared CPU, one of a few layers minutes."""
  from effjax.models.sharding import parse_mesh
  from effjax.plan.programs import model_config

  # Programs compiled for a topology without its devices cannot be reloaded from the persistent
  # compilation cache: keep them out of it.
  jax.config.update("jax_enable_compilation_cache", False)
  mesh = parse_mesh(mesh_spec or recipe.mesh, devices=target.devices)
  full = build_plans(recipe, mesh)
  if layers is None:
    return [run_plan(plan, target, log, only, cache_dir) for plan in full]
  l1, l2 = layers
  num_layers = model_config(recipe).num_layers
  if not 0 < l1 < l2 < num_layers:
    raise ValueError(f"layers {l1},{l2}: need 0 < l1 < l2 < the model's {num_layers} layers")
  small = [build_plans(recipe, mesh, n) for n in layers]
  return [extrapolate(plan, (run_plan(a, target, log, only, cache_dir),
                             run_plan(b, target, log, only, cache_dir)), layers, num_layers)
          for plan, a, b in zip(full, *small)]
