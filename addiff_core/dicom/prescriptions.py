"""Which target of an imported patient gets which prescription, and from where (said in a note).

The first source that gives one wins:

1. the RTPLAN's target dose references tied to an ROI;
2. those tied to no ROI (Eclipse's site reference "Breast", 14 Gy): with a plan dose, the targets
   whose median dose is within :data:`RECEIVES` of it (the boost goes to "Tumor Bed", not to the
   whole "Breast"); else the structure a VOLUME reference's description names; else the one
   target whose name carries that dose, else the only PTV;
3. the mapping file's ``prescriptions`` (TPS name ``Tumor Bed`` or imported ``Tumor_Bed``);
4. target names with a dose unit (``PTV_70Gy``);
5. for the only target, the dose at the plan's dose specification point.

Otherwise the patient is refused with one line saying what was found and asking for a mapping.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .names import normalise, target_dose_from_name
from .rtplan import PlanInfo, UnlinkedDose
from .volumes import DicomDataError

__all__ = ["Roi", "resolve_name", "prescriptions"]

_TARGET_TYPES = ("PTV", "CTV", "GTV")
RECEIVES = 0.05  # a target receives a prescription when its median dose is within 5 % of it


@dataclass(frozen=True)
class Roi:
    """A structure of the imported case: its ROI number, mask name, TPS name and interpreted type."""

    number: int
    name: str
    original: str
    kind: str = ""

    @property
    def is_ptv(self) -> bool:
        return self.name.upper().startswith("PTV") or self.kind.upper() == "PTV"

    @property
    def is_target(self) -> bool:
        return self.name.upper().startswith(_TARGET_TYPES) or self.kind.upper() in _TARGET_TYPES


def resolve_name(key: str, rois: list[Roi]) -> Roi | None:
    """The structure a mapping key or a dose reference's description names: its imported name,
    its TPS name, or either one compared by :func:`.names.normalise` (when that is unique)."""
    for r in rois:
        if key in (r.name, r.original):
            return r
    same = [r for r in rois if normalise(key) in (normalise(r.name), normalise(r.original))]
    return same[0] if len(same) == 1 else None


def _place(u: UnlinkedDose, rois: list[Roi], rx: dict[str, float],
           median: Callable[[str], float] | None) -> tuple[list[Roi], str]:
    """The structures an unlinked prescription belongs to, and why."""
    free = [r for r in rois if r.name not in rx]
    if median is not None and not u.is_point:
        hit = [r for r in free if r.is_target and abs(median(r.name) - u.dose) <= RECEIVES * u.dose]
        if hit:
            return hit, f"median dose within {RECEIVES:.0%} of it in the plan dose"
    by_name = u.structure_type not in ("SITE", "POINT", "COORDINATES")  # a site's name is no structure's
    named = resolve_name(u.description, free) if u.description and by_name and median is None else None
    if named is not None:
        return [named], "its name"
    by_dose = [r for r in free if r.is_target
               and target_dose_from_name(r.original, [u.dose]) == u.dose]
    if len(by_dose) == 1:
        return by_dose, "the dose in its name"
    ptvs = [r for r in free if r.is_ptv]
    if not rx and len(ptvs) == 1:
        return ptvs, "the only PTV"
    return [], ""


def _from_mapping(given: dict[str, float], rois: list[Roi], where: str) -> dict[str, float]:
    rx, missing = {}, []
    for key, dose in given.items():
        r = resolve_name(key, rois)
        if r is None:
            missing.append(key)
        else:
            rx[r.name] = dose
    if missing:
        raise DicomDataError(where or "mapping file",
                             f"prescribes {', '.join(missing)}, which the RTSTRUCT does not contain "
                             f"(structures: {', '.join(sorted(r.original for r in rois))})")
    return rx


def _refusal(info: PlanInfo, rois: list[Roi]) -> str:
    found = [f"{u.dose:g} Gy '{u.description or '?'}' ({u.structure_type or 'no structure'})" for u in info.rx_unlinked]
    targets = [r.original for r in rois if r.is_target]
    parts = ["no prescription tied to a target structure"]
    if found:
        parts.append(f"the RTPLAN's dose references ({', '.join(found)}) name no structure of the RTSTRUCT")
    if targets:
        parts.append(f"the target names ({', '.join(targets)}) carry no dose with a unit")
    return "; ".join(parts) + (": give `prescriptions` in the mapping file (--map), keyed by the TPS's structure "
                               "name, e.g. {" + (targets[0] if targets else "PTV") + ": 60}")


def prescriptions(info: PlanInfo, rois: list[Roi], mapped: dict[str, float] | None, notes: list[str],
                  plan_path: Path, mapping_path: str = "",
                  median: Callable[[str], float] | None = None) -> tuple[dict[str, float], str]:
    """The case's prescriptions {mask name: Gy} and where they come from (for the summary line);
    every choice beyond the RTPLAN's ROI-tied dose references is said in ``notes``.

    Args:
        info: the RTPLAN as read by :func:`.rtplan.read_rtplan`.
        rois: the structures with a mask in the case.
        mapped: the mapping file's prescriptions for this patient (None: none given).
        notes: the import's notes, appended to.
        plan_path: the RTPLAN file, named in the refusal.
        mapping_path: the mapping file, named when it prescribes a structure that is not there.
        median: the plan dose's median in a structure (Gy), when the patient has a plan dose.

    Raises:
        DicomDataError: no source gives a prescription, or the mapping names a missing structure.
    """
    by_number = {r.number: r for r in rois}
    rx = {by_number[n].name: d for n, d in info.rx_by_roi.items() if n in by_number}
    for n in sorted(set(info.rx_by_roi) - set(by_number)):
        notes.append(f"RTPLAN prescribes {info.rx_by_roi[n]:g} Gy to ROI number {n}, which has no mask: ignored")
    for u in info.rx_unlinked:
        hit, why = _place(u, rois, rx, median)
        what = f"prescription {u.dose:g} Gy (dose reference '{u.description or '?'}'" \
               f"{', ' + u.structure_type if u.structure_type else ''})"
        if not hit:
            notes.append(f"{what} is tied to no structure: ignored")
        for r in hit:
            rx[r.name] = u.dose
        if hit:
            notes.append(f"{what} assigned to {', '.join(r.original for r in hit)} ({why})")
    source = "RTPLAN"
    if not rx and mapped:
        rx, source = _from_mapping(mapped, rois, mapping_path), "mapping file"
        notes.append("prescriptions from the mapping file")
    if not rx:
        rx = {r.name: d for r in rois if r.is_target and (d := target_dose_from_name(r.original)) is not None}
        if rx:
            source = "target names"
            notes.append(f"prescriptions read from the target names ({', '.join(f'{k} {v:g} Gy' for k, v in rx.items())})")
    ptvs = [r for r in rois if r.is_ptv] or [r for r in rois if r.is_target]
    if not rx and info.beam_dose and len(ptvs) == 1:
        rx, source = {ptvs[0].name: info.beam_dose}, "RTPLAN beam doses"
        notes.append(f"prescription {info.beam_dose:g} Gy from the fraction group's beam doses x fractions, "
                     f"assigned to the only target, {ptvs[0].original}")
    if not rx:
        raise DicomDataError(plan_path, _refusal(info, rois))
    return rx, source
