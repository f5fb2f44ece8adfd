"""Writing DICOM-RT: a case -> CT series, RTSTRUCT, RTPLAN and RTDOSE; a predicted dose -> RTDOSE.

Part 10 files of the standard storage SOP classes (Explicit VR Little Endian, Implicit where an
element is too long; each checked by :mod:`.validate`), one study and frame of reference per
export; RTSTRUCT -> every CT slice, RTPLAN -> RTSTRUCT, RTDOSE -> RTPLAN. ROIs keep the TPS's names,
contours their corner points at 0.01 mm. UIDs: :mod:`.objects` (root ``2.25.`` unless a hospital
passes its own, ``--uid-root`` or ``ADDIFF_UID_ROOT``). The RTPLAN carries geometry only (no MLC,
no monitor units): for the importer and viewers, not for delivery. ``possible_dose_mask.nii.gz``
has no DICOM-RT counterpart and is not written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from ..case_io import BODY_NAME, Case, load_case, read_dicom_info
from ..options import RTDOSE_GRID_MM
from .contours import index_to_patient, mask_to_contours
from .objects import (STUDY_SOP_CLASS, UID_ROOT, Identity, base_dataset, ds_number, new_uid, now, right_handed, save,
                      set_image_plane)
from .scan import SOP_CLASSES
from .validate import valid_or_empty

__all__ = ["UID_ROOT", "Identity", "new_uid", "export_case", "write_ct_series", "write_rtstruct", "write_rtplan",
           "write_rtdose", "write_predicted_rtdose", "dose_grid_option", "clinical_dose_grid",
           "roi_names"]

_COLOURS = ((255, 0, 0), (0, 160, 255), (0, 200, 0), (255, 200, 0), (200, 0, 255), (255, 120, 0), (0, 220, 200),
            (150, 90, 40), (255, 105, 180), (128, 128, 255))


def write_ct_series(ct: sitk.Image, out_dir: Path, ident: Identity, root: str | None) -> tuple[str, list[str]]:
    """One CT Image file per slice (int16 HU, slope 1) -> (SeriesInstanceUID, SOP instance UIDs by slice)."""
    hu = np.clip(np.rint(sitk.GetArrayFromImage(ct).astype(np.float64)), -32768, 32767).astype(np.int16)
    series_uid, uids = new_uid(root), []
    for k in range(hu.shape[0]):
        ds = base_dataset("CT", ident, series_uid, 1, "CT (exported by addiff-fl)", root, instance=k + 1)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.KVP = ""
        set_image_plane(ds, ct, k)
        ds.SliceLocation = ds_number(float(np.array(ds.ImagePositionPatient, dtype=float) @ np.array(ct.GetDirection()).reshape(3, 3)[:, 2]))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = np.ascontiguousarray(hu[k]).astype("<i2").tobytes()
        save(ds, out_dir / f"ct_{k + 1:04d}.dcm")
        uids.append(str(ds.SOPInstanceUID))
    return series_uid, uids


def _mm(v: float) -> str:
    """A coordinate as a DS rounded to 0.01 mm: far below any voxel (a voxel centre is >= 0.35
    voxel from the contour), and 6-8 characters instead of up to 16."""
    s = f"{float(v):.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _interpreted_type(name: str, targets) -> str:
    if name == BODY_NAME:
        return "EXTERNAL"
    up = name.upper()
    if name in targets or up.startswith("PTV"):
        return "PTV"
    return "CTV" if up.startswith("CTV") else "GTV" if up.startswith("GTV") else "ORGAN"


def roi_names(case: Case) -> dict[str, str]:
    """The ROIName of each mask: the TPS's original name kept in ``dicom.yaml`` (``Tumor Bed``, not
    ``Tumor_Bed``) when it is a valid, unique LO value, else the case's name."""
    kept = read_dicom_info(case.path).get("structure_names")
    kept = kept if isinstance(kept, dict) else {}
    out: dict[str, str] = {}
    for name in sorted(case.masks):
        orig = kept.get(name)
        ok = isinstance(orig, str) and orig.strip() and valid_or_empty("LO", orig) == orig
        out[name] = orig if ok and orig not in out.values() else name
    if len(set(out.values())) < len(out):  # an original equal to another mask's own name: own names
        out = {n: n for n in out}
    return out


