"""oneDNN products on CPU (``bwarea.kernels``): the same numbers as F.linear, only where autograd is not watching,
and a route that switches off cleanly."""

import pytest
import torch
import torch.nn.functional as F

from bwarea import BWAreaForCausalLM, kernels
from conftest import tiny_config

needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="this torch build has no usable oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape", [(40, 48), (3, 17, 48), (2, 5, 4, 48)])
def test_linear_agrees_with_f_linear(shape):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(*shape, generator=g), torch.randn(72, 48, generator=g), torch.randn(72, generator=g)
    with torch.no_grad():
        for bias in (None, b):
            torch.testing.assert_close(kernels.linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
        # a column-major weight (optimize_for_cpu_decoding's layout) and a strided input
        torch.testing.assert_close(kernels.linear(x, w.t().contiguous().t()), F.linear(x, w), rtol=1e-5, atol=1e-5)
        xs = torch.randn(*shape[:-1], 96, generator=g)[..., ::2]
        torch.testing.assert_close(kernels.linear(xs, w), F.linear(xs, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_linear_with_and_without_residual():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 64, generator=g)
    packed = kernels.pack(w)
    for rows in (1, 4, 8, 33):
        x, r = torch.randn(rows, 64, generator=g), torch.randn(rows, 200, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(kernels.packed_linear(x, packed), F.linear(x, w), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(kernels.packed_linear(x, packed, r), F.linear(x, w) + r, rtol=1e-5, atol=1e-4)


def test_training_products_keep_autograd():
    """With gradients to track the product is F.linear's, so backward gives the right gradients."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 48, generator=g, requires_grad=True)
    w = torch.randn(24, 48, generator=g, requires_grad=True)
    kernels.linear(x, w).square().sum().backward()
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    F.linear(x2, w2).square().sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)


def test_model_forward_same_with_and_without_grad():
    """The model's Linear layers go through oneDNN under no_grad and F.linear under autograd: the same logits
    (under given actions: the inverse model's snap to the nearest code may flip on a rounding difference)."""
    torch.manual_seed(0)
    model = BWAreaForCausalLM(tiny_config()).eval()
    ids, actions = torch.randint(3, 512, (2, 24)), torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        fast = model(ids, action_idx=actions).logits, model.policy_logits(ids)
    slow = model(ids, action_idx=actions).logits, model.policy_logits(ids)
    assert slow[0].requires_grad
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-4)


def test_env_switch_turns_the_route_off(monkeypatch):
    monkeypatch.setenv("BWAREA_ONEDNN", "0")
    monkeypatch.setattr(kernels, "_available", None)
    assert not kernels.onednn_available()
    x, w = torch.randn(32, 8), torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))


def test_a_failing_self_check_turns_the_route_off(monkeypatch):
    """A torch whose private oneDNN ops changed (here: pack raises) must fall back, not break or mislead."""
    def broken(weight):
        raise RuntimeError("no such op")
    monkeypatch.setattr(kernels, "pack", broken)
    monkeypatch.setattr(kernels, "_available", None)
    assert not kernels.onednn_available()


def test_cpu_autocast_keeps_its_precision():
    """Under CPU autocast F.linear computes in bf16; the oneDNN route must not silently return float32."""
    x, w = torch.randn(32, 16), torch.randn(8, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.linear(x, w).dtype == F.linear(x, w).dtype == torch.bfloat16
