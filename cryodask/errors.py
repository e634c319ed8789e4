"""Errors that the CLI turns into one-line messages (exit code 2) instead of tracebacks."""
from __future__ import annotations

from pathlib import Path


class CryodaskError(Exception):
    """Base class for errors with a user-facing message."""


class InputError(CryodaskError):
    """Bad user input: a file that cannot be used, or bad arguments.

    ``str(err)`` is one line naming the file and the problem, e.g.
    ``"mic_003.mrc: truncated MRC (header says 4096×4096 float32, file has 1.2 MB)"``.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
