"""Case breakers: each takes ``(make_case, tmp_path)`` and returns a case folder with exactly one
defect; ``BREAKERS`` lists them with the file and the message ``addiff data check`` must report
(tests/test_checks.py, and the CLI fuzzing of tests/test_bad_input.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

# --------------------------------------------------------------------------------------------
# breakers: each takes (make_case, tmp_path) and returns a case folder with exactly one defect
# --------------------------------------------------------------------------------------------
def truncate(path: Path) -> None:
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
    truncate(c / "ct.nii.gz")
    return c


def dose_truncated(mk, tmp):
    c = mk(tmp)
    truncate(c / "dose.nii.gz")
    return c


def mask_garbage(mk, tmp):
    c = mk(tmp)
    (c / "masks" / "SpinalCord.nii.gz").write_bytes(b"this is not an image at all")
    return c


def pdm_truncated(mk, tmp):
    c = mk(tmp)
    truncate(c / "possible_dose_mask.nii.gz")
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
