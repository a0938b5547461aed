"""A fixed-length KV cache with a per-row write index that can be rolled back or compacted.

Slots 0..index-1 of a row hold its committed context. A forward writes its T new tokens at slots
index..index+T-1 and (by default) advances the index past the valid ones. Speculative decoders write
a whole token tree, then `commit` keeps only the accepted entries. `pos` records the position id of
every slot (-1 = empty), which is what sliding-window layers and masks read.
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

  @property
  def batch(self) -> int:
    return self.pos.shape[0]

  @property
  def length(self) -> int:
    return self.pos.shape[1]

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
    dtype = dtype or cfg.jnp_dtype
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
               pos=jnp.full((batch, length), -1, jnp.int32), index=jnp.zeros((batch,), jnp.int32))


def write_rows(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """buf[b, start[b]:start[b]+T] = new[b] for every row b (buf [B, S, ...], new [B, T, ...])."""

  def one(row, upd, s):
    return jax.lax.dynamic_update_slice_in_dim(row, upd, s, axis=0)

  return jax.vmap(one)(buf, new.astype(buf.dtype), start)


def rollback(cache: KVCache, index: jax.Array) -> KVCache:
  """Forget every slot at or after `index` [B] (their KV stays but is never attended again)."""
  slots = jnp.arange(cache.length)[None, :]
  pos = jnp.where(slots < index[:, None], cache.pos, -1)
  return cache.replace(pos=pos, index=index.astype(jnp.int32))


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

  def move(buf):
    taken = jnp.take_along_axis(buf, src[:, :, None, None], axis=1)
    return jax.vmap(lambda row, d, t: row.at[d].set(t))(buf, dst, taken)

  k = tuple(move(b) for b in cache.k)
  v = tuple(move(b) for b in cache.v)
  moved_pos = jnp.take_along_axis(cache.pos, src, axis=1)
  pos = jax.vmap(lambda row, d, t: row.at[d].set(t))(cache.pos, dst, moved_pos)
  new = cache.replace(k=k, v=v, pos=pos)
  return rollback(new, start + count)
