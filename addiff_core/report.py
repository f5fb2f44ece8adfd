"""``addiff report RUN_DIR``: a report a physicist can read in a minute.

Writes ``RUN_DIR/report/report.md``, the same as ``report.html`` (a tiny built-in renderer, no
extra dependency) and ``RUN_DIR/report/figures/*.png``:

1. **Run summary**: status and dates, strategy, rounds per stage, model essentials, the sites
   (training / held-out cases, rounds taken part in, failures) and differential privacy per
   site (epsilon spent, delta).
2. **Training**: loss per round per site, one figure per stage (from ``metrics.jsonl``
   ``"train"`` records; the weighted aggregate of the ``"round"`` records as a dashed line),
   and a per-stage summary table (rounds, loss first -> last, bytes on the wire, time).
3. **Held-out results**: the final global model on each site's held-out cases (from
   ``final_metrics.json``, else ``final_metrics.csv``, else the ``"final"`` records of
   ``metrics.jsonl``) with the key columns, a case-weighted "all sites" row and a bar chart of
   MAE per site.
4. **Comparison** (when ``RUN_DIR/comparison.json`` exists): federated vs. each site trained
   alone vs. pooled training. Format::

       {"metric": "mae_gy",                       # optional, default "mae_gy"
        "series": {"federated": {"hospital_a": 3.1, ...},   # optional: taken from the final table
                   "local":     {"hospital_a": 3.9, ...},   # each site trained on its own cases
                   "pooled":    {"hospital_a": 2.8, ...}},  # all cases in one place
        "note": "free text shown under the table"}         # optional

   A site value may also be a mapping of metrics (``{"mae_gy": 3.1, ...}``); ``metric`` picks one.
5. **Per-site figures**: for every site whose site file is readable here (``site_files``, else
   the run config's ``site-files``, resolved against the project root and the current folder),
   the final model (``final_model.pt``, else the newest valid round checkpoint) predicts the
   site's first held-out case (the same split and seed as the final evaluation); the report
   shows axial/coronal/sagittal slices of reference, predicted and difference dose on the CT,
   the DVH of targets and the most irradiated OARs, and a few DVH points. In a real deployment
   the server holds no patient data: sites without figures get a note on how to add them at
   the hospital (``addiff report RUN_DIR --site sites/x.yaml``); those figures stay there.

A single-site ``addiff train`` folder (``model.pt`` + ``metrics.json``) gets the same report
(training curves per epoch, its held-out row, its figures with ``--site``).

Nothing here raises for missing or broken inputs: each section says what is missing instead.
"""
from __future__ import annotations

import csv
import html
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

REPORT_DIR = "report"
FIG_DIR = "figures"
COMPARISON_FILE = "comparison.json"
MAX_OARS_IN_DVH = 6

# key columns of the held-out table: (metric key, header, kind); kind: "gy", "pct", "frac%", "num"
KEY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("mae_gy", "MAE (Gy)", "gy"),
    ("mae_pct_rx", "MAE (% Rx)", "pct"),
    ("mae_zero_dose_gy", "MAE of 0 Gy (Gy)", "gy"),
    ("openkbp_dose_score", "dose score (Gy)", "gy"),
    ("openkbp_dvh_score", "DVH score (Gy)", "gy"),
    ("mean_isodose_dice", "isodose Dice", "num"),
    ("spinal_cord_dmax_err_gy", "cord Dmax err (Gy)", "gy"),
    ("gamma_pass_rate", "gamma 3%/2mm (%)", "pct"),
    ("constraint_compliance_pred", "constraints met: pred", "frac%"),
    ("constraint_compliance_ref", "constraints met: ref", "frac%"),
)
METRIC_LEGEND = (
    "MAE: mean absolute dose difference in the body / possible-dose region (lower is better); "
    "MAE of 0 Gy: the MAE of predicting no dose at all (a model above it is useless); "
    "dose score: OpenKBP dose score (sum of |pred - ref| over the whole grid / possible-dose-mask voxels, "
    "the prediction being 0 outside the case's evaluation region, as OpenKBP's; Gy); "
    "DVH score: OpenKBP DVH score (|error| of D99/D95/D1 of targets and D0.1cc/Dmean of OARs, one mean over "
    "every case, structure and point of the cohort, Gy; the all-sites row weights it by those cells); "
    "isodose Dice: mean Dice of the 10..100 % Rx isodose volumes (1 = perfect); "
    "cord Dmax err: |Dmax pred - Dmax ref| in the spinal cord; "
    "gamma: pass rate 3 %/2 mm global, 10 % cutoff (higher is better); "
    "constraints met: fraction of the clinical dose-volume constraints the predicted (pred) and the "
    "planned (ref) dose meet. n/a: not computed or not applicable.")


