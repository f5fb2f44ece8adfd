"""One GDP-HMM plan dict (the ``arr_0`` of its npz) -> the arrays, plan and provenance of a case.

The dict's layout (DICOM2NPZ.py ``get_npz_dict_ref_CT`` + ``spatial_crop_dict``; the key list
printed in evaluation.ipynb): ``img`` (CT in HU, numpy (z, y, x) of ``sitk.GetArrayFromImage``),
one 3-D 0/1 array per structure under its TPS name (``Body``, ``PTV70OPT``, ``SpinalCord``,
``Parotids``, ...), ``dose`` with ``dose_scale`` (DoseGridScaling: Gy = dose * dose_scale),
``isVMAT``, ``angle_list`` (gantry angles in degrees: the IMRT fields, or the control points of
the VMAT arc), ``isocenter`` (voxel indices, z, y, x), ``angle_plate`` / ``beam_plate`` (the
challenge's beam inputs, not used: the project builds its own), ``origin`` / ``spacing`` /
``direction`` / ``size`` of the CT grid (SimpleITK order) and ``all_mask`` (the structure names).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..case_io import BODY_NAME, MAX_BEAMS, Beam, Plan, plan_from_dict
from ..dicom.names import DEFAULT_NAME_MAP, infer_tumour_site, normalise, safe_structure_name
from ..limits import max_voxels
from .metric import d97_scale
from .sources import DEFAULT_SPACING_XYZ, LEADERBOARD_PTV_HIGH, Level, MetaRow

NOT_STRUCTURES = {"img", "dose", "beam_plate", "angle_plate"}
"""3-D arrays of the dict that are not structures."""
REQUIRED = ("img", "Body", "isVMAT", "angle_list", "isocenter")
ENERGY_MV = 6.0  # the files carry no beam energy
GY_PER_FRACTION = 2.0  # the files carry no fraction count: conventional fractionation assumed
MAX_DOSE_GY = 200.0


class PlanProblem(ValueError):
    """The plan dict cannot become a case; the message names the key and the problem."""


@dataclass
class Converted:
    """A plan as case arrays ((z, y, x); geometry in SimpleITK (x, y, z) order) + provenance."""

    ct: np.ndarray
    masks: dict[str, np.ndarray]
    dose: np.ndarray | None
    plan: Plan
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    info: dict[str, Any] = field(default_factory=dict)


def _number(d: Mapping[str, Any], key: str) -> float:
    v = d[key]
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(v)):
        raise PlanProblem(f"{key} must be a finite number, got a {type(v).__name__}")
    return float(v)


def _vector(d: Mapping[str, Any], key: str, n: int | None = None) -> np.ndarray:
    try:
        a = np.asarray(d[key], dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise PlanProblem(f"{key} must be a list of numbers") from None
    if (n is not None and a.size != n) or a.size == 0 or not np.all(np.isfinite(a)):
        raise PlanProblem(f"{key} must be {n or 'one or more'} finite numbers, got {a.size} value(s)")
    return a


def _volume(d: Mapping[str, Any], key: str, shape: tuple[int, ...] | None) -> np.ndarray:
    a = d[key]
    if not isinstance(a, np.ndarray) or a.ndim != 3 or a.dtype.kind not in "biuf":
        raise PlanProblem(f"{key} must be a 3-D numeric array, got {type(a).__name__} "
                          f"{getattr(a, 'shape', '')} {getattr(a, 'dtype', '')}".rstrip())
    if shape is not None and a.shape != shape:
        raise PlanProblem(f"{key} has shape {a.shape}, the CT (img) {shape}")
    return a


def case_name(gdp_name: str) -> str:
    """The case's structure name: the project's OAR/Body name when the name is one of its
    spellings (``dicom.names.DEFAULT_NAME_MAP``: BrainStem -> Brainstem), else the name kept
    (as a valid file name). PRV expansions (``SpinalCord_05``, ``BrainStem_03``), combined
    structures (``Parotids``, ``Lungs``) and ``-PTV`` cut-outs are kept by name: they are not the
    organ the model's channel means."""
    return DEFAULT_NAME_MAP.get(normalise(gdp_name)) or safe_structure_name(gdp_name)


def _structures(d: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    masks: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}  # GDP-HMM name -> case name
    for key in sorted(k for k in d if isinstance(k, str)):
        v = d[key]
        if key in NOT_STRUCTURES or not isinstance(v, np.ndarray) or v.ndim != 3:
            continue
        a = _volume(d, key, shape)
        name = case_name(key)
        if name in masks:  # two spellings of one structure: the first kept, the other said
            names[key] = f"(dropped: same name as {next(k for k, n in names.items() if n == name)})"
            continue
        masks[name] = (a > 0).astype(np.uint8)
        names[key] = name
    return masks, names


