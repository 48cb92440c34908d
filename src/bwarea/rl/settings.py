"""RL settings: ``RLConfig`` (every field with its help text, as ``bwarea rl`` shows it) and the allowed range
of every numeric setting, checked in one place. No torch here: the CLI builds its parser from this module.

``RLConfig.check`` checks every field with ``check_setting``; ``bwarea rl`` checks each flag with it as the
flag is parsed, so ``--kl-coef nan`` stops before anything loads, with the flag named. Settings come from the
field defaults <- a ``--config`` file <- flags, as for the training stages (``bwarea.train.settings``).
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass

from ..train.settings import setting
from .algorithms import ALGORITHMS

DEFAULT_TIMEOUT = 300.0  # seconds per reward/environment call: generous for a reward model on a CPU, finite

# name -> (test, what the test asks for). Every float must also be finite: NaN compares False with
# everything, so a NaN setting would otherwise slip through a `< 0` check and poison the loss.
FLOAT_SETTINGS = {
    "lr": (lambda v: 0 < v <= 1, "> 0 and <= 1"),  # AdamW moves each weight by about lr per step
    "temperature": (lambda v: v > 0, "> 0"),
    "top_p": (lambda v: 0 < v <= 1, "> 0 and <= 1"),
    "kl_coef": (lambda v: v >= 0, ">= 0"),
    "entropy_coef": (lambda v: v >= 0, ">= 0"),
    "vf_coef": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "clip": (lambda v: 0 < v < 1, "> 0 and < 1"),
    "ema_decay": (lambda v: 0 <= v < 1, ">= 0 and < 1"),
    "gamma": (lambda v: 0 <= v <= 1, ">= 0 and <= 1"),
    "lam": (lambda v: 0 <= v <= 1, ">= 0 and <= 1"),
    "reward_timeout": (lambda v: v >= 0, ">= 0 seconds (0: no limit)"),
}

# name -> (smallest, largest or None)
INT_SETTINGS = {
    "steps": (1, None), "batch_size": (1, None), "group_size": (1, None), "max_new_tokens": (1, None),
    "epochs": (1, None), "minibatches": (1, None), "max_turns": (1, None), "save_every": (1, None),
    "keep_checkpoints": (1, None), "max_prompt_tokens": (1, None), "top_k": (1, None), "max_bad_steps": (1, None),
    "seed": (0, 2**32 - 1),
}


def check_setting(name: str, value):
    """-> value, or ValueError naming the setting, the range and the value given."""
    if name in FLOAT_SETTINGS:
        test, want = FLOAT_SETTINGS[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or not test(value):
            raise ValueError(f"{name} must be {want}, a finite number; got {value!r}")
        return value
    low, high = INT_SETTINGS[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low \
            or (high is not None and value > high):
        want = f">= {low}" if high is None else f">= {low} and <= {high}"
        raise ValueError(f"{name} must be {want}, an integer; got {value!r}")
    return value


@dataclass
class RLConfig:
    """Hyper-parameters of a run. ``None`` fields take the algorithm's default (``check`` fills them in)."""

    algo: str = setting("grpo", "policy optimisation algorithm", choices=ALGORITHMS, group="optimisation")
    steps: int = setting(100, "steps, each a rollout and its policy update", group="optimisation")
    batch_size: int = setting(8, "prompts (or episodes) per step, per process", group="optimisation")
    group_size: int | None = setting(None, "samples per prompt (default: grpo, reinforce, rloo 4; ppo 1)",
                                     group="optimisation")
    max_new_tokens: int = setting(24, "tokens written per completion (per turn in an environment)",
                                  group="sampling")
    temperature: float = setting(1.0, "token sampling temperature of the world model (actions are always "
                                 "sampled at temperature 1)", group="sampling")
    top_k: int | None = setting(None, "token sampling: keep the k likeliest tokens", group="sampling")
    top_p: float = setting(1.0, "token sampling: nucleus probability mass", group="sampling")
    max_prompt_tokens: int = setting(64, "longer prompts keep their last tokens", group="sampling")
    lr: float = setting(1e-4, "learning rate (AdamW)", group="optimisation")
    kl_coef: float = setting(0.05, "weight of the exact KL to the starting policy", group="optimisation")
    entropy_coef: float = setting(0.0, "entropy bonus", group="optimisation")
    clip: float = setting(0.2, "grpo/ppo ratio clip", group="optimisation")
    epochs: int | None = setting(None, "passes over each batch (default: ppo 4, others 1)", group="optimisation")
    minibatches: int | None = setting(None, "minibatches per pass (default: ppo 2, others 1)", group="optimisation")
    baseline: str = setting("loo", "reinforce baseline: leave-one-out within the group, or a moving average",
                            choices=("loo", "ema"), group="optimisation")
    ema_decay: float = setting(0.9, "reinforce: decay of the moving-average baseline", group="optimisation")
    gamma: float = setting(1.0, "ppo discount", group="optimisation")
    lam: float = setting(0.95, "ppo GAE lambda", group="optimisation")
    vf_coef: float = setting(0.5, "ppo value loss weight", group="optimisation")
    max_grad_norm: float = setting(1.0, "gradient norm clip (0: no clipping)", group="optimisation")
    max_turns: int = setting(3, "environment: turns per episode", group="rewards")
    seed: int = setting(0, "random seed, in [0, 2**32)", group="optimisation")
    save_every: int = setting(50, "checkpoint every N steps (and at the end)", group="optimisation")
    keep_checkpoints: int = setting(2, "checkpoints kept", group="optimisation")
    tensorboard: bool = setting(True, "write TensorBoard scalars (where TensorBoard is installed)",
                                group="optimisation")
    max_bad_steps: int = setting(3, "stop after this many steps in a row with a NaN/inf loss or gradient",
                                 group="optimisation")
    reward_timeout: float = setting(DEFAULT_TIMEOUT, "longest a reward or environment call may take before the "
                                    "run stops (0: no limit). Calls run in a worker thread; one that overruns is "
                                    "abandoned", metavar="SECONDS", group="rewards")

    def check(self) -> None:
        """Fill the algorithm's defaults into the None fields and check every field (ValueError naming it)."""
        from .algorithms import get  # imports torch: only when a run is set up, not when the CLI parses

        algorithm = get(self.algo)
        for name, value in algorithm.defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in (*INT_SETTINGS, *FLOAT_SETTINGS):
            if not (name == "top_k" and self.top_k is None):
                check_setting(name, getattr(self, name))
        if self.baseline not in ("loo", "ema"):
            raise ValueError(f"baseline must be 'loo' or 'ema', got {self.baseline!r}")
        if not isinstance(self.tensorboard, bool):
            raise ValueError(f"tensorboard must be true or false, got {self.tensorboard!r}")
        algorithm.check(self)
        if (self.batch_size * self.group_size) % self.minibatches:
            raise ValueError(f"minibatches {self.minibatches} must divide the {self.batch_size * self.group_size} "
                             "samples of a step")

    def resolved(self) -> "RLConfig":
        """A checked copy (``check``), with the algorithm's defaults filled in."""
        c = copy.copy(self)
        c.check()
        return c


__all__ = ["DEFAULT_TIMEOUT", "FLOAT_SETTINGS", "INT_SETTINGS", "RLConfig", "check_setting"]
