"""The maths of policy optimisation over the 64 actions: log-probs, exact KL and entropy, advantages, losses.

Every tensor here is laid out by *decision position*: column t of a (batch, seq) tensor belongs to the
action chosen at position t, the one that produced token t+1 (see ``rollout.Rollout``). So the policy's
logits at t line up with ``actions[:, t]`` with no shift, and ``action_mask`` says which columns are
real decisions (not prompt, padding, observations or anything after EOS).

Three algorithms share these pieces:

* ``reinforce``: advantage = reward-to-go minus a baseline (leave-one-out mean of the other samples of
  the same prompt, or a moving average of past rewards); loss = -A log pi(a).
* ``grpo``: k samples per prompt; rewards normalised within each group (mean 0, std 1); the clipped
  ratio objective of PPO against the policy that sampled the batch.
* ``ppo``: a value head on the policy trunk; GAE advantages, whitened; clipped ratio; several epochs.

All three add the exact KL(pi || pi_ref) over the actions at every decision (not a sampled estimate) and
an optional entropy bonus.
"""

from __future__ import annotations

import torch

ALGORITHMS = ("reinforce", "grpo", "ppo")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask (same shape); 0 when the mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def action_log_probs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """logits (batch, seq, A), actions (batch, seq) -> log pi(actions) (batch, seq) at temperature 1."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, actions[..., None]).squeeze(-1)


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) summed over all actions at each position: (batch, seq, A) x2 -> (batch, seq)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the action distribution at each position: (batch, seq, A) -> (batch, seq)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----- advantages ---------------------------------------------------------------------------------------
def reward_to_go(rewards: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq) step rewards -> (batch, seq) sum of the rewards at this decision and after it.

    Single-turn rollouts carry one reward at their last decision, so every decision gets the sequence
    reward; in a multi-turn episode a decision is credited only with what came after it.
    """
    togo = rewards.flip(-1).cumsum(-1).flip(-1)
    return togo * action_mask


def sequence_returns(rewards: torch.Tensor) -> torch.Tensor:
    """(batch, seq) step rewards -> (batch,) total reward of each sample."""
    return rewards.sum(-1)


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


def grpo_advantages(rewards: torch.Tensor, step_mask: torch.Tensor, action_mask: torch.Tensor,
                    group: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (DeepSeekMath, process supervision form).

    rewards, step_mask (batch, seq): the rewards and where they were given (one per turn).
    Every reward is normalised by the mean and std of all rewards given in its group; a decision's
    advantage is the sum of the normalised rewards at or after it. With one reward per sample this is the
    usual outcome GRPO: A = (R - mean_group) / std_group for every decision of the sample.
    -> (batch, seq) advantages, 0 off the decisions; a group whose rewards are all equal gets 0.
    """
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
    return reward_to_go(normalised, action_mask)


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
    """Shift and scale x to mean 0, std 1 over the True entries of mask; 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) / (var.sqrt() + eps) * mask


# ----- losses -------------------------------------------------------------------------------------------
def reinforce_loss(logp: torch.Tensor, advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """-mean over decisions of A * log pi(a): the score-function estimate of -grad E[R]."""
    return -masked_mean(advantages.detach() * logp, action_mask)


def clipped_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, action_mask: torch.Tensor,
                 clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: -mean min(r A, clip(r, 1-e, 1+e) A), r = pi / pi_old.

    -> (loss, clip fraction: the share of decisions where the clipped term was the one taken).
    """
    ratio = torch.exp(logp - old_logp.detach())
    advantages = advantages.detach()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), action_mask)
    clip_frac = masked_mean((clipped < unclipped).float(), action_mask)
    return loss, clip_frac.detach()


def value_loss(values: torch.Tensor, returns: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """0.5 * mean squared error of the value head against the GAE returns, over the decisions."""
    return 0.5 * masked_mean((values - returns.detach()) ** 2, action_mask)


def kl_and_entropy(logits: torch.Tensor, ref_logits: torch.Tensor, action_mask: torch.Tensor):
    """Mean exact KL to the reference and mean entropy over the decisions -> (kl, entropy) scalars."""
    return masked_mean(exact_kl(logits, ref_logits), action_mask), masked_mean(entropy(logits), action_mask)


def check_algorithm(name: str) -> str:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}: choose one of {', '.join(ALGORITHMS)}")
    return name


__all__ = ["ALGORITHMS", "masked_mean", "action_log_probs", "exact_kl", "entropy", "reward_to_go",
           "sequence_returns", "leave_one_out_baseline", "reinforce_advantages", "grpo_advantages", "gae",
           "whiten", "reinforce_loss", "clipped_loss", "value_loss", "kl_and_entropy", "check_algorithm"]
