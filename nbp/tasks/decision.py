"""Offline RL with a return-conditioned policy (Decision-Transformer style): Aaren or a Transformer.

Dimension letters: B batch (or episodes rolled out together), K steps per
window, S observation size, A actions (the number of discrete actions, or the
size of a continuous action), F = 2 + S + A input features, O = A outputs.

Token layout: one token per time step. Decision Transformer interleaves three
tokens per step (R_t, s_t, a_t) and predicts a_t from the s_t token; here step t
is a single token whose features are

  [R_t / return_scale,  (s_t - mean) / std,  a_{t-1},  t / horizon]

(R_t the return-to-go r_t + ... + r_{T-1}; a_{t-1} one-hot for discrete
actions, zeros at the episode's first step; for continuous actions its value
mapped to [-1, 1] by the action bounds, the zero action at the first step), and the
causal SequenceModel predicts a_t from tokens 0..t. One token per step needs no
token-type embedding and a third of the sequence length, and a_t is predicted
where it would be in DT (after R_t and s_t, before a_t). The last feature is
DT's timestep embedding as a number (t the step in the episode, horizon the
environment's time limit): under a time limit the return-to-go of a good
policy is (steps left) x (reward per step), so R_t alone cannot tell a good
policy late in an episode from a poor one early, and the model's positions
count steps of a window, not of the episode. `return_scale` is the
largest |return| of the training episodes; the observation mean and std are
theirs too (`Encoding`).

Loss: cross-entropy of a_t (discrete actions; metric `accuracy`) or the mean
squared error of the action in [-1, 1] (continuous), over the valid steps of
K-step windows (nbp.data.trajectories.Windows: one window from every step,
padded at the right with valid=False where the episode ends first).

Rollout (`rollout`, the rollout evaluator): B episodes of config.data.env step
together, one jitted `sequence.step` for all of them per time step; the
policy's state starts empty at the episode's first step and holds its whole
history (Aaren's (m, u, w) per head and layer, the Transformer's KV cache), so
the context at step t is every step 0..t, not only the last K. R_0 is the
target return and R_{t+1} = R_t - r_t. Discrete actions are sampled from the
predicted distribution (as DT does for discrete actions; `greedy=True` takes
the argmax instead): the behaviour data are epsilon-random around a controller,
and the argmax of such a mixture is the controller's action at every epsilon
below 1, so a greedy policy would hide what the return conditioning does.
Continuous actions are the prediction, clipped to the bounds. The Transformer's
KV cache must hold the whole episode: make_task refuses config.model.max_len
below the environment's time limit (500 steps for CartPole and Acrobot, 200 for
MountainCar and Pendulum).

Results: return_mean, return_std, length_mean, and normalized_score, the
D4RL-style 100 * (return - random) / (expert - random) averaged over episodes,
with (random, expert) = nbp.data.trajectories.REFERENCE_RETURNS for the four
classic-control environments (a random policy's and the scripted controller's
mean returns), else the lowest and highest episode return of the training data.
The default target return is the best return of the training episodes.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from nbp import tasks
from nbp.data import pipeline
from nbp.data import trajectories
from nbp.models import sequence
from nbp.models.sequence import SequenceModel as Model

DATASETS = ("trajectories",)


@dataclasses.dataclass(frozen=True)
class Encoding:
  """How a step becomes the model's input features, and an action its target (numpy, any leading shape)."""

  obs_mean: np.ndarray  # float32 [S]: the training episodes' observation mean
  obs_std: np.ndarray  # float32 [S]: their standard deviation (at least 1e-3)
  return_scale: float  # returns-to-go are divided by it: the largest |return| of the training episodes
  num_actions: int  # discrete actions 0..num_actions-1; 0: continuous actions
  horizon: int  # the time step feature is t / horizon: the environment's time limit
  action_low: np.ndarray | None = None  # float32 [A]: continuous bounds, mapped to -1 (None: discrete)
  action_high: np.ndarray | None = None  # float32 [A]: mapped to +1

  @property
  def discrete(self) -> bool:
    return self.num_actions > 0

  @property
  def action_dim(self) -> int:
    """A: one-hot width (discrete) or the action's size (continuous)."""
    return self.num_actions if self.discrete else len(self.action_low)

  @property
  def input_dim(self) -> int:
    return 2 + len(self.obs_mean) + self.action_dim

  def scale_actions(self, actions) -> np.ndarray:
    """Continuous actions [..., A] -> [-1, 1]."""
    half = (self.action_high - self.action_low) / 2
    return ((actions - (self.action_high + self.action_low) / 2) / half).astype(np.float32)

  def unscale_actions(self, scaled) -> np.ndarray:
    """[-1, 1] (clipped) -> continuous actions [..., A] within the bounds."""
    half = (self.action_high - self.action_low) / 2
    return (np.clip(scaled, -1.0, 1.0) * half + (self.action_high + self.action_low) / 2).astype(np.float32)

  def features(self, returns_to_go, observations, prev_actions, timesteps) -> np.ndarray:
    """R [...], s [..., S], a_prev [...] (int, -1: none) or [..., A], t int [...] -> float32 [..., F]."""
    returns_to_go = np.asarray(returns_to_go, np.float32)
    observations = (np.asarray(observations, np.float32) - self.obs_mean) / self.obs_std
    if self.discrete:
      prev = (np.asarray(prev_actions)[..., None] == np.arange(self.num_actions)).astype(np.float32)
    else:
      prev = self.scale_actions(np.asarray(prev_actions, np.float32))
    time = np.asarray(timesteps, np.float32)[..., None] / self.horizon
    return np.concatenate([returns_to_go[..., None] / self.return_scale, observations, prev, time], axis=-1)


