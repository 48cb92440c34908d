"""GRPO: k samples per prompt; rewards normalised within each group (mean 0, std 1); the clipped ratio
objective of PPO against the policy that sampled the batch."""

from __future__ import annotations

import torch

from .base import ClippedObjective, reward_to_go


def grpo_advantages(rewards: torch.Tensor, step_mask: torch.Tensor, action_mask: torch.Tensor,
                    group: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (DeepSeekMath, process supervision form).

    rewards, step_mask (batch, seq): the rewards and where they were given (one per turn).
    Every reward is normalised by the mean and std of all rewards given in its group; a decision's
    advantage is the sum of the normalised rewards at or after it. With one reward per sample this is the
    usual outcome GRPO: A = (R - mean_group) / std_group for every decision of the sample.
    -> (batch, seq) advantages in the dtype of rewards, 0 off the decisions; a group whose rewards are all
    equal gets 0. The statistics are taken in float64.
    """
    dtype, rewards = rewards.dtype, rewards.double()
    n_groups = int(group.max()) + 1
    given = step_mask.to(rewards.dtype)
    row_group = group[:, None].expand_as(rewards)
    count = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, row_group.reshape(-1), given.reshape(-1))
    total = torch.zeros_like(count).index_add_(0, row_group.reshape(-1), (rewards * given).reshape(-1))
    mean = total / count.clamp(min=1)
    sq = torch.zeros_like(count).index_add_(
        0, row_group.reshape(-1), (((rewards - mean[row_group]) ** 2) * given).reshape(-1))
    # Sample std (unbiased), as GRPO; one reward alone has no spread and gets advantage 0.
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    normalised = (rewards - mean[row_group]) / (std[row_group] + eps) * given
    return reward_to_go(normalised, action_mask).to(dtype)


class GRPO(ClippedObjective):
    name = "grpo"
    defaults = {"group_size": 4, "epochs": 1, "minibatches": 1}
    needs_group = "compares samples of the same prompt"

    def advantages(self, r, values, reward_scale, mean_over_processes):
        return grpo_advantages(r.rewards, r.step_mask, r.action_mask, r.group), None


ALGORITHM = GRPO
