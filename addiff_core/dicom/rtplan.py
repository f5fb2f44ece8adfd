"""Reading an RTPLAN: beams (gantry, couch, nominal energy; arcs from the control points),
prescriptions (DoseReferenceSequence) and fractions (FractionGroupSequence).

* Beams: treatment photon beams only (``TreatmentDeliveryType`` SETUP/verification fields and
  non-photon beams are left out, with a note). Gantry, couch (``PatientSupportAngle``) and
  ``NominalBeamEnergy`` come from the first control point; a beam whose gantry rotates
  (``GantryRotationDirection`` CW/CC) is an arc covering the angles its control points sweep.
  The case format writes arcs clockwise (``gantry_start`` -> ``gantry_stop``, increasing angle), so
  a counter-clockwise arc from a to b is stored as the clockwise arc b -> a (same angles).
* Prescriptions: target dose references (``DoseReferenceType`` TARGET) with a
  ``TargetPrescriptionDose`` in Gy, either tied to an ROI (``ReferencedROINumber``) or to a point
  or site (no ROI).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from ..case_io import Beam
from .volumes import DicomDataError

__all__ = ["PlanInfo", "read_rtplan"]


@dataclass
class PlanInfo:
    beams: list[Beam]
    rx_by_roi: dict[int, float] = field(default_factory=dict)  # ROI number -> Gy
    rx_unlinked: list[tuple[str, float]] = field(default_factory=list)  # (description, Gy), no ROI
    fractions: int | None = None
    label: str = ""
    treatment_site: str = ""  # free text (TreatmentSite), e.g. "head_neck" as export-dicom writes it
    notes: list[str] = field(default_factory=list)


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None


def _beam(b: Dataset, path: Path, notes: list[str]) -> Beam | None:
    name = str(b.get("BeamName", "") or b.get("BeamNumber", "?"))
    delivery = str(b.get("TreatmentDeliveryType", "TREATMENT") or "TREATMENT").upper()
    if delivery != "TREATMENT":
        notes.append(f"beam {name}: {delivery} field left out")
        return None
    radiation = str(b.get("RadiationType", "PHOTON") or "PHOTON").upper()
    if radiation != "PHOTON":
        notes.append(f"beam {name}: {radiation} beam left out (photon beams only)")
        return None
    cps = list(b.get("ControlPointSequence") or [])
    if not cps or _num(cps[0].get("GantryAngle")) is None:
        notes.append(f"beam {name}: no control point with a gantry angle; left out")
        return None
    cp0 = cps[0]
    gantry = _num(cp0.GantryAngle) % 360.0
    couch = (_num(cp0.get("PatientSupportAngle")) or 0.0) % 360.0
    energy = next((e for e in (_num(cp.get("NominalBeamEnergy")) for cp in cps) if e), None)
    if energy is None or energy <= 0:
        notes.append(f"beam {name}: no NominalBeamEnergy; 6 MV assumed")
        energy = 6.0
    span, direction, last = 0.0, "NONE", None
    for cp in cps:  # a control point's rotation direction holds for the segment that follows it
        g = _num(cp.get("GantryAngle"))
        if g is not None:
            g %= 360.0
            if last is not None and direction == "CW":
                span += (g - last) % 360.0
            elif last is not None and direction == "CC":
                span += (last - g) % 360.0
            last = g
        direction = str(cp.get("GantryRotationDirection", "") or "").upper() or direction
    rotation = str(cp0.get("GantryRotationDirection", "NONE") or "NONE").upper()
    if span < 1e-3:
        return Beam(gantry=gantry, couch=couch, energy_mv=energy)
    span = min(span, 360.0)
    if rotation == "CC":
        return Beam(gantry=(gantry - span) % 360.0, couch=couch, energy_mv=energy, gantry_stop=gantry)
    return Beam(gantry=gantry, couch=couch, energy_mv=energy, gantry_stop=(gantry + span) % 360.0)


def read_rtplan(ds: Dataset, path: Path) -> PlanInfo:
    """Beams, prescriptions and fractions of an RTPLAN; DicomDataError if it has no usable beam."""
    notes: list[str] = []
    seq = ds.get("BeamSequence")
    if not seq:
        if ds.get("IonBeamSequence"):
            raise DicomDataError(path, "ion (proton) plan: only photon RTPLANs are supported")
        raise DicomDataError(path, "plan has no beams (BeamSequence missing or empty)")
    beams = [bm for bm in (_beam(b, path, notes) for b in seq) if bm is not None]
    if not beams:
        raise DicomDataError(path, f"plan has no usable treatment photon beam ({'; '.join(notes)})")
    info = PlanInfo(beams=beams, label=str(ds.get("RTPlanLabel", "") or ""), notes=notes,
                    treatment_site=str(ds.get("TreatmentSite", "") or ""))
    for dr in ds.get("DoseReferenceSequence") or []:
        if str(dr.get("DoseReferenceType", "")).upper() != "TARGET":
            continue
        dose = _num(dr.get("TargetPrescriptionDose"))
        if dose is None or dose <= 0:
            continue
        roi = dr.get("ReferencedROINumber")
        if roi is not None and str(roi).strip():
            info.rx_by_roi[int(roi)] = max(dose, info.rx_by_roi.get(int(roi), 0.0))
        else:
            info.rx_unlinked.append((str(dr.get("DoseReferenceDescription", "") or ""), dose))
    groups = list(ds.get("FractionGroupSequence") or [])
    fx = [int(g.NumberOfFractionsPlanned) for g in groups if _num(g.get("NumberOfFractionsPlanned"))]
    if fx:
        info.fractions = fx[0]
        if len(groups) > 1:
            notes.append(f"{len(groups)} fraction groups: fractions taken from the first ({fx[0]})")
    return info
