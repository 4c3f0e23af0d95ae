"""OOD methods on a frozen CLIP, one module each, registered by name (the contract: ``promptkit.methods.base``)."""

from promptkit.methods import saved
from promptkit.methods.base import LabelImages, Method, TextFeatures, TrainingData
from promptkit.methods.coop import CoOp
from promptkit.methods.lapt import LAPT
from promptkit.methods.lsn import LSN
from promptkit.methods.mcm import MCM
from promptkit.methods.neglabel import NegLabel
from promptkit.methods.negprompt import NegPrompt
from promptkit.methods.saved import PromptsError

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (MCM, CoOp, LSN, NegPrompt, NegLabel, LAPT)}


def load_method(directory, clip, backend: str = "auto") -> Method:
    """Load prompts saved by ``Method.save`` onto ``clip`` (refuses another model's prompts)."""
    return saved.load_method(directory, clip, METHODS, backend)


def load_scorer(directory, clip, backend: str = "auto") -> Method | None:
    """The saved method scoring from its saved text features, on an image-only ``clip`` (None: it has none)."""
    return saved.load_scorer(directory, clip, METHODS, backend)


__all__ = ["METHODS", "Method", "TrainingData", "TextFeatures", "LabelImages", "PromptsError", "load_method",
           "load_scorer", "MCM", "CoOp", "LSN", "NegPrompt", "NegLabel", "LAPT"]
