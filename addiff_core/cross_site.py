"""The cross-site matrix of a run (issue #25): every model on every site's held-out cases.

Rows: ``global``, ``<site> local`` (trained alone), ``<site> personalized`` (fine-tuned there);
columns: where it was evaluated; a cell: that site's held-out means of :data:`MATRIX_METRICS` and
its case count. A site's own model leaves home only if its site file says
``share_models_for_evaluation: true`` (else "at home only"). Flower-free: the server fills a
:class:`Matrix` from the replies; every number is checked against :data:`BOUNDS` (a site may lie:
an implausible one becomes an empty cell); writes ``cross_site.csv/.json/.md`` and the heat map.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CROSS_SITE_JSON, CROSS_SITE_CSV, CROSS_SITE_MD = "cross_site.json", "cross_site.csv", "cross_site.md"
MATRIX_METRICS: tuple[tuple[str, str], ...] = (
    ("mae_gy", "MAE (Gy)"), ("openkbp_dose_score", "dose score (Gy)"), ("openkbp_dvh_score", "DVH score (Gy)"),
    ("mean_isodose_dice", "isodose Dice"))
LOWER_IS_BETTER = {"mae_gy": True, "openkbp_dose_score": True, "openkbp_dvh_score": True, "mean_isodose_dice": False}
# what a held-out mean can be: doses in Gy below 1000 (no plan prescribes that), a Dice in [0, 1]
BOUNDS = {"mae_gy": (0.0, 1000.0), "openkbp_dose_score": (0.0, 1000.0), "openkbp_dvh_score": (0.0, 1000.0),
          "mean_isodose_dice": (0.0, 1.0)}
HOME, AWAY = "home", "elsewhere"


def bounded(key: str, value: Any) -> float | None:
    """``value`` as a float if it is a finite number within ``BOUNDS[key]``, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    lo, hi = BOUNDS[key]
    return v if math.isfinite(v) and lo <= v <= hi else None


def cell_of(metrics: dict, cases: int) -> dict[str, Any]:
    """A cell from a site's metrics: each matrix metric bounded (None if implausible or absent)."""
    return {"cases": int(cases), **{k: bounded(k, metrics.get(k)) for k, _ in MATRIX_METRICS}}


NUM_CASES = "num-cases"


def prefixed_key(prefix: str, name: str) -> str:
    """How a reply names one model's metric ``name`` (or :data:`NUM_CASES`): ``prefix.name``;
    written by ``client.site_models``, read by ``server.cross_site.prefixed_cell``."""
    return f"{prefix}.{name}"


def prefixed_metrics(prefix: str, num_cases: int, metrics: dict[str, float]) -> dict[str, float]:
    """One model's held-out metrics and case count as a reply carries them (:func:`prefixed_key`)."""
    return {prefixed_key(prefix, NUM_CASES): float(num_cases)} | {prefixed_key(prefix, k): float(v)
                                                                  for k, v in metrics.items()}


@dataclass
class ModelRow:
    model: str  # "global", "<site> local", "<site> personalized"
    kind: str  # global | local | personalized
    owner: str | None  # the site that trained it (None: global)
    shared: bool  # evaluated at the other sites too
    status: str = "ok"  # or why there is no number: "off", "refused (privacy budget)", "failed: ..."


@dataclass
class Matrix:
    sites: list[str]
    rows: list[ModelRow] = field(default_factory=list)
    cells: dict[tuple[str, str], dict] = field(default_factory=dict)  # (model, site) -> cell
    notes: list[str] = field(default_factory=list)

    def add_row(self, row: ModelRow) -> None:
        if all(r.model != row.model for r in self.rows):
            self.rows.append(row)

    def put(self, model: str, site: str, cell: dict) -> None:
        self.cells[(model, site)] = cell

    def where(self, row: ModelRow) -> str:
        if row.kind == "global":
            return "every site"
        return "every site (shared by its site file)" if row.shared else "at home only (not shared)"

    # -- outputs -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        from .formats import json_safe

        return json_safe({
            "metrics": [k for k, _ in MATRIX_METRICS], "sites": self.sites,
            "models": [{"model": r.model, "kind": r.kind, "owner": r.owner, "shared": r.shared,
                        "evaluated": self.where(r), "status": r.status} for r in self.rows],
            "cells": [{"model": m, "site": s, "at": HOME if self._owner(m) in (None, s) else AWAY, **c}
                      for (m, s), c in self.cells.items()],
            "notes": self.notes})

    def _owner(self, model: str) -> str | None:
        return next((r.owner for r in self.rows if r.model == model), None)

    def csv_rows(self) -> list[dict]:
        out = []
        for r in self.rows:
            for s in self.sites:
                c = self.cells.get((r.model, s))
                if c is None:
                    continue
                out.append({"model": r.model, "kind": r.kind, "owner": r.owner or "", "site": s,
                            "at": HOME if r.owner in (None, s) else AWAY, **c})
        return out

    def markdown(self) -> str:
        from .formats import markdown_table

        lines = ["# Cross-site evaluation: every model on every site's held-out cases", "",
                 "Rows: models (global: the final global model; local: the site trained alone with its federation "
                 "budget; personalized: the global model fine-tuned at the site). Columns: the site whose held-out "
                 "cases were used. Only numbers travel; a site's own model leaves it only if its site file says "
                 "`share_models_for_evaluation: true`, else its row is evaluated at home only. "
                 "`-`: not evaluated there; n/a: no plausible number.", ""]
        lines += [f"- {n}" for n in self.notes] + ([""] if self.notes else [])
        for key, title in MATRIX_METRICS:
            better = "lower is better" if LOWER_IS_BETTER[key] else "higher is better"
            lines += [f"## {title} ({better})", ""]
            head = ["model", *self.sites, "evaluated"]
            body = [[r.model, *[self._text(r, s, key) for s in self.sites],
                     self.where(r) if r.status == "ok" else r.status] for r in self.rows]
            lines += [markdown_table(head, body), ""]
        return "\n".join(lines)

    def _text(self, row: ModelRow, site: str, key: str) -> str:
        c = self.cells.get((row.model, site))
        if c is None:
            return "-"
        v = c.get(key)
        return "n/a" if v is None else f"{v:.4g}"

    def write(self, run_dir: Path) -> list[Path]:
        """``cross_site.json``, ``.csv``, ``.md`` in the run folder (atomically); returns the paths."""
        from .checkpoint import atomic_write_bytes
        from .formats import csv_text

        run_dir = Path(run_dir)
        cols = ["model", "kind", "owner", "site", "at", "cases", *[k for k, _ in MATRIX_METRICS]]
        files = {CROSS_SITE_JSON: json.dumps(self.to_json(), indent=2),
                 CROSS_SITE_CSV: csv_text(cols, self.csv_rows(),
                                          cell=lambda v: "" if v is None else v),
                 CROSS_SITE_MD: self.markdown()}
        for name, text in files.items():
            atomic_write_bytes(run_dir / name, text.encode("utf-8"))
        return [run_dir / n for n in files]


