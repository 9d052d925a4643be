"""User-facing errors.

Anything a user can cause (a bad path, a wrong size, an unknown preset) raises `RectiflowError` (or a
subclass) with a one-line message that says what was wrong and what to do. The CLI prints it as
`error: <message>` and exits with status 2, never with a traceback.
"""

from __future__ import annotations


class RectiflowError(Exception):
    """An error caused by the user's input, with a one-line actionable message."""


class FormatError(RectiflowError):
    """A file or directory is not in a format we can read (or is of another architecture)."""


class ConfigError(RectiflowError, ValueError):
    """An invalid configuration value or an unknown preset name."""
