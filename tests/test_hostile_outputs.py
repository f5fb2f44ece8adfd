"""Issue #29, "nothing outside the output is deleted or replaced" (6-10), implausible models (14)
and numeric option bounds (15): each attack of the second hostile review, reproduced.

Predictions go through a stand-in model that predicts the prescription everywhere in the
evaluation region (plausible, deterministic, no checkpoint needed) unless a test is about the
model itself."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from addiff_core.config import ConfigError
from helpers.cli import assert_one_line, run_cli
from helpers.models import TINY_MODEL


@pytest.fixture
def rx_model(monkeypatch):
    """``predict`` with a stand-in model: the prescription everywhere in the region (plausible)."""
    from helpers.predict_stub import use_rx_model

    return use_rx_model(monkeypatch)


# ------------------------------------------------------------------------------------------
# 6. simulate --data-dir: a planted addiff-demo.json never deletes outside the data folder
# ------------------------------------------------------------------------------------------
def _stamp(data_dir: Path, names: list[str]) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "addiff-demo.json").write_text(json.dumps(
        {"sites": 9, "cases_per_site": 9, "size": 16, "seed": 0, "version": 2, "site_files": [], "site_names": names}))


@pytest.mark.parametrize("name", ["../victim", "ABSOLUTE", "a/../../victim"])
def test_a_planted_demo_stamp_never_deletes_outside_the_data_folder(tmp_path, name):
    from server.demo_data import ensure_demo_sites

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    _stamp(tmp_path / "demo", [str(victim) if name == "ABSOLUTE" else name])
    with pytest.raises(ConfigError, match="addiff-demo.json: names .*nothing removed"):
        ensure_demo_sites(tmp_path / "demo", 1, 2, 16)
    assert (victim / "precious.txt").read_text() == "keep me"


def test_stale_demo_data_removes_only_what_the_generator_wrote(tmp_path):
    from server.demo_data import ensure_demo_sites

    demo = tmp_path / "demo"
    files = ensure_demo_sites(demo, 1, 2, 16)
    assert (demo / "hospital_a" / "addiff-synth.json").is_file()
    # other settings: the generator's own hospital is rewritten
    files = ensure_demo_sites(demo, 1, 3, 16)
    assert len(list((demo / "hospital_a" / "cases").iterdir())) == 3 and files[0].is_file()
    # a stamp naming a folder of the user's (a valid name, no marker): kept, one line
    (demo / "mine").mkdir()
    (demo / "mine" / "notes.txt").write_text("mine")
    _stamp(demo, ["mine"])
    with pytest.raises(ConfigError, match="mine: not written by the demo generator"):
        ensure_demo_sites(demo, 1, 2, 16)
    assert (demo / "mine" / "notes.txt").read_text() == "mine"
    # a link named like a demo hospital: never followed
    os.symlink(tmp_path / "victim", demo / "hospital_b")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "addiff-synth.json").write_text("{}")
    _stamp(demo, ["hospital_b"])
    with pytest.raises(ConfigError, match="not written by the demo generator"):
        ensure_demo_sites(demo, 1, 2, 16)
    assert (tmp_path / "victim" / "addiff-synth.json").is_file()


def test_a_stamp_that_is_not_an_object_is_one_line(tmp_path, capsys):
    from server.demo_data import ensure_demo_sites

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "addiff-demo.json").write_text('["../victim"]')
    (tmp_path / "demo" / "hospital_a").mkdir()  # in the way of the new data, not the generator's
    with pytest.raises(ConfigError, match="already holds hospital_a"):
        ensure_demo_sites(tmp_path / "demo", 1, 2, 16)


# ------------------------------------------------------------------------------------------
# 7. import-dicom: a patient is never replaced by another one
# ------------------------------------------------------------------------------------------
def test_two_exports_with_the_same_folder_name_keep_both_patients(tmp_path, make_case):
    import pydicom

    from addiff_core.dicom.reader import import_dicom
    from addiff_core.dicom.writer import export_case

    for src in ("a", "b"):
        export_case(make_case(tmp_path / f"cases_{src}", name="P1"), tmp_path / f"export_{src}" / "P1")
    plan_uid = {s: str(pydicom.dcmread(str(tmp_path / f"export_{s}" / "P1" / "rtplan.dcm")).SOPInstanceUID)
                for s in ("a", "b")}
    out = tmp_path / "cases"
    import_dicom(tmp_path / "export_a", out, echo=None)
    lines: list[str] = []
    summary = import_dicom(tmp_path / "export_b", out, echo=lines.append)
    info = {p.name: yaml.safe_load((p / "dicom.yaml").read_text()) for p in out.iterdir()}
    assert sorted(info) == ["P1", "P1_2"]
    assert info["P1"]["rtplan"]["SOPInstanceUID"] == plan_uid["a"]  # the first patient is still there
    assert info["P1_2"]["rtplan"]["SOPInstanceUID"] == plan_uid["b"]
    assert summary.imported[0].case_dir == out / "P1_2" and any("written to P1_2" in ln for ln in lines)
    import_dicom(tmp_path / "export_a", out, echo=None)  # the same plan again: its own folder, replaced
    assert sorted(p.name for p in out.iterdir()) == ["P1", "P1_2"]


def test_import_never_replaces_a_case_that_is_not_from_dicom(tmp_path, make_case):
    from addiff_core.dicom.reader import import_dicom
    from addiff_core.dicom.writer import export_case

    export_case(make_case(tmp_path / "src", name="P1"), tmp_path / "export" / "P1")
    mine = make_case(tmp_path / "cases", name="P1")  # an OpenKBP / synthetic case of the same name
    before = (mine / "dose.nii.gz").read_bytes()
    import_dicom(tmp_path / "export", tmp_path / "cases", echo=None)
    assert (mine / "dose.nii.gz").read_bytes() == before and not (mine / "dicom.yaml").exists()
    assert (tmp_path / "cases" / "P1_2" / "dicom.yaml").is_file()


# ------------------------------------------------------------------------------------------
# 8. predict: every file it writes goes through the one overwrite check
# ------------------------------------------------------------------------------------------
def test_predict_rtdose_keeps_the_exported_plan_dose(tmp_path, make_case, capsys, rx_model):
    from addiff_core.dicom.writer import export_case

    case = make_case(tmp_path / "cases", name="c")
    exp = tmp_path / "exp"
    export_case(case, exp)
    plan_dose = (exp / "rtdose.dcm").read_bytes()
    code, err = run_cli(capsys, "predict", "--checkpoint", rx_model, "--case", case, "--out", exp, "--rtdose")
    assert code == 2
    assert_one_line(err, "already holds rtdose.dcm", "--overwrite")
    assert (exp / "rtdose.dcm").read_bytes() == plan_dose and not (exp / "dose.nii.gz").exists()
    assert run_cli(capsys, "predict", "--checkpoint", rx_model, "--case", case, "--out", exp, "--rtdose",
                   "--overwrite")[0] == 0
    assert (exp / "rtdose.dcm").read_bytes() != plan_dose


def test_predict_keeps_an_earlier_dvh_curves_table(tmp_path, make_case, capsys, rx_model):
    case = make_case(tmp_path / "cases", name="c")
    out = tmp_path / "pred"
    out.mkdir()
    (out / "dvh_curves.csv").write_text("mine\n")
    code, err = run_cli(capsys, "predict", "--checkpoint", rx_model, "--case", case, "--out", out)
    assert code == 2
    assert_one_line(err, "already holds dvh_curves.csv")
    assert (out / "dvh_curves.csv").read_text() == "mine\n"


# ------------------------------------------------------------------------------------------
# 9. links: never written through, never into a case or data folder
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_planted_link_in_the_output_never_reaches_the_case(tmp_path, make_case, capsys, rx_model, overwrite):
    case = make_case(tmp_path / "cases", name="c")
    ref = (case / "dose.nii.gz").read_bytes()
    out = tmp_path / "pred"
    out.mkdir()
    os.symlink(case / "dose.nii.gz", out / "rtdose.dcm")
    os.symlink(case / "dose.nii.gz", out / "dvh_curves.csv")
    code, _ = run_cli(capsys, "predict", "--checkpoint", rx_model, "--case", case, "--out", out, "--rtdose",
                      *(["--overwrite"] if overwrite else []))
    assert code == (0 if overwrite else 2)
    assert (case / "dose.nii.gz").read_bytes() == ref
    if overwrite:  # the links were replaced by files, not written through
        assert not (out / "rtdose.dcm").is_symlink() and not (out / "dvh_curves.csv").is_symlink()


def _evaluate_setup(tmp_path, make_case, monkeypatch) -> tuple[Path, Path, Path]:
    import addiff_core.local as local

    for name in ("good_0", "good_1", "good_2"):
        make_case(tmp_path / "cases", name=name)
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "s", "data_dir": "cases", "heldout": {"case_ids": ["good_0"]},
                                    "device": "cpu"}))
    monkeypatch.setattr(local, "evaluate_checkpoint", lambda *a, **k: {"num_cases": 1, "mean": {"mae_gy": 1.0}})
    return site, tmp_path / "cases" / "good_0", tmp_path / "m.pt"


def test_evaluate_out_through_a_link_never_writes_into_a_case(tmp_path, make_case, capsys, monkeypatch):
    site, case, ckpt = _evaluate_setup(tmp_path, make_case, monkeypatch)
    plan = (case / "plan.yaml").read_bytes()
    os.symlink(case / "results.json", tmp_path / "dangling.json")  # does not exist yet
    os.symlink(case / "plan.yaml", tmp_path / "plan_link.json")
    for out, extra in ((tmp_path / "dangling.json", []), (tmp_path / "plan_link.json", ["--overwrite"])):
        code, err = run_cli(capsys, "evaluate", "--checkpoint", ckpt, "--site", site, "--out", out, *extra)
        assert code == 2
        assert_one_line(err, "is a link to", "case folder")
    assert not (case / "results.json").exists() and (case / "plan.yaml").read_bytes() == plan
    # a link elsewhere with --overwrite: the link is replaced, its target left alone
    (tmp_path / "other.json").write_text("other")
    os.symlink(tmp_path / "other.json", tmp_path / "elsewhere.json")
    assert run_cli(capsys, "evaluate", "--checkpoint", ckpt, "--site", site, "--out", tmp_path / "elsewhere.json",
                   "--overwrite")[0] == 0
    assert (tmp_path / "other.json").read_text() == "other" and not (tmp_path / "elsewhere.json").is_symlink()


def test_evaluate_out_into_the_site_data_folder_is_refused(tmp_path, make_case, capsys, monkeypatch):
    site, case, ckpt = _evaluate_setup(tmp_path, make_case, monkeypatch)
    (tmp_path / "cases" / "results").mkdir()  # a folder of the data folder that holds no case itself
    code, err = run_cli(capsys, "evaluate", "--checkpoint", ckpt, "--site", site, "--out",
                        tmp_path / "cases" / "results" / "e.json")
    assert code == 2
    assert_one_line(err, "inside the data folder")
    assert not (tmp_path / "cases" / "results" / "e.json").exists()


def test_a_report_link_to_a_case_is_refused(tmp_path, make_case):
    from addiff_core.report import write_report, write_report_safely
    from addiff_core.run_folder import RunFolder

    case = make_case(tmp_path / "cases", name="c")
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "stopped"}))
    os.symlink(case, run / "report")
    with pytest.raises(ConfigError, match="report: is a link"):
        write_report(run, figures=False)
    assert write_report_safely(run, figures=False) is None  # at the end of a (resumed) run: a warning
    assert not (case / "report.md").exists()
    os.unlink(run / "report")
    os.symlink(case / "plan.yaml", run / "metrics.jsonl")
    plan = (case / "plan.yaml").read_text()
    with pytest.raises(ConfigError, match="metrics.jsonl: is a link"):
        RunFolder(run).append_metrics([{"kind": "round", "round": 1}])
    assert (case / "plan.yaml").read_text() == plan


def test_simulate_resume_with_a_report_link_is_one_line(tmp_path, make_case, capsys):
    from helpers.federation import TINY
    from server.settings import DEFAULTS

    case = make_case(tmp_path / "cases", name="c")
    run = tmp_path / "run"
    run.mkdir()
    from addiff_core.config import load_model_config

    (run / "run.json").write_text(json.dumps({"run_config": {**DEFAULTS, "site-files": str(tmp_path / "a.yaml"),
                                                             "model-config": str(TINY), "run-dir": str(run)},
                                              "model": load_model_config(TINY).to_dict()}))
    os.symlink(case, run / "report")
    code, err = run_cli(capsys, "simulate", "--resume", run)
    assert code == 2
    assert_one_line(err, "report: is a link")
    assert sorted(p.name for p in case.iterdir()) == sorted(["ct.nii.gz", "dose.nii.gz", "masks", "plan.yaml",
                                                             "possible_dose_mask.nii.gz"])


def test_export_dicom_into_a_case_is_refused(tmp_path, make_case, capsys):
    case = make_case(tmp_path / "cases", name="c")
    code, err = run_cli(capsys, "data", "export-dicom", case, case / "dicom")
    assert code == 2
    assert_one_line(err, "inside the case folder")
    assert not (case / "dicom").exists()


# ------------------------------------------------------------------------------------------
# 10. data folders, concurrent runs, data synth over existing hospitals
# ------------------------------------------------------------------------------------------
def test_predict_out_inside_the_data_folder_is_refused(tmp_path, make_case, capsys, rx_model):
    case = make_case(tmp_path / "cases", name="c")
    code, err = run_cli(capsys, "predict", "--checkpoint", rx_model, "--case", case, "--out", tmp_path / "cases" / "pred")
    assert code == 2
    assert_one_line(err, "inside the data folder")
    assert not (tmp_path / "cases" / "pred").exists()


def test_a_second_train_into_the_same_folder_stops_at_once(tmp_path, make_case, capsys):
    from helpers.models import tiny_site_model

    for name in ("good_0", "good_1", "good_2"):
        make_case(tmp_path / "cases", name=name)
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "s", "data_dir": "cases", "heldout": {"case_ids": ["good_0"]},
                                    "device": "cpu", "model": tiny_site_model()}))
    race = tmp_path / "race"
    race.mkdir()
    with open(race / ".addiff.lock", "w") as held:  # a first `addiff train --out race`, still running
        fcntl.flock(held, fcntl.LOCK_EX)
        code, err = run_cli(capsys, "train", "--site", site, "--out", race, "--vae-epochs", "0", "--diffusion-epochs",
                            "0", "--steps", "1", "--quiet")
    assert code == 2
    assert_one_line(err, "another addiff command is writing into this folder")
    assert not (race / "model.pt").exists()


def test_data_synth_never_writes_over_existing_hospitals(tmp_path, capsys):
    out = tmp_path / "synth"
    assert run_cli(capsys, "data", "synth", "--out", out, "--sites", "1", "--cases-per-site", "2", "--size", "16")[0] == 0
    site_file = out / "hospital_a.yaml"
    site_file.write_text(site_file.read_text() + "# edited by the hospital\n")
    case = next((out / "hospital_a" / "cases").iterdir())
    ct = (case / "ct.nii.gz").read_bytes()
    code, err = run_cli(capsys, "data", "synth", "--out", out, "--sites", "1", "--cases-per-site", "2", "--size",
                        "16", "--seed", "3")
    assert code == 2
    assert_one_line(err, "already holds hospital_a")
    assert site_file.read_text().endswith("# edited by the hospital\n") and (case / "ct.nii.gz").read_bytes() == ct


# ------------------------------------------------------------------------------------------
# 14. implausible models
# ------------------------------------------------------------------------------------------
def _checkpoint(tmp_path, change) -> Path:
    from addiff_core.checkpoint import save_checkpoint
    from addiff_core.models import build_model

    torch.manual_seed(0)
    state = {k: change(k, v) if torch.is_floating_point(v) else v for k, v in build_model(TINY_MODEL).state_dict().items()}
    return save_checkpoint(tmp_path / "m.pt", state, TINY_MODEL)  # a valid SHA-256 of whatever was saved


@pytest.mark.parametrize("change,needle", [
    (lambda k, v: torch.zeros_like(v), "get a mean of 0 Gy"),
    (lambda k, v: v + 1e4 if k.endswith("bias") else v, "above 150 Gy"),
], ids=["all-zero", "bias-1e4"])
def test_an_implausible_model_writes_nothing(tmp_path, make_case, capsys, change, needle):
    case = make_case(tmp_path / "cases", name="c")
    ckpt = _checkpoint(tmp_path, change)
    base = ["predict", "--checkpoint", ckpt, "--case", case, "--steps", "1", "--rtdose"]
    code, err = run_cli(capsys, *base, "--out", tmp_path / "p")
    assert code == 2
    assert_one_line(err, "implausible model", needle, "--force")
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())
    assert run_cli(capsys, *base, "--out", tmp_path / "research", "--force")[0] == 0  # research use
    assert (tmp_path / "research" / "rtdose.dcm").is_file()


def test_plausibility_bounds():
    from addiff_core.errors import CheckpointError
    from addiff_core.predict import check_plausible, dose_bound

    class Plan:
        max_prescription = 60.0
        prescriptions = {"PTV60": 60.0}

    target = np.zeros((4, 4, 4), bool)
    target[1:3, 1:3, 1:3] = True

    class Case:
        plan, masks = Plan(), {"PTV60": None}

        @staticmethod
        def array(name):
            return target

    assert dose_bound(60.0) == 130.0
    ok = np.where(target, 60.0, 5.0)
    check_plausible(ok, Case, Path("m.pt"), Path("c"))
    check_plausible(np.where(target, 129.0, 0.0), Case, Path("m.pt"), Path("c"))
    with pytest.raises(CheckpointError, match="above 130 Gy"):
        check_plausible(np.where(target, 131.0, 0.0), Case, Path("m.pt"), Path("c"))
    with pytest.raises(CheckpointError, match="targets of c"):
        check_plausible(np.where(target, 0.59, 60.0), Case, Path("m.pt"), Path("c"))  # under 1 % of 60 Gy
    check_plausible(np.where(target, 0.61, 60.0), Case, Path("m.pt"), Path("c"))


# ------------------------------------------------------------------------------------------
# 15. numeric options: bounds and one line each
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,needle", [
    (["--steps", "-5"], "--steps"), (["--steps", "100000"], "--steps"), (["--steps", "1001"], "train_timesteps"),
    (["--device", "cpu;id"], "--device"), (["--samples", "1000000000"], "--samples"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**70)], "--seed"),
], ids=["steps-neg", "steps-huge", "steps-model", "device", "samples-huge", "seed-neg", "seed-huge"])
def test_predict_options_are_bounded(tmp_path, make_case, capsys, extra, needle):
    case = make_case(tmp_path / "cases", name="c")
    ckpt = _checkpoint(tmp_path, lambda k, v: v)
    code, err = run_cli(capsys, "predict", "--checkpoint", ckpt, "--case", case, "--out", tmp_path / "p", *extra)
    assert code == 2
    assert_one_line(err, needle)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("argv,needle", [
    (["train", "--site", "{site}", "--out", "{tmp}/r", "--vae-epochs", "0", "--diffusion-epochs", "0", "--quiet",
      "--steps", "-5"], "--steps"),
    (["evaluate", "--checkpoint", "{ckpt}", "--site", "{site}", "--steps", "0"], "--steps"),
    (["evaluate", "--checkpoint", "{ckpt}", "--site", "{site}", "--seed", "-3"], "--seed"),
    (["data", "synth", "--out", "{tmp}/s", "--sites", "1", "--cases-per-site", "2", "--size", "16", "--seed", "-1"],
     "--seed"),
], ids=["train-steps", "evaluate-steps", "evaluate-seed", "synth-seed"])
def test_command_options_are_bounded(tmp_path, make_case, capsys, argv, needle):
    from helpers.models import tiny_site_model

    for name in ("good_0", "good_1", "good_2"):
        make_case(tmp_path / "cases", name=name)
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "s", "data_dir": "cases", "heldout": {"case_ids": ["good_0"]},
                                    "device": "cpu", "model": tiny_site_model()}))
    ckpt = _checkpoint(tmp_path, lambda k, v: v)
    code, err = run_cli(capsys, *[a.format(tmp=tmp_path, site=site, ckpt=ckpt) for a in argv])
    assert code == 2
    assert_one_line(err, needle)
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--sites", "0"], "--sites"), (["--size", "5"], "--size"), (["--cases-per-site", "1"], "--cases-per-site"),
    (["--data-seed", "-1"], "--data-seed"), (["--seed", str(2**40)], "--seed"),
    (["--eval-steps", "100000"], "--eval-steps"), (["--local-epochs", "-2"], "--local-epochs"),
    (["--proximal-mu", "nan"], "--proximal-mu"), (["--stop-after-round", "-1"], "--stop-after-round"),
], ids=["sites", "size", "cases", "data-seed", "seed", "eval-steps", "local-epochs", "mu", "stop"])
def test_simulate_options_are_bounded_before_any_work(tmp_path, capsys, argv, needle):
    code, err = run_cli(capsys, "simulate", "--data-dir", tmp_path / "d", "--run-dir", tmp_path / "run", *argv)
    assert code == 2
    assert_one_line(err, needle)
    assert not (tmp_path / "d").exists() and not (tmp_path / "run").exists()


def test_simulate_eval_steps_beyond_the_model_via_set_is_one_line(tmp_path, capsys):
    from helpers.federation import TINY

    site = tmp_path / "a.yaml"
    site.write_text("name: a\ndata_dir: cases\n")
    code, err = run_cli(capsys, "simulate", "--site-files", site, "--config", TINY, "--run-dir", tmp_path / "run",
                        "--set", "eval-steps=5000")
    assert code == 2
    assert_one_line(err, "eval-steps", "train_timesteps")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------
# 15. approved_bundles: present but empty approves none; absent approves any
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("empty", ["approved_bundles:\n", "approved_bundles: []\n"], ids=["key-only", "empty-list"])
def test_empty_approved_bundles_approve_none(tmp_path, empty):
    from addiff_core.config import load_site_config
    from addiff_core.errors import UserError

    def site(text: str):
        p = tmp_path / "s.yaml"
        p.write_text("name: h\ndata_dir: cases\n" + text)
        return load_site_config(p)

    none = site(empty)
    assert none.approved_bundles == ()
    from client.bundle_approval import site_approval

    with pytest.raises(UserError, match="approved_bundles is empty: no app bundle is approved"):
        site_approval(none)
    assert site("").approved_bundles is None and site_approval(site("")) is None  # the key absent: any bundle
    assert site_approval(site("approved_bundles: ['" + "AB" * 32 + "']\n")) == frozenset({"ab" * 32})
