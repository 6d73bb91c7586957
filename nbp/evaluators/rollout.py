"""Episodes in the environment with the policy acting step by step: the returns of an offline-RL policy.

`Task.rollout(params, rng, target_return=R, num_episodes=n)` runs n episodes
conditioned on the target return R (a return-conditioned policy) and returns
its numbers (mean and spread of the return, a normalised score, ...). One
rollout per target in `target_returns`; each number is logged as
"<name>/<key>@<target>". None in `target_returns` means the task's default
target.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass
class Evaluator:
  target_returns: tuple = (None,)  # returns to condition on; None: the task's default
  num_episodes: int = 10  # episodes per target return

  def run(self, context) -> dict[str, float]:
    s = context.setup
    if s.task.rollout is None:
      raise ValueError(f"config.evals: the rollout evaluator needs a control task; family {s.config.family!r} "
                       "has no rollout")
    out = {}
    for i, target in enumerate(self.target_returns):
      rng = jax.random.fold_in(context.rng, i)
      with s.context():
        result = s.task.rollout(context.params, rng, target_return=target, num_episodes=self.num_episodes)
      suffix = "" if target is None else f"@{target:g}"
      out.update({f"{k}{suffix}": float(v) for k, v in result.items()})
    out["uses_ema"] = float(context.params_name == "ema_params")
    return out
