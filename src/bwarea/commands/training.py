"""The training verbs: `tokenizer train`, `pretrain` (stage 1, or `--baseline llama`), `bc` (stage 2), `eval`.

Settings come from the dataclass defaults, then a `--config` file (JSON or YAML, keys as the flag names), then
the flags given on the command line. Flags default to None here so that "not given" can be told apart.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..train.settings import BCConfig, PretrainConfig, add_flags, build_config  # the config idiom, as `bwarea rl`
from . import seed

FORMATTER = argparse.RawDescriptionHelpFormatter

PRETRAIN_EPILOG = """examples:
  bwarea tokenizer train --data corpus.txt --vocab-size 2048 --out tok
  bwarea pretrain --data corpus.txt --tokenizer tok --out runs/s1 --max-steps 2000 \\
      --hidden-size 256 --layers 4 --heads 4 --batch-size 32 --block-size 256
  bwarea pretrain --data corpus.txt --tokenizer tok --out runs/llama --baseline llama --max-steps 2000 ...
  bwarea pretrain --config s1.yaml --max-steps 500          # a config file, one setting overridden
  bwarea pretrain ... --out runs/s1 --resume                # continue a killed run from its last checkpoint
  accelerate launch --num_processes 4 -m bwarea.cli pretrain ...   # data-parallel (docs/training.md)

--batch-size is per process and micro-batch: one step sees batch-size x grad-accum x processes blocks."""

BC_EPILOG = """examples:
  bwarea bc --model runs/s1 --data corpus.txt --out runs/bc --max-steps 600
  bwarea bc ... --posterior-fraction 0.5 --posterior-lr 5e-4   # a longer posterior phase, its own peak rate
  bwarea bc ... --posterior-fraction 0                         # behaviour cloning only (fast)
  bwarea bc ... --posterior-positions 32                       # cheaper posterior steps, on 32 random positions
  bwarea bc --model runs/s1 --data corpus.txt --out runs/bc --policy-init keep --targets soft
  bwarea bc --model runs/bc --data corpus.txt --out runs/bc2 --policy-init keep --targets posterior
  bwarea bc ... --save-dtype bfloat16     # a complete model for bwarea generate --model runs/bc

The world model, inverse dynamics and codebook stay frozen; only the policy trains. The tokenizer and the block
size default to those of --model. By default the policy clones the inverse-dynamics actions for the first 75%
of the steps, then trains on the world model's posterior over actions (the exact LM likelihood, what lm_ppl
measures) for the last 25%, with the learning rate warmed up again: the posterior phase. A posterior step
scores all 64 actions at every position (about 20x a cloning step on a CPU); --posterior-positions scores a
random few per block instead. See docs/training.md."""

EVAL_EPILOG = """examples:
  bwarea eval runs/bc --data heldout.txt --json
  bwarea eval runs/llama --data heldout.txt --json        # a plain Llama: lm_ppl only
  bwarea eval --data heldout.txt --max-blocks 32           # the shipped default model
  bwarea eval runs/bc --lm-eval my_task --include-path tasks/   # lm-evaluation-harness tasks (local YAMLs)
  bwarea eval --lm-eval lambada_openai,hellaswag --limit 100      # registry tasks (their data from the Hub)

--data prints id_ppl, lm_ppl, bc_accuracy, codes_used and code_perplexity (see bwarea/evaluate.py); --lm-eval
prints lm-eval's metrics, scored with the exact mixture likelihood (docs/evaluating.md)."""

TOKENIZER_EPILOG = """examples:
  bwarea tokenizer train --data corpus.txt --vocab-size 2048 --out tok
  bwarea tokenizer train --data texts/ more.jsonl --vocab-size 4096 --out tok"""


def _parser(subparsers, name, help_text, epilog):
    return subparsers.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                                 epilog=epilog, formatter_class=FORMATTER)


def add_settings_flags(p, cls) -> None:
    """--config and a flag per setting of the stage's config dataclass (help text and defaults from its fields)."""
    p.add_argument("--config", metavar="FILE", help="JSON or YAML file of settings (keys as flag names); flags win")
    add_flags(p, cls, types={"seed": seed})


