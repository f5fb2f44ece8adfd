"""The Flower fences (server/flower_compat.py, client/flower_compat.py): the version check on
import, and the adapters that are more than a re-export."""
from __future__ import annotations

import importlib.util

import flwr
import pytest

from addiff_core.errors import UserError
from client.flower_compat import FlowerVersionError, check_flower_version
from helpers.federation import ROOT


@pytest.mark.parametrize("version", ["1.42.0", "1.42.7", "1.42.0rc1"])
def test_a_tested_flower_passes(version):
    check_flower_version(version)


@pytest.mark.parametrize("version", ["1.43.0", "1.4.2", "2.0.0", "1.41.9", "unknown"])
def test_another_flower_fails_in_one_line_naming_both_versions(version):
    with pytest.raises(FlowerVersionError) as e:
        check_flower_version(version)
    msg = str(e.value)
    assert "\n" not in msg and f"Flower {version} is installed" in msg and "1.42.x" in msg


@pytest.mark.parametrize("fence", ["client/flower_compat.py", "server/flower_compat.py"])
def test_importing_a_fence_under_another_flower_fails(monkeypatch, fence):
    # executed under a name of its own: the imported fences in sys.modules stay as they are
    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    spec = importlib.util.spec_from_file_location(f"fence_probe_{fence.split('/')[0]}", ROOT / fence)
    with pytest.raises(UserError, match=r"Flower 1\.99\.0 is installed.*1\.42\.x"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


class _Grid:
    """A Grid whose replies never come (the engine behind it is gone)."""

    def __init__(self):
        self.pulls = 0

    def push_messages(self, msgs):
        return [f"id{i}" for i, _ in enumerate(msgs)]

    def pull_messages(self, ids):
        self.pulls += 1
        return []

    def send_and_receive(self, msgs, *, timeout):
        return ["reply"] * len(msgs)


def test_send_and_receive_stops_waiting_when_told():
    from server.flower_compat import EngineStopped, send_and_receive

    grid = _Grid()
    assert send_and_receive(grid, [1, 2], timeout=5.0) == ["reply", "reply"]  # no stop check: Flower's own
    with pytest.raises(EngineStopped):
        send_and_receive(grid, [1, 2], timeout=3600.0, stopped=lambda: grid.pulls >= 3)
    assert grid.pulls == 3


def test_flower_error_codes_have_their_names():
    from client.flower_compat import ErrorCode, error_code_name

    assert error_code_name(ErrorCode.INVALID_FAB) == "invalid fab"
    assert error_code_name(-12345) == "unknown"
