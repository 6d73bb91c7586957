"""Offline RL: collection and cache, D4RL/Minari files, splits, windows, the loss, the rollout's context, rollout."""

import json
import os

import gymnasium as gym
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import aaren_decision
from nbp.data import offline_rl_files
from nbp.data import splits
from nbp.data import trajectories
from nbp.tasks import decision
from nbp.training import loop as train
from tests.conftest import apply_overrides, set_tiny_budget


def tiny_config(data_dir: str, attention: str = "aaren", context_len: int = 8, **overrides):
  """4 collected CartPole episodes (1 test, 1 validation, 2 train), K = 8 (0: whole episodes), a tiny model."""
  c = aaren_decision.get_config(f"{attention},local")
  c.data.dir = data_dir
  c.data.num_episodes = 4
  c.data.context_len = context_len
  with c.unlocked():
    c.model.num_layers = 1
    c.model.width = 16
    c.model.num_heads = 2
  set_tiny_budget(c, num_steps=2, checkpoint_every=2)
  c.batch_size = 4
  return apply_overrides(c, overrides)


def random_params(task, seed=0):
  """Parameters of the task's model shapes, normal with std 0.2: no compiled init (threefry compiles for seconds)."""
  shapes = jax.eval_shape(lambda: task.model.init(jax.random.key(0), **task.init_inputs())["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def tasks_by_attention(tmp_path_factory):
  """(attention, K) -> (config, task, parameters) on one small collected dataset; K = 0: whole episodes."""
  data_dir = str(tmp_path_factory.mktemp("trajectories"))
  out = {}
  for attention in ("softmax", "aaren"):
    for k in (8, 0):
      config = tiny_config(data_dir, attention, k)
      task = decision.make_task(config)
      out[attention, k] = (config, task, random_params(task))
  return out


# ---------------------------------------------------------------------------
# Collection, cache, loaders.


def test_collection_is_cached_in_the_d4rl_layout_with_hand_computed_returns_to_go(tmp_path, monkeypatch):
  episodes, metadata = trajectories.build(str(tmp_path), "CartPole-v1", 3)
  directory = trajectories.cache_dir(str(tmp_path), "CartPole-v1", 3)
  assert sorted(os.listdir(directory)) == ["metadata.json", trajectories.DATA_FILE]
  with h5py.File(os.path.join(directory, trajectories.DATA_FILE)) as f:
    assert sorted(f.keys()) == sorted(offline_rl_files.D4RL_KEYS)
    assert f["actions"].dtype == np.int32 and f["observations"].shape == (episodes.starts[-1], 4)
  assert metadata["env"] == "CartPole-v1" and metadata["behaviour"]["epsilons"][:3] == [0.0, 0.1, 0.2]
  # Epsilon 0 is the controller alone: it balances the pole for the whole time limit.
  assert episodes.lengths[0] == 500 and not episodes.terminated[0]
  np.testing.assert_allclose(metadata["returns"]["max"], episodes.returns().max())
  rtg = episodes.returns_to_go()
  for e in range(len(episodes)):
    rewards = episodes.rewards[episodes.starts[e]:episodes.starts[e + 1]]
    hand = [sum(rewards[t:]) for t in range(len(rewards))]
    np.testing.assert_allclose(rtg[episodes.starts[e]:episodes.starts[e + 1]], hand)
  # The second time reads the cache: collecting again would fail.
  monkeypatch.setattr(trajectories, "collect", lambda *a, **k: pytest.fail("collected twice"))
  again, _ = trajectories.build(str(tmp_path), "CartPole-v1", 3)
  np.testing.assert_array_equal(again.observations, episodes.observations)
  np.testing.assert_array_equal(again.starts, episodes.starts)


def _flat(n=7):
  rng = np.random.default_rng(0)
  return {"observations": rng.normal(size=(n, 3)).astype(np.float32), "actions": np.arange(n) % 2,
          "rewards": np.arange(1, n + 1, dtype=np.float32), "terminals": np.isin(np.arange(n), [2]),
          "timeouts": np.isin(np.arange(n), [4])}


def test_d4rl_files_are_cut_at_terminals_and_timeouts_and_windowed(tmp_path):
  flat = _flat()
  path = str(tmp_path / "d4rl.hdf5")
  with h5py.File(path, "w") as f:
    for k, v in flat.items():
      f.create_dataset(k, data=v)
  np.savez(tmp_path / "d4rl.npz", **flat)
  for episodes in (offline_rl_files.read_file(path), offline_rl_files.read_file(str(tmp_path / "d4rl.npz"))):
    # Steps 0-2 end in a terminal, 3-4 in a timeout, 5-6 carry no flag (a truncated last episode).
    np.testing.assert_array_equal(episodes.starts, [0, 3, 5, 7])
    np.testing.assert_array_equal(episodes.terminated, [True, False, False])
    np.testing.assert_allclose(episodes.returns(), [6, 9, 13])
    np.testing.assert_array_equal(episodes.to_flat()["terminals"], flat["terminals"])
  # Windows of K = 3: one per step, cut at the episode's end and padded; -1: no previous action.
  windows = trajectories.Windows(episodes, 3)
  assert len(windows) == 7
  w = windows[1]
  np.testing.assert_array_equal(w["valid"], [True, True, False])
  np.testing.assert_allclose(w["returns_to_go"], [5, 3, 0])
  np.testing.assert_array_equal(w["prev_actions"][:2], [0, 1])
  np.testing.assert_array_equal(w["timesteps"][:2], [1, 2])
  np.testing.assert_array_equal(windows[3]["prev_actions"][:2], [-1, 1])
  np.testing.assert_allclose(windows[3]["observations"][:2], flat["observations"][3:5])
  # Whole episodes: one window per episode, from its first step.
  whole = trajectories.Windows(episodes, 4, episode_starts=True)
  assert len(whole) == 3
  np.testing.assert_array_equal(whole[1]["timesteps"][:2], [0, 1])
  np.testing.assert_array_equal(whole[1]["valid"], [True, True, False, False])
  np.testing.assert_allclose(whole[2]["returns_to_go"][:2], [13, 7])

def _write_minari(path, lengths, names):
  rng = np.random.default_rng(1)
  with h5py.File(path, "w") as f:
    for name, t in zip(names, lengths):
      g = f.create_group(name)
      g.create_dataset("observations", data=rng.normal(size=(t + 1, 2)).astype(np.float32))
      g.create_dataset("actions", data=rng.uniform(-1, 1, size=(t, 1)).astype(np.float32))
      g.create_dataset("rewards", data=np.full(t, float(t)))
      g.create_dataset("terminations", data=np.arange(t) == t - 1 if t == 3 else np.zeros(t, bool))
      g.create_dataset("truncations", data=np.arange(t) == t - 1 if t != 3 else np.zeros(t, bool))


def test_minari_datasets_drop_the_final_observation_and_keep_episode_order(tmp_path):
  os.makedirs(tmp_path / "ds" / "data")
  path = str(tmp_path / "ds" / "data" / "main_data.hdf5")
  _write_minari(path, [3, 2, 4], ["episode_0", "episode_2", "episode_10"])
  episodes = offline_rl_files.read_file(str(tmp_path / "ds"))  # the dataset's directory
  np.testing.assert_array_equal(episodes.starts, [0, 3, 5, 9])
  np.testing.assert_array_equal(episodes.terminated, [True, False, False])
  np.testing.assert_allclose(episodes.returns(), [9, 4, 16])
  assert not episodes.discrete and episodes.actions.shape == (9, 1)
  with h5py.File(path) as f:  # the rows of episode_2 follow episode_0's, its last observation dropped
    np.testing.assert_array_equal(episodes.observations[3:5], f["episode_2/observations"][:2])


def test_errors_name_the_file_and_the_missing_key(tmp_path):
  flat = _flat()
  del flat["timeouts"]
  path = str(tmp_path / "broken.hdf5")
  with h5py.File(path, "w") as f:
    for k, v in flat.items():
      f.create_dataset(k, data=v)
  with pytest.raises(KeyError, match=r"broken\.hdf5.*'timeouts'"):
    offline_rl_files.read_file(path)
  minari = str(tmp_path / "main_data.hdf5")
  _write_minari(minari, [2], ["episode_0"])
  with h5py.File(minari, "a") as f:
    del f["episode_0/truncations"]
  with pytest.raises(KeyError, match=r"main_data\.hdf5.*episode_0.*'truncations'"):
    offline_rl_files.read_file(minari)
  with pytest.raises(FileNotFoundError, match="config.data.path"):
    offline_rl_files.read_file(str(tmp_path / "absent.hdf5"))


def test_splits_are_by_episode_and_the_encoding_uses_the_train_split_only():
  indices = trajectories.split_indices(30, 0.2, 0)
  np.testing.assert_array_equal(indices["test"], [0, 10, 20])  # every 10th episode
  rest = np.array([e for e in range(30) if e % 10])
  carved = splits.carve(27, 0.2, 0)
  np.testing.assert_array_equal(indices["validation"], rest[carved["validation"]])
  np.testing.assert_array_equal(indices["train"], rest[carved["train"]])
  assert len(indices["validation"]) == 5 and len(indices["train"]) == 22
  lengths = np.arange(1, 31)
  episodes = offline_rl_files.Episodes(
      observations=np.repeat(lengths, lengths)[:, None].astype(np.float32) * [1.0, -1.0, 0.5, 2.0],
      actions=np.zeros(lengths.sum(), np.int32), rewards=np.ones(lengths.sum(), np.float32),
      starts=np.concatenate([[0], np.cumsum(lengths)]), terminated=np.ones(30, bool))
  cfg = dict(validation_fraction=0.2, validation_seed=0)
  train_split = trajectories.split(episodes, "train", cfg)
  np.testing.assert_array_equal(train_split.lengths, lengths[indices["train"]])
  encoding = decision.make_encoding(train_split, gym.make("CartPole-v1"))
  steps = np.repeat(lengths[indices["train"]], lengths[indices["train"]]).astype(np.float64)  # train steps only
  np.testing.assert_allclose(encoding.obs_mean, steps.mean() * np.array([1.0, -1.0, 0.5, 2.0]), rtol=1e-5)
  assert 29 in indices["validation"]  # seed 0 holds out the longest episode (30 steps, return 30)
  assert encoding.return_scale == lengths[indices["train"]].max() == 29
  with pytest.raises(ValueError, match="split 'dev'"):
    trajectories.split(episodes, "dev")


# ---------------------------------------------------------------------------
# The policy.


@pytest.mark.parametrize("attention", ["softmax", "aaren"])
def test_one_training_step_lowers_the_loss(tasks_by_attention, attention):
  _, task, params = tasks_by_attention[attention, 8]
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=4))
  assert batch["inputs"].shape == (4, 8, task.model.input_dim) == (4, 8, 2 + 4 + 2)
  grad_fn = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
  (value, metrics), grads = grad_fn(params, batch, None)
  assert np.isfinite(value) and abs(float(value) - np.log(2)) < 0.3  # two actions, near-uniform at init
  assert metrics["num_targets"] == batch["valid"].sum()
  stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
  assert float(grad_fn(stepped, batch, None)[0][0]) < float(value)


