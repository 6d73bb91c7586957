"""Next-block prediction: block order, mask and targets, next-token prediction as 1x1x1 blocks,
cached decoding, the sampler, guidance, sizes, training and the entry points."""

import itertools
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import nbp_digits, ntp_digits, ntp_text, video_tokenizer_digits, xar_digits
from layers import attention as attention_lib
from nbp import decoding
from nbp import tasks
from nbp.models import block_transformer as bt
from nbp.models import xar as xar_model
from nbp.tasks import next_block as nb
from nbp.tasks import video_tokenizer as vt
from nbp.training import loop as train
from tests.conftest import apply_overrides, config_flags_for, run_module, set_tiny_budget, tiny_ntp_config
from tests.test_video_tokenizer import tiny_tokenizer_config


def _model(**kw):
  fields = dict(codebook_size=8, grid=(3, 4, 4), block=(1, 2, 2), num_classes=10, num_class_tokens=2,
                num_layers=2, width=32, num_heads=4, num_kv_heads=2)
  fields.update(kw)
  return bt.NextBlockTransformer(**fields)


def _tokens(model, batch=2, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, model.num_tokens), 0, model.codebook_size)


def _init(model, tokens, labels=None):
  inputs, _ = nb.next_block_targets(model, tokens)
  return jax.jit(lambda i, lab: model.init(jax.random.key(1), i, labels=lab)["params"])(inputs, labels)


def _sample(model, params, rng, **kw):
  return nb.sample(model, params, rng, **kw)


# ---------------------------------------------------------------------------
# Block order, shifted targets and the mask against brute force.


