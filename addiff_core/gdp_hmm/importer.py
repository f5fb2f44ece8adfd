"""``addiff data import-gdp-hmm``: GDP-HMM plans (``.npz``) -> case folders and one site file per
institution (``cohort``), tumour site (``site``) or for all (``none``).

Layout as ``addiff data synth``'s: ``OUT/<group>.yaml`` (a site file) and
``OUT/<group>/cases/<plan id>/`` (a case + gdp_hmm.yaml). As ``import-openkbp``: volumes on their
own grid, a failing plan skipped with its reason. Held out: the plans whose meta_data.csv phase is
valid/test (data_loader.py's evaluation phases) when a site has both kinds, else a random quarter.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..case_io import only_case_entries, save_case, staged_case_dir
from ..config import new_site_doc
from ..errors import CaseError
from ..errors import UserError
from .convert import convert
from .metric import INFO_FILE
from .safe_npz import load_plan_dict
from .sources import HELDOUT_PHASES, MetaRow, find_beside, levels, patient_id, read_meta, read_ptv_dict

SITES_BY = ("cohort", "site", "none")
SITE_FILE_HEADER = "# GDP-HMM import"  # the first line of every site file written here
ALL_GROUP = "gdp_hmm"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


@dataclass
class GdpImportSummary:
    """What :func:`import_gdp_hmm` did: case folders per group, skipped plans with their reason,
    the site files written."""

    imported: dict[str, list[Path]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    site_files: list[Path] = field(default_factory=list)

    def text(self) -> str:
        n = sum(len(v) for v in self.imported.values())
        lines = [f"imported {n} GDP-HMM plan(s) into {len(self.imported)} site(s)"
                 + (f"; skipped {len(self.skipped)}:" if self.skipped else "")]
        lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        lines += [f"  site file: {p} ({len(self.imported[p.stem])} case(s))" for p in self.site_files]
        return "\n".join(lines)


def group_name(by: str, row: MetaRow | None) -> str:
    """The site (group) a plan belongs to: ``cohort<N>``, its tumour site (``head_neck``/``lung``,
    else ``site<N>``) or :data:`ALL_GROUP`."""
    if by == "none":
        return ALL_GROUP
    value = None if row is None else (row.cohort if by == "cohort" else row.site)
    if value is None:
        raise ValueError(f"meta_data.csv gives no {by} for this plan (--sites-by {by})")
    if by == "site" and row is not None and row.tumour_site:
        return row.tumour_site
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{by}{value}")[:64]


def case_id(plan_id: str) -> str:
    """The case folder name of a plan: its file name when it is a safe one (the challenge's IDs,
    ``0522c0001+15Ag+MOS_23629``, are), else with every other character made ``_``."""
    if _SAFE_ID.fullmatch(plan_id):
        return plan_id
    s = re.sub(r"[^A-Za-z0-9_.+-]", "_", plan_id).lstrip("._+-")
    return (s or "plan")[:128]


def find_plans(src: Path) -> list[Path]:
    """``src`` itself (an .npz) or every .npz below it (hidden folders skipped), sorted."""
    if src.is_file():
        return [src]
    return sorted(p for p in src.rglob("*.npz")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts))


def _site_doc(name: str, phases: dict[str, str | None]) -> dict:
    held = sorted(c for c, ph in phases.items() if ph in HELDOUT_PHASES)
    heldout = ({"case_ids": held, "seed": 0} if held and len(held) < len(phases)
               else {"fraction": 0.25, "seed": 0})
    return new_site_doc(name, heldout)


def _check_site_files(out: Path, groups: set[str]) -> None:
    """A site file there that this importer did not write is kept: stop before any work."""
    for g in sorted(groups):
        p = out / f"{g}.yaml"
        if p.exists():
            try:
                first = p.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
            except OSError:
                first = []
            if not first or not first[0].startswith(SITE_FILE_HEADER):
                raise UserError(f"{p}: exists and was not written by data import-gdp-hmm; kept (choose another OUT)")


def _write_site_file(out: Path, name: str, phases: dict[str, str | None], by: str) -> Path:
    p = out / f"{name}.yaml"
    header = (f"{SITE_FILE_HEADER} ({name}): GDP-HMM plans grouped by {by}.\n"
              f"# Written by addiff data import-gdp-hmm; held-out cases from meta_data.csv's phase when it has one.\n")
    p.write_text(header + yaml.safe_dump(_site_doc(name, phases), sort_keys=False), encoding="utf-8")
    return p


def _import_one(npz: Path, dest: Path, ptv_dict: dict, row: MetaRow | None, normalise_d97: bool) -> Path:
    plan_id = npz.name[: -len(".npz")]
    pid = patient_id(plan_id)
    if dest.exists() and not only_case_entries(dest, {INFO_FILE}):
        raise FileExistsError(f"{dest}: exists and is not a case folder; not overwriting")
    lv = levels(ptv_dict, pid)
    c = convert(load_plan_dict(npz), plan_id, pid, lv, row, normalise_d97)
    with staged_case_dir(dest) as tmp:
        save_case(tmp, c.ct, c.plan, c.masks, dose=c.dose, spacing=c.spacing, origin=c.origin,
                  direction=c.direction)
        (tmp / INFO_FILE).write_text(yaml.safe_dump(c.info, sort_keys=False), encoding="utf-8")
    return dest


def import_gdp_hmm(src: str | Path, out: str | Path, meta: str | Path | None = None,
                   ptv_dict: str | Path | None = None, sites_by: str | None = None,
                   normalise_d97: bool = True, progress: bool = True) -> GdpImportSummary:
    """Import GDP-HMM plans from ``src`` (an .npz or a folder of them) into ``out``.

    Args:
        meta: meta_data.csv (default: ``src``'s or ``src/meta_files``'); when given, only the plans
            it lists are imported.
        ptv_dict: PTV_DICT.json (default: found as ``meta``); required.
        sites_by: ``cohort`` (institution; the default with a meta_data.csv), ``site`` (tumour
            site) or ``none`` (one site file; the default without one).
        normalise_d97: the dose as the challenge scores it (D97 of PTV-High = PDose), else
            ``dose * dose_scale`` as planned.

    Raises:
        UserError: no plans, no PTV_DICT.json, an unreadable meta_data.csv / PTV_DICT.json,
            ``--sites-by`` without a meta_data.csv, or a site file there that this importer did
            not write (nothing is written then).
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    base = src if src.is_dir() else src.parent
    meta_p = Path(meta) if meta else find_beside(base, "meta_data.csv")
    ptv_p = Path(ptv_dict) if ptv_dict else find_beside(base, "PTV_DICT.json")
    if ptv_p is None:
        raise UserError(f"{src}: no PTV_DICT.json beside the plans (give --ptv-dict): it holds the prescriptions")
    rows = read_meta(meta_p) if meta_p else None
    by = sites_by or ("cohort" if rows is not None else "none")
    if by not in SITES_BY:
        raise UserError(f"--sites-by must be one of {', '.join(SITES_BY)}, got {by!r}")
    if rows is None and by != "none":
        raise UserError(f"--sites-by {by} needs meta_data.csv (give --meta)")
    ptv = read_ptv_dict(ptv_p)
    plans = find_plans(src)
    if not plans:
        raise UserError(f"{src}: no .npz plan files found")
    summary, todo, seen = GdpImportSummary(), [], set()
    for npz in plans:
        plan_id = npz.name[: -len(".npz")]
        row = rows.get(plan_id) if rows is not None else None
        if rows is not None and row is None:
            summary.skipped.append((plan_id, "not listed in meta_data.csv"))
            continue
        if case_id(plan_id) in seen:  # one case folder per plan id: a second copy is not imported over it
            summary.skipped.append((plan_id, f"a second file of this plan ({npz.parent.name}/); the first kept"))
            continue
        seen.add(case_id(plan_id))
        try:
            todo.append((npz, row, group_name(by, row)))
        except ValueError as e:
            summary.skipped.append((plan_id, str(e)))
    _check_site_files(out, {g for _, _, g in todo})
    phases: dict[str, dict[str, str | None]] = {}
    for i, (npz, row, group) in enumerate(todo, 1):
        plan_id, t0 = npz.name[: -len(".npz")], time.perf_counter()
        try:
            dest = _import_one(npz, out / group / "cases" / case_id(plan_id), ptv, row, normalise_d97)
            summary.imported.setdefault(group, []).append(dest)
            phases.setdefault(group, {})[dest.name] = row.phase if row else None
            msg = f"{plan_id} -> {dest} ({time.perf_counter() - t0:.1f} s)"
        except (ValueError, OSError) as e:  # UnsafeNpz, PlanProblem, CaseError; FileExistsError, unreadable
            reason = f"{e.file}: {e.problem}" if isinstance(e, CaseError) else str(e)
            summary.skipped.append((plan_id, reason[:300]))
            msg = f"{plan_id} skipped: {reason[:300]}"
        if progress:
            print(f"[{i}/{len(todo)}] {msg}", file=sys.stderr, flush=True)
    summary.site_files = [_write_site_file(out, g, phases[g], by) for g in sorted(phases)]
    return summary
