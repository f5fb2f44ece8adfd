"""``addiff simulate``, ``addiff server start``, ``addiff certs ...`` (registered with addiff_core.cli through the "addiff.commands" entry points of pyproject.toml)."""
from __future__ import annotations


def register(subparsers) -> None:
    from . import certs, deploy, simulate

    simulate.add_parser(subparsers)
    deploy.add_parser(subparsers)
    certs.add_parser(subparsers)