@pytest.mark.parametrize("block", [(1, 1, 6), (1, 2, 3), (2, 1, 6), (1, 4, 6), (1, 1, 1), (2, 2, 2)])
def test_block_order_and_shifted_targets_vs_brute_force(block):
  grid = (2, 4, 6)
  f, h, w = grid
  b_t, b_h, b_w = block
  cells = list(itertools.product(range(f), range(h), range(w)))
  key = lambda c: ((c[0] // b_t, c[1] // b_h, c[2] // b_w), (c[0] % b_t, c[1] % b_h, c[2] % b_w))
  expected = [ti * h * w + hi * w + wi for ti, hi, wi in sorted(cells, key=key)]
  order = bt.block_order(grid, block)
  np.testing.assert_array_equal(order, expected)

  grid_tokens = np.arange(f * h * w)[None] + 100  # token value = grid index + 100
  seq = np.asarray(bt.to_block_order(grid_tokens, order))
  np.testing.assert_array_equal(bt.to_grid_order(seq, order), grid_tokens)
  # Target at slot s is token j of block b; its input is token j of block b-1, or the begin token.
  model = bt.NextBlockTransformer(codebook_size=999, grid=grid, block=block)
  inputs, targets = nb.next_block_targets(model, jnp.asarray(grid_tokens))
  blocks = {}
  for c in cells:
    b, j = key(c)
    blocks.setdefault(b, {})[j] = c[0] * h * w + c[1] * w + c[2] + 100
  ids = sorted(blocks)
  want_inputs, want_targets = [], []
  for bi, b in enumerate(ids):
    for j in sorted(blocks[b]):
      want_targets.append(blocks[b][j])
      want_inputs.append(999 if bi == 0 else blocks[ids[bi - 1]][j])
  np.testing.assert_array_equal(targets[0], want_targets)
  np.testing.assert_array_equal(inputs[0], want_inputs)


def test_block_causal_mask_vs_brute_force():
  model = _model(condition="class")
  spec = attention_lib.MaskSpec("block_causal", block_len=model.block_len, prefix_len=model.prefix_len)
  s, p, l = model.max_len, model.prefix_len, model.block_len
  dense = np.asarray(spec.make(s))
  for q in range(s):
    for k in range(s):
      sees = k < p or (q >= p and (q - p) // l >= (k - p) // l)
      assert dense[q, k] == sees, (q, k)


@pytest.mark.slow
@pytest.mark.parametrize("condition", ["none", "class", "frames"])
def test_no_information_flows_from_a_block_to_its_own_prediction(condition):
  """Changing a token of block b changes the predictions of block b+1 and nothing before it."""
  model = _model(condition=condition, prefix_frames=1, position="rope3d")
  tokens = _tokens(model, batch=1)
  labels = jnp.array([3]) if condition == "class" else None
  params = _init(model, tokens, labels)

  @jax.jit
  def predictions(grid_tokens):
    inputs, _ = nb.next_block_targets(model, grid_tokens)
    return model.apply({"params": params}, inputs, labels=labels)[0, -model.num_predicted:]  # [N, V]

  base = predictions(tokens)
  order = model.order
  given_blocks = model.frame_prefix_len // model.block_len
  for b in (0, 2, model.num_blocks - 2):
    slot = model.frame_prefix_len + b * model.block_len + 1  # a token of predicted block b
    changed = tokens.at[0, order[slot]].set((tokens[0, order[slot]] + 1) % 8)
    diff = np.abs(np.asarray(predictions(changed) - base)).max(-1)  # [N]
    blocks = diff.reshape(model.num_blocks, model.block_len).max(-1)
    assert (blocks[:b + 1] == 0).all(), blocks
    assert (blocks[b + 1] > 0).all(), blocks
  if condition == "frames":  # a given frame token is seen by every prediction
    changed = tokens.at[0, order[0]].set((tokens[0, order[0]] + 1) % 8)
    diff = np.abs(np.asarray(predictions(changed) - base)).max(-1)
    assert (diff > 0).all() and given_blocks > 0


# ---------------------------------------------------------------------------
# 1x1x1 blocks are next-token prediction.


@pytest.mark.slow
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_token_blocks_are_next_token_prediction(position):
  """With 1x1x1 blocks the mask is causal and the loss is the shifted-by-one cross-entropy."""
  model = bt.NextBlockTransformer(codebook_size=8, grid=(2, 3, 4), block=(1, 1, 1), num_layers=2, width=32,
                                  num_heads=4, num_kv_heads=2, position=position)
  spec = attention_lib.MaskSpec("block_causal", block_len=model.block_len, prefix_len=model.prefix_len)
  np.testing.assert_array_equal(spec.make(24), np.tril(np.ones((24, 24), bool)))
  tokens = jax.random.randint(jax.random.key(0), (3, 24), 0, 8)
  params = _init(model, tokens)
  inputs = jnp.concatenate([jnp.full((3, 1), model.bos), tokens[:, :-1]], axis=1)  # begin token, shift by one
  logits = model.apply({"params": params}, inputs)
  log_probs = jax.nn.log_softmax(logits, -1)
  want = -np.mean(np.take_along_axis(np.asarray(log_probs), np.asarray(tokens)[..., None], -1))
  got, metrics = nb.loss(model, params, {"tokens": tokens}, jax.random.key(2))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(logits, -1) == tokens))
  assert float(metrics["num_targets"]) == 3 * 24


def test_ntp_configs_are_the_block_model_with_token_blocks():
  c = tiny_ntp_config("unused")
  assert c.family == "next_block" and tuple(c.model.block) == (1, 1, 1) and c.model.condition == "none"
  text = ntp_text.get_config("tiny,local")
  assert tuple(text.model.grid) == (1, 1, 256) and text.model.codebook_size == 256


# ---------------------------------------------------------------------------
# Condition dropout (classifier-free guidance training).


def test_condition_dropout_replaces_labels_by_the_null_class_at_its_rate():
  labels = jnp.arange(20_000, dtype=jnp.int32) % 10
  dropped = np.asarray(decoding.drop_condition(jax.random.key(0), labels, 0.1, null_class=10))
  null = dropped == 10
  # Binomial(20000, 0.1): mean 2000, sd 42; 5 sd either side.
  assert 1790 < null.sum() < 2210, null.sum()
  np.testing.assert_array_equal(dropped[~null], np.asarray(labels)[~null])  # the others are untouched
  np.testing.assert_array_equal(decoding.drop_condition(jax.random.key(0), labels, 0.0, null_class=10), labels)


@pytest.mark.slow
def test_loss_with_full_condition_dropout_is_the_null_class_loss():
  model = _model(condition="class")
  tokens = _tokens(model)
  labels = jnp.array([3, 7])
  params = _init(model, tokens, labels)
  batch = {"tokens": tokens, "class": labels}
  null = {"tokens": tokens, "class": jnp.full((2,), model.num_classes)}
  dropped, _ = nb.loss(model, params, batch, jax.random.key(0), cond_dropout=1.0)
  np.testing.assert_allclose(dropped, nb.loss(model, params, null, jax.random.key(0))[0], rtol=1e-6)
  assert abs(float(dropped) - float(nb.loss(model, params, batch, jax.random.key(0))[0])) > 1e-6


# ---------------------------------------------------------------------------
# The model's dropout and the rope3d geometry.


def test_dropout_is_on_in_the_training_loss_only():
  tokens = _tokens(_model())
  params = _init(_model(), tokens)  # dropout adds no parameters
  model = _model(dropout=0.5)
  batch = {"tokens": tokens}
  loss = jax.jit(lambda rng, train: nb.loss(model, params, batch, rng, train=train)[0], static_argnums=1)
  plain = nb.loss(_model(), params, batch, jax.random.key(0))[0]
  assert float(loss(jax.random.key(0), True)) != float(loss(jax.random.key(1), True))
  assert abs(float(loss(jax.random.key(0), True)) - float(plain)) > 1e-3
  for rng in (jax.random.key(0), jax.random.key(1)):  # held out: the network without dropout
    np.testing.assert_allclose(loss(rng, False), plain, rtol=1e-6)
  task = nb.make_task(apply_overrides(tiny_ntp_config("unused"), {"model.dropout": 0.1}))
  assert task.predict_fns["eval_loss"].keywords == {"train": False}
  with pytest.raises(ValueError, match="config.model.dropout"):
    _model(dropout=1.0).check()


def test_context_draws_replace_the_read_copies_of_tokens_by_the_models_draws_at_their_rate():
  """The given frames and the start block stay; each other read token is the model's own draw with
  probability `rate` (drawn from the teacher-forced logits); held out and at rate 0, plain teacher forcing."""
  model = _model(condition="frames", prefix_frames=1)
  tokens = _tokens(model, batch=64)
  params = _init(model, tokens)
  inputs, targets = nb.next_block_targets(model, tokens)
  given, n, block_len = model.frame_prefix_len, model.num_predicted, model.block_len
  rng = jax.random.key(3)
  draw_key, _ = jax.random.split(rng)
  logits = model.apply({"params": params}, inputs, block_tokens=targets)[:, -n:, :model.bos]
  drawn = np.asarray(jax.random.categorical(draw_key, logits, axis=-1))
  context = jax.jit(lambda rate: nb.drawn_context(model, params, inputs, targets, rng, rate))
  for rate in (0.0, 0.5, 1.0):
    read = np.asarray(context(rate))
    np.testing.assert_array_equal(read[:, :given + block_len], np.asarray(inputs)[:, :given + block_len])
    read = read[:, given + block_len:]  # the copies of target blocks 0 .. nb-2
    truth, own = np.asarray(targets)[:, :n - block_len], drawn[:, :n - block_len]
    assert np.all((read == truth) | (read == own))
    differ = truth != own  # a random network's draws differ from the truth at most tokens
    taken = (read == own)[differ].mean()
    assert abs(taken - rate) < 0.05, (rate, taken)
  batch = {"tokens": tokens}
  plain = nb.loss(model, params, batch, rng)[0]
  np.testing.assert_allclose(nb.loss(model, params, batch, rng, context_draws=0.5, train=False)[0], plain, rtol=1e-6)
  assert abs(float(nb.loss(model, params, batch, rng, context_draws=0.5)[0]) - float(plain)) > 1e-4
  with pytest.raises(ValueError, match="config.loss.context_draws"):
    nb.loss(model, params, batch, rng, context_draws=1.5)


@pytest.mark.parametrize("condition,block", [("class", (1, 1, 4)), ("frames", (1, 2, 2)), ("none", (1, 2, 4))])
def test_split_rope3d_keys_sit_at_the_tokens_they_hold(condition, block):
  """rope3d_split: a key's label is its token's own coordinates, a query's its target's (brute force).

  Plain rope3d labels keys like queries: one block step from what they hold, a step that changes at a
  frame wrap, which is what the split removes.
  """
  fields = dict(condition=condition, prefix_frames=1, block=block)
  split, plain = _model(position="rope3d_split", **fields), _model(position="rope3d", **fields)
  grid_index = jnp.arange(split.num_tokens)[None]  # every token's value is its row-major grid index
  inputs, targets = nb.next_block_targets(split, grid_index)
  inputs, targets = np.asarray(inputs[0]), np.asarray(targets[0])
  coords = np.indices(split.grid).reshape(3, -1).T  # row-major index -> (t, h, w)
  p = split.num_class_tokens if condition == "class" else 0
  queries, keys = split.slot_positions(), split.slot_positions(keys=True)
  np.testing.assert_array_equal(queries, plain.slot_positions())
  np.testing.assert_array_equal(queries[p:][-split.num_predicted:], coords[targets])
  start = np.zeros(len(inputs), bool)  # the start block's slots (grid indices may equal the begin token)
  start[split.frame_prefix_len:split.frame_prefix_len + split.block_len] = True
  held = ~start
  np.testing.assert_array_equal(keys[p:][held], coords[inputs[held]])
  # The start block: one block before block 0 in time.
  np.testing.assert_array_equal(keys[p:][start], coords[targets[:split.block_len]] - [block[0], 0, 0])
  if condition == "class":  # behind the start block
    assert keys[:p, 0].max() < keys[p:, 0].min() and (keys[:p, 1:] == 0).all()
  predicting = held.copy()
  predicting[:split.frame_prefix_len] = False
  steps = {tuple(d) for d in plain.slot_positions()[p:][predicting] - coords[inputs[predicting]]}
  assert len(steps) >= 2, steps  # inside a row of blocks, and at each wrap


def test_absolute_positions_embed_the_coordinates_each_slot_holds():
  """Changing the time table's row of the last frame changes exactly the blocks that see a slot holding it.

  The blocks that predict the last frame's first tokens (their targets in it, what they hold still in the
  frame before) stay put: the embedding is of the held coordinates, not of the targets'.
  """
  model = _model(condition="frames", prefix_frames=1, block=(1, 2, 2), position="rope3d_split",
                 absolute_positions=True)
  tokens = _tokens(model)
  params = flax.core.unfreeze(nn.meta.unbox(_init(model, tokens)))
  np.testing.assert_array_equal(model.slot_positions(held=True), model.slot_positions(keys=True))
  inputs, _ = nb.next_block_targets(model, tokens)
  last = model.grid[0] - 1
  table = params["axis_positions_0"]["embedding"]  # t, counted from the earliest held frame
  held_t = model.slot_positions(held=True)[:, 0] - model.slot_positions(held=True)[:, 0].min()
  moved = jax.tree.map(lambda x: x, params)  # a copy
  moved["axis_positions_0"]["embedding"] = table.at[last].add(1.0)
  apply = jax.jit(lambda p: model.apply({"params": p}, inputs))
  diff = np.abs(np.asarray(apply(moved) - apply(params))).max(axis=(0, 2))[-model.num_predicted:]  # [N]
  slot = model.prefix_len + np.arange(model.num_predicted)
  first = slot[held_t[slot] == last].min()  # the first slot holding a token of the last frame
  block_start = model.prefix_len + (first - model.prefix_len) // model.block_len * model.block_len
  assert (diff[slot < block_start] == 0).all()
  assert (diff[slot >= block_start] > 0).all()
  targets_last = model.slot_positions()[slot, 0] == last
  assert (targets_last & (slot < block_start)).any()  # predicting the last frame, holding the one before
  with pytest.raises(ValueError, match="config.model.absolute_positions"):
    _model(position="learned", absolute_positions=True).check()


# ---------------------------------------------------------------------------
# Cached block decoding.


@pytest.mark.parametrize("position,condition,block,scan_layers,absolute", [
    ("learned", "class", (1, 2, 2), False, False), ("rope3d", "class", (1, 2, 2), False, True),
    ("learned", "frames", (1, 2, 2), False, False), ("rope3d", "frames", (1, 2, 2), True, False),
    ("rope3d_split", "frames", (1, 2, 2), False, False), ("rope3d_split", "frames", (1, 2, 2), False, True),
    ("rope", "none", (1, 1, 1), False, False), ("rope", "none", (1, 1, 1), True, False)])
@pytest.mark.slow
def test_cached_block_decoding_equals_full_forward(position, condition, block, scan_layers, absolute):
  model = _model(position=position, condition=condition, prefix_frames=1, block=block, scan_layers=scan_layers,
                 absolute_positions=absolute)
  tokens = _tokens(model)
  labels = jnp.array([3, 10]) if condition == "class" else None  # a class and the null class
  params = _init(model, tokens, labels)
  inputs, _ = nb.next_block_targets(model, tokens)
  full = jax.jit(lambda i, lab: model.apply({"params": params}, i, labels=lab))(inputs, labels)
  full = full[:, -model.num_predicted:]

  step = jax.jit(lambda c, t, s, lab: model.apply({"params": params, "cache": c}, t, slots=s, labels=lab,
                                                  decode=True, mutable=["cache"]))
  cache = decoding.init_cache(model, model.max_len, jnp.zeros((2, 1), jnp.int32))
  l, given = model.block_len, model.frame_prefix_len
  first = inputs[:, :given + l]  # the given frames and the start block
  logits, cache = model.apply({"params": params, "cache": cache}, first, labels=labels, decode=True,
                              mutable=["cache"])
  steps = [logits[:, -l:]]
  for k in range(1, model.num_blocks):
    slots = jnp.broadcast_to(model.prefix_len + k * l + jnp.arange(l), (2, l))
    logits, cache = step(cache["cache"], inputs[:, given + k * l:given + (k + 1) * l], slots, None)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=3e-5)


