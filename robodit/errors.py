"""Error types shared across floors. They live at the bottom so that a dataset, env or control module can
raise a user-facing error without importing the CLI that prints it."""

from __future__ import annotations


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""
