"""Next-block prediction: block order, mask and targets, the NTP limit, cached decoding, guidance, training."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbp import next_block as nb
from nbp import ntp
from tests.conftest import apply_overrides, set_tiny_budget


def _model(**kw):
  fields = dict(vocab_size=9, grid=(3, 4, 4), block=(1, 2, 2), num_classes=10, num_class_tokens=2,
                num_layers=2, width=32, num_heads=4, num_kv_heads=2)
  fields.update(kw)
  return nb.NextBlockTransformer(**fields)


def _tokens(model, batch=2, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, model.num_tokens), 0, model.vocab_size - 1)


def _init(model, tokens, labels=None):
  inputs, _ = nb.next_block_targets(model, tokens)
  return jax.jit(lambda i, lab: model.init(jax.random.key(1), i, labels=lab)["params"])(inputs, labels)


# ---------------------------------------------------------------------------
# Block order, shifted targets and the mask against brute force.


@pytest.mark.parametrize("block", [(1, 1, 6), (1, 2, 3), (2, 1, 6), (1, 4, 6), (1, 1, 1), (2, 2, 2)])
def test_block_order_and_shifted_targets_vs_brute_force(block):
  grid = (2, 4, 6)
  f, h, w = grid
  bt, bh, bw = block
  cells = list(itertools.product(range(f), range(h), range(w)))
  key = lambda c: ((c[0] // bt, c[1] // bh, c[2] // bw), (c[0] % bt, c[1] % bh, c[2] % bw))
  expected = [ti * h * w + hi * w + wi for ti, hi, wi in sorted(cells, key=key)]
  order = nb.block_order(grid, block)
  np.testing.assert_array_equal(order, expected)

  grid_tokens = np.arange(f * h * w)[None] + 100  # token value = grid index + 100
  seq = np.asarray(nb.to_block_order(grid_tokens, order))
  np.testing.assert_array_equal(nb.to_grid_order(seq, order), grid_tokens)
  # Target at slot s is token j of block b; its input is token j of block b-1, or the begin token.
  model = nb.NextBlockTransformer(vocab_size=1000, grid=grid, block=block)
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
  spec = nb.attention_lib.MaskSpec("block_causal", block_len=model.block_len, prefix_len=model.prefix_len)
  s, p, l = model.max_len, model.prefix_len, model.block_len
  dense = np.asarray(spec.make(s))
  for q in range(s):
    for k in range(s):
      sees = k < p or (q >= p and (q - p) // l >= (k - p) // l)
      assert dense[q, k] == sees, (q, k)


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
# 1x1x1 blocks are the next-token baseline.


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_token_blocks_give_the_ntp_loss_on_the_same_weights(position):
  grid = (2, 3, 4)
  baseline = ntp.NextTokenTransformer(vocab_size=9, max_len=24, num_layers=2, width=32, num_heads=4,
                                      num_kv_heads=2, position=position)
  model = nb.NextBlockTransformer(vocab_size=9, grid=grid, block=(1, 1, 1), num_layers=2, width=32,
                                  num_heads=4, num_kv_heads=2, position=position)
  tokens = jax.random.randint(jax.random.key(0), (3, 24), 0, 8)
  params = baseline.init(jax.random.key(1), tokens)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(_init(model, tokens))
  want, want_metrics = ntp.ntp_loss(baseline, params, {"tokens": tokens}, None)
  got, metrics = nb.nbp_loss(model, params, {"tokens": tokens}, jax.random.key(2))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], want_metrics["accuracy"])
  assert float(metrics["num_tokens"]) == 3 * 24


# ---------------------------------------------------------------------------
# Cached block decoding.


@pytest.mark.parametrize("position,condition", [("learned", "class"), ("rope3d", "class"), ("learned", "frames"),
                                                ("rope3d", "frames")])
def test_cached_block_decoding_equals_full_forward(position, condition):
  model = _model(position=position, condition=condition, prefix_frames=1)
  tokens = _tokens(model)
  labels = jnp.array([3, 10]) if condition == "class" else None  # a class and the null class
  params = _init(model, tokens, labels)
  inputs, _ = nb.next_block_targets(model, tokens)
  full = jax.jit(lambda i, lab: model.apply({"params": params}, i, labels=lab))(inputs, labels)
  full = full[:, -model.num_predicted:]

  step = jax.jit(lambda c, t, s, lab: model.apply({"params": params, "cache": c}, t, slots=s, labels=lab,
                                                  decode=True, mutable=["cache"]))
  cache = nb.init_cache(model, 2)
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


def test_greedy_block_sampler_matches_recomputed_argmax():
  """The jitted cached sampler at temperature 0 equals block-by-block argmax without a cache."""
  model = _model(position="rope3d")
  params = _init(model, _tokens(model))
  drawn = jax.jit(lambda p: nb.sample(model, p, jax.random.key(0), batch_size=2, temperature=0.0))(params)
  assert drawn.shape == (2, *model.grid)
  seq = np.zeros((2, model.num_tokens), np.int32)  # block-major
  l = model.block_len
  for k in range(model.num_blocks):
    inputs, _ = nb.next_block_targets(model, nb.to_grid_order(jnp.asarray(seq), model.order))
    logits = model.apply({"params": params}, inputs)
    seq[:, k * l:(k + 1) * l] = np.argmax(np.asarray(logits[:, k * l:(k + 1) * l, :model.bos]), -1)
  np.testing.assert_array_equal(np.asarray(drawn).reshape(2, -1), nb.to_grid_order(seq, model.order))


@pytest.mark.parametrize("condition", ["frames", "class"])
def test_sampler_draws_the_same_tokens_in_any_number_of_phases(condition):
  """Phased decoding (caches grown per phase) against one loop over a whole cache: same key, same tokens."""
  model = _model(condition=condition, prefix_frames=1, block=(1, 1, 2), position="rope3d")
  tokens = _tokens(model)
  labels = jnp.array([1, 7]) if condition == "class" else None
  params = jax.tree.map(lambda x: x * 3.0, _init(model, tokens, labels))  # peaked logits: top-p keeps few tokens
  prompt = tokens.reshape(2, *model.grid)[:, :1] if condition == "frames" else None
  guidance = 2.0 if condition == "class" else None
  draw = jax.jit(lambda p, phases: nb.sample(
      model, p, jax.random.key(5), batch_size=2, top_k=4, top_p=0.8, labels=labels, guidance_scale=guidance,
      prompt=prompt, cache_phases=phases), static_argnums=1)
  np.testing.assert_array_equal(draw(params, 3), draw(params, 1))


def test_guidance_scale_one_is_conditional_and_zero_unconditional():
  model = _model(condition="class", block=(1, 1, 4))
  tokens = _tokens(model)
  params = _init(model, tokens, jnp.array([1, 2]))
  params = jax.tree.map(lambda x: x * 3.0, params)  # sharper logits: classes lead to different samples
  labels = jnp.array([1, 7])
  draw = jax.jit(lambda p, lab, s: nb.sample(model, p, jax.random.key(0), batch_size=2, temperature=0.0,
                                             labels=lab, guidance_scale=s))  # s traced: one compile
  conditional = draw(params, labels, None)
  unconditional = draw(params, jnp.full((2,), model.num_classes), None)
  np.testing.assert_array_equal(draw(params, labels, 1.0), conditional)
  np.testing.assert_array_equal(draw(params, labels, 0.0), unconditional)
  assert not np.array_equal(conditional, unconditional)
  logits = jnp.stack([jnp.ones(3), jnp.zeros(3)])
  np.testing.assert_allclose(nb.guide(logits, 3.0), 3.0 * jnp.ones((1, 3)))


def test_frame_prediction_sampler_keeps_the_prompt_frames():
  model = _model(condition="frames", prefix_frames=1, block=(1, 1, 4))
  tokens = _tokens(model)
  params = _init(model, tokens)
  prompt = tokens.reshape(2, *model.grid)[:, :1]
  drawn = jax.jit(lambda p: nb.sample(model, p, jax.random.key(3), batch_size=2, prompt=prompt, top_k=3,
                                      top_p=0.9))(params)
  assert drawn.shape == (2, *model.grid) and int(drawn.max()) < model.bos
  np.testing.assert_array_equal(drawn[:, :1], prompt)


# ---------------------------------------------------------------------------
# Training through the shared loop.


def tiny_nbp_config(data_dir, arg="tiny,local,row", **overrides):
  """NBP on 4 frames of 8x8 pixels, or with "tokens" in `arg` on a tiny tokenizer's 2x2x2 tokens."""
  from experiments.configs import nbp_digits  # pylint: disable=g-import-not-at-top
  from tests.test_video_tokenizer import tiny_tokenizer_config  # pylint: disable=g-import-not-at-top
  c = nbp_digits.get_config(arg)
  c.data.dir = data_dir
  if "tokens" in arg.split(","):
    nbp_digits.set_tokenizer_data(c, tiny_tokenizer_config(data_dir, num_steps=2))
  else:
    c.data.num_frames = 4
    c.data.frame_size = 8
    c.data.num_train = 64
    c.data.num_test = 16
  block = next((f for f in arg.split(",") if f in nbp_digits.BLOCKS), "row")
  c.model.block = nbp_digits.block_shape(block, nb.token_grid(c.data)[2])
  c.model.num_samples = 2
  set_tiny_budget(c, num_steps=1, checkpoint_every=100)
  return apply_overrides(c, overrides)


