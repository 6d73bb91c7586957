"""Offline-RL trajectories: scripted behaviour in gymnasium's classic control, D4RL and Minari files, K-step windows.

Dimension letters: N steps of all episodes end to end, E episodes, S observation
size, A action size (continuous actions), K steps per training window.

`config.data.name = "trajectories"` reads

  env           the gymnasium environment ("CartPole-v1", "Acrobot-v1", "MountainCar-v0",
                "Pendulum-v1"); the policy is rolled out in it, and without `path` the data are
                collected in it;
  path          "" (collect) or a user's file: a D4RL .hdf5 (or .npz) of flat arrays, or a Minari
                dataset (its data/main_data.hdf5, or the dataset's directory); the format is read
                from the file's content, not its name;
  num_episodes  episodes collected (without `path`);
  context_len   K, steps per training window (nbp.tasks.decision).

Collected data. Each environment has a scripted controller (`BEHAVIOURS`): CartPole a
linear rule on the pole's angle and angular velocity, Acrobot a torque following the
second joint's velocity, MountainCar a push along the velocity, Pendulum an energy
swing-up with a PD catch at the top. Episode e acts with epsilon-random actions (a
uniformly random action with probability epsilon, else the controller's) at the
level epsilons[(e + e // 10) % len(epsilons)]: consecutive episodes cycle through
the levels, shifted by one every 10 episodes so that the test episodes (every 10th)
see every level too. Returns range from the controller's (expert) down to a random
policy's, so that a return-conditioned policy has returns to choose from. Episode e
starts from `env.reset(seed=e)`. The data are collected once and cached under

  config.data.dir/<env>_<num_episodes>_<BEHAVIOUR_VERSION>/
    trajectories.hdf5   D4RL's flat layout (below)
    metadata.json       env, behaviour (controller, epsilons), counts, returns summary
                        (overall and per epsilon level)

D4RL layout (flat arrays over N steps, at the file's root):

  observations  float32 [N, S]
  actions       int32 [N] (discrete) or float32 [N, A] (continuous)
  rewards       float32 [N]
  terminals     bool [N]   the episode ended in a terminal state
  timeouts      bool [N]   the episode was cut by its time limit

An episode ends at the first step with terminals | timeouts; a last run of steps
with neither flag is kept as a truncated episode. Minari layout: groups
episode_<i> holding observations [T + 1, S] (the final observation too, dropped
here), actions [T, ...], rewards [T], terminations [T], truncations [T].

Splits: episode e is a test episode when e % 10 == 0 (`TEST_EVERY`), else a
training one; a dataset needs at least two episodes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable, SupportsIndex

import gymnasium as gym
import h5py
import numpy as np

BEHAVIOUR_VERSION = "scripted-v2"  # the cache folder's suffix: change it when a controller or epsilon changes
DATA_FILE = "trajectories.hdf5"
TEST_EVERY = 10  # episode e is held out for test when e % TEST_EVERY == 0
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
MINARI_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")


# ----------------------------------------------------------------- episodes


@dataclasses.dataclass(frozen=True)
class Episodes:
  """E episodes stored end to end: episode e is steps starts[e]:starts[e + 1] of the flat arrays."""

  observations: np.ndarray  # float32 [N, S]
  actions: np.ndarray  # int32 [N] (discrete) or float32 [N, A] (continuous)
  rewards: np.ndarray  # float32 [N]
  starts: np.ndarray  # int64 [E + 1], starts[0] = 0 and starts[E] = N
  terminated: np.ndarray  # bool [E]: ended in a terminal state (else cut by a time limit)

  def __len__(self) -> int:
    return len(self.starts) - 1

  @property
  def discrete(self) -> bool:
    return self.actions.ndim == 1

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.starts)

  @property
  def episode_of_step(self) -> np.ndarray:
    """int64 [N]: the episode each step belongs to."""
    return np.repeat(np.arange(len(self)), self.lengths)

  def returns(self) -> np.ndarray:
    """float64 [E]: each episode's undiscounted return."""
    return np.add.reduceat(self.rewards.astype(np.float64), self.starts[:-1]) if len(self.rewards) else np.zeros(0)

  def returns_to_go(self) -> np.ndarray:
    """float32 [N]: R_t = r_t + r_{t+1} + ... + r_{T-1} of each step's episode (undiscounted)."""
    rewards = self.rewards.astype(np.float64)
    cumulative = np.cumsum(rewards[::-1])[::-1]  # sum of r_i for i >= t over the whole flat array
    ends = np.append(cumulative[self.starts[1:-1]], 0.0)  # the sum beyond each episode's end
    return (cumulative - ends[self.episode_of_step]).astype(np.float32)

  def select(self, episodes) -> Episodes:
    """The episodes at the given indices, in that order."""
    episodes = np.asarray(episodes, np.int64)
    steps = np.concatenate([np.arange(self.starts[e], self.starts[e + 1]) for e in episodes] or [np.zeros(0, int)])
    starts = np.concatenate([[0], np.cumsum(self.lengths[episodes])])
    return Episodes(self.observations[steps], self.actions[steps], self.rewards[steps], starts,
                    self.terminated[episodes])

  def split(self, split: str) -> Episodes:
    """The train or test episodes (test: e % TEST_EVERY == 0)."""
    if split not in ("train", "test"):
      raise ValueError(f"split {split!r}: trajectories have 'train' and 'test'")
    if len(self) < 2:
      raise ValueError(f"{len(self)} episode(s): a dataset needs at least 2 (one for test, one for training)")
    test = np.arange(len(self)) % TEST_EVERY == 0
    return self.select(np.flatnonzero(test if split == "test" else ~test))

  def to_flat(self) -> dict[str, np.ndarray]:
    """D4RL's flat arrays: the last step of each episode flagged terminal or timeout."""
    last = self.starts[1:] - 1
    terminals = np.zeros(len(self.rewards), bool)
    timeouts = np.zeros(len(self.rewards), bool)
    terminals[last[self.terminated]] = True
    timeouts[last[~self.terminated]] = True
    return {"observations": self.observations, "actions": self.actions, "rewards": self.rewards,
            "terminals": terminals, "timeouts": timeouts}


