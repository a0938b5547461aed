"""How XLA:CPU's matrix products over SmolLM2-sized weights scale with the rows they carry.

k rows x (120 stacked [1536, 576] weights, ~425 MB: about SmolLM2-135M's layers), in the weight
layout effjax uses ([out, in], as in the checkpoints: x @ W.T) and transposed ([in, out]: x @ W),
best of --reps calls. k = 1 is a decode step; k > 1 is a tree or draft verification, or a batch.
Read bandwidth = weight bytes / time.

  python benchmarks/matmul_layout.py --ks 1,2,4,8,16,32
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

STACK, OUT, IN = 120, 1536, 576


def best_ms(f, *args, reps: int) -> float:
  f(*args).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(*args).block_until_ready()
    times.append(time.perf_counter() - t)
  return min(times) * 1e3


def stacked_products(contract: str):
  """jit(x, W) -> a scalar touching every product (a loop over the stack, as over layers)."""

  def run(x, w):
    body = lambda i, acc: acc + jnp.einsum(contract, x, w[i])[0, 0]
    return jax.lax.fori_loop(0, w.shape[0], body, 0.0)

  return jax.jit(run)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ks", default="1,2,4,8,16,32")
  ap.add_argument("--reps", type=int, default=20)
  args = ap.parse_args()
  w_out_in = jnp.ones((STACK, OUT, IN))
  w_in_out = jnp.ones((STACK, IN, OUT))
  jax.block_until_ready((w_out_in, w_in_out))
  out_in, in_out = stacked_products("ki,oi->ko"), stacked_products("ki,io->ko")
  gb = w_out_in.nbytes / 1e9
  print(f"{jax.devices()[0].device_kind}, {gb * 1e3:.0f} MB of weights\n")
  print("| k rows | [out, in] ms | [in, out] ms | [out, in] / k=1 | [in, out] / k=1 |")
  print("|---|---|---|---|---|")
  base = None
  for k in [int(v) for v in args.ks.split(",")]:
    x = jnp.ones((k, IN))
    a, b = best_ms(out_in, x, w_out_in, reps=args.reps), best_ms(in_out, x, w_in_out, reps=args.reps)
    base = base or (a, b)
    print(f"| {k} | {a:.1f} | {b:.1f} | {a / base[0]:.2f}x | {b / base[1]:.2f}x |")
  print(f"\nread bandwidth of the k = 1 product: {gb / (base[0] / 1e3):.1f} GB/s ([out, in])")


if __name__ == "__main__":
  main()
