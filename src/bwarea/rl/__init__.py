"""Policy optimisation for BWArea: train only the policy over the 64 actions to maximise a reward.

    rollout.py     sample completions / multi-turn episodes; decisions laid out by position
    algorithms.py  log-probs, exact KL and entropy, advantages (REINFORCE, GRPO, GAE), losses
    rewards.py     TRL-style reward callables, weighted sets, a local reward model, bad-value handling
    tasks.py       built-in example tasks (keyword, length, sentiment)
    envs/          the Environment protocol and a built-in text game
    trainer.py     RLTrainer (accelerate), checkpoints, metrics
"""

from .rewards import Reward, RewardError, RewardModel, RewardSet, build_reward_set, load_reward
from .rollout import Rollout, play_episodes, sample_completions
from .trainer import RLConfig, RLTrainer, default_prompts, load_prompts

__all__ = ["Reward", "RewardError", "RewardModel", "RewardSet", "build_reward_set", "load_reward", "Rollout",
           "play_episodes", "sample_completions", "RLConfig", "RLTrainer", "default_prompts", "load_prompts"]
