"""Multi-turn text environments: the policy writes, the environment answers and rewards each turn.

An environment is any object with
    reset() -> str                               the opening prompt of a new episode
    step(text: str) -> (observation, reward, done)
where ``text`` is what the model wrote this turn, ``observation`` is appended to the transcript before the
model's next turn, and ``reward`` is credited to that turn's last action (see ``rollout.play_episodes``).
An environment may also set ``stop`` (a string): the turn then ends at the first written token whose text holds
it, as if the model had stopped there (TextWorld: "\n", one command per turn).

Built in: ``letters`` (the letter game, no dependencies) and ``textworld`` (TextWorld games from a folder; needs
``pip install 'bwarea[textworld]'``, imported only when a game is played).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .letters import LetterGame
from .textworld import TextWorldGame  # imports textworld itself only when a game is made


@runtime_checkable
class Environment(Protocol):
    def reset(self) -> str: ...

    def step(self, text: str) -> tuple[str, float, bool]: ...


ENVIRONMENTS = {"letters": LetterGame, "textworld": TextWorldGame}


def make_env(name: str, seed: int = 0, **options) -> Environment:
    """A built-in environment by name, seeded (each copy in a batch gets its own seed).

    options: the environment's own keywords (letters: turns, letters; textworld: games, max_turns,
    max_command_chars); one it does not take is a TypeError naming it."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}: choose one of {', '.join(ENVIRONMENTS)}")
    return ENVIRONMENTS[name](seed=seed, **options)


__all__ = ["Environment", "ENVIRONMENTS", "LetterGame", "TextWorldGame", "make_env"]
