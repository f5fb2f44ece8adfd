"""Errors every layer may raise for a problem the user must fix (printed as one line by the
command line, exit status 2).

Here, not in :mod:`addiff_core.cli`, so that the Flower glue (``server/``, ``client/``) can raise
it without importing the command line, and so that ``python -m addiff_core.cli`` (which loads
the command line a second time, as ``__main__``) still has one class to catch.

The data and checkpoint errors live here too (re-exported by ``case_io`` and ``checkpoint``), so
that the command line can catch them without importing SimpleITK or torch: a launcher such as
``addiff client start`` then starts in a fraction of a second.
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
