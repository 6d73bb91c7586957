"""Episodes in the environment with the policy acting step by step: the returns of an offline-RL policy.

The task's "rollout" predict function (params, rng, target_return=R,
num_episodes=n) runs n episodes
conditioned on the target return R (a return-conditioned policy) and returns
its numbers (mean and spread of the return, a normalised score, ...). One
rollout per target in `target_returns`; each number is logged as
"<name>/<key>@<target>". None in `target_returns` means the task's default
target.

Splits. An environment has no stored splits: the episodes' randomness (the
environment's seeds) comes from the evaluator's key folded with the split's
index, so validation and test episodes are different draws, and the test
episodes are never looked at while choosing.
"""

from __future__ import annotations

import dataclasses

import jax

from nbp.data import splits


@dataclasses.dataclass
class Evaluator:
  target_returns: tuple = (None,)  # returns to condition on; None: the task's default
  num_episodes: int = 10  # episodes per target return
  pred: str = "rollout"  # the task's rollout
  split: str = "validation"  # which draw of episodes: validation and test see different environment seeds

  def run(self, context) -> dict[str, float]:
    s = context.setup
    rollout = s.task.predict_fn(self.pred, who="the rollout evaluator")
    out = {}
    split_rng = jax.random.fold_in(context.rng, splits.SPLITS.index(splits.check(context.split_of(self), "a rollout")))
    for i, target in enumerate(self.target_returns):
      rng = jax.random.fold_in(split_rng, i)
      with s.context():
        result = rollout(context.params, rng, target_return=target, num_episodes=self.num_episodes)
      suffix = "" if target is None else f"@{target:g}"
      out.update({f"{k}{suffix}": float(v) for k, v in result.items()})
    out["uses_ema"] = float(context.params_name == "ema_params")
    return out