@pytest.mark.slow
@pytest.mark.parametrize("block,position", [((1, 2, 2), "rope3d"), ((1, 1, 1), "rope"), ((1, 1, 1), "learned")])
def test_greedy_block_sampler_matches_recomputed_argmax(block, position):
  """The jitted cached sampler at temperature 0 equals block-by-block argmax without a cache."""
  model = _model(position=position, block=block)
  params = _init(model, _tokens(model))
  drawn = jax.jit(lambda p: nb.sample(model, p, jax.random.key(0), num_samples=2, temperature=0.0))(params)
  assert drawn.shape == (2, *model.grid)
  seq = np.zeros((2, model.num_tokens), np.int32)  # block-major
  l = model.block_len
  for k in range(model.num_blocks):
    inputs, _ = nb.next_block_targets(model, bt.to_grid_order(jnp.asarray(seq), model.order))
    logits = model.apply({"params": params}, inputs)
    seq[:, k * l:(k + 1) * l] = np.argmax(np.asarray(logits[:, k * l:(k + 1) * l, :model.bos]), -1)
  np.testing.assert_array_equal(np.asarray(drawn).reshape(2, -1), bt.to_grid_order(seq, model.order))


@pytest.mark.slow
@pytest.mark.parametrize("condition,block", [("frames", (1, 1, 2)), ("class", (1, 1, 2)), ("frames", (1, 1, 1))])
def test_sampler_draws_the_same_tokens_in_any_number_of_phases(condition, block):
  """Phased decoding (caches grown per phase) against one loop over a whole cache: same key, same tokens."""
  model = _model(condition=condition, prefix_frames=1, block=block, position="rope3d")
  tokens = _tokens(model)
  labels = jnp.array([1, 7]) if condition == "class" else None
  params = jax.tree.map(lambda x: x * 3.0, _init(model, tokens, labels))  # peaked logits: top-p keeps few tokens
  prompt = tokens.reshape(2, *model.grid)[:, :1] if condition == "frames" else None
  guidance = 2.0 if condition == "class" else None
  draw = jax.jit(lambda p, phases: nb.sample(
      model, p, jax.random.key(5), num_samples=2, top_k=4, top_p=0.8, labels=labels, guidance_scale=guidance,
      prompt=prompt, cache_phases=phases), static_argnums=1)
  np.testing.assert_array_equal(draw(params, 3), draw(params, 1))


