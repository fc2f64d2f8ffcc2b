"""The error every leaf module raises for a value that cannot work."""
from __future__ import annotations


class ConfigurationError(ValueError):
    """A configuration value that cannot work; the message names it."""
