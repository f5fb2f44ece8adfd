"""A hospital whose only cases are broken and named like patients, and a search of what the
server side wrote for those names (tests/test_site_privacy.py and the deployment test of
tests/test_federation_failures.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

PATIENTS = ("PATIENT_DOE_JOHN_19700101", "PATIENT_ROE_JANE_19811224", "PATIENT_POE_EDGAR_19090119")
SECRET_DIR = "ward7_secret_export_4411"
NEEDLES = (*PATIENTS, "PATIENT_", SECRET_DIR)  # none of these may reach the server


def template_case(site_file: Path) -> Path:
    """The first case folder of a synthetic site (``helpers.federation.synthetic_sites``)."""
    return next(p for p in sorted((site_file.parent / site_file.stem / "cases").iterdir()) if p.is_dir())


def broken_site(base: Path, template: Path) -> Path:
    """A site file (``hospital_x``) whose data folder holds only broken cases named like patients."""
    data = base / SECRET_DIR
    breakers = [
        lambda p: p.update(constraints={f"{PATIENTS[0]} Dmax": 40}),  # an unparseable constraint key
        lambda p: p["beams"][0].update(energy_mv=1e308),  # an infinite beam energy
        lambda p: p.update(fractions="many"),
    ]
    for name, breaker in zip(PATIENTS, breakers):
        case = data / name
        shutil.copytree(template, case)
        plan = yaml.safe_load((case / "plan.yaml").read_text())
        breaker(plan)
        (case / "plan.yaml").write_text(yaml.safe_dump(plan))
    site = base / "site_files" / "hospital_x.yaml"
    site.parent.mkdir(parents=True, exist_ok=True)
    site.write_text(yaml.safe_dump({"name": "hospital_x", "data_dir": str(data), "heldout": {"fraction": 0.0},
                                    "device": "cpu"}))
    return site


def _file_leaks(path: Path, needles) -> list[str]:
    data = path.read_bytes()
    return [f"{path}: {n}" for n in needles if n.encode() in data]


def leaks(folder: Path, needles) -> list[str]:
    """'file: needle' for every file under ``folder`` whose bytes hold one of ``needles``."""
    return [hit for p in sorted(folder.rglob("*")) if p.is_file() for hit in _file_leaks(p, needles)]


def server_side_leaks(paths, needles=NEEDLES) -> list[str]:
    """``leaks`` over folders and single files (those that exist)."""
    out = []
    for p in map(Path, paths):
        out += leaks(p, needles) if p.is_dir() else _file_leaks(p, needles) if p.is_file() else []
    return out