def make_encoding(episodes: trajectories.Episodes, env: gym.Env) -> Encoding:
  """The Encoding of the training episodes, for an environment's action space and time limit."""
  action_space = env.action_space
  scale = float(np.max(np.abs(episodes.returns())))
  std = np.maximum(episodes.observations.std(axis=0), 1e-3).astype(np.float32)
  common = dict(obs_mean=episodes.observations.mean(axis=0).astype(np.float32), obs_std=std,
                return_scale=scale if scale > 0 else 1.0,
                horizon=int(env.spec.max_episode_steps or episodes.lengths.max()))
  if isinstance(action_space, gym.spaces.Discrete):
    return Encoding(num_actions=int(action_space.n), **common)
  return Encoding(num_actions=0, action_low=np.asarray(action_space.low, np.float32),
                  action_high=np.asarray(action_space.high, np.float32), **common)


@dataclasses.dataclass(frozen=True)
class Encode(grain.transforms.Map):
  """A window of nbp.data.trajectories.Windows -> {"inputs" [K, F], "actions" int32 [K] or float32 [K, A], "valid"}."""
  encoding: Encoding

  def map(self, element):
    actions = element["actions"]
    if not self.encoding.discrete:
      actions = self.encoding.scale_actions(actions)
    return {"inputs": self.encoding.features(element["returns_to_go"], element["observations"],
                                             element["prev_actions"], element["timesteps"]),
            "actions": actions, "valid": element["valid"]}


def loss(model: Model, params, batch, rng):
  """Cross-entropy (discrete) or MSE in [-1, 1] (continuous) of a_t over the valid steps; accuracy."""
  del rng  # no dropout
  outputs = model.apply({"params": params}, batch["inputs"], valid=batch["valid"])  # [B, K, O]
  weights = batch["valid"].astype(jnp.float32)
  count = jnp.sum(weights)
  mean = lambda v: jnp.sum(v * weights) / jnp.maximum(count, 1.0)
  actions = batch["actions"]
  metrics = {"num_targets": count}
  if jnp.issubdtype(actions.dtype, jnp.integer):
    chosen = jnp.take_along_axis(outputs, actions[..., None], axis=-1)[..., 0]
    value = mean(jax.nn.logsumexp(outputs, axis=-1) - chosen)
    metrics["accuracy"] = mean((jnp.argmax(outputs, axis=-1) == actions).astype(jnp.float32))
  else:
    value = mean(jnp.mean(jnp.square(outputs - actions), axis=-1))
    metrics["mse"] = value
  return value, metrics


