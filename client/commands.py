"""``addiff client start`` (registered by addiff_core.cli)."""
from __future__ import annotations


def register(subparsers) -> None:
    from . import supernode

    supernode.add_parser(subparsers)
