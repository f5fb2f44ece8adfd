"""Errors every layer may raise for a problem the user must fix (printed as one line by the
command line, exit status 2).

Here, not in :mod:`addiff_core.cli`, so that the Flower glue (``server/``, ``client/``) can raise
it without importing the command line, and so that ``python -m addiff_core.cli`` (which loads
the command line a second time, as ``__main__``) still has one class to catch.
"""
from __future__ import annotations


class UserError(Exception):
    """Raised by a command for a problem the user must fix; printed as one line."""