def _as_actions(actions: np.ndarray, where: str) -> np.ndarray:
  """Integer actions -> int32 [N]; real ones -> float32 [N, A] ([N] becomes [N, 1])."""
  actions = np.asarray(actions)
  if np.issubdtype(actions.dtype, np.integer) or actions.dtype == bool:
    if actions.ndim == 2 and actions.shape[1] == 1:
      actions = actions[:, 0]
    if actions.ndim != 1:
      raise ValueError(f"{where}: integer actions must be one per step, got shape {actions.shape}")
    return actions.astype(np.int32)
  actions = actions.astype(np.float32)
  return actions[:, None] if actions.ndim == 1 else actions.reshape(len(actions), -1)


def from_flat(arrays, where: str) -> Episodes:
  """D4RL flat arrays (a mapping with D4RL_KEYS) -> Episodes cut at terminals | timeouts.

  `where` names the file in errors: a missing key, or arrays of different lengths.
  """
  missing = [k for k in D4RL_KEYS if k not in arrays]
  if missing:
    raise KeyError(f"{where}: no {missing[0]!r} array (a D4RL file holds {list(D4RL_KEYS)} at its root)")
  values = {k: np.asarray(arrays[k]) for k in D4RL_KEYS}
  n = len(values["rewards"])
  for k, v in values.items():
    if len(v) != n:
      raise ValueError(f"{where}: {k!r} has {len(v)} rows but 'rewards' has {n}")
  terminals = values["terminals"].astype(bool).reshape(n)
  ends = np.flatnonzero(terminals | values["timeouts"].astype(bool).reshape(n)) + 1  # one past each end
  if not len(ends) or ends[-1] != n:
    ends = np.append(ends, n)  # a last run of steps without a flag: a truncated episode
  ends = ends[ends > 0]
  starts = np.concatenate([[0], ends]).astype(np.int64)
  observations = values["observations"].astype(np.float32).reshape(n, -1)
  return Episodes(observations, _as_actions(values["actions"], where), values["rewards"].astype(np.float32).reshape(n),
                  starts, terminals[ends - 1] if n else np.zeros(0, bool))


# -------------------------------------------------------------------- files


def write_d4rl(path: str, episodes: Episodes) -> None:
  """Writes the D4RL flat layout to an .hdf5 file."""
  with h5py.File(path, "w") as f:
    for k, v in episodes.to_flat().items():
      f.create_dataset(k, data=v)


