"""What the report knows about a run: everything read from its run folder, defensively.

Reading never raises for missing or broken files: each problem becomes a note (``RunData.notes``)
that the report lists. Paths and raw reading go through :class:`addiff_core.run_folder.RunFolder`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..project import split_list
from ..run_folder import RunFolder
from ..site_table import is_overall
from .document import num


def read_json(path: Path, notes: list[str]) -> Any:
    """A JSON file, or None when it is absent or unreadable (with a note)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        notes.append(f"`{path.name}` could not be read ({type(e).__name__}: {e}); ignored.")
        return None


def _read_metrics(folder: RunFolder, notes: list[str]) -> list[dict]:
    try:
        rows, bad = folder.read_metrics_counted()
    except (OSError, UnicodeDecodeError) as e:
        notes.append(f"`{folder.metrics.name}` could not be read ({type(e).__name__}); training curves are missing.")
        return []
    if bad:
        notes.append(f"`{folder.metrics.name}`: {bad} unreadable line(s) skipped (e.g. a half-written last line).")
    return rows


def _read_csv_rows(path: Path, notes: list[str]) -> list[dict]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return [{k: (num(v) if num(v) is not None else (v if k == "site" else None)) for k, v in r.items() if k}
                    for r in csv.DictReader(fh)]
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        notes.append(f"`{path.name}` could not be read ({type(e).__name__}).")
        return []


def _privacy(r: dict) -> dict:
    return {"dp_enabled": bool(num(r.get("dp_enabled"))), "epsilon": num(r.get("epsilon")),
            "delta": num(r.get("delta")), "noise_multiplier": num(r.get("noise_multiplier"))}


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
    def folder(self) -> RunFolder:
        return RunFolder(self.path)

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
            if isinstance(s, str) and s and not is_overall(r) and s not in names:
                names.append(s)
        return sorted(names)

    def planned_site_files(self) -> list[str]:
        """The run config's ``site-files`` (a comma- or newline-separated string, or a list),
        else run.json's ``sites_planned``."""
        v = self.run_config.get("site-files")
        if isinstance(v, (str, list)) and split_list(v):
            return split_list(v)
        sp = self.run.get("sites_planned")
        return [str(s) for s in sp] if isinstance(sp, list) else []

    def stage_plan(self) -> dict[str, int]:
        """Stage -> planned rounds (run.json's schedule, else the rounds done)."""
        plan: dict[str, int] = {}
        sched = self.run.get("schedule")
        if isinstance(sched, list):
            for r in sched:
                if isinstance(r, dict) and r.get("stage"):
                    plan[str(r["stage"])] = plan.get(str(r["stage"]), 0) + 1
        if not plan:
            for r in self.round_rows:
                plan.setdefault(str(r.get("stage")), 0)
                plan[str(r.get("stage"))] += 1
        return plan


def load_run(run_dir: Path) -> RunData:
    folder = RunFolder(run_dir)
    kind = folder.kind()
    if kind == "local":
        return _load_local(folder)
    return _load_federated(folder, kind)


def _load_federated(folder: RunFolder, kind: str) -> RunData:
    d = RunData(path=folder.path, kind=kind)
    run = read_json(folder.run_json, d.notes)
    if isinstance(run, dict):
        d.run = run
        d.run_config = run.get("run_config") if isinstance(run.get("run_config"), dict) else {}
        d.model = run.get("model") if isinstance(run.get("model"), dict) else {}
    elif not folder.run_json.exists():
        d.notes.append(f"`{folder.run_json.name}` is missing: the run summary is partial.")
    d.rows = _read_metrics(folder, d.notes)
    if not folder.metrics.exists():
        d.notes.append(f"`{folder.metrics.name}` is missing: no training curves.")
    if not d.model:
        _model_from_checkpoint(d)
    _final_rows(d, folder)
    _name_failed_nodes(d)
    _curves(d)
    # privacy per site: the newest train (or refusal) record of the site, then the final table
    for r in [r for r in d.rows if r.get("kind") in ("train", "refused")] + list(d.final):
        if isinstance(r.get("site"), str) and r.get("dp_enabled") is not None:
            d.privacy[r["site"]] = _privacy(r)
    return d


def _model_from_checkpoint(d: RunData) -> None:
    """The model config (and run config) from the checkpoint the figures use, when run.json has none."""
    files = d.folder.model_files()
    if not files:
        return
    ck = files[0]
    try:
        from ..checkpoint import load_checkpoint

        _, cfg, meta = load_checkpoint(ck)
        d.model = cfg.to_dict()
        if not d.run_config and isinstance(meta.get("run_config"), dict):
            d.run_config = meta["run_config"]
    except Exception as e:  # noqa: BLE001 - a report never fails on a bad file
        d.notes.append(f"`{ck.name}` could not be read ({e}).")


