"""The decoder family as one Flax NNX implementation.

Float projection kernels are stored [in, out] and the embedding table [D, V], the transposes of the
checkpoints' layouts (`checkpoints.assemble` converts): on XLA:CPU a product of a few rows with
such a matrix costs about what one row does, with the checkpoint layout 1.3x, and a speculative
verification forward is exactly such a product (BENCHMARKS.md, "Forward cost of k tokens"). Each
layer holds one QKV and one gate+up kernel (models/layout.py); int8 weights are in models/quant.py.

What the techniques need is an explicit input of `Transformer.__call__`, never a hook:
token ids or input embeddings, position ids, a mask over the new block (tree attention), a KV cache
with a rollback-able write index, a steering term added to the residual stream entering one layer,
hidden states of chosen layers, and skipping the LM head.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from effjax.models import layout
from effjax.models import quant as quant_lib
from effjax.models.cache import K_AXES, V_AXES, KVBlock, KVCache, as_keys, as_values, commit
from effjax.models.config import ModelConfig
from effjax.models.sharding import DEFAULT_RULES, ShardingRules, constrain

ACT_AXES = ("batch", "seq", "act_embed")
NEG_INF = -1e30  # finite, so a fully masked row (padding) gives a uniform softmax, never NaN


@struct.dataclass
class Steering:
  """alpha * vector added to the residual stream entering decoder layer `layer`.

  vector: [D] (or [B, D]); coef: [B, T] per-position coefficient (0 = untouched).
  """

  vector: jax.Array
  coef: jax.Array
  layer: int = struct.field(pytree_node=False)


@struct.dataclass
class ModelOutput:
  logits: jax.Array | None  # [B, T, V] float32, or None when compute_logits=False
  hidden: jax.Array  # [B, T, D] final hidden state after the final norm
  layer_hidden: tuple[jax.Array, ...]  # residual stream entering each requested layer
  cache: KVCache | None  # the cache after the forward (None: no cache, or advance=False)
  block: KVBlock | None = None  # no cache or advance=False: the block's own K/V, to commit


def precision(dtype) -> jax.lax.Precision:
  """Matmul precision for activations of `dtype`: float32 models compute float32 products on every
  backend (TPUs and GPUs otherwise use bfloat16 passes or TF32 for float32 matmuls, far from the
  reference logits); bfloat16 models take the backend's native products, as torch does."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _rows(rngs: nnx.Rngs, d_out: int, d_in: int, dtype, scale: float | None = None) -> jax.Array:
  """A random [out, in] matrix, N(0, scale^2) with scale 1/sqrt(in) by default: drawn in the
  checkpoints' layout whatever the model stores, so a seed gives the same random model in every
  layout (tests pick seeds for the behaviour of their tiny models)."""
  scale = (1.0 / math.sqrt(d_in)) if scale is None else scale
  return jax.random.normal(rngs.params(), (d_out, d_in), dtype) * scale


