"""Multi-process start-up: for each environment JAX detects (simulated through the variables and
metadata JAX itself reads) the right jax.distributed.initialize call is made, and two CPU processes
joined by jax.distributed generate what one process generates."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jax
import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster

from effjax import distributed
from effjax.cli import main
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


# The variables JAX's cluster detectors read; each test starts with none of them set.
CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS",
                "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID", "KUBERNETES_SERVICE_HOST",
                "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "GCE_METADATA_IP",
                "TPU_SKIP_MDS_QUERY")


@pytest.fixture
def calls(monkeypatch):
  """The jax.distributed.initialize calls made (recorded, not run), in a clean environment."""
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  made = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: made.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  return made


@pytest.fixture
def tpu_vm(monkeypatch):
  """A Cloud TPU VM as JAX sees one: libtpu found TPU chips, and a metadata server (served here)
  answers with this worker's number, the slice's workers and its tpu-env."""
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  attributes = {}

  class Metadata(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      key = self.path.rsplit("/", 1)[-1]
      ok = self.headers.get("Metadata-Flavor") == "Google" and key in attributes
      body = attributes.get(key, "").encode()
      self.send_response(200 if ok else 404)
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_port}")
  yield attributes
  server.shutdown()


def jax_would_use():
  """What jax.distributed.initialize() with no arguments fills in here (its own detection)."""
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 5)[:3]


def test_no_cluster_starts_nothing(calls):
  assert distributed.detected_cluster() is None
  assert distributed.maybe_initialize() is False and calls == []


def test_cloud_tpu_vm_slice_is_found_from_its_metadata(calls, tpu_vm):
  # What `launch/tpu_vm.sh create` makes: no TPU_WORKER_HOSTNAMES, only the VM's metadata.
  tpu_vm.update({"agent-worker-number": "1", "tpu-env": "ACCELERATOR_TYPE: 'v5litepod-16'",
                 "worker-network-endpoints": "w-0:0:10.0.0.5,w-1:1:10.0.0.6"})
  assert distributed.detected_cluster() == ("GceTpuCluster", 2)
  assert distributed.maybe_initialize() is True and calls == [{}]  # JAX fills in the rest
  assert jax_would_use() == ("10.0.0.5:8482", 2, 1)


def test_single_host_tpu_vm_starts_nothing(calls, tpu_vm):
  tpu_vm.update({"agent-worker-number": "0", "worker-network-endpoints": "w-0:0:10.0.0.5",
                 "tpu-env": ""})
  assert distributed.detected_cluster() == ("GceTpuCluster", 1)
  assert distributed.maybe_initialize() is False and calls == []


def test_gke_tpu_pod_from_its_variables(calls, tpu_vm, monkeypatch):
  tpu_vm["tpu-env"] = ""  # one slice (JAX looks for MEGASCALE_NUM_SLICES there)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.1.1,10.0.1.2,10.0.1.3,10.0.1.4")
  monkeypatch.setenv("TPU_WORKER_ID", "3")
  assert distributed.detected_cluster() == ("GkeTpuCluster", 4)
  assert distributed.maybe_initialize() is True and calls == [{}]
  assert jax_would_use() == ("10.0.1.1:8482", 4, 3)


def test_slurm_job(calls, monkeypatch):
  for var, value in {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu-[3-4]", "SLURM_NTASKS": "2",
                     "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
    monkeypatch.setenv(var, value)
  assert distributed.detected_cluster() == ("SlurmCluster", 2)
  assert distributed.maybe_initialize() is True and calls == [{}]
  address, count, pid = jax_would_use()
  assert address.startswith("gpu-3:") and (count, pid) == (2, 1)


def test_explicit_settings_from_variables_or_flags(calls, monkeypatch, capsys):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.9:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  assert distributed.maybe_initialize() is True
  assert calls == [dict(coordinator_address="10.0.0.9:1234", num_processes=4, process_id=2)]
  calls.clear()
  assert distributed.maybe_initialize("10.0.0.8:99", 2, 0) is True  # flags win
  assert calls == [dict(coordinator_address="10.0.0.8:99", num_processes=2, process_id=0)]
  monkeypatch.delenv("JAX_PROCESS_ID")
  with pytest.raises(ValueError, match=r"incomplete: no process id \(JAX_PROCESS_ID\)"):
    distributed.maybe_initialize()
  with pytest.raises(ValueError, match=r"process id 5 is not in \[0, 4\)"):
    distributed.maybe_initialize(process_id=5)


def test_every_command_starts_up_first(calls, capsys):
  """The `effjax` command joins the other processes before any command runs, with its flags."""
  argv = ["--coordinator", "10.0.0.8:99", "--num-processes", "2", "--process-id", "1"]
  assert main([*argv, "data", "inspect", "sample:gsm8k", "--limit", "1", "--show", "0"]) == 0
  assert main([*argv, "rlhf", "plot", "no-such-run"]) == 2  # rlhf too (then fails on its input)
  assert calls == [dict(coordinator_address="10.0.0.8:99", num_processes=2, process_id=1)] * 2
  assert main(["--coordinator", "10.0.0.8:99", "models"]) == 2
  assert "incomplete" in capsys.readouterr().err
