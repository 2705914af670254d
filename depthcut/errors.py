"""depthcut's own errors: the ones a user's input can cause.

The CLI reports exactly these (exit code 2, one paragraph, no traceback); any other exception is
a bug in depthcut and is reported as an internal error with its traceback saved to a file.
"""

from __future__ import annotations


class DepthcutError(Exception):
    """Base of every error the user's input can cause (bad settings, files, data, models)."""


class ConfigError(DepthcutError, ValueError):
    """An invalid setting: a value out of range, an unknown name, a malformed config file.

    A ValueError too, so code catching ValueError for bad arguments keeps working.
    """