def test_whole_episode_training_windows_start_at_the_first_step(tasks_by_attention):
  """K = 0: every training example is one whole episode from t = 0, padded to the time limit."""
  _, task, _ = tasks_by_attention["aaren", 0]
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=2))
  assert batch["inputs"].shape == (2, 500, 8)
  np.testing.assert_array_equal(batch["inputs"][:, 0, -1], 0.0)  # the time-step feature t / 500 at t = 0
  np.testing.assert_allclose(batch["inputs"][:, 1, -1], 1 / 500)
  np.testing.assert_array_equal(batch["inputs"][:, 0, 6:8], 0.0)  # no previous action at the first step


@pytest.mark.parametrize("attention", ["softmax", "aaren"])
@pytest.mark.parametrize("context_len", [8, 0])
def test_rollout_context_is_a_training_window(tasks_by_attention, attention, context_len):
  """The rollout's output at step t (and the action it picks) is the model's on the training-form context of t.

  K = 8: the window of the last K steps, steps max(0, t - 7)..t at positions 0..min(t, 7), right-padded;
  K = 0: the whole episode 0..t (one parallel pass over the episode, read at t). 20 steps, so the window slides.
  """
  config, task, params = tasks_by_attention[attention, context_len]
  model = task.model
  params = jax.tree.map(lambda p: p * 2.0, params)  # sharper logits: argmax ties are unlikely
  episodes, _ = trajectories.load(config.data)
  encoding = decision.make_encoding(trajectories.split(episodes, "train", config.data), gym.make("CartPole-v1"))
  out = decision.run_episodes(model, encoding, "CartPole-v1", context_len, params, jax.random.key(5),
                              target_return=500.0, num_episodes=2, max_episode_steps=20, greedy=True)
  inputs, outputs, actions, lengths = out["inputs"], out["outputs"], out["actions"], out["lengths"]
  assert lengths.max() > 8  # some steps act on a full, sliding window
  np.testing.assert_array_equal(actions, outputs.argmax(-1))  # greedy
  apply = jax.jit(lambda x, valid: model.apply({"params": params}, x, valid=valid))
  if context_len == 0:
    valid = np.arange(inputs.shape[1])[None] < lengths[:, None]
    expected = np.asarray(apply(inputs, valid))
    for i in range(2):
      np.testing.assert_allclose(outputs[i, :lengths[i]], expected[i, :lengths[i]], rtol=1e-4, atol=1e-5)
    return
  k = context_len
  for t in range(int(lengths.max())):
    start = max(0, t - k + 1)
    window = np.zeros((2, k, inputs.shape[-1]), np.float32)
    window[:, :t - start + 1] = inputs[:, start:t + 1]
    valid = np.broadcast_to(np.arange(k) <= t - start, (2, k))
    expected = np.asarray(apply(window, valid))[:, t - start]
    running = lengths > t
    np.testing.assert_allclose(outputs[running, t], expected[running], rtol=1e-4, atol=1e-5, err_msg=f"step {t}")


