"""Error types of the model layer (imported by every module of ``promptkit.clip``; imports none of them)."""

from __future__ import annotations

from promptkit.errors import UserError


class ModelLoadError(UserError, ValueError):
    """A model or its weights could not be loaded; the message names the model or file and what to do."""
