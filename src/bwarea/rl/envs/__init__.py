"""Multi-turn text environments: the policy writes, the environment answers and rewards each turn.

An environment is any object with
    reset() -> str                               the opening prompt of a new episode
    step(text: str) -> (observation, reward, done)
where ``text`` is what the model wrote this turn, ``observation`` is appended to the transcript before the
model's next turn, and ``reward`` is credited to that turn's last action (see ``rollout.play_episodes``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .letters import LetterGame


@runtime_checkable
class Environment(Protocol):
    def reset(self) -> str: ...

    def step(self, text: str) -> tuple[str, float, bool]: ...


ENVIRONMENTS = {"letters": LetterGame}


def make_env(name: str, seed: int = 0, **options) -> Environment:
    """A built-in environment by name, seeded (each copy in a batch gets its own seed)."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}: choose one of {', '.join(ENVIRONMENTS)}")
    return ENVIRONMENTS[name](seed=seed, **options)


__all__ = ["Environment", "ENVIRONMENTS", "LetterGame", "make_env"]
