"""What every report section gets (one signature: ``section(ctx: ReportContext) -> None``) and
the one way a section draws a figure."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..run_folder import FIGURES_DIR
from .document import Doc
from .run_data import RunData

log = logging.getLogger("addiff_core.report")


@dataclass
class ReportContext:
    doc: Doc
    data: RunData
    fig_dir: Path | None  # None: no figures (``--no-figures``)
    site_files: list[Path] | None  # given with ``--site``; None: the run's own site files
    notes: list[str]  # missing or unreadable inputs, listed at the end of the report


def figure(ctx: ReportContext, alt: str, name: str, fn: str, *args, **kw) -> bool:
    """Call ``plots.<fn>(fig_dir / name, *args, **kw)`` and add the image; on failure a note
    instead (a figure never stops the report)."""
    path = ctx.fig_dir / name
    try:
        from .. import plots

        getattr(plots, fn)(path, *args, **kw)
    except Exception as e:  # noqa: BLE001 - a figure must never stop the report
        log.warning("report: figure %s failed: %s", path.name, e, exc_info=log.isEnabledFor(logging.DEBUG))
        ctx.doc.p(f"(figure `{path.name}` could not be drawn: {type(e).__name__}: {e})")
        ctx.notes.append(f"figure `{path.name}` failed: {type(e).__name__}: {e}")
        return False
    ctx.doc.img(alt, f"{FIGURES_DIR}/{path.name}")
    return True
