"""PPO: a value head on the policy's final hidden state; GAE advantages, whitened; the clipped ratio; several
epochs of minibatches over each batch."""

from __future__ import annotations

import torch

from .base import ClippedObjective, masked_mean


def gae(rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the decisions of each row.

    rewards, values, action_mask (batch, seq). Columns that are not decisions (prompt, observations,
    padding) are skipped: the recursion runs from one decision to the next. The episode ends after the
    last decision (value 0). -> (advantages, returns) (batch, seq), 0 off the decisions.
    """
    mask = action_mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_gae = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * next_gae
        advantages[:, t] = torch.where(m, step, torch.zeros_like(step))
        next_value = torch.where(m, values[:, t], next_value)
        next_gae = torch.where(m, step, next_gae)
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Shift and scale x to mean 0, std 1 over the True entries of mask; 0 elsewhere (in float64, x's dtype out)."""
    dtype, x = x.dtype, x.double()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return ((x - mean) / (var.sqrt() + eps) * mask).to(dtype)


def value_loss(values: torch.Tensor, returns: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """0.5 * mean squared error of the value head against the GAE returns, over the decisions."""
    return 0.5 * masked_mean((values - returns.detach()) ** 2, action_mask)


class PPO(ClippedObjective):
    name = "ppo"
    defaults = {"group_size": 1, "epochs": 4, "minibatches": 2}
    value_head = True

    def advantages(self, r, values, reward_scale, mean_over_processes):
        adv, returns = gae(r.rewards, values, r.action_mask, self.config.gamma, self.config.lam)
        return whiten(adv, r.action_mask), returns

    def value_loss(self, values, returns, action_mask):
        return value_loss(values, returns, action_mask)


ALGORITHM = PPO
