"""The one way training stages and RL take their settings: a dataclass whose fields carry their help text,
filled from the field defaults <- a ``--config`` file (JSON or YAML, keys as the flag names) <- the flags given
on the command line, and checked by the dataclass's ``check()``.

    @dataclass
    class MyConfig:
        lr: float = setting(1e-3, "peak learning rate")

    add_flags(parser, MyConfig)                    # --lr, with the help text and the default shown
    config = build_config(MyConfig, parser.parse_args())
    config.check()

Torch-free: the CLI builds its parsers from these without loading torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path


def setting(default, help: str, **flag):
    """A dataclass field with its help text (and extra ``add_argument`` keywords for its flag: type, choices,
    metavar, group). A list default is copied per instance."""
    metadata = {"help": help, "flag": flag}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def finite_number(text: str) -> float:
    """argparse type: a finite number (NaN and infinities are refused at once, not at the first bad step)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def add_flags(parser, cls, skip=(), groups: dict | None = None, types: dict | None = None) -> None:
    """One ``--flag-name`` per field of dataclass ``cls`` that has help text (``skip`` aside), its type from the
    field's (int; float: finite numbers; list: one or more values). Flags default to None, so that a flag not
    given leaves the --config file's value or the field's default; booleans get ``--name/--no-name``.
    groups: {group name: argparse group} for fields whose flag names a ``group``; types: {field name: argparse
    type} (a check that runs as the flag is parsed)."""
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        kwargs = dict(f.metadata["flag"])
        target = (groups or {}).get(kwargs.pop("group", None), parser)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = str(f.type).split("|")[0].strip()
        if f.name in (types or {}):
            kwargs.setdefault("type", types[f.name])
        elif "action" not in kwargs and "choices" not in kwargs:
            if kind.startswith("list"):
                kwargs["nargs"] = "+"
            elif kind in ("int", "float"):
                kwargs["type"] = int if kind == "int" else finite_number
        if kind == "bool" and "action" not in kwargs:
            kwargs["action"] = argparse.BooleanOptionalAction
        shown = "" if default in (None, "", []) or kwargs.get("action") == "store_true" else f" (default {default})"
        kwargs.setdefault("help", f.metadata["help"] + shown)
        target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, **kwargs)


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