# ------------------------------------------------------------------------------------------
# document blocks: rendered to Markdown and to HTML
# ------------------------------------------------------------------------------------------
@dataclass
class Doc:
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Iterable[str]) -> None:
        items = list(items)
        if items:
            self.blocks.append(("ul", items))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", list(headers), [[str(c) for c in r] for r in rows]))

    def img(self, alt: str, rel: str) -> None:
        self.blocks.append(("img", alt, rel))

    # -- markdown ---------------------------------------------------------------------------
    def markdown(self) -> str:
        out: list[str] = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out.append("#" * b[1] + " " + b[2])
            elif kind == "p":
                out.append(b[1])
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif kind == "table":
                cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
                lines = ["| " + " | ".join(cell(c) for c in b[1]) + " |",
                         "|" + "|".join("---" for _ in b[1]) + "|"]
                lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in b[2]]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{b[1]}]({b[2]})")
        return "\n\n".join(out) + "\n"

    # -- html -------------------------------------------------------------------------------
    def html(self, title: str) -> str:
        body: list[str] = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                body.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(b[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{_inline(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "img":
                body.append(f'<figure><img src="{html.escape(b[2], quote=True)}" alt="{html.escape(b[1], quote=True)}">'
                            f"<figcaption>{html.escape(b[1])}</figcaption></figure>")
        css = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
               "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
               "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}"
               "th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
               "img{max-width:100%}figure{margin:1em 0}figcaption{color:#666;font-size:0.85em}"
               "code{background:#f4f4f4;padding:0 3px}")
        return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{css}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Escape, then the two inline marks the report uses: **bold** and `code`."""
    s = html.escape(str(text))
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


# ------------------------------------------------------------------------------------------
# reading the run folder (defensively)
# ------------------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    """A finite float, or None (None, '', 'nan', strings that are not numbers, bools)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        notes.append(f"`{path.name}` could not be read ({type(e).__name__}: {e}); ignored.")
        return None


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    rows: list[dict] = []
    if not path.is_file():
        return rows
    bad = 0
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        notes.append(f"`{path.name}` could not be read ({type(e).__name__}); training curves are missing.")
        return rows
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"`{path.name}`: {bad} unreadable line(s) skipped (e.g. a half-written last line).")
    return rows


def _read_csv_rows(path: Path, notes: list[str]) -> list[dict]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            out = []
            for r in csv.DictReader(fh):
                out.append({k: (_num(v) if _num(v) is not None else (v if k == "site" else None))
                            for k, v in r.items() if k})
            return out
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        notes.append(f"`{path.name}` could not be read ({type(e).__name__}).")
        return []


@dataclass
class RunData:
    path: Path
    kind: str  # "federated" | "local" | "unknown"
    run: dict = field(default_factory=dict)  # run.json
    run_config: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)  # ModelConfig as a dict
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl
    final: list[dict] = field(default_factory=list)  # per-site held-out rows
    final_source: str = ""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)  # stage -> site -> pts
    agg_curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # stage -> pts
    curve_x: str = "round"
    privacy: dict[str, dict] = field(default_factory=dict)  # site -> {dp_enabled, epsilon, delta}
    local: dict = field(default_factory=dict)  # metrics.json of an `addiff train` folder
    notes: list[str] = field(default_factory=list)  # what is missing / odd

    @property
    def train_rows(self) -> list[dict]:
        return [r for r in self.rows if r.get("kind") == "train"]

    @property
    def round_rows(self) -> list[dict]:
        return [r for r in self.rows if r.get("kind") == "round"]

    @property
    def error_rows(self) -> list[dict]:
        """Sites left out of a round: failed (error), update rejected by the server, or refused
        to train (privacy budget spent)."""
        return [r for r in self.rows if r.get("kind") in ("error", "rejected", "refused")]

    def sites(self) -> list[str]:
        names: list[str] = []
        named_errors = [r for r in self.error_rows if not str(r.get("site", "")).startswith("node-")]
        for r in self.train_rows + self.final + named_errors:
            s = r.get("site")
            if isinstance(s, str) and s and not s.startswith("all sites") and s not in names:
                names.append(s)
        return sorted(names)


def _is_overall(row: dict) -> bool:
    return str(row.get("site", "")).startswith("all sites")


def load_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    fed_markers = ("run.json", "metrics.jsonl", "final_metrics.json", "final_metrics.csv", "final_model.pt")
    is_fed = any((run_dir / m).exists() for m in fed_markers) or (run_dir / "checkpoints").is_dir()
    is_local = (run_dir / "model.pt").is_file() or (run_dir / "metrics.json").is_file()
    if is_fed or not is_local:
        return _load_federated(run_dir, "federated" if is_fed else "unknown")
    return _load_local(run_dir)


def _load_federated(run_dir: Path, kind: str) -> RunData:
    d = RunData(path=run_dir, kind=kind)
    notes = d.notes
    run = _read_json(run_dir / "run.json", notes)
    if isinstance(run, dict):
        d.run = run
        d.run_config = run.get("run_config") if isinstance(run.get("run_config"), dict) else {}
        d.model = run.get("model") if isinstance(run.get("model"), dict) else {}
    elif not (run_dir / "run.json").exists():
        notes.append("`run.json` is missing: the run summary is partial.")
    d.rows = _read_jsonl(run_dir / "metrics.jsonl", notes)
    if not (run_dir / "metrics.jsonl").exists():
        notes.append("`metrics.jsonl` is missing: no training curves.")
    if not d.model:  # from a checkpoint's model config
        ck = _model_checkpoint(d)
        if ck is not None:
            try:
                from .checkpoint import load_checkpoint

                _, cfg, meta = load_checkpoint(ck)
                d.model = cfg.to_dict()
                if not d.run_config and isinstance(meta.get("run_config"), dict):
                    d.run_config = meta["run_config"]
            except Exception as e:  # noqa: BLE001 - a report never fails on a bad file
                notes.append(f"`{ck.name}` could not be read ({e}).")

    # final table: json, else csv, else the "final" records
    fj = _read_json(run_dir / "final_metrics.json", notes)
    if isinstance(fj, list) and all(isinstance(r, dict) for r in fj):
        d.final, d.final_source = [r for r in fj if not _is_overall(r)], "final_metrics.json"
    elif (run_dir / "final_metrics.csv").is_file():
        d.final = [r for r in _read_csv_rows(run_dir / "final_metrics.csv", notes) if not _is_overall(r)]
        d.final_source = "final_metrics.csv"
    if not d.final:
        fin = [r for r in d.rows if r.get("kind") == "final"]
        if fin:
            last = max(int(_num(r.get("round")) or 0) for r in fin)
            d.final = [{k: v for k, v in r.items() if k not in ("kind", "round")} for r in fin
                       if int(_num(r.get("round")) or 0) == last]
            d.final_source = "metrics.jsonl (final records)"

    # a failed reply carries no site name, only its node: name it from the node's train records
    node_site = {str(r.get("node_id")): r.get("site") for r in d.train_rows
                 if r.get("node_id") is not None and isinstance(r.get("site"), str)}
    for r in d.error_rows:
        if str(r.get("site", "")).startswith("node-"):
            nid = str(r.get("node_id", str(r["site"])[5:]))
            if node_site.get(nid):
                r["site"] = node_site[nid]

    # curves per stage and site; the newest record wins when a resumed run repeated a round
    for r in d.train_rows:
        rnd, loss = _num(r.get("round")), _num(r.get("train_loss"))
        if rnd is None or loss is None:
            continue
        pts = d.curves.setdefault(str(r.get("stage", "?")), {}).setdefault(str(r.get("site", "?")), [])
        pts[:] = [p for p in pts if p[0] != rnd] + [(rnd, loss)]
    for r in d.round_rows:
        rnd, loss = _num(r.get("round")), _num(r.get("train_loss"))
        if rnd is None or loss is None:
            continue
        pts = d.agg_curves.setdefault(str(r.get("stage", "?")), [])
        pts[:] = [p for p in pts if p[0] != rnd] + [(rnd, loss)]
    for pts in [p for s in d.curves.values() for p in s.values()] + list(d.agg_curves.values()):
        pts.sort()

    # privacy per site: the newest train (or refusal) record of the site, then the final table
    for r in [r for r in d.rows if r.get("kind") in ("train", "refused")] + list(d.final):
        s = r.get("site")
        if not isinstance(s, str) or r.get("dp_enabled") is None:
            continue
        d.privacy[s] = {"dp_enabled": bool(_num(r.get("dp_enabled"))), "epsilon": _num(r.get("epsilon")),
                        "delta": _num(r.get("delta")), "noise_multiplier": _num(r.get("noise_multiplier"))}
    return d


