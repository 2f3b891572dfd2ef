"""Test-wide setup: eight simulated CPU devices, so sharded runs can be compared in-process."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