@pytest.mark.slow
def test_guidance_scale_one_is_conditional_and_zero_unconditional():
  model = _model(condition="class", block=(1, 1, 4))
  tokens = _tokens(model)
  params = _init(model, tokens, jnp.array([1, 2]))
  params = jax.tree.map(lambda x: x * 3.0, params)  # sharper logits: classes lead to different samples
  labels = jnp.array([1, 7])
  draw = jax.jit(lambda p, lab, s: nb.sample(model, p, jax.random.key(0), num_samples=2, temperature=0.0,
                                             labels=lab, guidance_scale=s))  # s traced: one compile
  conditional = draw(params, labels, None)
  unconditional = draw(params, jnp.full((2,), model.num_classes), None)
  np.testing.assert_array_equal(draw(params, labels, 1.0), conditional)
  np.testing.assert_array_equal(draw(params, labels, 0.0), unconditional)
  assert not np.array_equal(conditional, unconditional)
  logits = jnp.stack([jnp.ones(3), jnp.zeros(3)])
  np.testing.assert_allclose(decoding.guide(logits, 3.0), 3.0 * jnp.ones((1, 3)))


@pytest.mark.slow
def test_frame_prediction_sampler_keeps_the_prompt_frames():
  model = _model(condition="frames", prefix_frames=1, block=(1, 1, 4))
  tokens = _tokens(model)
  params = _init(model, tokens)
  prompt = tokens.reshape(2, *model.grid)[:, :1]
  drawn = jax.jit(lambda p: nb.sample(model, p, jax.random.key(3), num_samples=2, prompt=prompt, top_k=3,
                                      top_p=0.9))(params)
  assert drawn.shape == (2, *model.grid) and int(drawn.max()) < model.bos
  np.testing.assert_array_equal(drawn[:, :1], prompt)


@pytest.mark.parametrize("given_frames,position", [("prefix", "rope3d_split"), ("blocks", "learned")])
def test_frame_prediction_continues_a_partly_predicted_video(given_frames, position):
  """A prompt longer than the condition: the frames past it are returned unchanged and the rest drawn as if the
  model had drawn them: greedy draws are block-by-block argmax of the teacher-forced forward pass. Too short a
  prompt, or one past the condition that does not fill whole blocks, is refused."""
  model = _model(condition="frames", prefix_frames=1, block=(1, 2, 4), position=position,
                 given_frames=given_frames)
  tokens = _tokens(model)
  params = jax.tree.map(lambda x: x * 3.0, _init(model, tokens))  # peaked logits: argmax ties are unlikely
  prompt = tokens.reshape(2, *model.grid)[:, :2]
  drawn = jax.jit(lambda p: nb.sample(model, p, jax.random.key(0), num_samples=2, temperature=0.0,
                                      prompt=prompt, cache_phases=2))(params)
  np.testing.assert_array_equal(drawn[:, :2], prompt)
  seq = np.asarray(bt.to_block_order(tokens, model.order)).copy()  # block-major; frames 0-1 kept
  frame, l = prompt[0, 0].size, model.block_len
  seq[:, 2 * frame:] = 0
  for k in range(2 * frame, model.num_tokens, l):  # block by block, each from the forward pass over the last
    inputs, _ = nb.next_block_targets(model, bt.to_grid_order(jnp.asarray(seq), model.order))
    logits = np.asarray(model.apply({"params": params}, inputs))[:, -model.num_predicted:]
    at = k - model.frame_prefix_len  # the block's index among the predicted tokens
    seq[:, k:k + l] = np.argmax(logits[:, at:at + l, :model.bos], -1)
  np.testing.assert_array_equal(np.asarray(drawn).reshape(2, -1), bt.to_grid_order(seq, model.order))
  with pytest.raises(ValueError, match="prefix_frames=2"):
    nb.sample(_model(condition="frames", prefix_frames=2), params, jax.random.key(0), num_samples=2,
              prompt=prompt[:, :1])
  with pytest.raises(ValueError, match="whole blocks"):
    nb.sample(_model(condition="frames", prefix_frames=2, grid=(4, 4, 4), block=(2, 2, 2)), params,
              jax.random.key(0), num_samples=2, prompt=jnp.zeros((2, 3, 4, 4), jnp.int32))


