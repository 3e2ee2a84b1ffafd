"""The listener: the fixed-slot layout with holes equals scoring the contiguous text with
transformers; the answer is really removed; probabilities sum to 1; tags are found on device."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

import lgrpo_jax
from lgrpo_jax.data import process_image
from lgrpo_jax.data.prompts import listener_parts
from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
from lgrpo_jax.listener import ListenerSpec, listener_probs, reasoning_view, score
from lgrpo_jax.models.qwen2_5_vl.layers import static_grid
from lgrpo_jax.parsing import find_first, token_variants
from conftest import shared_dir
from hf_tiny import build_hf, hf_logits

COTS = ["<think>The first image shows a red circle, the second a blue one.</think>",
        "<think>Colours differ.</think>\n",
        "<think>Both are squares but only one is green, which the prompt asks for.</think> "]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def setup(request, tmp_path_factory):
  """Tied and untied heads: the paper's 7B listener has its own lm_head, which the choice-token
  scoring reads row by row."""
  tok_dir = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
  tok = AutoTokenizer.from_pretrained(tok_dir)
  cfg = tiny_model_config(tok_dir)
  cfg["vision_config"].update(window_size=56)  # several (partial) windows per image
  cfg["tie_word_embeddings"] = request.param
  hf = build_hf(cfg, seed=2)
  path = tmp_path_factory.mktemp("listener")
  hf.save_pretrained(path)
  return tok, hf, lgrpo_jax.load_hf(path, dtype="float32"), ListenerSpec.from_tokenizer(tok)


def untied_skip(setup):
  """Tests that do not read the output head run once, with the tied one (CI time)."""
  if setup[2].lm_head is not None:
    pytest.skip("does not depend on the head")


def images(sizes, seed):
  rng = np.random.default_rng(seed)
  from PIL import Image
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def completions(tok, answers, width):
  """(G, width) ids of COT + "<answer>Image k</answer>" + <|im_end|>, right-padded, and lengths."""
  end = tok.convert_tokens_to_ids("<|im_end|>")
  rows = [tok(c, add_special_tokens=False)["input_ids"] + tok(f"<answer>Image {a}</answer>",
                                                              add_special_tokens=False)["input_ids"] + [end]
          for c, a in zip(COTS, answers)]
  out = np.zeros((len(rows), width), np.int32)
  for r, ids in enumerate(rows):
    out[r, :len(ids)] = ids
  return out, np.asarray([len(r) for r in rows], np.int32)


def pair_inputs(tok, batch_sizes, seed=0):
  """Listener prefixes (left-padded) and the images of several pairs."""
  prefixes, pixels, grids = [], [], []
  for k, sizes in enumerate(batch_sizes):
    outs = [process_image(im) for im in images(sizes, seed + k)]
    pixels += [p for p, _ in outs]
    grids += [g for _, g in outs]
    prefixes.append(listener_parts(tok, f"prompt number {k}", [g for _, g in outs])[0])
  width = max(map(len, prefixes)) + 3  # extra left padding on every row
  ids = np.zeros((len(prefixes), width), np.int32)
  mask = np.zeros_like(ids)
  for r, p in enumerate(prefixes):
    ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
  return prefixes, ids, mask, np.concatenate(pixels), static_grid(grids)


def test_slot_layout_equals_contiguous_text_in_transformers(setup):
  tok, hf, model, spec = setup
  sizes = [[(56, 84), (84, 84)], [(112, 56), (56, 56)]]
  prefixes, ids, mask, pixels, grid = pair_inputs(tok, sizes)
  toks, lens = zip(*(completions(tok, ans, 60) for ans in ([1, 2, 1], [2, 2, 1])))
  toks, lens = np.stack(toks), np.stack(lens)
  probs = jax.jit(lambda *a: listener_probs(model, *a[:3], grid, *a[3:], spec))(
      jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), jnp.asarray(toks), jnp.asarray(lens))
  probs = np.asarray(probs)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  seen, kept = (np.asarray(x) for x in reasoning_view(jnp.asarray(toks), jnp.asarray(lens), spec))
  per_img = np.split(pixels, np.cumsum([int(np.prod(g)) for g in grid])[:-1])
  for b in range(2):
    for g in range(3):
      cot = tok(COTS[g], add_special_tokens=False)["input_ids"]
      np.testing.assert_array_equal(seen[b, g][kept[b, g]], cot)  # exactly the reasoning is kept
      seq = np.concatenate([prefixes[b], cot, spec.suffix_ids])[None]
      batch = {"input_ids": seq.astype(np.int64), "attention_mask": np.ones_like(seq, np.int64),
               "mm_token_type_ids": (seq == model.config.image_token_id).astype(np.int64),
               "pixel_values": np.concatenate(per_img[2 * b:2 * b + 2]),
               "image_grid_thw": np.asarray(grid[2 * b:2 * b + 2], np.int64)}
      last = hf_logits(hf, batch)[0, -1, list(spec.choice_ids)].astype(np.float64)
      ref = np.exp(last - last.max()) / np.exp(last - last.max()).sum()
      np.testing.assert_allclose(probs[b, g], ref, atol=1e-5)


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_bf16_choice_logits_are_accumulated_and_returned_in_fp32(setup, prefix_sharing):
  """A bf16 listener's two choice logits come out of an fp32-accumulated product, as the policy's
  logits do: rounded to bf16 they were steps of 0.125 at logits of 16–32 (P(correct) off by ~0.02)."""
  from lgrpo_jax.listener.listener import listener_logits
  from flax import nnx

  from lgrpo_jax.sharding import copy_tree
  tok, _, model, spec = setup
  bf16 = lgrpo_jax.from_config(model.config.replace(dtype="bfloat16", param_dtype="bfloat16"))
  nnx.update(bf16, copy_tree(nnx.state(model, nnx.Param), jnp.bfloat16))
  _, ids, mask, pixels, grid = pair_inputs(tok, [[(56, 84), (84, 84)]])
  toks, lens = completions(tok, [1, 2, 1], 60)
  logits = jax.jit(lambda *a: listener_logits(bf16, *a[:3], grid, *a[3:], spec, prefix_sharing=prefix_sharing))(
      jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), jnp.asarray(toks[None]), jnp.asarray(lens[None]))
  x = np.asarray(logits)
  assert logits.dtype == jnp.float32 and np.isfinite(x).all()
  assert (x != np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))).mean() > 0.5


def test_the_answer_is_removed(setup):
  tok, _, model, spec = setup
  _, ids, mask, pixels, grid = pair_inputs(tok, [[(56, 56), (56, 84)]])
  one, lens = completions(tok, [1, 1, 1], 64)
  two, lens2 = completions(tok, [2, 2, 2], 64)
  assert (one != two).any() and (lens == lens2).all()  # only the answer differs

  programs = {}  # one jitted program per spec (eager, the four calls compiled ~400 small ones)

  def run(toks, s):
    if id(s) not in programs:
      programs[id(s)] = jax.jit(lambda *a: listener_probs(model, *a[:3], grid, *a[3:], s))
    return np.asarray(programs[id(s)](ids, mask, pixels, toks[None], lens[None]))

  np.testing.assert_array_equal(run(one, spec), run(two, spec))
  # Control: without the answer tag the answer is visible and the probabilities move.
  blind = ListenerSpec(spec.suffix_ids, spec.choice_ids, answer_variants=(), drop_ids=spec.drop_ids)
  assert np.abs(run(one, blind) - run(two, blind)).max() > 1e-4


def test_special_tokens_in_the_reasoning_are_not_shown_to_the_listener(setup):
  """A policy can emit special tokens (`<|image_pad|>`, `<|vision_start|>`) inside its reasoning;
  the format parser and the text rewards read them as nothing, and the listener used to read their
  embeddings — a channel no reward saw. Now the completion with them scores bit-identically to the
  one without (the kept tokens are packed to the front: the same text, the same slots; with the
  holes where the tokens were, rounding set them ~1e-7 apart); the control (only end-of-turn dropped, as before) moves them."""
  tok, _, model, spec = setup
  _, ids, mask, pixels, grid = pair_inputs(tok, [[(56, 56), (56, 84)]])
  plain, lens = completions(tok, [1, 2, 1], 64)
  junk = [tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|image_pad|>")]
  assert set(junk) <= set(spec.drop_ids)
  noisy = np.zeros_like(plain)
  for r in range(len(plain)):  # the specials after the reasoning's third token
    row = list(plain[r, :lens[r]])
    noisy[r, :lens[r] + 3] = row[:3] + junk + row[3:]
  run = jax.jit(lambda t, n, s: listener_probs(model, ids, mask, pixels, grid, t[None], n[None], s), static_argnums=2)
  np.testing.assert_array_equal(run(jnp.asarray(plain), jnp.asarray(lens), spec),
                                run(jnp.asarray(noisy), jnp.asarray(lens + 3), spec))
  end_only = ListenerSpec(spec.suffix_ids, spec.choice_ids, spec.answer_variants,
                          tuple(tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")))
  assert np.abs(np.asarray(run(jnp.asarray(plain), jnp.asarray(lens), end_only))
                - np.asarray(run(jnp.asarray(noisy), jnp.asarray(lens + 3), end_only))).max() > 1e-4


def test_score_from_python_on_real_images(setup):
  untied_skip(setup)
  tok, _, model, spec = setup
  root = os.path.join(shared_dir(), "data", "imagereward", "images")
  a, b = (os.path.join(root, f) for f in sorted(os.listdir(root))[:2])
  from lgrpo_jax.data import ImageConfig
  small = ImageConfig(max_pixels=112 * 112)
  cot = "<think>The second one has sharper detail.</think>"
  p = score(model, tok, [("a cat", (a, b), cot + "<answer>Image 1</answer>"),
                         ("a cat", (a, b), cot),
                         ("a cat", (b, a), cot + "<answer>Image 2</answer>")], image=small, spec=spec)
  assert p.shape == (3, 2)
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(p[0], p[1], atol=1e-6)  # the answer is never seen
  assert np.abs(p[0] - p[2]).max() > 1e-4  # the images' order matters


def test_find_first_and_tag_variants(setup):
  untied_skip(setup)
  tok = setup[0]
  variants = token_variants(tok, "<answer>")
  assert variants and all(tok.decode(v.ids).endswith("<answer>") for v in variants)
  merged = [v for v in variants if v.remainder >= 0]
  assert merged and all(tok.decode((v.remainder,)) + "<answer>" == tok.decode(v.ids) for v in merged)
  rows = ["abc <answer>x", "<answer>", "no tag here", "text\n<answer>Image 1"]
  ids = [tok(r, add_special_tokens=False)["input_ids"] for r in rows]
  width = max(map(len, ids)) + 2
  arr = np.zeros((len(rows), width), np.int32)
  for r, x in enumerate(ids):
    arr[r, :len(x)] = x
  lens = np.asarray([len(x) for x in ids], np.int32)
  got = np.asarray(find_first(jnp.asarray(arr), jnp.asarray(lens), variants)[0])
  for r, x in enumerate(ids):
    if "<answer>" not in rows[r]:
      assert got[r] == width
    else:  # decoding from the found token on starts with the tag (a merged context char allowed)
      assert "<answer>" in tok.decode(x[got[r]:])[:10] and "<answer>" not in tok.decode(x[:got[r]])
  # A tag that runs past the row's length is not found.
  assert int(find_first(jnp.asarray(arr[1:2]), jnp.asarray(lens[1:2] - 1), variants)[0][0]) == width


def test_reasoning_reads_as_written_when_the_tag_merges_with_it(setup):
  untied_skip(setup)
  tok, _, _, spec = setup
  for cot in ("<think>ok</think>", "<think>a b.</think>\n", "<think>x</think> "):
    joint = tok(cot + "<answer>Image 2</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    arr = np.asarray([joint + [0] * 3], np.int32)
    seen, keep = reasoning_view(jnp.asarray(arr), jnp.asarray([len(joint)]), spec)
    assert tok.decode(np.asarray(seen)[0][np.asarray(keep)[0]]) == cot


def test_no_spelling_of_the_answer_tag_shows_the_listener_the_answer(setup):
  untied_skip(setup)
  # The sampler may write "<answer>" a character at a time: the parser (on bytes) reads it as the
  # answer, so the listener must not see it — a reward-hacking channel otherwise (an answer the
  # listener can read raises its confidence). `Parsed.answer_token` marks where the text's tag starts.
  from lgrpo_jax.rewards import ByteTable, parse
  tok, _, model, spec = setup
  enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]
  by_char = lambda t: [i for c in t for i in enc(c)]
  end = tok.convert_tokens_to_ids("<|im_end|>")
  cot = "<think>the first image is better</think>"

  def rows_of(k):
    return {"canonical": enc(cot + f"<answer>Image {k}</answer>") + [end],
            "merged": enc(cot + f"\n<answer>Image {k}</answer>") + [end],
            "by character": enc(cot) + by_char("<answer>") + enc(f"Image {k}</answer>") + [end],
            "by character, after text": enc(cot + " ok") + by_char(f"<answer>Image {k}") + enc("</answer>")}

  rows, rows2 = rows_of(1), rows_of(2)
  n = max(map(len, rows.values())) + 2

  def pack(rows):
    out = np.zeros((1, len(rows), n), np.int32)
    for g, ids in enumerate(rows.values()):
      out[0, g, :len(ids)] = ids
    return out

  toks, two = pack(rows), pack(rows2)
  lens = np.asarray([[len(x) for x in rows.values()]], np.int32)
  mask = (np.arange(n) < lens[..., None]).astype(np.int32)
  bt = ByteTable.from_tokenizer(tok)
  parsed = parse(jnp.asarray(toks), jnp.asarray(mask), jnp.asarray(bt.table), jnp.asarray(bt.lengths))
  assert np.asarray(parsed.answer).tolist() == [[1, 1, 1, 1]]
  from lgrpo_jax.rewards.text import answer_token_of  # the host twin `score` uses
  assert [answer_token_of(tok, ids) for ids in rows.values()] == np.asarray(parsed.answer_token)[0].tolist()
  view = lambda at: [tok.decode(np.asarray(s)[m]) for s, m in zip(*(np.asarray(x)[0] for x in reasoning_view(
      jnp.asarray(toks), jnp.asarray(lens), spec, at)))]
  cut, blind = view(parsed.answer_token), view(None)
  assert cut == [cot, cot + "\n", cot, cot + " ok"], cut
  assert blind[:2] == cut[:2] and all("<answer" in v for v in blind[2:])  # the variants alone leak
  # Through the listener: with the tag spelled by character, answers 1 and 2 score the same.
  _, ids, pmask, pixels, grid = pair_inputs(tok, [[(56, 56), (56, 84)]])
  assert [len(x) for x in rows.values()] == [len(x) for x in rows2.values()]
  probs = jax.jit(lambda t, at: listener_probs(model, jnp.asarray(ids), jnp.asarray(pmask), jnp.asarray(pixels),
                                               grid, t, jnp.asarray(lens), spec, answer_token=at))
  run = lambda t, at: np.asarray(probs(jnp.asarray(t), at))  # one program per answer_token kind (array, None)
  at = parsed.answer_token
  np.testing.assert_array_equal(run(toks, at), run(two, at))
  assert np.abs(run(toks, None) - run(two, None)).max() > 1e-4


def test_answer_slot_probability_is_the_reasoners_own_at_the_choice_token(setup):
  """The evaluation's soft score: the reasoner re-reads [its prompt | its reasoning | "<answer>Image "];
  equal to transformers' next-token softmax at the choice slot of the completion as written."""
  from lgrpo_jax.data.prompts import reasoner_ids
  from lgrpo_jax.evaluation import answer_slot_spec
  tok, hf, model, _ = setup
  self_spec = answer_slot_spec(tok)
  sizes = [[(56, 84), (84, 56)], [(56, 56), (112, 56)]]
  prompts, pixels, grids = [], [], []
  for k, pair in enumerate(sizes):
    outs = [process_image(im) for im in images(pair, 10 + k)]
    pixels += [p for p, _ in outs]
    grids += [g for _, g in outs]
    prompts.append(reasoner_ids(tok, f"prompt number {k}", [g for _, g in outs]))
  width = max(map(len, prompts)) + 2
  ids = np.zeros((2, width), np.int32)
  mask = np.zeros_like(ids)
  for r, p in enumerate(prompts):
    ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
  pixels, grid = np.concatenate(pixels), static_grid(grids)
  toks, lens = zip(*(completions(tok, ans, 60) for ans in ([1, 2, 1], [2, 1, 2])))
  toks, lens = np.stack(toks), np.stack(lens)
  probs = np.asarray(jax.jit(lambda *a: listener_probs(model, *a[:3], grid, *a[3:], self_spec))(
      jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), jnp.asarray(toks), jnp.asarray(lens)))
  per_img = np.split(pixels, np.cumsum([int(np.prod(g)) for g in grid])[:-1])
  for b in range(2):
    for g in range(3):
      row = toks[b, g, :lens[b, g]]
      # where the choice token sits in the completion as written: after the suffix ids
      n = len(self_spec.suffix_ids)
      at = next(k for k in range(len(row)) if tuple(row[k - n:k]) == self_spec.suffix_ids
                and row[k] in self_spec.choice_ids)
      seq = np.concatenate([prompts[b], row[:at]])[None]
      batch = {"input_ids": seq.astype(np.int64), "attention_mask": np.ones_like(seq, np.int64),
               "mm_token_type_ids": (seq == model.config.image_token_id).astype(np.int64),
               "pixel_values": np.concatenate(per_img[2 * b:2 * b + 2]),
               "image_grid_thw": np.asarray(grid[2 * b:2 * b + 2], np.int64)}
      last = hf_logits(hf, batch)[0, -1, list(self_spec.choice_ids)].astype(np.float64)
      np.testing.assert_allclose(probs[b, g], np.exp(last) / np.exp(last).sum(), atol=1e-5)