def _final_rows(d: RunData, folder: RunFolder) -> None:
    """The final table: final_metrics.json, else .csv, else the "final" records of metrics.jsonl."""
    fj = read_json(folder.final_json, d.notes)
    if isinstance(fj, list) and all(isinstance(r, dict) for r in fj):
        d.final, d.final_source = [r for r in fj if not is_overall(r)], folder.final_json.name
    elif folder.final_csv.is_file():
        d.final = [r for r in _read_csv_rows(folder.final_csv, d.notes) if not is_overall(r)]
        d.final_source = folder.final_csv.name
    if not d.final:
        fin = [r for r in d.rows if r.get("kind") == "final"]
        if fin:
            last = max(int(num(r.get("round")) or 0) for r in fin)
            d.final = [{k: v for k, v in r.items() if k not in ("kind", "round")} for r in fin
                       if int(num(r.get("round")) or 0) == last]
            d.final_source = f"{folder.metrics.name} (final records)"


def _name_failed_nodes(d: RunData) -> None:
    """A failed reply carries no site name, only its node: name it from the node's train records."""
    node_site = {str(r.get("node_id")): r.get("site") for r in d.train_rows
                 if r.get("node_id") is not None and isinstance(r.get("site"), str)}
    for r in d.error_rows:
        if str(r.get("site", "")).startswith("node-"):
            nid = str(r.get("node_id", str(r["site"])[5:]))
            if node_site.get(nid):
                r["site"] = node_site[nid]


def _curves(d: RunData) -> None:
    """Loss per stage and site (and the aggregate); the newest record wins when a resumed run
    repeated a round."""
    for r in d.train_rows:
        rnd, loss = num(r.get("round")), num(r.get("train_loss"))
        if rnd is None or loss is None:
            continue
        pts = d.curves.setdefault(str(r.get("stage", "?")), {}).setdefault(str(r.get("site", "?")), [])
        pts[:] = [p for p in pts if p[0] != rnd] + [(rnd, loss)]
    for r in d.round_rows:
        rnd, loss = num(r.get("round")), num(r.get("train_loss"))
        if rnd is None or loss is None:
            continue
        pts = d.agg_curves.setdefault(str(r.get("stage", "?")), [])
        pts[:] = [p for p in pts if p[0] != rnd] + [(rnd, loss)]
    for pts in [p for s in d.curves.values() for p in s.values()] + list(d.agg_curves.values()):
        pts.sort()


def _load_local(folder: RunFolder) -> RunData:
    d = RunData(path=folder.path, kind="local", curve_x="epoch")
    m = read_json(folder.local_metrics, d.notes)
    if not isinstance(m, dict):
        d.notes.append(f"`{folder.local_metrics.name}` is missing or unreadable: no training curves or held-out table.")
        m = {}
    d.local = m
    site = str(m.get("site", "site"))
    hist = m.get("history") if isinstance(m.get("history"), list) else []
    if folder.local_model.is_file():
        try:
            from ..checkpoint import load_checkpoint

            _, cfg, meta = load_checkpoint(folder.local_model)
            d.model = cfg.to_dict()
            if not hist and isinstance(meta.get("history"), list):
                hist = meta["history"]
            site = str(meta.get("site", site))
        except Exception as e:  # noqa: BLE001
            d.notes.append(f"`{folder.local_model.name}` could not be read ({e}).")
    else:
        d.notes.append(f"`{folder.local_model.name}` is missing: no model for the figures.")
    for h in hist:
        if isinstance(h, dict) and num(h.get("epoch")) is not None and num(h.get("loss")) is not None:
            d.curves.setdefault(str(h.get("stage", "?")), {}).setdefault(site, []).append(
                (num(h["epoch"]), num(h["loss"])))
    held = m.get("heldout") if isinstance(m.get("heldout"), dict) else {}
    if isinstance(held.get("mean"), dict):
        d.final = [{"site": site, "cases": held.get("num_cases", 0), **held["mean"]}]
        d.final_source = folder.local_metrics.name
    d.privacy[site] = _privacy(m.get("privacy") if isinstance(m.get("privacy"), dict) else {})
    d.run = {"status": "complete" if folder.local_model.is_file() else "incomplete"}
    d.run_config = {"model-kind": m.get("model", "")}
    return d
