"""OOD scores (forward only: scores carry no gradient): every backend vs eager torch and torch.compile, and on a
CPU the bare BLAS product each score contains ("blas")."""

import pytest

from promptkit import ops

from .conftest import BATCHES, C, D, WITH_PRODUCTS, K, M, blas_products, features, implementation, run_benchmark

SCORES = {
    "mcm_score": lambda b, i, p, n, m: ops.mcm_score(i, p, backend=b),
    "negprompt_score": lambda b, i, p, n, m: ops.negprompt_score(i, p, n, backend=b),
    "lsn_score": lambda b, i, p, n, m: ops.lsn_score(i, p, n, backend=b),
    "neglabel_score": lambda b, i, p, n, m: ops.neglabel_score(i, p, m, groups=100, backend=b),
}
# Columns of each score's one product (the cpp backend's image @ text.T over all its prompts).
COLUMNS = {"mcm_score": C, "negprompt_score": C * (1 + K), "lsn_score": C * (1 + K), "neglabel_score": C + M}


@pytest.mark.parametrize("impl", WITH_PRODUCTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("op", list(SCORES))
def test_score(benchmark, op, batch, impl):
    benchmark.group = f"{op} fwd B={batch}"
    inputs = [features(batch, D, seed=1), features(C, D, seed=2), features(C, K, D, seed=3), features(M, D, seed=4)]
    fn = blas_products(batch, COLUMNS[op]) if impl == "blas" else implementation(SCORES[op], impl)
    run_benchmark(benchmark, fn, [] if impl == "blas" else inputs, backward=False)