def _load_local(run_dir: Path) -> RunData:
    d = RunData(path=run_dir, kind="local", curve_x="epoch")
    m = _read_json(run_dir / "metrics.json", d.notes)
    if not isinstance(m, dict):
        d.notes.append("`metrics.json` is missing or unreadable: no training curves or held-out table.")
        m = {}
    d.local = m
    site = str(m.get("site", "site"))
    hist = m.get("history") if isinstance(m.get("history"), list) else []
    if (run_dir / "model.pt").is_file():
        try:
            from .checkpoint import load_checkpoint

            _, cfg, meta = load_checkpoint(run_dir / "model.pt")
            d.model = cfg.to_dict()
            if not hist and isinstance(meta.get("history"), list):
                hist = meta["history"]
            site = str(meta.get("site", site))
        except Exception as e:  # noqa: BLE001
            d.notes.append(f"`model.pt` could not be read ({e}).")
    else:
        d.notes.append("`model.pt` is missing: no model for the figures.")
    for h in hist:
        if isinstance(h, dict) and _num(h.get("epoch")) is not None and _num(h.get("loss")) is not None:
            d.curves.setdefault(str(h.get("stage", "?")), {}).setdefault(site, []).append(
                (_num(h["epoch"]), _num(h["loss"])))
    held = m.get("heldout") if isinstance(m.get("heldout"), dict) else {}
    if isinstance(held.get("mean"), dict):
        d.final = [{"site": site, "cases": held.get("num_cases", 0), **held["mean"]}]
        d.final_source = "metrics.json"
    priv = m.get("privacy") if isinstance(m.get("privacy"), dict) else {}
    d.privacy[site] = {"dp_enabled": bool(_num(priv.get("dp_enabled"))), "epsilon": _num(priv.get("epsilon")),
                       "delta": _num(priv.get("delta")), "noise_multiplier": _num(priv.get("noise_multiplier"))}
    d.run = {"status": "complete" if (run_dir / "model.pt").is_file() else "incomplete"}
    d.run_config = {"model-kind": m.get("model", "")}
    return d


def _load_model_lenient(path: Path):
    """``local.load_model`` on the CPU, tolerating weights whose shape differs only by size-1
    dimensions (e.g. a 0-d buffer stored as shape (1,) after a round trip through numpy)."""
    from .checkpoint import load_checkpoint, load_model_state
    from .models import build_model

    state, cfg, meta = load_checkpoint(path)
    model = build_model(cfg)
    own = model.state_dict()
    state = {k: (v.reshape(own[k].shape) if k in own and tuple(v.shape) != tuple(own[k].shape)
                 and v.numel() == own[k].numel() else v) for k, v in state.items()}
    load_model_state(model, state, str(path))
    return model.eval(), cfg, meta


def _model_checkpoint(d: RunData) -> Path | None:
    """The file the figures use: final_model.pt / model.pt, else the newest round checkpoint."""
    for name in ("final_model.pt", "model.pt"):
        if (d.path / name).is_file():
            return d.path / name
    ck = sorted((d.path / "checkpoints").glob("round_*.pt")) if (d.path / "checkpoints").is_dir() else []
    return ck[-1] if ck else None


def load_report_model(d: RunData):
    """(model, cfg, meta, description) from the final model, else the newest checkpoint that
    loads; raises RuntimeError with a one-line reason when none does."""
    from .checkpoint import CheckpointError

    cands = [d.path / n for n in ("final_model.pt", "model.pt") if (d.path / n).is_file()]
    if (d.path / "checkpoints").is_dir():
        cands += sorted((d.path / "checkpoints").glob("round_*.pt"), reverse=True)
    problems = []
    for c in cands:
        try:
            model, cfg, meta = _load_model_lenient(c)
        except (CheckpointError, RuntimeError, ValueError, KeyError, OSError) as e:
            problems.append(f"{c.name}: {e}")
            continue
        if c.parent.name == "checkpoints":
            desc = (f"`checkpoints/{c.name}` (round {meta.get('round', '?')}, stage {meta.get('stage', '?')}): "
                    "the final model is not available, so this is the newest valid round checkpoint")
        else:
            desc = f"`{c.name}`"
        return model, cfg, meta, desc
    raise RuntimeError("no usable model: " + ("; ".join(problems[:3]) if problems else
                                              "no final_model.pt, model.pt or checkpoints/round_*.pt"))


