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
policy late in an episode from a poor one early, and with K-step windows the
model's positions count steps of a window, not of the episode. `return_scale` is the
largest |return| of the train split's episodes; the observation mean and std
are theirs too (`Encoding`).

Context: what the policy sees when it picks a_t, the same in training and in
the environment, for both models. `config.data.context_len` = K picks one of
two protocols:

  K > 0   the last K steps (Decision Transformer's protocol). Training windows
          are K steps starting at every step of every episode (cut at the
          episode's end; nbp.data.trajectories.Windows); at rollout the policy
          keeps a buffer of the last K steps' tokens and runs the model over
          it at every step, reading the output of the newest token. The
          context of a_t is steps max(0, t - K + 1)..t at window positions
          0..min(t, K - 1): exactly the training window that starts at step
          max(0, t - K + 1). The cost per step is a K-step forward pass, for
          Aaren too (a prefix state cannot forget its oldest step).
  K = 0   the whole episode (Aaren's point: constant memory over any length).
          Training windows are whole episodes from their first step, padded to
          the environment's time limit; at rollout the policy streams: its
          state starts empty at step 0 (Aaren's (m, u, w) per head and layer,
          the Transformer's KV cache, one jitted `sequence.step` for all
          episodes per step), so a_t is predicted from steps 0..t, as in
          training. The Transformer's KV cache must then hold a whole episode:
          make_task refuses config.model.max_len below the time limit.

Before this choice was made explicit the policy trained on 30-step windows and
rolled out over whole episodes, a context it had never seen.
`test_rollout_context_is_a_training_window` checks that the output the policy
acts on at step t is the model's output on that training-form context.

The configs use K = 30, chosen on validation: CartPole-v1, 210 scripted
episodes (19 validation), the tiny model, 500 steps, seed 0, 10 rollouts per
target on the validation split's environment seeds (measured with
nbp.training.loop.train_and_evaluate, 2 shared CPU cores):

  protocol (batch)                 model    val accuracy  return @500 (sd)  return @250
  K = 30 (32 windows)              aaren    0.880         449 (87)          192
                                   softmax  0.893         468 (96)          224
  whole episodes (4, ~1k tokens)   aaren    0.848         316 (162)         123
                                   softmax  0.864         391 (190)         136

At a like number of tokens per step the whole-episode protocol saw four
episodes per batch and fit worse; with 32 whole episodes per batch a step cost
16x the tokens (0.4 steps/s on these cores, past any local budget). K = 0
stays available for a larger budget, where it is the protocol that uses
Aaren's constant-memory streaming.

Loss: cross-entropy of a_t (discrete actions; metric `accuracy`) or the mean
squared error of the action in [-1, 1] (continuous), over the valid steps of
the windows.

Rollout (predict function "rollout", the rollout evaluator): B episodes of
config.data.env step together, one jitted policy step for all of them per time
step. R_0 is the target return and R_{t+1} = R_t - r_t. Discrete actions are
sampled from the predicted distribution (as DT does for discrete actions; `greedy=True` takes
the argmax instead): the behaviour data are epsilon-random around a controller,
and the argmax of such a mixture is the controller's action at every epsilon
below 1, so a greedy policy would hide what the return conditioning does.
Continuous actions are the prediction, clipped to the bounds.

Results: return_mean, return_std, length_mean, and normalized_score, the
D4RL-style 100 * (return - random) / (expert - random) averaged over episodes,
with (random, expert) = nbp.data.trajectories.REFERENCE_RETURNS for the four
classic-control environments (a random policy's and the scripted controller's
mean returns), else the lowest and highest episode return of the train split.
The default target return is the best return of the train split's episodes;
the encoding's statistics (observation mean and std, return scale) are the
train split's too. The rollout evaluator draws different environment seeds for
its validation and test splits.
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
from nbp.data import offline_rl_files
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


def make_encoding(episodes: offline_rl_files.Episodes, env: gym.Env) -> Encoding:
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


def window_len(context_len: int, horizon: int) -> int:
  """Steps per training window: K, or the environment's time limit for whole episodes (K = 0)."""
  if context_len < 0:
    raise ValueError(f"config.data.context_len={context_len} must be >= 0 (0: whole episodes)")
  return context_len or horizon


def make_data(data_cfg, episodes: offline_rl_files.Episodes, encoding: Encoding, split: str, *, seed: int,
              process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of {"inputs": float32 [b, K, F], "actions", "valid": bool [b, K]}."""
  k = int(data_cfg.context_len)
  source = trajectories.Windows(trajectories.split(episodes, split, data_cfg), window_len(k, encoding.horizon),
                                episode_starts=k == 0)
  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True,
      transforms=(Encode(encoding),), process_index=process_index, process_count=process_count,
      worker_count=data_cfg.worker_count)


# ---------------------------------------------------------------------------
# The policy: the same context as in training (see the module docstring).


def choose(discrete: bool, greedy: bool, outputs, rng):
  """Outputs [B, O] -> actions int32 [B] (sampled, or the argmax) or float32 [B, A] in [-1, 1]."""
  if not discrete:
    return jnp.clip(outputs, -1.0, 1.0)
  if greedy:
    return jnp.argmax(outputs, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, outputs, axis=-1).astype(jnp.int32)


def policy_step(model: Model, discrete: bool, greedy: bool, params, state, inputs, rng):
  """Whole episodes: one streaming step of every episode, inputs [B, F] -> (state, actions, outputs [B, O])."""
  state, outputs = sequence.step(model, params, state, inputs)
  return state, choose(discrete, greedy, outputs, rng), outputs


def window_policy_step(model: Model, discrete: bool, greedy: bool, params, state, inputs, rng):
  """The last K steps: state (tokens [B, K, F], steps seen int32) -> the window with `inputs` [B, F] appended.

  Until K steps are seen the window fills from position 0 (valid up to the
  newest); then it slides by one. The action is read at the newest position.
  """
  tokens, seen = state
  b, k, _ = tokens.shape
  tokens = jnp.where(seen >= k, jnp.roll(tokens, -1, axis=1), tokens)
  newest = jnp.minimum(seen, k - 1)
  tokens = jax.lax.dynamic_update_slice_in_dim(tokens, inputs[:, None].astype(tokens.dtype), newest, axis=1)
  valid = jnp.broadcast_to(jnp.arange(k) <= newest, (b, k))
  outputs = model.apply({"params": params}, tokens, valid=valid)  # [B, K, O]
  outputs = jax.lax.dynamic_index_in_dim(outputs, newest, axis=1, keepdims=False)
  return (tokens, seen + 1), choose(discrete, greedy, outputs, rng), outputs


def init_policy_state(model: Model, params, batch_size: int, context_len: int):
  """The empty context of `batch_size` episodes: a streaming state (K = 0) or an empty K-step window."""
  if context_len == 0:
    return _init_state(model, params, batch_size)
  return jnp.zeros((batch_size, context_len, model.input_dim), jnp.float32), jnp.array(0, jnp.int32)


_init_state = jax.jit(sequence.init_state, static_argnums=(0, 2))  # (model, params, B) -> the empty state


@functools.cache
def jitted_policy_step(model: Model, discrete: bool, greedy: bool, context_len: int):
  step = policy_step if context_len == 0 else window_policy_step
  return jax.jit(functools.partial(step, model, discrete, greedy))


def run_episodes(model: Model, encoding: Encoding, env_name: str, context_len: int, params, rng, *,
                 target_return: float, num_episodes: int, max_episode_steps: int | None = None,
                 greedy: bool = False) -> dict[str, np.ndarray]:
  """Episodes stepped together -> {"returns" [B], "lengths" [B], "inputs" [B, T, F], "outputs" [B, T, O],
  "actions" [B, T, ...]}.

  inputs, outputs (the model's, before the action is chosen) and actions hold
  every step the policy took (T the longest episode; steps after an episode's
  end are zeros). Episode i starts
  from `reset(seed)` with seeds drawn from `rng`, which also drives the action
  sampling; `max_episode_steps` shortens the time limit (None: the env's own).
  """
  envs = [gym.make(env_name, max_episode_steps=max_episode_steps) for _ in range(num_episodes)]
  horizon = envs[0].spec.max_episode_steps
  if context_len == 0:
    check_horizon(model, horizon, env_name)
  seed_key, action_key = jax.random.split(rng)
  seeds = np.asarray(jax.random.randint(seed_key, (num_episodes,), 0, 2 ** 31 - 1))
  observations = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)]).astype(np.float32)
  returns_to_go = np.full(num_episodes, target_return, np.float32)
  prev_actions = (np.full(num_episodes, -1, np.int32) if encoding.discrete
                  else np.zeros((num_episodes, encoding.action_dim), np.float32))
  returns = np.zeros(num_episodes)
  lengths = np.zeros(num_episodes, np.int64)
  done = np.zeros(num_episodes, bool)
  act = jitted_policy_step(model, encoding.discrete, greedy, context_len)
  state = init_policy_state(model, params, num_episodes, context_len)
  record = {"inputs": [], "outputs": [], "actions": []}
  for t in range(horizon):
    inputs = encoding.features(returns_to_go, observations, prev_actions, np.full(num_episodes, t))
    state, actions, outputs = act(params, state, jnp.asarray(inputs), jax.random.fold_in(action_key, t))
    actions = np.asarray(actions)
    env_actions = actions if encoding.discrete else encoding.unscale_actions(actions)
    running = ~done
    for name, value in (("inputs", inputs), ("outputs", np.asarray(outputs)), ("actions", actions)):
      record[name].append(np.where(running.reshape(-1, *[1] * (value.ndim - 1)), value, 0))
    for i in np.flatnonzero(running):
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
  return dict(returns=returns, lengths=lengths, **{name: np.stack(v, 1) for name, v in record.items()})


def rollout(model: Model, encoding: Encoding, env_name: str, context_len: int, references: tuple[float, float],
            default_target: float, params, rng, *, target_return: float | None = None, num_episodes: int = 10,
            max_episode_steps: int | None = None, greedy: bool = False) -> dict[str, float]:
  """`num_episodes` episodes of `env_name` conditioned on `target_return` -> returns and score (`run_episodes`)."""
  target = default_target if target_return is None else float(target_return)
  out = run_episodes(model, encoding, env_name, context_len, params, rng, target_return=target,
                     num_episodes=num_episodes, max_episode_steps=max_episode_steps, greedy=greedy)
  returns = out["returns"]
  random, expert = references
  score = 100.0 * (returns - random) / (expert - random if expert != random else 1.0)
  return {"return_mean": float(returns.mean()), "return_std": float(returns.std()),
          "normalized_score": float(score.mean()), "length_mean": float(out["lengths"].mean())}


def check_horizon(model: Model, horizon: int, env_name: str) -> None:
  """Whole episodes: a Transformer's KV cache (and a learned position table) must hold every step of one."""
  if (model.attention == "softmax" or model.position == "learned") and horizon > model.max_len:
    raise ValueError(f"config.model.max_len={model.max_len} is below the {horizon}-step episodes of {env_name}: "
                     f"the {'KV cache' if model.attention == 'softmax' else 'position table'} must hold a whole "
                     f"episode (config.data.context_len=0); set config.model.max_len >= {horizon}")


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
  train = trajectories.split(episodes, "train", data_cfg)
  encoding = make_encoding(train, env)
  if encoding.discrete and episodes.actions.size and episodes.actions.max() >= encoding.num_actions:
    raise ValueError(f"config.data: action {episodes.actions.max()} in the data, but config.data.env="
                     f"{data_cfg.env!r} has {encoding.num_actions} actions")
  model = tasks.build_model(Model, config.model)
  model = sequence.with_data_sizes(model, input_dim=encoding.input_dim, output_dim=encoding.action_dim,
                                   data=f"config.data.env={data_cfg.env!r}")
  context_len = int(data_cfg.context_len)
  k = window_len(context_len, encoding.horizon)
  if context_len == 0:
    check_horizon(model, env.spec.max_episode_steps, data_cfg.env)
  elif model.position == "learned" and model.max_len < k:
    raise ValueError(f"config.model.max_len={model.max_len} is below config.data.context_len={k}")
  env.close()
  train_returns = train.returns()
  references = trajectories.REFERENCE_RETURNS.get(
      data_cfg.env, (float(train_returns.min()), float(train_returns.max())))
  return tasks.Task(
      model=model,
      init_inputs=lambda: {"x": jnp.zeros((1, k, model.input_dim), jnp.float32)},
      loss=functools.partial(loss, model),
      data=functools.partial(make_data, data_cfg, episodes, encoding),
      predict_fns={
          "rollout": functools.partial(rollout, model, encoding, data_cfg.env, context_len, references,
                                       float(train_returns.max())),
      },
  )
