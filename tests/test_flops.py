"""The counted forward FLOPs equal the dot_general FLOPs in the traced program (walked independently
through the jaxpr, scan bodies multiplied by their trip counts)."""

import math

import jax
import jax.extend
import numpy as np
import pytest
from flax import nnx

import lgrpo_jax
from lgrpo_jax.models.qwen2_5_vl.flops import forward_flops
from hf_tiny import CASES, config_dict, make_batch, ours_inputs


def dot_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lc, _), (lb, _) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      out = eqn.outvars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(lhs[i] for i in lc)
    n = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for sub in sub_jaxprs(eqn.params):
      total += n * dot_flops(sub)
  return total


def sub_jaxprs(params):
  for v in params.values():
    for item in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


@pytest.mark.parametrize("variant", ["a", "b"])
@pytest.mark.parametrize("case", ["text_only", "two_images_sizes", "left_padded_batch"])
def test_counted_flops_equal_traced_dots(variant, case):
  model = lgrpo_jax.from_config(config_dict(variant))
  batch = ours_inputs(make_batch(CASES[case]))
  grid = tuple(map(tuple, batch.get("image_grid_thw", np.zeros((0, 3), int)).tolist()))
  graphdef, state = nnx.split(model)
  args = {k: v for k, v in batch.items() if k != "image_grid_thw"}
  jaxpr = jax.make_jaxpr(lambda st, a: nnx.merge(graphdef, st)(**a, image_grid_thw=grid or None))(
      state, args)
  b, t = batch["input_ids"].shape
  assert forward_flops(model.config, b, t, grid) == dot_flops(jaxpr.jaxpr)
