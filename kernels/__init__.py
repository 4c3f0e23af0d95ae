"""Triton kernels for promptkit's head math (the GPU backend; runs on CPU under ``TRITON_INTERPRET=1``).

Every function takes torch tensors, makes them contiguous, allocates its outputs and launches one kernel.
Accumulation and outputs are fp64 for fp64 inputs and fp32 for fp32/fp16/bf16 inputs (l2norm_fwd's y keeps x's
dtype). The semantics match the C++ backend in ``promptkit._C`` so the two are interchangeable.
"""

from .cosine import cosine
from .ortho import ORTHO_ABS_SUM, ORTHO_MEAN_COS, ortho_bwd, ortho_fwd
from .rowops import MIX_EPS, l2norm_bwd, l2norm_fwd, mix
from .softmax_stats import segment_stats
from .xent import XENT_DENSE, XENT_INDEX, XENT_MULTILABEL, XENT_UNIFORM, xent_bwd, xent_fwd

__all__ = [
    "cosine",
    "segment_stats",
    "xent_fwd",
    "xent_bwd",
    "l2norm_fwd",
    "l2norm_bwd",
    "mix",
    "ortho_fwd",
    "ortho_bwd",
    "XENT_INDEX",
    "XENT_UNIFORM",
    "XENT_DENSE",
    "XENT_MULTILABEL",
    "ORTHO_ABS_SUM",
    "ORTHO_MEAN_COS",
    "MIX_EPS",
]
