"""Offline-RL datasets as files: D4RL's flat arrays and Minari's episode groups, read into `Episodes`.

Dimension letters: N steps of all episodes end to end, E episodes, S observation
size, A action size (continuous actions).

D4RL layout (flat arrays over N steps, at the file's root; .hdf5 or .npz):

  observations  float32 [N, S]
  actions       int32 [N] (discrete) or float32 [N, A] (continuous)
  rewards       float32 [N]
  terminals     bool [N]   the episode ended in a terminal state
  timeouts      bool [N]   the episode was cut by its time limit

An episode ends at the first step with terminals | timeouts; a last run of steps
with neither flag is kept as a truncated episode. Minari layout (its
data/main_data.hdf5): groups episode_<i> holding observations [T + 1, S] (the
final observation too, dropped here), actions [T, ...], rewards [T],
terminations [T], truncations [T]; episodes are read in the order of i.

`read_file` tells the two apart by content, not by the file's name, and every
error names the file and the missing or inconsistent key. `write_d4rl` writes
the D4RL layout (the cache of nbp.data.trajectories' scripted collection).
"""

from __future__ import annotations

import dataclasses
import os

import h5py
import numpy as np

D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
MINARI_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")


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

  def to_flat(self) -> dict[str, np.ndarray]:
    """D4RL's flat arrays: the last step of each episode flagged terminal or timeout."""
    last = self.starts[1:] - 1
    terminals = np.zeros(len(self.rewards), bool)
    timeouts = np.zeros(len(self.rewards), bool)
    terminals[last[self.terminated]] = True
    timeouts[last[~self.terminated]] = True
    return {"observations": self.observations, "actions": self.actions, "rewards": self.rewards,
            "terminals": terminals, "timeouts": timeouts}


def as_actions(actions: np.ndarray, where: str) -> np.ndarray:
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
  return Episodes(observations, as_actions(values["actions"], where), values["rewards"].astype(np.float32).reshape(n),
                  starts, terminals[ends - 1] if n else np.zeros(0, bool))


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
  return Episodes(np.concatenate(parts["observations"]), as_actions(np.concatenate(parts["actions"]), where),
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
