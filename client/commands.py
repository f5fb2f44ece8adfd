"""``addiff client start`` (registered with addiff_core.cli through the "addiff.commands" entry points of pyproject.toml)."""
from __future__ import annotations


def register(subparsers) -> None:
    from . import supernode

    supernode.add_parser(subparsers)
