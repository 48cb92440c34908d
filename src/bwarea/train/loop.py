"""The training loop every stage shares: accelerate, AdamW, warmup + cosine, checkpoints that resume exactly.

One process:          bwarea pretrain --data corpus.txt --tokenizer tok --out runs/s1
Several (DDP/FSDP/DeepSpeed, one machine or many):
                      accelerate launch --config_file examples/accelerate/ddp.yaml -m bwarea.cli pretrain ...

A stage (pretrain.py, bc.py, baseline.py) gives the loop an *objective*: an nn.Module that holds the model
and whose ``forward(input_ids)`` returns the loss and summed statistics. Calling it through its forward keeps
DDP/FSDP/DeepSpeed in charge of gradient sync; the loop never looks inside.

Run folder layout (``--out``):
    bwarea-run.json              the run marker: this folder is a bwarea run; the final files it wrote
    run_config.json              the settings; a resume must match them
    checkpoints/step-000500/     accelerate state (model, optimiser, scheduler, RNG) + trainer_state.json
    metrics.jsonl, tensorboard/  the curves
    model.safetensors, config.json, tokenizer files   the final model (written by the stage)

bwarea writes only into a new or empty folder or its own run, and creates it only once the run can start
(every input checked). ``--overwrite`` removes only what a run wrote: the files above, never a user's others.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from ..data import BlockSampler, batch_tensor, pack, resolve_files
from ..tokenizer import load_tokenizer
from .engine import (MODEL_FILES, TRAINING_INFO, Engine, all_finite, clip_gradients, is_tokenizer_file,
                     latest_checkpoint, make_accelerator)
# Re-exported: the settings every stage shares, and the engine's names that loop.py offered before the engine.
from .engine import RUN_MARKER, MetricsLog, strict_json  # noqa: F401
from .settings import TrainConfig  # noqa: F401

# Settings that may change between a run and its resume: they do not change the loss curve. ``out`` too: a run
# folder that was moved or copied resumes from where it now is.
RESUMABLE_FIELDS = {"resume", "overwrite", "save_every", "keep_last", "log_every", "eval_every", "eval_blocks",
                    "progress", "cache_dir", "save_dtype", "out"}
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


class Stage:
    """What a stage gives the loop. ``build`` returns the objective module (its ``.model`` is what is saved)."""

    name = "stage"
    shown = ("nll",)  # metrics on the progress bar (the loss when none is there); metrics.jsonl has them all

    def build(self, config, tokenizer) -> nn.Module:
        raise NotImplementedError

    def max_positions(self, objective) -> int:
        return objective.model.config.max_position_embeddings

    def initialise(self, objective, batches, accelerator) -> None:
        """Fresh runs only, before training (k-means codebook init, policy init)."""

    def lr_factor(self, config):
        """step -> LR multiplier of the peak --lr (bc overrides it: its posterior phase warms up again)."""
        return warmup_cosine(config.warmup_steps, config.max_steps, config.min_lr_ratio)

    def after_step(self, objective, step: int, stats: dict, accelerator, optimizer) -> dict:
        """After each optimiser step, with the step's statistics summed over micro-batches and processes."""
        return {}

    def save(self, objective, state_dict, out: Path, tokenizer, config) -> None:
        raise NotImplementedError


def final_names(config) -> set[str]:
    """Names the stages may write into the run folder as the final model (checked before a run starts)."""
    names = {*MODEL_FILES, TRAINING_INFO}
    if config.tokenizer and Path(config.tokenizer).is_dir():
        names.update(n for n in os.listdir(config.tokenizer) if is_tokenizer_file(n))
    return names


