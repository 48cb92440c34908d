"""The `bwarea` verbs, one module per area (see bwarea/cli.py), and the argument types they share.

Verb modules import torch and transformers inside their functions only: building the parser must stay cheap.
"""

from __future__ import annotations

import argparse

SEED_LIMIT = 2**32  # numpy's legacy seeding (accelerate's set_seed) takes [0, 2**32)


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None


def port(text: str) -> int:
    """A TCP port to listen on: 1..65535."""
    value = _integer(text, "port")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {value}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**32), which torch, numpy and Python's random all take."""
    value = _integer(text, "seed")
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**32), got {value}")
    return value
