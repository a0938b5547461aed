"""The vocabulary top-k that drafting takes at every verified row (Token Recycling's table update,
ESP's candidates) and the greedy argmax of every verified row, against the `lax.top_k` and
`jnp.argmax` forms they replaced, round robin in one process.

Random float32 logits [--rows, V] for SmolLM2's and Gemma 3's vocabularies, k = --k:
- `lax.top_k + logsumexp`: Token Recycling's update until d297d61;
- `lax.top_k(log_softmax)`: ESP's candidates until d297d61;
- `topk.top_log_probs`: both now (effjax/decoding/topk.py), same tokens and log-probabilities;
- `jnp.argmax`: the greedy choice at every row until the chunked `topk.argmax` (same indices).

  python benchmarks/topk.py
"""

from __future__ import annotations

import argparse

import effjax  # noqa: F401  first: with libtpu installed, keeps JAX off a TPU this host lacks
import jax
import numpy as np
from forward_cost import call_timer, time_round_robin

from effjax.decoding.topk import argmax, top_log_probs

VOCABS = {"smollm2 (49152)": 49152, "gemma3 (262144)": 262144}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", type=int, default=54, help="verified rows (hybrid-bc60's owners: 54)")
  ap.add_argument("--k", type=int, default=8)
  ap.add_argument("--reps", type=int, default=30)
  args = ap.parse_args(argv)
  k = args.k
  forms = {
      "lax.top_k + logsumexp": lambda x: (jax.lax.top_k(x, k), jax.nn.logsumexp(x, axis=-1)),
      "lax.top_k(log_softmax)": lambda x: jax.lax.top_k(jax.nn.log_softmax(x, axis=-1), k),
      "topk.top_log_probs": lambda x: top_log_probs(x, k),
  }
  print(f"{args.rows} rows, k = {k}, {args.reps} reps, {jax.devices()[0].platform}\n")
  print("| vocabulary | form | wall median ms | wall min ms | CPU median ms | wall min / first |")
  print("|---|---|---|---|---|---|")
  for name, v in VOCABS.items():
    x = jax.random.normal(jax.random.key(0), (args.rows, v))
    fns = [jax.jit(f) for f in forms.values()]
    (want_logp, want_tok), (tok, logp) = fns[1](x), fns[2](x)
    np.testing.assert_array_equal(tok, want_tok)
    np.testing.assert_allclose(logp, want_logp, atol=1e-5)
    timed = time_round_robin([call_timer(f, x) for f in fns], args.reps)
    for form, (med, best, cpu) in zip(forms, timed):
      print(f"| {name} | {form} | {med:.2f} | {best:.2f} | {cpu:.2f} | {best / timed[0][1]:.2f}x |")
    greedy = [jax.jit(lambda x: jax.numpy.argmax(x, axis=-1)), jax.jit(argmax)]
    np.testing.assert_array_equal(greedy[0](x), greedy[1](x))
    timed = time_round_robin([call_timer(f, x) for f in greedy], args.reps)
    for form, (med, best, cpu) in zip(("jnp.argmax", "topk.argmax"), timed):
      print(f"| {name} | {form} | {med:.2f} | {best:.2f} | {cpu:.2f} | {best / timed[0][1]:.2f}x |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
