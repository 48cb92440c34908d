"""Training: stage 1 (world model, inverse dynamics, codebook), stage 2 (policy behaviour cloning), a Llama
baseline, and the loop they share (loop.py). Each stage is a config dataclass plus a Stage; ``train`` runs it.

    from bwarea.train import PretrainConfig, PretrainStage, train
    train(PretrainStage(), PretrainConfig(data=["corpus.txt"], tokenizer="tok", out="runs/s1", max_steps=1000))
"""

from .baseline import BaselineStage
from .bc import BCConfig, BCStage
from .loop import TrainConfig, TrainingDiverged, train
from .pretrain import PretrainConfig, PretrainStage

__all__ = ["BCConfig", "BCStage", "BaselineStage", "PretrainConfig", "PretrainStage", "TrainConfig",
           "TrainingDiverged", "train"]