def _minari_episodes(f: h5py.File, where: str) -> Episodes:
  names = sorted((k for k in f.keys() if k.startswith("episode_")), key=lambda k: int(k.split("_")[1]))
  parts = {k: [] for k in ("observations", "actions", "rewards")}
  lengths, terminated = [], []
  for name in names:
    group = f[name]
    missing = [k for k in MINARI_KEYS if k not in group]
    if missing:
      raise KeyError(f"{where}: group {name!r} has no {missing[0]!r} (a Minari episode holds {list(MINARI_KEYS)})")
    if isinstance(group["observations"], h5py.Group):
      raise ValueError(f"{where}: {name}/observations is a group (a dict observation space); only array "
                       "observations are read")
    rewards = np.asarray(group["rewards"], np.float32).reshape(-1)
    t = len(rewards)
    if t == 0:  # an empty episode holds no step to learn from
      continue
    observations = np.asarray(group["observations"], np.float32).reshape(-1, *group["observations"].shape[1:])
    if len(observations) != t + 1:
      raise ValueError(f"{where}: {name}/observations has {len(observations)} rows; a Minari episode of {t} "
                       f"steps holds {t + 1} (the final observation too)")
    actions = np.asarray(group["actions"])
    if len(actions) != t:
      raise ValueError(f"{where}: {name}/actions has {len(actions)} rows but {name}/rewards has {t}")
    parts["observations"].append(observations[:-1].reshape(t, -1))
    parts["actions"].append(actions)
    parts["rewards"].append(rewards)
    lengths.append(t)
    terminated.append(bool(np.asarray(group["terminations"]).reshape(-1)[-1]))
  if not lengths:
    raise KeyError(f"{where}: no 'episode_<i>' group with steps")
  return Episodes(np.concatenate(parts["observations"]), _as_actions(np.concatenate(parts["actions"]), where),
                  np.concatenate(parts["rewards"]), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                  np.asarray(terminated, bool))


def read_file(path: str) -> Episodes:
  """A user's dataset: a D4RL .hdf5 or .npz of flat arrays, or a Minari main_data.hdf5 (or its dataset directory).

  The format comes from the content: flat arrays at the root are D4RL, groups
  named episode_<i> are Minari. Errors name the file and the missing key.
  """
  if os.path.isdir(path):
    for candidate in (os.path.join(path, "data", "main_data.hdf5"), os.path.join(path, "main_data.hdf5")):
      if os.path.exists(candidate):
        return read_file(candidate)
    raise FileNotFoundError(f"config.data.path={path!r} is a directory without data/main_data.hdf5 (a Minari "
                            "dataset)")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data.path={path!r} does not exist")
  if h5py.is_hdf5(path):
    with h5py.File(path, "r") as f:
      if any(k.startswith("episode_") for k in f.keys()):
        return _minari_episodes(f, path)
      return from_flat(f, path)
  try:
    arrays = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except  # numpy raises several types for a non-array file
    raise ValueError(f"{path}: neither an HDF5 file (D4RL or Minari) nor an .npz of D4RL arrays ({e})") from e
  if not isinstance(arrays, np.lib.npyio.NpzFile):
    raise ValueError(f"{path}: a single array; a D4RL .npz holds {list(D4RL_KEYS)}")
  with arrays:
    return from_flat(arrays, path)


# --------------------------------------------------------------- behaviour


def cartpole_controller(obs: np.ndarray) -> int:
  """Push towards the side the pole falls to: the sign of angle + 0.5 * angular velocity."""
  return int(obs[2] + 0.5 * obs[3] > 0)


def acrobot_controller(obs: np.ndarray) -> int:
  """Torque along the second joint's angular velocity (pumps energy into the swing)."""
  return 2 if obs[5] > 0 else 0


def mountain_car_controller(obs: np.ndarray) -> int:
  """Push along the velocity (builds up the swing between the hills)."""
  return 2 if obs[1] > 0 else 0


def pendulum_controller(obs: np.ndarray) -> np.ndarray:
  """Energy swing-up: torque along the velocity scaled by the energy missing to the top; PD near the top."""
  cos, sin, velocity = obs
  angle = np.arctan2(sin, cos)  # 0 upright
  if cos > 0.9:
    torque = -(10.0 * angle + 2.0 * velocity)
  else:
    energy = velocity ** 2 / 6.0 + 5.0 * cos  # a uniform rod of mass 1, length 1, g = 10; 5 at rest upright
    torque = 2.0 * (5.0 - energy) * (np.sign(velocity) if abs(velocity) > 1e-3 else 1.0)
  return np.clip(np.array([torque], np.float32), -2.0, 2.0)


@dataclasses.dataclass(frozen=True)
class Behaviour:
  """A scripted controller and the epsilon levels episodes cycle through."""

  controller: Callable[[np.ndarray], object]  # observation -> action
  epsilons: tuple[float, ...]  # probabilities of a uniformly random action, one per episode in turn


