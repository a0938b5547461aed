"""Test set-up: a fake 8-device CPU platform. (Matmul precision is the model's own choice: float32
models ask for float32 products themselves, see effjax.models.transformer.precision.)"""

import os

# Must happen before jax starts: tests build (data, fsdp, tensor) meshes over 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
