"""What every algorithm shares: the ``Algorithm`` interface, and the maths over the 64 actions (log-probs,
exact KL and entropy, reward-to-go, the REINFORCE and clipped losses).

Every tensor here is laid out by *decision position*: column t of a (batch, seq) tensor belongs to the
action chosen at position t, the one that produced token t+1 (see ``rollout.Rollout``). So the policy's
logits at t line up with ``actions[:, t]`` with no shift, and ``action_mask`` says which columns are
real decisions (not prompt, padding, observations or anything after EOS).

Rewards reach these functions within +-2**32 (``reward_scale``: the trainer divides larger ones by a power
of two), and the normalisations (GRPO's group statistics, whitening) run in float64, so any finite reward
gives finite advantages.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

REWARD_RANGE = 2.0 ** 32  # rewards within +-2**32 are used as given


class Algorithm:
    """One policy-optimisation method: its defaults, its advantages and its loss. The trainer does the rest
    (rollouts, the exact KL to the reference and the entropy bonus, the update guard, checkpoints).

    A subclass sets ``name`` and ``defaults``, and overrides ``advantages`` and ``loss``; one that learns a
    value (``value_head = True``) also overrides ``value_loss``. One instance lives for a run and may keep
    state (``state``/``load_state`` put it into checkpoints).
    """

    name = ""
    # RLConfig fields left None take these values (group_size: samples per prompt; epochs and minibatches:
    # passes over each batch and minibatches per pass).
    defaults = {"group_size": 4, "epochs": 1, "minibatches": 1}
    value_head = False  # a value head on the policy's final hidden state trains with the policy
    # Why the algorithm compares the samples of one prompt, for one that needs group_size >= 2 (else None).
    needs_group: str | None = None

    def __init__(self, config):
        self.config = config

    @classmethod
    def check(cls, config) -> None:
        """ValueError naming a setting this algorithm cannot run with (defaults already filled in)."""
        if cls.needs_group and config.group_size < 2:
            raise ValueError(f"{cls.name} {cls.needs_group}: group_size must be >= 2")

    def advantages(self, rollout, values: torch.Tensor | None, reward_scale: float,
                   mean_over_processes: Callable[[torch.Tensor], float]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (advantages (batch, seq), value targets (batch, seq) or None), 0 off the decisions.

        rollout: the step's ``Rollout`` (rewards already divided by ``reward_scale``). values (batch, seq):
        the value head's predictions before the update, or None without a value head.
        mean_over_processes(scalar tensor) -> float: the mean of a statistic over every process's batch.
        """
        raise NotImplementedError

    def loss(self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
             action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(a) now and when sampled, advantages, decisions, all (batch, seq) -> (policy loss, clip fraction)."""
        raise NotImplementedError

    def value_loss(self, values: torch.Tensor, returns: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no value head")

    def state(self) -> dict:
        """What a checkpoint must keep for a resumed run to continue exactly (JSON values)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass


def reward_scale(max_abs: float) -> float:
    """The smallest power of two s >= 1 with max_abs / s <= 2**32.

    Dividing by a power of two is exact. Within 2**32, float32 losses, value targets, gradients and their
    squares stay far from overflow (float32 ends near 3.4e38 = 2**128).
    """
    if not max_abs > REWARD_RANGE:
        return 1.0
    scale = 2.0 ** math.ceil(math.log2(max_abs / REWARD_RANGE))
    while max_abs / scale > REWARD_RANGE:  # log2 rounding
        scale *= 2
    return scale


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


def kl_and_entropy(logits: torch.Tensor, ref_logits: torch.Tensor, action_mask: torch.Tensor):
    """Mean exact KL to the reference and mean entropy over the decisions -> (kl, entropy) scalars."""
    return masked_mean(exact_kl(logits, ref_logits), action_mask), masked_mean(entropy(logits), action_mask)


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


class ClippedObjective(Algorithm):
    """The loss of GRPO and PPO: the clipped ratio against the policy that sampled the batch."""

    def loss(self, logp, old_logp, advantages, action_mask):
        return clipped_loss(logp, old_logp, advantages, action_mask, self.config.clip)
