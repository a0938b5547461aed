"""Compiled programs kept across processes, so a new process skips tracing and lowering too.

JAX's persistent compilation cache stores executables, but finds them by hashing the lowered
program: every process still traces and lowers the whole model first (seconds on CPU for a decode
loop). `CachedJit` is `jax.jit` for functions whose every input is an argument: it compiles once per
argument signature (shapes, dtypes, shardings, tree structure) ahead of time, and, when a directory
is set ($EFFJAX_PROGRAMS, which every `effjax` command sets: effjax/caches.py), stores the
executable there under a key of everything that decides the program (the signature, the caller's
description of what the function closes over, effjax's source code, the jax/jaxlib/flax versions,
the devices and the CPU, XLA_FLAGS and the jax config), so the next process deserializes it
instead.

Executables are pickles and may run code when loaded: only load files this user's effjax wrote (the
cache lives under $EFFJAX_CACHE). An unreadable or mismatching file is deleted and recompiled.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax

from effjax.caches import cpuinfo, programs_dir

FORMAT = 1
_MAX_FILES = 256  # least recently used programs beyond this are deleted


@dataclasses.dataclass
class Event:
  """How a program was obtained: restored from disk or compiled."""
  name: str
  source: str  # "disk" | "compiled"
  seconds: float  # wall
  cpu_seconds: float


events: list[Event] = []  # every program this process restored or compiled, in order


@functools.cache
def _code_fingerprint() -> str:
  """sha256 of effjax's own Python sources: any code change gives new programs."""
  root = Path(__file__).resolve().parent
  h = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
  return h.hexdigest()


@functools.cache
def _cpu() -> str:
  """The host CPU's model and instruction-set flags: an executable may use any of them."""
  info = cpuinfo("model name", "flags")
  return "|".join(info.values()) or platform.processor() or platform.machine()