def beams_of(angles: np.ndarray, is_vmat: bool) -> list[Beam]:
    """IMRT: one static field per angle. VMAT: one arc over the control-point angles, from the
    angle after the largest gap between them to the angle before it (the files keep the angle
    set, not the rotation direction: the arc is taken clockwise)."""
    a = np.unique(np.mod(np.round(angles, 3), 360.0))
    if not is_vmat or a.size < 2:
        if a.size > MAX_BEAMS:
            raise PlanProblem(f"angle_list holds {a.size} IMRT fields (at most {MAX_BEAMS})")
        return [Beam(gantry=float(g), couch=0.0, energy_mv=ENERGY_MV) for g in a]
    gaps = np.diff(np.append(a, a[0] + 360.0))
    i = int(np.argmax(gaps))
    start, stop = float(a[(i + 1) % a.size]), float(a[i])
    return [Beam(gantry=start, couch=0.0, energy_mv=ENERGY_MV, gantry_stop=stop)]


def _geometry(d: Mapping[str, Any]) -> tuple[tuple, tuple, tuple, str]:
    spacing_src = "npz"
    if "spacing" in d:
        sp = _vector(d, "spacing", 3)
        if np.any(sp <= 0) or np.any(sp > 50):
            raise PlanProblem(f"spacing must be three voxel sizes in (0, 50] mm, got {sp.tolist()}")
    else:
        sp, spacing_src = np.array(DEFAULT_SPACING_XYZ), "DICOM2NPZ.py img_spac (the file has no spacing)"
    shape_xyz = np.shape(d["img"])[::-1]
    origin = (_vector(d, "origin", 3) if "origin" in d
              else np.array([-(n - 1) / 2.0 * s for n, s in zip(shape_xyz, sp)]))
    direction = _vector(d, "direction", 9) if "direction" in d else np.eye(3).ravel()
    m = direction.reshape(3, 3)
    if not np.allclose(m @ m.T, np.eye(3), atol=1e-3):
        raise PlanProblem("direction must be an orthonormal 3x3 matrix (9 numbers)")
    return tuple(map(float, sp)), tuple(map(float, origin)), tuple(map(float, direction)), spacing_src


def _ct(d: Mapping[str, Any]) -> np.ndarray:
    img = _volume(d, "img", None)
    if img.size > max_voxels():
        raise PlanProblem(f"img has {img.size} voxels (at most {max_voxels()}, ADDIFF_MAX_VOXELS)")
    hu = np.rint(np.asarray(img, dtype=np.float64))
    if not np.all(np.isfinite(hu)) or hu.min() < -32768 or hu.max() > 32767:
        raise PlanProblem("img must hold finite HU values that fit int16")
    return hu.astype(np.int16)


