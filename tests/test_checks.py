"""addiff_core.checks: every breakage of a case is reported with its file and a clear message."""
from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from addiff_core.checks import Problem, check_case, check_dataset, find_cases, nifti_gz_problem


# --------------------------------------------------------------------------------------------
# breakers: each takes (make_case, tmp_path) and returns a case folder with exactly one defect
# --------------------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


def _arrays(mk):
    return mk.arrays()


def _reimage(path: Path, fn: Callable[[sitk.Image], sitk.Image]) -> None:
    sitk.WriteImage(fn(sitk.ReadImage(str(path))), str(path), useCompression=True)


def ct_missing(mk, tmp):
    c = mk(tmp)
    (c / "ct.nii.gz").unlink()
    return c


def ct_misnamed(mk, tmp):
    c = mk(tmp)
    (c / "ct.nii.gz").rename(c / "CT.nii.gz")
    return c


def ct_truncated(mk, tmp):
    c = mk(tmp)
    _truncate(c / "ct.nii.gz")
    return c


def dose_truncated(mk, tmp):
    c = mk(tmp)
    _truncate(c / "dose.nii.gz")
    return c


def mask_garbage(mk, tmp):
    c = mk(tmp)
    (c / "masks" / "SpinalCord.nii.gz").write_bytes(b"this is not an image at all")
    return c


def pdm_truncated(mk, tmp):
    c = mk(tmp)
    _truncate(c / "possible_dose_mask.nii.gz")
    return c


def mask_wrong_spacing(mk, tmp):
    c = mk(tmp)
    _reimage(c / "masks" / "SpinalCord.nii.gz", lambda im: (im.SetSpacing((3.0, 3.0, 3.0)), im)[1])
    return c


def dose_wrong_size(mk, tmp):
    a = _arrays(mk)
    c = mk(tmp)
    dose = sitk.GetImageFromArray(a["dose"][:-2].copy())
    ref = sitk.ReadImage(str(c / "ct.nii.gz"))
    dose.SetSpacing(ref.GetSpacing())
    dose.SetOrigin(ref.GetOrigin())
    sitk.WriteImage(dose, str(c / "dose.nii.gz"), useCompression=True)
    return c


def pdm_wrong_origin(mk, tmp):
    c = mk(tmp)
    _reimage(c / "possible_dose_mask.nii.gz", lambda im: (im.SetOrigin((5.0, 0.0, 0.0)), im)[1])
    return c


def mask_wrong_direction(mk, tmp):
    c = mk(tmp)
    _reimage(c / "masks" / "Body.nii.gz", lambda im: (im.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1)), im)[1])
    return c


def mask_non_binary(mk, tmp):
    a = _arrays(mk)
    return mk(tmp, masks={"SpinalCord": a["masks"]["SpinalCord"] * 255})


def mask_empty(mk, tmp):
    a = _arrays(mk)
    return mk(tmp, masks={"SpinalCord": np.zeros_like(a["masks"]["SpinalCord"])})


def target_empty(mk, tmp):
    a = _arrays(mk)
    return mk(tmp, masks={"PTV70": np.zeros_like(a["masks"]["PTV70"])})


def ct_nan(mk, tmp):
    ct = _arrays(mk)["ct"].astype(np.float32)
    ct[3, 4, 5] = np.nan
    return mk(tmp, ct=ct)


def dose_inf(mk, tmp):
    dose = _arrays(mk)["dose"].copy()
    dose[8, 8, 8] = np.inf
    return mk(tmp, dose=dose)


def dose_negative(mk, tmp):
    dose = _arrays(mk)["dose"].copy()
    dose[0, 0, :4] = -2.5
    return mk(tmp, dose=dose)


def dose_cgy(mk, tmp):
    return mk(tmp, dose=_arrays(mk)["dose"] * 100)


def dose_per_fraction(mk, tmp):
    return mk(tmp, dose=_arrays(mk)["dose"] / 35)


def dose_flipped(mk, tmp):
    a = _arrays(mk)
    dose = np.roll(a["dose"], 8, axis=2)  # dose shifted half the grid sideways: PTV underdosed
    return mk(tmp, dose=dose)


def plan_missing(mk, tmp):
    c = mk(tmp)
    (c / "plan.yaml").unlink()
    return c


def plan_not_yaml(mk, tmp):
    return mk(tmp, plan="tumour_site: head_neck\nprescriptions: {PTV70: 70\n  beams: [")


def plan_missing_field(mk, tmp):
    d = mk.plan().to_dict()
    del d["fractions"]
    return mk(tmp, plan=d)


def plan_bad_technique(mk, tmp):
    d = mk.plan().to_dict()
    d["technique"] = "3D-CRT"
    return mk(tmp, plan=d)


def plan_rx_without_mask(mk, tmp):
    d = mk.plan().to_dict()
    d["prescriptions"]["PTV56"] = 56.0
    return mk(tmp, plan=d)