def _environment() -> str:
  """What besides the program text decides the executable: versions, devices, flags, config."""
  import flax
  import jaxlib

  backend = jax.devices()[0].client
  devices = [(d.id, d.device_kind, d.process_index) for d in jax.devices()]
  config = sorted((k, repr(v)) for k, v in jax.config.values.items())
  return json.dumps(dict(format=FORMAT, python=sys.version, jax=jax.__version__,
                         jaxlib=jaxlib.__version__, flax=flax.__version__,
                         platform=backend.platform, platform_version=backend.platform_version,
                         devices=devices, cpu=_cpu(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                         config=config, code=_code_fingerprint()))


def _sharding_desc(s) -> str:
  """A sharding with the order of its devices (which decides the program's device assignment)."""
  mesh = getattr(s, "mesh", None)
  ids = list(mesh.device_ids.flat) if mesh is not None else sorted(d.id for d in s.device_set)
  return f"{s!r}@{ids}"


def _arg_signature(arg) -> tuple:
  """Hashable description of one argument as a compiled program sees it (tree, shapes, dtypes,
  weak types, shardings)."""
  leaves, tree = jax.tree.flatten(arg)
  return tree, tuple((x.shape, x.dtype, getattr(x, "weak_type", False), getattr(x, "sharding", None))
                     for x in leaves)


def _abstract(x):
  """Arrays as ShapeDtypeStructs (keeping their sharding) for lowering without data."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,
                                weak_type=getattr(x, "weak_type", False))
  return x


HOST_ONLY = "effjax_host_only"


def host_field(default):
  """A dataclass field that only host code reads (e.g. when to load a program), never a compiled
  program: `describe` leaves it out, so changing it keeps the stored programs."""
  return dataclasses.field(default=default, metadata={HOST_ONLY: True})


def describe(obj) -> str | None:
  """repr(obj) when it is fully described by value (plain numbers, strings, tuples, frozen
  dataclasses of those), else None: an object holding arrays or other state cannot name a stored
  program, because its repr may not show everything the program depends on."""
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return repr(obj)
  if isinstance(obj, tuple):
    parts = [describe(x) for x in obj]
    return None if None in parts else f"({', '.join(parts)},)"
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    if not obj.__dataclass_params__.frozen:
      return None
    compiled = [f for f in dataclasses.fields(obj) if not f.metadata.get(HOST_ONLY)]
    parts = [describe(getattr(obj, f.name)) for f in compiled]
    if None in parts:
      return None
    fields = ", ".join(f"{f.name}={p}" for f, p in zip(compiled, parts))
    return f"{type(obj).__module__}.{type(obj).__qualname__}({fields})"
  return None


class CachedJit:
  """`jax.jit(fn, donate_argnums=..., static_argnums=...)`, compiled ahead of time per argument
  signature; the compiled program is called directly (no tracing on later calls).

  `program_key` describes everything `fn` depends on beyond its arguments (e.g. a model config and a
  decoding strategy, by value); None keeps its programs in this process only. Non-static arguments
  must be arrays or pytrees of arrays; static ones hashable values fully described by repr.
  """

  def __init__(self, fn: Callable, *, name: str, program_key: str | None,
               donate_argnums: tuple[int, ...] = (), static_argnums: tuple[int, ...] = ()):
    self._jit = jax.jit(fn, donate_argnums=donate_argnums, static_argnums=static_argnums)
    self._name = name
    self._static = frozenset(static_argnums)
    self._key = None if program_key is None else f"{name}|{donate_argnums}|{program_key}"
    self._compiled: dict[tuple, Any] = {}
    self._last: dict[int, tuple[Any, tuple]] = {}  # argument position -> (object, signature)

  def __call__(self, *args):
    static = tuple(a for i, a in enumerate(args) if i in self._static)
    dynamic = tuple(a for i, a in enumerate(args) if i not in self._static)
    sig = (static, tuple(self._signature(i, a) for i, a in enumerate(dynamic)))
    compiled = self._compiled.get(sig)
    if compiled is None:
      compiled = self._compiled[sig] = self._obtain(args, dynamic, sig)
    return compiled(*dynamic)

  def _signature(self, position: int, arg) -> tuple:
    # The same object as in the last call (an engine's parameters): its signature is known.
    # Flattening a model's parameter tree costs milliseconds; a decode loop calls often.
    last = self._last.get(position)
    if last is not None and last[0] is arg:
      return last[1]
    sig = _arg_signature(arg)
    self._last[position] = (arg, sig)
    return sig

  def cache_size(self) -> int:
    """Programs compiled or restored so far (one per argument signature)."""
    return len(self._compiled)

  def _obtain(self, args, dynamic, sig):
    t, c = time.perf_counter(), time.process_time()
    path, directory = None, programs_dir()
    if directory is not None and self._key is not None and jax.process_count() == 1:
      static, arg_sigs = sig
      text = "|".join([self._key, repr(static), _environment(), *(
          f"{tree}:" + ";".join(f"{s}{d}{w}{_sharding_desc(sh) if sh else '-'}"
                               for s, d, w, sh in leaves) for tree, leaves in arg_sigs)])
      path = directory / f"{self._name}-{hashlib.sha256(text.encode()).hexdigest()[:40]}.pkl"
      compiled = _load(path, dynamic)
      if compiled is not None:
        events.append(Event(self._name, "disk", time.perf_counter() - t, time.process_time() - c))
        return compiled
    lowered = self._jit.lower(*(a if i in self._static else jax.tree.map(_abstract, a)
                                for i, a in enumerate(args)))
    if path is None:
      compiled = lowered.compile()
    else:
      compiled = _compile_fresh(lowered)
      _store(path, compiled)
    events.append(Event(self._name, "compiled", time.perf_counter() - t,
                        time.process_time() - c))
    return compiled


def _compile_fresh(lowered):
  """Compile without JAX's persistent cache: an executable JAX restored from its own cache
  serializes incompletely in jaxlib 0.10 (its kernels are missing when the stored copy runs:
  "NOT_FOUND: Function ... not found"), so a program to store must come from the compiler. JAX
  decides once per process whether its cache is used; `reset_cache` makes it decide again."""
  from jax.experimental.compilation_cache import compilation_cache

  enabled = jax.config.values["jax_enable_compilation_cache"]
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    return lowered.compile()
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def _load(path: Path, dynamic: tuple):
  from jax.experimental import serialize_executable

  try:
    blob = path.read_bytes()
  except OSError:
    return None
  try:
    devices, out_tree, payload = pickle.loads(blob)
    by_id = {d.id: d for d in jax.devices()}
    compiled = serialize_executable.deserialize_and_load(
        payload, jax.tree.structure((dynamic, {})), out_tree,
        execution_devices=[by_id[i] for i in devices])
    os.utime(path)  # most recently used
    return compiled
  except Exception as e:  # a truncated, corrupt or foreign file: recompile and replace it
    print(f"effjax: recompiling {path.name}: stored program unusable ({type(e).__name__}: {e})",
          file=sys.stderr)
    path.unlink(missing_ok=True)
    return None


def _store(path: Path, compiled) -> None:
  from jax.experimental import serialize_executable

  try:
    unloaded = compiled._executable._unloaded_executable
    if unloaded is None or unloaded.host_callbacks:
      return  # not serializable (host callbacks hold Python objects)
    payload, _, out_tree = serialize_executable.serialize(compiled)
    blob = pickle.dumps(([d.id for d in unloaded.device_list], out_tree, payload))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)  # readers never see a partial file
    _prune(path.parent)
  except (OSError, ValueError, NotImplementedError, pickle.PicklingError) as e:
    print(f"effjax: not storing compiled program {path.name}: {e}", file=sys.stderr)


def _prune(directory: Path) -> None:
  def mtime(p: Path) -> float:
    try:
      return p.stat().st_mtime
    except FileNotFoundError:  # pruned by another process meanwhile
      return 0.0

  for old in sorted(directory.glob("*.pkl"), key=mtime)[:-_MAX_FILES]:
    old.unlink(missing_ok=True)
