"""The engine every training stage and RL run on: the accelerator, the run folder and its marker, atomic
checkpoints with pruning and a fall-back to the newest intact one, resume with metric truncation, the
non-finite guard, metrics (JSONL + TensorBoard where installed) and progress.

What differs stays with the caller: a stage's objective and data (train/loop.py), or the rollouts and the
policy update (rl/trainer.py). Both build an ``Engine`` for their run folder:

    engine = Engine("pretrain", config.out, config, accelerator, resume=..., overwrite=...,
                    resumable=RESUMABLE_FIELDS, final_names=final_names(config))   # checks only, writes nothing
    ... build everything, ``engine.resume(engine.checkpoints(), load)`` ...
    engine.start()                                           # now the folder is marked and written
    engine.save_checkpoint(step, keep_last, write)           # write(tmp) puts the state into a temporary folder
    engine.publish(write)                                    # the final model, listed in the marker first

Run folder layout:
    bwarea-run.json              the run marker: this folder is a bwarea run; the final files it wrote
    run_config.json              the settings; a resume must match them
    checkpoints/step-000500/     the state to resume from + trainer_state.json (written last: complete)
    metrics.jsonl, tensorboard/  the curves
    model.safetensors, config.json, tokenizer files   the final model

bwarea writes only into a new or empty folder or its own run, and creates it only once the run can start
(every input checked). ``--overwrite`` removes only what a run wrote: the files above, never a user's others.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.json"
RUN_MARKER = "bwarea-run.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
TRAINER_STATE = "trainer_state.json"
TRAINING_INFO = "training.json"
FINAL_TMP = ".final-tmp"
RUN_NAMES = ("pretrain", "bc", "baseline-llama", "rl")
# Names a run writes besides the final model: --overwrite removes these (and the marker's list), nothing else.
CHECKPOINT_NAME = re.compile(r"\.?(tmp-)?step-\d+")
TENSORBOARD_EVENTS = "events.out.tfevents."
# What a model folder holds besides tokenizer files.
MODEL_FILES = {"config.json", "model.safetensors", "model.safetensors.index.json", "generation_config.json",
               "modeling_bwarea.py"}


class ResumeRefused(ValueError):
    """A checkpoint that is intact but cannot continue this run (another algorithm, model or process count):
    said as it is, not passed over for an older checkpoint."""


# ----- the accelerator ------------------------------------------------------------------------------------
def make_accelerator(precision: str | None = None):
    """An Accelerator for this machine. precision: "auto" (bf16 autocast on GPUs that have it, fp32 elsewhere:
    CPU bf16 matmuls are slow), "bf16", "fp16", "no", or None (accelerate's own setting, from
    ``accelerate launch`` or its config)."""
    from accelerate import Accelerator

    device_module = getattr(torch, "accelerator", None)
    has_device = device_module.is_available() if device_module is not None else torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Several processes without a GPU (torchrun on CPUs): accelerate needs cpu=True to pick gloo.
    cpu = not has_device and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=precision, cpu=cpu)


# ----- the run folder -------------------------------------------------------------------------------------
def identity(config, resumable) -> dict:
    """The settings a resumed run must share with the original (paths resolved; ``resumable`` left out)."""
    d = dataclasses.asdict(config)
    for key in ("data", "val_data"):
        if d.get(key):
            d[key] = [str(Path(p).resolve()) for p in d[key]]
    for key in ("tokenizer", "model"):
        if d.get(key):
            d[key] = str(Path(d[key]).resolve())
    return {k: v for k, v in d.items() if k not in resumable}


def is_plain_name(name: str) -> bool:
    """A file name in the run folder itself (no folder part), as the marker lists them."""
    return name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


def is_tokenizer_file(name: str) -> bool:
    return name.startswith(("tokenizer", "special_tokens_map", "added_tokens")) or name.endswith(".model")


def run_record(out: Path) -> dict | None:
    """The run marker of folder ``out`` ({"stage", "written": [final files]}), or None: not a bwarea run."""
    marker = out / RUN_MARKER
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and record.get("bwarea_run") and isinstance(record.get("written", []), list):
            record["written"] = [n for n in record.get("written", []) if isinstance(n, str) and is_plain_name(n)]
            return record
        raise ValueError(f"{marker} is damaged (not a bwarea run marker); bwarea leaves {out} alone: "
                         "give another --out")
    # A run from before the marker: its run_config.json names the stage.
    try:
        saved = json.loads((out / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(saved, dict) and saved.get("stage") in RUN_NAMES:
        return {"bwarea_run": 1, "stage": saved["stage"], "written": [], "legacy": True}
    return None


def check_writable(out: Path) -> None:
    """ValueError unless ``out`` is (or can be created as) a writable folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    parent = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not parent.is_dir():
        raise ValueError(f"cannot create --out {str(out)!r}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to --out {str(out)!r}: {parent} is not writable")


