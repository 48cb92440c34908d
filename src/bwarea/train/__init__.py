"""Training: stage 1 (world model, inverse dynamics, codebook), stage 2 (policy behaviour cloning), a Llama
baseline, the loop they share (loop.py) and the engine under it and RL (engine.py). Each stage is a config
dataclass plus a Stage; ``train`` runs it.

    from bwarea.train import PretrainConfig, PretrainStage, train
    train(PretrainStage(), PretrainConfig(data=["corpus.txt"], tokenizer="tok", out="runs/s1", max_steps=1000))

    engine.py    accelerator, run folder and marker, atomic checkpoints, resume, non-finite guard, metrics
    loop.py      TrainConfig, Stage, the Trainer: data, optimiser, schedule, the step
    pretrain.py  stage 1;  bc.py  stage 2;  baseline.py  the Llama baseline;  vq.py  codebook helpers
    settings.py  the config idiom (help text on fields, --config files, flags); torch-free

The names below load on first use (PEP 562), so ``bwarea.train.settings`` imports without torch.
"""

from __future__ import annotations

from ..lazy import lazy_attributes

# public name -> the submodule defining it
_LAZY = {"BCConfig": "settings", "BCStage": "bc", "BaselineStage": "baseline", "PretrainConfig": "settings",
         "PretrainStage": "pretrain", "TrainConfig": "settings", "TrainingDiverged": "loop", "train": "loop"}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