def plan_rx_not_positive(mk, tmp):
    d = mk.plan().to_dict()
    d["prescriptions"]["PTV70"] = -70.0
    return mk(tmp, plan=d)


def ct_offset(mk, tmp):
    return mk(tmp, ct=_arrays(mk)["ct"] + 1024)


def ct_too_high(mk, tmp):
    return mk(tmp, ct=_arrays(mk)["ct"] * 10)  # HU x 10: bone at 7000


def test_a_few_metal_voxels_are_fine(make_case, tmp_path):
    ct = make_case.arrays()["ct"].copy()
    ct[8, 8, 8:10] = 25000  # dental filling on an extended-HU-scale scanner
    assert check_case(make_case(tmp_path, ct=ct)) == []


def mask_bad_name(mk, tmp):
    a = _arrays(mk)
    return mk(tmp, masks={"Left Parotid": a["masks"]["SpinalCord"]})


def mask_non_canonical(mk, tmp):
    a = _arrays(mk)
    return mk(tmp, masks={"SpinalCord": None, "spinal_cord": a["masks"]["SpinalCord"]})


def mask_wrong_format(mk, tmp):
    c = mk(tmp)
    sitk.WriteImage(sitk.ReadImage(str(c / "masks" / "Body.nii.gz")), str(c / "masks" / "Larynx.nrrd"))
    return c


BREAKERS = [
    # (breaker, file, message regex)
    (ct_missing, "ct.nii.gz", r"^missing$"),
    (ct_misnamed, "ct.nii.gz", r"missing \(found CT\.nii\.gz"),
    (ct_truncated, "ct.nii.gz", r"unreadable.*truncated"),
    (dose_truncated, "dose.nii.gz", r"unreadable.*truncated"),
    (mask_garbage, "masks/SpinalCord.nii.gz", r"unreadable"),
    (pdm_truncated, "possible_dose_mask.nii.gz", r"unreadable.*truncated"),
    (mask_wrong_spacing, "masks/SpinalCord.nii.gz", r"not on the CT grid: spacing \(3, 3, 3\) vs CT \(2, 2, 2\.5\)"),
    (dose_wrong_size, "dose.nii.gz", r"not on the CT grid: size \(16, 16, 14\) vs CT \(16, 16, 16\)"),
    (pdm_wrong_origin, "possible_dose_mask.nii.gz", r"not on the CT grid: origin "),
    (mask_wrong_direction, "masks/Body.nii.gz", r"not on the CT grid: direction "),
    (mask_non_binary, "masks/SpinalCord.nii.gz", r"not a binary mask: values other than 0/1 \(255\)"),
    (mask_empty, "masks/SpinalCord.nii.gz", r"^empty mask"),
    (target_empty, "masks/PTV70.nii.gz", r"empty target: PTV70 is prescribed 70 Gy"),
    (ct_nan, "ct.nii.gz", r"1 voxel\(s\) are NaN/inf"),
    (dose_inf, "dose.nii.gz", r"1 voxel\(s\) are NaN/inf"),
    (dose_negative, "dose.nii.gz", r"negative dose: minimum -2\.5 Gy in 4 voxel"),
    (dose_cgy, "dose.nii.gz", r"looks like cGy; divide by 100"),
    (dose_per_fraction, "dose.nii.gz", r"far below the prescription.*one fraction: multiply by the 35"),
    (dose_flipped, "dose.nii.gz", r"median dose in PTV70 .* misaligned"),
    (plan_missing, "plan.yaml", r"^missing$"),
    (plan_not_yaml, "plan.yaml", r"not valid YAML at line \d+, column \d+: "),
    (plan_missing_field, "plan.yaml", r"missing field 'fractions'"),
    (plan_bad_technique, "plan.yaml", r"technique must be IMRT or VMAT"),
    (plan_rx_without_mask, "plan.yaml", r"prescribes 56 Gy to PTV56 but masks/PTV56\.nii\.gz is missing"),
    (plan_rx_not_positive, "plan.yaml", r"prescription for PTV70 must be a positive dose"),
    (ct_offset, "ct.nii.gz", r"minimum is 24 >= 0.*subtract 1024"),
    (ct_too_high, "ct.nii.gz", r"\d+ voxels \(.*%\) are above 5000 HU, maximum 7000"),
    (mask_bad_name, "masks/Left Parotid.nii.gz", r"'Left Parotid' is not a valid structure name"),
    (mask_non_canonical, "masks/spinal_cord.nii.gz", r"looks like SpinalCord .*rename to masks/SpinalCord\.nii\.gz"),
    (mask_wrong_format, "masks/Larynx.nrrd", r"not a \.nii\.gz mask"),
]


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
    _truncate(case / "possible_dose_mask.nii.gz")
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