# ----- pieces of the loop --------------------------------------------------------------------------------
def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine down to ``min_ratio`` at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def make_optimizer(objective: nn.Module, config) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on norms, biases and the action codebook."""
    decay, plain = [], []
    for name, p in objective.named_parameters():
        if p.requires_grad:
            (plain if p.ndim < 2 or "action_codebook" in name else decay).append(p)
    if not decay and not plain:
        raise ValueError("the objective has no trainable parameters")
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=torch.cuda.is_available() or None)


def reduce_stats(stats: dict, accelerator) -> dict:
    """Sum each statistic over processes (one all-reduce for all of them)."""
    if accelerator.num_processes == 1:
        return stats
    keys = sorted(stats)
    flat = accelerator.reduce(torch.cat([stats[k].detach().float().reshape(-1) for k in keys]), reduction="sum")
    out, at = {}, 0
    for k in keys:
        n = stats[k].numel()
        out[k] = flat[at:at + n].view(stats[k].shape)
        at += n
    return out


def add_stats(total: dict, stats: dict) -> dict:
    for k, v in stats.items():
        v = v.detach().float()
        total[k] = total[k] + v if k in total else v.clone()
    return total


@torch.no_grad()
def evaluate(objective, blocks, config, accelerator) -> dict:
    """The objective's metrics on up to ``eval_blocks`` validation blocks, shared out over processes."""
    n = min(len(blocks), config.eval_blocks)
    objective.eval()
    total: dict = {}
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, n, world))
    # Every process runs the same number of batches: FSDP/DeepSpeed forwards are collective.
    rounds = math.ceil(math.ceil(n / world) / config.batch_size)
    for i in range(rounds):
        index = mine[i * config.batch_size:(i + 1) * config.batch_size]
        weight = 1.0 if index else 0.0
        ids = batch_tensor(blocks, index or [0]).to(accelerator.device)
        out = objective(ids, evaluation=True)
        add_stats(total, {k: v * weight for k, v in out["stats"].items()})
    objective.train()
    total = reduce_stats(total, accelerator)
    return accelerator.unwrap_model(objective).metrics({k: v.cpu() for k, v in total.items()})


# ----- the loop -------------------------------------------------------------------------------------------
def train(stage: Stage, config, on_step=None) -> dict:
    """Run ``stage`` with ``config``; -> the final validation metrics (empty without validation data).

    on_step(step, metrics): called after every logged optimiser step (tests use it to interrupt a run).
    Raises TrainingDiverged on a NaN/inf loss or gradient (no checkpoint is written for that step).
    """
    return Trainer(stage, config).run(on_step)


def open_tokenizer(path):
    """The tokenizer in folder ``path``; ValueError naming the folder if it is missing or does not load."""
    if not path:
        raise ValueError("no --tokenizer given (train one with `bwarea tokenizer train`)")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist (train one with "
                                "`bwarea tokenizer train`)")
    try:
        return load_tokenizer(path)
    except Exception as err:  # transformers raises many kinds here; the user needs the folder and the reason
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the tokenizer in {str(path)!r}: {reason}") from None


