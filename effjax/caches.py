"""Where effjax keeps what it computed once: converted models and compiled programs.

Everything lives under $EFFJAX_CACHE (default ~/.cache/effjax): models/ (named models converted from
their GGUF files), jax/ (JAX's persistent compilation cache) and programs/ (effjax's executables,
see effjax/program_cache.py). Importing this module does not import JAX.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROGRAMS_ENV = "EFFJAX_PROGRAMS"  # directory of stored executables; empty: keep none


def cache_root() -> Path:
  return Path(os.environ.get("EFFJAX_CACHE", "~/.cache/effjax")).expanduser()


def cpuinfo(*keys: str) -> dict[str, str]:
  """The first value of each of `keys` ("model name", "flags", ...) in /proc/cpuinfo; those it
  lacks, or all where it cannot be read (not Linux), are left out."""
  found: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        found.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return {k: found[k] for k in keys if k in found}


def programs_dir() -> Path | None:
  value = os.environ.get(PROGRAMS_ENV)
  return Path(value).expanduser() if value else None


def enable() -> None:
  """Keep compiled programs across runs (what every `effjax` command does): JAX's compilation cache
  and effjax's program cache under cache_root(), unless their variables already say otherwise.
  Works before or after JAX is imported."""
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_root() / "jax"))
  os.environ.setdefault(PROGRAMS_ENV, str(cache_root() / "programs"))
  if "jax" in sys.modules:  # JAX read its variables at import: set its config directly
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