# ------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------
def _fmt(v: Any, kind: str = "num") -> str:
    f = _num(v)
    if f is None:
        return "n/a"
    if kind == "gy":
        return f"{f:.2f}"
    if kind == "pct":
        return f"{f:.1f}"
    if kind == "frac%":
        return f"{100 * f:.0f} %"
    if kind == "int":
        return f"{int(round(f))}"
    return f"{f:.3g}" if abs(f) < 1e4 else f"{f:.4g}"


def _seq(v: Any) -> str:
    return "/".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f} MB"


def _duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def weighted_overall(rows: list[dict], keys: Iterable[str]) -> dict:
    """The all-sites row: ``metrics.combine_site_means`` (case-weighted mean of each key over the
    rows with a finite value and cases > 0; the DVH score weighted by DVH cells); None where none."""
    from .metrics import combine_site_means

    out: dict[str, Any] = {"site": "all sites (case-weighted)",
                           "cases": int(sum(_num(r.get("cases")) or 0 for r in rows))}
    numeric = [{k: _num(v) for k, v in r.items()} for r in rows]  # CSV rows hold strings
    for k, v in combine_site_means(numeric, keys).items():
        out[k] = v if math.isfinite(v) else None
    return out


# ------------------------------------------------------------------------------------------
# site files
# ------------------------------------------------------------------------------------------
def _project_root() -> Path:
    env = os.environ.get("ADDIFF_PROJECT_DIR")
    if env:
        return Path(env).expanduser().resolve()
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd().resolve()


