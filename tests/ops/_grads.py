"""Forward + backward comparison of an op on a backend against the torch reference."""

import torch

from .conftest import assert_matches_reference


def value_and_grads(fn, backend, inputs, upstream=None):
    """fn(backend, *inputs) and the gradients of <upstream, output> w.r.t. every floating input."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(backend, *leaves)
    weight = torch.ones_like(out) if upstream is None else upstream.to(out)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in leaves if t.is_floating_point()]


def check_forward_backward(fn, backend, inputs, what):
    """Compare value and input gradients with the reference in the same dtype and in fp64."""
    g = torch.Generator().manual_seed(1)
    probe = fn("torch", *inputs)
    upstream = torch.randn(probe.shape, generator=g, dtype=torch.float64) if probe.ndim else None
    out, grads = value_and_grads(fn, backend, inputs, upstream)
    ref, ref_grads = value_and_grads(fn, "torch", inputs, upstream)
    as64 = [t.double() if t.is_floating_point() else t for t in inputs]
    ref64, ref64_grads = value_and_grads(fn, "torch", as64, upstream)
    assert_matches_reference(out, ref, ref64, what=f"{what} value")
    for i, (grad, ref_grad, ref64_grad) in enumerate(zip(grads, ref_grads, ref64_grads)):
        assert grad is not None, f"{what}: no gradient reached floating input {i}"
        assert_matches_reference(grad, ref_grad, ref64_grad, what=f"{what} grad of input {i}")
