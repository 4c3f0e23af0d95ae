"""Feature mixing (LAPT's mixup), forward: every backend vs eager torch and torch.compile."""

import pytest
import torch

from promptkit import ops

from .conftest import BATCHES, D, DEVICE, IMPLEMENTATIONS, features, implementation, run_benchmark


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("batch", BATCHES)
def test_mix_features(benchmark, batch, impl):
    benchmark.group = f"mix_features fwd B={batch}"
    lam = torch.rand(batch, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    fn = implementation(lambda b, x, y, w: ops.mix_features(x, y, w, backend=b), impl)
    run_benchmark(benchmark, fn, [features(batch, D, seed=1), features(batch, D, seed=2), lam], backward=False)
