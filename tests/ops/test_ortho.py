"""Orthogonality losses on every backend, and hand-computed values for both modes."""

import pytest
import torch

from promptkit import ops

from ._grads import check_forward_backward
from .conftest import backend_params, make_inputs


@pytest.mark.parametrize("mode", ["abs_sum", "mean_cos"])
@pytest.mark.parametrize("backend,device,dtype,shape", backend_params())
def test_orthogonality_loss(mode, backend, device, dtype, shape):
    neg = make_inputs(shape, dtype, device)[2]
    fn = lambda b, n: ops.orthogonality_loss(n, mode=mode, backend=b)  # noqa: E731
    check_forward_backward(fn, backend, [neg], f"orthogonality_loss {mode}")


def test_orthogonality_hand_computed():
    # One class, K = 3 prompts at 0, 90 and 180 degrees: cosines (0, -1, 0) for pairs (01, 02, 12).
    prompts = torch.tensor([[[1.0, 0.0], [0.0, 5.0], [-2.0, 0.0]]])
    for backend in ("torch", "cpp"):
        assert ops.orthogonality_loss(prompts, "abs_sum", backend=backend).item() == pytest.approx(1.0)
        # Mean over the 6 ordered pairs of (0, -1, 0, 0, -1, 0).
        assert ops.orthogonality_loss(prompts, "mean_cos", backend=backend).item() == pytest.approx(-2 / 6)
        single = torch.randn(4, 1, 3)
        assert ops.orthogonality_loss(single, "mean_cos", backend=backend).item() == 0.0
