"""OOD methods on a frozen CLIP, one module each, registered by name for the CLI."""

from promptkit.methods.base import Method, PromptsError, load_method as _load_method
from promptkit.methods.coop import CoOp
from promptkit.methods.lapt import LAPT
from promptkit.methods.lsn import LSN
from promptkit.methods.mcm import MCM
from promptkit.methods.neglabel import NegLabel
from promptkit.methods.negprompt import NegPrompt

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (MCM, CoOp, LSN, NegPrompt, NegLabel, LAPT)}


def load_method(directory, clip, backend: str = "auto") -> Method:
    """Load prompts saved by ``Method.save`` onto ``clip`` (refuses another model's prompts)."""
    return _load_method(directory, clip, METHODS, backend)


__all__ = ["METHODS", "Method", "PromptsError", "load_method", "MCM", "CoOp", "LSN", "NegPrompt", "NegLabel", "LAPT"]
