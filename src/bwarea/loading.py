"""One call to get a ready model and tokenizer: a path, or the shipped default model when none is given."""

from __future__ import annotations

import torch

from . import default_model
from .model import BWAreaForCausalLM
from .tokenizer import load_tokenizer


def load(model_path=None, dtype=None, device=None):
    """-> (model in eval mode, tokenizer). ``model_path`` None means the shipped default model.

    ``dtype`` defaults to float32 (bf16 weights on disk are widened: CPU matmuls are fastest in float32).
    """
    path = default_model.path() if model_path is None else model_path
    model = BWAreaForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, device=device)
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer at {path} has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}")
    # Inference only from here: faster CPU decoding (a no-op on GPUs).
    return model.optimize_for_cpu_decoding(), tokenizer
