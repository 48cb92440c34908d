"""CPU matrix products through oneDNN, for inference.

torch multiplies float32 matrices on CPU with MKL, and MKL runs its AVX2 kernels on AMD processors even where
they have AVX-512. oneDNN (bundled with torch, as ``torch.ops.mkldnn``) picks its kernels from the CPU's
features, and is faster there for the many-row products of prompts, fan-out and likelihoods (``linear``) and,
with a weight stored once in its blocked layout (``pack``), for a decode step's few rows.
``benchmarks/bench_kernels.py`` measures both against MKL on the machine at hand.

The model's layers are plain ``nn.Linear``: training never comes here. Inference code that wants the route
enters ``cpu_products(device)`` around its forward passes (the generation prefill, fan-out, the language-model
view); inside it every ``F.linear`` that qualifies goes through ``linear``.

Everything here is inference-only: a product that autograd has to see, a compiled graph, a device other
than the CPU or a dtype other than float32 goes through ``F.linear``, as does everything when oneDNN's ops are
missing or fail the check ``onednn_available`` runs once. ``BWAREA_ONEDNN=0`` turns the route off.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# From this many rows an unpacked weight beats MKL's mm (bench_kernels.py), but for the smallest matrices.
MIN_ROWS = 16

_available: bool | None = None


def onednn_available() -> bool:
    """Whether oneDNN's linear ops exist here, give F.linear's results, and are not turned off."""
    global _available
    if _available is None:
        _available = os.environ.get("BWAREA_ONEDNN", "1") != "0" and _self_check()
    return _available


def _self_check() -> bool:
    """One small product of each kind against F.linear: an op that is missing, raises, or disagrees (a torch
    build that changed these private ops) switches the route off for good, never giving wrong numbers."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x, w, r = torch.randn(5, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(5, 40, generator=g)
        with torch.no_grad():
            packed = pack(w)
            results = (torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                       packed_linear(x, packed), packed_linear(x, packed, r))
        expected = (F.linear(x, w), F.linear(x, w), F.linear(x, w) + r)
        return all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(results, expected))
    except (AttributeError, RuntimeError, TypeError):
        return False


_packs: dict = {}


def packs(dtype: torch.dtype) -> bool:
    """Whether ``pack`` / ``packed_linear`` work for weights of ``dtype`` here and agree with F.linear (checked
    once per dtype, like ``onednn_available``; a CPU without bf16 support makes oneDNN refuse or emulate)."""
    if dtype not in _packs:
        _packs[dtype] = onednn_available() and (dtype == torch.float32 or _check_packed(dtype))
    return _packs[dtype]


def _check_packed(dtype) -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        x, w, r = (torch.randn(*shape, generator=g).to(dtype) for shape in ((3, 64), (96, 64), (3, 96)))
        with torch.no_grad():
            packed = pack(w)
            got = (packed_linear(x, packed), packed_linear(x, packed, r))
        want = (F.linear(x.float(), w.float()), F.linear(x.float(), w.float()) + r.float())
        return all(a.dtype == dtype and torch.allclose(a.float(), b, rtol=3e-2, atol=3e-2) for a, b in zip(got, want))
    except (AttributeError, RuntimeError, TypeError):
        return False


def _routable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return False  # training: autograd needs F.linear's backward
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, torch.nn.Parameter) \
            or weight.layout != torch.strided or torch.compiler.is_compiling():
        return False  # tensor subclasses (DTensor, fake tensors) and compiled graphs keep torch's own route
    if torch.is_autocast_enabled("cpu"):
        return False  # autocast casts F.linear's inputs (to bf16): keep the precision it asked for
    return x.numel() >= MIN_ROWS * x.shape[-1] and onednn_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on CPU in float32, with no gradient to track and at least ``MIN_ROWS``
    rows, through oneDNN. The results agree with F.linear to float32 rounding (a different summation order)."""
    if _routable(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """An (out, in) weight (float32, or bf16 / float16 where ``packs`` says so) -> a copy in oneDNN's blocked
    layout, for ``packed_linear`` (no autograd).
    The layout is chosen for 8-row products; it serves 1 to 64 rows equally well."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 8)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (rows, in) times a ``pack``-ed weight -> (rows, out), plus ``residual`` (rows, out) in the same op."""
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, None, "add")


class _OneDNNLinears(TorchFunctionMode):
    """Routes ``F.linear`` through ``linear`` (which keeps F.linear wherever oneDNN does not apply)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return linear(*args, **kwargs)
        return func(*args, **kwargs)


def cpu_products(device) -> TorchFunctionMode | nullcontext:
    """A context for inference forward passes on ``device``: on CPU with oneDNN usable, its ``F.linear`` calls
    go through ``linear``; elsewhere nothing changes."""
    if torch.device(device).type == "cpu" and onednn_available():
        return _OneDNNLinears()
    return nullcontext()
