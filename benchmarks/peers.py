"""Worker processes of benchmarks/engine.py: one decoding system each, driven over stdin/stdout.

    python benchmarks/peers.py --system effjax|tunix|torch --hf-dir DIR [--cache-len N]

Every system loads the same float32 weights (a Hugging Face directory that engine.py writes from the
effjax model) and answers one JSON request per line, so the driver can interleave the systems prompt
by prompt while only one of them runs at a time. A request carries token ids, never text: every system
decodes exactly the same prompts. Replies are one JSON line each.

This file imports no effjax at module level: the tunix worker runs in tunix's own virtualenv.

tunix (google-tunix 0.1.7) is used as a user would, with these runtime patches, each a known bug or
an interface gap, not a speed change:
- rope_theta: `Attention.block` calls `apply_rope` without the config's rope_theta, so every model
  rotates with tunix's default base 1e6 (SmolLM2 uses 1e5): patched to pass the config's value.
- prompts: `Sampler.tokenize` is replaced by a lookup of the given token ids (no BOS added), so tunix
  decodes the same ids as the other systems.
- padding: the `Sampler` finds padding by value (`tokens != pad_id`, in the prompt and in the decode
  mask), and a Hugging Face tokenizer's pad id is often a real token: SmolLM2's is `<|im_end|>` (id 2),
  which every chat prompt holds twice, so tunix hid those tokens from attention and shifted the
  positions after them (its greedy tokens differed from torch's on 6/6 prompts). Patched to pad with
  -1, which no token has.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time


def _effjax(args):
  """Engines for float32 with fused projections ("f32"), float32 with separate ones ("f32-unfused")
  and weight-only int8 ("int8"), all from the same weights, plus the floors engine.py reports."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from effjax.checkpoints.assemble import assemble, checkpoint_tensors, quantize_model
  from effjax.checkpoints.registry import load_model
  from effjax.decoding.engine import Engine
  from effjax.models import quant

  loaded = load_model(args.hf_dir)
  cfg = loaded.model.cfg
  models = {
      "f32": loaded.model,
      "f32-unfused": assemble(cfg.replace(fused_projections=False), checkpoint_tensors(loaded.model),
                              source=args.hf_dir),
      "int8": quantize_model(loaded.model),
  }
  engines = {k: Engine(m, cache_len=args.cache_len, eos_ids=[]) for k, m in models.items()}

  def generate(variant, rows, new):
    t = time.perf_counter()
    res = engines[variant].generate(rows, max_new_tokens=new)
    total = time.perf_counter() - t
    return {"tokens": res.tokens, "s": total, "prefill_s": res.prefill_s, "decode_s": res.decode_s}

  def weight_matrices(variant):
    """Every weight matrix of the model as [in, out] float or [out, in] int8 (the model's own
    arrays, reshaped without copying)."""
    params = nnx_state(models[variant])
    out = []
    for name, value in params.items():
      if value.ndim < 2:
        continue
      if value.dtype == jnp.int8:
        out.append(value.reshape(-1, value.shape[-1]))
      elif name in ("embed", "lm_head") or name.endswith("kernel"):
        out.append(value.reshape(value.shape[0], -1))
    return out

  def floor(variant):
    """The bare XLA matrix-vector products over every weight matrix of the variant, best of 10:
    what one token costs if nothing but the weights were read. "ms": the products independent
    of each other (XLA may run two at once); "chained_ms": each product's input waits for the
    one before (a scalar of its result is added), as a decode's layers must run them."""
    mats = weight_matrices(variant)
    width = max(max(m.shape) for m in mats)
    x = jnp.ones((1, width), jnp.float32) / width

    def products(chained):
      @jax.jit
      def run(mats, x):
        total = 0.0
        for m in mats:
          v = x + total * 1e-30 if chained else x
          if m.dtype == jnp.int8:
            total = total + quant.matmul(v[:, :m.shape[1]], m, jnp.ones(m.shape[0])).sum()
          else:
            total = total + (v[:, :m.shape[0]] @ m).sum()
        return total
      return run

    def best_ms(fn):
      jax.block_until_ready(fn(mats, x))
      times = []
      for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(fn(mats, x))
        times.append(time.perf_counter() - t)
      return min(times) * 1e3

    return {"ms": best_ms(products(False)), "chained_ms": best_ms(products(True)),
            "bytes": int(sum(m.nbytes for m in mats)),
            "param_bytes": int(sum(v.nbytes for v in nnx_state(models[variant]).values()))}

  def copy_gbs():
    a = np.ones(512 * 2**20 // 8)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
      t = time.perf_counter()
      np.copyto(b, a)
      best = max(best, 2 * a.nbytes / (time.perf_counter() - t))  # read + write
    return {"gbs": best / 1e9}

  return {"generate": generate, "floor": floor, "copy": lambda: copy_gbs(),
          "info": lambda: {"jax": jax.__version__, "device": jax.devices()[0].device_kind}}


def nnx_state(model) -> dict:
  from flax import nnx

  return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def _tunix(args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from transformers import AutoTokenizer
  from tunix.generate import sampler as sampler_lib
  from tunix.models.llama3 import model as model_lib
  from tunix.models.llama3 import params as params_lib

  hf = json.load(open(f"{args.hf_dir}/config.json"))
  cfg = model_lib.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
      hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
      head_dim=hf["hidden_size"] // hf["num_attention_heads"],
      num_kv_heads=hf["num_key_value_heads"],
      rope_theta=hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"],
      norm_eps=hf["rms_norm_eps"], weight_tying=hf["tie_word_embeddings"])
  # Known bug: apply_rope is called without the config's rope_theta (default 1e6).
  model_lib.apply_rope = functools.partial(model_lib.apply_rope, rope_theta=cfg.rope_theta)
  model = params_lib.create_model_from_safe_tensors(args.hf_dir, cfg, dtype=jnp.float32)
  tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
  sampler = sampler_lib.Sampler(model, tokenizer, sampler_lib.CacheConfig(
      cache_size=args.cache_len, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim))
  prompts: dict[str, list[int]] = {}
  sampler.tokenize = lambda key: np.asarray(prompts[key], np.int32)  # the given ids (no BOS added)
  sampler.tokenizer.pad_id = lambda: -1  # known bug: padding is found by value (see above)

  def generate(variant, rows, new):
    keys = []
    for ids in rows:
      keys.append(str(len(prompts)))
      prompts[keys[-1]] = ids
    t = time.perf_counter()
    out = sampler(keys, max_generation_steps=new, eos_tokens=[-1], temperature=0.0)
    total = time.perf_counter() - t
    return {"tokens": [[int(x) for x in row] for row in out.tokens], "s": total}

  return {"generate": generate,
          "info": lambda: {"jax": jax.__version__, "tunix": _version("google-tunix")}}


def _torch(args):
  import torch
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()

  def generate(variant, rows, new):
    (ids,) = rows  # batch 1: no padding question
    x = torch.tensor([ids])
    with torch.inference_mode():
      t = time.perf_counter()
      out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
      total = time.perf_counter() - t
    return {"tokens": [out[0, len(ids):].tolist()], "s": total}

  import transformers
  return {"generate": generate,
          "info": lambda: {"torch": torch.__version__, "transformers": transformers.__version__,
                           "threads": torch.get_num_threads()}}


def _version(dist: str) -> str:
  from importlib.metadata import version
  return version(dist)


SYSTEMS = {"effjax": _effjax, "tunix": _tunix, "torch": _torch}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--system", choices=sorted(SYSTEMS), required=True)
  ap.add_argument("--hf-dir", required=True)
  ap.add_argument("--cache-len", type=int, required=True)
  args = ap.parse_args()
  protocol, sys.stdout = sys.stdout, sys.stderr  # libraries' prints must not mix with replies
  t = time.perf_counter()
  ops = SYSTEMS[args.system](args)
  reply = lambda obj: print(json.dumps(obj), file=protocol, flush=True)
  reply({"ready": args.system, "load_s": time.perf_counter() - t, **ops["info"]()})
  for line in sys.stdin:
    req = json.loads(line)
    op = req.pop("op")
    if op == "quit":
      return
    reply(ops[op](**req))


if __name__ == "__main__":
  main()
