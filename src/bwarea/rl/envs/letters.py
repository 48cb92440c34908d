"""The letter game: each turn the game names a letter; words that start with it score.

A turn's reward is the share of the turn's words that start with the named letter (0 for a turn with
no words). The letter changes every turn and is written into the transcript, so the policy has to read
it: a fixed habit cannot score on every turn. Letters are the common initial letters of English text,
so a language world model can write such words under the right actions.
"""

from __future__ import annotations

import random
import re

WORD = re.compile(r"[A-Za-z']+")
LETTERS = "tashwbmfdlcp"


class LetterGame:
    """reset() -> "Words with T:"; step(text) -> ("\\nWords with H:", share of words starting with T, done)."""

    def __init__(self, seed: int = 0, turns: int = 3, letters: str = LETTERS):
        if turns < 1:
            raise ValueError(f"letter game: turns must be >= 1, got {turns}")
        if not letters or not letters.isalpha():
            raise ValueError(f"letter game: letters must be a non-empty string of letters, got {letters!r}")
        self.rng, self.turns, self.letters = random.Random(seed), turns, letters.lower()
        self.letter, self.turn = None, 0

    def _ask(self) -> str:
        self.letter = self.rng.choice(self.letters)
        return f"Words with {self.letter.upper()}:"

    def reset(self) -> str:
        self.turn = 0
        return self._ask()

    def step(self, text: str) -> tuple[str, float, bool]:
        if self.letter is None:
            raise RuntimeError("letter game: call reset() before step()")
        words = WORD.findall(text)
        reward = sum(w.lower().startswith(self.letter) for w in words) / len(words) if words else 0.0
        self.turn += 1
        done = self.turn >= self.turns
        return ("" if done else "\n" + self._ask()), reward, done
