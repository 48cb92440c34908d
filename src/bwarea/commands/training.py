"""The training verbs: `tokenizer train`, `pretrain` (stage 1, or `--baseline llama`), `bc` (stage 2), `eval`.

Settings come from the dataclass defaults, then a `--config` file (JSON or YAML, keys as the flag names), then
the flags given on the command line. Flags default to None here so that "not given" can be told apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

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
  bwarea bc --model runs/s1 --data corpus.txt --out runs/bc --max-steps 2000
  bwarea bc --model runs/s1 --data corpus.txt --out runs/bc --policy-init keep --targets soft
  bwarea bc --model runs/bc --data corpus.txt --out runs/bc2 --policy-init keep --targets posterior
  bwarea bc ... --save-dtype bfloat16     # a complete model for bwarea generate --model runs/bc

The world model, inverse dynamics and codebook stay frozen; only the policy trains. The tokenizer defaults to
the one in --model."""

EVAL_EPILOG = """examples:
  bwarea eval runs/bc --data heldout.txt --json
  bwarea eval runs/llama --data heldout.txt --json        # a plain Llama: lm_ppl only
  bwarea eval --data heldout.txt --max-blocks 32           # the shipped default model

Prints id_ppl, lm_ppl, bc_accuracy, codes_used and code_perplexity (see bwarea/evaluate.py)."""

TOKENIZER_EPILOG = """examples:
  bwarea tokenizer train --data corpus.txt --vocab-size 2048 --out tok
  bwarea tokenizer train --data texts/ more.jsonl --vocab-size 4096 --out tok"""


def _parser(subparsers, name, help_text, epilog):
    return subparsers.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                                 epilog=epilog, formatter_class=FORMATTER)


def _flag(p, name, **kwargs):
    kwargs.setdefault("default", None)
    p.add_argument(name, **kwargs)


