"""Issue #29, point 15 for the federation commands: every numeric option of ``addiff client
start``, ``addiff server start`` and ``addiff certs create`` is bounded, refused in one line
(exit 2, no traceback) before any work; and ``server start`` refuses a run folder with planted
links before the SuperLink starts (point 9), as ``simulate`` does. Nothing here starts Flower:
a process start fails the test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from addiff_core.config import ConfigError
from helpers.cli import assert_one_line, run_cli


@pytest.fixture
def no_processes(monkeypatch):
    """Starting a SuperLink or a SuperNode (any work past the checks) fails the test."""
    from addiff_core import processes as launch

    def refuse(*a, **k):
        raise AssertionError(f"a process was started: {a[:1]}")

    monkeypatch.setattr(launch, "start", refuse)
    monkeypatch.setattr(launch, "run_foreground", refuse)



@pytest.mark.parametrize("argv,needle", [
    (["--port", "70000"], "--port"), (["--port", "0"], "--port"), (["--port", "-1"], "--port"),
    (["--threads", "0"], "--threads"), (["--threads", "-4"], "--threads"), (["--threads", str(10**500)], "--threads"),
    (["--max-retries", "-1"], "--max-retries"), (["--activation-retries", "-1"], "--activation-retries"),
    (["--activation-retries", str(2**70)], "--activation-retries"),
    (["--superlink", "127.0.0.1:99999"], "--superlink port"), (["--superlink", "127.0.0.1:-1"], "HOST:PORT"),
], ids=["port-huge", "port-0", "port-neg", "threads-0", "threads-neg", "threads-500-digits", "max-retries-neg",
        "activation-neg", "activation-huge", "superlink-port", "superlink-neg"])
def test_client_start_options_are_bounded(tmp_path, capsys, no_processes, argv, needle):
    site = tmp_path / "nowhere.yaml"  # never read: the options fail first
    base = {"--site": str(site), "--superlink": "127.0.0.1:9092"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    code, err = run_cli(capsys, "client", "start", "--insecure", *[x for kv in base.items() for x in kv])
    assert code == 2
    assert_one_line(err, needle)
    assert "nowhere.yaml" not in err  # checked before the site file


@pytest.mark.parametrize("argv,needle", [
    (["--port", "70000"], "--port"), (["--port", "-1"], "--port"),
    (["--min-sites", "-1"], "--min-sites"), (["--min-sites", str(2**70)], "--min-sites"),
    (["--wait-sites", "-3"], "--wait-sites"), (["--size", "-5"], "--size"), (["--size", "100000"], "--size"),
    (["--local-epochs", "-2"], "--local-epochs"), (["--proximal-mu", "nan"], "--proximal-mu"),
    (["--proximal-mu", "-1"], "--proximal-mu"), (["--eval-steps", "-5"], "--eval-steps"),
    (["--eval-steps", "100000"], "--eval-steps"), (["--seed", "-1"], "--seed"), (["--seed", str(2**40)], "--seed"),
    (["--round-timeout", "nan"], "--round-timeout"), (["--round-timeout", "inf"], "--round-timeout"),
    (["--round-timeout", "0"], "--round-timeout"), (["--round-timeout", "-60"], "--round-timeout"),
    (["--stop-after-round", "-1"], "--stop-after-round"),
    (["--set", "eval-steps=5000"], "train_timesteps"), (["--set", f"seed={2**40}"], "seed"),
], ids=["port-huge", "port-neg", "min-sites-neg", "min-sites-huge", "wait-sites-neg", "size-neg", "size-huge",
        "local-epochs-neg", "mu-nan", "mu-neg", "eval-steps-neg", "eval-steps-huge", "seed-neg", "seed-huge",
        "timeout-nan", "timeout-inf", "timeout-0", "timeout-neg", "stop-neg", "set-eval-steps", "set-seed"])
def test_server_start_options_are_bounded_before_any_work(tmp_path, capsys, no_processes, argv, needle):
    from helpers.federation import TINY

    code, err = run_cli(capsys, "server", "start", "--insecure", "--config", TINY, "--run-dir", tmp_path / "run", *argv)
    assert code == 2
    assert_one_line(err, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("days", ["0", "-30", "100000", str(2**70)])
def test_certs_create_days_are_bounded(tmp_path, capsys, days):
    code, err = run_cli(capsys, "certs", "create", tmp_path / "c", "--host", "fl.example.org", "--days", days)
    assert code == 2
    assert_one_line(err, "--days")
    assert not (tmp_path / "c").exists()


def test_every_numeric_option_of_the_command_line_has_a_bound():
    """A new ``type=int``/``type=float`` option without a bound fails here: each of them is named
    in options.BOUNDS (or SYNTH_BOUNDS / the model's DDIM steps / --samples)."""
    import argparse

    from addiff_core.cli import build_parser
    from addiff_core.options import BOUNDS, SYNTH_BOUNDS
    from server.run_config_schema import KEYS

    known = set(BOUNDS) | set(SYNTH_BOUNDS) | {"--steps", "--samples", "--data-seed", "--cpus-per-site"}
    known |= {f for k in KEYS if k.type in (int, float) for f in k.flags}  # bounded by their run-config rows
    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.type in (int, float) and not set(action.option_strings) & known:
                missing.append(f"{path} {'/'.join(action.option_strings)}")

    walk(build_parser(), "addiff")
    assert not missing, missing


# ------------------------------------------------------------------------------------------
# 9 on the server start path: planted links in the run folder, one line before the SuperLink
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["report", "superlink.log", "flwr-home"])
def test_server_start_refuses_a_run_folder_with_planted_links(tmp_path, make_case, capsys, no_processes, entry):
    from helpers.federation import TINY

    case = make_case(tmp_path / "cases", name="c")
    before = sorted(p.name for p in case.iterdir())
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(case / "plan.yaml" if entry.endswith(".log") else case, run / entry)
    code, err = run_cli(capsys, "server", "start", "--insecure", "--config", TINY, "--run-dir", run)
    assert code == 2
    assert_one_line(err, f"{entry}: is a link")
    assert sorted(p.name for p in case.iterdir()) == before


def test_run_folder_guard_checks_the_entries_a_caller_names(tmp_path):
    from addiff_core.run_folder import RunFolder

    (tmp_path / "elsewhere.txt").write_text("x")
    os.symlink(tmp_path / "elsewhere.txt", tmp_path / "superlink.pid")
    RunFolder(tmp_path).guard()  # not one of the run's own files
    with pytest.raises(ConfigError, match="superlink.pid: is a link"):
        RunFolder(tmp_path).guard(also=("superlink.pid",))
    assert Path(tmp_path / "elsewhere.txt").read_text() == "x"
