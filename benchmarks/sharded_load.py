"""Loading SmolLM2 into shards on the fake 8-device CPU mesh: peak host memory and the most bytes
any device holds while loading, before and after loading straight into shards.

    python benchmarks/sharded_load.py [--model smollm2-135m-instruct] [--mesh data=1,fsdp=2,tensor=4]
                                      [--out BENCHMARKS.md]

Each case runs in its own process (XLA_FLAGS=--xla_force_host_platform_device_count=8):
- GGUF, before: every tensor placed as effjax did before (`jnp.asarray` puts the whole tensor on
  device 0, then `device_put` splits it), substituted for `assemble.place`;
- GGUF, after: `assemble.place` (`jax.make_array_from_callback`: each device receives its shard);
- cache, Orbax: the parameters restored from an Orbax checkpoint (the previous cache format);
- cache, safetensors: the memory-mapped parameter file (the cache format now).
Device bytes are counted from the live arrays (each device's shards) after every placement, so
the whole tensor a placement puts on device 0 is seen; peak host memory is the process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from report import write_section  # noqa: E402

HEADING = "## Sharded loading (benchmarks/sharded_load.py)"
CASES = ("gguf-before", "gguf-after", "cache-orbax", "cache-safetensors")


def device_bytes() -> Counter:
  import jax
  import numpy as np

  used: Counter = Counter()
  for a in jax.live_arrays():
    shard = int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
    for d in a.sharding.device_set:
      used[d.id] += shard
  return used


def child(case: str, model: str, mesh_spec: str, orbax_dir: str) -> dict:
  import jax
  import jax.numpy as jnp

  from effjax.checkpoints import assemble, checkpoint_dir, param_file
  from effjax.checkpoints.gguf_reader import load_gguf
  from effjax.checkpoints.registry import MODELS
  from effjax.models.sharding import parse_mesh

  mesh = parse_mesh(mesh_spec)
  peak: Counter = Counter()

  def note():
    for d, b in device_bytes().items():
      peak[d] = max(peak[d], b)

  def before(host, dtype, sharding):  # effjax's placement before this change
    value = jnp.asarray(host, dtype=dtype)
    note()
    return jax.device_put(value, sharding)

  def counted(place):
    def wrapper(host, dtype, sharding):
      out = place(host, dtype, sharding)
      note()
      return out
    return wrapper

  place = before if case == "gguf-before" else assemble.place
  assemble.place = param_file.place = counted(place)
  if case.startswith("gguf"):
    loaded = load_gguf(MODELS[model].gguf_path(), mesh=mesh)
  else:
    loaded = checkpoint_dir.restore_checkpoint(
        MODELS[model].cache_dir if case == "cache-safetensors" else orbax_dir, mesh=mesh)
  note()
  final = device_bytes()  # while `loaded` holds the parameters
  del loaded
  return dict(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              peak_device0_mb=peak[0] / 2**20,
              peak_other_mb=max(b for d, b in peak.items() if d != 0) / 2**20,
              final_per_device_mb=max(final.values()) / 2**20)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--mesh", default="data=1,fsdp=2,tensor=4")
  ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
  ap.add_argument("--child", nargs=2, metavar=("CASE", "ORBAX_DIR"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(child(args.child[0], args.model, args.mesh, args.child[1])))
    return

  from effjax.checkpoints.checkpoint_dir import save_checkpoint
  from effjax.checkpoints.registry import load_model

  loaded = load_model(args.model)  # the cache holds the safetensors file
  tmp = tempfile.mkdtemp(prefix="effjax-sharded-load-")
  orbax_dir = save_checkpoint(Path(tmp) / "orbax", loaded.cfg, loaded.model, loaded.tokenizer,
                              params="orbax")
  del loaded
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  results = {}
  for case in CASES:
    proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--mesh", args.mesh,
                           "--child", case, str(orbax_dir)], env=env, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"{case} failed:\n{proc.stderr[-3000:]}")
    results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(case, results[case], flush=True)
  rows = [f"| {case} | {r['peak_rss_mb']:.0f} | {r['peak_device0_mb']:.0f} | "
          f"{r['peak_other_mb']:.0f} | {r['final_per_device_mb']:.0f} |"
          for case, r in results.items()]
  import jax
  body = "\n".join([
      f"Measured {datetime.date.today().isoformat()} on {platform.machine()}, jax {jax.__version__}, "
      f"{args.model} float32 on the fake 8-device CPU mesh `{args.mesh}`. Command:",
      "",
      "    " + " ".join(["python benchmarks/sharded_load.py", *sys.argv[1:]]),
      "",
      "| load | peak host RSS (MB) | peak device 0 (MB) | peak other device (MB) | "
      "per device after (MB) |",
      "|---|---|---|---|---|",
      *rows,
      "",
      "gguf-before places each tensor as effjax did before (whole on device 0, then split); "
      "gguf-after gives each device only its shard; cache-orbax and cache-safetensors restore the "
      "converted model from the previous (Orbax) and current (memory-mapped safetensors) cache "
      "formats. Device bytes are summed over live arrays after every placement.",
  ])
  write_section(Path(args.out), HEADING, body)
  print(body)


if __name__ == "__main__":
  main()
