"""effjax: efficient LLM techniques (online RLHF, ReBalance, ESP) in JAX/Flax."""

import glob as _glob
import importlib.util as _util
import os as _os

__version__ = "0.1.0"


def _keep_jax_off_absent_tpus() -> None:
  """With libtpu installed (the `tpu` extra: `effjax plan` compiles for TPU topologies on any host)
  but no TPU attached, JAX would still try libtpu as a backend at start-up: it fails, falls back to
  the CPU, and costs ~200 MB per process, libtpu's start-up errors on stderr and its lock file.
  Skip that attempt, unless the user chose platforms or this host has a TPU or GPU plugin."""
  if _os.environ.get("JAX_PLATFORMS"):
    return
  if _util.find_spec("libtpu") is None and not _os.environ.get("TPU_LIBRARY_PATH"):
    return
  if _glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/[0-9]*"):
    return  # TPU device files (v4: accel, v5e and later: vfio)
  if any(_util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                                      "jax_rocm7_plugin")):
    return
  _os.environ["JAX_PLATFORMS"] = "cpu"


_keep_jax_off_absent_tpus()
