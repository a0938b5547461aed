"""The RLHF prompt stream: seeded shuffle, per-host shards, epochs, and exact resumption."""

import collections
import json

import pytest

from effjax.data import Problem, PromptStream


def make_problems(n):
  return [Problem(id=f"p{i}", turns=(f"prompt {i}",)) for i in range(n)]


def ids(batches):
  return [[p.id for p in batch] for batch in batches]


def take(stream, n):
  return ids(next(stream) for _ in range(n))


def flat(batches):
  return [i for batch in batches for i in batch]


@pytest.mark.parametrize("consumed", [1, 3, 7])  # 10 prompts in batches of 4: 7 batches span 3 epochs
def test_resumed_stream_yields_the_same_batches(consumed):
  problems = make_problems(10)
  settings = dict(batch_size=4, seed=3, shard_index=1, shard_count=2)
  stream = PromptStream(problems, **settings)
  take(stream, consumed)
  state = json.loads(json.dumps(stream.state()))  # what a checkpoint stores
  expected = take(stream, 5)
  resumed = PromptStream(problems, **settings)
  resumed.restore(state)
  assert take(resumed, 5) == expected
  assert take(PromptStream(problems, **settings), 5) != expected  # a fresh stream starts elsewhere


def test_epochs_are_permutations_reshuffled_each_epoch():
  problems = make_problems(12)
  stream = PromptStream(problems, batch_size=5, seed=0, num_epochs=3, shard_index=0, shard_count=1,
                        drop_remainder=False)
  batches = ids(stream)  # finite: ends after 3 epochs
  assert [len(b) for b in batches] == [5] * 7 + [1]
  order = flat(batches)
  epochs = [order[:12], order[12:24], order[24:]]
  assert all(sorted(e) == sorted(p.id for p in problems) for e in epochs)
  assert len({tuple(e) for e in epochs}) == 3  # each epoch in its own order
  assert epochs[0] != [p.id for p in problems]  # shuffled at all


def test_drop_remainder_keeps_batches_full():
  stream = PromptStream(make_problems(12), batch_size=5, num_epochs=1, shard_index=0, shard_count=1)
  assert [len(b) for b in stream] == [5, 5]


def test_seed_decides_the_order():
  problems = make_problems(20)
  def order(seed):
    return take(PromptStream(problems, batch_size=20, seed=seed, shard_index=0, shard_count=1), 1)
  assert order(5) == order(5)
  assert order(5) != order(6)


@pytest.mark.parametrize("shard_count", [2, 3, 4])
def test_host_shards_are_disjoint_and_cover_the_set(shard_count):
  problems = make_problems(10)
  settings = dict(batch_size=2, seed=1, num_epochs=1, shard_count=shard_count, drop_remainder=False)
  shards = [flat(ids(PromptStream(problems, shard_index=i, **settings))) for i in range(shard_count)]
  counts = collections.Counter(i for shard in shards for i in shard)
  assert sorted(counts) == sorted(p.id for p in problems)
  assert set(counts.values()) == {1}
  # Host i takes positions i, i + n, ... of the one global order.
  (global_order,) = ids(PromptStream(problems, batch_size=10, seed=1, num_epochs=1, shard_index=0,
                                     shard_count=1))
  assert shards == [global_order[i::shard_count] for i in range(shard_count)]


def test_default_shard_is_this_jax_process():
  state = PromptStream(make_problems(4), batch_size=2).state()
  assert (state["shard_index"], state["shard_count"]) == (0, 1)


def test_restore_refuses_other_settings_or_problems():
  problems = make_problems(8)
  state = PromptStream(problems, batch_size=2, seed=1, shard_index=0, shard_count=1).state()
  with pytest.raises(ValueError, match="seed: saved 1, now 2"):
    PromptStream(problems, batch_size=2, seed=2, shard_index=0, shard_count=1).restore(state)
  with pytest.raises(ValueError, match="fingerprint"):
    PromptStream(make_problems(8)[::-1], batch_size=2, seed=1, shard_index=0,
                 shard_count=1).restore(state)
  with pytest.raises(ValueError, match="shard_count: saved 1, now 2"):
    PromptStream(problems, batch_size=2, seed=1, shard_index=0, shard_count=2).restore(state)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be positive"),
    (dict(batch_size=2, num_epochs=0), "num_epochs must be positive"),
    (dict(batch_size=2, shard_index=2, shard_count=2), r"shard_index 2 is not in \[0, 2\)"),
    (dict(batch_size=2, seed=-1), "seed must be in"),
])
def test_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    PromptStream(make_problems(4), **{"shard_index": 0, "shard_count": 1, **kwargs})
  with pytest.raises(ValueError, match="at least one problem"):
    PromptStream([], batch_size=1, shard_index=0, shard_count=1)
