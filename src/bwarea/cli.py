"""The `bwarea` command: one entry point, a verb per task.

Each area of bwarea owns its verbs: a module listed in VERB_MODULES exposes ``register(subparsers)``, which
adds its sub-parsers and sets ``func`` on each. This file only wires them together and turns errors into one
line: ``bwarea VERB: error: ...`` (exit 2) for input the user can fix, the full traceback only with ``--debug``
or ``BWAREA_DEBUG=1``.

Building the parser imports neither torch nor transformers (verb modules import them inside their functions),
so ``bwarea --help`` and ``bwarea --version`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# module -> the verbs it registers (imported lazily so `bwarea --help` stays fast)
VERB_MODULES = [
    "bwarea.commands.inference",   # generate, actions, explore, convert
    "bwarea.commands.training",    # tokenizer, pretrain, bc, eval
    "bwarea.commands.rl",          # rl
    "bwarea.commands.serving",     # serve
    "bwarea.commands.search",      # search
]

EPILOG = """examples:
  bwarea generate "The king said"            # shipped default model, streamed
  bwarea actions "I like eating" --json      # inverse-dynamics action per token
  bwarea explore "The king said"             # next tokens under each of the 64 actions
  bwarea serve --port 8000                   # OpenAI-compatible server and web explorer
  bwarea <verb> --help                       # every verb has examples
  bwarea --debug <verb> ...                  # full traceback on errors (or BWAREA_DEBUG=1)
"""

DEBUG_HELP = "show the full traceback of an error (or set BWAREA_DEBUG=1)"

# Errors a user can fix from the command line: bad values, files and folders (missing, unreadable, read-only,
# malformed). bwarea raises BWAreaError (a ValueError) for its own checks.
USER_ERRORS = (ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bwarea", description="BWArea models: world model, inverse dynamics and policy.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the bwarea version and exit")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue  # an area not built yet registers nothing
        module.register(sub)
    _add_debug_flag(sub)
    return parser


def _add_debug_flag(subparsers_action) -> None:
    """`--debug` after the verb too (`bwarea generate ... --debug`). SUPPRESS keeps a verb's parser from
    resetting a `--debug` given before the verb."""
    for verb_parser in set(subparsers_action.choices.values()):
        if "--debug" not in verb_parser._option_string_actions:
            verb_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        for action in verb_parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_debug_flag(action)


def debug_requested(args=None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("BWAREA_DEBUG", "").lower() not in (
        "", "0", "false", "no")


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
    verb = " ".join(v for v in (args.verb, getattr(args, "tokenizer_verb", None)) if v)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug_requested(args):
            raise
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"bwarea {verb}: error: {describe(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug_requested(args):
            raise
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":  # torch's, for GPUs
            print(f"bwarea {verb}: error: out of memory ({describe(err).splitlines()[0]}); try a smaller "
                  "batch, model or input", file=sys.stderr)
            return 1
        print(f"bwarea {verb}: internal error: {type(err).__name__}: {describe(err)}\n"
              "  This is a bug in bwarea. Rerun with --debug (or BWAREA_DEBUG=1) for the traceback and report "
              "it with the command that caused it.", file=sys.stderr)
        return 1


def describe(err: BaseException) -> str:
    """The message of an error, made readable for the few library errors whose text names no file."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        target = f"{err.filename!r}" + (f" -> {err.filename2!r}" if err.filename2 is not None else "")
        return f"{err.strerror}: {target}"
    return str(err) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
