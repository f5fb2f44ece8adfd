"""Errors for a problem the user must fix (one line on the command line, exit status 2).

Here, not in :mod:`addiff_core.cli`: ``server/`` and ``client/`` raise them without importing the
command line, ``python -m addiff_core.cli`` (loaded twice) still has one class to catch, and the
command line catches the data and checkpoint errors without importing SimpleITK or torch (a
launcher starts in a fraction of a second).
"""
from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Raised by a command for a problem the user must fix; printed as one line."""


class CaseError(ValueError):
    """A case folder is unusable. ``file`` names the offending file, ``case`` the folder."""

    def __init__(self, case: str | Path, file: str, problem: str):
        self.case = str(case)
        self.file = file
        self.problem = problem
        super().__init__(f"{self.case}: {file}: {problem}")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the requested configuration."""