BEHAVIOURS = {
    # mean returns at each level (30 episodes each of the 210-episode set): 500, 492, 414, 354, 133, 51, 21
    "CartPole-v1": Behaviour(cartpole_controller, (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)),
    # about -78, -102, -104, -121, -174, -500 (20 episodes each)
    "Acrobot-v1": Behaviour(acrobot_controller, (0.0, 0.1, 0.2, 0.35, 0.5, 1.0)),
    # about -124, -160, then -200 (the flag not reached) from epsilon 0.45 on
    "MountainCar-v0": Behaviour(mountain_car_controller, (0.0, 0.15, 0.3, 0.45, 0.6, 1.0)),
    # about -144, -171, -205, -379, -1187
    "Pendulum-v1": Behaviour(pendulum_controller, (0.0, 0.1, 0.2, 0.4, 1.0)),
}

# (random, expert) mean returns for the normalised score: the uniformly random policy's and the scripted
# controller's (epsilon 0), each measured over 100 episodes with `reference_returns`.
REFERENCE_RETURNS = {
    "CartPole-v1": (21.2, 500.0),
    "Acrobot-v1": (-498.3, -84.5),
    "MountainCar-v0": (-200.0, -134.4),
    "Pendulum-v1": (-1172.3, -140.7),
}


def random_action(space: gym.Space, rng: np.random.Generator):
  if isinstance(space, gym.spaces.Discrete):
    return int(space.start + rng.integers(space.n))
  return rng.uniform(space.low, space.high).astype(np.float32)


def run_episode(env: gym.Env, controller, epsilon: float, rng: np.random.Generator, seed: int) -> dict:
  """One episode of the epsilon-random controller: its observations, actions, rewards and end."""
  obs, _ = env.reset(seed=seed)
  observations, actions, rewards = [], [], []
  terminated = truncated = False
  while not (terminated or truncated):
    action = random_action(env.action_space, rng) if rng.random() < epsilon else controller(obs)
    observations.append(np.asarray(obs, np.float32))
    actions.append(action)
    obs, reward, terminated, truncated, _ = env.step(action)
    rewards.append(float(reward))
  return {"observations": np.stack(observations), "actions": np.asarray(actions),
          "rewards": np.asarray(rewards, np.float32), "terminated": bool(terminated)}


