"""A fixed-length KV cache with a per-row write index that can be rolled back or compacted.

Slots 0..index-1 of a row hold its committed context. A forward attends over the cache as it was
and then its own T new tokens; it then commits the valid ones at slots index.. (advance=True), or
(advance=False) it returns its block's K/V and `commit` appends the entries the caller keeps
(speculative decoders: the accepted path through a token tree). `pos` records the position id of every slot
(-1 = empty), which is what sliding-window layers and masks read.

Sliding-window layers only look back `window` positions, so a cache built with `block` (the most
slots one forward writes past the committed context) gives them a ring of window + block slots
instead of the full length: slot s of the row lives at ring slot s mod R; `commit` and `rollback`
work on the ring as on the full cache. `ring_slot` says which slot each ring slot holds
(-1 = empty).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from effjax.models.config import ModelConfig

# Storage layouts: keys [B, Kh, S, Dh] and values [B, Kh, Dh, S] are the operand layouts XLA:CPU's
# two attention dots take as they are. With [B, S, Kh, Dh] it transposed every layer's K and V on
# every decode step (BENCHMARKS.md, "KV cache layout"). A forward's own K/V stay [B, T, Kh, Dh].
K_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")
V_AXES = ("batch", "kv_heads", "head_dim", "cache_seq")
K_SEQ, V_SEQ = 2, 3  # the slot axis of each


def as_keys(x: jax.Array) -> jax.Array:
  """[B, T, Kh, Dh] -> the key layout [B, Kh, T, Dh]."""
  return jnp.swapaxes(x, 1, 2)


def as_values(x: jax.Array) -> jax.Array:
  """[B, T, Kh, Dh] -> the value layout [B, Kh, Dh, T]."""
  return jnp.transpose(x, (0, 2, 3, 1))


@struct.dataclass
class KVCache:
  k: tuple[jax.Array, ...]  # per layer [B, Kh, S, Dh] (K_AXES)
  v: tuple[jax.Array, ...]  # per layer [B, Kh, Dh, S] (V_AXES)
  pos: jax.Array  # [B, S] int32 position id of each slot, -1 when empty
  index: jax.Array  # [B] int32 next free slot
  # Sliding layers' ring (None: they keep all S slots); their k / v then have R slots.
  ring_pos: jax.Array | None = None  # [B, R] position id of each ring slot, -1 when empty
  ring_slot: jax.Array | None = None  # [B, R] the slot each ring slot holds, -1 when empty

  @property
  def batch(self) -> int:
    return self.pos.shape[0]

  @property
  def length(self) -> int:
    return self.pos.shape[1]

  @property
  def ring_len(self) -> int | None:
    return None if self.ring_pos is None else self.ring_pos.shape[1]

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, length: int, dtype=None,
           block: int | None = None) -> "KVCache":
    """An empty cache of `length` slots per row. With `block` (the most slots any later forward
    writes past the committed context, as a strategy's block_size), sliding-window layers get a
    ring of sliding_window + block slots where that is shorter than `length`."""
    dtype = dtype or cfg.jnp_dtype
    ring = ring_length(cfg, length, block)

    def slots(i):
      return ring if ring is not None and cfg.layer_kind(i) == "sliding" else length

    kh, dh, n = cfg.num_kv_heads, cfg.head_dim, range(cfg.num_layers)
    empty = lambda n: jnp.full((batch, n), -1, jnp.int32)
    return cls(k=tuple(jnp.zeros((batch, kh, slots(i), dh), dtype) for i in n),
               v=tuple(jnp.zeros((batch, kh, dh, slots(i)), dtype) for i in n), pos=empty(length),
               index=jnp.zeros((batch,), jnp.int32), ring_pos=None if ring is None else empty(ring),
               ring_slot=None if ring is None else empty(ring))


def ring_length(cfg: ModelConfig, length: int, block: int | None) -> int | None:
  """Ring slots of the sliding layers, or None when they keep the full length (no block given, no
  sliding layers, or a ring would not be shorter)."""
  if block is None or "sliding" not in cfg.layer_kinds:
    return None
  ring = cfg.sliding_window + block
  return ring if ring < length else None


def ring_write_slots(start: jax.Array, count: jax.Array, t: int, ring: int) -> jax.Array:
  """[B, T] ring slot for each of a block's T entries written at slot start[b]: the first count[b]
  entries are kept (at most the last `ring` of them, so no two land on one ring slot); entries not
  written get `ring`, an out-of-range slot that scatters drop."""
  i = jnp.arange(t, dtype=jnp.int32)[None, :]
  written = (i < count[:, None]) & (i >= count[:, None] - ring)
  return jnp.where(written, (start[:, None] + i) % ring, ring)


def scatter_rows(buf: jax.Array, new: jax.Array, at: jax.Array, axis: int = 1) -> jax.Array:
  """buf[b, ..., at[b, i], ...] = new[b, ..., i, ...] along `axis` (buf [B, ..., R, ...], new
  [B, ..., T, ...], at [B, T]); out-of-range `at` is dropped."""
  lead = (slice(None),) * (axis - 1)
  return jax.vmap(lambda row, upd, a: row.at[lead + (a,)].set(upd, mode="drop"))(
      buf, new.astype(buf.dtype), at)


def write_rows(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """buf[b, start[b]:start[b]+T] = new[b] for every row b (buf [B, S, ...], new [B, T, ...])."""

  def one(row, upd, s):
    return jax.lax.dynamic_update_slice_in_dim(row, upd, s, axis=0)

  return jax.vmap(one)(buf, new.astype(buf.dtype), start)


def rollback(cache: KVCache, index: jax.Array) -> KVCache:
  """Forget every slot at or after `index` [B] (their KV stays but is never attended again)."""
  slots = jnp.arange(cache.length)[None, :]
  pos = jnp.where(slots < index[:, None], cache.pos, -1)
  cache = cache.replace(pos=pos, index=index.astype(jnp.int32))
  if cache.ring_pos is None:
    return cache
  kept = (cache.ring_slot >= 0) & (cache.ring_slot < index[:, None])
  return cache.replace(ring_pos=jnp.where(kept, cache.ring_pos, -1),
                       ring_slot=jnp.where(kept, cache.ring_slot, -1))


@struct.dataclass
class KVBlock:
  """The K/V of a block forwarded without writing the cache (advance=False): per layer
  [B, T, Kh, Dh], and each entry's position id [B, T] (-1: padding)."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  pos: jax.Array

  def take(self, offsets: jax.Array) -> "KVBlock":
    """The entries at `offsets` [B, n] inside the block, in that order."""
    pick = lambda x: jnp.take_along_axis(x, offsets.reshape(offsets.shape + (1,) * (x.ndim - 2)),
                                         axis=1)
    return KVBlock(k=tuple(map(pick, self.k)), v=tuple(map(pick, self.v)), pos=pick(self.pos))

  def pad(self, n: int) -> "KVBlock":
    """The block with entries appended up to n (never committed: see commit's count)."""
    grow = lambda x: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return KVBlock(k=tuple(map(grow, self.k)), v=tuple(map(grow, self.v)), pos=grow(self.pos))


def commit(cache: KVCache, block: KVBlock, count: jax.Array) -> KVCache:
  """Append the first count[b] entries of `block` to row b's context: they go to slots
  index..index+count-1 (ring layers: the ring slots of those) and the index moves past them; the
  other entries are dropped. Used after a tree verification with block.take(path): the root and
  the accepted nodes stay, rejected nodes and mask tokens go.

  Only these entries are written (scatters that XLA does in place), so a decode loop that picks
  its step with lax.cond / lax.switch can commit once after the conditional and never copy the
  cache: XLA copies every buffer a conditional's branch writes.
  """
  n = block.pos.shape[1]
  start = cache.index
  i = jnp.arange(n, dtype=jnp.int32)[None, :]
  slots = start[:, None] + i
  at = jnp.where(i < count[:, None], slots, cache.length)  # out of range: dropped
  ring = cache.ring_len
  ring_at = None if ring is None else ring_write_slots(start, count, n, ring)

  def write(buf, new, axis):
    on_ring = ring is not None and buf.shape[axis] == ring  # a ring is shorter than the cache
    return scatter_rows(buf, new, ring_at if on_ring else at, axis)

  new = cache.replace(k=tuple(write(buf, as_keys(x), K_SEQ) for buf, x in zip(cache.k, block.k)),
                      v=tuple(write(buf, as_values(x), V_SEQ) for buf, x in zip(cache.v, block.v)),
                      pos=scatter_rows(cache.pos, block.pos, at), index=start + count)
  if ring is not None:
    new = new.replace(ring_pos=scatter_rows(cache.ring_pos, block.pos, ring_at),
                      ring_slot=scatter_rows(cache.ring_slot, slots, ring_at))
  return new
