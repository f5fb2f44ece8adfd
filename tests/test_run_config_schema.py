"""Issue #28, point 1: one table of run-config keys (server/run_config_schema.py) gives the
defaults (= pyproject.toml), the validation, both commands' options, the one mapper from options
to a run config, and docs/RUN_CONFIG.md. Point 6: one spelling of the DDIM-steps override
(``--steps``), ``--eval-steps`` kept as its alias on every command."""
from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import pytest

from addiff_core.config import ConfigError
from server import run_config_cli as cli
from server.run_config_schema import BY_NAME, DEFAULTS, KEYS, RESUME_MAY_CHANGE, SERVER, SIMULATE, markdown
from server.settings import from_run_config

ROOT = Path(__file__).resolve().parents[1]


def _parser(command: str) -> argparse.ArgumentParser:
    from addiff_core.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    return sub["simulate"] if command == SIMULATE else sub["server"]._subparsers._group_actions[0].choices["start"]


def _args(command: str, *argv: str) -> argparse.Namespace:
    return _parser(command).parse_args(list(argv))


def test_the_committed_doc_is_the_generated_one():
    assert (ROOT / "docs" / "RUN_CONFIG.md").read_text() == markdown(), "regenerate: python -m server.run_config_schema"


def test_pyproject_holds_every_key_with_the_schema_default_in_order():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert list(cfg) == list(DEFAULTS) and cfg == DEFAULTS, "regenerate: python -m server.run_config_schema"


def test_the_generator_writes_the_doc_and_only_pyproject_s_config_section(tmp_path):
    from server.run_config_schema import write_generated

    (tmp_path / "docs").mkdir()
    before = (ROOT / "pyproject.toml").read_text()
    changed = before.replace("min-sites = 0", "min-sites = 9") + "\n[tool.after]\nx = 1\n"
    (tmp_path / "pyproject.toml").write_text(changed)
    write_generated(tmp_path)
    doc = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    assert doc["tool"]["flwr"]["app"]["config"] == DEFAULTS and doc["tool"]["after"] == {"x": 1}
    assert doc["project"] == tomllib.loads(before)["project"]
    assert (tmp_path / "docs" / "RUN_CONFIG.md").read_text() == markdown()


def test_every_flag_of_a_row_is_an_option_of_its_commands_with_the_row_dest():
    for command in (SIMULATE, SERVER):
        actions = {s: a for a in _parser(command)._actions for s in a.option_strings}
        for key in KEYS:
            for flag in key.flags:
                if command in key.commands:
                    assert actions[flag].dest == key.dest and actions[flag].default is None, (command, flag)
                else:
                    assert flag not in actions, (command, flag)


@pytest.mark.parametrize("command", [SIMULATE, SERVER])
@pytest.mark.parametrize("flag", ["--steps", "--eval-steps"])
def test_both_spellings_of_the_ddim_steps_reach_the_run_config(tmp_path, command, flag):
    args = _args(command, flag, "3", "--config", str(ROOT / "configs" / "demo.yaml"))
    assert args.eval_steps == 3
    rc = cli.run_config(args, command, tmp_path / "run", site_files=[tmp_path / "a.yaml"])
    assert rc["eval-steps"] == 3


@pytest.mark.parametrize("argv", [
    ["train", "--site", "s.yaml", "--out", "o"], ["evaluate", "--checkpoint", "m.pt", "--site", "s.yaml"],
    ["predict", "--checkpoint", "m.pt", "--case", "c", "--out", "o"]])
@pytest.mark.parametrize("flag", ["--steps", "--eval-steps"])
def test_train_evaluate_predict_take_both_spellings(argv, flag):
    from addiff_core.cli import build_parser

    assert build_parser().parse_args([*argv, flag, "4"]).steps == 4


