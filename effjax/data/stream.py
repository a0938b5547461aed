"""The RLHF prompt stream: shuffled, sharded per host, batched, and resumable from a checkpoint.

Built on Grain's MapDataset: one seeded global order per epoch (Grain reshuffles each epoch with a
seed folded with the epoch number), the same on every host; host i of n takes positions i, i+n,
i+2n... of it, so hosts see disjoint prompts and together the whole stream. The position is Grain's
iterator state, so a restored stream yields exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import grain

from effjax.data.records import Problem


def fingerprint(problems: Sequence[Problem]) -> str:
  """A digest of the ids and prompts, so a checkpoint is not resumed over a different set."""
  payload = json.dumps([[p.id, list(p.turns)] for p in problems], ensure_ascii=False)
  return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class PromptStream:
  """Iterates over tuples of `batch_size` Problems for this host.

  `num_epochs=None` repeats forever. `shard_index` / `shard_count` default to
  jax.process_index() / jax.process_count(). With `drop_remainder=False` a finite stream ends with
  a short batch instead of dropping the last prompts.
  """

  def __init__(self, problems: Sequence[Problem], *, batch_size: int, seed: int = 0,
               num_epochs: int | None = None, shard_index: int | None = None,
               shard_count: int | None = None, drop_remainder: bool = True):
    if shard_index is None or shard_count is None:
      import jax  # only here: a stream for an explicit shard needs no JAX runtime

      shard_index = jax.process_index() if shard_index is None else shard_index
      shard_count = jax.process_count() if shard_count is None else shard_count
    if not problems:
      raise ValueError("a prompt stream needs at least one problem")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be positive or None (endless), got {num_epochs}")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    self._problems = tuple(problems)
    self._config = {
        "seed": seed, "batch_size": batch_size, "num_epochs": num_epochs,
        "shard_index": shard_index, "shard_count": shard_count, "drop_remainder": drop_remainder,
        "num_problems": len(self._problems), "fingerprint": fingerprint(self._problems),
    }
    dataset = (grain.MapDataset.range(len(self._problems)).seed(seed).shuffle().repeat(num_epochs)
               [shard_index::shard_count].batch(batch_size, drop_remainder=drop_remainder))
    # The elements are small index arrays: reading them in the calling thread is cheapest.
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    self._iterator = iter(dataset.to_iter_dataset(read))

  def __iter__(self) -> PromptStream:
    return self

  def __next__(self) -> tuple[Problem, ...]:
    return tuple(self._problems[i] for i in next(self._iterator))

  def state(self) -> dict[str, Any]:
    """The position, as a JSON-serialisable dict, with the settings it is valid for."""
    return {"position": self._iterator.get_state(), **self._config}

  def restore(self, state: dict[str, Any]) -> None:
    """Moves to a position from `state()`; refuses one taken with other settings or problems."""
    different = [k for k, v in self._config.items() if state.get(k) != v]
    if different:
      detail = ", ".join(f"{k}: saved {state.get(k)!r}, now {self._config[k]!r}" for k in different)
      raise ValueError(f"prompt stream state does not match this stream ({detail})")
    self._iterator.set_state(state["position"])
