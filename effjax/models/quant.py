"""Weight-only int8: int8 codes kept in memory with one scale per output channel, dequantised inside
the jitted product.

A quantized kernel is `codes` [*out, in] int8 and `scales` [*out] float32, W[o, i] ~= codes[o, i] *
scales[o] with scales[o] = max_i |W[o, i]| / 127 (symmetric, round to nearest): the error of a
weight is at most scales[o] / 2. Batch-1 decoding reads every weight once per token, so int8 reads
a quarter of float32's bytes.

The product x @ W.T is computed where the weights are read, without a float copy of them in memory:
- On GPU and TPU, as a dot of x with the converted codes, which XLA fuses into the matmul.
- On XLA:CPU a convert is never fused into a dot: it would write and re-read a float32 copy of every
  matrix, slower than float32 weights. There the activations are split instead into `DIGITS` int8
  digits per row, x ~= a * (d0 + d1 / 254 + ...), a = max |x| / 127, and one exact int8 x int8 ->
  int32 product of the digit rows with the codes reads each weight once (XLA:CPU runs it through
  YNNPACK). Two digits represent x to max |x| / 64516, a 250x smaller error than the weights'
  own rounding (max |W[o]| / 254). The result is not bit-reproducible across shardings: a last-bit
  change of an activation can move a digit by one step, within the same error bound.

Tolerance against float32 (tests/test_quant.py, teacher-forced next-token distributions): mean
KL(float32 || int8) <= 0.03 nats and >= 90% top-1 agreement on the embedded models (measured:
SmolLM2-135M-Instruct 0.0047 / 96%, Gemma 3 270M 0.0137 / 94%), and the same greedy tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

DIGITS = 2  # int8 digits per activation row on CPU
_BASE = 254.0  # digit weight: a remainder in [-0.5, 0.5] times 254 fits int8 [-127, 127]


@dataclasses.dataclass(frozen=True)
class Int8Rows:
  """Quantized rows as a checkpoint reader hands them over: codes [out, in] int8, scales [out]."""

  codes: np.ndarray
  scales: np.ndarray

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  def take_rows(self, order: np.ndarray) -> "Int8Rows":
    return Int8Rows(self.codes[order], self.scales[order])


def quantize(rows):
  """Float rows [*out, in] -> (codes [*out, in] int8, scales [*out] float32), per output row."""
  xp = np if isinstance(rows, np.ndarray) else jnp
  rows = rows.astype(xp.float32)
  amax = xp.abs(rows).max(axis=-1)
  scales = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
  codes = xp.clip(xp.round(rows / scales[..., None]), -127, 127).astype(xp.int8)
  return codes, scales


def dequantize(codes, scales):
  xp = np if isinstance(codes, np.ndarray) else jnp
  return codes.astype(xp.float32) * scales[..., None]


def from_q8_0(data: np.ndarray, shape: tuple[int, int], chunk_rows: int = 4096) -> Int8Rows:
  """GGUF Q8_0 blocks (32 int8 codes and one float16 scale each, along a row) -> one scale per row.

  The codes are rescaled to the row's largest block scale (exact for that block, one rounding for
  the others), a chunk of rows at a time: no float copy of the tensor is ever made.
  """
  rows, width = shape
  blocks = np.asarray(data).reshape(rows, width // 32, 34)
  codes = np.empty((rows, width), np.int8)
  scales = np.empty((rows,), np.float32)
  for start in range(0, rows, chunk_rows):
    b = blocks[start:start + chunk_rows]
    d = np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0].astype(np.float32)  # [r, nb]
    q = np.ascontiguousarray(b[..., 2:]).view(np.int8)  # [r, nb, 32]
    amax = (np.abs(q).max(axis=-1) * np.abs(d)).max(axis=-1)  # max |w| of each row
    s = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    ratio = (d / s[:, None])[..., None]
    codes[start:start + len(b)] = np.clip(np.round(q * ratio), -127, 127).reshape(len(b), width)
    scales[start:start + len(b)] = s
  return Int8Rows(codes, scales)


def _digits_product(x, codes):
  """sum_i x[..., i] codes[*out, i] as float32, x split into DIGITS int8 digits per row."""
  d_in = x.shape[-1]
  rows = x.reshape(-1, d_in).astype(jnp.float32)
  amax = jnp.abs(rows).max(axis=-1, keepdims=True)
  a = jnp.where(amax > 0, amax / 127.0, 1.0)
  u, digits = rows / a, []
  for _ in range(DIGITS):
    d = jnp.round(u)
    digits.append(d)
    u = (u - d) * _BASE
  stacked = jnp.concatenate(digits, axis=0).astype(jnp.int8)  # [DIGITS * n, in]
  # Against the codes as one [out, in] matrix (a free reshape): with several output dimensions
  # (a fused QKV or gate+up kernel) XLA:CPU would copy the codes to [in, out] on every call.
  acc = jax.lax.dot_general(stacked, codes.reshape(-1, d_in), (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32)
  acc = acc.reshape(DIGITS, rows.shape[0], *codes.shape[:-1]).astype(jnp.float32)
  weights = jnp.asarray([_BASE ** -j for j in range(DIGITS)], jnp.float32)
  y = jnp.tensordot(weights, acc, axes=1)  # [n, *out]
  y = y * a.reshape(-1, *([1] * (codes.ndim - 1)))
  return y.reshape(*x.shape[:-1], *codes.shape[:-1])


def matmul(x: jax.Array, codes: jax.Array, scales: jax.Array, *, out_dtype=None,
           precision=None) -> jax.Array:
  """x [..., in] times the int8 weights (codes [*out, in], scales [*out]) -> [..., *out]; `precision`
  for the float product off CPU (the CPU's integer digits product is exact)."""
  out_dtype = out_dtype or x.dtype

  def converted(x, codes):
    dims = (((x.ndim - 1,), (codes.ndim - 1,)), ((), ()))
    return jax.lax.dot_general(x, codes.astype(x.dtype), dims, preferred_element_type=jnp.float32,
                               precision=precision)

  # Chosen when the program is lowered for its devices, not by the host's default backend: a CPU
  # host compiling for a TPU slice (`effjax plan`) gets the TPU's product.
  y = jax.lax.platform_dependent(x, codes, cpu=_digits_product, default=converted)
  return (y * scales).astype(out_dtype)
