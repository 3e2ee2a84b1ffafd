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


def test_rollout_count_equals_traced_prefill_and_decode_step():
  from lgrpo_jax.models.qwen2_5_vl.flops import matmul_flops, rollout_matmuls
  model = lgrpo_jax.from_config(config_dict("a"))
  batch = ours_inputs(make_batch(CASES["left_padded_batch"]))
  grid = tuple(map(tuple, batch["image_grid_thw"].tolist()))
  b, p = batch["input_ids"].shape
  g, n = 3, 5
  graphdef, state = nnx.split(model)

  def prefill(st, ids, mask, pixels):
    m = nnx.merge(graphdef, st)
    pos, _ = lgrpo_jax.get_rope_index(ids, mask, grid, m.config)
    h, k, v = m.prefill(m.embed(ids, m.image_features(pixels, grid)), pos, mask)
    return m.logits(h[:, -1:]), k, v

  args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
  pre_jaxpr = jax.make_jaxpr(prefill)(state, *args)
  _, k, v = jax.eval_shape(prefill, state, *args)
  cache = jax.eval_shape(lambda k, v: model.new_cache(k, v, batch["attention_mask"], g, n), k, v)

  def step(st, tok, cache):
    m = nnx.merge(graphdef, st)
    h, cache = m.decode_step(m.embed(tok), jax.numpy.zeros((b, g), int), cache, 2)
    return m.logits(h)

  step_jaxpr = jax.make_jaxpr(step)(state, jax.ShapeDtypeStruct((b, g), np.int32), cache)
  counted = lambda new: matmul_flops(rollout_matmuls(model.config, b, p, grid, g, new))
  assert counted(1) == dot_flops(pre_jaxpr.jaxpr)
  assert counted(n) - counted(1) == (n - 1) * dot_flops(step_jaxpr.jaxpr)


def test_extend_count_equals_traced_extend():
  """The continuation pass that the listener and the policy log-probs run (G chunks over a cached
  prefix) is counted as traced; `grpo_step_flops` sums these counted pieces."""
  from lgrpo_jax.models.qwen2_5_vl.flops import (extend_matmuls, grpo_step_flops, matmul_flops,
                                                 rollout_matmuls, text_matmuls)
  model = lgrpo_jax.from_config(config_dict("b"))
  b, p, g, c = 2, 7, 3, 5
  e = model.config.text.hidden_size
  l, kv, d = model.config.text.num_hidden_layers, model.config.text.num_key_value_heads, model.config.text.head_dim
  graphdef, state = nnx.split(model)

  def ext(st, x, pos, valid, k, v, mask):
    return nnx.merge(graphdef, st).extend(x, pos, valid, k, v, mask)

  S = jax.ShapeDtypeStruct
  jaxpr = jax.make_jaxpr(ext)(state, S((b, g, c, e), np.float32), S((b, g, c), np.int32), S((b, g, c), bool),
                              S((l, b, p, kv, d), np.float32), S((l, b, p, kv, d), np.float32),
                              S((b, p), np.int32))
  assert matmul_flops(extend_matmuls(model.config, b, p, g, c, lm_head=False)) == dot_flops(jaxpr.jaxpr)
  # The step's count grows with every optional pass.
  base = dict(listener_len=9, listener_suffix=4)
  one = grpo_step_flops(model.config, b, p, (), g, c, **base)
  policy = matmul_flops(extend_matmuls(model.config, b, p, g, c, lm_head=True)
                        + text_matmuls(model.config, b, p, lm_head=False))
  assert grpo_step_flops(model.config, b, p, (), g, c, passes=2, **base) - one == 3 * policy
  assert grpo_step_flops(model.config, b, p, (), g, c, reference=True, **base) - one == policy
  assert one > matmul_flops(rollout_matmuls(model.config, b, p, (), g, c)) + 3 * policy
  # A listener that is the reference model shares their vision pass: one fewer, and only then.
  from lgrpo_jax.models.qwen2_5_vl.flops import vision_matmuls
  grid = ((1, 4, 4), (1, 4, 8)) * b
  vis = matmul_flops(vision_matmuls(model.config, grid))
  both = grpo_step_flops(model.config, b, p, grid, g, c, reference=True, **base)
  assert vis > 0 and both - grpo_step_flops(model.config, b, p, grid, g, c, reference=True,
                                            shared_frozen_vision=True, **base) == vis
  assert grpo_step_flops(model.config, b, p, grid, g, c, shared_frozen_vision=True, **base) == grpo_step_flops(
      model.config, b, p, grid, g, c, **base)  # β = 0: no reference pass, nothing shared
  # Rows that all stop early shorten the decode loop only: every later pass runs the full width N.
  rollout = lambda *k: matmul_flops(rollout_matmuls(model.config, b, p, grid, g, c, *k))
  assert grpo_step_flops(model.config, b, p, grid, g, c, **base) - grpo_step_flops(
      model.config, b, p, grid, g, c, decode_steps=2, **base) == rollout() - rollout(2) > 0
  # The image features are reused, not recomputed: by the passes when the tower is frozen, by the
  # recomputed old log-probs always.
  text = policy
  assert grpo_step_flops(model.config, b, p, grid, g, c, passes=2, **base) - grpo_step_flops(
      model.config, b, p, grid, g, c, passes=2, frozen_vision=True, **base) == 6 * vis
  assert grpo_step_flops(model.config, b, p, grid, g, c, recompute_old=True, **base) - grpo_step_flops(
      model.config, b, p, grid, g, c, **base) == text
  # A listener of other sizes (the paper's 7B beside a smaller policy) is counted with its own.
  import dataclasses
  deeper = model.config.replace(text=dataclasses.replace(model.config.text, num_hidden_layers=4))
  more = grpo_step_flops(model.config, b, p, grid, g, c, listener_cfg=deeper, **base)
  assert more - grpo_step_flops(model.config, b, p, grid, g, c, **base) == matmul_flops(
      text_matmuls(deeper, b, 9, lm_head=False) + extend_matmuls(deeper, b, 9, g, c + 4, lm_head=False)) - matmul_flops(
      text_matmuls(model.config, b, 9, lm_head=False) + extend_matmuls(model.config, b, 9, g, c + 4, lm_head=False)) > 0