def resolve_site_file(value: str | Path) -> Path:
    """A site file path as given: absolute, else against the project root, else the cwd."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    for base in (_project_root(), Path.cwd()):
        if (base / p).is_file():
            return (base / p).resolve()
    return (_project_root() / p).resolve()


def _planned_site_files(d: RunData) -> list[str]:
    v = d.run_config.get("site-files")
    if isinstance(v, str) and v.strip():
        return [s.strip() for s in v.split(",") if s.strip()]
    if isinstance(v, list):
        return [str(s) for s in v]
    sp = d.run.get("sites_planned")
    return [str(s) for s in sp] if isinstance(sp, list) else []


# ------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------
def _summary(doc: Doc, d: RunData) -> None:
    doc.h(2, "Run summary")
    run, rc, m = d.run, d.run_config, d.model
    items: list[str] = []
    kind = {"federated": "federated", "local": "single site (`addiff train`)"}.get(d.kind, "unknown")
    items.append(f"**Run**: {kind}, status **{run.get('status', 'unknown')}**")
    dates = [f"created {run['created']}" if run.get("created") else "",
             f"finished {run['finished']}" if run.get("finished") else ""]
    if isinstance(run.get("resumed"), list) and run["resumed"]:
        dates.append(f"resumed {len(run['resumed'])}x (last {run['resumed'][-1]})")
    if any(dates):
        items.append("**Dates**: " + ", ".join(x for x in dates if x))
    if d.kind == "federated":
        strategy = rc.get("strategy") or next((r.get("strategy") for r in d.round_rows if r.get("strategy")), None)
        from .run_summary import central_dp_text, robustness_warning, site_dp_text, strategy_text, worse_than_zero_dose

        rcs = {**rc, "strategy": strategy}
        n_sites = len(d.sites()) or None
        items.append(f"**Strategy**: {strategy_text(rcs, n_sites) if strategy else 'unknown'}")
        eps = next((_num(r.get("central_dp_epsilon")) for r in reversed(d.round_rows)
                    if _num(r.get("central_dp_epsilon")) is not None), None)
        items.append(f"**Central DP**: {central_dp_text(rc, eps, len(d.round_rows) or None)}")
        items.append(f"**Per-site DP (DP-SGD)**: {site_dp_text(d.privacy)}")
        items += [f"**Warning**: {w}" for w in [robustness_warning(rcs, n_sites)] if w]
        items += [f"**Warning**: {w[len('WARNING: '):]}" for w in worse_than_zero_dose(d.final, rc)]
        plan = _stage_plan(d)
        if plan:
            done = {}
            for r in d.round_rows:
                done[str(r.get("stage"))] = done.get(str(r.get("stage")), 0) + 1
            items.append("**Rounds**: " + ", ".join(f"{st} {done.get(st, 0)}/{n}" for st, n in plan.items())
                         + f" (total {sum(plan.values())})")
        le = _num(rc.get("local-epochs"))
        items.append("**Local epochs per round**: " + (f"{int(le)}" if le else "each site file's own"))
        if rc.get("seed") is not None:
            items.append(f"**Seed**: {rc.get('seed')}")
        total = sum(_num(r.get("seconds")) or 0 for r in d.round_rows)
        wire = sum((_num(r.get("bytes_down")) or 0) + (_num(r.get("bytes_up")) or 0) for r in d.round_rows)
        if d.round_rows:
            items.append(f"**Training time (rounds)**: {_duration(total)}; **on the wire**: {_mb(wire)}")
    else:
        lm = d.local
        if lm:
            items.append(f"**Training**: {_duration(_num(lm.get('train_seconds')))}"
                         + (f", {len(lm['skipped'])} case(s) skipped" if isinstance(lm.get("skipped"), dict)
                            and lm["skipped"] else ""))
    if m:
        g = m.get("grid") if isinstance(m.get("grid"), dict) else {}
        sp = g.get("spacing")
        grid = f"{g.get('size', '?')}^3 voxels" + (f" at {sp} mm" if sp else " at each CT's own spacing, centred on the targets")
        s = f"**Model**: {m.get('kind', '?')}, grid {grid}"
        if m.get("kind") == "diffusion":
            s += (f", VAE channels {_seq(m.get('vae_channels'))}, latent {m.get('latent_channels')} ch, "
                  f"denoiser {_seq(m.get('unet_channels'))}, DDIM steps {m.get('sample_steps')}")
        else:
            s += f", channels {_seq(m.get('unet_channels'))}"
        items.append(s)
        if rc.get("model-config"):
            items.append(f"**Model config file**: `{rc['model-config']}`")
    else:
        items.append("**Model**: unknown (no run.json and no readable checkpoint)")
    if _num(rc.get("eval-steps")):
        items.append(f"**Evaluation**: {int(_num(rc['eval-steps']))} DDIM steps"
                     + ("" if rc.get("eval-gamma", True) else ", gamma not computed"))
    doc.ul(items)

    # sites
    sites = d.sites()
    planned = _planned_site_files(d)
    if not sites and not planned:
        doc.p("No site has reported anything yet.")
        return
    dp_any = any(p.get("dp_enabled") for p in d.privacy.values())
    final_by = {r.get("site"): r for r in d.final}
    headers = ["site", "training cases", "held-out cases"]
    if d.kind == "federated":
        headers += ["rounds trained", "left out (failed/rejected/refused)"]
    headers += ["DP", "epsilon spent", "delta"] if dp_any else ["DP"]
    rows = []
    for s in sites:
        tr = [r for r in d.train_rows if r.get("site") == s]
        ntrain = _num(tr[-1].get("num_examples")) if tr else _num(d.local.get("train_cases")) if d.local else None
        nheld = _num(final_by.get(s, {}).get("cases"))
        if nheld is None and d.local:
            nheld = _num(d.local.get("heldout_cases"))
        row = [s, _fmt(ntrain, "int"), _fmt(nheld, "int")]
        if d.kind == "federated":
            row += [str(len({r.get('round') for r in tr})),
                    str(len([r for r in d.error_rows if r.get("site") == s]))]
        p = d.privacy.get(s, {})
        row.append("on" if p.get("dp_enabled") else "off")
        if dp_any:
            row += [_fmt(p.get("epsilon")) if p.get("dp_enabled") else "-",
                    _fmt(p.get("delta")) if p.get("dp_enabled") else "-"]
        rows.append(row)
    if rows:
        doc.table(headers, rows)
    if dp_any:
        doc.p("DP: sample-level differential privacy (DP-SGD). Epsilon is cumulative over every round the site "
              "trained so far (as the site's own accountant reports it, for the delta shown).")
    missing = [f for f in planned if Path(f).stem not in sites]
    if planned and len(planned) > len(sites):
        doc.p(f"Planned site files: {len(planned)}; sites that reported: {len(sites)}"
              + (f" (not yet seen: {', '.join(Path(f).stem for f in missing)})" if missing else "") + ".")


def _stage_plan(d: RunData) -> dict[str, int]:
    plan: dict[str, int] = {}
    sched = d.run.get("schedule")
    if isinstance(sched, list):
        for r in sched:
            if isinstance(r, dict) and r.get("stage"):
                plan[str(r["stage"])] = plan.get(str(r["stage"]), 0) + 1
    if not plan:
        for r in d.round_rows:
            plan.setdefault(str(r.get("stage")), 0)
            plan[str(r.get("stage"))] += 1
    return plan


def _training(doc: Doc, d: RunData, fig_dir: Path | None, notes: list[str]) -> None:
    doc.h(2, "Training")
    if not d.curves:
        doc.p("No training records yet (`metrics.jsonl` / `metrics.json` has no loss values).")
        return
    stages = list(_stage_plan(d)) if d.kind == "federated" else []
    stages += [s for s in d.curves if s not in stages]
    what = {"vae": "stage 1: the VAE (L1 reconstruction + beta KL)",
            "diffusion": "stage 2: the latent diffusion model (noise MSE + constraint hinge), VAE frozen",
            "unet": "the direct-regression U-Net baseline (masked L1 + constraint hinge)"}
    for st in stages:
        if st not in d.curves:
            continue
        doc.h(3, f"Stage {st}")
        doc.p(f"Training loss of {what.get(st, st)}, per {d.curve_x} "
              + ("and site (the last local epoch of each round); dashed: the case-weighted mean over the sites."
                 if d.kind == "federated" else "(mean over the epoch's batches)."))
        if fig_dir is not None:
            curves = dict(sorted(d.curves[st].items()))
            styles = {}
            if d.agg_curves.get(st):
                curves["all sites (weighted)"] = d.agg_curves[st]
                styles["all sites (weighted)"] = {"color": "k", "ls": "--", "lw": 2.0}
            _figure(doc, notes, f"training loss, stage {st}", fig_dir / f"training_{st}.png",
                    "curves_figure", curves, d.curve_x, "training loss",
                    title=f"training loss, stage {st}", logy=_wants_log(curves), styles=styles)
    if d.kind == "federated" and d.round_rows:
        rows = []
        for st in stages:
            rr = sorted((r for r in d.round_rows if str(r.get("stage")) == st), key=lambda r: _num(r.get("round")) or 0)
            if not rr:
                continue
            wire = sum((_num(r.get("bytes_down")) or 0) + (_num(r.get("bytes_up")) or 0) for r in rr)
            rows.append([st, str(len(rr)), _fmt(rr[0].get("train_loss")), _fmt(rr[-1].get("train_loss")),
                         _mb(wire), _duration(sum(_num(r.get("seconds")) or 0 for r in rr))])
        doc.table(["stage", "rounds done", "loss, first round", "loss, last round", "on the wire", "time"], rows)
    if d.error_rows:
        doc.p(f"**{len(d.error_rows)} time(s) a site was left out of a round** (failed, update rejected by the "
              "server's checks, or refused to train because its privacy budget was spent):")
        doc.ul(f"round {r.get('round', '?')} ({r.get('stage', '?')}): {r.get('site', '?')} {r.get('kind')}: "
               f"{_short_reason(r.get('reason', ''))}" for r in d.error_rows[:20])
        if len(d.error_rows) > 20:
            doc.p(f"... and {len(d.error_rows) - 20} more in `metrics.jsonl`.")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _short_reason(reason: Any, limit: int = 300) -> str:
    """One line of a failure reason: ANSI colours removed; of a traceback, its last message line."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(reason)).splitlines()]
    lines = [ln for ln in lines if ln and set(ln) - set("^~ ")]
    if not lines:
        return "(no reason given)"
    text = lines[-1] if len(lines) > 1 else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _wants_log(curves: dict[str, list[tuple[float, float]]]) -> bool:
    ys = [y for pts in curves.values() for _, y in pts if y > 0]
    return bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 30 and all(y > 0 for pts in curves.values() for _, y in pts)