# ----- the training stages' settings ------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Settings every stage shares. ``batch_size`` is per process and micro-batch: one optimiser step sees
    batch_size x grad_accum x processes blocks of ``block_size`` tokens."""

    data: list[str] = setting([], 'training text: files, folders, JSONL with a "text" field', metavar="PATH")
    out: str = setting("", "run folder: checkpoints, metrics, the final model", metavar="DIR")
    tokenizer: str | None = setting(None, "tokenizer folder (bwarea tokenizer train)", metavar="DIR")
    val_data: list[str] | None = setting(None, "validation text (default: the end of each data file)", metavar="PATH")
    val_fraction: float = setting(0.05, "share of each file held out for validation")
    cache_dir: str | None = setting(
        None, "packed-token cache (default ~/.cache/bwarea, or $BWAREA_CACHE)", metavar="DIR")
    block_size: int = setting(256, "tokens per training block")
    max_steps: int = setting(1000, "optimiser steps")
    batch_size: int = setting(16, "blocks per process per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimiser step")
    lr: float = setting(1e-3, "peak learning rate")
    min_lr_ratio: float = setting(0.1, "final LR as a share of the peak")
    warmup_steps: int = setting(100, "linear warm-up steps before the cosine")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    grad_clip: float = setting(1.0, "gradient norm clip, >= 0; 0 = off")
    seed: int = setting(0, "seed for init and data order, in [0, 2**32)")
    precision: str = setting("auto", "autocast (auto: bf16 on GPUs)", choices=("auto", "bf16", "fp16", "no"))
    save_every: int = setting(500, "checkpoint every N steps")
    keep_last: int = setting(2, "checkpoints kept")
    log_every: int = setting(10, "log metrics every N steps")
    eval_every: int = setting(0, "validate every N steps, 0 = at the end only")
    eval_blocks: int = setting(64, "validation blocks per evaluation")
    save_dtype: str = setting("float32", "final weights dtype", choices=("float32", "bfloat16", "float16"))
    resume: bool = setting(False, "continue the run in --out from its last checkpoint", action="store_true")
    overwrite: bool = setting(False, "start again in an --out that holds a bwarea run (removes only what that run "
                              "wrote)", action="store_true")
    progress: bool = setting(True, "show the progress bar")

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        check_types(self)
        if not self.data:
            raise ValueError("no --data given")
        if not self.out:
            raise ValueError("no --out folder given")
        positive = ["block_size", "max_steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("warmup_steps", "grad_clip", "eval_every", "eval_blocks", "weight_decay", "min_lr_ratio",
                     "val_fraction"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")
        if self.precision not in ("auto", "bf16", "fp16", "no"):
            raise ValueError(f"precision must be auto, bf16, fp16 or no, got {self.precision!r}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"save_dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: give one")


def check_types(config) -> None:
    """Raise ValueError naming a setting whose value has the wrong type (a config file can hold anything), and
    one whose float is NaN or infinite: every float setting bwarea takes is a finite number."""
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str, os.PathLike), "list[str]": (list,)}
    for key in ("data", "val_data"):  # one path is a list of one
        if isinstance(getattr(config, key, None), (str, os.PathLike)):
            setattr(config, key, [getattr(config, key)])
    for f in dataclasses.fields(config):
        value, names = getattr(config, f.name), [t.strip() for t in str(f.type).split("|")]
        if value is None and "None" in names:
            continue
        allowed = tuple(k for t in names for k in kinds.get(t, (object,)))
        wrong = not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)
        if wrong or (isinstance(value, list) and not all(isinstance(v, (str, os.PathLike)) for v in value)):
            raise ValueError(f"{f.name} must be {' or '.join(names)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


@dataclass
class PretrainConfig(TrainConfig):
    """Stage-1 settings: the model shape (world-model layers = ``layers``) and the codebook remedies."""

    hidden_size: int = setting(256, "model width")
    layers: int = setting(4, "world-model layers")
    heads: int = setting(4, "attention heads")
    kv_heads: int | None = setting(None, "key/value heads (default: --heads)")
    intermediate_size: int | None = setting(None, "MLP width (default about 8/3 x hidden)")
    inverse_layers: int | None = setting(None, "inverse-dynamics layers (default layers/2)")
    policy_layers: int | None = setting(None, "policy layers (default layers)")
    action_layer: int | None = setting(None, "world-model block the action enters before (default layers/2)")
    num_actions: int = setting(64, "codebook size")
    codebook_dim: int = setting(32, "codebook vector width")
    max_positions: int | None = setting(None, "max_position_embeddings (default --block-size)")
    codebook: str = setting("vq", "codebook updates: VQ losses or EMA", choices=("vq", "ema"))
    commitment: float = setting(0.25, "commitment loss weight")
    ema_decay: float = setting(0.99, "EMA codebook decay")
    kmeans_init: bool = setting(True, "k-means codebook init")
    kmeans_batches: int = setting(4, "first steps' batches whose latents seed k-means")
    dead_code_every: int = setting(50, "check for unused codes every N steps, 0 = off")
    dead_code_threshold: float = setting(0.03, "reset codes used less than this share of an even usage")
    entropy_bonus: float = setting(0.0, "weight of the soft code-usage entropy bonus")

    def check(self) -> None:
        super().check()
        if self.codebook not in ("vq", "ema"):
            raise ValueError(f"codebook must be 'vq' (codebook + commitment losses) or 'ema', got {self.codebook!r}")
        if self.max_positions is not None and self.block_size > self.max_positions:
            raise ValueError(f"block size {self.block_size} exceeds max positions {self.max_positions}")
        if not 0 < self.ema_decay < 1 or self.commitment < 0 or self.entropy_bonus < 0:
            raise ValueError("ema_decay must lie in (0, 1); commitment and entropy_bonus must be >= 0")
        for name in ("dead_code_every", "dead_code_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("hidden_size", "layers", "heads", "num_actions", "codebook_dim", "kmeans_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# bc's default: the last quarter of its steps optimise the LM likelihood itself (docs/training.md, "Stage 2").
DEFAULT_POSTERIOR_FRACTION = 0.25


@dataclass
class BCConfig(TrainConfig):
    """Stage-2 settings. ``model`` is the stage-1 folder; the tokenizer defaults to the one stored there, and
    the block size to the one the model was trained on (``stage1_block_size``).

    policy_init: "world" copies the world model's embedding, first blocks and final norm into the policy
    (a trained language model is a better start than noise); "keep" trains the policy as stage 1 left it.
    policy_layers: rebuild the policy with this many blocks (None: keep the model's).
    targets: what the policy imitates at each position t:
      "inverse"    the inverse-dynamics action (cross-entropy; the paper's behaviour cloning);
      "soft"       softmax(-||z_t - e_a||^2 / soft_temperature) over the codebook distances of the latent;
      "posterior"  the world model's posterior over actions given the true next token,
                   q(a) ∝ pi(a | x_<=t) p_world(x_t+1 | x_<=t, a). Its loss is exactly the LM negative
                   log-likelihood -log sum_a pi(a) p_world(x_t+1 | a), so it optimises lm_ppl itself
                   (at num_actions world-model upper halves per position: slower steps).
    """

    block_size: int | None = setting(None, "tokens per training block (default: the one --model was trained on)")
    model: str = setting("", "the stage-1 (pretrain) output folder", metavar="DIR")
    policy_init: str = setting("world", "start the policy from the world model's weights (world) or as stage 1 left "
                               "it (keep)", choices=("world", "keep"))
    policy_layers: int | None = setting(None, "rebuild the policy with N blocks (default: the model's)")
    targets: str = setting("inverse", "what the policy imitates: the inverse-dynamics action, soft targets from "
                           "codebook distances, or the world model's posterior given the next token (optimises "
                           "lm_ppl; slower)", choices=("inverse", "soft", "posterior"))
    soft_temperature: float = setting(1.0, "temperature of --targets soft")
    posterior_fraction: float | None = setting(
        None, "share of --max-steps, at the end, trained on the world model's posterior (the exact LM "
        f"likelihood) after the --targets phase, the learning rate warmed up again; 0 = off (default "
        f"{DEFAULT_POSTERIOR_FRACTION} with inverse or soft targets; with --targets posterior every step is one)")
    posterior_lr: float | None = setting(None, "peak learning rate of the posterior phase (default --lr)")
    posterior_positions: int | None = setting(
        None, "positions per block a posterior step scores, drawn at random each step (default: all of them). "
        "A posterior step runs the world model's upper half once per action at each scored position, so fewer "
        "make it cheaper (docs/training.md measures the trade)")
    eval_lm: bool = setting(True, "measure lm_ppl when validating")
    # The shape comes from --model; shape settings given anyway must agree with it (a guard for scripts).
    hidden_size: int | None = setting(None, "model width (bc: taken from --model; checked if given)")
    layers: int | None = setting(None, "world-model layers (bc: taken from --model; checked if given)")
    heads: int | None = setting(None, "attention heads (bc: taken from --model; checked if given)")
    kv_heads: int | None = setting(None, "key/value heads (bc: taken from --model; checked if given)")
    intermediate_size: int | None = setting(None, "MLP width (bc: taken from --model; checked if given)")

    # Runs written before the posterior phase existed had none: they resume with --posterior-fraction 0.
    RESUME_DEFAULTS = {"posterior_fraction": 0.0, "posterior_lr": None, "posterior_positions": None}

    def check(self) -> None:
        if not self.model:
            raise ValueError("bc needs --model: the stage-1 (pretrain) output folder")
        if not self.tokenizer:
            self.tokenizer = self.model
        if self.block_size is None and isinstance(self.model, (str, Path)):
            self.block_size = stage1_block_size(self.model)
        super().check()
        if Path(self.model).resolve() == Path(self.out).resolve():
            raise ValueError("bc --out must be a new folder, not the stage-1 --model folder it reads")
        if self.policy_init not in ("world", "keep"):
            raise ValueError(f"policy_init must be 'world' or 'keep', got {self.policy_init!r}")
        if self.targets not in ("inverse", "soft", "posterior"):
            raise ValueError(f"targets must be inverse, soft or posterior, got {self.targets!r}")
        if self.soft_temperature <= 0:
            raise ValueError(f"soft_temperature must be > 0, got {self.soft_temperature}")
        if self.posterior_fraction is None:
            self.posterior_fraction = 0.0 if self.targets == "posterior" else DEFAULT_POSTERIOR_FRACTION
        if not 0 <= self.posterior_fraction <= 1:
            raise ValueError(f"posterior_fraction must lie in [0, 1], got {self.posterior_fraction}")
        if self.targets == "posterior" and self.posterior_fraction > 0:
            raise ValueError("posterior_fraction applies after --targets inverse or soft; with --targets posterior "
                             f"every step is trained on the posterior already (got {self.posterior_fraction})")
        if self.posterior_lr is not None and not self.posterior_lr > 0:
            raise ValueError(f"posterior_lr must be > 0, got {self.posterior_lr}")
        if self.posterior_lr is not None and not self.posterior_steps():
            raise ValueError(f"posterior_lr={self.posterior_lr} is given but there is no posterior phase "
                             "(posterior_fraction is 0 or --max-steps too few)")
        if self.policy_layers is not None and self.policy_layers < 1:
            raise ValueError(f"policy_layers must be >= 1, got {self.policy_layers}")
        if self.posterior_positions is not None:
            if self.posterior_positions < 1:
                raise ValueError(f"posterior_positions must be >= 1, got {self.posterior_positions}")
            if self.targets != "posterior" and not self.posterior_steps():
                raise ValueError(f"posterior_positions={self.posterior_positions} is given but no step trains on "
                                 "the posterior (posterior_fraction is 0 and --targets is not posterior)")
            if self.block_size is not None and self.posterior_positions >= self.block_size - 1:
                raise ValueError(f"posterior_positions={self.posterior_positions} is not below the "
                                 f"{self.block_size - 1} positions a block of {self.block_size} tokens scores: "
                                 "leave it out to score them all")

    def posterior_steps(self) -> int:
        """The number of final steps trained on the posterior after the --targets phase (0: none)."""
        if not self.posterior_fraction or self.targets == "posterior":
            return 0
        return min(self.max_steps, max(1, round(self.max_steps * self.posterior_fraction)))


def stage1_block_size(model_dir) -> int:
    """The block size the stage-1 model in ``model_dir`` was trained on (its training.json), else its
    max_position_embeddings."""
    from ..checkpoint import read_config

    config, _ = read_config(model_dir)
    try:
        trained = json.loads((Path(model_dir) / "training.json").read_text())["block_size"]
    except (OSError, ValueError, KeyError, TypeError):
        trained = None
    limit = config.max_position_embeddings
    return min(trained, limit) if isinstance(trained, int) and trained >= 2 else limit
