"""Bad input at a hospital: broken cases are skipped (never a good one lost), bad site files,
folders, devices and checkpoints get one clear line, not a traceback."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from addiff_core.cli import main
from addiff_core.config import ConfigError, load_site_config
from addiff_core.data import load_site_data
from helpers.checks import BREAKERS
from helpers.cli import assert_one_line, run_cli
from helpers.models import TINY_MODEL, tiny_site_model

GOOD = ("good_0", "good_1", "good_2")
TINY = TINY_MODEL  # the tests' one tiny model configuration


def write_site(root: Path, heldout=("good_0",), **extra) -> Path:
    doc = {"name": "fuzz_site", "data_dir": "cases", "heldout": {"case_ids": list(heldout)}, "device": "cpu",
           "model": tiny_site_model()}
    doc.update(extra)
    p = root / "site.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.parametrize("breaker,file,pattern", BREAKERS, ids=[b[0].__name__ for b in BREAKERS])
def test_broken_case_is_skipped_and_no_good_case_lost(make_case, tmp_path, breaker, file, pattern):
    cases = tmp_path / "cases"
    for name in GOOD:
        make_case(cases, name=name)
    broken = breaker(make_case, cases)  # writes cases/case, broken in one way
    assert broken.name == "case"
    data = load_site_data(load_site_config(write_site(tmp_path)))
    assert sorted(data.train.case_ids) == ["good_1", "good_2"]
    assert data.heldout.case_ids == ["good_0"]
    assert list(data.skipped) == ["case"]
    assert data.skipped["case"].startswith(file + ":"), data.skipped["case"]


def test_corpus_has_at_least_30_kinds():
    assert len(BREAKERS) >= 30


def test_nothing_usable_is_one_clear_error(make_case, tmp_path):
    cases = tmp_path / "cases"
    make_case(cases, name="a", dose=make_case_dose_cgy())
    make_case(cases, name="b", masks={"PTV70": None})
    with pytest.raises(ConfigError, match=r"no usable training case .*2 skipped: a: dose.nii.gz: .*cGy"):
        load_site_data(load_site_config(write_site(tmp_path, heldout=[])))


def make_case_dose_cgy():
    from helpers.cases import default_arrays

    return default_arrays()["dose"] * 100.0


def test_skipped_cases_are_reported_in_round_metrics(make_case, tmp_path):
    from addiff_core.site_task import SiteTask, initial_arrays
    from addiff_core.round_plan import RoundPlan

    cases = tmp_path / "cases"
    for name in GOOD:
        make_case(cases, name=name)
    make_case(cases, name="zz_bad", dose=make_case_dose_cgy())
    site = load_site_config(write_site(tmp_path))
    task = SiteTask(site, site.model)
    res = task.train(initial_arrays(site.model), RoundPlan("vae", 1, epochs=1))
    assert res.metrics["skipped_cases"] == 1.0
    assert res.num_examples == 2


def test_cli_bad_site_files_and_folders(capsys, make_case, tmp_path):
    code, err = run_cli(capsys, "train", "--site", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r"))
    assert code == 2
    assert_one_line(err, "nope.yaml", "file not found")

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata_dir: cases\ntraining: {batch_size: -3}\n")
    code, err = run_cli(capsys, "train", "--site", str(bad), "--out", str(tmp_path / "r"))
    assert code == 2
    assert_one_line(err, "bad.yaml", "training.batch_size")

    site = write_site(tmp_path)  # data dir 'cases' does not exist yet
    code, err = run_cli(capsys, "train", "--site", str(site), "--out", str(tmp_path / "r"))
    assert code == 2
    assert_one_line(err, "data_dir", "does not exist")

    for name in GOOD:
        make_case(tmp_path / "cases", name=name)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run_cli(capsys, "train", "--site", str(site), "--out", str(blocker / "run"))
    assert code == 2
    assert_one_line(err, "cannot create the output folder")


def test_cli_unknown_device(capsys, make_case, tmp_path):
    import torch

    for name in GOOD:
        make_case(tmp_path / "cases", name=name)
    site = write_site(tmp_path, device=f"cuda:{torch.cuda.device_count() + 2}")
    code, err = run_cli(capsys, "train", "--site", str(site), "--out", str(tmp_path / "r"))
    assert code == 2
    assert_one_line(err, "cuda:")


def test_cli_bad_checkpoints_and_cases(capsys, make_case, tmp_path):
    from addiff_core.checkpoint import save_checkpoint
    from addiff_core.models import build_model

    case = make_case(tmp_path / "cases", name="good_0")
    code, err = run_cli(capsys, "predict", "--checkpoint", str(tmp_path / "none.pt"), "--case", str(case),
                        "--out", str(tmp_path / "p"))
    assert code == 2
    assert_one_line(err, "none.pt", "checkpoint not found")

    # weights of another configuration than the one the checkpoint claims
    other = dataclasses.replace(TINY, latent_channels=2)
    ckpt = save_checkpoint(tmp_path / "other.pt", build_model(other).state_dict(), TINY)
    code, err = run_cli(capsys, "predict", "--checkpoint", str(ckpt), "--case", str(case), "--out", str(tmp_path / "p"))
    assert code == 2
    assert_one_line(err, "do not fit this model configuration")

    # a truncated checkpoint is detected by its hash
    good = save_checkpoint(tmp_path / "good.pt", build_model(TINY).state_dict(), TINY)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    code, err = run_cli(capsys, "predict", "--checkpoint", str(good), "--case", str(case), "--out", str(tmp_path / "p"))
    assert code == 2
    assert_one_line(err, "corrupt or truncated")

    # a case that fails 'data check'
    ok = save_checkpoint(tmp_path / "ok.pt", build_model(TINY).state_dict(), TINY)
    bad_case = make_case(tmp_path / "cases", name="bad", dose=make_case_dose_cgy())
    code, err = run_cli(capsys, "predict", "--checkpoint", str(ok), "--case", str(bad_case), "--out", str(tmp_path / "p"))
    assert code == 2
    assert_one_line(err, "dose.nii.gz", "cGy")


def test_predict_without_reference_dose_writes_gy_on_ct_grid(capsys, make_case, tmp_path):
    import numpy as np
    import SimpleITK as sitk

    from addiff_core.checkpoint import save_checkpoint
    from addiff_core.models import build_model

    case = make_case(tmp_path / "cases", name="new_patient", dose=None)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(TINY).state_dict(), TINY)
    code = main(["predict", "--checkpoint", str(ckpt), "--case", str(case), "--out", str(tmp_path / "p"),
                 "--samples", "2", "--steps", "2", "--force"])  # --force: an untrained model need not be plausible
    assert code == 0
    dose = sitk.ReadImage(str(tmp_path / "p" / "dose.nii.gz"))
    ct = sitk.ReadImage(str(case / "ct.nii.gz"))
    assert dose.GetSize() == ct.GetSize() and np.allclose(dose.GetSpacing(), ct.GetSpacing())
    assert np.allclose(dose.GetOrigin(), ct.GetOrigin())
    assert (tmp_path / "p" / "dose_std.nii.gz").exists()
    assert (tmp_path / "p" / "dvh.csv").read_text().startswith("structure,")
    assert float(sitk.GetArrayFromImage(dose).min()) >= 0.0


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "x y"])
def test_site_names_cannot_escape_run_folders(tmp_path, name):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": name, "data_dir": "cases"}))
    with pytest.raises(ConfigError, match="name"):
        load_site_config(p)


# ------------------------------------------------------------------------------------------
# issue #12: outputs never overwrite data or earlier results (2), plans that passed `data check`
# and crashed training (3), silent NaN / zero predictions (4), YAML alias bombs (5)
# ------------------------------------------------------------------------------------------
def _ckpt(tmp_path, name="m.pt", nan=False):
    import torch

    from addiff_core.checkpoint import save_checkpoint
    from addiff_core.models import build_model

    state = build_model(TINY).state_dict()
    if nan:
        k = next(k for k, v in state.items() if torch.is_floating_point(v) and v.numel() > 1)
        state[k] = state[k].clone()
        state[k].view(-1)[0] = float("nan")
    return save_checkpoint(tmp_path / name, state, TINY)  # a valid SHA-256 of whatever was saved


def test_predict_never_writes_into_a_case_or_data_folder_nor_over_a_result(capsys, make_case, tmp_path):
    case = make_case(tmp_path / "cases", name="good_0")
    ref = (case / "dose.nii.gz").read_bytes()
    ckpt = _ckpt(tmp_path)
    base = ["predict", "--checkpoint", str(ckpt), "--case", str(case), "--steps", "2", "--force"]  # untrained model
    code, err = run_cli(capsys, *base, "--out", str(case))
    assert code == 2
    assert_one_line(err, "case folder")
    code, err = run_cli(capsys, *base, "--out", str(case / "masks"))
    assert code == 2
    assert_one_line(err, "inside the case folder")
    code, err = run_cli(capsys, *base, "--out", str(tmp_path / "cases"))
    assert code == 2
    assert_one_line(err, "holds case folders")
    assert (case / "dose.nii.gz").read_bytes() == ref
    assert run_cli(capsys, *base, "--out", str(tmp_path / "pred"))[0] == 0
    first = (tmp_path / "pred" / "dose.nii.gz").read_bytes()
    code, err = run_cli(capsys, *base, "--seed", "5", "--out", str(tmp_path / "pred"))
    assert code == 2
    assert_one_line(err, "already holds dose.nii.gz", "--overwrite")
    assert (tmp_path / "pred" / "dose.nii.gz").read_bytes() == first
    assert run_cli(capsys, *base, "--seed", "5", "--out", str(tmp_path / "pred"), "--overwrite")[0] == 0


def test_train_keeps_an_existing_model_unless_overwrite(capsys, make_case, tmp_path):
    for name in GOOD:
        make_case(tmp_path / "cases", name=name)
    site = write_site(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"an earlier model")
    zero = ["--vae-epochs", "0", "--diffusion-epochs", "0", "--steps", "1", "--quiet"]
    code, err = run_cli(capsys, "train", "--site", str(site), "--out", str(run), *zero)
    assert code == 2
    assert_one_line(err, "already holds model.pt", "--overwrite")
    assert (run / "model.pt").read_bytes() == b"an earlier model"
    code, err = run_cli(capsys, "train", "--site", str(site), "--out", str(tmp_path / "cases" / "run"), *zero)
    assert code == 2
    assert_one_line(err, "inside the data folder")


@pytest.mark.parametrize("plan_change,needle", [
    ({"constraints": {"SpinalCord Dmaxx": 40}}, "constraints"),
    ({"constraints": {"NotAnOrgan Dmax": 40}}, "unknown structure"),
    ({"beams": [{"gantry": 0, "energy_mv": 1e308}]}, "energy_mv"),
    ({"beams": [{"gantry": 1e308}]}, "gantry"),
    ({"beams": [{"gantry": 0, "couch": 1e308}]}, "couch"),
    ({"beams": [{"gantry_start": 0, "gantry_stop": 1e308}]}, "gantry_stop"),
    ({"beams": [{"gantry": 0, "energy_mv": 500}]}, "energy_mv"),
    ({"fractions": 10**9}, "fractions"),
], ids=["constraint-metric", "constraint-structure", "energy-huge", "gantry-huge", "couch-huge", "arc-huge",
        "energy-500MV", "fractions-huge"])
def test_plans_data_check_must_catch_are_caught_and_skipped(capsys, make_case, tmp_path, plan_change, needle):
    plan = {**make_case.plan().to_dict(), **plan_change}
    for name in GOOD:
        make_case(tmp_path / "cases", name=name)
    make_case(tmp_path / "cases", name="case", plan=plan)
    code = main(["data", "check", str(tmp_path / "cases" / "case")])
    out = capsys.readouterr().out
    assert code == 1 and "plan.yaml" in out and needle in out, out
    data = load_site_data(load_site_config(write_site(tmp_path)))
    assert list(data.skipped) == ["case"] and needle in data.skipped["case"]


def test_nan_weights_with_a_valid_hash_are_refused(capsys, make_case, tmp_path):
    case = make_case(tmp_path / "cases", name="good_0")
    code, err = run_cli(capsys, "predict", "--checkpoint", str(_ckpt(tmp_path, nan=True)), "--case", str(case),
                        "--out", str(tmp_path / "p"), "--steps", "2")
    assert code == 2
    assert_one_line(err, "NaN/inf")
    assert not (tmp_path / "p" / "dose.nii.gz").exists()


def test_non_finite_model_output_is_an_error_not_a_zero_dose(make_case, tmp_path, monkeypatch):
    import torch

    import addiff_core.predict as predict

    case = make_case(tmp_path / "cases", name="good_0")
    monkeypatch.setattr(predict, "predict_normalised",
                        lambda *a, **k: (torch.full((1, 1, 16, 16, 16), float("nan")), None))
    with pytest.raises(Exception, match="not finite"):
        predict.predict_case(_ckpt(tmp_path), case, tmp_path / "p", steps=2)
    assert not (tmp_path / "p" / "dose.nii.gz").exists()


BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else '1, 2, 3, 4, 5, 6, 7, 8, 9'}]\n"
               for i in range(12))


def test_yaml_alias_bombs_fail_fast_with_one_line(capsys, make_case, tmp_path):
    import time

    import addiff_core.checks  # noqa: F401  (the commands import these lazily; the import is not
    import addiff_core.local  # noqa: F401   what is timed here, parsing the bomb is)

    site = tmp_path / "site.yaml"
    site.write_text(BOMB + "name: *l11\ndata_dir: cases\n")
    t0 = time.process_time()
    code, err = run_cli(capsys, "train", "--site", str(site), "--out", str(tmp_path / "r"))
    assert time.process_time() - t0 < 1.0 and len(err) < 300
    assert code == 2
    assert_one_line(err, "aliases")
    case = make_case(tmp_path / "cases", name="bomb")
    (case / "plan.yaml").write_text(BOMB + "tumour_site: *l11\n")
    t0 = time.process_time()
    assert main(["data", "check", str(case)]) == 1
    out = capsys.readouterr().out
    assert time.process_time() - t0 < 5.0 and "aliases" in out and len(out) < 1000


def test_duplicate_yaml_keys_are_refused(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: a\ndata_dir: cases\nname: b\n")
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        load_site_config(p)


# ------------------------------------------------------------------------------------------
# issue #12: one line instead of a traceback, and small validation gaps
# ------------------------------------------------------------------------------------------
def test_symlinks_out_of_the_data_are_not_followed(capsys, make_case, tmp_path):
    outside = make_case(tmp_path / "elsewhere", name="other_patient")
    cases = tmp_path / "cases"
    for name in GOOD:
        make_case(cases, name=name)
    (cases / "linked").symlink_to(outside, target_is_directory=True)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRET-BYTES-0123456789" * 20)
    case = make_case(cases, name="zz_link_ct")
    (case / "ct.nii.gz").unlink()
    (case / "ct.nii.gz").symlink_to(secret)
    data = load_site_data(load_site_config(write_site(tmp_path)))
    assert sorted(data.skipped) == ["linked", "zz_link_ct"], data.skipped
    assert "outside" in data.skipped["linked"] and "outside" in data.skipped["zz_link_ct"]
    assert main(["data", "check", str(cases)]) == 1
    assert "SECRET" not in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["data", "synth", "--out", "{tmp}/s", "--sites", "-1"], "--sites"),
    (["data", "synth", "--out", "{tmp}/s", "--cases-per-site", "0"], "--cases-per-site"),
    (["data", "synth", "--out", "{tmp}/s", "--size", "100000"], "--size"),
    (["report", "{tmp}"], "not a run folder"),
    (["certs", "create", "{tmp}/c", "--host", "../../etc"], "not a host name"),
    (["certs", "create", "{tmp}/c", "--host", "a b;c"], "not a host name"),
    (["train", "--site", "{tmp}/site.yaml", "--out", "{tmp}/r", "--vae-epochs", "100000000"], "--vae-epochs"),
], ids=["sites", "cases", "size", "report", "host-dots", "host-shell", "epochs"])
def test_small_validation_gaps_are_one_line(capsys, tmp_path, argv, needle):
    (tmp_path / "site.yaml").write_text("name: x\ndata_dir: cases\n")
    code, err = run_cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert_one_line(err, needle)
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()


def test_site_file_epochs_have_an_upper_bound(tmp_path):
    p = write_site(tmp_path, training={"vae_epochs": 10**9})
    with pytest.raises(ConfigError, match="training.vae_epochs: must be <= "):
        load_site_config(p)


def test_evaluate_refuses_an_empty_cohort_and_writes_valid_json(capsys, make_case, tmp_path, monkeypatch):
    import json as _json
    import math

    import addiff_core.local as local

    for name in GOOD:
        make_case(tmp_path / "cases", name=name)
    ckpt = _ckpt(tmp_path)
    code, err = run_cli(capsys, "evaluate", "--checkpoint", str(ckpt), "--site", str(write_site(tmp_path, heldout=[])),
                        "--steps", "1")
    assert code == 2
    assert_one_line(err, "no usable held-out case")
    site = write_site(tmp_path)
    monkeypatch.setattr(local, "evaluate", lambda *a, **k: {"num_cases": 1, "mean": {"mae_gy": 1.0, "gamma": math.nan},
                                                            "cases": [{"case_id": "good_0", "gamma": math.nan}]})
    out = tmp_path / "e.json"
    assert run_cli(capsys, "evaluate", "--checkpoint", str(ckpt), "--site", str(site), "--out", str(out))[0] == 0
    assert _json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))["mean"]["gamma"] is None
    code, err = run_cli(capsys, "evaluate", "--checkpoint", str(ckpt), "--site", str(site), "--out", str(out))
    assert code == 2
    assert_one_line(err, "exists", "--overwrite")


def test_os_errors_are_one_line(capsys, make_case, tmp_path, monkeypatch):
    import errno

    import addiff_core.local as local
    import server.certs as certs

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "model.pt"))

    for name in GOOD:
        make_case(tmp_path / "cases", name=name)
    monkeypatch.setattr(local, "save_checkpoint", enospc)
    code, err = run_cli(capsys, "train", "--site", str(write_site(tmp_path)), "--out", str(tmp_path / "r"),
                        "--vae-epochs", "0", "--diffusion-epochs", "0", "--steps", "1", "--quiet")
    assert code == 2
    assert_one_line(err, "No space left on device")

    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "c" / "ca.key"))

    monkeypatch.setattr(certs, "_write", erofs)
    code, err = run_cli(capsys, "certs", "create", str(tmp_path / "c"), "--host", "fl.example.org")
    assert code == 2
    assert_one_line(err, "Read-only file system")


def test_user_error_under_python_m_is_one_line(make_case, tmp_path):
    import subprocess
    import sys

    make_case(tmp_path / "cases", name="good_0")
    (tmp_path / "x.yaml").write_text("name: x\ndata_dir: cases\n")
    # a UserError raised by the client glue (addiff_core.errors: one class, also under python -m)
    r = subprocess.run([sys.executable, "-m", "addiff_core.cli", "client", "start", "--site", str(tmp_path / "x.yaml"),
                        "--superlink", "no-port-given", "--insecure"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("addiff: error: --superlink must be HOST:PORT")


def test_garbage_run_json_on_resume_is_one_line(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{ not json")
    code, err = run_cli(capsys, "simulate", "--resume", str(run))
    assert code == 2
    assert_one_line(err, "run.json", "not a readable run description")
