"""TextWorld games (Microsoft's text-adventure generator) as a multi-turn environment.

    env = TextWorldGame("games/", seed=3, max_turns=8)   # plays games/*.z8 | *.ulx, game chosen by the seed
    prompt = env.reset()                                 # the game's opening text, ending in "\\n>"
    observation, reward, done = env.step(" take coin\\n")

The transcript the model sees, and the one ``transcript`` writes for pretraining, is one format:

    <objective and first room>
    > take coin
    You pick up the coin from the ground.
    Your score has just gone up by one point.
    *** The End ***

The game's text is cleaned so a small model does not spend its context on decoration: the ASCII-art banner,
the status line (room name and score after the prompt), the "RESTART, RESTORE ..." question after the end
and runs of blank lines are dropped. Nothing else is changed.

How a turn's text becomes a command (``command_of``): the first line that holds a letter, lower-cased, with
anything but letters, digits, spaces and - ' , . (a leading ">", a backslash the interpreter would take as its
own escape) made a space, spaces collapsed, cut to ``max_command_chars``. A turn ends at the model's first
newline (``stop``: the rollout cuts the turn there), so normally the model writes exactly one command line.
A turn with no letters is not sent to the game: it answers "Write a command, such as 'look'." and scores 0.

Reward: the change of the game's score this turn (TextWorld's points), so an episode's rewards sum to its
final score. ``score``, ``max_score``, ``won`` and ``normalised_score`` describe the episode for evaluation.
An episode ends when the game does (won or lost) or after ``max_turns`` commands.

textworld is an optional dependency: ``pip install 'bwarea[textworld]'``. Only using this environment needs it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

GAME_SUFFIXES = (".z8", ".ulx")
INSTALL_HINT = "the textworld environment needs the textworld package: pip install 'bwarea[textworld]'"
NO_COMMAND = "Write a command, such as 'look'."

_STATUS = re.compile(r"^>\s{2,}.*$", re.MULTILINE)            # ">      -= Kitchen =-5/6": the status line
_QUESTION = re.compile(r"Would you like to RESTART, RESTORE.*$", re.DOTALL)


class TextWorldMissing(ImportError, ValueError):
    """textworld is not installed. An ImportError, and a ValueError so ``bwarea rl`` prints it as bad input (one
    line saying how to install it), not as a bug."""


def require_textworld():
    """-> the textworld module, or TextWorldMissing saying how to install it."""
    try:
        import textworld
    except ImportError as err:
        raise TextWorldMissing(f"{INSTALL_HINT} ({err})") from err
    return textworld


def find_games(games) -> list[Path]:
    """A folder (searched recursively), one game file, or a list of game files -> sorted game paths.

    FileNotFoundError / ValueError name the input when nothing playable is there."""
    if isinstance(games, (list, tuple)):
        paths = [Path(g) for g in games]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"textworld: no game file {missing[0]!r}")
    else:
        root = Path(games)
        if root.is_file():
            paths = [root]
        elif root.is_dir():
            paths = [p for p in root.rglob("*") if p.suffix in GAME_SUFFIXES and p.is_file()]
        else:
            raise FileNotFoundError(f"textworld: no games folder or file {str(root)!r}")
    bad = [str(p) for p in paths if p.suffix not in GAME_SUFFIXES]
    if bad:
        raise ValueError(f"textworld: {bad[0]!r} is not a game file ({' or '.join(GAME_SUFFIXES)})")
    if not paths:
        raise ValueError(f"textworld: no {' or '.join(GAME_SUFFIXES)} games in {str(games)!r} "
                         "(make some with: tw-make tw-coin_collector --level 1 --seed 1 --output DIR/game.z8)")
    return sorted(paths)


def clean(text: str) -> str:
    """The game's text without the banner, the status line, the end-of-game question and blank lines."""
    text = _QUESTION.sub("", _STATUS.sub("", text))
    # The banner is the only text without a letter or digit on its line; blank lines go with it.
    lines = [line.strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if re.search(r"[A-Za-z0-9]", line))


def command_of(text: str, max_chars: int = 80) -> str:
    """The command a turn's text gives: its first line with a letter, lower-cased, with every character but
    letters, digits, spaces and - ' , . made a space (a backslash would reach the interpreter as one of its own
    escape commands), spaces collapsed, cut to ``max_chars``."""
    for line in text.splitlines():
        if re.search(r"[A-Za-z]", line):
            command = " ".join(re.sub(r"[^a-z0-9 ,.'-]", " ", line.lower()).split())
            return command[:max_chars].strip()
    return ""


