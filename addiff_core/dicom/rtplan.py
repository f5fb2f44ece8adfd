"""Reading an RTPLAN: beams, prescriptions (DoseReferenceSequence) and fractions.

* Refused in one line: ion, brachytherapy and Gamma Knife plans, plans without a photon beam.
* Beams: photon treatment beams with a non-zero ``BeamMeterset`` (Eclipse marks setup and
  imaging fields TREATMENT with no meterset); a plan with no meterset at all (``export-dicom``'s)
  keeps every treatment beam; the beams left out go to the notes. Gantry, couch and energy from
  the first control point; a rotating gantry is an arc, stored clockwise (a CC arc a -> b as b -> a).
* Prescriptions: TARGET dose references in Gy, tied to an ROI or not (then description and
  structure type are kept), and the dose at the beam dose specification point (BeamDose x fractions).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from ..case_io import Beam
from .scan import ION_PLAN_SOP_CLASS
from .volumes import DicomDataError

__all__ = ["PlanInfo", "UnlinkedDose", "read_rtplan", "refusal"]

_GAMMA_KNIFE = re.compile(r"gamma\s*knife|gammaplan|leksell|perfexion|elekta instrument|\bicon\b|\bpfx\b", re.I)


@dataclass(frozen=True)
class UnlinkedDose:
    """A target prescription tied to no ROI: a site or volume by description, or a point."""

    description: str
    dose: float  # Gy
    structure_type: str = ""  # DoseReferenceStructureType: SITE, VOLUME, POINT, COORDINATES

    @property
    def is_point(self) -> bool:
        return self.structure_type in ("POINT", "COORDINATES")


@dataclass
class PlanInfo:
    beams: list[Beam]
    rx_by_roi: dict[int, float] = field(default_factory=dict)  # ROI number -> Gy
    rx_unlinked: list[UnlinkedDose] = field(default_factory=list)
    beam_dose: float | None = None  # Gy: sum of BeamDose x fractions (the dose specification point)
    fractions: int | None = None
    label: str = ""
    treatment_site: str = ""  # free text (TreatmentSite), e.g. "head_neck" as export-dicom writes it
    notes: list[str] = field(default_factory=list)

    @property
    def doses(self) -> set[float]:
        """Every prescription dose the plan states (Gy)."""
        return set(self.rx_by_roi.values()) | {u.dose for u in self.rx_unlinked}


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None


def _beam(b: Dataset, metersets: dict[int, float | None] | None, notes: list[str]) -> Beam | None:
    name = str(b.get("BeamName", "") or b.get("BeamNumber", "?"))
    delivery = str(b.get("TreatmentDeliveryType", "TREATMENT") or "TREATMENT").upper()
    if delivery != "TREATMENT":
        notes.append(f"beam {name}: {delivery} field left out")
        return None
    if metersets is not None:
        number = _num(b.get("BeamNumber"))
        mu = metersets.get(int(number)) if number is not None else None
        if not mu:
            why = "not in the fraction group" if number is None or int(number) not in metersets else "no BeamMeterset"
            notes.append(f"beam {name}: {why} (a setup or imaging field): left out")
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


def refusal(ds: Dataset) -> str | None:
    """Why the model cannot represent this plan (one line), or None."""
    if str(ds.get("SOPClassUID", "")) == ION_PLAN_SOP_CLASS or ds.get("IonBeamSequence"):
        return "ion (proton) plan: the model predicts external photon beam doses only"
    if ds.get("ApplicationSetupSequence") or ds.get("BrachyTreatmentType"):
        return "brachytherapy plan: the model predicts external photon beam doses only"
    texts = [str(ds.get(k, "") or "") for k in ("Manufacturer", "ManufacturerModelName")]
    for b in ds.get("BeamSequence") or []:
        texts += [str(b.get(k, "") or "") for k in ("TreatmentMachineName", "Manufacturer", "ManufacturerModelName")]
    hit = next((t for t in texts if _GAMMA_KNIFE.search(t)), None)
    if hit:
        return f"Gamma Knife plan ({hit!r}): the model predicts linac photon beam doses only"
    return None


def _fraction_group(ds: Dataset, info: PlanInfo) -> dict[int, float | None] | None:
    """Fractions (of the first fraction group) and the plan's beam dose -> {beam number: meterset}
    over all fraction groups (None when no group gives a BeamMeterset: a geometry-only plan)."""
    groups = list(ds.get("FractionGroupSequence") or [])
    if not groups:
        return None
    fx = _num(groups[0].get("NumberOfFractionsPlanned"))
    info.fractions = int(fx) if fx else None
    if len(groups) > 1:
        info.notes.append(f"{len(groups)} fraction groups: fractions taken from the first ({info.fractions})")
    refs = [r for g in groups for r in g.get("ReferencedBeamSequence") or []
            if _num(r.get("ReferencedBeamNumber")) is not None]
    metersets: dict[int, float | None] = {}
    for r in refs:  # a beam's meterset in any group makes it a treatment beam
        metersets[int(r.ReferencedBeamNumber)] = metersets.get(int(r.ReferencedBeamNumber)) or _num(r.get("BeamMeterset"))
    doses = [_num(r.get("BeamDose")) for r in refs if _num(r.get("BeamMeterset"))]
    if len(groups) == 1 and doses and all(d is not None and d > 0 for d in doses) and info.fractions:
        info.beam_dose = round(sum(doses) * info.fractions, 4)  # type: ignore[arg-type]
    return metersets if any(v is not None for v in metersets.values()) else None


def read_rtplan(ds: Dataset, path: Path) -> PlanInfo:
    """Beams, prescriptions and fractions of an RTPLAN.

    Raises:
        DicomDataError: a plan the model cannot represent, or one without a usable beam.
    """
    why = refusal(ds)
    if why:
        raise DicomDataError(path, why)
    seq = ds.get("BeamSequence")
    if not seq:
        raise DicomDataError(path, "plan has no beams (BeamSequence missing or empty)")
    info = PlanInfo(beams=[], label=str(ds.get("RTPlanLabel", "") or ""),
                    treatment_site=str(ds.get("TreatmentSite", "") or ""))
    metersets = _fraction_group(ds, info)
    info.beams = [bm for bm in (_beam(b, metersets, info.notes) for b in seq) if bm is not None]
    if not info.beams:
        raise DicomDataError(path, f"plan has no usable treatment photon beam ({'; '.join(info.notes)})")
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
            info.rx_unlinked.append(UnlinkedDose(str(dr.get("DoseReferenceDescription", "") or ""), dose,
                                                 str(dr.get("DoseReferenceStructureType", "") or "").upper()))
    return info
