"""Where a benchmark given ``--out STEM`` writes its files: STEM.json, STEM.md, STEM.png.

STEM is a name, not a file name with an ending to replace: its dots stay. ``--out logs/valtext-bc-600-0.25`` writes
``valtext-bc-600-0.25.json``, where ``Path.with_suffix`` would write ``valtext-bc-600-0.json`` and clobber the
0-fraction run's file. A stem given with one of these endings (``--out results/x.json``) is read without it.
"""

from pathlib import Path

ENDINGS = (".json", ".md", ".png")


def output(stem: Path | str, ending: str) -> Path:
    """STEM + ENDING, e.g. ``output("r/tau0.5", ".json") == Path("r/tau0.5.json")``."""
    stem = Path(stem)
    if stem.suffix in ENDINGS:
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ending)
