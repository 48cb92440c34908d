"""One call to get a ready model and tokenizer: a path, or the shipped default model when none is given."""

from __future__ import annotations

import torch

from . import default_model
from .errors import BWAreaError
from .model import BWAreaForCausalLM
from .tokenizer import load_tokenizer


def load(model_path=None, dtype=None, device=None, allow_pickle: bool = False):
    """-> (model in eval mode, tokenizer). ``model_path`` None means the shipped default model.

    ``dtype`` defaults to float32 (bf16 weights on disk are widened: CPU matmuls are fastest in float32).
    ``allow_pickle`` lets a trusted pytorch_model.bin be read (with torch's ``weights_only``).
    """
    device = check_device(device)  # before the weights load: a typo should not cost the load time
    path = default_model.path() if model_path is None else model_path
    model = BWAreaForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, device=device,
                                              allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > model.config.vocab_size:
        raise BWAreaError(f"tokenizer at {path} has {len(tokenizer)} tokens but the model's vocabulary is "
                          f"{model.config.vocab_size}")
    # Inference only from here: faster CPU decoding (a no-op on GPUs).
    return model.optimize_for_cpu_decoding(), tokenizer


def check_device(device) -> torch.device | None:
    """A device name ("cpu", "cuda", "cuda:1", "mps") -> torch.device, or BWAreaError saying why it cannot be used
    here (an unknown name, a torch built without CUDA, no such GPU). None stays None (the default device)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BWAreaError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise BWAreaError(f"device {str(device)!r} is not available: this torch build has no CUDA support "
                              f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if count == 0:
            raise BWAreaError(f"device {str(device)!r} is not available: torch sees no CUDA GPU")
        if dev.index is not None and dev.index >= count:
            raise BWAreaError(f"device {str(device)!r} is not available: torch sees {count} CUDA GPU(s), "
                              f"numbered 0..{count - 1}")
        return dev
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        available = torch.backends.mps.is_available()
    else:
        available = bool(getattr(backend, "is_available", lambda: False)())
    if not available:
        raise BWAreaError(f"device {str(device)!r} is not available on this machine; use --device cpu")
    return dev
