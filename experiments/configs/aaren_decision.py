r"""Aaren against a Transformer on offline RL: a return-conditioned policy (Decision-Transformer style).

Family "decision" (nbp.tasks.decision): nbp.models.sequence.SequenceModel reads
one token per time step, [return-to-go, observation, previous action], and
predicts the action; trained on trajectories collected once in a gymnasium
classic-control environment by a scripted controller with epsilon-random
actions at several levels (nbp.data.trajectories), then rolled out in the
environment step by step. The only difference between the two models is
`config.model.attention`: "aaren" or "softmax".

Argument: "ATTENTION[,ENV][,local]", e.g. "aaren,cartpole,local". ENV is one of
cartpole (default), acrobot, mountaincar, pendulum (continuous actions), or a
gymnasium id of one of them. A user's D4RL .hdf5 or Minari dataset of the same
environment: `--config.data.path=...`.

Context (nbp.tasks.decision): `config.data.context_len` K > 0 trains on K-step
windows and acts on the last K steps (Decision Transformer's protocol); K = 0
trains on whole episodes and acts on the whole episode so far, streaming
(Aaren's constant-memory state, the Transformer's KV cache of max_len >= the
time limit). Training and rollout see the same context either way. The
configs use K = 30, chosen on validation rollouts (the figures are in
nbp.tasks.decision); `--config.data.context_len=0` gives whole episodes.

Launch (CPU, 2 cores):
  python -m experiments.train --config experiments/configs/aaren_decision.py:aaren,local \
      --workdir runs/aaren_decision_local
and the same with `softmax,local`. The rollout evaluator runs 10 episodes per
target return R in TARGETS (the expert's return and a middle one) at the end on
validation seeds (rollout/return_mean@R, rollout/normalized_score@R), and
`eval_test_at_end` once more on test seeds (test/rollout/..., the headline);
`eval/accuracy` is the action accuracy on the validation episodes.

`local`: the "tiny" model (2 layers, width 64, 4 heads, no position embedding:
the time step is an input feature), 210 collected CartPole episodes (59k
steps, returns 10..500; 21 test episodes, 19 validation), batch 32, 500 steps,
lr 2e-3, max_len 500 (room for a whole episode in the Transformer's KV cache
under context_len=0). Without
`local`: variant "S", 1000 episodes, batch 64, 5000 steps, lr 1e-3 (not yet
run). Expected (local, seed 0, measured: 45-90 s on 2 shared cores): on the
validation seeds a return of 449 (aaren) and 468 (softmax) of 500 at target
500, 192 and 224 at target 250; a random policy returns 21. The test figures
over seeds 0-2 are experiments/benchmark_aaren.py's.
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
CONTEXT_LEN = 30  # K, chosen on validation rollouts against whole episodes (nbp.tasks.decision)


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
  c.model.position = "none"  # the time step in the episode is an input feature (nbp.tasks.decision)
  c.model.max_len = MAX_STEPS[env]  # whole episodes (context_len=0): the Transformer's KV cache holds one
  c.model.dtype = "float32"

  c.data.name = "trajectories"
  c.data.env = env
  c.data.path = ""  # a user's D4RL/Minari file instead of collecting
  c.data.num_episodes = 210 if local else 1000  # collected once, cached under data.dir
  c.data.context_len = CONTEXT_LEN  # K: the policy sees the last K steps, in training and rollout; 0: whole episodes

  c.batch_size = 32 if local else 64
  c.num_steps = 500 if local else 5000
  c.optimizer.lr = 2e-3 if local else 1e-3
  c.optimizer.warmup_steps = 50 if local else 300
  c.optimizer.weight_decay = 0.01
  c.log_every = 50 if local else 100
  c.checkpoint_every = c.num_steps  # one checkpoint, at the end
  c.evals.eval = dict(type="loss", pred="eval_loss", split="validation", every=0, steps=4)  # loss, accuracy
  c.evals.rollout = dict(type="rollout", pred="rollout", split="validation", every=0,
                         target_returns=TARGETS[env], num_episodes=10)
  del c.evals["sample"]  # no sampler: the rollout is the policy's evaluation
  c.eval_test_at_end = True  # the rollouts once more on the test split's environment seeds
  c.lock()
  return c
