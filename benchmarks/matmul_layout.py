"""How XLA:CPU's matrix products over SmolLM2-sized weights scale with the rows they carry.

k rows x (120 stacked [1536, 576] weights, ~425 MB: about SmolLM2-135M's layers), in the
checkpoints' layout ([out, in]: x @ W.T) and in the one effjax stores ([in, out]: x @ W), best of
--reps calls. k = 1 is a decode step; k > 1 is a tree or draft verification, or a batch. Read
bandwidth = weight bytes / time. This study is why effjax transposes kernels when it loads them.

  python benchmarks/matmul_layout.py --ks 1,2,4,8,16,32

A second table chains the same products through per-layer arrays shaped like SmolLM2's
projections, as the model holds them (where XLA:CPU's choice of kernel per shape shows), for separate
and fused (one QKV, one gate+up) projections in both orientations. All calls of a table go round
robin, so a change of the machine's load hits every layout alike.
"""

from __future__ import annotations

import argparse
import os
import time

import effjax  # noqa: F401  first: with libtpu installed, keeps JAX off a TPU this host lacks
import jax
import jax.numpy as jnp

STACK, OUT, IN = 120, 1536, 576


def stacked_products(contract: str):
  """jit(x, W) -> a scalar touching every product (a loop over the stack, as over layers)."""

  def run(x, w):
    body = lambda i, acc: acc + jnp.einsum(contract, x, w[i])[0, 0]
    return jax.lax.fori_loop(0, w.shape[0], body, 0.0)

  return jax.jit(run)


LAYERS = 30
# SmolLM2-135M's projections as [in, out] shapes: separate, and fused (one QKV, one gate+up kernel).
PROJECTIONS = {
    "separate": dict(q=(576, 576), k=(576, 192), v=(576, 192), o=(576, 576), gate=(576, 1536),
                     up=(576, 1536), down=(1536, 576)),
    "fused": dict(qkv=(576, 960), o=(576, 576), gate_up=(576, 3072), down=(1536, 576)),
}


def layer_params(fusion: str, in_out: bool) -> list[dict[str, jax.Array]]:
  """Separate arrays per layer and projection, as the model holds them."""
  key = jax.random.key(0)
  out = []
  for layer in range(LAYERS):
    ws = {}
    for i, (name, (d_in, d_out)) in enumerate(PROJECTIONS[fusion].items()):
      w = jax.random.normal(jax.random.fold_in(key, layer * 8 + i), (d_in, d_out)) * 0.02
      ws[name] = w if in_out else jnp.asarray(w.T)
    out.append(ws)
  return out


def layer_chain(fusion: str, in_out: bool):
  """jit(params, x [k, 576]) -> x after 30 layers of the model's projections and residual adds
  (attention itself left out: it does not touch the weights)."""
  mm = ((lambda x, w: jnp.einsum("ti,io->to", x, w)) if in_out
        else (lambda x, w: jnp.einsum("ti,oi->to", x, w)))

  def run(params, x):
    for p in params:
      if fusion == "fused":
        qkv = mm(x, p["qkv"])
        q, kv = qkv[:, :576], qkv[:, 576:768] + qkv[:, 768:]
        gate_up = lambda h: mm(h, p["gate_up"])
      else:
        q, kv = mm(x, p["q"]), mm(x, p["k"]) + mm(x, p["v"])
        gate_up = lambda h: jnp.concatenate([mm(h, p["gate"]), mm(h, p["up"])], axis=-1)
      x = x + mm(q + jnp.tile(kv, (1, 3)), p["o"])
      gu = gate_up(x)
      x = x + mm(jax.nn.silu(gu[:, :1536]) * gu[:, 1536:], p["down"])
      x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return x

  return jax.jit(run)


def round_robin_ms(calls: list, reps: int) -> list[float]:
  """Best wall ms of each (fn, args), one call of each per round (load changes hit all alike)."""
  for fn, args in calls:
    jax.block_until_ready(fn(*args))
  best = [float("inf")] * len(calls)
  for _ in range(reps):
    for i, (fn, args) in enumerate(calls):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[i] = min(best[i], (time.perf_counter() - t) * 1e3)
  return best


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
  print(f"{jax.devices()[0].device_kind}, 1-minute load average {os.getloadavg()[0]:.1f}\n")
  calls = []
  for k in ks:
    calls += [(out_in, (jnp.ones((k, IN)), w_out_in)), (in_out, (jnp.ones((k, IN)), w_in_out))]
  ms = round_robin_ms(calls, args.reps)
  print(f"Stacked weights ({gb * 1e3:.0f} MB), one product per stack entry, best of {args.reps}:\n")
  print("| k rows | [out, in] ms | [in, out] ms | [out, in] / k=1 | [in, out] / k=1 |")
  print("|---|---|---|---|---|")
  for i, k in enumerate(ks):
    a, b = ms[2 * i], ms[2 * i + 1]
    print(f"| {k} | {a:.1f} | {b:.1f} | {a / ms[0]:.2f}x | {b / ms[1]:.2f}x |")
  print(f"\nread bandwidth of the k = {ks[0]} product: {gb / (ms[0] / 1e3):.1f} GB/s ([out, in]), "
        f"{gb / (ms[1] / 1e3):.1f} GB/s ([in, out])\n")

  variants = [(f, io) for f in PROJECTIONS for io in (False, True)]
  params = {v: layer_params(*v) for v in variants}
  chains = {v: layer_chain(*v) for v in variants}
  calls = [(chains[v], (params[v], jnp.ones((k, IN)))) for k in ks for v in variants]
  ms = round_robin_ms(calls, args.reps)
  name = lambda v: f"{v[0]} {'[in, out]' if v[1] else '[out, in]'}"
  print(f"Per-layer arrays as in the model ({LAYERS} layers), chained, best of {args.reps} ms "
        "(ratio to k = 1 of the same layout):\n")
  print("| k rows | " + " | ".join(name(v) for v in variants) + " |")
  print("|---" * (len(variants) + 1) + "|")
  for i, k in enumerate(ks):
    row = ms[i * len(variants):(i + 1) * len(variants)]
    print(f"| {k} | " + " | ".join(f"{t:.1f} ({t / ms[j]:.2f}x)" for j, t in enumerate(row)) + " |")


if __name__ == "__main__":
  main()