def _dose(d: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[np.ndarray | None, float | None]:
    if "dose" not in d:
        return None, None
    raw = _volume(d, "dose", shape)
    if "dose_scale" not in d:
        raise PlanProblem("dose without dose_scale: the dose is stored in the RTDOSE's integer units "
                          "(Gy = dose * dose_scale)")
    scale = _number(d, "dose_scale")
    gy = raw.astype(np.float64) * scale
    if scale <= 0 or not np.all(np.isfinite(gy)) or gy.min() < 0 or gy.max() > MAX_DOSE_GY:
        raise PlanProblem(f"dose * dose_scale must lie in [0, {MAX_DOSE_GY:g}] Gy (dose_scale {scale:g}, "
                          f"maximum {float(np.nanmax(gy)) if gy.size else 0:.4g})")
    return gy, scale


def _targets(levels: list[Level], d: Mapping[str, Any], masks: Mapping[str, np.ndarray], pid: str) -> dict[str, float]:
    rx: dict[str, float] = {}
    for lv in levels:
        for key in (lv.opt_name, lv.struct_name):
            if key is not None and not isinstance(d.get(key), np.ndarray):
                raise PlanProblem(f"PTV_DICT.json names {key[:64]} ({lv.level} of patient {pid[:40]}) but the npz "
                                  "has no such mask")
        name = case_name(lv.target)
        if not masks.get(name, np.zeros(1)).any():
            raise PlanProblem(f"{lv.target[:64]} ({lv.level} of patient {pid[:40]}) is empty")
        rx[name] = max(rx.get(name, 0.0), lv.pdose_gy)
    return rx


def _tumour_site(meta: MetaRow | None, masks: Mapping[str, np.ndarray]) -> str:
    site = meta.tumour_site if meta is not None else None
    site = site or infer_tumour_site({n for n, m in masks.items() if m.any()})
    if site not in LEADERBOARD_PTV_HIGH:
        raise PlanProblem("tumour site unknown: meta_data.csv's site (1 head and neck, 2 lung) is needed "
                          "(--meta), or structures that tell it")
    return site


def convert(d: Mapping[str, Any], plan_id: str, pid: str, levels: list[Level], meta: MetaRow | None,
            normalise_d97: bool = True) -> Converted:
    """The case of plan ``plan_id`` from its dict ``d``.

    Args:
        d: the ``arr_0`` dict (``safe_npz.load_plan_dict``).
        plan_id: the npz file name without ``.npz``; ``pid`` its PTV_DICT key.
        levels: the patient's PTV levels (``sources.levels``).
        meta: its meta_data.csv row, or None.
        normalise_d97: scale the dose so that D97 of PTV-High is its PDose, as the challenge's
            loader and evaluation do (``metric.d97_scale``); False keeps ``dose * dose_scale``.

    Raises:
        PlanProblem: a missing key, a PTV named in PTV_DICT.json but absent or empty, a dose
            without dose_scale, an array of the wrong shape or type, implausible values.
    """
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise PlanProblem(f"missing key {missing[0]!r} in arr_0 (a GDP-HMM plan holds {', '.join(REQUIRED)}, ...)")
    ct = _ct(d)
    masks, names = _structures(d, ct.shape)
    if not masks.get(BODY_NAME, np.zeros(1)).any():
        raise PlanProblem("Body is empty")
    rx = _targets(levels, d, masks, pid)
    site = _tumour_site(meta, masks)
    norm_name = LEADERBOARD_PTV_HIGH[site]
    norm_name = norm_name if masks.get(norm_name, np.zeros(1)).any() else case_name(levels[0].opt_name)
    dose, dose_scale = _dose(d, ct.shape)
    scale = None
    if dose is not None:
        try:
            scale = d97_scale(dose, masks[norm_name], levels[0].pdose_gy)
        except ValueError as e:
            raise PlanProblem(str(e)) from None
        if not math.isfinite(scale) or not 0.2 <= scale <= 5:
            raise PlanProblem(f"the D97 normalisation factor is {scale:.4g}: the dose does not cover {norm_name}")
        dose = (dose * scale if normalise_d97 else dose).astype(np.float32)
    is_vmat = d["isVMAT"]
    if not isinstance(is_vmat, (bool, np.bool_, int, np.integer)) or int(is_vmat) not in (0, 1):
        raise PlanProblem(f"isVMAT must be True or False, got a {type(is_vmat).__name__}")
    angles = _vector(d, "angle_list")
    if np.any(np.abs(angles) > 360):
        raise PlanProblem("angle_list must hold gantry angles in degrees")
    technique = "VMAT" if bool(is_vmat) else "IMRT"
    spacing, origin, direction, spacing_src = _geometry(d)
    iso = _vector(d, "isocenter", 3)
    iso_mm = np.asarray(origin) + np.asarray(direction).reshape(3, 3) @ (iso[::-1] * np.asarray(spacing))
    plan = plan_from_dict({
        "tumour_site": site, "prescriptions": rx,
        "fractions": max(1, int(round(levels[0].pdose_gy / GY_PER_FRACTION))), "technique": technique,
        "beams": [b.to_dict() for b in beams_of(angles, bool(is_vmat))]}, plan_id)
    info = {
        "source": "GDP-HMM (AAPM 2025 challenge)", "plan_id": plan_id, "patient_id": pid,
        "meta": {"site": meta.site, "cohort": meta.cohort, "phase": meta.phase} if meta else None,
        "levels": [{"level": lv.level, "opt_name": lv.opt_name, "struct_name": lv.struct_name,
                    "pdose_gy": lv.pdose_gy, "target": case_name(lv.target)} for lv in levels],
        "normalisation": {"structure": norm_name, "pdose_gy": levels[0].pdose_gy,
                          "d97_scale": scale, "applied": bool(normalise_d97 and scale is not None)},
        "dose_scale": dose_scale, "is_vmat": bool(is_vmat), "angle_list": [float(a) for a in angles],
        "isocenter_voxel_zyx": [float(v) for v in iso], "isocenter_mm_xyz": [float(v) for v in iso_mm],
        "spacing_xyz": list(spacing), "spacing_source": spacing_src,
        "structures": {k: v for k, v in names.items() if k != v},
        "assumed": {"fractions": f"PDose(PTV_High) / {GY_PER_FRACTION:g} Gy, rounded (not in the files)",
                    "energy_mv": ENERGY_MV},
    }
    return Converted(ct, masks, dose, plan, spacing, origin, direction, info)
