"""A site's DICOM import mapping file (``addiff data import-dicom --map FILE``).

What a TPS export does not carry, or carries under the hospital's own names::

    structure_names:            # TPS ROI name -> project name (adds to / overrides the defaults
      "Parotid Lt": LeftParotid #   of addiff_core.dicom.names); null drops the structure
      "zPTV_opt": null
    tumour_site: head_neck      # when the structures do not tell (head_neck | lung | prostate);
                                #   a breast or brain case is imported only with one
    prescriptions: {PTV70: 70, "Tumor Bed": 14}   # Gy; used when the RTPLAN carries none; keys are
                                # the TPS's ROI names or the imported ones (Tumor_Bed)
    fractions: 35                           # used when the RTPLAN carries none
    patients:                   # per patient (PatientID or case folder name): the same fields
      "123456": {tumour_site: lung, prescriptions: {PTV60: 60}, fractions: 30}

The RTPLAN's own prescription (DoseReferenceSequence) and fractions (FractionGroupSequence) win
over ``prescriptions`` / ``fractions`` here; a patient entry wins over the top level. Every field
is optional; unknown fields are errors (``FILE: field: problem``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..contract import TUMOUR_SITES
from ..config import ConfigError, load_yaml

__all__ = ["PatientDefaults", "ImportMapping", "load_mapping"]

_FIELDS = ("tumour_site", "prescriptions", "fractions")


@dataclass(frozen=True)
class PatientDefaults:
    tumour_site: str | None = None
    prescriptions: dict[str, float] | None = None
    fractions: int | None = None


@dataclass(frozen=True)
class ImportMapping:
    structure_names: dict[str, str | None] = field(default_factory=dict)
    defaults: PatientDefaults = PatientDefaults()
    patients: dict[str, PatientDefaults] = field(default_factory=dict)
    source: str = ""  # the file it was read from

    def for_patient(self, *keys: str) -> PatientDefaults:
        """The defaults for a patient known under any of ``keys`` (PatientID, case name)."""
        own = next((self.patients[k] for k in keys if k in self.patients), PatientDefaults())
        return PatientDefaults(
            tumour_site=own.tumour_site or self.defaults.tumour_site,
            prescriptions=own.prescriptions or self.defaults.prescriptions,
            fractions=own.fractions or self.defaults.fractions)


def _defaults(d: Any, where: str, bad) -> PatientDefaults:
    if not isinstance(d, Mapping):
        raise bad(where, "must be a mapping")
    unknown = set(d) - set(_FIELDS)
    if unknown:
        raise bad(where, f"unknown field(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(_FIELDS)})")
    site = d.get("tumour_site")
    if site is not None and site not in TUMOUR_SITES:
        raise bad(f"{where}tumour_site", f"must be one of {', '.join(TUMOUR_SITES)}, got {site!r}")
    rx = d.get("prescriptions")
    if rx is not None:
        if not isinstance(rx, Mapping) or not rx:
            raise bad(f"{where}prescriptions", "must map target names to doses in Gy, e.g. {PTV70: 70}")
        for k, v in rx.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 150:
                raise bad(f"{where}prescriptions.{k}", f"must be a dose in Gy (0 < dose <= 150), got {v!r}")
        rx = {str(k): float(v) for k, v in rx.items()}
    fx = d.get("fractions")
    if fx is not None and (isinstance(fx, bool) or not isinstance(fx, int) or fx <= 0):
        raise bad(f"{where}fractions", f"must be a positive integer, got {fx!r}")
    return PatientDefaults(tumour_site=site, prescriptions=rx, fractions=fx)


def load_mapping(path: str | Path | None) -> ImportMapping:
    """Read and validate a mapping file; None -> the built-in defaults only."""
    if path is None:
        return ImportMapping()
    path = Path(path)

    def bad(fieldname: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}: {fieldname.rstrip('.') or '.'}: {problem}")

    if not path.is_file():
        raise ConfigError(f"{path}: mapping file not found")
    raw = load_yaml(path) or {}  # the one safe loader: no aliases (bombs), no duplicate keys, <= 1 MB
    if not isinstance(raw, Mapping):
        raise bad(".", "must be a mapping (structure_names, tumour_site, prescriptions, fractions, patients)")
    unknown = set(raw) - {"structure_names", "patients", *_FIELDS}
    if unknown:
        raise bad(".", f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    names = raw.get("structure_names") or {}
    if not isinstance(names, Mapping):
        raise bad("structure_names", "must map TPS names to project names (or null to drop)")
    for k, v in names.items():
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise bad(f"structure_names.{k}", f"must be a structure name or null, got {v!r}")
    patients = raw.get("patients") or {}
    if not isinstance(patients, Mapping):
        raise bad("patients", "must map PatientID (or case name) to tumour_site/prescriptions/fractions")
    return ImportMapping(
        structure_names={str(k): (None if v is None else str(v).strip()) for k, v in names.items()},
        defaults=_defaults({k: raw[k] for k in _FIELDS if k in raw}, "", bad),
        patients={str(k): _defaults(v, f"patients.{k}.", bad) for k, v in patients.items()}, source=str(path))
