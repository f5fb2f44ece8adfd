"""``addiff data import-dicom SRC OUT``: DICOM-RT exports -> case folders, one per patient.

Per patient (:mod:`.scan`) one consistent set: the RTPLAN (the one an RTDOSE refers to), its
RTSTRUCT, that structure set's CT series and the PLAN dose on the same frame of reference. Written
with :func:`case_io.save_case`: the CT in HU, every closed-planar ROI as a mask (names through
:class:`.names.NameMapper`), the dose in Gy on the CT grid (linear, 0 outside its grid), plan.yaml
(RTPLAN, else the mapping file) and ``dicom.yaml``, the identifiers needed to send results back,
which stays at the hospital like the images. A patient that fails is skipped with one line naming
the file; a case is written beside its folder and moved into place, so nothing is half-written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import SimpleITK as sitk
import yaml

from ..case_io import BODY_NAME, only_case_entries, plan_from_dict, save_case, staged_case_dir
from ..contract import OAR_NAMES, TUMOUR_SITES
from ..errors import CaseError
from .contours import contours_to_mask
from .mapping import ImportMapping
from .names import NameMapper, infer_tumour_site, site_from_text, unsupported_site
from .prescriptions import Roi, prescriptions
from .rtplan import read_rtplan
from .scan import DicomFile, PatientFiles, scan_folder
from .volumes import DicomDataError, dose_on_grid, read_ct_series, read_rtdose

__all__ = ["PatientResult", "ImportSummary", "import_patient", "import_dicom", "DICOM_INFO_FILE"]

DICOM_INFO_FILE = "dicom.yaml"


@dataclass
class PatientResult:
    name: str
    patient_id: str
    case_dir: Path | None = None
    reason: str | None = None  # why the patient was skipped
    summary: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportSummary:
    results: list[PatientResult]
    non_dicom: list[Path]
    unused: list[tuple[Path, str]]

    @property
    def imported(self) -> list[PatientResult]:
        return [r for r in self.results if r.case_dir is not None]

    @property
    def skipped(self) -> list[PatientResult]:
        return [r for r in self.results if r.case_dir is None]


class _PackedMasks(Mapping):
    """Masks kept bit-packed (a 512x512x200 CT has 50 MB per bool mask) and unpacked one at a time
    as uint8 when read, e.g. by ``save_case`` while it writes them."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self._bits: dict[str, np.ndarray] = {}

    def add(self, name: str, mask: np.ndarray) -> None:
        self._bits[name] = np.packbits(mask, axis=None)

    def __getitem__(self, name: str) -> np.ndarray:
        n = int(np.prod(self.shape))
        return np.unpackbits(self._bits[name], count=n).reshape(self.shape)

    def __contains__(self, name: object) -> bool:
        return name in self._bits

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)


def _uid(ds, key: str) -> str:
    return str(ds.get(key, "") or "")


def _ref_uid(ds, seq: str) -> str | None:
    items = ds.get(seq) or []
    return str(items[0].ReferencedSOPInstanceUID) if items and "ReferencedSOPInstanceUID" in items[0] else None


def _structure_refs(ds) -> tuple[str | None, str | None]:
    """(frame of reference UID, CT SeriesInstanceUID) an RTSTRUCT refers to."""
    for_uid = series_uid = None
    for fr in ds.get("ReferencedFrameOfReferenceSequence") or []:
        for_uid = for_uid or _uid(fr, "FrameOfReferenceUID") or None
        for st in fr.get("RTReferencedStudySequence") or []:
            for se in st.get("RTReferencedSeriesSequence") or []:
                series_uid = series_uid or _uid(se, "SeriesInstanceUID") or None
    if for_uid is None:
        for roi in ds.get("StructureSetROISequence") or []:
            for_uid = _uid(roi, "ReferencedFrameOfReferenceUID") or None
            if for_uid:
                break
    return for_uid, series_uid


def _unique(files: list[DicomFile], notes: list[str]) -> list[DicomFile]:
    """One file per SOPInstanceUID: a second copy of the same object (an export made twice) is left out."""
    seen: dict[str, DicomFile] = {}
    out = []
    for f in files:
        uid = _uid(f.ds, "SOPInstanceUID")
        if uid and uid in seen:
            notes.append(f"{f.path.name}: the same {f.kind} as {seen[uid].path.name} (SOPInstanceUID {uid}): "
                         f"copy left out")
            continue
        seen.setdefault(uid, f)
        out.append(f)
    return out


