"""``addiff simulate``, ``addiff server start``, ``addiff certs ...`` (registered by addiff_core.cli)."""
from __future__ import annotations


def register(subparsers) -> None:
    from . import certs, deploy, simulate

    simulate.add_parser(subparsers)
    deploy.add_parser(subparsers)
    certs.add_parser(subparsers)
