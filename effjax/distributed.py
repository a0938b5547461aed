"""Multi-process start-up, called once by every `effjax` command before it touches a device.

Two ways in, as JAX intends:
- A cluster JAX knows: a Cloud TPU VM slice (found from the VM's metadata server), a GKE TPU pod
  (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES), SLURM, Open MPI, Kubernetes. JAX's own detectors
  (jax._src.clusters) decide; when one finds more than one process, `jax.distributed.initialize()`
  is called with no arguments and JAX fills in the coordinator, the process count and this
  process's id from the same source.
- Explicit settings for anything else (GPUs over ssh, several CPU processes): a coordinator address,
  the process count and this process's id, from `effjax --coordinator --num-processes --process-id`
  or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
One process (a laptop, one GPU, a single-host TPU VM) starts nothing.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Explicit:
  coordinator: str  # host:port of process 0
  num_processes: int
  process_id: int

  def __post_init__(self):
    if ":" not in self.coordinator:
      raise ValueError(f"coordinator {self.coordinator!r} must be HOST:PORT")
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"process id {self.process_id} is not in [0, {self.num_processes})")


def explicit_settings(coordinator: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None) -> Explicit | None:
  """The explicit settings, from the arguments or else the JAX_* variables; None when none given."""
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
  given = {"coordinator (JAX_COORDINATOR_ADDRESS)": coordinator,
           "process count (JAX_NUM_PROCESSES)": num, "process id (JAX_PROCESS_ID)": pid}
  if all(v is None or v == "" for v in given.values()):
    return None
  missing = [name for name, v in given.items() if v is None or v == ""]
  if missing:
    raise ValueError(f"multi-process settings are incomplete: no {', '.join(missing)}")
  try:
    return Explicit(str(coordinator), int(num), int(pid))
  except ValueError as e:
    raise ValueError(f"multi-process settings: {e}") from None


def detected_cluster() -> tuple[str, int] | None:
  """(name, process count) of the cluster JAX's detectors find, as `jax.distributed.initialize()`
  would pick it (the first present one that is not opt-in); None outside any cluster."""
  from jax._src import clusters  # JAX's detectors: the ones jax.distributed.initialize() runs

  for env in clusters.ClusterEnv._cluster_types:
    if not env.opt_in_only_method and env.is_env_present():
      return env.__name__, env.get_process_count()
  return None


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Join this process to the others of a multi-process run (once); a no-op for a single process.
  Returns whether JAX's distributed system is up."""
  import jax

  if jax.distributed.is_initialized():
    return True
  explicit = explicit_settings(coordinator, num_processes, process_id)
  if explicit is not None:
    # Only affects the CPU backend (multi-process CPU runs and tests); must precede backend start.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=explicit.coordinator,
                               num_processes=explicit.num_processes,
                               process_id=explicit.process_id)
    return True
  cluster = detected_cluster()
  if cluster is None or cluster[1] < 2:
    return False
  jax.distributed.initialize()
  return True