def _no_plan(pf: PatientFiles) -> DicomDataError:
    """CT + RTSTRUCT without an RTPLAN is refused: the model is conditioned on the beams (beam plate
    and beam rows), which only an RTPLAN gives and every case must have (a mapping file cannot)."""
    found = ", ".join(f"{len(pf.of(k))} {k}" for k in ("CT", "RTSTRUCT", "RTDOSE") if pf.of(k))
    return DicomDataError(pf.files[0].path.parent, f"no RTPLAN among the patient's files ({found}): the model needs "
                                                   f"the plan's beams (gantry, couch, energy), which a mapping file "
                                                   f"cannot give; export the RTPLAN with the structure set")


def _choose(pf: PatientFiles, notes: list[str]) -> tuple[DicomFile, DicomFile, list[DicomFile], list[DicomFile]]:
    """-> (RTPLAN, RTSTRUCT, CT slices, RTDOSE candidates) of one patient."""
    pf = PatientFiles(pf.patient_id, pf.name, _unique(pf.files, notes))
    plans, structs, doses = pf.of("RTPLAN"), pf.of("RTSTRUCT"), pf.of("RTDOSE")
    where = pf.files[0].path.parent
    if not plans:
        raise _no_plan(pf)
    if len(plans) > 1:
        dosed = {_ref_uid(d.ds, "ReferencedRTPlanSequence") for d in doses}
        plans = [p for p in plans if _uid(p.ds, "SOPInstanceUID") in dosed] or plans
        if len(plans) > 1:
            raise DicomDataError(where, f"{len(plans)} RTPLANs ({', '.join(p.path.name for p in plans)}) and no RTDOSE "
                                        f"telling which one: keep one plan per patient folder")
    plan = plans[0]
    if not structs:
        raise DicomDataError(where, "no RTSTRUCT among the patient's files (targets and organs come from it)")
    wanted = _ref_uid(plan.ds, "ReferencedStructureSetSequence")
    chosen = [s for s in structs if _uid(s.ds, "SOPInstanceUID") == wanted]
    if not chosen:
        if len(structs) > 1:
            raise DicomDataError(plan.path, f"refers to structure set {wanted}, which is not among the "
                                            f"{len(structs)} RTSTRUCTs found: keep the plan's structure set")
        if wanted:
            notes.append(f"{plan.path.name}: refers to structure set {wanted}; using the only RTSTRUCT, {structs[0].path.name}")
        chosen = structs
    struct = chosen[0]
    series: dict[str, list[DicomFile]] = {}
    for f in pf.of("CT"):
        series.setdefault(_uid(f.ds, "SeriesInstanceUID"), []).append(f)
    if not series:
        raise DicomDataError(where, "no CT image series among the patient's files")
    for_uid, series_uid = _structure_refs(struct.ds)
    ct_uid = series_uid if series_uid in series else None
    if ct_uid is None:
        same_for = [u for u, fs in series.items() if _uid(fs[0].ds, "FrameOfReferenceUID") == for_uid]
        if len(series) == 1:
            ct_uid = next(iter(series))
        elif len(same_for) == 1:
            ct_uid = same_for[0]
        else:
            raise DicomDataError(struct.path, f"{len(series)} CT series found and the RTSTRUCT does not tell which one "
                                              f"it was drawn on: keep one CT series per patient folder")
    for u, fs in series.items():
        if u != ct_uid:
            notes.append(f"CT series {u} ({len(fs)} file(s), e.g. {fs[0].path.name}) not used: the structures "
                         f"were drawn on series {ct_uid}")
    ct_for = _uid(series[ct_uid][0].ds, "FrameOfReferenceUID")
    if for_uid and ct_for and for_uid != ct_for:
        raise DicomDataError(struct.path, f"RTSTRUCT is on frame of reference {for_uid} but its CT series is on "
                                          f"{ct_for}: the contours are not in the CT's coordinates")
    return plan, struct, series[ct_uid], doses


def _pick_dose(doses: list[DicomFile], plan_uid: str, ct_for: str, notes: list[str]) -> DicomFile | None:
    usable = []
    for d in doses:
        d_for = _uid(d.ds, "FrameOfReferenceUID")
        if d_for and ct_for and d_for != ct_for:
            notes.append(f"{d.path.name}: RTDOSE on another frame of reference ({d_for}): not imported")
        else:
            usable.append(d)
    plan_doses = [d for d in usable if str(d.ds.get("DoseSummationType", "")).upper() == "PLAN"]
    mine = [d for d in plan_doses if _ref_uid(d.ds, "ReferencedRTPlanSequence") in (plan_uid, None)]
    pick = mine or plan_doses or (usable if len(usable) == 1 else [])
    if not pick:
        if usable:
            notes.append(f"{len(usable)} RTDOSE(s) and none is the plan dose (DoseSummationType PLAN): dose not imported")
        return None
    if len(pick) > 1:
        notes.append(f"{len(pick)} plan doses; using {pick[0].path.name}")
    return pick[0]


