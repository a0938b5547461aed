"""Accelerators a plan is made for: published per-chip figures and the TPU slice names.

Peak compute, HBM capacity and bandwidth per chip are the figures the Cloud TPU documentation
publishes (the "System architecture" table of each version's page; retrieved 2026-12). HBM is
counted in the unit the page gives it: GB = 1e9 bytes for v5e, v5p and v6e (a conservative budget
where the chip holds GiB), GiB for v4. A JAX device is one chip on all of them (v4 and v5p join
their two TensorCores into one device).

Slices: a Cloud TPU accelerator type (what `gcloud ... --accelerator-type` and launch/tpu_vm.sh take:
v5litepod-64, v5p-32, v6e-16, v4-32) or a topology (what libtpu's compile-only topologies take:
v5e:8x8, v5p:2x2x4). v5p-N and v4-N count TensorCores (N / 2 chips), v5litepod-N and v6e-N chips.
"""

from __future__ import annotations

import dataclasses
import math
import os

GB = 10 ** 9
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # as in topology names: v5e, v5p, v6e, v4; or cpu
  device_kind: str  # what jax's Device.device_kind says
  peak_flops: float  # bf16 FLOP/s per chip
  hbm_bytes: float  # memory per chip
  hbm_bandwidth: float  # bytes/s per chip
  software_version: str = ""  # Cloud TPU VM runtime version for launch/tpu_vm.sh --version
  slice_prefix: str = ""  # accelerator type prefix: v5litepod, v5p, v6e, v4
  cores_per_chip: int = 1  # TensorCores counted in the accelerator type's number


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * GiB, 1200 * GB, "tpu-ubuntu2204-base", "v4", 2),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * GB, 819 * GB, "v2-alpha-tpuv5-lite", "v5litepod"),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * GB, 2765 * GB, "v2-alpha-tpuv5", "v5p", 2),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * GB, 1638 * GB, "v2-alpha-tpuv6e", "v6e"),
}

# Chips per slice -> topology for the 2D-torus chips (v5e, v6e); 3D chips list theirs below.
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
       512: "8x8x8"}


def cpu_chip() -> Chip:
  """This host as the 'chip' of a CPU mesh: ARCHITECTURE.md's measured float32 matmul rate and
  memory copy bandwidth, and the machine's RAM (shared by all its CPU devices)."""
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return Chip("cpu", "cpu", 125e9, float(ram), 22 * GB)


@dataclasses.dataclass(frozen=True)
class Slice:
  chip: Chip
  topology: str  # e.g. "8x8"; "" for a CPU mesh
  chips: int

  @property
  def topology_name(self) -> str:
    """The name libtpu's compile-only topologies take, e.g. 'v5e:8x8'."""
    return f"{self.chip.name}:{self.topology}"

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU accelerator type, e.g. 'v5litepod-64'."""
    return f"{self.chip.slice_prefix}-{self.chips * self.chip.cores_per_chip}"


def parse_slice(text: str) -> Slice:
  """'v5e:8x8', 'v5litepod-64', 'v5p-32', 'v5p:2x2x4', or 'cpu' -> Slice."""
  text = text.strip().lower()
  if text == "cpu":
    return Slice(cpu_chip(), "", 0)
  if ":" in text:
    name, _, topo = text.partition(":")
    if name not in CHIPS:
      raise ValueError(f"unknown TPU {name!r} in {text!r}; known: {', '.join(CHIPS)}")
    dims = topo.split("x")
    if not all(d.isdigit() and int(d) > 0 for d in dims) or len(dims) not in (2, 3):
      raise ValueError(f"bad topology {text!r}; expected e.g. v5e:8x8 or v5p:2x2x4")
    return Slice(CHIPS[name], topo, math.prod(int(d) for d in dims))
  prefix, _, count = text.rpartition("-")
  chip = next((c for c in CHIPS.values() if c.slice_prefix == prefix), None)
  if chip is None or not count.isdigit():
    raise ValueError(f"unknown slice {text!r}; give an accelerator type (v5litepod-64, v5p-32, "
                     f"v6e-16, v4-32), a topology (v5e:8x8, v5p:2x2x4) or 'cpu'")
  chips, rem = divmod(int(count), chip.cores_per_chip)
  table = _3D if chip.name in ("v4", "v5p") else _2D
  if rem or chips not in table:
    raise ValueError(f"no topology known for {text!r}; known sizes: "
                     + ", ".join(f"{chip.slice_prefix}-{n * chip.cores_per_chip}" for n in table))
  return Slice(chip, table[chips], chips)
