"""Offline RL: trajectory collection and cache, D4RL/Minari loaders, windows, the policy's loss, streaming, rollout."""

import json
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import aaren_decision
from nbp.data import trajectories
from nbp.tasks import decision
from nbp.training import loop as train
from tests.conftest import apply_overrides, set_tiny_budget


def tiny_config(data_dir: str, attention: str = "aaren", **overrides):
  """4 collected CartPole episodes (one for test), K = 8, a 1-layer width-16 model."""
  c = aaren_decision.get_config(f"{attention},local")
  c.data.dir = data_dir
  c.data.num_episodes = 4
  c.data.context_len = 8
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
  """attention -> (task, parameters) on one small collected dataset."""
  data_dir = str(tmp_path_factory.mktemp("trajectories"))
  tasks = {a: decision.make_task(tiny_config(data_dir, a)) for a in ("softmax", "aaren")}
  return {a: (task, random_params(task)) for a, task in tasks.items()}


# ---------------------------------------------------------------------------
# Collection, cache, loaders.


def test_collection_is_cached_in_the_d4rl_layout_with_hand_computed_returns_to_go(tmp_path, monkeypatch):
  episodes, metadata = trajectories.build(str(tmp_path), "CartPole-v1", 3)
  directory = trajectories.cache_dir(str(tmp_path), "CartPole-v1", 3)
  assert sorted(os.listdir(directory)) == ["metadata.json", trajectories.DATA_FILE]
  with h5py.File(os.path.join(directory, trajectories.DATA_FILE)) as f:
    assert sorted(f.keys()) == sorted(trajectories.D4RL_KEYS)
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
  for episodes in (trajectories.read_file(path), trajectories.read_file(str(tmp_path / "d4rl.npz"))):
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
  episodes = trajectories.read_file(str(tmp_path / "ds"))  # the dataset's directory
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
    trajectories.read_file(path)
  minari = str(tmp_path / "main_data.hdf5")
  _write_minari(minari, [2], ["episode_0"])
  with h5py.File(minari, "a") as f:
    del f["episode_0/truncations"]
  with pytest.raises(KeyError, match=r"main_data\.hdf5.*episode_0.*'truncations'"):
    trajectories.read_file(minari)
  with pytest.raises(FileNotFoundError, match="config.data.path"):
    trajectories.read_file(str(tmp_path / "absent.hdf5"))


# ---------------------------------------------------------------------------
# The policy.


@pytest.mark.parametrize("attention", ["softmax", "aaren"])
def test_one_training_step_lowers_the_loss(tasks_by_attention, attention):
  task, params = tasks_by_attention[attention]
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=4))
  assert batch["inputs"].shape == (4, 8, task.model.input_dim) == (4, 8, 2 + 4 + 2)
  grad_fn = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
  (value, metrics), grads = grad_fn(params, batch, None)
  assert np.isfinite(value) and abs(float(value) - np.log(2)) < 0.3  # two actions, near-uniform at init
  assert metrics["num_targets"] == batch["valid"].sum()
  stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
  assert float(grad_fn(stepped, batch, None)[0][0]) < float(value)


@pytest.mark.parametrize("attention", ["softmax", "aaren"])
def test_streaming_policy_acts_as_the_parallel_model(tasks_by_attention, attention):
  """The jitted policy step over test windows gives the parallel model's argmax at every step."""
  task, params = tasks_by_attention[attention]
  model = task.model
  batch = next(task.data("test", seed=0, process_index=0, process_count=1, batch_size=2))
  params = jax.tree.map(lambda p: p * 2.0, params)  # sharper logits: argmax ties are unlikely
  parallel = np.asarray(jax.jit(model.apply)({"params": params}, batch["inputs"]))  # [2, K, 2]
  act = decision._jitted_policy_step(model, True, True)  # greedy: the argmax
  state = decision._init_state(model, params, 2)
  actions = []
  for t in range(batch["inputs"].shape[1]):
    state, a = act(params, state, jnp.asarray(batch["inputs"][:, t]), jax.random.key(0))
    actions.append(np.asarray(a))
  np.testing.assert_array_equal(np.stack(actions, 1), parallel.argmax(-1))


def test_rollout_stops_at_the_time_limit_and_scores(tasks_by_attention):
  task, params = tasks_by_attention["aaren"]
  result = task.rollout(params, jax.random.key(3), target_return=500.0, num_episodes=2, max_episode_steps=5,
                        greedy=True)  # the streaming test's compiled step
  assert result["length_mean"] == result["return_mean"] == 5.0  # CartPole pays 1 a step; no pole falls in 5
  random, expert = trajectories.REFERENCE_RETURNS["CartPole-v1"]
  np.testing.assert_allclose(result["normalized_score"], 100 * (5 - random) / (expert - random))


def test_softmax_cache_shorter_than_an_episode_is_refused(tmp_path):
  with pytest.raises(ValueError, match="config.model.max_len=100"):
    decision.make_task(tiny_config(str(tmp_path), "softmax", **{"model.max_len": 100}))


@pytest.mark.slow
def test_end_to_end_training_and_rollout(tmp_path):
  c = tiny_config(str(tmp_path / "data"))
  c.evals.rollout.num_episodes = 2
  c.evals.rollout.target_returns = (500.0,)
  result = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert result["status"] == "done" and result["step"] == 2
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  final = lines[-1]
  assert 8 <= final["rollout/return_mean@500"] <= 500 and np.isfinite(final["eval/loss"])