def _rois(struct: DicomFile) -> list[tuple[int, str, str, list[np.ndarray], int]]:
    """-> [(ROI number, name, interpreted type, closed planar contours, other contours)]."""
    ds = struct.ds
    names = {int(r.ROINumber): str(r.get("ROIName", "") or f"ROI{r.ROINumber}")
             for r in ds.get("StructureSetROISequence") or [] if "ROINumber" in r}
    types = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "")
             for o in ds.get("RTROIObservationsSequence") or [] if "ReferencedROINumber" in o}
    out = []
    for rc in ds.get("ROIContourSequence") or []:
        num = int(rc.get("ReferencedROINumber", -1))
        closed, other = [], 0
        for c in rc.get("ContourSequence") or []:
            data = c.get("ContourData")
            if str(c.get("ContourGeometricType", "")).upper() == "CLOSED_PLANAR" and data is not None and len(data) >= 9:
                closed.append(np.asarray([float(v) for v in data], dtype=np.float64).reshape(-1, 3))
            else:
                other += 1
        out.append((num, names.get(num, f"ROI{num}"), types.get(num, ""), closed, other))
    return out


def _same_patient(case_dir: Path, patient_id: str, plan_uid: str) -> bool:
    """Whether ``case_dir`` is an earlier import of this patient's plan (its ``dicom.yaml`` names
    the same PatientID and RTPLAN): only then may a new import replace it."""
    from ..config import ConfigError, load_yaml  # the one safe loader

    if not patient_id or not plan_uid or case_dir.is_symlink() or not only_case_entries(case_dir, {DICOM_INFO_FILE}):
        return False
    try:
        info = load_yaml(case_dir / DICOM_INFO_FILE)
    except ConfigError:
        return False
    if not isinstance(info, dict):
        return False
    patient, plan = info.get("patient"), info.get("rtplan")
    return (isinstance(patient, dict) and isinstance(plan, dict) and str(patient.get("PatientID", "")) == patient_id
            and str(plan.get("SOPInstanceUID", "")) == plan_uid)


def _case_folder(out_root: Path, name: str, patient_id: str, plan_uid: str, notes: list[str]) -> Path:
    """The case folder of this patient's plan: ``OUT/<name>``, unless that holds something else
    (another patient with the same folder name in another export, a case not from DICOM): then
    the first free ``<name>_N``. A patient is never replaced by another one (#29); re-importing
    the same plan of the same patient replaces its earlier import."""
    for n in range(1, 10000):
        cand = out_root / (name if n == 1 else f"{name}_{n}")
        if not os.path.lexists(cand) or _same_patient(cand, patient_id, plan_uid):
            if n > 1:
                notes.append(f"{out_root / name} holds another patient or case: this one (PatientID "
                             f"{patient_id or '?'}) is written to {cand.name}")
            return cand
    raise CaseError(out_root / name, ".", "taken, and so are its numbered alternatives; not overwriting")


def _site(mapping: ImportMapping, pf: PatientFiles, treatment_site: str, rois: list[Roi], where: Path) -> str | None:
    """The tumour site: the mapping file's for the patient, the plan's TreatmentSite, the mapping
    file's default, or the structures (None: they do not tell). Breast and brain are not sites the
    model knows: a plan that names them, or structures that point to them, are refused with a
    mapping hint rather than guessed (a breast plan's heart and lung would make it 'lung')."""
    own = mapping.patients.get(pf.patient_id) or mapping.patients.get(pf.name)
    site = (own.tumour_site if own else None) or site_from_text(treatment_site) or mapping.defaults.tumour_site
    if site:
        return site
    other = unsupported_site([r.original for r in rois], treatment_site)
    if other:
        raise DicomDataError(where, f"looks like a {other[0]} case ({', '.join(other[1][:4])}), a tumour site the model "
                                    f"does not know ({', '.join(TUMOUR_SITES)}): give `tumour_site` in the mapping "
                                    f"file (--map) to import it as one of them")
    return infer_tumour_site({r.name for r in rois})


