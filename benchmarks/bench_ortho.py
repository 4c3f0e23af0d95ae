"""Orthogonality losses, forward and forward+backward: every backend vs eager torch and torch.compile."""

import pytest

from promptkit import ops

from .conftest import C, D, IMPLEMENTATIONS, K, features, implementation, run_benchmark


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("mode", ["abs_sum", "mean_cos"])
def test_orthogonality(benchmark, mode, backward, impl):
    benchmark.group = f"orthogonality_loss {mode} {'fwd+bwd' if backward else 'fwd'}"
    fn = implementation(lambda b, n: ops.orthogonality_loss(n, mode, backend=b), impl)
    run_benchmark(benchmark, fn, [features(C, K, D, seed=3, grad=backward)], backward=backward)
