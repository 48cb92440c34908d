"""The `bwarea` verbs, one module per area (see bwarea/cli.py)."""
