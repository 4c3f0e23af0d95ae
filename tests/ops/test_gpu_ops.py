"""The custom ops on CUDA tensors: torch.library.opcheck with the triton and cuda backends, and a compiled
training step equal to the eager one.

Collected only where a GPU exists (tests/ops/conftest.py); the CPU twins are in test_compile.py, whose opcheck
cases are reused here with every tensor moved to the GPU and the backend swapped.
"""

import pytest
import torch

from promptkit import ops

from .conftest import GPU_BACKENDS, make_inputs
from .test_compile import _opcheck_cases, assert_compiled_step_matches_eager

BACKENDS = [backend for backend, _ in GPU_BACKENDS]


def on_gpu(arg, backend: str):
    """An opcheck argument moved to the GPU (gradients kept as asked), or the backend name swapped."""
    if isinstance(arg, torch.Tensor):
        return arg.detach().cuda().requires_grad_(arg.requires_grad)
    return backend if arg == "cpp" else arg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck_on_cuda(name, backend):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, tuple(on_gpu(a, backend) for a in args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_training_step_on_cuda_matches_eager(backend):
    image, pos, neg, labels = make_inputs((6, 4, 3, 16), torch.float32, "cuda")

    def step(image, pos, neg):
        loss = (ops.lsn_negative_loss(image, neg[:, 0], labels, backend=backend)
                + ops.orthogonality_loss(neg, backend=backend))
        return loss, ops.lsn_score(image, pos, neg, backend=backend)

    assert_compiled_step_matches_eager(step, (image, pos, neg))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_run_on_the_tensors_gpu_not_the_current_one(backend):
    """Triton launches on torch's current device: each launch must make the tensors' GPU current first."""
    image, pos, neg, labels = make_inputs((5, 3, 2, 16), torch.float32, "cuda:1")
    with torch.cuda.device(0):
        score = ops.lsn_score(image, pos, neg, backend=backend)
        loss = ops.lsn_negative_loss(image, neg[:, 0], labels, backend=backend)
    assert score.device == loss.device == torch.device("cuda:1")
    torch.testing.assert_close(score, ops.lsn_score(image, pos, neg, backend="torch"))
    torch.testing.assert_close(loss, ops.lsn_negative_loss(image, neg[:, 0], labels, backend="torch"))