class TextWorldGame:
    """One TextWorld game per episode, chosen from ``games`` by ``seed`` (game ``seed % len(games)`` in sorted
    order, so seeds 0..n-1 play each game once).

    games: a folder of .z8/.ulx games (searched recursively), one game file, or a list of them.
    max_turns: commands per episode at most. max_command_chars: longer commands are cut.
    infos: extra ``textworld.EnvInfos`` fields to ask the game for (e.g. "admissible_commands",
    "policy_commands"); the game's latest state, with them, is ``self.state`` (a corpus builder or a search reads
    the commands there; the policy only ever sees the text).
    """

    stop = "\n"  # the rollout ends a turn at the first token holding a newline: one command per turn

    def __init__(self, games=None, seed: int = 0, max_turns: int = 8, max_command_chars: int = 80,
                 infos: tuple[str, ...] = ()):
        if games is None:
            raise ValueError("textworld: give the games to play (--games DIR)")
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"textworld: max_turns must be an integer >= 1, got {max_turns!r}")
        if isinstance(max_command_chars, bool) or not isinstance(max_command_chars, int) or max_command_chars < 1:
            raise ValueError(f"textworld: max_command_chars must be an integer >= 1, got {max_command_chars!r}")
        self._textworld = require_textworld()
        self.games = find_games(games)
        self.game = self.games[seed % len(self.games)]
        self.max_turns, self.max_command_chars = max_turns, max_command_chars
        unknown = [name for name in infos if name not in self._textworld.EnvInfos.__slots__]
        if unknown:
            raise ValueError(f"textworld: unknown infos field {unknown[0]!r}")
        self.infos = tuple(infos)
        self._env, self.state = None, None
        self.turn, self.score, self.max_score, self.won, self.lost, self.done = 0, 0, 0, False, False, False
        self.commands: list[str] = []

    @property
    def normalised_score(self) -> float:
        """Score as a share of the game's maximum (0 for a game without points)."""
        return self.score / self.max_score if self.max_score else 0.0

    def _start(self):
        tw = self._textworld
        infos = tw.EnvInfos(score=True, max_score=True, won=True, lost=True, **{name: True for name in self.infos})
        try:
            with warnings.catch_warnings():
                # jericho does not know TextWorld's games and says so; TextWorld keeps the score itself.
                warnings.filterwarnings("ignore", message=".*is not fully supported.*")
                return tw.start(str(self.game), request_infos=infos)
        except Exception as err:  # textworld raises a variety of errors for unreadable games
            raise ValueError(f"textworld: cannot start game {str(self.game)!r}: {err}") from err

    def reset(self) -> str:
        self.close()
        self._env = self._start()
        state = self.state = self._env.reset()
        self.turn, self.score, self.won, self.lost, self.done = 0, 0, False, False, False
        self.max_score = int(state.get("max_score") or 0)
        self.commands = []
        return clean(state.feedback) + "\n>"

    def step(self, text: str) -> tuple[str, float, bool]:
        if self._env is None:
            raise RuntimeError("textworld: call reset() before step()" if not self.done else
                               "textworld: the episode is over; call reset() to start another")
        command = command_of(text, self.max_command_chars)
        self.commands.append(command)
        self.turn += 1
        reward = 0.0
        if command:
            state, score, game_over = self._env.step(command)
            self.state = state
            reward = float(score - self.score)
            self.score, self.won, self.lost = score, bool(state.get("won")), bool(state.get("lost"))
            feedback = clean(state.feedback)
        else:
            game_over, feedback = False, NO_COMMAND
        self.done = bool(game_over) or self.turn >= self.max_turns
        if self.done:
            self.close()
        # The model's line normally ends in its newline; if it was cut before one, the answer starts a new line.
        lead = "" if text.endswith("\n") else "\n"
        return lead + feedback + ("" if self.done else "\n>"), reward, self.done

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to free
            pass


def transcript(game, commands: list[str], max_turns: int | None = None) -> tuple[str, dict]:
    """Play ``commands`` in ``game`` -> (the transcript in the environment's format, episode stats).

    The text is what the model would see had it written those commands (each as " command\\n"), so a corpus of
    walkthroughs and exploratory play teaches exactly the format ``TextWorldGame`` plays. Stops at the game's end.
    stats: {"score", "max_score", "won", "turns"}.
    """
    env = TextWorldGame([game], max_turns=max_turns or max(1, len(commands)))
    parts = [env.reset()]
    for command in commands:
        observation, _, done = env.step(f" {command}\n")
        parts.append(f" {command}\n{observation}")
        if done:
            break
    env.close()
    return "".join(parts), {"score": env.score, "max_score": env.max_score, "won": env.won, "turns": env.turn}


__all__ = ["TextWorldGame", "TextWorldMissing", "clean", "command_of", "find_games", "transcript", "require_textworld",
           "INSTALL_HINT"]
