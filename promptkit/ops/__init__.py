"""The op layer: the math every trainer and scorer runs, on four backends.

Every function takes raw features (rows are L2-normalised inside) and ``backend="auto"|"torch"|"cpp"|"triton"|
"cuda"``. ``auto`` uses $PROMPTKIT_BACKEND when set, else the fastest backend usable for the tensors' device;
``torch`` is the plain-PyTorch reference in ``promptkit.ops.reference``.
"""

from promptkit.ops._backends import BACKENDS, BackendUnavailableError, available_backends, resolve_backend
from promptkit.ops.cosine import cosine_logits
from promptkit.ops.losses import lsn_negative_loss, negprompt_loss, soft_cross_entropy
from promptkit.ops.mix import mix_features
from promptkit.ops.ortho import orthogonality_loss
from promptkit.ops.scores import lsn_score, mcm_score, min_concept_score, neglabel_score, negprompt_score

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "resolve_backend",
    "cosine_logits",
    "mcm_score",
    "negprompt_score",
    "lsn_score",
    "min_concept_score",
    "neglabel_score",
    "lsn_negative_loss",
    "negprompt_loss",
    "orthogonality_loss",
    "soft_cross_entropy",
    "mix_features",
]
