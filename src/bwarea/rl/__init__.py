"""Policy optimisation for BWArea: train only the policy over the 64 actions to maximise a reward.

    rollout.py     sample completions / multi-turn episodes; decisions laid out by position
    algorithms/    the algorithm registry, one file each (reinforce, grpo, ppo, rloo) and their shared maths
    rewards.py     TRL-style reward callables, weighted sets, a local reward model, bad-value handling
    tasks.py       built-in example tasks (keyword, length, sentiment)
    envs/          the Environment protocol and a built-in text game
    settings.py    RLConfig and the allowed range of every setting (torch-free: the CLI's parser is built from it)
    trainer.py     RLTrainer: rollouts and updates on the training engine (train/engine.py), the update guard

The names below load on first use (PEP 562), so ``bwarea.rl.settings`` imports without torch.
"""

from __future__ import annotations

from ..lazy import lazy_attributes

# public name -> the submodule defining it
_LAZY = {
    "Reward": "rewards", "RewardError": "rewards", "RewardTimeout": "rewards", "RewardModel": "rewards",
    "RewardSet": "rewards", "build_reward_set": "rewards", "load_reward": "rewards",
    "Rollout": "rollout", "play_episodes": "rollout", "sample_completions": "rollout",
    "RLConfig": "settings", "RLTrainer": "trainer", "RLStopped": "trainer", "default_prompts": "trainer",
    "load_prompts": "trainer",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