def test_score_hides_an_answer_whose_tag_merged_with_the_text_before_it(setup, tmp_path):
  """Qwen's vocabulary has ".<", ":<" … as single tokens, which the tag's usual tokenisations miss:
  `score` cuts the view where the text's "<answer>" starts (the parser's `answer_token`, found on
  the host), and a listed context (".") is kept as written (";" goes with the tag). The tiny vocabulary has no such token,
  so one is added (its id past the model's vocabulary: it must never reach the model)."""
  untied_skip(setup)
  from lgrpo_jax.data import ImageConfig
  from lgrpo_jax.rewards.text import answer_token_of
  tok, _, model, _ = setup
  tok.save_pretrained(tmp_path)
  merging = AutoTokenizer.from_pretrained(tmp_path)
  merging.add_tokens([".<", ";<"])  # ";" is not a listed context: no variant has ";<"
  cots = ("<think>The first is better.", "<think>The first is sharper;")
  for cot in cots:
    ids = merging(cot + "<answer>Image 1</answer>", add_special_tokens=False)["input_ids"]
    at = answer_token_of(merging, ids)
    assert merging.convert_ids_to_tokens(ids[at]) in (".<", ";<") and at == len(merging(
        cot[:-1], add_special_tokens=False)["input_ids"])
  spec = ListenerSpec.from_tokenizer(merging)
  assert any(v.remainder >= 0 and merging.convert_ids_to_tokens(v.ids[0]) == ".<" for v in spec.answer_variants)
  ids = merging(cots[0] + "<answer>Image 2</answer>", add_special_tokens=False)["input_ids"]
  seen, keep = reasoning_view(jnp.asarray([[ids]]), jnp.asarray([[len(ids)]]), spec,
                              jnp.asarray([[answer_token_of(merging, ids)]]))
  assert merging.decode(np.asarray(seen)[0, 0][np.asarray(keep)[0, 0]]) == cots[0]  # "." as written
  pair = tuple(images([(56, 56), (56, 84)], 3))
  p = score(model, merging, [("a cat", pair, c + f"<answer>Image {k}</answer>") for c in cots for k in (1, 2)],
            image=ImageConfig(max_pixels=112 * 112))
  np.testing.assert_array_equal(p[0], p[1])
  np.testing.assert_array_equal(p[2], p[3])


