"""The custom ops pass torch.library.opcheck and compose under torch.compile on the CPU."""

import pytest
import torch

from promptkit import ops

from .conftest import make_inputs

OPS = torch.ops.promptkit


def assert_compiled_step_matches_eager(step, inputs) -> None:
    """``step(*inputs) -> (loss, score)`` under ``torch.compile(fullgraph=True)``: same loss, score and input
    gradients as eager."""
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    eager_leaves = [t.clone().requires_grad_(True) for t in inputs]
    loss, score = compiled(*leaves)
    eager_loss, eager_score = step(*eager_leaves)
    loss.backward()
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(score, eager_score)
    for got, want in zip(leaves, eager_leaves):
        torch.testing.assert_close(got.grad, want.grad)


def _opcheck_cases():
    image, pos, neg, labels = make_inputs((3, 2, 2, 5), torch.float64, "cpu")
    flat = neg.reshape(-1, 5)
    targets = torch.softmax(torch.randn(3, 6, dtype=torch.float64), dim=-1)
    text = torch.cat([pos, flat])
    g = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return {
        "cosine_logits": (OPS.cosine_logits.default, (g(image), g(text), 3.0, "cpp")),
        "mcm_score": (OPS.mcm_score.default, (image, pos, 1.0, "cpp")),
        "negprompt_score": (OPS.negprompt_score.default, (image, pos, flat, 1.0, "cpp")),
        "lsn_score": (OPS.lsn_score.default, (image, pos, neg, 1.0, 5.0, "cpp")),
        "min_concept_score": (OPS.min_concept_score.default, (image, neg, 5.0, "cpp")),
        "neglabel_score": (OPS.neglabel_score.default, (image, pos, flat, 0.01, 2, "cpp")),
        "xent_loss index": (OPS.xent_loss.default, (g(image), g(pos), -20.0, 0, labels, None, "cpp")),
        "xent_loss dense": (OPS.xent_loss.default, (g(image), g(text), 100.0, 2, None, targets, "cpp")),
        "xent_loss image frozen": (OPS.xent_loss.default, (image, g(text), 100.0, 2, None, targets, "cpp")),
        "negprompt_loss msp": (OPS.negprompt_loss.default,
                               (g(image), g(pos), g(neg), labels, 0.1, 0.05, 0.01, "msp", "push", "mean", "cpp")),
        "negprompt_loss oe": (OPS.negprompt_loss.default,
                              (g(image), g(pos), g(neg), None, 0.1, 0.05, 0.01, "oe", "pull", "mean", "cpp")),
        "negprompt_loss eq4": (OPS.negprompt_loss.default,
                               (g(image), g(pos), g(neg), None, 0.1, 0.05, 0.01, "eq4", "pull", "pairwise", "cpp")),
        "negprompt_loss msp image frozen": (OPS.negprompt_loss.default,
                                            (image, g(pos), g(neg), labels, 0.1, 0.05, 0.01, "msp", "push", "mean",
                                             "cpp")),
        "cosine_logits text frozen": (OPS.cosine_logits.default, (g(image), text, 3.0, "cpp")),
        "orthogonality_loss": (OPS.orthogonality_loss.default, (g(neg), "abs_sum", "cpp")),
        "mix_features": (OPS.mix_features.default, (image, pos[labels], torch.rand(3, dtype=torch.float64), "cpp")),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


def test_torch_compile_training_step_matches_eager():
    image, pos, neg, labels = make_inputs((6, 4, 3, 16), torch.float32, "cpu")

    def step(image, pos, neg):
        loss = (ops.negprompt_loss(image, pos, neg, backend="cpp", labels=labels)
                + ops.orthogonality_loss(neg, backend="cpp"))
        score = ops.lsn_score(image, pos, neg, backend="cpp")
        return loss, score

    assert_compiled_step_matches_eager(step, (image, pos, neg))
