"""Triton kernels for promptkit's head math (the GPU backend; runs on CPU under ``TRITON_INTERPRET=1``).

Every function takes torch tensors, makes them contiguous, allocates its outputs and launches one kernel.
Accumulation and outputs are fp64 for fp64 inputs and fp32 for fp32/fp16/bf16 inputs (l2norm_fwd's y keeps x's
dtype). The semantics match the C++ backend in ``promptkit._C`` so the two are interchangeable; the constants
(xent kinds, ortho modes, MIX_EPS) are those of ``promptkit.abi``, re-exported here.

The functions trust their arguments: they are reached through the ops layer (``promptkit.ops``), which validates
the user's inputs once (``promptkit.ops._checks``) and passes float tensors of one device, matching shapes and
valid codes.
"""

from promptkit.abi import (MIX_EPS, ORTHO_ABS_SUM, ORTHO_MEAN_COS, XENT_DENSE, XENT_INDEX, XENT_MULTILABEL,
                           XENT_UNIFORM)

from .cosine import cosine
from .ortho import ortho_bwd, ortho_fwd
from .rowops import l2norm_bwd, l2norm_fwd, mix
from .softmax_stats import segment_stats
from .xent import xent_bwd, xent_fwd

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