def _heldout(doc: Doc, d: RunData, fig_dir: Path | None, notes: list[str]) -> None:
    who = "the final global model" if d.kind == "federated" else "the trained model"
    doc.h(2, "Held-out results")
    if not d.final:
        doc.p("No held-out results: `final_metrics.json` / `final_metrics.csv` are missing "
              + ("(the run has not finished its final evaluation)." if d.run.get("status") != "complete"
                 else "(the final evaluation returned nothing)."))
        return
    if d.kind == "federated":
        doc.p(f"Each site evaluated {who} on its own held-out cases (never used in training) and "
              f"returned numbers only. Source: `{d.final_source}`; all columns: `final_metrics.csv`.")
    else:
        doc.p(f"{who[0].upper() + who[1:]} on the site's held-out cases (never used in training). "
              f"Source: `{d.final_source}` (also per case).")
    keys = [k for k, _, _ in KEY_COLUMNS if any(_num(r.get(k)) is not None for r in d.final)
            or k in ("mae_gy",)]
    dp_any = any(p.get("dp_enabled") for p in d.privacy.values())
    headers = ["site", "cases"] + [h for k, h, _ in KEY_COLUMNS if k in keys] + (["epsilon"] if dp_any else [])
    kinds = {k: kd for k, _, kd in KEY_COLUMNS}
    rows = sorted(d.final, key=lambda r: str(r.get("site")))
    table = rows + ([weighted_overall(rows, keys)] if len(rows) > 1 else [])
    out = []
    for r in table:
        line = [str(r.get("site", "?")), _fmt(r.get("cases"), "int")] + [_fmt(r.get(k), kinds[k]) for k in keys]
        if dp_any:
            p = d.privacy.get(r.get("site"), {})
            line.append(_fmt(p.get("epsilon")) if p.get("dp_enabled") else "-")
        out.append(line)
    doc.table(headers, out)
    from .run_summary import worse_than_zero_dose

    for w in worse_than_zero_dose(d.final, d.run_config):
        doc.p(f"**{w}**")
    doc.p(METRIC_LEGEND)


def _comparison(doc: Doc, d: RunData, fig_dir: Path | None, notes: list[str]) -> None:
    comp = _read_json(d.path / COMPARISON_FILE, notes)
    metric = "mae_gy"
    series: dict[str, dict[str, float]] = {}
    if isinstance(comp, dict):
        metric = str(comp.get("metric") or metric)
        raw = comp.get("series") if isinstance(comp.get("series"), dict) else {}
        for name, vals in raw.items():
            if not isinstance(vals, dict):
                continue
            s = {}
            for site, v in vals.items():
                v = v.get(metric) if isinstance(v, dict) else v
                if _num(v) is not None:
                    s[str(site)] = float(_num(v))
            if s:
                series[str(name)] = s
    fed_name = "federated" if d.kind == "federated" else "trained here"
    if fed_name not in series:
        own = {str(r.get("site")): float(_num(r.get(metric))) for r in d.final if _num(r.get(metric)) is not None}
        if own:
            series = {fed_name: own, **series}
    label = {"mae_gy": "MAE (Gy)"}.get(metric, metric)
    doc.h(2, "Comparison" if len(series) > 1 else f"{label} per site")
    if not series:
        doc.p(f"No {label} values to compare (no held-out results and no `{COMPARISON_FILE}`).")
        return
    if len(series) > 1:
        doc.p(f"{label} of the same held-out cases for each training setup (from `{COMPARISON_FILE}`): "
              "federated = the final global model, local = each site trained on its own cases alone, "
              "pooled = all cases in one place (what federation tries to match without moving data).")
        sites = sorted({s for v in series.values() for s in v})
        rows = [[s] + [_fmt(series[n].get(s), "gy" if metric.endswith("_gy") else "num") for n in series] for s in sites]
        doc.table(["site"] + list(series), rows)
        if isinstance(comp, dict) and comp.get("note"):
            doc.p(str(comp["note"]))
    else:
        doc.p(f"Only this run's results are available; add `{COMPARISON_FILE}` to the run folder "
              "to compare with local and pooled training (format: see `addiff_core/report.py`).")
    if fig_dir is not None:
        _figure(doc, notes, f"{label} per site", fig_dir / "mae_per_site.png", "bar_figure", series, label,
                title=f"held-out {label} per site (lower is better)" if metric in ("mae_gy", "mae_pct_rx",
                                                                                   "openkbp_dose_score",
                                                                                   "openkbp_dvh_score")
                else f"held-out {label} per site")


def _figure(doc: Doc, notes: list[str], alt: str, path: Path, fn: str, *args, **kw) -> bool:
    """Call ``plots.<fn>(path, *args, **kw)``; on failure a note instead of the image."""
    try:
        from . import plots

        getattr(plots, fn)(path, *args, **kw)
    except Exception as e:  # noqa: BLE001 - a figure must never stop the report
        log.warning("report: figure %s failed: %s", path.name, e, exc_info=log.isEnabledFor(logging.DEBUG))
        doc.p(f"(figure `{path.name}` could not be drawn: {type(e).__name__}: {e})")
        notes.append(f"figure `{path.name}` failed: {type(e).__name__}: {e}")
        return False
    doc.img(alt, f"{FIG_DIR}/{path.name}")
    return True


# ------------------------------------------------------------------------------------------
# per-site figures
# ------------------------------------------------------------------------------------------
def _hospital_note(site: str, run_dir: Path) -> str:
    return (f"run `addiff report {run_dir} --site sites/{site}.yaml` at the hospital to add its figures "
            "(they stay at the hospital)")


