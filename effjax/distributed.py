"""Multi-process start-up: one call that is a no-op on a single host."""

from __future__ import annotations

import os

import jax

_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _multi_host_tpu() -> bool:
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize() -> bool:
  """Call jax.distributed.initialize() when this process is one of several, else do nothing.

  Several processes means: a Cloud TPU VM slice with more than one worker (auto-detected by JAX),
  or an explicit coordinator (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), e.g.
  for GPUs across hosts or a multi-process CPU test. Returns whether it initialized.
  """
  explicit = any(os.environ.get(v) for v in _COORDINATOR_VARS)
  if not (explicit or _multi_host_tpu()):
    return False
  if jax.distributed.is_initialized():
    return True
  if explicit:
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ["COORDINATOR_ADDRESS"]
    # Only affects the CPU backend (multi-process CPU runs and tests); must precede backend start.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=addr,
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
  return True