def write_rtstruct(case: Case, ct: sitk.Image, ct_series_uid: str, ct_uids: list[str], path: Path, ident: Identity,
                   root: str | None) -> tuple[str, dict[str, int]]:
    """Every mask of the case as closed planar contours -> (SOPInstanceUID, ROI number by name)."""
    ds = base_dataset("RTSTRUCT", ident, new_uid(root), 2, "Structures (exported by addiff-fl)", root)
    date, time = now()
    ds.StructureSetLabel, ds.StructureSetName = "addiff", case.case_id[:64]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    image_refs = []
    for uid in ct_uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = SOP_CLASSES["CT"], uid
        image_refs.append(ref)
    series = Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = ct_series_uid, Sequence(image_refs)
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = STUDY_SOP_CLASS, ident.study_uid
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = ident.for_uid, Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    rois, contours_seq, observations, numbers = [], [], [], {}
    flip = np.linalg.det(np.array(case.ct.GetDirection()).reshape(3, 3)) < 0
    tps_names = roi_names(case)
    for i, name in enumerate(sorted(case.masks), start=1):
        numbers[name] = i
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = i, ident.for_uid, tps_names[name]
        roi.ROIGenerationAlgorithm = "MANUAL"
        rois.append(roi)
        mask = case.array(name)
        items = []
        for k, pts in mask_to_contours(mask[::-1] if flip else mask, ct):
            c = Dataset()
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = SOP_CLASSES["CT"], ct_uids[k]
            c.ContourImageSequence = Sequence([ref])
            c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", len(pts)
            c.ContourData = [_mm(v) for v in pts.ravel()]
            items.append(c)
        rc = Dataset()
        rc.ROIDisplayColor = list(_COLOURS[(i - 1) % len(_COLOURS)])
        rc.ReferencedROINumber = i
        if items:
            rc.ContourSequence = Sequence(items)
        contours_seq.append(rc)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = i, i
        obs.RTROIInterpretedType, obs.ROIInterpreter = _interpreted_type(name, case.plan.prescriptions), ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours_seq)
    ds.RTROIObservationsSequence = Sequence(observations)
    save(ds, path)
    return str(ds.SOPInstanceUID), numbers


def _control_points(beam, isocentre) -> list[Dataset]:
    span = ((beam.gantry_stop - beam.gantry) % 360.0 or 360.0) if beam.is_arc else 0.0
    n = 2 if not beam.is_arc else int(np.ceil(span / 90.0)) + 1
    cps = []
    for j in range(n):
        cp = Dataset()
        cp.ControlPointIndex = j
        cp.CumulativeMetersetWeight = ds_number(j / (n - 1))
        if j == 0:
            cp.NominalBeamEnergy = ds_number(beam.energy_mv)
            cp.GantryAngle = ds_number(beam.gantry % 360.0)
            cp.GantryRotationDirection = "CW" if beam.is_arc else "NONE"
            cp.BeamLimitingDeviceAngle, cp.BeamLimitingDeviceRotationDirection = ds_number(0), "NONE"
            cp.PatientSupportAngle, cp.PatientSupportRotationDirection = ds_number(beam.couch % 360.0), "NONE"
            cp.TableTopEccentricAngle, cp.TableTopEccentricRotationDirection = ds_number(0), "NONE"
            cp.IsocenterPosition = [ds_number(v) for v in isocentre]
            jaws = []
            for kind in ("ASYMX", "ASYMY"):
                j_ds = Dataset()
                j_ds.RTBeamLimitingDeviceType, j_ds.LeafJawPositions = kind, [ds_number(-50), ds_number(50)]
                jaws.append(j_ds)
            cp.BeamLimitingDevicePositionSequence = Sequence(jaws)
        elif beam.is_arc:
            cp.GantryAngle = ds_number((beam.gantry + span * j / (n - 1)) % 360.0)
            if j == n - 1:
                cp.GantryRotationDirection = "NONE"
        cps.append(cp)
    return cps