def register(subparsers) -> None:
    p = _parser(subparsers, "tokenizer", "tokenizer tools", TOKENIZER_EPILOG)
    tok_sub = p.add_subparsers(dest="tokenizer_verb", metavar="VERB")
    t = _parser(tok_sub, "train", "train a byte-level BPE tokenizer on text files", TOKENIZER_EPILOG)
    t.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files, folders or JSONL")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size, specials included")
    t.add_argument("--out", required=True, metavar="DIR", help="folder to write (transformers format)")
    t.add_argument("--min-frequency", type=int, default=2, help="least count for a merge (default 2)")
    t.set_defaults(func=run_tokenizer_train)
    p.set_defaults(func=lambda args, parser=p: parser.print_help() or 2)

    p = _parser(subparsers, "pretrain", "stage 1: train the world model, inverse dynamics and codebook",
                PRETRAIN_EPILOG)
    add_settings_flags(p, PretrainConfig)
    p.add_argument("--baseline", choices=["llama"], default=None,
                   help="train a plain transformers Llama of the world model's shape instead")
    p.set_defaults(func=run_pretrain)

    p = _parser(subparsers, "bc", "stage 2: clone the policy from the inverse-dynamics actions", BC_EPILOG)
    add_settings_flags(p, BCConfig)
    p.set_defaults(func=run_bc)

    p = _parser(subparsers, "eval",
                "held-out metrics of a model (id_ppl, lm_ppl, bc_accuracy, code usage) or lm-eval tasks",
                EVAL_EPILOG)
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the shipped model)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="held-out text: files, folders, JSONL")
    p.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated")
    p.add_argument("--include-path", metavar="DIR", help="folder of lm-eval task YAMLs (with --lm-eval)")
    p.add_argument("--limit", type=int, metavar="N", help="documents per lm-eval task (with --lm-eval)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model's)")
    p.add_argument("--block-size", type=int,
                   help="tokens per block, and lm-eval's longest window (default: as trained)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks (or lm-eval requests) per forward (default 8)")
    p.add_argument("--max-blocks", type=int, help="evaluate at most N blocks")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--cache-dir", metavar="DIR", help="packed-token cache (default ~/.cache/bwarea)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_eval)


def _run(stage, config) -> int:
    from ..train import TrainingDiverged, train
    try:
        metrics = train(stage, config)
    except TrainingDiverged as err:
        print(f"bwarea {stage.name}: {err}", file=sys.stderr)
        return 1
    from accelerate import PartialState
    if metrics and PartialState().is_main_process:
        print(json.dumps({"out": config.out, **metrics}))
    return 0


def run_pretrain(args) -> int:
    from ..train import BaselineStage, PretrainStage
    stage = BaselineStage() if args.baseline == "llama" else PretrainStage()
    return _run(stage, build_config(PretrainConfig, args))


def run_bc(args) -> int:
    from ..train import BCStage
    return _run(BCStage(), build_config(BCConfig, args))


def run_eval(args) -> int:
    from ..evaluate import evaluate, lm_eval_tasks
    from ..loading import check_device
    check_device(args.device)  # an unusable --device is one line, before anything loads
    if not args.data and not args.lm_eval:
        raise ValueError("eval needs --data PATH (held-out text) or --lm-eval TASKS (or both)")
    if not args.lm_eval and (args.include_path or args.limit is not None):
        raise ValueError(f"{'--include-path' if args.include_path else '--limit'} needs --lm-eval TASKS")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    result = {}
    if args.data:
        result = evaluate(args.model, args.data, tokenizer_path=args.tokenizer, block_size=args.block_size,
                          batch_size=args.batch_size, max_blocks=args.max_blocks, device=args.device,
                          cache_dir=args.cache_dir, progress=not args.json)
    if args.lm_eval:
        result.update(lm_eval_tasks(args.model, args.lm_eval, include_path=args.include_path,
                                    batch_size=args.batch_size, limit=args.limit, device=args.device,
                                    tokenizer_path=args.tokenizer, block_size=args.block_size))
    if args.json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        if key == "lm_eval":
            for task, metrics in value.items():
                for metric, number in metrics.items():
                    shown = f"{number:.4f}" if isinstance(number, float) else number
                    print(f"{task + ' ' + metric:>40}  {shown}")
        else:
            print(f"{key:>16}  {value:.4f}" if isinstance(value, float) else f"{key:>16}  {value}")
    return 0


def run_tokenizer_train(args) -> int:
    from ..tokenizer_train import train_tokenizer
    tokenizer = train_tokenizer(args.data, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"wrote a {len(tokenizer)}-token byte-level BPE tokenizer to {args.out}")
    return 0


if __name__ == "__main__":
    # `python -m bwarea.commands.training VERB ...`: these verbs alone (no other area's imports needed).
    parser = argparse.ArgumentParser(prog="bwarea", formatter_class=FORMATTER)
    register(parser.add_subparsers(dest="verb", metavar="VERB"))
    parsed = parser.parse_args()
    if not getattr(parsed, "func", None):
        parser.print_help()
        sys.exit(2)
    try:
        sys.exit(int(parsed.func(parsed) or 0))
    except (ValueError, FileNotFoundError) as err:
        print(f"bwarea {parsed.verb}: error: {err}", file=sys.stderr)
        sys.exit(2)
