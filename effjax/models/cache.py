"""A fixed-length KV cache with a per-row write index that can be rolled back or compacted.

Slots 0..index-1 of a row hold its committed context. A forward writes its T new tokens at slots
index..index+T-1 and (by default) advances the index past the valid ones. Speculative decoders write
a whole token tree, then `commit` keeps only the accepted entries. `pos` records the position id of
every slot (-1 = empty), which is what sliding-window layers and masks read.

Sliding-window layers only look back `window` positions, so a cache built with `block` (the most
slots one forward writes past the committed context) gives them a ring of window + block slots
instead of the full length: slot s of the row lives at ring slot s mod R. A forward attends over the
ring as it was plus its own block, then writes the block into the ring; uncommitted block entries
(a token tree) overwrite only slots older than the window, so `commit` and `rollback` work on the
ring as on the full cache. `ring_slot` says which slot each ring slot holds (-1 = empty).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from effjax.models.config import ModelConfig

KV_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")


@struct.dataclass
class KVCache:
  k: tuple[jax.Array, ...]  # per layer [B, S, Kh, Dh]
  v: tuple[jax.Array, ...]
  pos: jax.Array  # [B, S] int32 position id of each slot, -1 when empty
  index: jax.Array  # [B] int32 next free slot
  # Sliding layers' ring (None: they keep all S slots); their k / v are then [B, R, Kh, Dh].
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

    def zeros(i):
      slots = ring if ring is not None and cfg.layer_kind(i) == "sliding" else length
      return jnp.zeros((batch, slots, cfg.num_kv_heads, cfg.head_dim), dtype)

    empty = lambda n: jnp.full((batch, n), -1, jnp.int32)
    return cls(k=tuple(zeros(i) for i in range(cfg.num_layers)),
               v=tuple(zeros(i) for i in range(cfg.num_layers)), pos=empty(length),
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


def scatter_rows(buf: jax.Array, new: jax.Array, at: jax.Array) -> jax.Array:
  """buf[b, at[b, i]] = new[b, i] (buf [B, R, ...], new [B, T, ...]); out-of-range `at` is dropped."""
  return jax.vmap(lambda row, upd, a: row.at[a].set(upd, mode="drop"))(buf, new.astype(buf.dtype), at)


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


def commit(cache: KVCache, start: jax.Array, keep: jax.Array, count: jax.Array) -> KVCache:
  """Keep `count[b]` entries of a block written at `start[b]`, in order, and drop the rest.

  keep: [B, n] offsets inside the block of the entries to keep (only the first count[b] are used);
  they move to slots start..start+count-1 and the index becomes start + count. Used after a tree
  verification: the root and the accepted nodes stay, rejected nodes and mask tokens go.
  """
  n = keep.shape[1]
  src = start[:, None] + keep  # [B, n] slots to read
  dst = start[:, None] + jnp.arange(n)[None, :]
  valid = jnp.arange(n)[None, :] < count[:, None]
  # Rows past `count` copy themselves: a no-op that keeps shapes static.
  src = jnp.where(valid, src, jnp.minimum(dst, cache.length - 1))
  dst = jnp.minimum(dst, cache.length - 1)

  ring = cache.ring_len
  # Ring layers move the same entries between their ring slots (distinct: n <= block < ring).
  ring_src, ring_dst = (None, None) if ring is None else (src % ring, dst % ring)

  def move(buf, src, dst):
    taken = jnp.take_along_axis(buf, src.reshape(src.shape + (1,) * (buf.ndim - 2)), axis=1)
    return jax.vmap(lambda row, d, t: row.at[d].set(t))(buf, dst, taken)

  def move_layer(buf):
    on_ring = ring is not None and buf.shape[1] == ring  # a ring is shorter than the cache
    return move(buf, ring_src, ring_dst) if on_ring else move(buf, src, dst)

  new = cache.replace(k=tuple(move_layer(b) for b in cache.k), v=tuple(move_layer(b) for b in cache.v),
                      pos=move(cache.pos, src, dst))
  if ring is not None:
    slot = jax.vmap(lambda row, d, s: row.at[d].set(s))(cache.ring_slot, ring_dst, dst)
    new = new.replace(ring_pos=move(cache.ring_pos, ring_src, ring_dst), ring_slot=slot)
  return rollback(new, start + count)
