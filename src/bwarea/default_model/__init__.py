"""The small BWArea model shipped inside the package, so every command works offline out of the box.

Its model card (MODEL_CARD.md beside this file) says how it was trained and how well it does.
"""

from pathlib import Path

DIR = Path(__file__).resolve().parent


def path() -> Path:
    """The folder of the shipped model; FileNotFoundError if this install lacks its weights."""
    if not (DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the shipped default model is missing from {DIR}; pass --model PATH")
    return DIR
