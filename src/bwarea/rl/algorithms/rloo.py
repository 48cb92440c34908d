"""RLOO: REINFORCE with a leave-one-out baseline over the group, the whole completion as one action
(Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs").

For k samples of a prompt with returns R_1..R_k, sample i's advantage is R_i - mean_{j != i} R_j, and the
loss is -mean over samples of A_i log pi(y_i | x), where log pi(y_i | x) sums the log-probs of every action
of the completion. Unlike ``reinforce`` (reward-to-go per decision, a mean over decisions), a multi-turn
episode credits each of its decisions with its whole return, and a longer completion weighs more, as in the
paper.
"""

from __future__ import annotations

from .base import Algorithm, sequence_returns
from .reinforce import leave_one_out_baseline


class RLOO(Algorithm):
    name = "rloo"
    defaults = {"group_size": 4, "epochs": 1, "minibatches": 1}
    needs_group = "takes its baseline from the other samples of the same prompt"

    def advantages(self, r, values, reward_scale, mean_over_processes):
        valid = r.action_mask.any(-1)
        returns = sequence_returns(r.rewards)
        advantage = (returns - leave_one_out_baseline(returns, r.group, valid)) * valid
        return advantage[:, None] * r.action_mask, None

    def loss(self, logp, old_logp, advantages, action_mask):
        # Every decision of a sample carries the same advantage: sum A log pi over them is A log pi(y | x).
        per_sample = (advantages.detach() * logp * action_mask).sum(-1)
        samples = action_mask.any(-1)
        return -(per_sample.sum() / samples.sum().clamp(min=1)), logp.new_zeros(())


ALGORITHM = RLOO