def collect(env_name: str, num_episodes: int, *, max_episode_steps: int | None = None) -> tuple[Episodes, dict]:
  """Collects `num_episodes` episodes of BEHAVIOURS[env_name] -> (episodes, metadata).

  Episode e uses epsilon level (e + e // TEST_EVERY) % len(epsilons) and
  `env.reset(seed=e)`; the random actions come from numpy's generator seeded
  with 0. Deterministic.
  """
  if env_name not in BEHAVIOURS:
    raise ValueError(f"config.data.env={env_name!r} has no scripted behaviour; choose one of {sorted(BEHAVIOURS)} "
                     "or give a dataset file in config.data.path")
  if num_episodes < 2:
    raise ValueError(f"config.data.num_episodes={num_episodes}: at least 2 (one for test, one for training)")
  behaviour = BEHAVIOURS[env_name]
  env = gym.make(env_name, max_episode_steps=max_episode_steps)
  rng = np.random.default_rng(0)
  runs, levels = [], []
  for e in range(num_episodes):
    epsilon = behaviour.epsilons[(e + e // TEST_EVERY) % len(behaviour.epsilons)]
    runs.append(run_episode(env, behaviour.controller, epsilon, rng, seed=e))
    levels.append(epsilon)
  env.close()
  lengths = [len(r["rewards"]) for r in runs]
  episodes = Episodes(
      np.concatenate([r["observations"] for r in runs]),
      _as_actions(np.concatenate([r["actions"] for r in runs]), env_name),
      np.concatenate([r["rewards"] for r in runs]),
      np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
      np.asarray([r["terminated"] for r in runs], bool))
  returns = episodes.returns()
  levels = np.asarray(levels)
  metadata = {
      "env": env_name, "num_episodes": num_episodes, "num_steps": int(episodes.starts[-1]),
      "max_episode_steps": max_episode_steps,
      "behaviour": {"version": BEHAVIOUR_VERSION, "controller": behaviour.controller.__name__,
                    "epsilons": list(behaviour.epsilons)},
      "returns": _summary(returns),
      "returns_by_epsilon": {f"{eps:g}": _summary(returns[levels == eps]) for eps in behaviour.epsilons
                             if np.any(levels == eps)},
      "layout": "D4RL flat arrays " + ", ".join(D4RL_KEYS) + f" in {DATA_FILE}",
  }
  return episodes, metadata


def _summary(returns: np.ndarray) -> dict[str, float]:
  return {"mean": float(np.mean(returns)), "std": float(np.std(returns)), "min": float(np.min(returns)),
          "max": float(np.max(returns)), "count": int(len(returns))}


def reference_returns(env_name: str, num_episodes: int = 100) -> tuple[float, float]:
  """(random, expert) mean returns: epsilon 1 and epsilon 0 of the scripted behaviour (REFERENCE_RETURNS)."""
  behaviour = BEHAVIOURS[env_name]
  env = gym.make(env_name)
  rng = np.random.default_rng(1)
  out = []
  for epsilon in (1.0, 0.0):
    out.append(float(np.mean([run_episode(env, behaviour.controller, epsilon, rng, seed=10_000 + e)["rewards"].sum()
                              for e in range(num_episodes)])))
  return out[0], out[1]


# -------------------------------------------------------------------- cache


def cache_dir(data_dir: str, env_name: str, num_episodes: int) -> str:
  return os.path.join(data_dir, f"{env_name}_{num_episodes}_{BEHAVIOUR_VERSION}")


def build(data_dir: str, env_name: str, num_episodes: int) -> tuple[Episodes, dict]:
  """Collected episodes, cached: read from cache_dir if there, else collected once and written there.

  The folder is written under a temporary name and renamed, so a concurrent
  run never reads half a dataset (the first rename wins; the others read it).
  """
  directory = cache_dir(data_dir, env_name, num_episodes)
  if not os.path.exists(os.path.join(directory, "metadata.json")):
    episodes, metadata = collect(env_name, num_episodes)
    os.makedirs(data_dir, exist_ok=True)
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_d4rl(os.path.join(tmp, DATA_FILE), episodes)
    with open(os.path.join(tmp, "metadata.json"), "w") as f:
      json.dump(metadata, f, indent=2)
    try:
      os.rename(tmp, directory)
    except OSError:  # another process finished first
      shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.exists(os.path.join(directory, "metadata.json")):
      raise RuntimeError(f"could not write the trajectory cache {directory}")
  with open(os.path.join(directory, "metadata.json")) as f:
    metadata = json.load(f)
  return read_file(os.path.join(directory, DATA_FILE)), metadata


def load(data_cfg) -> tuple[Episodes, dict]:
  """The episodes of `config.data` (collected and cached, or `path`'s file) and metadata (env, returns)."""
  if data_cfg.get("path"):
    episodes = read_file(data_cfg.path)
    return episodes, {"env": data_cfg.env, "path": data_cfg.path, "num_episodes": len(episodes),
                      "returns": _summary(episodes.returns())}
  return build(data_cfg.dir, data_cfg.env, int(data_cfg.num_episodes))


# ------------------------------------------------------------------ windows


@dataclasses.dataclass(frozen=True)
class Windows:
  """Random-access K-step windows, one starting at every step of every episode (uniform over steps).

  Window i covers steps i .. i + K - 1 of step i's episode, cut at the
  episode's end and padded at the right (valid False, zeros). Each step holds
  its return-to-go, observation, action, the previous action of its episode
  (discrete: -1 at the episode's first step; continuous: zeros) and its time
  step in the episode (0 at the first).
  """

  episodes: Episodes
  context_len: int  # K

  def __post_init__(self):
    if self.context_len < 1:
      raise ValueError(f"config.data.context_len={self.context_len} must be >= 1")
    e = self.episodes
    first = np.zeros(len(e.rewards), bool)
    first[e.starts[:-1][e.lengths > 0]] = True
    previous = np.roll(e.actions, 1, axis=0)
    previous[first] = -1 if e.discrete else 0
    object.__setattr__(self, "_returns_to_go", e.returns_to_go())
    object.__setattr__(self, "_previous", previous)
    object.__setattr__(self, "_ends", e.starts[1:][e.episode_of_step])
    timesteps = np.arange(len(e.rewards)) - e.starts[:-1][e.episode_of_step]  # the step within its episode
    object.__setattr__(self, "_timesteps", timesteps.astype(np.int32))

  def __len__(self) -> int:
    return len(self.episodes.rewards)

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    i = int(index)
    if not 0 <= i < len(self):
      raise IndexError(f"window {i} out of range [0, {len(self)})")
    k = self.context_len
    n = min(k, int(self._ends[i]) - i)
    e = self.episodes

    def window(values, fill=0):
      out = np.full((k, *values.shape[1:]), fill, values.dtype)
      out[:n] = values[i:i + n]
      return out
    return {"returns_to_go": window(self._returns_to_go), "observations": window(e.observations),
            "actions": window(e.actions), "prev_actions": window(self._previous, -1 if e.discrete else 0),
            "timesteps": window(self._timesteps), "valid": np.arange(k) < n}
