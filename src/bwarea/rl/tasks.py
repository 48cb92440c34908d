"""Built-in example tasks: rewards a small model can learn to earn on a CPU in minutes.

Each task is a TRL-style reward callable ``task(prompts, completions, **kw) -> list[float]``:

* ``keyword``: 1 when the completion uses one of the keywords as a word, else 0.
* ``length``: 1 at the target number of words, falling linearly to 0 at twice (or zero) that.
* ``sentiment``: a lexicon score in [-1, 1]: (positive - negative words) / words, scaled and clipped.

The defaults suit the shipped model (trained on Shakespeare and the King James Bible).
"""

from __future__ import annotations

import inspect
import re

WORD = re.compile(r"[A-Za-z']+")

POSITIVE = frozenset("""
love loved lovely loving joy joyful glad gladness happy happiness sweet sweetly fair good goodness gentle
kind kindly blessed bless blessing grace gracious merry delight delightful peace peaceful hope honest honour
honor noble praise rejoice smile beauty beautiful true truth dear dearest friend friends faithful mercy
comfort pleasure pleasant rich wise brave best better well""".split())

NEGATIVE = frozenset("""
hate hated hateful death dead die dies died kill killed murder evil wicked sin sinful sorrow sorrows grief
woe weep wept tears cry fear afraid foul false vile curse cursed wrath anger angry poor sick pain plague
blood bloody cruel shame fool foolish traitor villain enemy enemies war wretch wretched bitter dark
darkness worse worst ill""".split())


class Keyword:
    """1.0 when a completion contains any keyword as a whole word (case-insensitive), else 0.0."""

    def __init__(self, keywords: str | list[str] = ("love",)):
        if isinstance(keywords, str):
            keywords = [k for k in keywords.split(",") if k.strip()]
        keywords = [k.strip().lower() for k in keywords]
        if not keywords or not all(WORD.fullmatch(k) for k in keywords):
            raise ValueError(f"keyword task: keywords must be words (letters and '), got {keywords!r}")
        self.keywords = frozenset(keywords)
        self.__name__ = "keyword"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return [float(any(w.lower() in self.keywords for w in WORD.findall(c))) for c in completions]


class Length:
    """1 - |words - target| / target, floored at 0: the completion should be ``target_words`` words long."""

    def __init__(self, target_words: int = 8):
        if int(target_words) < 1:
            raise ValueError(f"length task: target_words must be >= 1, got {target_words}")
        self.target = int(target_words)
        self.__name__ = "length"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return [max(0.0, 1.0 - abs(len(WORD.findall(c)) - self.target) / self.target) for c in completions]


class Sentiment:
    """Lexicon sentiment: clip(scale * (positive - negative) / words, -1, 1); 0 for a completion without words."""

    def __init__(self, scale: float = 5.0):
        self.scale = float(scale)
        self.__name__ = "sentiment"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        scores = []
        for c in completions:
            words = [w.lower() for w in WORD.findall(c)]
            if not words:
                scores.append(0.0)
                continue
            balance = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
            scores.append(max(-1.0, min(1.0, self.scale * balance / len(words))))
        return scores


TASKS = {"keyword": Keyword, "length": Length, "sentiment": Sentiment}


def make_task(name: str, **options):
    """A built-in task by name, given the options it takes (others are ignored: one flag set serves all)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    cls = TASKS[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted and v is not None})


# Module-level functions, so `--reward bwarea.rl.tasks:keyword` works like any user module.
keyword = Keyword()
length = Length()
sentiment = Sentiment()