@pytest.mark.parametrize("block,guidance", [((1, 2, 2), None), ((1, 1, 1), 2.0)])
def test_a_generator_continues_given_frames(block, guidance):
  """A class-conditioned generator given its first frame as a prompt returns it unchanged, and draws the rest as
  if it had drawn that frame itself: greedy draws (top-k 1) are a fixed point of the teacher-forced forward
  pass, guided or not. A prompt that does not fill whole blocks is refused."""
  model = _model(block=block, condition="class")
  tokens = _tokens(model)
  labels = jnp.array([1, 7])
  params = _init(model, tokens, labels)
  prompt = tokens.reshape(2, *model.grid)[:, :1]
  drawn = jax.jit(lambda p: nb.sample(model, p, jax.random.key(3), num_samples=2, labels=labels, prompt=prompt,
                                      top_k=1, guidance_scale=guidance))(params)
  np.testing.assert_array_equal(drawn[:, :1], prompt)
  assert not np.array_equal(drawn[:, 1:], tokens.reshape(2, *model.grid)[:, 1:])
  inputs, targets = nb.next_block_targets(model, drawn.reshape(2, -1))
  logits = model.apply({"params": params}, inputs, labels=labels)[..., :model.bos]
  if guidance is not None:
    null = model.apply({"params": params}, inputs, labels=jnp.full((2,), model.num_classes))[..., :model.bos]
    logits = decoding.guide(jnp.concatenate([logits, null]), guidance)
  given = prompt[0].size
  greedy = np.asarray(jnp.argmax(logits[:, -model.num_predicted:], -1))  # [B, N] in target (block) order
  np.testing.assert_array_equal(greedy[:, given:], np.asarray(targets)[:, given:])
  with pytest.raises(ValueError, match="whole blocks"):
    nb.sample(_model(grid=(4, 4, 4), block=(2, 2, 2), condition="class"), params, jax.random.key(3), num_samples=2,
              labels=labels, prompt=prompt)


@pytest.mark.slow
@pytest.mark.parametrize("condition", ["frames", "class"])
def test_candidates_keep_the_consensus_or_the_likeliest_draw(condition):
  """K candidates per condition, of the K draws of a batch of B K repeated conditions: "consensus" keeps the one
  agreeing most with the others, "likelihood" the one with the highest teacher-forced log p, which is the loss's
  cross-entropy summed over the predicted tokens."""
  model = _model(condition=condition, prefix_frames=1, block=(1, 1, 4))
  tokens = _tokens(model)
  labels = jnp.array([1, 7]) if condition == "class" else None
  params = _init(model, tokens, labels)
  batch = {"tokens": tokens} if labels is None else {"tokens": tokens, "class": labels}
  cross_entropy, _ = nb.loss(model, params, batch, jax.random.key(0), train=False)
  log_p = nb.log_likelihood(model, params, tokens.reshape(2, *model.grid), labels=labels)
  np.testing.assert_allclose(-jnp.mean(log_p) / model.num_predicted, cross_entropy, rtol=1e-5)

  prompt = tokens.reshape(2, *model.grid)[:, :1] if condition == "frames" else None
  k = 5
  repeat = lambda x: None if x is None else jnp.repeat(x, k, axis=0)
  draws = jax.jit(lambda p: nb.sample(model, p, jax.random.key(3), num_samples=2 * k, labels=repeat(labels),
                                      prompt=repeat(prompt), top_p=0.9))(params)
  scores = np.asarray(nb.log_likelihood(model, params, draws, labels=repeat(labels))).reshape(2, k)
  draws = np.asarray(draws).reshape(2, k, -1)
  choose = jax.jit(lambda p, selection: nb.sample(model, p, jax.random.key(3), num_samples=2, labels=labels,
                                                  prompt=prompt, top_p=0.9, candidates=k, selection=selection),
                   static_argnums=1)
  consensus, likeliest = np.asarray(choose(params, "consensus")), np.asarray(choose(params, "likelihood"))
  assert len({draws[0, i].tobytes() for i in range(k)}) > 1 and np.ptp(scores[0]) > 0  # the choice is not trivial
  for row in range(2):
    agreement = [sum(int(np.sum(draws[row, i] == draws[row, j])) for j in range(k)) for i in range(k)]
    np.testing.assert_array_equal(consensus[row].reshape(-1), draws[row, int(np.argmax(agreement))])
    np.testing.assert_array_equal(likeliest[row].reshape(-1), draws[row, int(np.argmax(scores[row]))])
  if condition == "frames":
    np.testing.assert_array_equal(consensus[:, :1], prompt)
  with pytest.raises(ValueError, match="candidates=0"):
    nb.sample(model, params, jax.random.key(3), num_samples=2, labels=labels, prompt=prompt, candidates=0)
  with pytest.raises(ValueError, match="selection='best'"):
    nb.sample(model, params, jax.random.key(3), num_samples=2, labels=labels, prompt=prompt, candidates=k,
              selection="best")


def test_sampler_config_keys_the_sampler_does_not_take_are_named():
  model = _model()
  with pytest.raises(ValueError, match=r"\['top_q'\].*top_p"):
    nb.sampler_kwargs(model, {"top_q": 0.5})
  kwargs = nb.sampler_kwargs(model, {"top_p": 0.5, "candidates": 4})
  assert kwargs["top_p"] == 0.5 and kwargs["candidates"] == 4


