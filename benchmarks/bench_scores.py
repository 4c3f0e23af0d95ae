"""OOD scores (forward only: scores carry no gradient): every backend vs eager torch and torch.compile."""

import pytest

from promptkit import ops

from .conftest import BATCHES, C, D, IMPLEMENTATIONS, K, M, features, implementation, run_benchmark

SCORES = {
    "mcm_score": lambda b, i, p, n, m: ops.mcm_score(i, p, backend=b),
    "negprompt_score": lambda b, i, p, n, m: ops.negprompt_score(i, p, n, backend=b),
    "lsn_score": lambda b, i, p, n, m: ops.lsn_score(i, p, n, backend=b),
    "neglabel_score": lambda b, i, p, n, m: ops.neglabel_score(i, p, m, groups=100, backend=b),
}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("op", list(SCORES))
def test_score(benchmark, op, batch, impl):
    benchmark.group = f"{op} fwd B={batch}"
    inputs = [features(batch, D, seed=1), features(C, D, seed=2), features(C, K, D, seed=3), features(M, D, seed=4)]
    fn = implementation(SCORES[op], impl)
    run_benchmark(benchmark, fn, inputs, backward=False)