def test_rollout_stops_at_the_time_limit_and_scores(tasks_by_attention):
  _, task, params = tasks_by_attention["aaren", 0]
  result = task.predict_fns["rollout"](params, jax.random.key(3), target_return=500.0, num_episodes=2,
                                       max_episode_steps=5, greedy=True)
  assert result["length_mean"] == result["return_mean"] == 5.0  # CartPole pays 1 a step; no pole falls in 5
  random, expert = trajectories.REFERENCE_RETURNS["CartPole-v1"]
  np.testing.assert_allclose(result["normalized_score"], 100 * (5 - random) / (expert - random))


def test_softmax_cache_shorter_than_an_episode_is_refused(tmp_path):
  with pytest.raises(ValueError, match="config.model.max_len=100"):
    decision.make_task(tiny_config(str(tmp_path), "softmax", 0, **{"model.max_len": 100}))
  decision.make_task(tiny_config(str(tmp_path), "softmax", 8, **{"model.max_len": 100}))  # K = 8 needs no cache


@pytest.mark.slow
def test_a_trained_policy_beats_a_random_one_at_the_expert_target(tmp_path):
  """30 collected episodes, 150 steps: at target 500 the policy returns far more than a random policy (21).

  Measured: 488 on the validation seeds, 500 on the test seeds (4 episodes each).
  """
  c = tiny_config(str(tmp_path / "data"), "aaren", 8, **{"data.num_episodes": 30, "num_steps": 150,
                                                          "checkpoint_every": 150, "log_every": 50,
                                                          "batch_size": 16, "optimizer.lr": 3e-3,
                                                          "optimizer.warmup_steps": 10})
  c.evals.rollout.num_episodes = 4
  c.evals.rollout.target_returns = (500.0,)
  result = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert result["status"] == "done" and result["step"] == 150
  final = {}
  for line in open(tmp_path / "run" / "metrics.jsonl"):
    final.update(json.loads(line))
  random, _ = trajectories.REFERENCE_RETURNS["CartPole-v1"]
  assert final["rollout/return_mean@500"] > 5 * random  # validation seeds
  assert final["test/rollout/return_mean@500"] > 5 * random  # test seeds, once
  assert final["eval/accuracy"] > 0.6 and np.isfinite(final["test/eval/loss"])  # 0.72 measured; chance 0.5
