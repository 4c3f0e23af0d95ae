"""Prompt losses, forward and forward+backward: every backend vs eager torch and compile."""

import pytest
import torch

from promptkit import ops

from .conftest import BATCHES, C, D, DEVICE, IMPLEMENTATIONS, K, features, implementation, run_benchmark


def _labels(batch):
    return torch.randint(0, C, (batch,), generator=torch.Generator().manual_seed(5)).to(DEVICE)


def _soft_targets(batch):
    return torch.softmax(features(batch, C * (1 + K), seed=6) * 3, dim=-1)


LOSSES = {
    "lsn_negative_loss": (lambda b, i, p, n, y, t: ops.lsn_negative_loss(i, p, y, backend=b)),
    "negprompt_loss": (lambda b, i, p, n, y, t: ops.negprompt_loss(i, p, n, backend=b)),
    "soft_cross_entropy": (lambda b, i, p, n, y, t: ops.soft_cross_entropy(
        i, torch.cat([p, n.reshape(-1, n.shape[-1])]), t, backend=b)),
}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("op", list(LOSSES))
def test_loss(benchmark, op, batch, backward, impl):
    benchmark.group = f"{op} {'fwd+bwd' if backward else 'fwd'} B={batch}"
    inputs = [features(batch, D, seed=1, grad=backward), features(C, D, seed=2, grad=backward),
              features(C, K, D, seed=3, grad=backward), _labels(batch), _soft_targets(batch)]
    fn = implementation(LOSSES[op], impl)
    run_benchmark(benchmark, fn, inputs, backward=backward)
