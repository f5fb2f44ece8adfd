"""addiff_core.checks: every breakage of a case is reported with its file and a clear message."""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from addiff_core.checks import Problem, check_case, check_dataset, find_cases
from addiff_core.nifti_raw import nifti_gz_problem
from helpers.checks import BREAKERS, ct_truncated, truncate


def test_a_few_metal_voxels_are_fine(make_case, tmp_path):
    ct = make_case.arrays()["ct"].copy()
    ct[8, 8, 8:10] = 25000  # dental filling on an extended-HU-scale scanner
    assert check_case(make_case(tmp_path, ct=ct)) == []


def test_valid_case_has_no_problem(make_case, tmp_path):
    assert check_case(make_case(tmp_path)) == []


def test_valid_case_without_dose_or_possible_dose_mask(make_case, tmp_path):
    assert check_case(make_case(tmp_path, dose=None, possible_dose_mask=None)) == []


@pytest.mark.parametrize("breaker,file,pattern", BREAKERS, ids=[b[0].__name__ for b in BREAKERS])
def test_each_breakage_is_reported(make_case, tmp_path, breaker, file, pattern):
    case = breaker(make_case, tmp_path)
    problems = check_case(case)
    assert len(problems) == 1, "\n".join(map(str, problems))
    p = problems[0]
    assert p.case == str(case)
    assert p.file == file, str(p)
    assert re.search(pattern, p.message), str(p)
    assert str(p) == f"{case}: {file}: {p.message}"


def test_corpus_is_large_and_distinct():
    assert len(BREAKERS) >= 15
    assert len({b[0] for b in BREAKERS}) == len(BREAKERS)


def test_several_problems_are_all_reported(make_case, tmp_path):
    a = make_case.arrays()
    dose = a["dose"] * 100
    dose[0, 0, 0] = -1.0
    case = make_case(tmp_path, ct=a["ct"] + 1024, dose=dose,
                     masks={"SpinalCord": a["masks"]["SpinalCord"] * 2, "Larynx": np.zeros_like(a["ct"])})
    truncate(case / "possible_dose_mask.nii.gz")
    files = sorted(p.file for p in check_case(case))
    assert files == ["ct.nii.gz", "dose.nii.gz", "dose.nii.gz", "masks/Larynx.nii.gz",
                     "masks/SpinalCord.nii.gz", "possible_dose_mask.nii.gz"]


def test_prescription_checks_survive_an_otherwise_invalid_plan(make_case, tmp_path):
    d = make_case.plan().to_dict()
    d["technique"] = "3D"
    case = make_case(tmp_path, plan=d, dose=make_case.arrays()["dose"] * 100)
    msgs = {p.file: p.message for p in check_case(case)}
    assert "technique" in msgs["plan.yaml"] and "cGy" in msgs["dose.nii.gz"]


@pytest.mark.parametrize("setup", ["nonexistent", "file", "plan_is_dir", "ct_is_dir", "masks_is_file",
                                   "empty_plan", "plan_list", "plan_binary", "ct_2d", "all_nan_dose"])
def test_never_raises_on_weird_input(make_case, tmp_path, setup):
    case = tmp_path / "case"
    if setup == "nonexistent":
        pass
    elif setup == "file":
        case.write_text("x")
    else:
        case = make_case(tmp_path)
        if setup == "plan_is_dir":
            (case / "plan.yaml").unlink()
            (case / "plan.yaml").mkdir()
        elif setup == "ct_is_dir":
            (case / "ct.nii.gz").unlink()
            (case / "ct.nii.gz").mkdir()
        elif setup == "masks_is_file":
            for p in (case / "masks").iterdir():
                p.unlink()
            (case / "masks").rmdir()
            (case / "masks").write_text("x")
        elif setup == "empty_plan":
            (case / "plan.yaml").write_text("")
        elif setup == "plan_list":
            (case / "plan.yaml").write_text("- a\n- b\n")
        elif setup == "plan_binary":
            (case / "plan.yaml").write_bytes(b"\xff\xfe\x00\x81")
        elif setup == "ct_2d":
            sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.int16)), str(case / "ct.nii.gz"))
        elif setup == "all_nan_dose":
            sitk.WriteImage(sitk.GetImageFromArray(np.full((16, 16, 16), np.nan, np.float32)),
                            str(case / "dose.nii.gz"))
    problems = check_case(case)
    assert problems and all(isinstance(p, Problem) for p in problems)
    assert not any("internal error" in p.message for p in problems), problems


def test_nifti_gz_problem(tmp_path):
    p = tmp_path / "x.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(8, 9, 10).astype(np.float32)), str(p), useCompression=True)
    assert nifti_gz_problem(p) is None
    # a gzip stream that ends properly but holds too few voxels
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-100]))
    assert "truncated" in nifti_gz_problem(p)
    p.write_bytes(gzip.compress(b"x" * 400))
    assert "not a NIfTI" in nifti_gz_problem(p)


def test_check_dataset_counts_a_mix(make_case, tmp_path):
    a = make_case.arrays()
    root = tmp_path / "data"
    make_case(root / "site_a", "c1")
    make_case(root / "site_a", "c2")
    ct_truncated(make_case, root / "site_a" / "c3_dir")       # case at site_a/c3_dir/case: 1 problem
    make_case(root / "site_b", "c4")
    make_case(root / "site_b", "c5", ct=a["ct"] + 1024, dose=a["dose"] * 100)  # 2 problems
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a case")
    (root / ".hidden" / "c6").mkdir(parents=True)
    (root / ".hidden" / "c6" / "plan.yaml").write_text("x: 1")
    n, problems = check_dataset(root)
    assert n == 5
    assert len(problems) == 3
    assert {Path(p.case).name for p in problems} == {"case", "c5"}
    assert find_cases(root)[0] == root / "site_a" / "c1"


def test_check_dataset_flat_folder_and_empty(make_case, tmp_path):
    make_case(tmp_path / "d", "x")
    make_case(tmp_path / "d", "y", dose=make_case.arrays()["dose"] / 35)
    n, problems = check_dataset(tmp_path / "d")
    assert n == 2 and [Path(p.case).name for p in problems] == ["y"]
    (tmp_path / "empty").mkdir()
    assert check_dataset(tmp_path / "empty")[0] == 0
    assert "no case folders" in check_dataset(tmp_path / "empty")[1][0].message
    n, problems = check_dataset(tmp_path / "nowhere")
    assert n == 0 and problems[0].message == "data folder not found"