def make_data(data_cfg, episodes: trajectories.Episodes, encoding: Encoding, split: str, *, seed: int,
              process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of {"inputs": float32 [b, K, F], "actions", "valid": bool [b, K]}."""
  source = trajectories.Windows(episodes.split(split), int(data_cfg.context_len))
  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True,
      transforms=(Encode(encoding),), process_index=process_index, process_count=process_count,
      worker_count=data_cfg.worker_count)


def policy_step(model: Model, discrete: bool, greedy: bool, params, state, inputs, rng):
  """One step of every episode: inputs [B, F] -> (state, actions int32 [B] or float32 [B, A] in [-1, 1])."""
  state, outputs = sequence.step(model, params, state, inputs)
  if not discrete:
    return state, jnp.clip(outputs, -1.0, 1.0)
  if greedy:
    return state, jnp.argmax(outputs, axis=-1).astype(jnp.int32)
  return state, jax.random.categorical(rng, outputs, axis=-1).astype(jnp.int32)


def rollout(model: Model, encoding: Encoding, env_name: str, references: tuple[float, float], default_target: float,
            params, rng, *, target_return: float | None = None, num_episodes: int = 10,
            max_episode_steps: int | None = None, greedy: bool = False) -> dict[str, float]:
  """`num_episodes` episodes of `env_name` stepped together, conditioned on `target_return` -> returns and score.

  Episode i starts from `reset(seed)` with seeds drawn from `rng`, which also
  drives the action sampling. `max_episode_steps` shortens the environment's
  time limit (None: its own). See the module docstring for the metrics.
  """
  target = default_target if target_return is None else float(target_return)
  envs = [gym.make(env_name, max_episode_steps=max_episode_steps) for _ in range(num_episodes)]
  horizon = envs[0].spec.max_episode_steps
  check_horizon(model, horizon, env_name)
  seed_key, action_key = jax.random.split(rng)
  seeds = np.asarray(jax.random.randint(seed_key, (num_episodes,), 0, 2 ** 31 - 1))
  observations = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)]).astype(np.float32)
  returns_to_go = np.full(num_episodes, target, np.float32)
  prev_actions = (np.full(num_episodes, -1, np.int32) if encoding.discrete
                  else np.zeros((num_episodes, encoding.action_dim), np.float32))
  returns = np.zeros(num_episodes)
  lengths = np.zeros(num_episodes, np.int64)
  done = np.zeros(num_episodes, bool)
  act = _jitted_policy_step(model, encoding.discrete, greedy)
  state = _init_state(model, params, num_episodes)
  for t in range(horizon):
    inputs = encoding.features(returns_to_go, observations, prev_actions, np.full(num_episodes, t))
    state, actions = act(params, state, jnp.asarray(inputs), jax.random.fold_in(action_key, t))
    actions = np.asarray(actions)
    env_actions = actions if encoding.discrete else encoding.unscale_actions(actions)
    for i in np.flatnonzero(~done):
      obs, reward, terminated, truncated, _ = envs[i].step(env_actions[i])
      observations[i] = obs
      returns[i] += reward
      returns_to_go[i] -= reward
      lengths[i] += 1
      done[i] = terminated or truncated
    prev_actions = env_actions
    if done.all():
      break
  for env in envs:
    env.close()
  random, expert = references
  score = 100.0 * (returns - random) / (expert - random if expert != random else 1.0)
  return {"return_mean": float(returns.mean()), "return_std": float(returns.std()),
          "normalized_score": float(score.mean()), "length_mean": float(lengths.mean())}


_init_state = jax.jit(sequence.init_state, static_argnums=(0, 2))  # (model, params, B) -> the empty state


@functools.cache
def _jitted_policy_step(model: Model, discrete: bool, greedy: bool):
  return jax.jit(functools.partial(policy_step, model, discrete, greedy))


def check_horizon(model: Model, horizon: int, env_name: str) -> None:
  """A Transformer's KV cache (and a learned position table) must hold every step of an episode."""
  if (model.attention == "softmax" or model.position == "learned") and horizon > model.max_len:
    raise ValueError(f"config.model.max_len={model.max_len} is below the {horizon}-step episodes of {env_name}: "
                     f"the {'KV cache' if model.attention == 'softmax' else 'position table'} must hold a whole "
                     f"episode; set config.model.max_len >= {horizon}")


def make_task(config) -> tasks.Task:
  data_cfg = config.data
  episodes, metadata = trajectories.load(data_cfg)
  env = gym.make(data_cfg.env)
  observation_size = int(np.prod(env.observation_space.shape))
  if episodes.observations.shape[1] != observation_size:
    raise ValueError(f"config.data: the data's observations have {episodes.observations.shape[1]} values but "
                     f"config.data.env={data_cfg.env!r} observes {observation_size}")
  if episodes.discrete != isinstance(env.action_space, gym.spaces.Discrete):
    raise ValueError(f"config.data: the data's actions are {'discrete' if episodes.discrete else 'continuous'} "
                     f"but config.data.env={data_cfg.env!r} has {env.action_space}")
  train = episodes.split("train")
  encoding = make_encoding(train, env)
  if encoding.discrete and episodes.actions.size and episodes.actions.max() >= encoding.num_actions:
    raise ValueError(f"config.data: action {episodes.actions.max()} in the data, but config.data.env="
                     f"{data_cfg.env!r} has {encoding.num_actions} actions")
  model = tasks.build_model(Model, config.model)
  model = sequence.with_data_sizes(model, input_dim=encoding.input_dim, output_dim=encoding.action_dim,
                                   data=f"config.data.env={data_cfg.env!r}")
  check_horizon(model, env.spec.max_episode_steps, data_cfg.env)
  env.close()
  train_returns = train.returns()
  references = trajectories.REFERENCE_RETURNS.get(
      data_cfg.env, (float(train_returns.min()), float(train_returns.max())))
  value = functools.partial(loss, model)
  k = int(data_cfg.context_len)
  return tasks.Task(
      model=model,
      init_inputs=lambda: {"x": jnp.zeros((1, k, model.input_dim), jnp.float32)},
      loss=value,
      data=functools.partial(make_data, data_cfg, episodes, encoding),
      evaluate=value,  # test-episode windows: loss and accuracy (or mse)
      rollout=functools.partial(rollout, model, encoding, data_cfg.env, references, float(train_returns.max())),
  )
