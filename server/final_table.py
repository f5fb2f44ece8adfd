"""The final per-site table of a run: one row per site that is planned or ever took part, each
with its status ("ok", "no reply", "final evaluation failed: ...", the rounds it was left out of),
the notes printed above it (what ran, warnings), and its files (``addiff_core.site_table``
renders them, ``addiff_core.run_folder`` writes them)."""
from __future__ import annotations

from pathlib import Path

from addiff_core.run_folder import RunFolder
from addiff_core.site_table import columns, covered, csv_text, is_overall, markdown_document, number, with_overall

from .settings import RunSettings


def ranges(nums: list[int]) -> str:
    """[3, 4, 6] -> '3-4, 6'."""
    out, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            out.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ", ".join(out)


def planned_names(settings: RunSettings) -> list[str]:
    """Names of the planned sites where the server can know them: in a simulation, from the
    site files (the ``name`` field; the file name if unreadable). A deployment plans no
    names (``site-files`` is empty): its sites are known from their replies."""
    from addiff_core.config import load_yaml

    names = []
    for f in settings.site_files:
        try:
            doc = load_yaml(f)
            name = str(doc.get("name")) if isinstance(doc, dict) and doc.get("name") else f.stem
        except Exception:  # noqa: BLE001 - a name is all we want here
            name = f.stem
        names.append(name)
    return names


def expected_sites(rows: list[dict], settings: RunSettings) -> int:
    return max(len(rows), len(settings.site_files), settings.wait_sites, settings.required_sites)


def _site_names(rows: list[dict], errors: list[dict], history: list[dict], settings: RunSettings) -> list[str]:
    """Every planned site, then every site seen. A node known only by its id (a deployment: it
    failed before any reply named it) gets a row only while the named sites fall short of the
    expected number: a SuperNode that was restarted under a new node id has replied by its name,
    and its old id is not a site."""
    planned = planned_names(settings)
    seen = [str(r["site"]) for r in history if r.get("site")] + [str(e["site"]) for e in errors]
    names = list(dict.fromkeys(planned + [r["site"] for r in rows]
                               + [x for x in seen if not (planned and x.startswith("node-"))]))
    named = [x for x in names if not x.startswith("node-")]
    room = max(0, expected_sites(rows, settings) - len(named))
    return named + [x for x in names if x.startswith("node-")][:room]


def with_status(rows: list[dict], errors: list[dict], history: list[dict], settings: RunSettings) -> list[dict]:
    """One row per site that is planned or ever took part, each with its ``status``: "ok",
    "no reply", "final evaluation failed: ..." (or "rejected: ...": a reply under a name its node
    may not use, an implausible case count) and the rounds it was left out of. ``history``:
    the run's metrics rows before the final evaluation."""
    trained: dict[str, set[int]] = {}
    for r in history:
        if r.get("kind") == "train":
            trained.setdefault(str(r["site"]), set()).add(int(r["round"]))
    failed = {str(e["site"]): ("rejected: " if e.get("kind") == "rejected" else "") + str(e.get("reason", ""))
              for e in errors}
    by_site = {r["site"]: r for r in rows}
    out = []
    for name in _site_names(rows, errors, history, settings):
        missed = [n for n in range(1, settings.num_rounds + 1) if n not in trained.get(name, set())]
        if name in by_site:
            status = "ok"
        elif name in failed:
            status = "final evaluation " + failed[name].replace("site failed", "failed")
        else:
            status = "no reply"
        if not trained.get(name):
            status += "; trained in no round"
        elif missed:
            status += f"; left out in round{'s' if len(missed) > 1 else ''} {ranges(missed)}"
        row = dict(by_site.get(name, {"site": name, "cases": 0}))
        row["status"] = status
        out.append(row)
    return out


def final_notes(settings: RunSettings, strategy, rows: list[dict]) -> list[str]:
    """What ran (aggregation, central DP with its epsilon, per-site DP) and warnings (a robust
    strategy that trimmed nothing; a site where the model is worse than predicting 0 Gy)."""
    from addiff_core.run_summary import privacy_of_rows, run_lines, worse_than_zero_dose

    rc = settings.to_json()
    eps = strategy.epsilon() if hasattr(strategy, "epsilon") else None
    lines = run_lines(rc, n_sites=len(rows) or None, central_epsilon=eps, rounds=settings.num_rounds,
                      privacy=privacy_of_rows(rows))
    return lines + worse_than_zero_dose(rows, rc)


def write_tables(run_dir: Path, rows: list[dict], planned: int | None = None, notes: list[str] = ()) -> None:
    """``final_metrics.csv`` / ``.md`` (with the all-sites row and the notes) and ``.json`` (the rows)."""
    RunFolder(run_dir).write_final_tables(csv_text(rows, planned), markdown_document(rows, planned, notes), rows)


# the terminal's columns (header, row key); final_metrics.csv/.md keep every column
TERMINAL_COLUMNS = (("site", "site"), ("cases", "cases"), ("MAE Gy", "mae_gy"), ("dose score", "openkbp_dose_score"),
                    ("DVH score", "openkbp_dvh_score"), ("isodose Dice", "mean_isodose_dice"),
                    ("gamma %", "gamma_pass_rate"), ("constraints met", "constraint_compliance_pred"),
                    ("DP", "dp_enabled"), ("status", "status"))


def terminal_table(rows: list[dict], planned: int | None = None) -> str:
    """The final table as the console shows it: the columns of :data:`TERMINAL_COLUMNS` (at most
    120 characters for a few sites), a status in a word (``*``: in full below it), and where the
    rest is."""
    full = with_overall(rows, planned)
    if not full:
        return "(no site returned metrics)"
    total = max(planned or 0, len(rows))
    body = [[_terminal_cell(r, key, f"{len(covered(rows))} of {total}") for _, key in TERMINAL_COLUMNS] for r in full]
    head = [h for h, _ in TERMINAL_COLUMNS]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.rjust(w) if i not in (0, len(head) - 1) else c.ljust(w) for i, (c, w)
                       in enumerate(zip(cells, widths))).rstrip() for cells in [head, *body]]
    long = [f"  * {r['site']}: {r['status']}" for r in full if _short_status(r.get("status")).endswith("*")]
    extra = len(set(columns(full)) - {key for _, key in TERMINAL_COLUMNS})
    return "\n".join(lines + long + [f"{extra} more columns (all sites: case-weighted): final_metrics.csv / .md and "
                                      "report/ in the run folder"])


def _short_status(status: object) -> str:
    """"final evaluation failed: CODE; left out in round 3" -> "failed *" (``*``: more below)."""
    text = str(status or "ok")
    short = text.split(";")[0].removeprefix("final evaluation ").split(":")[0]
    return short if short == text else f"{short} *"


def _terminal_cell(row: dict, key: str, share: str) -> str:
    v = row.get(key)
    if is_overall(row):
        if key == "site":
            return f"all sites ({share})"
        if key in ("dp_enabled", "status"):
            return ""
    if key == "dp_enabled":
        eps = number(row.get("epsilon"))
        return "n/a" if v is None else "off" if not number(v) else f"eps {eps:.3g}" if eps is not None else "on"
    if key == "status":
        return _short_status(v)
    if key in ("site", "cases"):
        return str(v)
    f = number(v)
    return "n/a" if f is None else f"{f:.4g}"