def _site_sections(doc: Doc, d: RunData, fig_dir: Path | None, site_files: list[Path] | None,
                   notes: list[str]) -> None:
    doc.h(2, "Per-site dose figures")
    if fig_dir is None:
        doc.p("Figures were not requested (`--no-figures`).")
        return
    given = site_files is not None
    cand = [Path(p) for p in site_files] if given else [resolve_site_file(p) for p in _planned_site_files(d)]
    doc.p("One held-out case per site (the first of the site's held-out split, the same split and seed as the "
          "evaluation): reference, predicted and difference dose on the CT in axial, coronal and sagittal "
          "slices through the target centre, and the DVH. In a real deployment the server holds no patient "
          "data, so these figures can only be made where the data is.")
    model_bundle: Any = None
    done: set[str] = set()
    skipped: list[str] = []
    for sf in cand:
        from .config import ConfigError, load_site_config

        if not sf.is_file():
            skipped.append(f"`{sf}`: site file not readable here")
            continue
        try:
            site = load_site_config(sf)
        except ConfigError as e:
            skipped.append(f"`{sf}`: {e}")
            continue
        if site.name in done:
            continue
        if not site.data_dir.is_dir():
            skipped.append(f"{site.name}: data folder not reachable here")
            continue
        if model_bundle is None:
            try:
                model_bundle = load_report_model(d)
            except Exception as e:  # noqa: BLE001
                doc.p(f"No figures: {e}.")
                notes.append(f"per-site figures: {e}")
                return
            doc.p(f"Model: {model_bundle[3]}.")
        doc.h(3, f"Site {site.name}")
        try:
            ok = _one_site(doc, d, site, model_bundle, fig_dir, notes, show_ids=given)
        except Exception as e:  # noqa: BLE001 - one site never stops the report
            # the message may name the site's data path or a case: it stays out of the report
            log.debug("report: site %s failed: %s", site.name, e, exc_info=True)
            doc.p(f"No figures for {site.name}: {type(e).__name__}")
            notes.append(f"site {site.name}: figures failed ({type(e).__name__})")
            ok = False
        if ok:
            done.add(site.name)
    others = [s for s in d.sites() if s not in done]
    if skipped or others:
        doc.h(3, "Sites without figures")
        items = list(skipped)
        items += [f"{s}: {'not among the given --site files' if given else 'no site data here'}; "
                  + _hospital_note(s, d.path) for s in others]
        doc.ul(items)
    if not cand and not others:
        doc.p("No site files are known for this run: add figures with "
              f"`addiff report {d.path} --site SITE_FILE`.")