def write_rtplan(case: Case, struct_uid: str, roi_numbers: dict[str, int], path: Path, ident: Identity,
                 root: str | None) -> str:
    """The case's plan.yaml as an RTPLAN (geometry only) -> SOPInstanceUID."""
    plan = case.plan
    ds = base_dataset("RTPLAN", ident, new_uid(root), 3, "Plan geometry (exported by addiff-fl)", root)
    date, time = now()
    ds.RTPlanLabel, ds.RTPlanName = case.case_id[:16], case.case_id[:64]
    ds.RTPlanDate, ds.RTPlanTime = date, time
    ds.RTPlanGeometry = "PATIENT"
    ds.RTPlanDescription = "beam geometry and prescription only (no MLC, no monitor units): exported by addiff-fl"
    ds.TreatmentSite = plan.tumour_site
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = SOP_CLASSES["RTSTRUCT"], struct_uid
    ds.ReferencedStructureSetSequence = Sequence([ref])
    refs, names = [], roi_names(case)
    for i, target in enumerate(plan.targets, start=1):
        dr = Dataset()
        dr.DoseReferenceNumber, dr.DoseReferenceUID = i, new_uid(root)
        dr.DoseReferenceStructureType, dr.DoseReferenceDescription = "VOLUME", names.get(target, target)[:64]
        if target in roi_numbers:
            dr.ReferencedROINumber = roi_numbers[target]
        dr.DoseReferenceType, dr.TargetPrescriptionDose = "TARGET", ds_number(plan.prescriptions[target])
        refs.append(dr)
    ds.DoseReferenceSequence = Sequence(refs)
    setup = Dataset()
    setup.PatientPosition, setup.PatientSetupNumber = "HFS", 1
    ds.PatientSetupSequence = Sequence([setup])
    target = case.array(plan.targets[0])
    idx = np.argwhere(target)[:, ::-1].mean(axis=0) if target.any() else (np.array(case.ct.GetSize()) - 1) / 2.0
    isocentre = index_to_patient(case.ct, idx[None, :])[0]
    beams, beam_refs = [], []
    for n, b in enumerate(plan.beams, start=1):
        bd = Dataset()
        bd.TreatmentMachineName, bd.PrimaryDosimeterUnit, bd.SourceAxisDistance = "addiff", "MU", ds_number(1000)
        devices = []
        for kind in ("ASYMX", "ASYMY"):
            dv = Dataset()
            dv.RTBeamLimitingDeviceType, dv.NumberOfLeafJawPairs = kind, 1
            devices.append(dv)
        bd.BeamLimitingDeviceSequence = Sequence(devices)
        bd.BeamNumber = n
        bd.BeamName = (f"Arc {n}" if b.is_arc else f"Field {n}")
        bd.BeamType, bd.RadiationType = ("DYNAMIC" if b.is_arc else "STATIC"), "PHOTON"
        bd.TreatmentDeliveryType = "TREATMENT"
        bd.NumberOfWedges = bd.NumberOfCompensators = bd.NumberOfBoli = bd.NumberOfBlocks = 0
        bd.FinalCumulativeMetersetWeight = ds_number(1)
        cps = _control_points(b, isocentre)
        bd.NumberOfControlPoints, bd.ControlPointSequence = len(cps), Sequence(cps)
        bd.ReferencedPatientSetupNumber = 1
        beams.append(bd)
        rb = Dataset()
        rb.ReferencedBeamNumber = n
        beam_refs.append(rb)
    group = Dataset()
    group.FractionGroupNumber, group.NumberOfFractionsPlanned = 1, int(plan.fractions)
    group.NumberOfBeams, group.NumberOfBrachyApplicationSetups = len(beams), 0
    group.ReferencedBeamSequence = Sequence(beam_refs)
    ds.FractionGroupSequence = Sequence([group])
    ds.BeamSequence = Sequence(beams)
    ds.ApprovalStatus = "UNAPPROVED"
    save(ds, path)
    return str(ds.SOPInstanceUID)


def write_rtdose(dose: sitk.Image, path: Path, ident: Identity, root: str | None, *, plan_uid: str | None,
                 description: str, comment: str = "") -> Path:
    """A dose in Gy on its own grid -> an RTDOSE (uint32, DoseGridScaling; GY, PHYSICAL, PLAN).

    Args:
        dose: the dose image; path: the file; ident: patient/study identity; root: UID root.
        plan_uid: the RTPLAN referred to (None: none); description: SeriesDescription;
        comment: DoseComment (64 characters at most).

    Raises:
        ValueError: the dose holds NaN/inf (nothing written).
    """
    dose = right_handed(dose)
    gy = np.maximum(sitk.GetArrayFromImage(dose).astype(np.float64), 0.0)
    if not np.all(np.isfinite(gy)):
        raise ValueError(f"{path}: the dose holds NaN/inf values; not written")
    ds = base_dataset("RTDOSE", ident, new_uid(root), 4, description, root)
    set_image_plane(ds, dose, 0)
    nz = gy.shape[0]
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = [ds_number(k * dose.GetSpacing()[2]) for k in range(nz)]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    scaling = float(ds_number(max(float(gy.max()), 1e-6) / 4294967295.0 * (1 + 1e-9)))
    ds.DoseGridScaling = ds_number(scaling)
    if comment:
        ds.DoseComment = comment[:64]  # LO
    if plan_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = SOP_CLASSES["RTPLAN"], plan_uid
        ds.ReferencedRTPlanSequence = Sequence([ref])
    ds.PixelData = np.clip(np.rint(gy / scaling), 0, 4294967295).astype("<u4").tobytes()
    return save(ds, path)


