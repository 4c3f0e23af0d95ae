"""mix_features on every backend and against a hand-computed value."""

import pytest
import torch

from promptkit import ops

from .conftest import assert_matches_reference, backend_params, make_inputs


@pytest.mark.parametrize("backend,device,dtype,shape", backend_params())
def test_mix_features(backend, device, dtype, shape):
    image, pos, _, labels = make_inputs(shape, dtype, device)
    partner = pos[labels]
    lam = torch.linspace(0, 1, shape[0], dtype=torch.float64).to(device)
    for weight in (lam, 0.3):
        out = ops.mix_features(image, partner, weight, backend=backend)
        ref = ops.mix_features(image, partner, weight, backend="torch")
        ref64 = ops.mix_features(image.double(), partner.double(), weight, backend="torch")
        assert_matches_reference(out, ref, ref64, what="mix_features")


def test_mix_hand_computed():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    expected = torch.tensor([[0.6, 0.4]]) / (0.6**2 + 0.4**2) ** 0.5
    for backend in ("torch", "cpp"):
        torch.testing.assert_close(ops.mix_features(a, b, 0.6, backend=backend), expected)