def check_run_folder(out: Path, name: str, config, resumable, resume: bool, overwrite: bool,
                     final_names: set[str]) -> dict | None:
    """Check ``out`` before anything is written (every process): a new or empty folder, or a bwarea run with
    --resume (the same settings, ``resumable`` ones aside) or --overwrite. -> the run's marker record, or None
    for a new folder."""
    check_writable(out)
    if not out.exists() or not any(out.iterdir()):
        return None
    record = run_record(out)
    if record is None:
        held = sorted(p.name for p in out.iterdir())
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise ValueError(f"--out {out} holds files ({shown}) and no bwarea run ({RUN_MARKER}); bwarea writes only "
                         "into a new or empty folder or one of its runs, so it leaves this one alone (--overwrite "
                         "too): give another --out")
    if not (resume or overwrite):
        raise ValueError(f"{out} already holds a run ({RUN_CONFIG}); pass --resume to continue it or "
                         "--overwrite to start again")
    if resume:
        try:
            saved = json.loads((out / RUN_CONFIG).read_text())
        except (OSError, ValueError):
            raise ValueError(f"cannot resume {out}: its {RUN_CONFIG} is missing or damaged") from None
        # A setting added after the run was written is absent from its record: it ran as that setting's
        # ``RESUME_DEFAULTS`` value (the behaviour before the setting existed).
        saved = {**getattr(config, "RESUME_DEFAULTS", {}), **saved}
        saved = {k: v for k, v in saved.items() if k not in resumable}
        wanted = {"stage": name, **identity(config, resumable)}
        changed = [f"{k}: run has {saved.get(k)!r}, now {wanted.get(k)!r}"
                   for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
        if changed:
            raise ValueError(f"cannot resume {out} with different settings:\n  " + "\n  ".join(changed)
                             + "\nresume with the original settings, or give another --out for a new run "
                               "(--overwrite would delete this run's checkpoints)")
    if not record.get("legacy"):
        theirs = sorted(n for n in final_names - set(record["written"]) if (out / n).exists())
        if theirs:
            raise ValueError(f"{out} holds {', '.join(theirs)}, which this run did not write and would write at "
                             "the end; move them out of the run folder first")
    return record


def clear_run(out: Path, record: dict) -> None:
    """--overwrite: remove what the run in ``out`` wrote (its marker names it), and nothing else."""
    for name in (*record["written"], METRICS, TRAINING_INFO, RUN_CONFIG):
        if (out / name).is_file() or (out / name).is_symlink():
            (out / name).unlink()
    shutil.rmtree(out / FINAL_TMP, ignore_errors=True)
    for folder, mine in ((out / CHECKPOINTS, lambda p: p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)),
                         (out / TENSORBOARD, lambda p: p.is_file() and p.name.startswith(TENSORBOARD_EVENTS))):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if mine(entry):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def write_marker(out: Path, name: str, written) -> None:
    from ..checkpoint import write_text_atomic
    write_text_atomic(out / RUN_MARKER, json.dumps(
        {"bwarea_run": 1, "stage": name, "written": sorted(set(written))}, indent=1) + "\n")