@pytest.mark.slow
def test_given_frames_as_blocks_are_trained_on_and_fed_to_the_sampler(position="learned"):  # the K600 config's
  """given_frames="blocks": an unconditional sequence trained on every token; the greedy cached sampler
  continues the prompt as block-by-block argmax over the whole sequence does."""
  model = _model(condition="frames", prefix_frames=1, given_frames="blocks", block=(1, 2, 2), position=position)
  assert (model.prefix_len, model.num_predicted, model.num_generated) == (0, 48, 32)
  tokens = _tokens(model)
  params = jax.tree.map(lambda x: x * 3.0, _init(model, tokens))
  _, metrics = nb.loss(model, params, {"tokens": tokens}, jax.random.key(0))
  assert float(metrics["num_targets"]) == 2 * model.num_tokens  # the given frame's tokens too
  prompt = tokens.reshape(2, *model.grid)[:, :1]
  drawn = jax.jit(lambda p: nb.sample(model, p, jax.random.key(0), num_samples=2, temperature=0.0, prompt=prompt,
                                      cache_phases=2))(params)
  np.testing.assert_array_equal(drawn[:, :1], prompt)
  seq = np.asarray(bt.to_block_order(tokens, model.order)).copy()  # block-major; the given frame stays
  l, g = model.block_len, model.given_len
  seq[:, g:] = 0
  for k in range(g // l, model.num_blocks):
    inputs, _ = nb.next_block_targets(model, bt.to_grid_order(jnp.asarray(seq), model.order))
    logits = model.apply({"params": params}, inputs)
    seq[:, k * l:(k + 1) * l] = np.argmax(np.asarray(logits[:, k * l:(k + 1) * l, :model.bos]), -1)
  np.testing.assert_array_equal(np.asarray(drawn).reshape(2, -1), bt.to_grid_order(seq, model.order))
  with pytest.raises(ValueError, match="config.model.given_frames"):
    _model(condition="frames", prefix_frames=1, given_frames="both").check()


def test_first_block_by_tokens_inputs_and_mask_vs_brute_force():
  """first_block="tokens": [begin, x_0 .. x_{L-2}] causal, then [x_{L-1}, placeholders], then blocks."""
  model = _model(condition="class", block=(1, 2, 2), first_block="tokens")
  l, p, s = model.block_len, model.prefix_len, model.max_len
  assert model.vocab_size == model.codebook_size + l
  tokens = _tokens(model)
  inputs, targets = nb.next_block_targets(model, tokens)
  inputs, targets = np.asarray(inputs), np.asarray(targets)
  np.testing.assert_array_equal(targets, np.asarray(bt.to_block_order(tokens, model.order)))
  np.testing.assert_array_equal(inputs[:, 0], model.bos)
  np.testing.assert_array_equal(inputs[:, 1:l + 1], targets[:, :l])  # x_0 .. x_{L-1}, shifted by one
  np.testing.assert_array_equal(inputs[:, l + 1:2 * l], np.broadcast_to(model.bos + np.arange(1, l), (2, l - 1)))
  np.testing.assert_array_equal(inputs[:, 2 * l:], targets[:, l:-l])
  dense = np.asarray(model.mask_spec().make(s))
  for q in range(s):
    for k in range(s):
      i, j = q - p, k - p  # positions after the class prefix
      sees = k < p or (0 <= i < l and j <= i) or (i >= l and j < (i // l + 1) * l)
      assert dense[q, k] == sees, (q, k)


@pytest.mark.slow
@pytest.mark.parametrize("condition", ["class", "frames"])
def test_first_block_by_tokens_greedy_sampler_matches_recomputed_argmax(condition):
  model = _model(condition=condition, prefix_frames=1, block=(1, 1, 4), first_block="tokens")
  tokens = _tokens(model)
  labels = jnp.array([3, 7]) if condition == "class" else None
  params = jax.tree.map(lambda x: x * 3.0, _init(model, tokens, labels))
  prompt = tokens.reshape(2, *model.grid)[:, :1] if condition == "frames" else None
  drawn = jax.jit(lambda p: nb.sample(model, p, jax.random.key(0), num_samples=2, temperature=0.0, labels=labels,
                                      prompt=prompt, cache_phases=2))(params)
  seq = np.asarray(bt.to_block_order(tokens, model.order)).copy()  # block-major
  given, l = model.frame_prefix_len, model.block_len
  seq[:, given:] = 0
  order = list(range(l)) + [range(k * l, (k + 1) * l) for k in range(1, model.num_blocks)]  # tokens, then blocks
  for positions in order:
    inputs, _ = nb.next_block_targets(model, bt.to_grid_order(jnp.asarray(seq), model.order))
    logits = np.asarray(model.apply({"params": params}, inputs, labels=labels))[:, -model.num_predicted:]
    positions = np.atleast_1d(np.asarray(positions))
    seq[:, given + positions] = np.argmax(logits[:, positions, :model.bos], -1)
  np.testing.assert_array_equal(np.asarray(drawn).reshape(2, -1), bt.to_grid_order(seq, model.order))


def test_in_block_causal_slot_sees_the_block_tokens_before_it_only():
  """in_block "causal": the logits of token j of a block change with the block's tokens before j, not with j or
  later ones, nor with other blocks' targets; "independent" ignores block_tokens."""
  model = _model(condition="frames", prefix_frames=1, block=(1, 2, 2), in_block="causal")
  tokens = _tokens(model)
  inputs, targets = nb.next_block_targets(model, tokens)
  params = jax.tree.map(lambda x: x * 3.0, model.init(jax.random.key(1), inputs, block_tokens=targets)["params"])
  logits = lambda t: np.asarray(model.apply({"params": params}, inputs, block_tokens=t))[:, -model.num_predicted:]
  base = logits(targets)
  l = model.block_len
  for j in range(l):  # change token j of block 1
    changed = logits(targets.at[:, l + j].set((targets[:, l + j] + 1) % model.codebook_size))
    moved = np.abs(changed - base).max(axis=(0, 2)) > 1e-6  # [N]
    slot = np.arange(model.num_predicted)
    np.testing.assert_array_equal(moved, (slot // l == 1) & (slot % l > j))
  with pytest.raises(ValueError, match="block_tokens"):
    model.apply({"params": params}, inputs)
  independent = _model(condition="frames", prefix_frames=1, block=(1, 2, 2))
  params = _init(independent, tokens)
  np.testing.assert_array_equal(independent.apply({"params": params}, inputs),
                                independent.apply({"params": params}, inputs, block_tokens=targets))
  with pytest.raises(ValueError, match="in_block"):
    _model(in_block="joint").check()


@pytest.mark.slow
@pytest.mark.parametrize("condition,position,guidance", [("frames", "rope3d_split", None), ("class", "learned", 2.0)])
def test_in_block_causal_greedy_sampler_is_token_by_token_argmax(condition, position, guidance):
  """The jitted sampler with in_block "causal" at temperature 0 equals, token by token, the argmax of the
  teacher-forced logits (guided or not): a block's tokens are drawn jointly, each given those before it."""
  model = _model(condition=condition, prefix_frames=1, block=(1, 2, 2), position=position, in_block="causal")
  tokens = _tokens(model)
  labels = jnp.array([3, 7]) if condition == "class" else None
  inputs, targets = nb.next_block_targets(model, tokens)
  params = jax.tree.map(lambda x: x * 3.0, model.init(jax.random.key(1), inputs, labels=labels,
                                                      block_tokens=targets)["params"])
  prompt = tokens.reshape(2, *model.grid)[:, :1] if condition == "frames" else None
  drawn = jax.jit(lambda p: nb.sample(model, p, jax.random.key(0), num_samples=2, temperature=0.0, labels=labels,
                                      prompt=prompt, guidance_scale=guidance))(params)
  seq = np.asarray(bt.to_block_order(tokens, model.order)).copy()  # block-major
  given = model.frame_prefix_len
  seq[:, given:] = 0

  @jax.jit
  def teacher_forced(seq):  # the full forward pass over a block-major sequence, compiled once for the loop
    inputs, targets = nb.next_block_targets(model, bt.to_grid_order(seq, model.order))
    logits = model.apply({"params": params}, inputs, labels=labels, block_tokens=targets)
    if guidance is not None:
      null = model.apply({"params": params}, inputs, labels=jnp.full((2,), model.num_classes), block_tokens=targets)
      logits = decoding.guide(jnp.concatenate([logits, null]), guidance)
    return logits[:, -model.num_predicted:, :model.bos]

  for position in range(model.num_predicted):
    seq[:, given + position] = np.argmax(np.asarray(teacher_forced(jnp.asarray(seq)))[:, position], -1)
  np.testing.assert_array_equal(np.asarray(drawn).reshape(2, -1), bt.to_grid_order(seq, model.order))


# ---------------------------------------------------------------------------
# Training through the shared loop.


def tiny_nbp_config(data_dir, arg="tiny,local,row", **overrides):
  """NBP on 4 frames of 8x8 pixels, or with "tokens" in `arg` on the tokens of `tiny_tokenizer_config`."""
  c = nbp_digits.get_config(arg)
  if c.model.condition == "class":  # unguided at top-p 1.0 unless a test says otherwise (the local configs guide)
    c.sampler.guidance_scale = 1.0
    c.sampler.top_p = 1.0
  if "tokens" in arg.split(","):
    tokenizer = tiny_tokenizer_config(data_dir)  # its levels (5, 5, 5) and 2x2x2 latent grid
    c.model.grid = video_tokenizer_digits.token_grid(tokenizer)
    c.model.codebook_size = video_tokenizer_digits.codebook_size(tokenizer)
  else:
    c.data.dir = data_dir
    c.data.num_frames = 4
    c.data.frame_size = 8
    c.data.num_train = 64
    c.data.num_test = 16
    c.model.grid = (4, 8, 8)
  block = next((f for f in arg.split(",") if f in nbp_digits.BLOCKS), "row")
  c.model.block = nbp_digits.block_shape(block, c.model.grid[2])
  if c.model.condition == "frames":
    c.model.prefix_frames = c.model.grid[0] // 2
    c.evals.frames.update(num_videos=2, batch_size=2)
  c.model.num_layers = 1  # fewer ops to compile
  c.sampler.num_samples = 2
  set_tiny_budget(c, num_steps=1, checkpoint_every=100)
  return apply_overrides(c, overrides)


@pytest.mark.slow
def test_token_data_reads_encoded_tokens_and_checks_them(tmp_path, data_dir):
  """Tokens written by the encoder come back as flat grid-order tokens and a class; mismatches name the key."""
  tokenizer_config = tiny_tokenizer_config(data_dir)
  tokenizer_config.unlock()
  tokenizer_config.evals = {}  # only its checkpoint matters here
  tokenizer_dir, token_dir = str(tmp_path / "tokenizer"), str(tmp_path / "tokens")
  train.train_and_evaluate(tokenizer_config, tokenizer_dir)
  metadata = vt.encode_tokens(tokenizer_dir, token_dir, batch_size=16)
  assert metadata["tokenizer_workdir"] == os.path.abspath(tokenizer_dir)
  config = tiny_nbp_config(data_dir, "tiny,local,tokens,row", **{"data.token_dir": token_dir})
  task = tasks.make_task(config)
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=4))
  assert batch["tokens"].shape == (4, 8) and batch["tokens"].dtype == np.int32
  assert batch["tokens"].max() < config.model.codebook_size == 125
  assert batch["class"].shape == (4,) and batch["class"].max() < 10
  assert task.model.grid == (2, 2, 2) and task.model.vocab_size == 126 and task.model.num_classes == 10
  videos = task.predict_fn("to_videos")(np.asarray(batch["tokens"]).reshape(4, 2, 2, 2))  # decoded by the tokenizer
  assert videos.shape == (4, 5, 8, 8, 1) and videos.dtype == np.uint8

  def first_batch(**overrides):
    c = apply_overrides(config.copy_and_resolve_references(), overrides)
    return next(tasks.make_task(c).data("test", seed=0, process_index=0, process_count=1, batch_size=2))

  with pytest.raises(ValueError, match=r"config.model.grid=\(2, 4, 4\)"):
    first_batch(**{"model.grid": (2, 4, 4)})
  with pytest.raises(ValueError, match=r"config.model.codebook_size=999"):
    first_batch(**{"model.codebook_size": 999})
  with pytest.raises(FileNotFoundError, match=r"config.data.token_dir="):
    first_batch(**{"data.token_dir": str(tmp_path / "missing")})
  bad = config.copy_and_resolve_references()
  bad.data.name = "ucf101"
  with pytest.raises(ValueError, match=r"config.data.name='ucf101'"):
    tasks.check_config(bad)
  bad = config.copy_and_resolve_references()
  with bad.unlocked():
    bad.data.levels = 8  # a moving-digits key in the tokens section
  with pytest.raises(ValueError, match=r"config.data.levels"):
    tasks.check_config(bad)


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["tiny,local,2row", "tiny,local,patch", "tiny,local,frame", "tiny,local,token,uncond"])
def test_one_step_of_each_block_shape(arg, data_dir):
  """One jitted gradient step of the config's task (model, data, loss) for the other block shapes."""
  config = tiny_nbp_config(data_dir, arg, **({"model.position": "learned"} if "token" in arg else {}))
  task = tasks.make_task(config)
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=4))
  params = task.model.init(jax.random.key(0), **task.init_inputs())["params"]
  tx = optax.adamw(1e-3)

  @jax.jit
  def step(params, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, jax.random.key(1))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), loss, metrics, optax.global_norm(grads)

  _, loss, metrics, grad_norm = step(params, tx.init(params), batch)
  assert abs(float(loss) - np.log(9)) < 1.0 and np.isfinite(float(grad_norm)) and float(grad_norm) > 0
  assert float(metrics["num_targets"]) == 4 * task.model.num_predicted


