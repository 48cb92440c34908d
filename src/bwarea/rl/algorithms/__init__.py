"""RL algorithms, one file each, in a registry: ``get(name)`` -> the ``Algorithm`` class.

    base.py       the Algorithm interface; log-probs, exact KL and entropy, reward-to-go, the losses
    reinforce.py  REINFORCE: reward-to-go minus a leave-one-out or moving-average baseline
    grpo.py       GRPO: group-normalised rewards, clipped ratio
    ppo.py        PPO: a value head, GAE, whitening, clipped ratio, several epochs
    rloo.py       RLOO: the whole completion as one action, leave-one-out baseline (Ahmadian et al. 2024)
    q.py          Q: a learned action-value head Q(s, a) on the policy trunk, TD with a target network; trains
                  only that head (its own trainer, ``trainer_class``), for search (``bwarea.search``)

A new algorithm is one file defining ``ALGORITHM`` (an ``Algorithm`` subclass) and one line in ``REGISTRY``.
Every algorithm adds the exact KL(pi || pi_ref) over the actions at each decision and an optional entropy
bonus (the trainer does that). This module imports no torch until an algorithm or a helper is used, so the
CLI takes its ``--algo`` choices from ``REGISTRY`` cheaply.
"""

from __future__ import annotations

import importlib

from ...lazy import lazy_attributes

# name -> the module (in this package) defining it
REGISTRY = {"reinforce": "reinforce", "grpo": "grpo", "ppo": "ppo", "rloo": "rloo", "q": "q"}
ALGORITHMS = tuple(REGISTRY)

# helpers -> the module defining them (loaded on first use: ``from bwarea.rl import algorithms as alg; alg.gae``)
_HELPERS = {
    **{name: "base" for name in ("Algorithm", "REWARD_RANGE", "reward_scale", "masked_mean", "action_log_probs",
                                 "exact_kl", "entropy", "kl_and_entropy", "reward_to_go", "sequence_returns",
                                 "reinforce_loss", "clipped_loss")},
    "leave_one_out_baseline": "reinforce", "reinforce_advantages": "reinforce", "grpo_advantages": "grpo",
    "gae": "ppo", "whiten": "ppo", "value_loss": "ppo",
    "td_targets": "q", "td_loss": "q", "expected_values": "q",
}


def check_algorithm(name: str) -> str:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}: choose one of {', '.join(ALGORITHMS)}")
    return name


def get(name: str):
    """The Algorithm class registered as ``name`` (ValueError naming the choices if there is none)."""
    return importlib.import_module(f"{__name__}.{REGISTRY[check_algorithm(name)]}").ALGORITHM


__getattr__, _ = lazy_attributes(__name__, _HELPERS)


__all__ = ["REGISTRY", "ALGORITHMS", "check_algorithm", "get", *_HELPERS]
