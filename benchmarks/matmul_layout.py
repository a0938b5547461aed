"""How XLA:CPU's matrix products over SmolLM2-sized weights scale with the rows they carry.

k rows x (120 stacked [1536, 576] weights, ~425 MB: about SmolLM2-135M's layers), in the
checkpoints' layout ([out, in]: x @ W.T) and in the one effjax stores ([in, out]: x @ W), best of
--reps calls. k = 1 is a decode step; k > 1 is a tree or draft verification, or a batch. Read
bandwidth = weight bytes / time. This study is why effjax transposes kernels when it loads them.

  python benchmarks/matmul_layout.py --ks 1,2,4,8,16,32

A second table chains the same products through per-layer arrays shaped like SmolLM2's
projections, as the model holds them (where XLA:CPU's choice of kernel per shape shows).
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


LAYERS = 30
PROJECTIONS = dict(q=(576, 576), k=(576, 192), v=(576, 192), o=(576, 576), gate=(576, 1536),
                   up=(576, 1536), down=(1536, 576))  # SmolLM2-135M's [in, out] shapes


def layer_params(in_out: bool) -> list[dict[str, jax.Array]]:
  """Separate arrays per layer and projection, as the model holds them."""
  key = jax.random.key(0)
  out = []
  for layer in range(LAYERS):
    ws = {}
    for i, (name, (d_in, d_out)) in enumerate(PROJECTIONS.items()):
      w = jax.random.normal(jax.random.fold_in(key, layer * 8 + i), (d_in, d_out)) * 0.02
      ws[name] = w if in_out else jnp.asarray(w.T)
    out.append(ws)
  return out


def layer_chain(in_out: bool):
  """jit(params, x [k, 576]) -> x after 30 layers of the model's projections and residual adds
  (attention itself left out: it does not touch the weights)."""
  mm = ((lambda x, w: jnp.einsum("ti,io->to", x, w)) if in_out
        else (lambda x, w: jnp.einsum("ti,oi->to", x, w)))

  def run(params, x):
    for p in params:
      kv = mm(x, p["k"]) + mm(x, p["v"])
      x = x + mm(mm(x, p["q"]) + jnp.tile(kv, (1, 3)), p["o"])
      x = x + mm(jax.nn.silu(mm(x, p["gate"])) * mm(x, p["up"]), p["down"])
      x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return x

  return jax.jit(run)


def print_table(title: str, ks: list[int], time_pair) -> tuple[float, float]:
  """Prints the table; returns the first row's times."""
  print(title + "\n")
  print("| k rows | [out, in] ms | [in, out] ms | [out, in] / k=1 | [in, out] / k=1 |")
  print("|---|---|---|---|---|")
  base = None
  for k in ks:
    a, b = time_pair(k)
    base = base or (a, b)
    print(f"| {k} | {a:.1f} | {b:.1f} | {a / base[0]:.2f}x | {b / base[1]:.2f}x |")
  print()
  return base


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ks", default="1,2,4,8,16,32")
  ap.add_argument("--reps", type=int, default=20)
  args = ap.parse_args()
  ks = [int(v) for v in args.ks.split(",")]
  w_out_in = jnp.ones((STACK, OUT, IN))
  w_in_out = jnp.ones((STACK, IN, OUT))
  jax.block_until_ready((w_out_in, w_in_out))
  out_in, in_out = stacked_products("ki,oi->ko"), stacked_products("ki,io->ko")
  gb = w_out_in.nbytes / 1e9
  print(f"{jax.devices()[0].device_kind}\n")
  first = print_table(f"Stacked weights ({gb * 1e3:.0f} MB), one product per stack entry:", ks,
                      lambda k: (best_ms(out_in, jnp.ones((k, IN)), w_out_in, reps=args.reps),
                                 best_ms(in_out, jnp.ones((k, IN)), w_in_out, reps=args.reps)))
  print(f"read bandwidth of the k = {ks[0]} product: {gb / (first[0] / 1e3):.1f} GB/s ([out, in]), "
        f"{gb / (first[1] / 1e3):.1f} GB/s ([in, out])\n")
  p_oi, p_io = layer_params(False), layer_params(True)
  f_oi, f_io = layer_chain(False), layer_chain(True)
  print_table(f"Per-layer arrays as in the model ({LAYERS} layers x 7 projections), chained:", ks,
              lambda k: (best_ms(f_oi, p_oi, jnp.ones((k, IN)), reps=args.reps),
                         best_ms(f_io, p_io, jnp.ones((k, IN)), reps=args.reps)))


if __name__ == "__main__":
  main()
