"""The per-site held-out table of a run and its one "all sites" row (Flower-free).

The server writes it (``final_metrics.csv/.md/.json`` through :class:`run_folder.RunFolder`) and
prints it; the report reads it back and shows it with the same all-sites row
(:func:`overall_row`).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

OVERALL_PREFIX = "all sites"


def is_overall(row: dict) -> bool:
    """The all-sites row (not a site)."""
    return str(row.get("site", "")).startswith(OVERALL_PREFIX)


def number(v: Any) -> float | None:
    """A finite float, or None (None, '', 'nan', strings that are not numbers, bools)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def covered(rows: Iterable[dict]) -> list[dict]:
    """The sites that returned metrics: held-out cases > 0 and status "ok" (no status: ok)."""
    return [r for r in rows if (number(r.get("cases")) or 0) > 0 and str(r.get("status", "ok")).startswith("ok")]


def overall_row(rows: list[dict], keys: Iterable[str], planned: int | None = None) -> dict:
    """The all-sites row of per-site ``rows``: ``metrics.combine_site_means`` over the sites that
    returned metrics (the case-weighted mean of each key, the DVH score weighted by DVH cells,
    ``dvh_cells`` summed); None where no site has a value. With ``planned`` its name says how
    many of the planned sites it covers ("all sites (case-weighted, 2 of 3 sites)")."""
    from .metrics import combine_site_means

    used = covered(rows)
    name = (f"{OVERALL_PREFIX} (case-weighted)" if planned is None
            else f"{OVERALL_PREFIX} (case-weighted, {len(used)} of {max(planned, len(rows))} sites)")
    out: dict[str, Any] = {"site": name, "cases": int(sum(number(r.get("cases")) or 0 for r in used))}
    numeric = [{k: number(v) for k, v in r.items()} for r in used]  # CSV rows hold strings
    for k, v in combine_site_means(numeric, keys).items():
        out[k] = v if math.isfinite(v) else None
    return out


def columns(rows: list[dict]) -> list[str]:
    """site, cases, every other key in order of appearance, status last."""
    cols: list[str] = ["site", "cases"]
    for r in rows:
        cols += [k for k in r if k not in cols and k != "status"]
    return cols + (["status"] if any("status" in r for r in rows) else [])


def with_overall(rows: list[dict], planned: int | None = None) -> list[dict]:
    """Rows plus the all-sites row (:func:`overall_row` of every metric column), unless a single
    planned site answered."""
    total = max(planned or 0, len(rows))
    if total < 2 and len(covered(rows)) == total:
        return list(rows)
    keys = [c for c in columns(rows)[2:] if c != "status"]
    return list(rows) + [overall_row(rows, keys, total)]


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict], planned: int | None = None) -> str:
    """The table (with its all-sites row) in Markdown."""
    from .formats import markdown_table as md_table

    rows = with_overall(rows, planned)
    if not rows:
        return "(no site returned metrics)"
    cols = columns(rows)
    return md_table(cols, ([r.get(c, "") for c in cols] for r in rows), fmt=_cell)


def csv_text(rows: list[dict], planned: int | None = None) -> str:
    """The table (with its all-sites row) as CSV; a missing value is an empty cell, and no cell
    (a site's metric names are its own) is a spreadsheet formula (``formats.csv_cell``)."""
    from .formats import csv_text as table_csv

    full = with_overall(rows, planned)
    cols = columns(full) if full else ["site", "cases"]
    return table_csv(cols, full, cell=lambda v: "" if isinstance(v, float) and not math.isfinite(v) else v)


def markdown_document(rows: list[dict], planned: int | None = None, notes: Iterable[str] = ()) -> str:
    """``final_metrics.md``: a title, what the table is, the run's notes and the table."""
    notes = list(notes)
    return ("# Final global model: held-out metrics per site\n\n"
            "Each site evaluated the final global model on its own held-out cases and returned numbers only.\n\n"
            + "".join(f"- {n}\n" for n in notes) + ("\n" if notes else "")
            + markdown_table(rows, planned) + "\n")
