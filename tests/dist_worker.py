"""One process of the two-process CPU test (tests/test_distributed.py): prints its generation."""

import json
import os
import sys

from effjax.models import create_model, tiny_config


def model():
  m = create_model(tiny_config("llama"), seed=3)
  m.embed.set_value(m.embed.get_value() * 0.2)  # a head soft enough for varied tokens
  return m


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  from effjax.distributed import maybe_initialize

  assert maybe_initialize(), "expected the coordinator environment"
  import jax

  from effjax.decoding.engine import Engine
  from effjax.models import make_mesh

  mesh = make_mesh(data=2, fsdp=2, tensor=1)  # spans both processes' devices
  res = Engine(model(), cache_len=48, mesh=mesh).generate(json.loads(sys.argv[1]), max_new_tokens=8)
  print("RESULT", jax.process_index(), json.dumps(res.tokens), flush=True)
