"""Packages that import their public names on first use, so that importing one light submodule
(a config, the chat encoder) does not import every heavy sibling (JAX, Grain, Orbax)."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def exports(package: str, module_of: dict[str, str]) -> Callable[[str], Any]:
  """A module-level `__getattr__` for `package`: name -> its value from `package.module_of[name]`."""

  def __getattr__(name: str) -> Any:
    if name not in module_of:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)
    setattr(sys.modules[package], name, value)
    return value

  return __getattr__
