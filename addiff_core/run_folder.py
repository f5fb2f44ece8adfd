"""The run folder: the one owner of its file names, and of reading and writing them (Flower-free).

A federated run (``server/``) writes::

    run.json                     planned run (resolved run config, model config, schedule), status
    metrics.jsonl                one JSON object per line: kind "train" (per site and round),
                                 "round" (aggregate, bytes on the wire), "error", "rejected",
                                 "refused", "absent", "discarded", "final" (per site)
    checkpoints/round_0001.pt    global model after round 1 (+ .sha256); meta: round, stage,
                                 strategy name and state (FedAdam moments), run config
    final_model.pt               the final global model (same format as a round checkpoint)
    final_metrics.csv/.md/.json  held-out metrics of the final global model, one row per site
    comparison.json              optional, by hand: other training setups for the report
    report/report.md, .html, figures/*.png    the run report (``addiff_core.report``)

A single-site ``addiff train`` folder holds ``model.pt`` and ``metrics.json`` (and ``report/``).

Every other module asks :class:`RunFolder` for these paths and goes through it to read or write
them; JSON written here is made JSON-safe first (NaN/inf -> null) and written atomically.

Paths *in* a run's configuration resolve against the project folder: :mod:`addiff_core.project`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .config import ConfigError

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
CHECKPOINT_GLOB = "round_*.pt"
FINAL_MODEL = "final_model.pt"
FINAL_CSV, FINAL_MD, FINAL_JSON = "final_metrics.csv", "final_metrics.md", "final_metrics.json"
COMPARISON = "comparison.json"
REPORT_DIR, FIGURES_DIR = "report", "figures"
REPORT_MD, REPORT_HTML = "report.md", "report.html"
LOCAL_MODEL, LOCAL_METRICS = "model.pt", "metrics.json"  # an `addiff train` folder

# what makes a folder a run folder: one of these files (or a checkpoints/ folder)
FEDERATED_MARKERS = (RUN_JSON, METRICS, FINAL_JSON, FINAL_CSV, FINAL_MODEL)
LOCAL_MARKERS = (LOCAL_METRICS, LOCAL_MODEL)
MARKERS = FEDERATED_MARKERS + LOCAL_MARKERS
# everything a run writes into its folder (RunFolder.guard refuses links among them)
OWN_ENTRIES = (RUN_JSON, METRICS, CHECKPOINTS, FINAL_MODEL, FINAL_MODEL + ".sha256", FINAL_CSV, FINAL_MD, FINAL_JSON,
               REPORT_DIR, LOCAL_MODEL, LOCAL_MODEL + ".sha256", LOCAL_METRICS)


def checkpoint_name(rnd: int) -> str:
    return f"round_{rnd:04d}.pt"


class RunFolder:
    """The files of one run folder (it need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- paths ------------------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def final_model(self) -> Path:
        return self.path / FINAL_MODEL

    @property
    def final_csv(self) -> Path:
        return self.path / FINAL_CSV

    @property
    def final_md(self) -> Path:
        return self.path / FINAL_MD

    @property
    def final_json(self) -> Path:
        return self.path / FINAL_JSON

    @property
    def comparison(self) -> Path:
        return self.path / COMPARISON

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT_DIR

    @property
    def figures_dir(self) -> Path:
        return self.report_dir / FIGURES_DIR

    @property
    def report_md(self) -> Path:
        return self.report_dir / REPORT_MD

    @property
    def local_model(self) -> Path:
        return self.path / LOCAL_MODEL

    @property
    def local_metrics(self) -> Path:
        return self.path / LOCAL_METRICS

    # -- what the folder is -----------------------------------------------------------------
    def kind(self) -> str:
        """"federated" (a run written by the server), "local" (an `addiff train` folder) or "unknown"."""
        if any((self.path / m).exists() for m in FEDERATED_MARKERS) or self.checkpoints.is_dir():
            return "federated"
        if any((self.path / m).is_file() for m in LOCAL_MARKERS):
            return "local"
        return "unknown"

    def looks_like_run(self) -> bool:
        """Holds one of the run files (:data:`MARKERS`)."""
        return any((self.path / m).exists() for m in MARKERS)

    def guard(self, also: Iterable[str] = ()) -> None:
        """Refuse (ConfigError, one line) to write into a run folder that is, or lies in, a case or
        data folder, or whose own files and folders (``report/``, ``checkpoints/``, ...) are links:
        a planted ``report`` link to a case folder once got the report written into the case.
        Every write of this class calls it; files are replaced by a rename, never written through.
        ``also``: more entries the caller writes there (e.g. the SuperLink's log and database)."""
        from .outputs import check_output_dir

        for p in (*(self.path / n for n in (*OWN_ENTRIES, *also)), self.figures_dir):
            if p.is_symlink():
                raise ConfigError(f"{p}: is a link (to {os.path.realpath(p)}); a run folder's files are written only "
                                  "into the run folder itself: remove the link")
        check_output_dir(self.path, results=(), overwrite=True)

    # -- run.json ---------------------------------------------------------------------------
    def read_run_json(self) -> dict:
        """``run.json`` as a dict ({} if absent); a garbled file is a ConfigError (one line)."""
        path = self.run_json
        if not path.is_file():
            return {}
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            raise ConfigError(f"{path}: not a readable run description ({type(e).__name__}); "
                              "restore it or start a new run folder") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: not a run description (a JSON object expected)")
        return doc

    def require_run_json(self) -> dict:
        """``run.json`` of a folder that must be a run folder (one line when it is not)."""
        if not self.run_json.is_file():
            raise ConfigError(f"{self.path}: not a run folder (no {RUN_JSON})")
        return self.read_run_json()

    def stored_run_config(self, require: Iterable[str] = ()) -> dict:
        """The run config ``run.json`` stores (a folder to resume must have one, with the keys
        ``require``)."""
        stored = self.require_run_json().get("run_config")
        if not isinstance(stored, dict) or any(k not in stored for k in require):
            raise ConfigError(f"{self.run_json}: holds no run config; not a run folder to resume")
        return stored

    def write_run_json(self, doc: dict) -> None:
        self.guard()
        _write_json(self.run_json, doc)

    def update_run_json(self, **fields: Any) -> dict:
        """Read ``run.json``, set ``fields``, write it back; returns the new document."""
        doc = self.read_run_json()
        doc.update(fields)
        self.write_run_json(doc)
        return doc

    # -- metrics.jsonl ----------------------------------------------------------------------
    def append_metrics(self, rows: Iterable[dict]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.guard()  # appending opens the file: never through a planted link
        with self.metrics.open("a", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(_json_safe(r)) + "\n")

    def _metric_lines(self) -> Iterator[tuple[str, dict | None]]:
        """(line, row) for every non-blank line; row is None for a line that is not a JSON
        object (e.g. a half-written last line). Raises OSError / UnicodeDecodeError."""
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            yield line, row if isinstance(row, dict) else None

    def read_metrics_counted(self) -> tuple[list[dict], int]:
        """(rows of metrics.jsonl, number of unreadable lines); ([], 0) when there is no file.
        Raises OSError / UnicodeDecodeError when the file cannot be read at all."""
        if not self.metrics.is_file():
            return [], 0
        rows, bad = [], 0
        for _, row in self._metric_lines():
            if row is None:
                bad += 1
            else:
                rows.append(row)
        return rows, bad

    def read_metrics(self) -> list[dict]:
        """The readable rows of metrics.jsonl (unreadable lines skipped; [] when absent)."""
        return self.read_metrics_counted()[0]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows of rounds after ``last_round`` and the final rows (a round that was not
        checkpointed is rerun)."""
        if not self.metrics.is_file():
            return
        self.guard()
        keep = [line for line, row in self._metric_lines()
                if row is not None and row.get("kind") != "final" and int(row.get("round", 0)) <= last_round]
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(self.metrics, ("\n".join(keep) + ("\n" if keep else "")).encode())

    def clear_metrics(self) -> None:
        if self.metrics.exists():
            self.metrics.unlink()

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self, rnd: int) -> Path:
        return self.checkpoints / checkpoint_name(rnd)

    def rounds_on_disk(self) -> list[int]:
        """Round numbers of the checkpoint files (``checkpoints/round_NNNN.pt``), ascending."""
        out = []
        for p in self.checkpoints.glob(CHECKPOINT_GLOB):
            try:
                out.append(int(p.stem.split("_")[1]))
            except (IndexError, ValueError):
                continue
        return sorted(out)

    def has_checkpoints(self) -> bool:
        return bool(self.rounds_on_disk())

    def refuse_if_started(self) -> None:
        """A new run must not start in a folder that holds checkpoints of another (one line)."""
        if self.has_checkpoints():
            raise ConfigError(f"{self.path} already holds checkpoints: resume it (--resume {self.path}) "
                              "or choose another run folder (--run-dir)")

    def latest_valid(self, warn: Callable[..., Any] | None = None) -> tuple[int, dict, Any, dict] | None:
        """(round, state_dict, model_cfg, meta) of the newest checkpoint that loads; corrupt
        ones (SHA-256 mismatch, truncated) are skipped with ``warn(...)`` (a logger's warning)."""
        from .checkpoint import load_checkpoint
        from .errors import CheckpointError

        warn = warn or log.warning
        for rnd in reversed(self.rounds_on_disk()):
            try:
                state, cfg, meta = load_checkpoint(self.checkpoint_path(rnd))
            except CheckpointError as e:
                warn("skipping checkpoint of round %d: %s", rnd, e)
                continue
            if int(meta.get("round", -1)) != rnd:
                warn("skipping %s: it says round %s", self.checkpoint_path(rnd), meta.get("round"))
                continue
            return rnd, state, cfg, meta
        return None

    def model_files(self) -> list[Path]:
        """The files a model can be loaded from, best first: final_model.pt / model.pt, then the
        round checkpoints, newest first."""
        out = [p for p in (self.final_model, self.local_model) if p.is_file()]
        if self.checkpoints.is_dir():
            out += sorted(self.checkpoints.glob(CHECKPOINT_GLOB), reverse=True)
        return out

    # -- final metrics ----------------------------------------------------------------------
    def write_final_tables(self, csv_text: str, md_text: str, rows: list[dict]) -> None:
        """``final_metrics.csv`` / ``.md`` as given and ``final_metrics.json`` (the per-site rows)."""
        from .checkpoint import atomic_write_bytes

        self.guard()
        atomic_write_bytes(self.final_csv, csv_text.encode())
        atomic_write_bytes(self.final_md, md_text.encode())
        _write_json(self.final_json, rows)

    def has_final_table(self) -> bool:
        return self.final_md.is_file()


def _json_safe(obj: Any) -> Any:
    from .formats import json_safe

    return json_safe(obj)


def _write_json(path: Path, obj: Any) -> None:
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(_json_safe(obj), indent=2) + "\n").encode())


def timestamp() -> str:
    """Now, in UTC, to the second (run.json and checkpoint times)."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
