"""REINFORCE: advantage = reward-to-go minus a baseline (the leave-one-out mean of the other samples of the
same prompt, or a moving average of past rewards); loss = -A log pi(a)."""

from __future__ import annotations

import torch

from .base import Algorithm, reinforce_loss, reward_to_go, sequence_returns


def leave_one_out_baseline(returns: torch.Tensor, group: torch.Tensor,
                           valid: torch.Tensor | None = None) -> torch.Tensor:
    """(batch,) returns, (batch,) group ids -> (batch,) mean return of the *other* samples of each group.

    Unbiased (it does not depend on the sample's own actions). ``valid`` (batch,) bool leaves samples out
    (skipped rewards) of the others' means. A sample with no valid other gets baseline 0.
    """
    valid = torch.ones_like(group, dtype=torch.bool) if valid is None else valid.bool()
    kept = returns * valid
    sums = torch.zeros(int(group.max()) + 1, dtype=returns.dtype, device=returns.device).index_add_(0, group, kept)
    counts = torch.zeros_like(sums).index_add_(0, group, valid.to(returns.dtype))
    sums, counts = sums[group] - kept, counts[group] - valid.to(returns.dtype)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(returns))


def reinforce_advantages(rewards: torch.Tensor, action_mask: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Reward-to-go minus a per-sample baseline (batch,) -> (batch, seq), 0 off the decisions."""
    return (reward_to_go(rewards, action_mask) - baseline[:, None]) * action_mask


class Reinforce(Algorithm):
    name = "reinforce"
    defaults = {"group_size": 4, "epochs": 1, "minibatches": 1}

    def __init__(self, config):
        super().__init__(config)
        self.ema = None  # the moving average of past rewards, in the rewards' own (unscaled) units

    @classmethod
    def check(cls, config) -> None:
        if config.baseline == "loo" and config.group_size < 2:
            raise ValueError("a leave-one-out baseline needs group_size >= 2 (or use baseline 'ema')")

    def advantages(self, r, values, reward_scale, mean_over_processes):
        c = self.config
        returns = sequence_returns(r.rewards)
        if c.baseline == "loo":
            baseline = leave_one_out_baseline(returns, r.group, r.action_mask.any(-1))
        else:
            # The moving average is kept in the rewards' own units; the baseline is in the scaled ones.
            baseline = torch.full_like(returns, 0.0 if self.ema is None else self.ema / reward_scale)
            kept = r.action_mask.any(-1)
            mean = mean_over_processes(returns[kept].mean() if kept.any() else returns.new_zeros(())) * reward_scale
            self.ema = mean if self.ema is None else c.ema_decay * self.ema + (1 - c.ema_decay) * mean
        return reinforce_advantages(r.rewards, r.action_mask, baseline), None

    def loss(self, logp, old_logp, advantages, action_mask):
        return reinforce_loss(logp, advantages, action_mask), logp.new_zeros(())

    def state(self) -> dict:
        return {"ema": self.ema}

    def load_state(self, state: dict) -> None:
        self.ema = state.get("ema")


ALGORITHM = Reinforce
