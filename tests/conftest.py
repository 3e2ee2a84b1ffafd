import os

# Multi-device logic is tested on CPU with 8 simulated devices: must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


def shared_dir() -> str:
  """The project's shared/ folder (real data): $LGRPO_SHARED, else beside the repository."""
  path = os.environ.get("LGRPO_SHARED") or os.path.join(os.path.dirname(__file__), "..", "..", "shared")
  if not os.path.isdir(os.path.join(path, "data")):
    raise FileNotFoundError(f"shared data not found at {os.path.abspath(path)}: CI places shared/ beside "
                            "the repository; elsewhere set LGRPO_SHARED")
  return path
