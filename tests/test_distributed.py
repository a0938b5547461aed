"""Two CPU processes joined by jax.distributed generate what one process generates."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from effjax.decoding.engine import Engine

HERE = Path(__file__).parent
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 30], [8], [9, 10, 77, 12]]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_generation_equals_single_process():
  sys.path.insert(0, str(HERE))
  from dist_worker import model

  want = Engine(model(), cache_len=48).generate(PROMPTS, max_new_tokens=8).tokens
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    env["JAX_PLATFORMS"] = "cpu"
    procs.append(subprocess.Popen([sys.executable, str(HERE / "dist_worker.py"), json.dumps(PROMPTS)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  results = [json.loads(line.split(" ", 2)[2]) for out in outs for line in out.splitlines()
             if line.startswith("RESULT")]
  assert len(results) == 2
  assert results[0] == results[1] == want
  assert len({tuple(t) for t in want}) > 1 and any(len(set(t)) > 1 for t in want)