# ----- checkpoints ----------------------------------------------------------------------------------------
def checkpoint_folders(out: Path) -> list[Path]:
    """The run's checkpoint folders (checkpoints/step-N), newest first."""
    found = [p for p in (out / CHECKPOINTS).glob("step-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: -int(p.name.split("-")[1]))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (one whose trainer_state.json was written), or None."""
    found = [p for p in checkpoint_folders(out) if (p / TRAINER_STATE).is_file()]
    return found[0] if found else None


def checkpoint_problem(folder: Path) -> str | None:
    """Why checkpoint ``folder`` cannot be resumed from (a missing, truncated or damaged file), or None.

    Cheap: safetensors headers against the file sizes, and the zip directories of torch.save files."""
    import zipfile
    try:
        step = json.loads((folder / TRAINER_STATE).read_text())["step"]
        if not isinstance(step, int):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE} is missing or damaged"
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not any(p.suffix == ".safetensors" or p.name.startswith("pytorch_model") for p in files):
        return "no model weights"
    for path in files:
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix in (".bin", ".pkl", ".pt"):
            problem = None if zipfile.is_zipfile(path) else "truncated or damaged"
        else:
            continue
        if problem:
            return f"{path.name} is {problem}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """None if the safetensors file's header parses and its tensors fit in the file, else what is wrong."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"truncated ({size} bytes)"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        return "damaged (unreadable header)"
    if 8 + n + end > size:
        return f"truncated ({size} of {8 + n + end} bytes)"
    return None


# ----- metrics --------------------------------------------------------------------------------------------
def strict_json(value):
    """metrics -> the same with every NaN/inf float replaced by None (null), lists and dicts included."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class MetricsLog:
    """metrics.jsonl + TensorBoard (where installed), main process only. A resume drops records after the
    resumed step. Each record is one strict JSON object: {"step", "split" (if given), metrics...}."""

    def __init__(self, out: Path, start_step: int, enabled: bool, tensorboard: bool = True):
        self.file, self.writer = None, None
        if not enabled:
            return
        path = out / METRICS
        if path.is_file():
            from ..checkpoint import write_text_atomic
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.file = path.open("a")
        if not tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / TENSORBOARD), purge_step=start_step + 1)
        except ImportError:  # TensorBoard is optional: the JSONL log has everything
            self.writer = None

    def write(self, step: int, split: str | None, metrics: dict) -> None:
        """One record; TensorBoard gets every finite number as ``split/name`` (``name`` without a split)."""
        if self.file is None:
            return
        record = {"step": step, **({"split": split} if split else {}), **metrics}
        self.file.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.writer.add_scalar(f"{split}/{k}" if split else k, v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def all_finite(accelerator, *values: torch.Tensor) -> bool:
    """True when every value is finite on every process: all skip (or stop) together, keeping DDP in step."""
    bad = sum((~torch.isfinite(v.detach().float())).sum() for v in values if v is not None)
    bad = torch.as_tensor(bad, dtype=torch.float32, device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return not bool(bad > 0)


def clip_gradients(accelerator, parameters, max_norm: float) -> torch.Tensor:
    """Clip the gradients to ``max_norm`` (0: no clipping) -> their total norm before clipping."""
    return accelerator.clip_grad_norm_(parameters, max_norm or float("inf"))


# ----- the engine -----------------------------------------------------------------------------------------
class Engine:
    """One run folder's plumbing, for a training stage or an RL run named ``name``.

    Constructing it checks ``out`` on every process and writes nothing (see ``check_run_folder``); ``start``
    marks the folder once everything is built. ``config``: the run's settings dataclass; ``resumable``: its
    fields that may change on a resume; ``final_names``: the files the run will publish into ``out``.
    """

    def __init__(self, name: str, out, config, accelerator, *, resume: bool, overwrite: bool, resumable,
                 final_names: set[str]):
        if resume and overwrite:
            raise ValueError("--resume and --overwrite contradict each other: give one")
        self.name, self.out, self.config, self.accelerator = name, Path(out), config, accelerator
        self.resumable, self.resume_requested, self.overwrite = set(resumable), resume, overwrite
        self.is_main = accelerator.is_main_process
        self.record = check_run_folder(self.out, name, config, self.resumable, resume, overwrite, final_names)

    def checkpoints(self) -> list[Path]:
        """The checkpoints a --resume may continue from, newest first ([] for a fresh run)."""
        return checkpoint_folders(self.out) if self.resume_requested and self.record is not None else []

    def start(self) -> None:
        """Every process, once the run can start: the main one clears an overwritten run, marks the folder and
        records the settings."""
        from ..checkpoint import write_text_atomic
        self.accelerator.wait_for_everyone()
        if self.is_main:
            written = []
            if self.record is not None and self.overwrite:
                clear_run(self.out, self.record)
            elif self.record is not None:
                written = self.record["written"]
            self.out.mkdir(parents=True, exist_ok=True)
            write_marker(self.out, self.name, written)
            if not (self.out / RUN_CONFIG).is_file():
                write_text_atomic(self.out / RUN_CONFIG, json.dumps(
                    {"stage": self.name, **identity(self.config, self.resumable)}, indent=1))
        self.accelerator.wait_for_everyone()

    def resume(self, candidates: list[Path], load) -> tuple[Path, int]:
        """Load the newest intact checkpoint of ``candidates`` (newest first) with ``load(folder)`` (every
        process) -> (its folder, its step). Say which were skipped and why.

        A truncated or damaged checkpoint (a full disk, a copy cut short) is passed over for the one before
        it; ``load`` raising ResumeRefused (an intact checkpoint of another run) stops at once."""
        skipped = []
        for folder in candidates:
            problem = checkpoint_problem(folder)
            if problem is None:
                try:
                    load(folder)
                except ResumeRefused:
                    raise
                except Exception as err:  # damage the cheap checks miss: the next older checkpoint loads over it
                    problem = f"it failed to load ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            if problem is None:
                step = json.loads((folder / TRAINER_STATE).read_text())["step"]
                if skipped and self.is_main:
                    print(f"{self.name}: checkpoint {'; '.join(skipped)}; resuming from the newest complete "
                          f"one, {folder.name}", file=sys.stderr)
                return folder, step
            skipped.append(f"{folder.name} is unusable: {problem}")
        raise ValueError(f"cannot resume {self.out}: no intact checkpoint ({'; '.join(skipped)}). Start again "
                         "with --overwrite (it deletes this run's checkpoints) or give another --out")

    def save_checkpoint(self, step: int, keep_last: int, write) -> Path:
        """checkpoints/step-N: ``write(folder)`` (every process) fills a temporary folder, which is renamed
        into place once complete (with trainer_state.json last), so a crash or a full disk leaves the previous
        checkpoints intact; then all but the newest ``keep_last`` are removed."""
        accelerator, folder = self.accelerator, self.out / CHECKPOINTS
        final, tmp = folder / f"step-{step:06d}", folder / f".tmp-step-{step:06d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        write(tmp)
        accelerator.wait_for_everyone()
        if self.is_main:
            (tmp / TRAINER_STATE).write_text(json.dumps({"step": step}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in checkpoint_folders(self.out)[keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def publish(self, write) -> list[str]:
        """Main process: ``write(folder)`` writes the final files into a hidden folder, which are listed in the
        marker and then moved into ``out``, so the marker lists exactly the files the run wrote. -> their names.

        A file of the same name that the run did not write (put there during the run) is kept, and the
        files stay in the hidden folder (ValueError saying so)."""
        tmp = self.out / FINAL_TMP
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        record = run_record(self.out) or {"written": []}
        theirs = [n for n in names if (self.out / n).exists() and n not in record["written"]]
        if theirs:
            raise ValueError(f"{self.out} now holds {', '.join(theirs)}, which this run did not write; they are "
                             f"kept, and the final model is in {tmp}")
        write_marker(self.out, self.name, [*record["written"], *names])  # listed before they land
        for name in names:
            os.replace(tmp / name, self.out / name)
        tmp.rmdir()
        return names

    def metrics_log(self, start_step: int, tensorboard: bool = True) -> MetricsLog:
        """The run's metrics.jsonl (records after ``start_step`` dropped) and TensorBoard writer."""
        return MetricsLog(self.out, start_step, self.is_main, tensorboard)

    def progress(self, total: int, initial: int, desc: str, enabled: bool = True):
        """A progress bar on the main process."""
        return tqdm(total=total, initial=initial, desc=desc, disable=not (self.is_main and enabled),
                    dynamic_ncols=True)