@pytest.mark.slow
def test_frame_prediction_trains_one_step_and_samples(tmp_path, data_dir):
  config = tiny_nbp_config(data_dir, "tiny,local,row,frames")
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 1 and np.isfinite(result["loss"])
  assert abs(result["loss"] - np.log(9)) < 1.0  # near uniform over 8 levels + begin
  assert os.path.exists(tmp_path / "samples" / "step_0000001.gif")
  assert os.path.exists(tmp_path / "samples" / "step_0000001.png")
  with open(tmp_path / "metrics.jsonl") as f:  # the frame-prediction evaluator ran at the end, on validation
    frames = [json.loads(line) for line in f if "frames/com_error_px" in line]
  assert len(frames) == 1 and np.isfinite(frames[0]["frames/com_error_px"])  # 8x8 digits barely move
  assert frames[0]["frames/mse_black"] > 0 and frames[0]["frames/num_videos"] == 2
  # An 8x8 digit in an 8x8 frame cannot move: ideal predictors make no error.
  assert frames[0]["frames/com_error_px_exact_sampler"] == 0 == frames[0]["frames/com_error_px_best_point"]


@pytest.mark.slow
def test_class_conditional_run_with_guidance_loss_falls(tmp_path, data_dir):
  """Row blocks, class prefix, condition dropout, guided samples: the loss falls in 30 steps."""
  config = tiny_nbp_config(data_dir, "tiny,local,row", num_steps=30, log_every=5,
                           **{"optimizer.warmup_steps": 3, "sampler.guidance_scale": 2.0})
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 30 and np.isfinite(result["loss"])
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < losses[0] - 0.4, losses
  assert os.path.exists(tmp_path / "samples" / "step_0000030.gif")