def test_token_data_reads_encoded_tokens_and_checks_them(tmp_path, data_dir):
  """Tokens written by encode_tokens come back as flat grid-order tokens and a class; mismatches name the key."""
  from nbp.data import tokens  # pylint: disable=g-import-not-at-top
  from nbp import video_tokenizer as vt  # pylint: disable=g-import-not-at-top
  config = tiny_nbp_config(data_dir, "tiny,local,tokens,row", **{"data.token_dir": str(tmp_path / "tokens")})
  tokenizer = vt.build_model(config.data.tokenizer.model)
  d = config.data.tokenizer.data
  params = tokenizer.init(jax.random.key(0), jnp.zeros((1, d.num_frames, d.frame_size, d.frame_size, 1)))["params"]
  tokens.encode_dataset(tokenizer, params, d, config.data.token_dir, batch_size=16)

  batch = next(nb.make_data(config.data, "train", seed=0, process_index=0, process_count=1,
                                    batch_size=4))
  assert batch["tokens"].shape == (4, 8) and batch["tokens"].dtype == np.int32
  assert 0 <= batch["tokens"].min() and batch["tokens"].max() < config.data.codebook_size == 125
  assert batch["class"].shape == (4,) and 0 <= batch["class"].min() and batch["class"].max() < 10
  model = nb.build_model(config.model, config.data)
  assert model.grid == (2, 2, 2) and model.vocab_size == 126 and model.num_classes == 10

  def first_batch(**overrides):
    data_cfg = apply_overrides(config.copy_and_resolve_references(), overrides).data
    return next(nb.make_data(data_cfg, "test", seed=0, process_index=0, process_count=1, batch_size=2))

  with pytest.raises(ValueError, match=r"config.data.token_grid=\(2, 4, 4\)"):
    first_batch(**{"data.token_grid": (2, 4, 4)})
  with pytest.raises(ValueError, match=r"config.data.codebook_size=1000"):
    first_batch(**{"data.codebook_size": 1000})
  with pytest.raises(FileNotFoundError, match=r"config.data.token_dir="):
    first_batch(**{"data.token_dir": str(tmp_path / "missing")})
  with pytest.raises(ValueError, match=r"config.data.name='ucf101'"):
    nb.build_model(config.model, apply_overrides(config.copy_and_resolve_references(),
                                                         {"data.name": "ucf101"}).data)