def test_the_answer_slot_read_never_sees_the_answer(setup, monkeypatch):
  """`evaluation.judge`'s self-read ends the reasoning where the parser found the text's first
  "<answer>", as the listener's view does: a tag spelled a character at a time (which no token
  variant matches) must not let the reasoner re-read its own answer."""
  untied_skip(setup)
  from flax import nnx
  from lgrpo_jax.data.prompts import reasoner_ids
  from lgrpo_jax.evaluation import answer_slot_spec, judge
  from lgrpo_jax.rewards import ByteTable
  from lgrpo_jax.sampling import Rollout, SamplingConfig
  from lgrpo_jax.train.step import Batch, Tables
  tok, _, model, _ = setup
  enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]
  end = tok.convert_tokens_to_ids("<|im_end|>")
  cot = "<think>the first image is better</think>"
  rows = [enc(cot) + [i for c in "<answer>" for i in enc(c)] + enc(f"Image {k}</answer>") + [end] for k in (1, 2)]
  n = len(rows[0]) + 2
  toks = np.zeros((1, 2, n), np.int32)
  for g, r in enumerate(rows):
    toks[0, g, :len(r)] = r
  lens = np.asarray([[len(r) for r in rows]], np.int32)
  mask = (np.arange(n) < lens[..., None]).astype(np.int32)
  rollout = Rollout(jnp.asarray(toks), jnp.asarray(mask), jnp.asarray(lens), jnp.zeros(toks.shape, jnp.float32),
                    jnp.int32(n))
  import sys  # the package re-exports the function `judge` under the module's name
  monkeypatch.setattr(sys.modules["lgrpo_jax.evaluation.judge"], "sample_from_embeddings", lambda *a, **k: rollout)
  outs = [process_image(im) for im in images([(56, 56), (56, 84)], 5)]
  grid = static_grid([g for _, g in outs])
  prompt = np.asarray([reasoner_ids(tok, "a prompt", list(grid))], np.int32)
  batch = Batch(jnp.asarray(prompt), jnp.ones_like(jnp.asarray(prompt)),
                jnp.asarray(np.concatenate([p for p, _ in outs]))[None], jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32))
  bt = ByteTable.from_tokenizer(tok)
  graphdef, params = nnx.split(model)
  out = jax.jit(lambda p, b: judge(p, None, b, Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths)),
                                   jax.random.key(0), graphdef=graphdef, listener_graphdef=None,
                                   sampling=SamplingConfig(max_new_tokens=n, num_samples=2), spec=None,
                                   self_spec=answer_slot_spec(tok), pair_grid=grid))(params, batch)
  assert np.asarray(out.answer).tolist() == [[1, 2]]
  p_self = np.asarray(out.p_self)[0]
  np.testing.assert_array_equal(p_self[0], p_self[1])
  np.testing.assert_allclose(p_self.sum(-1), 1.0, atol=1e-6)
