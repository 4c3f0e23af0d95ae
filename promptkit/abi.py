"""The numbers the Python side and the kernels must agree on, defined once.

Imported by the ops layer (``promptkit.ops``) and by the Triton kernels (``promptkit.kernels``). It imports
nothing (no torch, no triton) and sits outside ``promptkit.ops``: importing a module of that package runs its
``__init__``, which reaches ``promptkit.kernels`` (lazily, ``_backends.triton_module``), so the kernels would
import the layer above them. The C++ and CUDA kernels hold a mirror of these values in ``csrc/common``
(``defs.h`` says where); ``promptkit._C.abi()`` exports that mirror and ``tests/ops/test_abi.py`` fails when the
two differ.
"""

from __future__ import annotations

# The target kinds of the fused cross-entropy primitive ``xent`` (csrc/common/xent.h, kernels/xent.py).
XENT_INDEX = 0  # w[b, n] = 1 if n == labels[b]
XENT_UNIFORM = 1  # w[b, n] = 1 / N
XENT_DENSE = 2  # w = targets [B, N]
XENT_MULTILABEL = 3  # multi-label soft margin, y[b, n] = 1 if n // group == labels[b]

# The orthogonality penalties of the ``ortho`` primitive (csrc/common/ortho.h, kernels/ortho.py).
ORTHO_ABS_SUM = 0  # sum_c sum_{i<j} |<yn_ci, yn_cj>|  (LSN Eq. 7)
ORTHO_MEAN_COS = 1  # mean over c and i != j of <yn_ci, yn_cj>  (NegPrompt Eq. 6)
ORTHO_MODES = {"abs_sum": ORTHO_ABS_SUM, "mean_cos": ORTHO_MEAN_COS}

# The norm floor of the ops' L2 normalisation, passed to every l2norm kernel (torch.nn.functional.normalize's
# default eps, so the compiled backends normalise as the torch reference does).
L2NORM_EPS = 1e-12
# The norm floor of mix's re-normalisation, compiled into the mix kernels (csrc/common/rows.h, kernels/rowops.py).
MIX_EPS = 1e-12

# The dtype codes the compiled kernels take for their input arrays, by torch dtype name (csrc/common/defs.h).
DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}


def constants() -> dict[str, object]:
    """Every constant above by name: what ``promptkit._C.abi()`` must return."""
    return {"XENT_INDEX": XENT_INDEX, "XENT_UNIFORM": XENT_UNIFORM, "XENT_DENSE": XENT_DENSE,
            "XENT_MULTILABEL": XENT_MULTILABEL, "ORTHO_ABS_SUM": ORTHO_ABS_SUM, "ORTHO_MEAN_COS": ORTHO_MEAN_COS,
            "MIX_EPS": MIX_EPS, "DTYPE_CODES": dict(DTYPE_CODES)}
