"""Writing ``RUN_DIR/report/report.md`` (+ ``report.html``, ``figures/*.png``): the sections, in
order, each behind a guard so that the report always gets written."""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from ..project import resolve_path
from ..run_folder import REPORT_HTML, REPORT_MD, RunFolder
from .context import ReportContext
from .cross_site_section import cross_site
from .document import Doc
from .run_data import RunData, load_run
from .sections import comparison, heldout, summary, training
from .site_figures import site_sections

log = logging.getLogger("addiff_core.report")

# the sections in the order they appear; (name, section(ctx))
SECTIONS: tuple[tuple[str, Callable[[ReportContext], None]], ...] = (
    ("summary", summary), ("training", training), ("heldout", heldout), ("comparison", comparison),
    ("cross_site", cross_site), ("site_sections", site_sections))


def write_report_safely(run_dir: str | Path, figures: bool = True) -> Path | None:
    """Write the run's report at the end of a run; a failing figure must never cost the run its
    results (they are saved before), so any error becomes a warning."""
    try:
        return write_report(run_dir, figures=figures)
    except Exception as e:  # noqa: BLE001 - the report is a convenience on top of saved results
        log.warning("could not write the report for %s: %s", run_dir, e)
        return None


def _fresh_figure_folder(folder: RunFolder) -> Path:
    from ..config import ConfigError

    fig_dir = folder.figures_dir
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{folder.report_dir}: cannot create the report folder ({e.strerror})") from None
    for old in fig_dir.glob("*.png"):  # figures of an earlier report (e.g. of sites not reachable now)
        try:
            old.unlink()
        except OSError:
            pass
    return fig_dir


def _given_site_files(site_files: Iterable[str | Path] | None) -> list[Path] | None:
    """Site files as given: relative to the current folder (as typed), else to the project folder."""
    if site_files is None:
        return None
    out = []
    for p in site_files:
        here = resolve_path(p, Path.cwd())
        out.append(here if here.is_file() else resolve_path(p))
    return out


def write_report(run_dir: str | Path, site_files: Iterable[str | Path] | None = None, figures: bool = True) -> Path:
    """Write ``RUN_DIR/report/report.md`` (+ ``report.html`` and ``figures/*.png``); return the
    path of report.md. ``site_files``: make per-site figures for these sites (default: the run
    config's site files, where readable). ``figures=False``: Markdown/HTML only."""
    from ..checkpoint import atomic_write_bytes
    from ..config import ConfigError

    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise ConfigError(f"{folder.path}: no such run folder")
    folder.guard()  # a planted report/ link (e.g. to a case folder) is refused, not written through
    fig_dir = _fresh_figure_folder(folder)
    notes: list[str] = []
    try:
        d = load_run(folder.path)
    except Exception as e:  # noqa: BLE001
        d = RunData(path=folder.path, kind="unknown")
        notes.append(f"the run folder could not be read ({type(e).__name__}: {e})")
    notes[:0] = d.notes
    doc = Doc()
    name = folder.path.resolve().name
    doc.h(1, f"Run report: {name}")
    doc.p(f"Run folder `{folder.path.resolve()}`; report written "
          f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}.")
    if d.kind == "unknown":
        doc.p("**This folder does not look like an addiff-fl run** (no run.json, metrics.jsonl, final_metrics.*, "
              "checkpoints/, model.pt or metrics.json).")
    ctx = ReportContext(doc=doc, data=d, fig_dir=fig_dir if figures else None,
                        site_files=_given_site_files(site_files), notes=notes)
    for section_name, section in SECTIONS:
        try:
            section(ctx)
        except Exception as e:  # noqa: BLE001 - the report always gets written
            log.warning("report: section %s failed: %s", section_name, e, exc_info=log.isEnabledFor(logging.DEBUG))
            doc.p(f"(this section could not be made: {type(e).__name__}: {e})")
            notes.append(f"section {section_name} failed: {type(e).__name__}: {e}")
    if notes:
        doc.h(2, "Missing or unreadable inputs")
        doc.ul(dict.fromkeys(notes))
    md = folder.report_dir / REPORT_MD
    atomic_write_bytes(md, doc.markdown().encode("utf-8"))
    atomic_write_bytes(folder.report_dir / REPORT_HTML, doc.html(f"addiff-fl run report: {name}").encode("utf-8"))
    if not any(fig_dir.iterdir()):
        try:
            fig_dir.rmdir()
        except OSError:
            pass
    return md