def read_matrix(run_dir: Path) -> dict | None:
    """``cross_site.json`` of a run (None if absent)."""
    path = Path(run_dir) / CROSS_SITE_JSON
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def grid_of(doc: dict, key: str) -> tuple[list[str], list[str], list[list[float]]]:
    """(model names, sites, values) of one metric from ``cross_site.json``; nan where no number."""
    sites = [str(s) for s in doc.get("sites", [])]
    models = [str(m["model"]) for m in doc.get("models", [])]
    cells = {(str(c["model"]), str(c["site"])): c for c in doc.get("cells", [])}
    vals = [[bounded(key, cells.get((m, s), {}).get(key)) for s in sites] for m in models]
    return models, sites, [[math.nan if v is None else v for v in row] for row in vals]


def heatmap(path: Path, doc: dict) -> Path:
    """One panel per matrix metric: models x sites, the number in each cell (empty: not evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(MATRIX_METRICS)
    models = [str(m["model"]) for m in doc.get("models", [])]
    sites = [str(s) for s in doc.get("sites", [])]
    fig, axes = plt.subplots(1, n, figsize=(2.2 + 1.1 * max(len(sites), 1) * n, 1.2 + 0.45 * max(len(models), 1)),
                             squeeze=False)
    for ax, (key, title) in zip(axes[0], MATRIX_METRICS):
        _, _, vals = grid_of(doc, key)
        arr = np.ma.masked_invalid(np.array(vals, dtype=float).reshape(len(models), len(sites)))
        cmap = plt.get_cmap("viridis_r" if LOWER_IS_BETTER[key] else "viridis").copy()
        cmap.set_bad("#eeeeee")
        ax.imshow(arr, cmap=cmap, aspect="auto")
        for i in range(len(models)):
            for j in range(len(sites)):
                if not np.ma.is_masked(arr[i, j]):
                    ax.text(j, i, f"{float(arr[i, j]):.3g}", ha="center", va="center", fontsize=7, color="black",
                            bbox={"facecolor": "white", "alpha": 0.6, "lw": 0, "pad": 1})
        ax.set_xticks(range(len(sites)), sites, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(models)), models if ax is axes[0][0] else [""] * len(models), fontsize=7)
        ax.set_title(f"{title}\n({'lower' if LOWER_IS_BETTER[key] else 'higher'} is better)", fontsize=8)
    fig.suptitle("every model on every site's held-out cases (grey: not evaluated there)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def verdicts(doc: dict, key: str = "mae_gy") -> list[dict]:
    """Per site, at home: does the personalized model beat the global one, and the global the
    local one (by ``key``; None where a number is missing)."""
    models, sites, vals = grid_of(doc, key)
    row = {m: r for m, r in zip(models, vals)}
    lower = LOWER_IS_BETTER[key]

    def better(a: float, b: float) -> bool | None:
        if math.isnan(a) or math.isnan(b):
            return None
        return a < b if lower else a > b

    out = []
    for j, s in enumerate(sites):
        g = row.get("global", [math.nan] * len(sites))[j]
        p = row.get(f"{s} personalized", [math.nan] * len(sites))[j]
        loc = row.get(f"{s} local", [math.nan] * len(sites))[j]
        out.append({"site": s, "metric": key, "global": g, "personalized": p, "local": loc,
                    "personalized_beats_global": better(p, g), "global_beats_local": better(g, loc)})
    return out
