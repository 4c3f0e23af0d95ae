"""Cosine logits, forward and forward+backward: every backend vs eager torch and torch.compile, and on a CPU the
bare BLAS products each pass contains ("blas")."""

import pytest

from promptkit import ops

from .conftest import BATCHES, C, D, WITH_PRODUCTS, K, blas_products, features, implementation, run_benchmark


@pytest.mark.parametrize("impl", WITH_PRODUCTS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", BATCHES)
def test_cosine_logits(benchmark, batch, backward, impl):
    benchmark.group = f"cosine_logits {'fwd+bwd' if backward else 'fwd'} B={batch}"
    if impl == "blas":
        products = blas_products(batch, C * (1 + K), image_grad=backward, text_grad=backward)
        run_benchmark(benchmark, products, [], backward=False)
        return
    # The loss on top (mean of squares) gives the backward a dense upstream gradient.
    fn = implementation(lambda b, i, t: ops.cosine_logits(i, t, 100.0, backend=b).square().mean(), impl)
    inputs = [features(batch, D, seed=1, grad=backward), features(C * (1 + K), D, seed=2, grad=backward)]
    run_benchmark(benchmark, fn, inputs, backward=backward)
