"""Hand-written Pallas kernels for the few places XLA's fusions leave latency on the table."""

import contextlib

import jax


def lower_for_cuda(fn, *args, device_kind: str = "NVIDIA H200"):
  """`jax.jit(fn)` lowered for CUDA on a machine without a GPU (the kernels' lowering tests,
  bench/triton_sm90.py). From jax 0.11 Pallas' Triton lowering asks the device for its compute
  capability and fails without one; an abstract device of `device_kind` (sm_90) stands in. jax
  0.10 ignores it (it assumed sm_90)."""
  try:
    from jax._src.mesh import AbstractDevice, AbstractMesh  # private: its place may change
    scope = jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=AbstractDevice(device_kind, 1, "cuda")))
  except (ImportError, AttributeError, TypeError):
    scope = contextlib.nullcontext()
  with scope:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
