"""Compiled programs per strategy, keyed by the strategy's value and bounded.

Strategies are frozen dataclasses that may hold arrays (a steering vector, token tables), so they
compare by identity (`eq=False`). Keyed by identity, every new but equal strategy would compile again
and stay cached forever; keyed by value, equal strategies share one compile. The closure traced for a
strategy reads only its fields, so equal fields give the same program.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import jax
import numpy as np

T = TypeVar("T")

# Engines keep at most this many strategies' programs; the least recently used go first.
DEFAULT_MAX_STRATEGIES = 16


def value_key(obj: Any) -> Hashable:
  """A hashable key equal for values that trace to the same program: dataclass fields, containers,
  scalars (with their type: 1 and 1.0 trace differently) and arrays (shape, dtype, content digest).
  Anything else is keyed by itself if hashable, else by identity (its holder keeps it alive)."""
  if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
    a = np.asarray(obj)
    return ("array", a.shape, a.dtype.str, hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest())
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return (type(obj), tuple((f.name, value_key(getattr(obj, f.name))) for f in dataclasses.fields(obj)))
  if isinstance(obj, (tuple, list)):
    return (type(obj), tuple(value_key(x) for x in obj))
  if isinstance(obj, dict):
    return (dict, tuple(sorted(((k, value_key(v)) for k, v in obj.items()), key=repr)))
  try:
    hash(obj)
  except TypeError:
    return ("id", id(obj))
  return (type(obj), obj)


class StrategyCache(Generic[T]):
  """Least-recently-used map from a strategy's value to what was built for it (its jitted functions).
  Each entry holds the first strategy of its value, so an identity-keyed part stays unique."""

  def __init__(self, max_size: int = DEFAULT_MAX_STRATEGIES):
    if max_size < 1:
      raise ValueError(f"max_size must be >= 1, got {max_size}")
    self.max_size = max_size
    self._entries: collections.OrderedDict[Hashable, tuple[Any, T]] = collections.OrderedDict()

  def __len__(self) -> int:
    return len(self._entries)

  def values(self) -> list[T]:
    return [built for _, built in self._entries.values()]

  def get(self, strategy: Any, build: Callable[[Any], T]) -> T:
    """What `build(strategy)` returned for an equal strategy before, else build it now."""
    key = value_key(strategy)
    if key in self._entries:
      self._entries.move_to_end(key)
      return self._entries[key][1]
    built = build(strategy)
    self._entries[key] = (strategy, built)
    if len(self._entries) > self.max_size:
      self._entries.popitem(last=False)
    return built