def _one_site(doc: Doc, d: RunData, site, bundle, fig_dir: Path, notes: list[str], show_ids: bool = True) -> bool:
    """Figures of one held-out case of ``site``. Without ``show_ids`` (the report a server writes
    for every site it can read, e.g. in a simulation) no case id or data path is written: a case
    folder may be named after the patient."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from .case_io import CaseError, list_cases, load_case
    from .data import split_case_ids
    from .metrics import BODY_NAMES, MIN_STRUCTURE_VOXELS, dvh_points, mae
    from .preprocessing import case_to_sample, dose_to_ct_grid
    from .regions import evaluation_region, zero_outside
    from .training import predict_normalised

    model, cfg, _, _ = bundle
    ids = [p.name for p in list_cases(site.data_dir)]
    _, held = split_case_ids(ids, site.heldout)
    if not held:
        doc.p(f"{site.name} has no held-out case (heldout.fraction is 0 or case_ids is empty): no figures.")
        return False
    case = None
    problems = []
    for cid in held:
        try:
            case = load_case(site.data_dir / cid, require_dose=True)
            break
        except CaseError as e:
            problems.append(f"{cid}: {e.file}: {e.problem}")
    if case is None:
        doc.p(f"No usable held-out case at {site.name}"
              + (": " + "; ".join(problems[:3]) if show_ids else f" ({len(problems)} unusable)"))
        return False
    label = case.case_id if show_ids else "1"
    seed = int(_num(d.run_config.get("seed")) or 0)
    steps = int(_num(d.run_config.get("eval-steps")) or 0) or None
    from .config import ConfigError, resolve_device

    try:
        dev = resolve_device(site.device)
    except ConfigError:
        dev = torch.device("cpu")
    model.to(dev)
    sample, spec = case_to_sample(case, cfg.grid)
    batch = {k: v[None].to(dev) for k, v in sample.items()}
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        pred_n, _ = predict_normalised(model, batch, cfg, steps=steps, seed=seed)
    pred_n = pred_n.cpu()
    rx = float(case.plan.max_prescription)
    region = evaluation_region(case)  # the prediction is shown and scored as it is written: 0 outside
    pred_img = zero_outside(dose_to_ct_grid(pred_n[0, 0], rx, spec, case.ct), region)

    def lps(img: sitk.Image) -> sitk.Image:  # anterior up / patient left on the right, whatever the file says
        try:
            return sitk.DICOMOrient(img, "LPS")
        except Exception:  # noqa: BLE001 - oblique directions: leave as is
            return img

    ct_img = lps(case.ct)
    ct = sitk.GetArrayFromImage(ct_img).astype(np.float32)
    ref = sitk.GetArrayFromImage(lps(case.dose)).astype(np.float32)
    pred = sitk.GetArrayFromImage(lps(pred_img)).astype(np.float32)
    masks = {n: sitk.GetArrayFromImage(lps(m)) > 0 for n, m in case.masks.items()}
    spacing = ct_img.GetSpacing()
    em = sitk.GetArrayFromImage(lps(region)) > 0

    # crop to the evaluation region (plus a margin): a 512^2 CT is mostly air
    sl = _bbox(em | (ref > 0.05 * rx), margin=4)
    ct, ref, pred, em = ct[sl], ref[sl], pred[sl], em[sl]
    masks = {n: m[sl] for n, m in masks.items()}

    targets = [t for t in case.plan.targets if t in masks and masks[t].any()]
    primary = masks[targets[0]] if targets else None
    vcc = float(np.prod(spacing)) / 1000.0
    oars = [n for n in masks if n not in targets and n not in BODY_NAMES and int(masks[n].sum()) > MIN_STRUCTURE_VOXELS]
    oars = sorted(oars, key=lambda n: -float(ref[masks[n]].mean()))[:MAX_OARS_IN_DVH]
    structs = {t: masks[t] for t in targets} | {o: masks[o] for o in oars}
    case_mae = mae(pred, ref, em)
    doc.p(f"Held-out case **{label}** ({case.plan.tumour_site.replace('_', ' ')}, {case.plan.technique}, "
          f"Rx {', '.join(f'{t} {case.plan.prescriptions[t]:g} Gy' for t in case.plan.targets)}, "
          f"{case.plan.fractions} fractions): MAE {case_mae:.2f} Gy in the evaluation region. "
          f"Prediction seed {seed}" + (f", {steps} DDIM steps" if steps else "") + ".")
    title = f"{site.name} / {label}: reference vs predicted dose (Rx {rx:g} Gy)"
    _figure(doc, notes, f"{site.name}: dose slices of held-out case {label}", fig_dir / f"site_{site.name}_slices.png",
            "dose_slices_figure", ct, ref, pred, spacing, rx, title=title, target=primary,
            target_name=targets[0] if targets else None, eval_mask=em)
    _figure(doc, notes, f"{site.name}: DVH of held-out case {label}", fig_dir / f"site_{site.name}_dvh.png",
            "dvh_figure", ref, pred, structs, title=f"{site.name} / {label}: DVH", rx=rx, targets=targets)
    rows = []
    for n, m in structs.items():
        is_t = n in targets
        pr, pp = dvh_points(ref, m, vcc, is_t), dvh_points(pred, m, vcc, is_t)
        key = "D95" if is_t else "D_0.1cc"
        rows.append([n, "target" if is_t else "OAR", _fmt(pr["Dmean"], "gy"), _fmt(pp["Dmean"], "gy"),
                     key.replace("_", ""), _fmt(pr[key], "gy"), _fmt(pp[key], "gy")])
    if rows:
        doc.table(["structure", "type", "Dmean ref (Gy)", "Dmean pred (Gy)", "DVH point", "ref (Gy)", "pred (Gy)"],
                  rows)
    return True


def _bbox(mask, margin: int = 4) -> tuple[slice, ...]:
    import numpy as np

    if not mask.any():
        return tuple(slice(None) for _ in mask.shape)
    out = []
    for ax in range(mask.ndim):
        idx = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))[0]
        out.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin + 1, mask.shape[ax])))
    return tuple(out)


# ------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------
def write_report_safely(run_dir: str | Path) -> Path | None:
    """Write the run's report at the end of a run; a failing figure must never cost the run its
    results (they are saved before), so any error becomes a warning."""
    try:
        return write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the report is a convenience on top of saved results
        log.warning("could not write the report for %s: %s", run_dir, e)
        return None


def write_report(run_dir: str | Path, site_files: Iterable[str | Path] | None = None, figures: bool = True) -> Path:
    """Write ``RUN_DIR/report/report.md`` (+ ``report.html`` and ``figures/*.png``); return the
    path of report.md. ``site_files``: make per-site figures for these sites (default: the run
    config's site files, where readable). ``figures=False``: Markdown/HTML only."""
    from .config import ConfigError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    out = run_dir / REPORT_DIR
    fig_dir = out / FIG_DIR
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out}: cannot create the report folder ({e.strerror})") from None
    for old in fig_dir.glob("*.png"):  # figures of an earlier report (e.g. of sites not reachable now)
        try:
            old.unlink()
        except OSError:
            pass
    # given site files: relative to the current folder (as typed), else to the project root
    sf = [Path(p).resolve() if Path(p).is_file() else resolve_site_file(p) for p in site_files] \
        if site_files is not None else None

    notes: list[str] = []
    try:
        d = load_run(run_dir)
    except Exception as e:  # noqa: BLE001
        d = RunData(path=run_dir, kind="unknown")
        notes.append(f"the run folder could not be read ({type(e).__name__}: {e})")
    notes[:0] = d.notes
    doc = Doc()
    name = run_dir.resolve().name
    doc.h(1, f"Run report: {name}")
    doc.p(f"Run folder `{run_dir.resolve()}`; report written {datetime.now(timezone.utc).isoformat(timespec='seconds')}.")
    if d.kind == "unknown":
        doc.p("**This folder does not look like an addiff-fl run** (no run.json, metrics.jsonl, final_metrics.*, "
              "checkpoints/, model.pt or metrics.json).")
    figs = fig_dir if figures else None
    for section in (_summary, _training, _heldout, _comparison, _site_sections):
        try:
            if section is _summary:
                section(doc, d)
            elif section is _site_sections:
                section(doc, d, figs, sf, notes)
            else:
                section(doc, d, figs, notes)
        except Exception as e:  # noqa: BLE001 - the report always gets written
            log.warning("report: section %s failed: %s", section.__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
            doc.p(f"(this section could not be made: {type(e).__name__}: {e})")
            notes.append(f"section {section.__name__.strip('_')} failed: {type(e).__name__}: {e}")
    if notes:
        doc.h(2, "Missing or unreadable inputs")
        doc.ul(dict.fromkeys(notes))
    from .checkpoint import atomic_write_bytes

    md = out / "report.md"
    atomic_write_bytes(md, doc.markdown().encode("utf-8"))
    atomic_write_bytes(out / "report.html", doc.html(f"addiff-fl run report: {name}").encode("utf-8"))
    if not any(fig_dir.iterdir()):
        try:
            fig_dir.rmdir()
        except OSError:
            pass
    return md
