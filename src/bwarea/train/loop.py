"""The training loop every stage shares: accelerate, AdamW, warmup + cosine, checkpoints that resume exactly.

One process:          bwarea pretrain --data corpus.txt --tokenizer tok --out runs/s1
Several (DDP/FSDP/DeepSpeed, one machine or many):
                      accelerate launch --config_file examples/accelerate/ddp.yaml -m bwarea.cli pretrain ...

A stage (pretrain.py, bc.py, baseline.py) gives the loop an *objective*: an nn.Module that holds the model
and whose ``forward(input_ids)`` returns the loss and summed statistics. Calling it through its forward keeps
DDP/FSDP/DeepSpeed in charge of gradient sync; the loop never looks inside.

Run folder layout (``--out``):
    run_config.json              the settings; a resume must match them
    checkpoints/step-000500/     accelerate state (model, optimiser, scheduler, RNG) + trainer_state.json
    metrics.jsonl, tensorboard/  the curves
    model.safetensors, config.json, tokenizer files   the final model (written by the stage)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import BlockSampler, batch_tensor, pack
from ..tokenizer import load_tokenizer

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
# Settings that may change between a run and its resume: they do not change the loss curve.
RESUMABLE_FIELDS = {"resume", "overwrite", "save_every", "keep_last", "log_every", "eval_every", "eval_blocks",
                    "progress", "cache_dir", "save_dtype"}


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Settings every stage shares. ``batch_size`` is per process and micro-batch: one optimiser step sees
    batch_size x grad_accum x processes blocks of ``block_size`` tokens."""

    data: list[str] = field(default_factory=list)
    out: str = ""
    tokenizer: str | None = None
    val_data: list[str] | None = None
    val_fraction: float = 0.05
    cache_dir: str | None = None
    block_size: int = 256
    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    eval_every: int = 0
    eval_blocks: int = 64
    save_dtype: str = "float32"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not self.data:
            raise ValueError("no --data given")
        if not self.out:
            raise ValueError("no --out folder given")
        positive = ["block_size", "max_steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0 or self.eval_every < 0:
            raise ValueError("lr must be > 0 and warmup_steps, grad_clip, eval_every >= 0")
        if self.precision not in ("auto", "bf16", "fp16", "no"):
            raise ValueError(f"precision must be auto, bf16, fp16 or no, got {self.precision!r}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"save_dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: give one")


class Stage:
    """What a stage gives the loop. ``build`` returns the objective module (its ``.model`` is what is saved)."""

    name = "stage"

    def build(self, config, tokenizer) -> nn.Module:
        raise NotImplementedError

    def max_positions(self, objective) -> int:
        return objective.model.config.max_position_embeddings

    def initialise(self, objective, batches, accelerator) -> None:
        """Fresh runs only, before training (k-means codebook init, policy init)."""

    def after_step(self, objective, step: int, stats: dict, accelerator, optimizer) -> dict:
        """After each optimiser step, with the step's statistics summed over micro-batches and processes."""
        return {}

    def save(self, objective, state_dict, out: Path, tokenizer, config) -> None:
        raise NotImplementedError


# ----- the run folder ------------------------------------------------------------------------------------
def identity(config) -> dict:
    """The settings a resumed run must share with the original (paths resolved)."""
    d = dataclasses.asdict(config)
    for key in ("data", "val_data"):
        if d.get(key):
            d[key] = [str(Path(p).resolve()) for p in d[key]]
    for key in ("tokenizer", "model"):
        if d.get(key):
            d[key] = str(Path(d[key]).resolve())
    return {k: v for k, v in d.items() if k not in RESUMABLE_FIELDS}


def check_run_folder(out: Path, stage: Stage, config) -> None:
    """Refuse an --out that holds a run unless --resume (with the same settings) or --overwrite is given."""
    saved_file = out / RUN_CONFIG
    if not saved_file.is_file():
        return
    if not (config.resume or config.overwrite):
        raise ValueError(f"{out} already holds a run ({RUN_CONFIG}); pass --resume to continue it or "
                         "--overwrite to start again")
    if config.resume:
        saved, wanted = json.loads(saved_file.read_text()), {"stage": stage.name, **identity(config)}
        changed = [f"{k}: run has {saved.get(k)!r}, now {wanted.get(k)!r}"
                   for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
        if changed:
            raise ValueError(f"cannot resume {out} with different settings:\n  " + "\n  ".join(changed)
                             + "\nuse the original settings, or --overwrite to start again")


def start_run_folder(out: Path, stage: Stage, config) -> None:
    """Main process, after every process checked: clear an overwritten run and record the settings."""
    if config.overwrite:
        for name in (CHECKPOINTS, "tensorboard"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (METRICS, RUN_CONFIG):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_CONFIG).is_file():
        (out / RUN_CONFIG).write_text(json.dumps({"stage": stage.name, **identity(config)}, indent=1))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (one whose trainer_state.json was written), or None."""
    found = [p for p in (out / CHECKPOINTS).glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


def save_checkpoint(accelerator, out: Path, step: int, keep_last: int) -> Path:
    """Write the full training state to checkpoints/step-N: into a temporary folder first, renamed when
    complete, so a crash or a full disk leaves the previous checkpoints intact."""
    folder = out / CHECKPOINTS
    final, tmp = folder / f"step-{step:06d}", folder / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted((p for p in folder.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class MetricsLog:
    """metrics.jsonl + TensorBoard, main process only. A resume drops records after the resumed step."""

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.file, self.writer = None, None
        if not enabled:
            return
        path = out / METRICS
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # TensorBoard is optional: the JSONL log has everything
            self.writer = None

    def write(self, step: int, split: str, metrics: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


# ----- pieces of the loop --------------------------------------------------------------------------------
def make_accelerator(precision: str):
    from accelerate import Accelerator

    if precision == "auto":
        # bf16 autocast where the hardware has it; CPU bf16 matmuls are slow, so plain float32 there.
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Several processes without a GPU (torchrun on CPUs): accelerate needs cpu=True to pick gloo.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=precision, cpu=cpu)


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


class Trainer:
    """One run of a stage: ``__init__`` sets up (run folder, data, model, optimiser, resume), ``run`` trains."""

    def __init__(self, stage: Stage, config):
        config.check()
        self.stage, self.config = stage, config
        self.accelerator = accelerator = make_accelerator(config.precision)
        self.is_main = accelerator.is_main_process
        self.out = out = Path(config.out)
        check_run_folder(out, stage, config)
        accelerator.wait_for_everyone()
        if self.is_main:
            start_run_folder(out, stage, config)
        accelerator.wait_for_everyone()
        resume_from = latest_checkpoint(out) if config.resume else None

        if not config.tokenizer:
            raise ValueError("no --tokenizer given (train one with `bwarea tokenizer train`)")
        self.tokenizer = load_tokenizer(config.tokenizer)
        cache = Path(config.cache_dir) if config.cache_dir else None  # None: data.default_cache_dir()
        with accelerator.main_process_first():
            packed = pack(config.data, self.tokenizer, config.block_size,
                          0.0 if config.val_data else config.val_fraction, cache_dir=cache, progress=self.is_main)
            self.val = (pack(config.val_data, self.tokenizer, config.block_size, 0.0, cache_dir=cache,
                             progress=self.is_main).train if config.val_data else packed.val)
        self.train_blocks = packed.train

        from accelerate.utils import set_seed
        set_seed(config.seed)
        objective = stage.build(config, self.tokenizer)
        if config.block_size > stage.max_positions(objective):
            raise ValueError(f"block size {config.block_size} exceeds the model's max_position_embeddings "
                             f"{stage.max_positions(objective)}")
        objective.to(accelerator.device)
        self.sampler = BlockSampler(len(packed.train), config.seed)
        self.world = accelerator.num_processes
        self.per_step = config.batch_size * config.grad_accum * self.world
        if resume_from is None:
            # The first steps' blocks, whole, on every process: initialisation is the same for any process count.
            first = (self.blocks(i * self.per_step, self.per_step) for i in range(10**9))
            stage.initialise(objective, first, accelerator)
        optimizer = make_optimizer(objective, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(config.warmup_steps, config.max_steps, config.min_lr_ratio))
        self.objective, self.optimizer = accelerator.prepare(objective, optimizer)
        # Not prepared: a prepared scheduler steps once per process; this one steps once per optimiser step.
        accelerator.register_for_checkpointing(self.scheduler)
        self.step = 0
        if resume_from is not None:
            accelerator.load_state(str(resume_from))
            self.step = json.loads((resume_from / "trainer_state.json").read_text())["step"]
            accelerator.print(f"resumed {out} from {resume_from.name}")
        params = sum(p.numel() for p in accelerator.unwrap_model(self.objective).parameters())
        accelerator.print(f"{stage.name}: {len(self.train_blocks)} train blocks, {len(self.val)} val blocks of "
                          f"{config.block_size} tokens; {self.per_step * config.block_size} tokens per step; "
                          f"{params / 1e6:.2f}M params on {accelerator.device} ({accelerator.mixed_precision})")

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
        grad_norm = accelerator.clip_grad_norm_(self.objective.parameters(), config.grad_clip or float("inf"))
        self.check_finite(stats["loss_sum"], grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return reduce_stats(stats, accelerator), grad_norm

    def check_finite(self, loss: torch.Tensor, grad_norm) -> None:
        """Stop before the optimiser step if any process saw a NaN/inf loss or gradient."""
        check = loss if grad_norm is None else loss + grad_norm.float()
        bad = (~torch.isfinite(check)).float()
        if self.world > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            last = latest_checkpoint(self.out)
            raise TrainingDiverged(
                f"{self.stage.name}: the loss became {loss.item()} (gradient norm "
                f"{float('nan') if grad_norm is None else grad_norm.item():.3g}) at step {self.step + 1}; stopped. "
                + (f"The last good checkpoint is {last}; " if last else "No checkpoint was written yet; ")
                + "lower --lr, raise --warmup-steps or use --precision no, then --resume or --overwrite")

    def run(self, on_step=None) -> dict:
        config, accelerator = self.config, self.accelerator
        unwrapped = accelerator.unwrap_model(self.objective)
        log = MetricsLog(self.out, self.step, self.is_main)
        bar = tqdm(total=config.max_steps, initial=self.step, desc=self.stage.name,
                   disable=not (self.is_main and config.progress), dynamic_ncols=True)
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
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                    if on_step is not None:
                        on_step(step, metrics)
                    window, window_steps, tick = {}, 0, time.perf_counter()
                if config.eval_every and step % config.eval_every == 0 and step < config.max_steps and len(self.val):
                    log.write(step, "val", evaluate(self.objective, self.val, config, accelerator))
                    tick = time.perf_counter()  # evaluation and saving are not training time
                if step % config.save_every == 0 or step == config.max_steps:
                    save_checkpoint(accelerator, self.out, step, config.keep_last)
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
            self.stage.save(accelerator.unwrap_model(self.objective), state, self.out, self.tokenizer, config)
            (self.out / "training.json").write_text(json.dumps(
                {"stage": self.stage.name, "steps": self.step, "block_size": config.block_size,
                 "processes": self.world, "tokens_per_step": self.per_step * config.block_size,
                 "device": str(accelerator.device), "precision": accelerator.mixed_precision,
                 "seconds": round(seconds, 1), "steps_this_run": steps_run, "val": final}, indent=1))
        accelerator.wait_for_everyone()


def copy_tokenizer(src, dst: Path) -> None:
    """Copy the tokenizer files of folder ``src`` into ``dst`` (so the model folder loads on its own)."""
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "special_tokens_map", "added_tokens")) or name.endswith(".model"):
            shutil.copy2(Path(src) / name, dst / name)


def save_state_dict(model, state_dict: dict, out: Path, dtype_name: str) -> None:
    """Save ``model`` (its class's save_pretrained) with ``state_dict`` cast to ``dtype_name`` floats."""
    dtype = getattr(torch, dtype_name)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.config.dtype = dtype
    model.save_pretrained(out, state_dict=state)
