"""One phantom case (:func:`synth_case`: anatomy, couch, bone, scanner, plan, dose) and a folder
of phantom hospitals written to disk (:func:`write_synthetic_sites`)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml
from scipy import ndimage

from ..case_io import Plan, save_case
from ..config import new_site_doc
from ..contract import TUMOUR_SITES
from .body import HU, Anatomy
from .canvas import Canvas
from .dose import phantom_dose
from .head_neck import head_neck
from .hospitals import (DEFAULT_SCHEMES, HospitalProfile, as_profile, default_spacing, grid_shape, hospital_profile,
                        make_plan, site_name)
from .lung import lung
from .prostate import prostate

ANATOMY = {"head_neck": head_neck, "lung": lung, "prostate": prostate}
SYNTH_MARKER = "addiff-synth.json"  # in every site folder the generator wrote (and only there)
SITE_FILE_HEADER = "# Synthetic phantom hospital"  # the first line of every site file it wrote


def _scanner_ct(cv: Canvas, rng: np.random.Generator, anat: Anatomy, prof: HospitalProfile) -> np.ndarray:
    """The CT (int16 HU) of an anatomy: treatment couch, cancellous and cortical bone, soft-tissue
    texture, then the scanner's resolution blur, calibration offset and noise."""
    shape = cv.shape
    hu = anat.hu
    # treatment couch: a carbon-fibre slab under the patient
    couch = (cv.Y >= anat.couch_y) & (cv.Y <= anat.couch_y + 12.0) & (np.abs(cv.X) < 260.0) & (hu <= -900)
    couch = np.broadcast_to(couch, shape)
    hu[couch] = HU["couch"]
    # bone: cancellous inside, cortical rim
    if anat.bone.any():
        core = ndimage.binary_erosion(anat.bone)
        rim = anat.bone & ~core
        hu[rim] = HU["cortical"]
        hu[core] = HU["bone"] + 60.0 * cv.smooth_noise(8.0)[core]
    soft = anat.body & (hu > -300) & (hu < 200)
    hu[soft] += 12.0 * cv.smooth_noise(12.0)[soft]
    # scanner: resolution blur, calibration offset, noise
    hu = ndimage.gaussian_filter(hu, 0.5)
    hu += np.float32(prof.hu_offset)
    hu += rng.normal(0.0, prof.noise_sd, shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def synth_case(rng: np.random.Generator, tumour_site: str, size: int | Sequence[int] = 32,
               spacing: Sequence[float] | None = None, hospital_profile: HospitalProfile | str | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, Plan, np.ndarray]:
    """One phantom case: ``(ct_hu int16, masks {name: bool}, dose Gy float32, plan, possible_dose_mask)``.

    All arrays are (z, y, x) on the same grid of ``size`` (int: a cube) with ``spacing`` (x, y, z)
    mm (None: :func:`default_spacing`). Masks: the plan's PTVs, the tumour site's OARs (canonical
    ``contract.OAR_NAMES``) and ``Body``; ``possible_dose_mask`` is the body.
    """
    if tumour_site not in TUMOUR_SITES:
        raise ValueError(f"tumour_site must be one of {', '.join(TUMOUR_SITES)}, got {tumour_site!r}")
    prof = as_profile(hospital_profile)
    shape = grid_shape(size)
    spacing = default_spacing(tumour_site, shape, prof) if spacing is None else tuple(float(s) for s in spacing)
    opts = prof.schemes.get(tumour_site) or DEFAULT_SCHEMES[tumour_site]
    fx, rx1, rx2 = opts[int(rng.integers(len(opts)))]
    if tumour_site == "prostate" and rx2 is not None and rng.random() >= prof.secondary_prob:
        rx2 = None
    cv = Canvas(shape, spacing, rng)
    anat = ANATOMY[tumour_site](cv, rng, prof, (rx1, rx2))
    ct = _scanner_ct(cv, rng, anat, prof)
    tx = float(np.mean(cv.x[np.nonzero(anat.targets[0][1])[2]]))
    plan = make_plan(rng, tumour_site, prof, target_x_mm=tx, scheme=(fx, rx1, rx2),
                     targets={n: r for n, _, r in anat.targets})
    masks = {n: m for n, m, _ in anat.targets}
    masks.update(anat.masks)
    masks["Body"] = anat.body.copy()
    for k in masks:
        masks[k] = np.ascontiguousarray(masks[k] & anat.body)
    dose = phantom_dose(ct, masks, plan, spacing, anat.body, margin_mm=prof.margin_mm, sparing=prof.sparing,
                        penumbra_mm=prof.penumbra_mm)
    return ct, masks, dose, plan, anat.body.copy()


def _allocate(mix: Sequence[float], n: int, rng: np.random.Generator) -> list[str]:
    """Tumour sites for n cases in proportion to ``mix`` (largest remainder), shuffled."""
    p = np.asarray(mix, float) / float(np.sum(mix))
    counts = np.floor(p * n).astype(int)
    rem = p * n - counts
    for i in np.argsort(-rem, kind="stable")[: n - int(counts.sum())]:
        counts[i] += 1
    sites = [TUMOUR_SITES[i] for i, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(sites)
    return sites


def _write_site_files(out_dir: Path, name: str, prof: HospitalProfile, sites: list[str], seed: int, si: int,
                      size: int) -> Path:
    """``out_dir/<site>/profile.yaml`` (the hospital) and ``out_dir/<site>.yaml`` (its site file)."""
    prof_d = asdict(prof)
    prof_d["schemes"] = {k: [list(v) for v in vs] for k, vs in prof.schemes.items()}
    prof_d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in prof_d.items()}
    prof_d["cases"] = {t: sites.count(t) for t in TUMOUR_SITES}
    (out_dir / name / "profile.yaml").write_text(yaml.safe_dump(prof_d, sort_keys=False), encoding="utf-8")
    site = new_site_doc(name, {"fraction": 0.25, "seed": int(seed)}, seed=int(seed) + si)
    header = (f"{SITE_FILE_HEADER} ({name}): {prof.description}.\n"
              f"# Written by addiff_core.synth.write_synthetic_sites(seed={seed}, size={size}).\n")
    p = out_dir / f"{name}.yaml"
    p.write_text(header + yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
    return p


def _refuse_existing(out_dir: Path, names: list[str]) -> None:
    """Nothing is written over: a site folder or site file already there (an earlier synth, edited
    site files) is kept, and the run stops before writing anything (one line)."""
    from ..config import ConfigError

    for name in names:
        for p in (out_dir / name, out_dir / f"{name}.yaml"):
            if os.path.lexists(p):
                raise ConfigError(f"{out_dir}: already holds {p.name}; kept (synthetic hospitals are never written "
                                  "over existing ones): choose another --out or remove it")


def write_synthetic_sites(out_dir: str | Path, n_sites: int = 3, cases_per_site: int = 4, size: int = 32,
                          seed: int = 0) -> list[Path]:
    """Write ``n_sites`` phantom hospitals under ``out_dir``, deterministic for ``seed``:
    ``<site>.yaml``, ``<site>/cases/<site>_NNN/``, ``<site>/profile.yaml`` and
    ``<site>/addiff-synth.json`` (:data:`SYNTH_MARKER`).

    Args:
        out_dir: the folder; n_sites, cases_per_site: how many; size: cube edge in voxels; seed: RNG.

    Returns:
        the site files.

    Raises:
        ConfigError: a site folder or file exists already (nothing is written).
    """
    out_dir = Path(out_dir)
    names = [site_name(si) for si in range(int(n_sites))]
    _refuse_existing(out_dir, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for si, name in enumerate(names):
        prof = replace(hospital_profile(si, seed), name=name)
        sites = _allocate(prof.site_mix, int(cases_per_site), np.random.default_rng([int(seed), si, 104729]))
        (out_dir / name).mkdir()
        (out_dir / name / SYNTH_MARKER).write_text(json.dumps(
            {"generator": "addiff_core.synth.write_synthetic_sites", "site": name, "seed": int(seed), "size": int(size),
             "cases": int(cases_per_site)}) + "\n", encoding="utf-8")
        case_root = out_dir / name / "cases"
        for ci, tsite in enumerate(sites):
            rng = np.random.default_rng([int(seed), si, ci])
            spacing = default_spacing(tsite, size, prof)
            ct, masks, dose, plan, pdm = synth_case(rng, tsite, size, spacing, prof)
            origin = tuple(-(n - 1) / 2.0 * sp for n, sp in zip(ct.shape[::-1], spacing))
            save_case(case_root / f"{name}_{ci:03d}", ct, plan, masks, dose=dose, possible_dose_mask=pdm,
                      spacing=spacing, origin=origin)
        paths.append(_write_site_files(out_dir, name, prof, sites, seed, si, size))
    return paths
