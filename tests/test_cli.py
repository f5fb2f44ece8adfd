"""The command line's plumbing: one UserError class, federation commands from entry points (a
broken one is an error, not a missing command), the shared JSON and Markdown formats."""
from __future__ import annotations

import json
import math
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np

from addiff_core import cli
from addiff_core.errors import UserError
from addiff_core.formats import json_safe, markdown_table


def test_one_user_error_class():
    assert cli.UserError is UserError


def test_federation_commands_come_from_the_entry_points():
    sub = cli.build_parser()._subparsers._group_actions[0]  # noqa: SLF001 - argparse keeps them there
    assert {"simulate", "server", "certs", "client"} <= set(sub.choices)


def test_a_broken_command_module_is_an_error_not_a_missing_command(monkeypatch, capsys):
    broken = EntryPoint(name="broken", value="no_such_module_xyz.commands:register", group=cli.COMMAND_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda group: [broken] if group == cli.COMMAND_GROUP else [])
    assert cli.main(["data", "check", "."]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("addiff: error: the 'broken' commands (no_such_module_xyz.commands:register) cannot be "
                          "loaded: ModuleNotFoundError") and "Traceback" not in err


def test_json_safe():
    doc = {1: float("nan"), "a": (np.float32(1.5), np.int64(3), float("inf")), "p": Path("/x"),
           "arr": np.array([1.0, np.nan]), "b": np.bool_(True), "s": "text"}
    out = json_safe(doc)
    assert out == {"1": None, "a": [1.5, 3, None], "p": "/x", "arr": [1.0, None], "b": True, "s": "text"}
    json.dumps(out, allow_nan=False)
    assert isinstance(out["a"][1], int) and not math.isnan(out["a"][0])


def test_markdown_table():
    md = markdown_table(["site", "MAE"], [["a|b", 1.23456], ["c\nd", None]], fmt=lambda v: "n/a" if v is None else f"{v:.2f}")
    assert md.splitlines() == ["| site | MAE |", "|---|---|", "| a\\|b | 1.23 |", "| c d | n/a |"]
