"""Offline-RL trajectories: scripted behaviour in gymnasium's classic control, its cache, splits and windows.

Dimension letters: N steps of all episodes end to end, E episodes, S observation
size, A action size (continuous actions), K steps per training window.

`config.data.name = "trajectories"` reads

  env           the gymnasium environment ("CartPole-v1", "Acrobot-v1", "MountainCar-v0",
                "Pendulum-v1"); the policy is rolled out in it, and without `path` the data are
                collected in it;
  path          "" (collect) or a user's file: a D4RL .hdf5 (or .npz) of flat arrays, or a Minari
                dataset (its data/main_data.hdf5, or the dataset's directory), read by
                nbp.data.offline_rl_files (the format comes from the file's content);
  num_episodes  episodes collected (without `path`);
  context_len   K, steps per training window (nbp.tasks.decision); 0: whole episodes.

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
    trajectories.hdf5   D4RL's flat layout (nbp.data.offline_rl_files)
    metadata.json       env, behaviour (controller, epsilons), counts, returns summary
                        (overall and per epsilon level)

Splits, by episode: episode e is a test episode when e % 10 == 0 (`TEST_EVERY`);
of the others, `nbp.data.splits.carve` (config.data.validation_fraction and
validation_seed, a fixed permutation) holds out the validation episodes, and the
rest are the train split. A dataset needs at least two episodes besides its
test episodes (one to train on, one to validate on) unless validation_fraction is 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable, SupportsIndex

import gymnasium as gym
import numpy as np

from nbp.data import offline_rl_files
from nbp.data import splits as splits_lib
from nbp.data.offline_rl_files import Episodes

BEHAVIOUR_VERSION = "scripted-v2"  # the cache folder's suffix: change it when a controller or epsilon changes
DATA_FILE = "trajectories.hdf5"
TEST_EVERY = 10  # episode e is held out for test when e % TEST_EVERY == 0


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
      offline_rl_files.as_actions(np.concatenate([r["actions"] for r in runs]), env_name),
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
      "layout": "D4RL flat arrays " + ", ".join(offline_rl_files.D4RL_KEYS) + f" in {DATA_FILE}",
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
    offline_rl_files.write_d4rl(os.path.join(tmp, DATA_FILE), episodes)
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
  return offline_rl_files.read_file(os.path.join(directory, DATA_FILE)), metadata


def load(data_cfg) -> tuple[Episodes, dict]:
  """The episodes of `config.data` (collected and cached, or `path`'s file) and metadata (env, returns)."""
  if data_cfg.get("path"):
    episodes = offline_rl_files.read_file(data_cfg.path)
    return episodes, {"env": data_cfg.env, "path": data_cfg.path, "num_episodes": len(episodes),
                      "returns": _summary(episodes.returns())}
  return build(data_cfg.dir, data_cfg.env, int(data_cfg.num_episodes))


# ------------------------------------------------------------------- splits


def split_indices(num_episodes: int, validation_fraction: float = splits_lib.VALIDATION_FRACTION,
                  validation_seed: int = splits_lib.VALIDATION_SEED) -> dict[str, np.ndarray]:
  """split -> the indices of its episodes (see the module docstring)."""
  test = np.arange(num_episodes) % TEST_EVERY == 0
  rest = np.flatnonzero(~test)
  if len(rest) < 1:
    raise ValueError(f"{num_episodes} episode(s): a dataset needs at least 2 (one for test, one for training)")
  carved = splits_lib.carve(len(rest), validation_fraction, validation_seed)
  return {"train": rest[carved["train"]], "validation": rest[carved["validation"]], "test": np.flatnonzero(test)}


def split(episodes: Episodes, split_name: str, data_cfg=None) -> Episodes:
  """The episodes of one split; `data_cfg` gives validation_fraction and validation_seed (None: the defaults)."""
  splits_lib.check(split_name, "trajectories")
  cfg = {} if data_cfg is None else data_cfg
  indices = split_indices(len(episodes), float(cfg.get("validation_fraction", splits_lib.VALIDATION_FRACTION)),
                          int(cfg.get("validation_seed", splits_lib.VALIDATION_SEED)))
  return episodes.select(indices[split_name])


# ------------------------------------------------------------------ windows


@dataclasses.dataclass(frozen=True)
class Windows:
  """Random-access K-step windows: one from every step of every episode, or one per episode from its start.

  Window i covers K steps from its first step (every step, or with
  `episode_starts` only each episode's first step), cut at the episode's end
  and padded at the right (valid False, zeros). Each step holds its
  return-to-go, observation, action, the previous action of its episode
  (discrete: -1 at the episode's first step; continuous: zeros) and its time
  step in the episode (0 at the first).
  """

  episodes: Episodes
  context_len: int  # K
  episode_starts: bool = False  # windows only from each episode's first step (whole episodes when K >= length)

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
    firsts = e.starts[:-1][e.lengths > 0] if self.episode_starts else np.arange(len(e.rewards))
    object.__setattr__(self, "_firsts", firsts)

  def __len__(self) -> int:
    return len(self._firsts)

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    i = int(index)
    if not 0 <= i < len(self):
      raise IndexError(f"window {i} out of range [0, {len(self)})")
    start = int(self._firsts[i])
    k = self.context_len
    n = min(k, int(self._ends[start]) - start)
    e = self.episodes

    def window(values, fill=0):
      out = np.full((k, *values.shape[1:]), fill, values.dtype)
      out[:n] = values[start:start + n]
      return out
    return {"returns_to_go": window(self._returns_to_go), "observations": window(e.observations),
            "actions": window(e.actions), "prev_actions": window(self._previous, -1 if e.discrete else 0),
            "timesteps": window(self._timesteps), "valid": np.arange(k) < n}
