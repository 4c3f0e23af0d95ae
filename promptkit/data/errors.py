"""Error types of the data layer."""

from __future__ import annotations

from promptkit.errors import UserError


class DataError(UserError, ValueError):
    """A dataset, list file, class-name file or cache entry is missing or malformed."""


class BadImageError(DataError):
    """One image could not be read or decoded; ``path`` says which."""

    def __init__(self, path: str, reason: str = "") -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot read image {path}" + (f": {reason}" if reason else ""))
