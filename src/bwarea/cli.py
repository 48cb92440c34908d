"""The `bwarea` command: one entry point, a verb per task.

Each area of bwarea owns its verbs: a module listed in VERB_MODULES exposes ``register(subparsers)``, which
adds its sub-parsers and sets ``func`` on each. This file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> the verbs it registers (imported lazily so `bwarea --help` stays fast)
VERB_MODULES = [
    "bwarea.commands.inference",   # generate, actions, explore, convert
    "bwarea.commands.training",    # tokenizer, pretrain, bc, eval
    "bwarea.commands.rl",          # rl
    "bwarea.commands.serving",     # serve
]

EPILOG = """examples:
  bwarea generate "The king said"            # shipped default model, streamed
  bwarea actions "I like eating" --json      # inverse-dynamics action per token
  bwarea explore "The king said"             # next tokens under each of the 64 actions
  bwarea serve --port 8000                   # OpenAI-compatible server and web explorer
  bwarea <verb> --help                       # every verb has examples
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bwarea", description="BWArea models: world model, inverse dynamics and policy.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the bwarea version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue  # an area not built yet registers nothing
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from bwarea import __version__
        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, TypeError) as err:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"bwarea {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
