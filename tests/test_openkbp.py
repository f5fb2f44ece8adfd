"""addiff_core.openkbp: import of OpenKBP sparse CSVs (real sample patients + tiny fakes)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from addiff_core.case_io import list_cases, load_case, read_plan
from addiff_core.errors import CaseError
from addiff_core.checks import check_case
from addiff_core.openkbp import (GRID_SHAPE, import_openkbp, import_openkbp_patient,
                                 openkbp_index_to_case_index)

PATIENT = "pt_11"


def _csv(path: Path, with_values: bool) -> np.ndarray:
    """Independent reader for the test: rows as (index, value) or (index,)."""
    rows = [ln.split(",") for ln in path.read_text().splitlines()[1:] if ln.strip()]
    if with_values:
        return np.array([(int(r[0]), float(r[1])) for r in rows])
    return np.array([int(r[0]) for r in rows])


@pytest.fixture(scope="module")
def imported(openkbp_dir, tmp_path_factory) -> tuple[Path, Path]:
    src = openkbp_dir / PATIENT
    out = import_openkbp_patient(src, tmp_path_factory.mktemp("okbp") / PATIENT)
    return src, out


def _arr(case: Path, rel: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(case / rel)))


def test_values_at_known_indices(imported):
    src, case = imported
    ct = _arr(case, "ct.nii.gz")
    dose = _arr(case, "dose.nii.gz")
    assert ct.dtype == np.int16 and dose.dtype == np.float32 and ct.shape == GRID_SHAPE
    rng = np.random.default_rng(0)
    for fname, arr, offset in (("ct.csv", ct, 1024), ("dose.csv", dose, 0)):
        rows = _csv(src / fname, True)
        pick = rows[rng.choice(len(rows), 25, replace=False)]
        for flat, value in pick:
            r, c, s = np.unravel_index(int(flat), GRID_SHAPE)
            # OpenKBP (row, col, slice) -> case (z, y, x) = (127 - slice, row, col)
            assert arr[127 - s, r, c] == pytest.approx(value - offset, abs=1e-3)
            assert tuple(int(i) for i in openkbp_index_to_case_index(int(flat))) == (127 - s, r, c)
    # omitted CT voxels are air (-1024 HU), omitted dose voxels 0 Gy
    ct_idx = set(_csv(src / "ct.csv", True)[:, 0].astype(int).tolist())
    air = next(i for i in range(0, 128 ** 3, 7919) if i not in ct_idx)
    assert ct[openkbp_index_to_case_index(air)] == -1024
    assert (ct != -1024).sum() <= len(ct_idx)
    assert (dose > 0).sum() == len(_csv(src / "dose.csv", True))


def test_geometry(imported):
    src, case = imported
    vd = np.loadtxt(src / "voxel_dimensions.csv")
    img = sitk.ReadImage(str(case / "ct.nii.gz"))
    assert img.GetSize() == (128, 128, 128)
    assert img.GetSpacing() == pytest.approx((vd[1], vd[0], vd[2]), abs=1e-5)
    assert img.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    centre = img.TransformContinuousIndexToPhysicalPoint((63.5, 63.5, 63.5))
    assert centre == pytest.approx((0, 0, 0), abs=1e-3)


def test_masks_plan_and_check(imported):
    src, case = imported
    for f in sorted(src.glob("*.csv")):
        name = f.stem
        if name in ("ct", "dose", "voxel_dimensions"):
            continue
        rel = "possible_dose_mask.nii.gz" if name == "possible_dose_mask" else f"masks/{name}.nii.gz"
        m = _arr(case, rel)
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        assert int(m.sum()) == len(set(_csv(f, False).tolist())), name
    plan = read_plan(case)
    expected = {t: v for t, v in {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}.items() if (src / f"{t}.csv").exists()}
    assert plan.prescriptions == expected
    assert plan.tumour_site == "head_neck" and plan.fractions == 35 and plan.technique == "IMRT"
    assert [b.gantry for b in plan.beams] == [float(g) for g in range(0, 360, 40)]
    assert all(b.couch == 0 and b.energy_mv == 6 for b in plan.beams)
    assert check_case(case) == []
    loaded = load_case(case, require_dose=True)
    assert set(loaded.masks) == {f.stem for f in src.glob("*.csv")} - {"ct", "dose", "voxel_dimensions", "possible_dose_mask"}


def test_anatomy_orientation(imported):
    """LPS with z superior: brainstem above the cord, left parotid at +x, cord posterior (+y)."""
    _, case = imported
    c = load_case(case)

    def centroid(name: str) -> np.ndarray:  # physical (x, y, z) in mm
        z, y, x = np.nonzero(c.array(name))
        return np.array(c.ct.TransformContinuousIndexToPhysicalPoint((x.mean(), y.mean(), z.mean())))

    assert centroid("Brainstem")[2] > centroid("SpinalCord")[2] + 20
    assert centroid("LeftParotid")[0] > centroid("RightParotid")[0] + 40
    assert centroid("SpinalCord")[1] > centroid("PTV70")[1]


# --------------------------------------------------------------------------------------------
# tiny fake patients: errors and the axis mapping, without the sample
# --------------------------------------------------------------------------------------------
def _fake_patient(d: Path, vd: str = "3.9\n3.9\n2.5\n", ct_rows: str = "5,1000.0\n") -> Path:
    d.mkdir(parents=True)
    (d / "voxel_dimensions.csv").write_text(vd)
    (d / "ct.csv").write_text(",data\n" + ct_rows)
    r, c, s = 10, 20, 30
    flat = np.ravel_multi_index((r, c, s), GRID_SHAPE)
    (d / "dose.csv").write_text(f",data\n{flat},70.0\n{flat + 1},69.0\n")
    (d / "possible_dose_mask.csv").write_text(f",data\n{flat},\n{flat + 1},\n")
    (d / "PTV70.csv").write_text(f",data\n{flat},\n")
    (d / "SpinalCord.csv").write_text(",data\n")  # empty structure: dropped
    return d


def test_fake_patient_mapping_and_physical_position(tmp_path):
    src = _fake_patient(tmp_path / "pt_1")
    case = import_openkbp_patient(src, tmp_path / "out" / "pt_1")
    dose = sitk.ReadImage(str(case / "dose.nii.gz"))
    a = sitk.GetArrayFromImage(dose)
    assert a[127 - 30, 10, 20] == 70.0 and a[127 - 31, 10, 20] == 69.0  # next slice is inferior
    x, y, z = dose.TransformIndexToPhysicalPoint((20, 10, 127 - 30))
    assert (x, y, z) == pytest.approx(((20 - 63.5) * 3.9, (10 - 63.5) * 3.9, (97 - 63.5) * 2.5))
    assert not (case / "masks" / "SpinalCord.nii.gz").exists()
    assert read_plan(case).prescriptions == {"PTV70": 70.0}
    assert _arr(case, "ct.nii.gz")[openkbp_index_to_case_index(5)] == 1000 - 1024


@pytest.mark.parametrize("breakage,file,pattern", [
    ("no_ct", "ct.csv", "missing"),
    ("vd_two_rows", "voxel_dimensions.csv", "expected three voxel sizes"),
    ("vd_negative", "voxel_dimensions.csv", "must be positive"),
    ("vd_text", "voxel_dimensions.csv", "not three numbers"),
    ("vd_missing", "voxel_dimensions.csv", "missing"),
    ("index_out_of_range", "ct.csv", r"index 2097152 \(data row 2\) out of range"),
    ("negative_index", "dose.csv", "out of range"),
    ("missing_value", "ct.csv", "not an OpenKBP sparse CSV"),
    ("no_target", "PTV70.csv", "no non-empty target"),
])
def test_import_errors_name_the_file(tmp_path, breakage, file, pattern):
    src = _fake_patient(tmp_path / "pt_1")
    if breakage == "no_ct":
        (src / "ct.csv").unlink()
    elif breakage == "vd_two_rows":
        (src / "voxel_dimensions.csv").write_text("3.9\n2.5\n")
    elif breakage == "vd_negative":
        (src / "voxel_dimensions.csv").write_text("3.9\n-3.9\n2.5\n")
    elif breakage == "vd_text":
        (src / "voxel_dimensions.csv").write_text("a\nb\nc\n")
    elif breakage == "vd_missing":
        (src / "voxel_dimensions.csv").unlink()
    elif breakage == "index_out_of_range":
        (src / "ct.csv").write_text(",data\n5,100\n2097152,100\n")
    elif breakage == "negative_index":
        (src / "dose.csv").write_text(",data\n-1,10\n")
    elif breakage == "missing_value":
        (src / "ct.csv").write_text(",data\n5,\n")
    elif breakage == "no_target":
        (src / "PTV70.csv").unlink()
    with pytest.raises(CaseError) as ei:
        import_openkbp_patient(src, tmp_path / "out" / "pt_1")
    assert ei.value.file == file and ei.value.case == str(src)
    assert re.search(pattern, ei.value.problem), ei.value.problem
    assert not (tmp_path / "out" / "pt_1").exists()
    leftovers = list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert leftovers == []  # nothing half-written


def test_import_folder_of_patients_and_single_patient(tmp_path, capsys):
    src = tmp_path / "okbp"
    for name in ("pt_11", "pt_3"):
        _fake_patient(src / name)
    (src / "notes").mkdir()
    out = import_openkbp(src, tmp_path / "data").imported  # issue #11: a summary, with .imported / .skipped
    assert [p.name for p in out] == ["pt_3", "pt_11"]  # natural order
    assert list_cases(tmp_path / "data") == sorted(out)
    assert "[2/2] pt_11" in capsys.readouterr().err
    # one patient folder; re-import replaces the existing case
    again = import_openkbp(src / "pt_3", tmp_path / "data", progress=False)
    assert again.imported == [tmp_path / "data" / "pt_3"] and again.skipped == []
    assert capsys.readouterr().err == ""
    # refuses to overwrite a folder that is not a case
    (tmp_path / "other" / "pt_3").mkdir(parents=True)
    (tmp_path / "other" / "pt_3" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        import_openkbp(src / "pt_3", tmp_path / "other", progress=False)
    with pytest.raises(CaseError, match="no OpenKBP patient folders"):
        import_openkbp(src / "notes", tmp_path / "data")


def test_import_the_dataset_layout_skipping_bad_patients(openkbp_dir, tmp_path, capsys):
    """The dataset's own layout (provided-data/train-pats/pt_N, validation-pats/, test-pats/): the
    split folders are kept; a bad patient is skipped with its reason and the rest are imported."""
    import shutil

    from addiff_core.cli import main
    from addiff_core.openkbp import find_patients

    root = tmp_path / "provided-data"
    shutil.copytree(openkbp_dir / PATIENT, root / "train-pats" / PATIENT)       # a real patient
    _fake_patient(root / "train-pats" / "pt_2")
    _fake_patient(root / "validation-pats" / "pt_201")
    bad_csv = _fake_patient(root / "validation-pats" / "pt_202")
    (bad_csv / "dose.csv").write_text(",data\n12,not-a-dose\n")                 # malformed CSV
    no_ct = _fake_patient(root / "test-pats" / "pt_241")
    (no_ct / "ct.csv").unlink()                                                   # missing CSV
    (root / "test-pats" / "README").mkdir()                                       # not a patient
    assert [p.relative_to(root).as_posix() for p in find_patients(root)] == [
        "test-pats/pt_241", "train-pats/pt_2", f"train-pats/{PATIENT}", "validation-pats/pt_201",
        "validation-pats/pt_202"]

    out = tmp_path / "cases"
    summary = import_openkbp(root, out)
    assert [p.relative_to(out).as_posix() for p in summary.imported] == [
        "train-pats/pt_2", f"train-pats/{PATIENT}", "validation-pats/pt_201"]
    assert [name for name, _ in summary.skipped] == ["test-pats/pt_241", "validation-pats/pt_202"]
    reasons = dict(summary.skipped)
    assert reasons["test-pats/pt_241"].startswith("ct.csv: missing")
    assert reasons["validation-pats/pt_202"].startswith("dose.csv: not an OpenKBP sparse CSV")
    err = capsys.readouterr().err
    assert "[1/5] test-pats/pt_241 skipped: ct.csv: missing" in err and "[5/5] validation-pats/pt_202 skipped" in err
    assert list_cases(out / "train-pats") == sorted([out / "train-pats" / "pt_2", out / "train-pats" / PATIENT])
    assert list_cases(out / "validation-pats") == [out / "validation-pats" / "pt_201"]
    assert not (out / "test-pats").exists() and not list((out / "validation-pats").glob("*pt_202*"))
    assert check_case(out / "train-pats" / PATIENT) == []
    text = summary.text(out)
    assert text.splitlines()[0].startswith("imported 3 OpenKBP patient(s) into ") and "skipped 2:" in text
    assert "  validation-pats/pt_202: dose.csv: " in text

    # the command line: the same summary, exit status 1 because a patient was skipped
    code = main(["data", "import-openkbp", str(root / "validation-pats"), str(tmp_path / "cli")])
    printed = capsys.readouterr().out
    assert code == 1 and "imported 1 OpenKBP patient(s)" in printed and "pt_202: dose.csv" in printed
    assert list_cases(tmp_path / "cli") == [tmp_path / "cli" / "pt_201"]  # a split folder is a flat folder
    assert main(["data", "import-openkbp", str(root / "train-pats" / "pt_2"), str(tmp_path / "one")]) == 0
