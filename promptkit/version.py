"""promptkit's version (also in pyproject.toml, which a test compares), in a module that imports nothing."""

__version__ = "0.1.0"