def import_patient(pf: PatientFiles, out_root: Path, mapping: ImportMapping,
                   res: PatientResult | None = None) -> PatientResult:
    """Import one patient; raises DicomDataError / CaseError for a patient that cannot be used
    (the notes gathered until then stay in ``res.notes``)."""
    res = res or PatientResult(pf.name, pf.patient_id)
    notes = res.notes
    plan_f, struct_f, ct_files, doses = _choose(pf, notes)
    info = read_rtplan(plan_f.ds, plan_f.path)
    notes.extend(f"{plan_f.path.name}: {n}" for n in info.notes)
    defaults = mapping.for_patient(pf.patient_id, pf.name)
    mapped_rx = defaults.prescriptions or {}
    mapper = NameMapper(mapping.structure_names, doses=[*info.doses, *mapped_rx.values(), *([info.beam_dose] if info.beam_dose else [])])
    listed = [(num, name, kind, contours, other, *mapper(name, kind)) for num, name, kind, contours, other in _rois(struct_f)]
    site = _site(mapping, pf, info.treatment_site,  # breast/brain refused before the CT is read
                 [Roi(num, target, name, kind) for num, name, kind, _, _, target, _ in listed if target], struct_f.path)
    ct, ct_headers = read_ct_series([(f.path, f.ds) for f in ct_files])
    ct_for = _uid(ct_headers[0], "FrameOfReferenceUID")
    masks = _PackedMasks(sitk.GetArrayViewFromImage(ct).shape)
    rois: list[Roi] = []
    original: dict[str, str] = {}
    unknown = []
    for num, name, kind, contours, other, target, known in listed:
        if target is None:
            continue
        if not contours:
            if other:
                notes.append(f"ROI {name!r}: only point/open contours, no volume: left out")
            continue
        mask, cnotes = contours_to_mask(contours, ct)
        notes.extend(f"ROI {name!r}: {n}" for n in cnotes)
        if not mask.any():
            notes.append(f"ROI {name!r}: no voxel centre inside its contours on the CT grid: left out")
            continue
        if target in masks:
            n = 2
            while f"{target}_{n}" in masks:
                n += 1
            notes.append(f"ROI {name!r} maps to {target}, which {original[target]!r} already has: kept as {target}_{n}")
            target = f"{target}_{n}"
        masks.add(target, mask)
        rois.append(Roi(num, target, name, kind))
        original[target] = name
        if not known:
            unknown.append(target)
    if not masks:
        raise DicomDataError(struct_f.path, "no ROI with closed planar contours on the CT")
    dose_arr, dose_f = None, _pick_dose(doses, _uid(plan_f.ds, "SOPInstanceUID"), ct_for, notes)
    if dose_f is not None:
        try:
            dose_arr = sitk.GetArrayFromImage(dose_on_grid(read_rtdose(dose_f.path), ct)).astype(np.float32)
        except DicomDataError as e:
            notes.append(f"{e}: dose not imported (the case can still be predicted)")
            dose_f = None
    median = None if dose_arr is None else (lambda name: float(np.median(dose_arr[masks[name].astype(bool)])))
    rx, rx_source = prescriptions(info, rois, mapped_rx or None, notes, plan_f.path, mapping.source, median)
    kept = [u for u in unknown if u not in rx]
    if kept:
        notes.append(f"structures kept under their own names (not used by the model): {', '.join(kept)}")
    fractions = info.fractions or defaults.fractions
    if not fractions:
        raise DicomDataError(plan_f.path, "number of fractions unknown (no FractionGroupSequence): give `fractions` "
                                          "in the mapping file (--map)")
    if site is None:
        raise DicomDataError(struct_f.path, "tumour site unknown (the structures do not tell): give `tumour_site` "
                                            "in the mapping file (--map)")
    plan = plan_from_dict({"tumour_site": site, "prescriptions": rx, "fractions": int(fractions),
                           "technique": "VMAT" if any(b.is_arc for b in info.beams) else "IMRT",
                           "beams": [b.to_dict() for b in info.beams]}, pf.name)
    out_dir = _case_folder(out_root, pf.name, pf.patient_id, _uid(plan_f.ds, "SOPInstanceUID"), notes)
    with staged_case_dir(out_dir) as tmp:
        save_case(tmp, sitk.GetArrayFromImage(ct), plan, masks,
                  dose=dose_arr, spacing=ct.GetSpacing(), origin=ct.GetOrigin(), direction=ct.GetDirection())
        first = ct_headers[0]
        info_doc = {
            "source": "DICOM-RT import (addiff data import-dicom)",
            "patient": {k: str(first.get(k, "") or "") for k in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")},
            "study": {k: str(first.get(k, "") or "") for k in ("StudyInstanceUID", "StudyID", "StudyDate", "StudyTime",
                                                                 "AccessionNumber")},
            "frame_of_reference_uid": ct_for,
            "ct_series": {"SeriesInstanceUID": _uid(first, "SeriesInstanceUID"), "SOPClassUID": _uid(first, "SOPClassUID"),
                          "sop_instance_uids": [_uid(h, "SOPInstanceUID") for h in ct_headers]},
            "rtstruct": {"SOPInstanceUID": _uid(struct_f.ds, "SOPInstanceUID"), "file": struct_f.path.name},
            "rtplan": {"SOPInstanceUID": _uid(plan_f.ds, "SOPInstanceUID"), "SOPClassUID": _uid(plan_f.ds, "SOPClassUID"),
                       "RTPlanLabel": info.label, "file": plan_f.path.name},
            "rtdose": {"SOPInstanceUID": _uid(dose_f.ds, "SOPInstanceUID"), "file": dose_f.path.name} if dose_f else None,
            "structure_names": {k: original[k] for k in sorted(masks)},
        }
        (tmp / DICOM_INFO_FILE).write_text(yaml.safe_dump(info_doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    res.case_dir = out_dir
    canon = [m for m in masks if m in OAR_NAMES]
    nx, ny, nz = ct.GetSize()
    res.summary = (f"CT {nx}x{ny}x{nz} ({'x'.join(f'{s:.3g}' for s in ct.GetSpacing())} mm), {len(masks)} structures "
                   f"({len(canon)} model OARs{', Body' if BODY_NAME in masks else ''}), "
                   f"{'dose' if dose_arr is not None else 'no dose'}, {len(info.beams)} {plan.technique} beam(s), "
                   f"{', '.join(f'{k} {v:g} Gy' for k, v in plan.prescriptions.items())} ({rx_source}) in {plan.fractions} fx, "
                   f"{plan.tumour_site}")
    return res


def import_dicom(src: str | Path, out: str | Path, mapping: ImportMapping | None = None,
                 echo: Callable[[str], None] | None = print) -> ImportSummary:
    """Import every patient under ``src`` into ``out``; a bad patient is skipped with its reason.
    ``mapping``: the site's mapping file (None: defaults); ``echo``: progress lines (None: quiet)."""
    from ..checks import check_case

    src, out = Path(src), Path(out)
    mapping = mapping or ImportMapping()
    scan = scan_folder(src)
    say = echo or (lambda s: None)
    if scan.skipped:  # hidden folders, FIFOs, devices, links out of src: named, never read
        say(scan.skipped_line(src))
    if not scan.patients:  # nothing to import: the caller says so in one line
        return ImportSummary([], scan.non_dicom, scan.unused)
    results = []
    for i, pf in enumerate(scan.patients, 1):
        head = f"[{i}/{len(scan.patients)}] {pf.name} (PatientID {pf.patient_id or '?'})"
        res = PatientResult(pf.name, pf.patient_id)
        try:
            import_patient(pf, out, mapping, res)
        except (DicomDataError, CaseError, ValueError, OSError) as e:
            res.case_dir, res.reason = None, str(e)  # its notes say what was found: printed below
        except Exception as e:  # noqa: BLE001 - one broken patient never stops the import
            res.case_dir, res.reason = None, f"unexpected error: {type(e).__name__}: {e}"
        if res.case_dir is not None:
            res.notes.extend(f"check: {p.file}: {p.message}" for p in check_case(res.case_dir))
            say(f"{head}: imported -> {res.case_dir}: {res.summary}")
        else:
            say(f"{head}: SKIPPED: {res.reason}")
        for n in res.notes:
            say(f"    note: {n}")
        results.append(res)
    if scan.non_dicom:
        shown = ", ".join(str(p.relative_to(src) if src.is_dir() else p.name) for p in scan.non_dicom[:5])
        say(f"ignored {len(scan.non_dicom)} non-DICOM file(s): {shown}{', ...' if len(scan.non_dicom) > 5 else ''}")
    if scan.unused:
        kinds: dict[str, int] = {}
        for _, k in scan.unused:
            kinds[k] = kinds.get(k, 0) + 1
        say(f"ignored {len(scan.unused)} DICOM object(s) not used for cases: "
            + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
    summary = ImportSummary(results, scan.non_dicom, scan.unused)
    say(f"imported {len(summary.imported)} of {len(results)} patient(s) into {out}; {len(summary.skipped)} skipped")
    return summary