# ---------------------------------------------------------------------------
# Sizes, dtypes, the text setting and the entry points.


@pytest.mark.slow
def test_bfloat16_forward_is_finite():
  model = _model(dtype="bfloat16", block=(1, 1, 1), condition="none")
  tokens = jnp.zeros((2, model.num_tokens), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # parameters stay float32
  logits = model.apply({"params": params}, tokens)
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("variant,low,high", [("S", 2e6, 5e6), ("700M", 6.0e8, 8.0e8), ("3B", 3.0e9, 4.0e9)])
def test_sizes_table_parameter_counts(variant, low, high):
  """The large sizes build abstractly (no memory) with the parameter count their name says."""
  model = bt.NextBlockTransformer(codebook_size=256, grid=(1, 1, 1024), variant=variant)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert low < count < high, count


def test_the_configs_num_layers_overrides_the_variants_depth_only_when_set():
  """config.model.num_layers (digits configs, and the command line) is unset by default: the variant's depth."""
  for config in (ntp_digits.get_config("XS,local"), nbp_digits.get_config("XS,local,row")):
    assert config.model.num_layers is None
    assert bt.NextBlockTransformer(**config.model).depth == bt.SIZES["XS"][0]
    config.model.num_layers = 1
    assert bt.NextBlockTransformer(**config.model).depth == 1
  config = xar_digits.get_config("cell")
  assert config.model.num_layers is None and xar_model.XAR(**config.model).depth == xar_model.SIZES["S"][0]


def test_explicit_sizes_override_the_variant_and_zero_is_an_error():
  model = bt.NextBlockTransformer(codebook_size=8, grid=(1, 1, 8), variant="S", num_layers=1)
  assert (model.depth, model.embed_dim) == (1, 256)
  with pytest.raises(ValueError, match="layers, width and heads must be >= 1"):
    bt.NextBlockTransformer(codebook_size=8, grid=(1, 1, 8), variant="S", num_layers=0).check()
  with pytest.raises(ValueError, match="config.model.variant='Q'"):
    bt.NextBlockTransformer(codebook_size=8, grid=(1, 1, 8), variant="Q").check()


def test_unknown_config_keys_are_named_before_compilation():
  for section, key in (("model", "size"), ("sampler", "batch_size"), ("loss", "cond_drop")):
    config = tiny_ntp_config("unused")
    with config.unlocked():
      config[section][key] = 1
    with pytest.raises(ValueError, match=rf"Unknown config key 'config.{section}.{key}'"):
      tasks.check_config(config)


@pytest.mark.slow
def test_sample_and_evaluate_entry_points(tmp_path, data_dir):
  config = tiny_ntp_config(data_dir, num_steps=2)
  base = ["--config", "experiments/configs/ntp_digits.py:tiny,local", "--workdir", str(tmp_path),
          *config_flags_for(config)]
  # Trained in-process (experiments.train's command line: tests/test_train.py); sampling before training fails
  # by name (tests/test_train.py checks that in-process too).
  assert train.train_and_evaluate(config, str(tmp_path))["status"] == "done"
  result = run_module(["-m", "experiments.sample", *base, "--seed=5"])
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["step"] == 2 and out["params"] == "params"
  assert os.path.exists(tmp_path / "samples" / "seed_5" / "step_0000002.gif")
  result = run_module(["-m", "experiments.evaluate", *base])
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads(result.stdout.strip().splitlines()[-1])
  assert metrics["step"] == 2 and np.isfinite(metrics["eval/loss"]) and metrics["params"] == "params"


@pytest.mark.slow
def test_text_config_trains_one_step(tmp_path):
  config = ntp_text.get_config("tiny,local")
  config.model.grid = (1, 1, 64)
  config.batch_size, config.num_steps, config.evals.eval.steps = 4, 1, 1
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 1 and abs(result["loss"] - np.log(257)) < 1.0  # near uniform over bytes + begin
  with open(tmp_path / "samples" / "step_0000001.txt") as f:
    assert f.read().count("---") == config.sampler.num_samples