def test_a_new_run_gets_each_command_s_defaults_and_the_options_given(tmp_path):
    sim = cli.run_config(_args(SIMULATE), SIMULATE, tmp_path / "run", site_files=[tmp_path / "a.yaml"])
    srv = cli.run_config(_args(SERVER), SERVER, tmp_path / "run")
    assert set(sim) == set(srv) == set(DEFAULTS)
    assert sim["min-sites"] == 0 and srv["min-sites"] == 3  # a deployment cannot count its sites
    assert sim["site-files"] == str(tmp_path / "a.yaml") and srv["site-files"] == ""
    assert sim["round-timeout"] == srv["round-timeout"] == 3600.0 and srv["wait-sites"] == 0
    assert sim["run-dir"] == str(tmp_path / "run") and Path(sim["model-config"]).is_absolute()
    given = _args(SERVER, "--min-sites", "2", "--wait-sites", "3", "--no-gamma", "--cross-site", "--seed", "7",
                  "--strategy", "fedprox", "--proximal-mu", "0.5", "--round-timeout", "60", "--rounds", "2,3",
                  "--model", "diffusion", "--set", "round-retries=1")
    rc = cli.run_config(given, SERVER, tmp_path / "run")
    assert {k: rc[k] for k in ("min-sites", "wait-sites", "eval-gamma", "cross-site", "seed", "strategy",
                               "proximal-mu", "round-timeout", "vae-rounds", "diffusion-rounds", "model-kind",
                               "round-retries")} == {
        "min-sites": 2, "wait-sites": 3, "eval-gamma": False, "cross-site": True, "seed": 7, "strategy": "fedprox",
        "proximal-mu": 0.5, "round-timeout": 60.0, "vae-rounds": 2, "diffusion-rounds": 3, "model-kind": "diffusion",
        "round-retries": 1}
    assert from_run_config(rc).strategy == "fedprox"


def test_a_resume_keeps_run_json_except_what_may_change(tmp_path):
    stored = {**DEFAULTS, "strategy": "fedadam", "min-sites": 2, "stop-after-round": 3, "seed": 5}
    args = _args(SERVER, "--resume", str(tmp_path), "--strategy", "fedmedian", "--seed", "9", "--no-gamma",
                 "--wait-sites", "4")
    rc = cli.run_config(args, SERVER, tmp_path, stored=stored)
    assert rc["strategy"] == "fedadam" and rc["seed"] == 5  # kept: run.json's
    assert rc["eval-gamma"] is False and rc["wait-sites"] == 4 and rc["min-sites"] == 2  # given / not given
    assert rc["stop-after-round"] == 0 and rc["resume"] is True  # this start's
    assert set(RESUME_MAY_CHANGE) == {"resume", "stop-after-round", "round-timeout", "min-sites", "wait-sites",
                                      "round-retries", "eval-steps", "eval-gamma", "report-figures", "cross-site"}


@pytest.mark.parametrize("cfg,needle", [
    ({"min-sites": 5000}, "min-sites: at most 1000"), ({"round-timeout": 0}, "round-timeout: must be >= 1"),
    ({"seed": 2**40}, "seed: at most"), ({"model-kind": "gan"}, "model-kind: must be one of"),
    ({"trim-beta": 0.5}, "trim-beta: below 0.5"), ({"update-norm-multiple": 0.5}, "0 (off) or >= 1"),
    ({"eval-steps": 5000}, "eval-steps: must be between 1 and"), ({"vae-rounds": True}, "must be int"),
    ({"central-dp-noise": 1.0, "central-dp-delta": 1.0}, "central-dp-delta: must be in (0, 1)"),
    ({"proximal-mu": float("nan")}, "proximal-mu: must be finite"), ({"grid-size": 600}, "grid-size: at most 512"),
])
def test_each_key_is_checked_by_its_row_in_one_line(cfg, needle):
    with pytest.raises(ConfigError) as e:
        from_run_config(cfg)
    assert needle in str(e.value) and str(e.value).startswith("run config: ") and "\n" not in str(e.value)


def test_typed_strategy_parameters_and_case_folded_strategy():
    s = from_run_config({"strategy": "FedAdam", "fedadam-eta": 0.5, "central-dp-clip": 2})
    assert s.strategy == "fedadam" and s.fedadam.eta == 0.5 and s.fedadam.tau == DEFAULTS["fedadam-tau"]
    assert s.central_dp.clip == 2.0 and s.central_dp.noise == 0.0
    assert json.dumps(s.to_json())  # run.json stays plain


def test_flag_bounds_name_the_flag_and_size_keeps_its_own_range(tmp_path):
    for argv, needle in ((["--size", "8"], "--size"), (["--steps", "-1"], "--steps/--eval-steps"),
                         (["--eval-steps", "100000"], "--eval-steps"), (["--round-timeout", "inf"], "--round-timeout")):
        with pytest.raises(ConfigError, match=needle):
            cli.check_flags(_args(SERVER, *argv), SERVER)
    assert BY_NAME["grid-size"].read(8) == 8  # the run config itself: the model config's own minimum decides
