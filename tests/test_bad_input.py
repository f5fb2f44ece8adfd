"""Bad input at a hospital: broken cases are skipped (never a good one lost), bad site files,
folders, devices and checkpoints get one clear line, not a traceback."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from test_checks import BREAKERS  # noqa: E402  (tests/ is on sys.path under pytest)

from addiff_core.cli import main
from addiff_core.config import ConfigError, GridConfig, ModelConfig, load_site_config
from addiff_core.data import load_site_data

GOOD = ("good_0", "good_1", "good_2")
TINY = ModelConfig(grid=GridConfig(size=16), vae_channels=(8, 16), unet_channels=(16, 16),
                   attention_levels=(False, True), cond_channels=8, context_dim=16, num_heads=2, norm_groups=4,
                   sample_steps=2)


def write_site(root: Path, heldout=("good_0",), **extra) -> Path:
    doc = {"name": "fuzz_site", "data_dir": "cases", "heldout": {"case_ids": list(heldout)}, "device": "cpu",
           "model": {"grid": {"size": 16}, "vae_channels": [8, 16], "unet_channels": [16, 16],
                     "attention_levels": [False, True], "cond_channels": 8, "context_dim": 16, "num_heads": 2,
                     "norm_groups": 4, "sample_steps": 2}}
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
    from conftest import default_arrays

    return default_arrays()["dose"] * 100.0


def test_skipped_cases_are_reported_in_round_metrics(make_case, tmp_path):
    from addiff_core.fl_task import SiteTask, initial_arrays

    cases = tmp_path / "cases"
    for name in GOOD:
        make_case(cases, name=name)
    make_case(cases, name="zz_bad", dose=make_case_dose_cgy())
    site = load_site_config(write_site(tmp_path))
    task = SiteTask(site, site.model)
    res = task.train(initial_arrays(site.model), "vae", epochs=1, server_round=1)
    assert res.metrics["skipped_cases"] == 1.0
    assert res.num_examples == 2


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("addiff: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


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
                 "--samples", "2", "--steps", "2"])
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
