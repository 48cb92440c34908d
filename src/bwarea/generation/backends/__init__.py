"""Decode backends: one new position through the policy and the world model, in two halves around the action.

A ``DecodeStep`` is made per generation. It owns the KV caches (the prefill fills them through the model's own
blocks) and then runs each decode step as

    policy_logits, hidden = step.lower(tokens, i)      # policy, and the world model below the action layer
    logits = step.upper(hidden, actions, i)            # the action enters; the world model's upper half

where step i feeds the token at cache column ``width + i``. The backends:

* ``eager``: the model's own blocks over the caches. The reference: the model's maths exists once, in model.py.
* ``cpu``: the same maths flattened into tensor ops over (rows, hidden), with weight layouts prepared for CPU
  products (column blocks, stacked policy/world pairs, oneDNN-packed copies) and a thread count chosen per step.
* ``cuda``: the eager step over static full-length caches, captured once into CUDA graphs and replayed
  (``cuda-compile``: compiled by ``torch.compile`` first, so elementwise ops fuse). ``static`` is that step
  run without capture, on any device: what the CUDA backends replay, testable on a CPU.

``backend_for(model, device, name)`` picks one: the name given, else ``cpu`` on CPU, ``cuda`` on a CUDA device,
``eager`` elsewhere. Every backend is tested against ``eager`` by the shared equivalence suite
(tests/test_backends.py).
"""

from __future__ import annotations

import torch

BACKENDS = ("eager", "cpu", "static", "cuda", "cuda-compile")


class DecodeStep:
    """The seam. Subclasses set ``policy_caches`` (None when no policy runs) and ``world_caches`` in __init__."""

    name = "base"

    def __init__(self, model, rows: int, width: int, steps: int, attention_mask, run_policy: bool):
        raise NotImplementedError

    def lower(self, tokens: torch.Tensor, i: int, policy: bool = True):
        """tokens (rows,) fed at column width + i -> (action logits (rows, num_actions) float32, or None without
        ``policy``; the world model's hidden state below the action layer, in the backend's own form)."""
        raise NotImplementedError

    def upper(self, hidden, actions: torch.Tensor, i: int) -> torch.Tensor:
        """``lower``'s hidden state and actions (rows,) -> next-token logits (rows, vocab) float32."""
        raise NotImplementedError


def backend_for(model, device: torch.device, name: str | None = None) -> type[DecodeStep]:
    """The DecodeStep class to decode ``model`` on ``device`` with: ``name``, or the device's default."""
    if name is None:
        name = {"cpu": "cpu", "cuda": "cuda"}.get(device.type, "eager")
    if name not in BACKENDS:
        raise ValueError(f"unknown decode backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "eager":
        from .eager import EagerStep
        return EagerStep
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"the cpu decode backend runs models on the CPU; this one is on {device}")
        from .cpu import CpuStep
        return CpuStep
    if name == "static":
        from .cuda import StaticStep
        return StaticStep
    if device.type != "cuda":
        raise ValueError(f"the {name} decode backend runs models on a CUDA device; this one is on {device}")
    from .cuda import CudaGraphStep, CompiledCudaGraphStep
    return CompiledCudaGraphStep if name == "cuda-compile" else CudaGraphStep


def decode_positions(attention_mask, rows: int, width: int, steps: int, device) -> torch.Tensor:
    """(rows, steps) rotary positions of the tokens fed at decode steps 0..steps-1: each row counts its own
    real prompt tokens (left padding takes no positions)."""
    valid_len = width if attention_mask is None else attention_mask.sum(-1, keepdim=True)
    return valid_len + torch.arange(steps, device=device).expand(rows, -1)