class Trainer:
    """One run of a stage: ``__init__`` sets up (run folder, data, model, optimiser, resume), ``run`` trains."""

    def __init__(self, stage: Stage, config):
        config.check()
        self.stage, self.config = stage, config
        self.accelerator = accelerator = make_accelerator(config.precision)
        self.is_main = accelerator.is_main_process
        self.out = out = Path(config.out)
        # Every input is checked, and everything built, before the run folder is touched: a start that fails
        # leaves nothing behind, and --overwrite clears an old run only when the new one can start.
        self.engine = engine = Engine(stage.name, out, config, accelerator, resume=config.resume,
                                      overwrite=config.overwrite, resumable=RESUMABLE_FIELDS,
                                      final_names=final_names(config))
        for paths in (config.data, *([config.val_data] if config.val_data else [])):
            resolve_files(paths)  # missing paths and devices fail now, not after building the model
        self.tokenizer = open_tokenizer(config.tokenizer)

        from accelerate.utils import set_seed
        set_seed(config.seed)
        objective = stage.build(config, self.tokenizer)
        if config.block_size > stage.max_positions(objective):
            raise ValueError(f"block size {config.block_size} exceeds the model's max_position_embeddings "
                             f"{stage.max_positions(objective)}")
        cache = Path(config.cache_dir) if config.cache_dir else None  # None: data.default_cache_dir()
        with accelerator.main_process_first():
            packed = pack(config.data, self.tokenizer, config.block_size,
                          0.0 if config.val_data else config.val_fraction, cache_dir=cache, progress=self.is_main)
            self.val = (pack(config.val_data, self.tokenizer, config.block_size, 0.0, cache_dir=cache,
                             progress=self.is_main).train if config.val_data else packed.val)
        self.train_blocks = packed.train

        objective.to(accelerator.device)
        self.sampler = BlockSampler(len(packed.train), config.seed)
        self.world = accelerator.num_processes
        self.per_step = config.batch_size * config.grad_accum * self.world
        candidates = engine.checkpoints()
        if not candidates:
            # The first steps' blocks, whole, on every process: initialisation is the same for any process count.
            first = (self.blocks(i * self.per_step, self.per_step) for i in range(10**9))
            stage.initialise(objective, first, accelerator)
        optimizer = make_optimizer(objective, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, stage.lr_factor(config))
        self.objective, self.optimizer = accelerator.prepare(objective, optimizer)
        # Not prepared: a prepared scheduler steps once per process; this one steps once per optimiser step.
        accelerator.register_for_checkpointing(self.scheduler)
        self.step = 0
        if candidates:
            resumed, self.step = engine.resume(candidates, lambda folder: accelerator.load_state(str(folder)))
            accelerator.print(f"resumed {out} from {resumed.name}")
        params = sum(p.numel() for p in accelerator.unwrap_model(self.objective).parameters())
        where = f"{accelerator.device.type if accelerator.device.index is None else accelerator.device}, " \
                f"{PRECISION_NAMES.get(accelerator.mixed_precision, accelerator.mixed_precision)}"
        accelerator.print(f"{stage.name}: {len(self.train_blocks)} train blocks, {len(self.val)} val blocks of "
                          f"{config.block_size} tokens; {self.per_step * config.block_size} tokens per step; "
                          f"{params / 1e6:.2f}M params; {where}")

        engine.start()

    def blocks(self, start: int, count: int) -> torch.Tensor:
        """Global sample positions [start, start+count) -> (count, block_size) token ids on the device."""
        return batch_tensor(self.train_blocks, self.sampler.indices(start, count)).to(self.accelerator.device)

    def micro_batch(self, m: int) -> torch.Tensor:
        """This process's share of micro-batch ``m`` of the current step."""
        micro = self.config.batch_size
        return self.blocks(self.step * self.per_step + (m * self.world + self.accelerator.process_index) * micro,
                           micro)

    def train_step(self) -> tuple[dict, torch.Tensor | None]:
        """One optimiser step -> (statistics summed over micro-batches and processes, gradient norm)."""
        config, accelerator = self.config, self.accelerator
        stats: dict = {}
        for m in range(config.grad_accum):
            last = m == config.grad_accum - 1
            with nullcontext() if last else accelerator.no_sync(self.objective):
                result = self.objective(self.micro_batch(m))
                accelerator.backward(result["loss"] / config.grad_accum)
            add_stats(stats, {**result["stats"], "loss_sum": result["loss"].detach() / config.grad_accum})
        grad_norm = clip_gradients(accelerator, self.objective.parameters(), config.grad_clip)
        self.check_finite(stats["loss_sum"], grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return reduce_stats(stats, accelerator), grad_norm

    def check_finite(self, loss: torch.Tensor, grad_norm) -> None:
        """Stop before the optimiser step if any process saw a NaN/inf loss or gradient."""
        if not all_finite(self.accelerator, loss, grad_norm):
            last = latest_checkpoint(self.out)
            raise TrainingDiverged(
                f"{self.stage.name}: the loss became {loss.item()} (gradient norm "
                f"{float('nan') if grad_norm is None else grad_norm.item():.3g}) at step {self.step + 1}; stopped. "
                + (f"The last good checkpoint is {last}. " if last else "No checkpoint was written yet. ")
                + self.divergence_advice(loss, grad_norm))

    def divergence_advice(self, loss: torch.Tensor, grad_norm) -> str:
        """What to change, from what went non-finite and when (the learning rate only once it has acted)."""
        config, autocast = self.config, self.accelerator.mixed_precision != "no"
        fixes = []
        if self.step == 0 or not torch.isfinite(loss).item():
            if self.step == 0:
                # No update has happened yet, so no optimiser setting can be the cause.
                cause = "It was not finite before any update, so the learning rate is not the cause: "
            else:
                cause = "The loss itself is not finite: "
            fixes.append(cause + ("check the data and model settings" + (", or use --precision no (reduced "
                                  "precision can overflow)" if autocast else "")))
            if self.step > 0:
                fixes.append("lower --lr or raise --warmup-steps (the updates so far may have broken the weights)")
        else:
            fixes.append("The loss is finite but its gradient is not: "
                         + ("use --precision no (reduced precision can overflow), or " if autocast else "")
                         + ("set --grad-clip (it is off), " if not config.grad_clip else "")
                         + "lower --lr or raise --warmup-steps")
        return "; ".join(fixes) + ". Then rerun with --resume (from the last checkpoint) or --overwrite."

    def run(self, on_step=None) -> dict:
        config, accelerator = self.config, self.accelerator
        unwrapped = accelerator.unwrap_model(self.objective)
        log = self.engine.metrics_log(self.step)
        bar = self.engine.progress(config.max_steps, self.step, self.stage.name, config.progress)
        window, window_steps, first_step = {}, 0, self.step
        started = tick = time.perf_counter()
        self.objective.train()
        try:
            while self.step < config.max_steps:
                stats, grad_norm = self.train_step()
                extra = self.stage.after_step(unwrapped, self.step, stats, accelerator, self.optimizer)
                add_stats(window, stats)
                window_steps += 1
                bar.update(1)
                step = self.step
                if step % config.log_every == 0 or step == config.max_steps:
                    metrics = unwrapped.metrics({k: v.cpu() for k, v in window.items()})
                    metrics.update(loss=window["loss_sum"].item() / (window_steps * self.world),
                                   lr=self.scheduler.get_last_lr()[0],
                                   grad_norm=None if grad_norm is None else grad_norm.item(),
                                   tokens_per_s=window_steps * self.per_step * config.block_size
                                   / (time.perf_counter() - tick), **extra)
                    log.write(step, "train", metrics)
                    shown = {k: f"{metrics[k]:.3f}" for k in self.stage.shown if isinstance(metrics.get(k), float)}
                    bar.set_postfix(shown or {"loss": f"{metrics['loss']:.3f}"})
                    if on_step is not None:
                        on_step(step, metrics)
                    window, window_steps, tick = {}, 0, time.perf_counter()
                if config.eval_every and step % config.eval_every == 0 and step < config.max_steps and len(self.val):
                    log.write(step, "val", evaluate(self.objective, self.val, config, accelerator))
                    tick = time.perf_counter()  # evaluation and saving are not training time
                if step % config.save_every == 0 or step == config.max_steps:
                    self.engine.save_checkpoint(step, config.keep_last,
                                                lambda folder: accelerator.save_state(str(folder)))
                    tick = time.perf_counter()
            final = evaluate(self.objective, self.val, config, accelerator) if len(self.val) else {}
            if final:
                log.write(self.step, "val", final)
            self.save_final(final, time.perf_counter() - started, self.step - first_step)
            return final
        finally:
            bar.close()
            log.close()

    def save_final(self, final: dict, seconds: float, steps_run: int) -> None:
        """The final model (the stage's format) and training.json, written by the main process."""
        accelerator, config = self.accelerator, self.config
        state = accelerator.get_state_dict(self.objective)  # collective under FSDP/DeepSpeed: every process
        if self.is_main:
            state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}

            def write(folder: Path) -> None:
                self.stage.save(accelerator.unwrap_model(self.objective), state, folder, self.tokenizer, config)
                (folder / TRAINING_INFO).write_text(json.dumps(
                    {"stage": self.stage.name, "steps": self.step, "block_size": config.block_size,
                     "processes": self.world, "tokens_per_step": self.per_step * config.block_size,
                     "device": str(accelerator.device), "precision": accelerator.mixed_precision,
                     "seconds": round(seconds, 1), "steps_this_run": steps_run, "val": final}, indent=1))
            self.engine.publish(write)
        accelerator.wait_for_everyone()


def copy_tokenizer(src, dst: Path) -> None:
    """Copy the tokenizer files of folder ``src`` into ``dst`` (so the model folder loads on its own).

    tokenizer_config.json gets ``padding_side: left`` whatever ``src`` said: plain transformers then pads a batch
    of prompts on the left too, as generation needs (the tokenizer class pads on the right unless told).
    """
    for name in os.listdir(src):
        if not (is_tokenizer_file(name) and (Path(src) / name).is_file()):
            continue
        if name == "tokenizer_config.json":
            config = json.loads((Path(src) / name).read_text())
            (dst / name).write_text(json.dumps({**config, "padding_side": "left"}, indent=2) + "\n")
        else:
            shutil.copy2(Path(src) / name, dst / name)


def save_state_dict(model, state_dict: dict, out: Path, dtype_name: str) -> None:
    """Save ``model`` (its class's save_pretrained) with ``state_dict`` cast to ``dtype_name`` floats."""
    dtype = getattr(torch, dtype_name)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.config.dtype = dtype
    model.save_pretrained(out, state_dict=state)
