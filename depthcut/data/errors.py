"""The data errors a user's files can cause: reported by the CLI as bad input, not as bugs."""

from __future__ import annotations

from depthcut.errors import DepthcutError


class DatasetNotFoundError(DepthcutError, FileNotFoundError):
    """The dataset's files are not under the given root; the message says what was looked for."""


class DatasetError(DepthcutError, ValueError):
    """The dataset's files are there but malformed (bad archive, pickle, IDX header, labels)."""