@pytest.mark.parametrize("arg", ["tiny,local,2row", "tiny,local,patch", "tiny,local,frame", "tiny,local,token,uncond"])
def test_one_step_of_each_block_shape(arg, data_dir):
  """One jitted gradient step of the config's task (model, data, loss) for the other block shapes."""
  import optax  # pylint: disable=g-import-not-at-top
  from nbp import tasks as families  # pylint: disable=g-import-not-at-top
  config = tiny_nbp_config(data_dir, arg, **({"model.position": "learned"} if "token" in arg else {}))
  task = families.make_task(config)
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
  assert float(metrics["num_tokens"]) == 4 * task.model.num_predicted


def test_frame_prediction_trains_one_step_and_samples(tmp_path, data_dir):
  from nbp.training import loop as train  # pylint: disable=g-import-not-at-top
  config = tiny_nbp_config(data_dir, "tiny,local,row,frames")
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 1 and np.isfinite(result["loss"])
  assert abs(result["loss"] - np.log(9)) < 1.0  # near uniform over 8 levels + begin
  assert os.path.exists(tmp_path / "samples" / "step_0000001.gif")
  assert os.path.exists(tmp_path / "samples" / "step_0000001.png")


def test_class_conditional_run_with_guidance_loss_falls(tmp_path, data_dir):
  """Row blocks, class prefix, condition dropout, guided samples: the loss falls in 30 steps."""
  from nbp.training import loop as train  # pylint: disable=g-import-not-at-top
  config = tiny_nbp_config(data_dir, "tiny,local,row", num_steps=30, log_every=5,
                           **{"optimizer.warmup_steps": 3, "model.guidance_scale": 2.0})
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 30 and np.isfinite(result["loss"])
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < losses[0] - 0.4, losses
  assert os.path.exists(tmp_path / "samples" / "step_0000030.gif")
