"""Test set-up: a fake 8-device CPU platform, float32 matmuls at full precision."""

import os

# Must happen before jax starts: tests build (data, fsdp, tensor) meshes over 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