class Linear(nnx.Module):
  """y [..., *out] = x [..., in] . W (+ b), built from W's rows [*out, in] (checkpoint orientation).

  Float weights are stored `kernel` [in, *out]: XLA:CPU's product of a few rows with an [out, in]
  matrix costs 1.3x its matrix-vector product, with [in, out] ~1.0x, and a speculative verification
  forward is exactly such a few-row product. Int8 weights (`quant="int8"`) are stored `kernel`
  [*out, in] int8 with `kernel_scales` [*out] (models/quant.py), the orientation their per-row
  scales and int8 products want.
  """

  def __init__(self, rows: jax.Array, in_axis: str, out_axes: tuple[str | None, ...], *, bias: bool,
               dtype, quant: str | None = None):
    out_shape = tuple(rows.shape[:-1])
    if quant == "int8":
      codes, scales = quant_lib.quantize(rows)
      self.kernel = nnx.Param(codes, axes=(*out_axes, in_axis))
      self.kernel_scales = nnx.Param(scales, axes=out_axes)
    else:
      self.kernel = nnx.Param(jnp.moveaxis(rows, -1, 0).astype(dtype), axes=(in_axis, *out_axes))
      self.kernel_scales = None
    self.bias = nnx.Param(jnp.zeros(out_shape, dtype), axes=out_axes) if bias else None

  def __call__(self, x):
    w = self.kernel[...]
    if self.kernel_scales is not None:
      y = quant_lib.matmul(x, w, self.kernel_scales[...], precision=precision(x.dtype))
    else:
      y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision(x.dtype))
    return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, axis_name: str, *, eps: float, plus_one: bool, dtype):
    # (1 + w) norms start at w = 0, plain ones at w = 1: both are the identity scale.
    self.scale = nnx.Param(jnp.full((dim,), 0.0 if plus_one else 1.0, dtype), axes=(axis_name,))
    self.eps = eps
    self.plus_one = plus_one

  def __call__(self, x):
    """Normalised in float32, scaled as the reference implementations do: Gemma's (1 + w) in
    float32 and then cast; Llama / Qwen cast first and scale by w in the activations' dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:
      return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
    return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig, theta: float, scaled: bool) -> jax.Array:
  d = cfg.head_dim
  inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  rs = cfg.rope_scaling if scaled else None
  if rs is None:
    return inv
  if rs.kind == "linear":
    return inv / rs.factor
  # Llama 3.1: keep high frequencies, divide low ones by factor, interpolate in between.
  low_wavelen = rs.original_max_position / rs.low_freq_factor
  high_wavelen = rs.original_max_position / rs.high_freq_factor
  wavelen = 2 * math.pi / inv
  smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
      rs.high_freq_factor - rs.low_freq_factor)
  mid = (1 - smooth) * inv / rs.factor + smooth * inv
  out = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
  return jnp.where((wavelen <= low_wavelen) & (wavelen >= high_wavelen), mid, out)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate-half RoPE. x [B, T, H, Dh], positions [B, T]."""
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    dt = cfg.jnp_dtype
    self.cfg = cfg
    self.kind = cfg.layer_kind(layer)
    h, kh, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(bias=cfg.qkv_bias, dtype=dt, quant=cfg.quant)
    q, k, v = (_rows(rngs, n * dh, cfg.dim, dt) for n in (h, kh, kh))
    self.fused = cfg.fused_projections
    if self.fused:
      self.qkv = Linear(layout.fuse(cfg, "attn.qkv", (q, k, v)), "embed", layout.QKV_AXES, **kw)
    else:
      self.q = Linear(q, "embed", ("heads",), **kw)
      self.k = Linear(k, "embed", ("kv_heads",), **kw)
      self.v = Linear(v, "embed", ("kv_heads",), **kw)
    self.o = Linear(_rows(rngs, cfg.dim, h * dh, dt), "heads", ("embed",), bias=False, dtype=dt,
                    quant=cfg.quant)
    if cfg.qk_norm:
      kw = dict(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, dtype=dt)
      self.q_norm = RMSNorm(dh, "head_dim", **kw)
      self.k_norm = RMSNorm(dh, "head_dim", **kw)
    else:
      self.q_norm = self.k_norm = None
    # Gemma 3 sliding layers use their own RoPE base and no scaling.
    self.local_rope = self.kind == "sliding" and cfg.rope_local_theta is not None

  def __call__(self, x, positions, mask, layer_cache, mesh, rules):
    """x [B, T, D]; mask [B, T, S] over the keys: the block itself ([B, T, T]), or the cache's
    (or ring's) S slots as they were followed by the block ([B, T, S + T]).

    layer_cache: the cache's (or ring's) k and v, or None; never written here. Returns the output
    and the block's own k and v [B, T, Kh, Dh]."""
    cfg = self.cfg
    b, t, _ = x.shape
    g = cfg.num_heads // cfg.num_kv_heads
    if self.fused:
      qkv = self.qkv(x)  # [B, T, Kh, g + 2, Dh]
      q, k, v = qkv[:, :, :, :g], qkv[:, :, :, g], qkv[:, :, :, g + 1]
      q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    else:
      q = self.q(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
      k = self.k(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
      v = self.v(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    theta = cfg.rope_local_theta if self.local_rope else cfg.rope_theta
    inv_freq = rope_inv_freq(cfg, theta, scaled=not self.local_rope)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    own = (as_keys(k), as_values(v))  # the block's keys and values in the cache's layouts
    parts = [own]  # keys and values attended, in the order of the mask's key axis
    if layer_cache is not None:  # the cache (or ring) as it was, then the block
      ck, cv = layer_cache
      parts = [(ck, cv), (own[0].astype(ck.dtype), own[1].astype(cv.dtype))]
    qg = q.reshape(b, t, cfg.num_kv_heads, g, cfg.head_dim)
    scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim ** -0.5
    out = attend(qg, parts, mask, scale, cfg.attn_softcap, head_major=layer_cache is None)
    out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
    return self.o(out), (k, v)


def attend(qg: jax.Array, parts: list[tuple[jax.Array, jax.Array]], mask: jax.Array, scale: float,
           softcap: float | None, *, head_major: bool = False) -> jax.Array:
  """Softmax attention of grouped queries qg [B, T, Kh, g, Dh] over the keys of `parts` (k
  [B, Kh, S_i, Dh] and v [B, Kh, Dh, S_i] each, the cache's layouts) taken one after the other, as
  the mask [B, T, sum S_i] orders them. The parts are never concatenated: a forward that reads the
  KV cache without writing it (a tree step) must not copy the cache.

  head_major: move the queries' heads outermost before the score dot. For a forward without a
  cache (a prefill: T x T scores) XLA:CPU otherwise computes the scores key-major and transposes
  them at full size, which at T = 1024 thrashes the caches (1.6x the whole prefill's time); with
  a cache, the queries as they are make the faster program (a 1-token forward over 2048 slots:
  33 vs 39 ms, benchmarks/forward_cost.py)."""
  q, q_axes = (jnp.transpose(qg, (0, 2, 3, 1, 4)), "bkgtd") if head_major else (qg, "btkgd")

  def scores(k):
    s = jnp.einsum(f"{q_axes},bksd->bkgts", q, k, preferred_element_type=jnp.float32,
                   precision=precision(q.dtype)) * scale
    return s if softcap is None else jnp.tanh(s / softcap) * softcap

  bounds = [0]
  for k, _ in parts:
    bounds.append(bounds[-1] + k.shape[2])
  logits = [jnp.where(mask[:, None, None, :, lo:hi], scores(k), NEG_INF)
            for (k, _), lo, hi in zip(parts, bounds, bounds[1:])]
  top = jax.lax.stop_gradient(functools.reduce(
      jnp.maximum, [x.max(axis=-1, keepdims=True) for x in logits]))
  weights = [jnp.exp(x - top) for x in logits]
  total = sum(w.sum(axis=-1, keepdims=True) for w in weights)
  return sum(jnp.einsum("bkgts,bkds->btkgd", (w / total).astype(v.dtype), v,
                        precision=precision(v.dtype)) for w, (_, v) in zip(weights, parts))


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = cfg.jnp_dtype
    kw = dict(bias=False, dtype=dt, quant=cfg.quant)
    gate, up = (_rows(rngs, cfg.mlp_dim, cfg.dim, dt) for _ in range(2))
    self.fused = cfg.fused_projections
    if self.fused:
      self.gate_up = Linear(layout.fuse(cfg, "mlp.gate_up", (gate, up)), "embed",
                            layout.GATE_UP_AXES, **kw)
    else:
      self.gate = Linear(gate, "embed", ("mlp",), **kw)
      self.up = Linear(up, "embed", ("mlp",), **kw)
    self.down = Linear(_rows(rngs, cfg.dim, cfg.mlp_dim, dt), "mlp", ("embed",), **kw)
    self.activation = cfg.activation

  def __call__(self, x):
    if self.fused:
      gate_up = self.gate_up(x)  # [..., 2, F]
      g, u = gate_up[..., 0, :], gate_up[..., 1, :]
    else:
      g, u = self.gate(x), self.up(x)
    g = jax.nn.silu(g) if self.activation == "silu" else jax.nn.gelu(g, approximate=True)
    return self.down(g * u)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    dt = cfg.jnp_dtype
    kw = dict(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, dtype=dt)
    self.attn_norm = RMSNorm(cfg.dim, "embed", **kw)
    self.attn = Attention(cfg, layer, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.dim, "embed", **kw)
    self.mlp = MLP(cfg, rngs=rngs)
    self.attn_post_norm = RMSNorm(cfg.dim, "embed", **kw) if cfg.post_norms else None
    self.mlp_post_norm = RMSNorm(cfg.dim, "embed", **kw) if cfg.post_norms else None

  def __call__(self, x, positions, mask, layer_cache, mesh, rules):
    h, kv = self.attn(self.attn_norm(x), positions, mask, layer_cache, mesh, rules)
    if self.attn_post_norm is not None:
      h = self.attn_post_norm(h)
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    if self.mlp_post_norm is not None:
      h = self.mlp_post_norm(h)
    return constrain(x + h, ACT_AXES, mesh, rules), kv


def causal_block_mask(batch: int, t: int) -> jax.Array:
  return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))


def prefix_block_mask(block_mask: jax.Array, q_pos: jax.Array, block_pos: jax.Array,
                      cached_pos: jax.Array, committed: jax.Array, window: int | None) -> jax.Array:
  """Which keys each query sees when it attends over C cached slots as they were and then its own
  block: [B, T, C + T]. The committed slots ([B, C] bool) are visible, the block where block_mask
  says; sliding-window layers additionally hide keys at least `window` positions behind."""
  def near(k_pos):
    return True if window is None else (q_pos[:, :, None] - k_pos[:, None, :]) < window
  b, t, _ = block_mask.shape
  cached = jnp.broadcast_to(committed[:, None, :] & near(cached_pos), (b, t, committed.shape[1]))
  return jnp.concatenate([cached, block_mask & near(block_pos)], axis=2)


def key_mask(block_mask: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
             window: int | None) -> jax.Array:
  """Which keys each query sees without a cache: [B, T, T], the block's own valid tokens where
  block_mask says; sliding-window layers additionally hide keys at least `window` positions
  behind the query."""
  mask = block_mask & (k_pos >= 0)[:, None, :]
  if window is not None:
    mask = mask & ((q_pos[:, :, None] - k_pos[:, None, :]) < window)
  return mask


def _table(rows: jax.Array, cfg: ModelConfig) -> tuple[nnx.Param, nnx.Param | None]:
  """An embedding table from its rows [V, D]: float as [D, V], the transpose, so the logits product
  is [in, out] too (SmolLM2's tied head on CPU: 4.2 vs 6.9 ms per decode step) and a lookup reads D
  values; int8 as [V, D] codes with one scale per token (per output channel of the logits)."""
  if cfg.quant == "int8":
    codes, scales = quant_lib.quantize(rows)
    return nnx.Param(codes, axes=("vocab", "embed")), nnx.Param(scales, axes=("vocab",))
  return nnx.Param(rows.T, axes=("embed", "vocab")), None


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = cfg.jnp_dtype
    self.cfg = cfg
    self.embed, self.embed_scales = _table(_rows(rngs, cfg.vocab_size, cfg.dim, dt, scale=1.0), cfg)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.dim, "embed", eps=cfg.norm_eps, plus_one=cfg.norm_plus_one,
                              dtype=dt)
    self.lm_head, self.lm_head_scales = ((None, None) if cfg.tie_embeddings else
                                         _table(_rows(rngs, cfg.vocab_size, cfg.dim, dt), cfg))

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """Rows of the input embedding table (unscaled; __call__ applies the family's scale)."""
    if self.embed_scales is not None:
      rows = jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.jnp_dtype)
      return rows * jnp.take(self.embed_scales[...], tokens, axis=0)[..., None].astype(rows.dtype)
    return jnp.moveaxis(jnp.take(self.embed[...], tokens, axis=1), 0, -1)

  def logits(self, hidden: jax.Array) -> jax.Array:
    w, scales = ((self.embed, self.embed_scales) if self.lm_head is None
                 else (self.lm_head, self.lm_head_scales))
    if scales is not None:
      out = quant_lib.matmul(hidden, w[...], scales[...], out_dtype=jnp.float32,
                             precision=precision(hidden.dtype))
    else:
      out = jnp.einsum("...d,dv->...v", hidden, w[...], preferred_element_type=jnp.float32,
                       precision=precision(hidden.dtype))
    if self.cfg.final_softcap is not None:
      out = jnp.tanh(out / self.cfg.final_softcap) * self.cfg.final_softcap
    return out

  def __call__(self, tokens: jax.Array | None = None, *, embeddings: jax.Array | None = None,
               positions: jax.Array | None = None, input_mask: jax.Array | None = None,
               attn_mask: jax.Array | None = None, cache: KVCache | None = None,
               advance: bool = True, steering: Steering | None = None,
               hidden_layers: tuple[int, ...] = (), compute_logits: bool = True,
               remat: bool = False, mesh=None,
               rules: ShardingRules = DEFAULT_RULES) -> ModelOutput:
    """Forward T new tokens per row.

    tokens [B, T] int or embeddings [B, T, D] (rows of the embedding table, e.g. ESP mask tokens).
    positions [B, T]: position ids (default: cache.index + arange(T), or arange(T)).
    input_mask [B, T]: False marks right padding; padded tokens get no cache position.
    attn_mask [B, T, T]: which new tokens each new token sees (default causal). The cached prefix
      is always visible.
    cache: attended as it was, then the block. With advance=True the block's valid tokens are
      then committed (slots index.., and the index moves past them); with advance=False the cache
      is only read, and the block's K/V comes back in `block` for the caller to commit what it
      keeps (cache.commit). Without a cache the block attends to itself alone and also comes back
      in `block`: a prompt into an empty cache is cheapest that way (see engine.prefill_forward),
      not by attending over every empty slot.
    steering: adds coef[b, t] * vector to the residual stream entering layer steering.layer.
    hidden_layers: layers whose input residual stream is returned (num_layers = last layer's output).
    remat: recompute each layer's activations in the backward pass instead of storing them
      (training forwards: memory per layer instead of per model; no effect without a gradient).
    """
    cfg = self.cfg
    if (tokens is None) == (embeddings is None):
      raise ValueError("pass exactly one of tokens or embeddings")
    x = self.embed_tokens(tokens) if embeddings is None else embeddings.astype(cfg.jnp_dtype)
    b, t, _ = x.shape
    if cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(cfg.dim), cfg.jnp_dtype)
    x = constrain(x, ACT_AXES, mesh, rules)
    start = None if cache is None else cache.index
    if positions is None:
      base = jnp.zeros((b,), jnp.int32) if start is None else start
      positions = base[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    positions = positions.astype(jnp.int32)
    valid = jnp.ones((b, t), bool) if input_mask is None else input_mask.astype(bool)
    block_mask = causal_block_mask(b, t) if attn_mask is None else attn_mask.astype(bool)
    new_pos = jnp.where(valid, positions, -1)
    ring = None if cache is None else cache.ring_len
    window = cfg.sliding_window
    if cache is None:
      mask_within = lambda w: key_mask(block_mask, positions, new_pos, w)
    else:  # the keys are the cache's slots as they were, then the block
      committed = (jnp.arange(cache.length)[None, :] < start[:, None]) & (cache.pos >= 0)
      mask_within = lambda w: prefix_block_mask(block_mask, positions, new_pos, cache.pos,
                                                committed, w)
    masks = {"global": mask_within(None)}
    if ring is None:
      masks["sliding"] = mask_within(window)
    else:  # sliding layers attend over their ring as it was, then the block
      masks["sliding"] = prefix_block_mask(
          block_mask, positions, new_pos, cache.ring_pos,
          (cache.ring_slot >= 0) & (cache.ring_slot < start[:, None]) & (cache.ring_pos >= 0),
          window)

    def run_layer(layer, x, layer_mask, layer_cache):
      if not remat:
        return layer(x, positions, layer_mask, layer_cache, mesh, rules)
      # Functional checkpoint over the layer's state: also valid for a module built outside the
      # current trace (a frozen anchor policy inside a gradient).
      graphdef, state = nnx.split(layer)

      def pure(state, x, layer_mask, layer_cache):
        return nnx.merge(graphdef, state)(x, positions, layer_mask, layer_cache, mesh, rules)

      return jax.checkpoint(pure)(state, x, layer_mask, layer_cache)

    collected = {}
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      if steering is not None and i == steering.layer:
        vec = steering.vector if steering.vector.ndim == 2 else steering.vector[None]
        x = x + (steering.coef[..., None] * vec[:, None, :]).astype(x.dtype)
      if i in hidden_layers:
        collected[i] = x
      layer_cache = None if cache is None else (cache.k[i], cache.v[i])
      x, (k, v) = run_layer(layer, x, masks[cfg.layer_kind(i)], layer_cache)
      new_k.append(k)
      new_v.append(v)
    if cfg.num_layers in hidden_layers:
      collected[cfg.num_layers] = x
    hidden = self.final_norm(x)
    logits = self.logits(hidden) if compute_logits else None
    block = KVBlock(k=tuple(new_k), v=tuple(new_v), pos=new_pos)
    if cache is not None and advance:
      # The valid (leading) entries go in after every layer has read the cache. The count's
      # dependence on the output (never its value: count <= T) is what orders the writes after
      # the reads: XLA would otherwise copy each layer's K and V to keep a safe one to read.
      count = valid.sum(axis=1).astype(jnp.int32)
      count = jnp.minimum(count, t + jnp.isnan(hidden[:, 0, 0]).astype(jnp.int32))
      cache, block = commit(cache, block, count), None
      cache = cache.replace(k=tuple(constrain(x, K_AXES, mesh, rules) for x in cache.k),
                            v=tuple(constrain(x, V_AXES, mesh, rules) for x in cache.v))
    else:
      cache = None
    return ModelOutput(logits=logits, hidden=hidden,
                       layer_hidden=tuple(collected[i] for i in hidden_layers), cache=cache,
                       block=block)


def create_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(seed))


class _ShapesOnly:
  """Stands in for nnx.Rngs when only shapes are traced: every draw uses one key. With nnx.Rngs each
  draw updates a traced counter, and in JAX 0.10 each update costs time proportional to everything
  traced before it (an error message built for the tracer's missing .sharding): 1.6 s of CPU for
  SmolLM2's abstract model instead of 0.3 s, on every load."""

  def params(self) -> jax.Array:
    return jax.random.key(0)


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model with ShapeDtypeStructs for weights: nothing allocated, nothing initialised."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=_ShapesOnly()))
