"""The one exception for a user's mistake.

A :class:`UserError` is printed by the CLI as a single line, without a traceback, and makes
``python -m harness`` exit with status 2 (asv's ``UserError`` habit). Programmer mistakes raise
``ValueError``/``TypeError`` or fail an assert instead.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a scenario file, a model reference, a command-line value."""


class UnsupportedError(Exception):
    """Raised by a backend for a cell it cannot run here; the cell is recorded ``unsupported``."""