def export_case(case_dir: str | Path, out_dir: str | Path, uid_root: str | None = None) -> dict[str, Path]:
    """Write a case folder as DICOM-RT into ``out_dir`` -> {what: path}; ``ct_0001.dcm`` ... one per
    slice, ``rtstruct.dcm``, ``rtplan.dcm`` and ``rtdose.dcm`` (when the case has a dose)."""
    from ..outputs import check_output_dir

    case = load_case(case_dir)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, results=(), overwrite=True, data_dirs=(Path(case_dir),))  # never into a case or data folder
    if out_dir.exists() and any(out_dir.glob("*.dcm")):  # a link named *.dcm counts: nothing is written through it
        raise FileExistsError(f"{out_dir}: already holds .dcm files; choose an empty folder")
    new_uid(uid_root)  # validates the root before anything is written
    ident = Identity.for_case(case, uid_root, keep_study=False)
    ct = right_handed(case.ct)
    series_uid, ct_uids = write_ct_series(ct, out_dir, ident, uid_root)
    written = {"ct": out_dir / "ct_0001.dcm"}
    struct_uid, numbers = write_rtstruct(case, ct, series_uid, ct_uids, out_dir / "rtstruct.dcm", ident, uid_root)
    written["rtstruct"] = out_dir / "rtstruct.dcm"
    plan_uid = write_rtplan(case, struct_uid, numbers, out_dir / "rtplan.dcm", ident, uid_root)
    written["rtplan"] = out_dir / "rtplan.dcm"
    if case.dose is not None:
        written["rtdose"] = write_rtdose(case.dose, out_dir / "rtdose.dcm", ident, uid_root, plan_uid=plan_uid,
                                         description="Dose (exported by addiff-fl)")
    return written


_GRID_BOUNDS_MM = (0.5, 10.0)


def dose_grid_option(text: str | None) -> float | None:
    """``predict --rtdose-grid``: ``ct`` (None: the CT's own grid) or a spacing in mm.

    Raises:
        UserError: anything else, in one line.
    """
    from ..errors import UserError

    t = str(RTDOSE_GRID_MM if text is None else text).strip().lower().removesuffix("mm")
    if t == "ct":
        return None
    try:
        mm = float(t)
    except ValueError:
        mm = float("nan")
    lo, hi = _GRID_BOUNDS_MM
    if not lo <= mm <= hi:
        raise UserError(f"--rtdose-grid: 'ct' or a dose grid spacing in mm from {lo:g} to {hi:g}, got {text!r}")
    return mm


def clinical_dose_grid(dose: sitk.Image, spacing_mm: float) -> sitk.Image:
    """``dose`` resampled (linear) onto an isotropic ``spacing_mm`` grid in the same orientation,
    covering the voxels with dose plus one grid step: what a TPS exports, a fraction of the CT grid."""
    a = sitk.GetArrayViewFromImage(dose)
    hot = np.argwhere(a > 0)
    lo, hi = (hot.min(axis=0), hot.max(axis=0)) if len(hot) else (np.zeros(3, int), np.array(a.shape) - 1)
    sp = np.array(dose.GetSpacing(), dtype=np.float64)
    lo_mm, hi_mm = lo[::-1] * sp - spacing_mm, hi[::-1] * sp + spacing_mm  # along the image axes (x, y, z)
    size = [int(np.ceil((h - l) / spacing_mm)) + 1 for l, h in zip(lo_mm, hi_mm)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([float(spacing_mm)] * 3)
    ref.SetDirection(dose.GetDirection())
    ref.SetOrigin(dose.TransformContinuousIndexToPhysicalPoint([float(v) for v in lo_mm / sp]))
    return sitk.Resample(dose, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def write_predicted_rtdose(dose: sitk.Image, case_dir: str | Path, path: str | Path, uid_root: str | None = None,
                           grid_mm: float | None = RTDOSE_GRID_MM) -> Path:
    """A predicted dose as an RTDOSE on the case's frame of reference. A case imported from DICOM
    (``dicom.yaml``) is referred to (patient, study, frame, RTPLAN), so a viewer places it on the
    original CT; other cases get a new study and frame (matching ``export-dicom`` by geometry only).

    Args:
        dose: Gy on the case's CT grid; case_dir: the case folder; path: the file to write.
        uid_root: the hospital's UID root (None: ``2.25.``).
        grid_mm: isotropic clinical dose grid over the dose (:func:`clinical_dose_grid`); None:
            the CT's own grid.
    """
    case = load_case(case_dir)
    ident = Identity.for_case(case, uid_root, keep_study=True)
    if grid_mm is not None:
        dose = clinical_dose_grid(right_handed(dose), grid_mm)
    return write_rtdose(dose, Path(path), ident, uid_root, plan_uid=ident.plan_uid,
                        description="PREDICTED dose (addiff-fl) - not a plan",
                        comment="PREDICTED by addiff-fl: research output, not a TPS dose")