def add_common_args(p) -> None:
    """Flags every training stage takes (defaults: bwarea.train.loop.TrainConfig)."""
    p.add_argument("--config", metavar="FILE", help="JSON or YAML file of settings (keys as flag names); flags win")
    _flag(p, "--data", nargs="+", metavar="PATH", help="training text: files, folders, JSONL with a \"text\" field")
    _flag(p, "--val-data", nargs="+", metavar="PATH", help="validation text (default: the end of each data file)")
    _flag(p, "--val-fraction", type=float, help="share of each file held out for validation (default 0.05)")
    _flag(p, "--tokenizer", metavar="DIR", help="tokenizer folder (bwarea tokenizer train)")
    _flag(p, "--out", metavar="DIR", help="run folder: checkpoints, metrics, the final model")
    _flag(p, "--cache-dir", metavar="DIR", help="packed-token cache (default ~/.cache/bwarea, or $BWAREA_CACHE)")
    _flag(p, "--block-size", type=int, help="tokens per training block (default 256)")
    _flag(p, "--max-steps", type=int, help="optimiser steps (default 1000)")
    _flag(p, "--batch-size", type=int, help="blocks per process per micro-batch (default 16)")
    _flag(p, "--grad-accum", type=int, help="micro-batches per optimiser step (default 1)")
    _flag(p, "--lr", type=float, help="peak learning rate (default 1e-3)")
    _flag(p, "--min-lr-ratio", type=float, help="final LR as a share of the peak (default 0.1)")
    _flag(p, "--warmup-steps", type=int, help="linear warm-up steps before the cosine (default 100)")
    _flag(p, "--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    _flag(p, "--grad-clip", type=float, help="gradient norm clip, 0 = off (default 1.0)")
    _flag(p, "--seed", type=int, help="seed for init and data order (default 0)")
    _flag(p, "--precision", choices=["auto", "bf16", "fp16", "no"], help="autocast (default auto: bf16 on GPUs)")
    _flag(p, "--save-every", type=int, help="checkpoint every N steps (default 500)")
    _flag(p, "--keep-last", type=int, help="checkpoints kept (default 2)")
    _flag(p, "--log-every", type=int, help="log metrics every N steps (default 10)")
    _flag(p, "--eval-every", type=int, help="validate every N steps, 0 = at the end only (default 0)")
    _flag(p, "--eval-blocks", type=int, help="validation blocks per evaluation (default 64)")
    _flag(p, "--save-dtype", choices=["float32", "bfloat16", "float16"], help="final weights dtype (default float32)")
    _flag(p, "--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _flag(p, "--overwrite", action="store_true", help="start again in an --out that holds a run")
    _flag(p, "--progress", action=argparse.BooleanOptionalAction, help="show the progress bar (default on)")


def add_shape_args(p, note: str = "") -> None:
    _flag(p, "--hidden-size", type=int, help="model width (default 256)" + note)
    _flag(p, "--layers", type=int, help="world-model layers (default 4)" + note)
    _flag(p, "--heads", type=int, help="attention heads (default 4)" + note)
    _flag(p, "--kv-heads", type=int, help="key/value heads (default: --heads)" + note)
    _flag(p, "--intermediate-size", type=int, help="MLP width (default about 8/3 x hidden)" + note)


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
    add_common_args(p)
    _flag(p, "--inverse-layers", type=int, help="inverse-dynamics layers (default layers/2)")
    _flag(p, "--policy-layers", type=int, help="policy layers (default layers)")
    _flag(p, "--action-layer", type=int, help="world-model block the action enters before (default layers/2)")
    _flag(p, "--num-actions", type=int, help="codebook size (default 64)")
    _flag(p, "--codebook-dim", type=int, help="codebook vector width (default 32)")
    _flag(p, "--max-positions", type=int, help="max_position_embeddings (default --block-size)")
    _flag(p, "--codebook", choices=["vq", "ema"], help="codebook updates: VQ losses or EMA (default vq)")
    _flag(p, "--commitment", type=float, help="commitment loss weight (default 0.25)")
    _flag(p, "--ema-decay", type=float, help="EMA codebook decay (default 0.99)")
    _flag(p, "--kmeans-init", action=argparse.BooleanOptionalAction, help="k-means codebook init (default on)")
    _flag(p, "--kmeans-batches", type=int, help="first steps' batches whose latents seed k-means (default 4)")
    _flag(p, "--dead-code-every", type=int, help="check for unused codes every N steps, 0 = off (default 50)")
    _flag(p, "--dead-code-threshold", type=float,
          help="reset codes used less than this share of an even usage (default 0.03)")
    _flag(p, "--entropy-bonus", type=float, help="weight of the soft code-usage entropy bonus (default 0)")
    add_shape_args(p)
    p.add_argument("--baseline", choices=["llama"], default=None,
                   help="train a plain transformers Llama of the world model's shape instead")
    p.set_defaults(func=run_pretrain)

    p = _parser(subparsers, "bc", "stage 2: clone the policy from the inverse-dynamics actions", BC_EPILOG)
    add_common_args(p)
    _flag(p, "--model", metavar="DIR", help="the stage-1 (pretrain) output folder")
    _flag(p, "--policy-init", choices=["world", "keep"], help="start the policy from the world model's weights "
          "(world, default) or as stage 1 left it (keep)")
    _flag(p, "--policy-layers", type=int, help="rebuild the policy with N blocks (default: the model's)")
    add_shape_args(p, " (bc: taken from --model; checked if given)")
    _flag(p, "--targets", choices=["inverse", "soft", "posterior"],
          help="what the policy imitates: the inverse-dynamics action (default), soft targets from codebook "
               "distances, or the world model's posterior given the next token (optimises lm_ppl; slower)")
    _flag(p, "--soft-temperature", type=float, help="temperature of --targets soft (default 1.0)")
    _flag(p, "--eval-lm", action=argparse.BooleanOptionalAction, help="measure lm_ppl when validating (default on)")
    p.set_defaults(func=run_bc)

    p = _parser(subparsers, "eval", "held-out metrics of a model: id_ppl, lm_ppl, bc_accuracy, code usage",
                EVAL_EPILOG)
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the shipped model)")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="held-out text: files, folders, JSONL")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model's)")
    p.add_argument("--block-size", type=int, help="tokens per block (default: as trained)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per forward (default 8)")
    p.add_argument("--max-blocks", type=int, help="evaluate at most N blocks")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--cache-dir", metavar="DIR", help="packed-token cache (default ~/.cache/bwarea)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_eval)


def load_config_file(path) -> dict:
    """A JSON or YAML settings file -> {field_name: value} (dashes in keys become underscores)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml
        values = yaml.safe_load(text)
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def build_config(cls, args):
    """Dataclass defaults <- --config file <- flags given on the command line -> a ``cls`` instance."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{args.config}: unknown settings {unknown}")
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    for key in ("data", "val_data"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    return cls(**values)


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
    from ..train import BaselineStage, PretrainConfig, PretrainStage
    stage = BaselineStage() if args.baseline == "llama" else PretrainStage()
    return _run(stage, build_config(PretrainConfig, args))


def run_bc(args) -> int:
    from ..train import BCConfig, BCStage
    return _run(BCStage(), build_config(BCConfig, args))


def run_eval(args) -> int:
    from ..evaluate import evaluate
    result = evaluate(args.model, args.data, tokenizer_path=args.tokenizer, block_size=args.block_size,
                      batch_size=args.batch_size, max_blocks=args.max_blocks, device=args.device,
                      cache_dir=args.cache_dir, progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
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
