"""Experiment (not a test, not a benchmark): can the tiny model be warm-started on the synthetic task
so that GRPO then lifts held-out accuracy? Used to design the embedded demo (issue 7).

  .venv/bin/python docs/experiments/demo_warmstart.py P_FINAL SFT_STEPS SFT_LR GRPO_STEPS GRPO_LR

SFT with a scripted teacher "<think>Image 1 is <colour>. Image 2 is <colour>.</think><answer>Image k</answer>"
(descriptions always right; the answer right with probability 1.0 for the first SFT_STEPS − 150 steps,
then P_FINAL), a greedy both-orders evaluation on 32 held-out pairs, then GRPO with the Trainer
(format + 0.5 accuracy + 0.5 listener, the listener = the SFT'd model, frozen). Results so far are in
docs/training.md.
"""
import dataclasses
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from transformers import AutoTokenizer
import lgrpo_jax
from lgrpo_jax.data import ImageConfig
from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
from lgrpo_jax.data.synthetic import synthetic, pair_attributes
from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
from lgrpo_jax.train.sft import make_sft_step, target_tokens
from lgrpo_jax.train.loop import to_device, pair_grid_of
from lgrpo_jax.train.evaluation import Evaluator
from lgrpo_jax.train.step import Tables
from lgrpo_jax.rewards import ByteTable
from lgrpo_jax.sampling import SamplingConfig
from lgrpo_jax.listener import ListenerSpec

SEED, NW, SIZE = 0, 3, 56
P_TEACHER = float(sys.argv[1]) if len(sys.argv) > 1 else 0.6
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 300
tok_dir = build_tiny_tokenizer(tempfile.mkdtemp())
tok = AutoTokenizer.from_pretrained(tok_dir)
model = lgrpo_jax.from_config(tiny_model_config(tok_dir))
graphdef, params = nnx.split(model, nnx.Param)
pipe = PipelineConfig(global_batch=16, seed=SEED, image=ImageConfig(min_pixels=SIZE*SIZE, max_pixels=SIZE*SIZE), length_buckets=(256,))
pairs = list(synthetic(2000, seed=SEED, n_wrong=NW, image_size=SIZE))
idx = {p.pair_id: i for i, p in enumerate(pairs)}
rng = np.random.default_rng(1)
def teacher(host, p):
  texts = []
  for pid, label in zip(host["pair_ids"], host["labels"]):
    good, bad = pair_attributes(idx[pid], SEED, NW)
    shown = [good, bad] if label == 0 else [bad, good]
    k = label + 1 if rng.random() < p else 2 - label
    texts.append(f"<think>Image 1 is {shown[0]['colour']}. Image 2 is {shown[1]['colour']}.</think><answer>Image {k}</answer><|im_end|>")
  return texts
tx = optax.adamw(float(sys.argv[3]) if len(sys.argv) > 3 else 3e-3)
opt_state = tx.init(params)
batches = make_batches(pairs, tok, pipe)
first = next(batches)
step = make_sft_step(graphdef, tx, pair_grid_of(first))
t0 = time.time()
host = first
for s in range(STEPS):
  tokens, mask = target_tokens(tok, teacher(host, 1.0 if s < STEPS - 150 else P_TEACHER), 32)
  params, opt_state, loss, _ = step(params, opt_state, to_device(host), jnp.asarray(tokens), jnp.asarray(mask))
  if s % 100 == 0: print(s, float(loss), f"{time.time()-t0:.0f}s", flush=True)
  host = next(batches)
bt = ByteTable.from_tokenizer(tok)
tables = Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths))
ev = Evaluator(list(synthetic(32, seed=SEED + 1000, n_wrong=NW, image_size=SIZE)), tok, pipe,
               SamplingConfig(max_new_tokens=32, eos_ids=(tok.convert_tokens_to_ids("<|im_end|>"),)), graphdef, graphdef,
               ListenerSpec.from_tokenizer(tok), tables)
print('after SFT', ev(params, params), f"{time.time()-t0:.0f}s", flush=True)
# description accuracy: greedy decode and check described colours
from lgrpo_jax.train import Trainer, LoopConfig, StepConfig
from lgrpo_jax.grpo import LossConfig
from lgrpo_jax.grpo.update import OptimConfig
GRPO_STEPS = int(sys.argv[4]) if len(sys.argv) > 4 else 150
LR = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-3
end = tok.convert_tokens_to_ids("<|im_end|>")
policy = nnx.merge(graphdef, params)
run = tempfile.mkdtemp()
step_cfg = StepConfig(sampling=SamplingConfig(max_new_tokens=32, num_samples=8, temperature=1.0, eos_ids=(end,)),
                      loss=LossConfig(beta=0.0), optim=OptimConfig(learning_rate=LR))
t = Trainer(run, policy, tok, pairs, step_cfg, dataclasses.replace(pipe, global_batch=8), LoopConfig(steps=GRPO_STEPS, save_every=10000, eval_every=50, log_every=25),
            eval_pairs=list(synthetic(32, seed=SEED + 1000, n_wrong=NW, image_size=SIZE)))
ms = t.run()
for m in ms:
  if "eval/accuracy" in m: print(m["step"], {k: round(v, 3) for k, v in m.items() if k.startswith("eval/")}, round(m["reward/total"], 3), round(m["accuracy"], 3))
print(f"total {time.time()-t0:.0f}s")
