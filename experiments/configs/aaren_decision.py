r"""Aaren against a Transformer on offline RL: a return-conditioned policy (Decision-Transformer style).

Family "decision" (nbp.tasks.decision): nbp.models.sequence.SequenceModel reads
one token per time step, [return-to-go, observation, previous action], and
predicts the action; trained on K-step windows of trajectories collected once in
a gymnasium classic-control environment by a scripted controller with
epsilon-random actions at several levels (nbp.data.trajectories), then rolled
out in the environment step by step (Aaren's constant-size state, the
Transformer's KV cache over the whole episode). The only difference between
the two models is `config.model.attention`: "aaren" or "softmax".

Argument: "ATTENTION[,ENV][,local]", e.g. "aaren,cartpole,local". ENV is one of
cartpole (default), acrobot, mountaincar, pendulum (continuous actions), or a
gymnasium id of one of them. A user's D4RL .hdf5 or Minari dataset of the same
environment: `--config.data.path=...`.

Launch (CPU, 2 cores):
  python -m experiments.train --config experiments/configs/aaren_decision.py:aaren,local \
      --workdir runs/aaren_decision_local
and the same with `softmax,local`. The headline metrics are the rollouts at the
end, `rollout/return_mean@R` and `rollout/normalized_score@R` for the target
returns R in TARGETS (the expert's return and a middle one, 10 episodes each);
`eval/accuracy` is the action accuracy on held-out episodes.

`local`: the "tiny" model (2 layers, width 64, 4 heads, no position embedding:
the policy streams whole episodes, longer than its training windows; the time
step is an input feature), 210 collected CartPole episodes (59k steps, returns
10..500, mean 281; 21 held out), K = 30, batch 32, 500 steps, lr 2e-3, max_len
500 (a whole episode in the Transformer's KV cache). Without `local`: variant
"S", 1000 episodes, K = 50, batch 64, 5000 steps, lr 1e-3 (not yet run).

Measured (local, CartPole, seed 0, 2 CPU cores shared with other jobs, load
about 6; wall time of the whole command, compile, collection and rollouts
included; 10 episodes per target, sampled actions):

  attention  wall   eval/accuracy  return@500 (score)  return@250 (score)
  aaren      53 s   0.891          464 +- 65 (92.5)     226 +- 154 (42.7)
  softmax    48 s   0.893          442 +- 98 (87.8)     196 +- 90 (36.5)

The returns follow the target (the data's epsilon-0 episodes return 500, the
epsilon-0.5 ones about 130). Quick checks of the other environments (aaren, one
run): Acrobot after 50 steps -126 @-80 (score 90), Pendulum after 500 steps
-835 @-150 (score 33: the regression of an epsilon-uniform mixture is a weak
swing-up).
"""

from experiments.configs import aaren_common
from nbp.training import config as config_lib

ATTENTIONS = aaren_common.ATTENTIONS
ENVS = {"cartpole": "CartPole-v1", "acrobot": "Acrobot-v1", "mountaincar": "MountainCar-v0",
        "pendulum": "Pendulum-v1"}
# Target returns of the rollout evaluator: the expert's return and one in the middle of the data's range.
TARGETS = {"CartPole-v1": (500.0, 250.0), "Acrobot-v1": (-80.0, -150.0), "MountainCar-v0": (-120.0, -160.0),
           "Pendulum-v1": (-150.0, -400.0)}
MAX_STEPS = {"CartPole-v1": 500, "Acrobot-v1": 500, "MountainCar-v0": 200, "Pendulum-v1": 200}  # time limits


def get_config(arg: str = "aaren,local"):
  attention, name, local = aaren_common.parse_arg(arg, "aaren_decision.py", "ENV")
  env = ENVS.get(name.lower(), name) if name else "CartPole-v1"
  if env not in TARGETS:
    raise ValueError(f"aaren_decision.py: environment {env!r}; choose one of {sorted(ENVS)} or {sorted(TARGETS)}")
  c = config_lib.base_config()
  c.family = "decision"
  c.seed = 0

  c.model.attention = attention  # the switch between Aaren and the Transformer baseline
  c.model.variant = "tiny" if local else "S"  # nbp.models.sequence.SIZES
  c.model.position = "none"  # rollouts stream whole episodes, longer than the training windows
  c.model.max_len = MAX_STEPS[env]  # the Transformer's KV cache holds a whole episode
  c.model.dtype = "float32"

  c.data.name = "trajectories"
  c.data.env = env
  c.data.path = ""  # a user's D4RL/Minari file instead of collecting
  c.data.num_episodes = 210 if local else 1000  # collected once, cached under data.dir
  c.data.context_len = 30 if local else 50  # K steps per training window

  c.batch_size = 32 if local else 64
  c.num_steps = 500 if local else 5000
  c.optimizer.lr = 2e-3 if local else 1e-3
  c.optimizer.warmup_steps = 50 if local else 300
  c.optimizer.weight_decay = 0.01
  c.log_every = 50 if local else 100
  c.checkpoint_every = c.num_steps  # one checkpoint, at the end
  c.evals.eval = dict(type="loss", every=0, steps=4)  # held-out episodes: loss and action accuracy
  c.evals.rollout = dict(type="rollout", every=0, target_returns=TARGETS[env], num_episodes=10)
  del c.evals["sample"]  # no sampler: the rollout is the policy's evaluation
  c.lock()
  return c
