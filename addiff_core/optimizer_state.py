"""A site's optimiser state across federated rounds, kept in its own state folder (never sent).

Rebuilding AdamW every round would reset its moments after a handful of steps, so round r starts
from the state saved after the site's latest earlier round of that stage:
``STATE_DIR/optimizer/<run tag>/<stage>_round<r>.pt`` (atomic ``torch.save``, ``weights_only``
load; no tag: local training or older runs). The run tag (:func:`new_run_tag`, in run.json) keeps
runs apart while a resumed run shares its own. The newest two rounds up to the one saved are kept
(later ones, left by an aborted attempt, removed), so a resumed server re-runs round r from the
same state; the newest three runs are kept. A state from before the stage began, or of other
shapes, is another run's and is not used.
"""
from __future__ import annotations

import io
import logging
import re
import secrets
import shutil
from pathlib import Path

import torch

from .checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)
KEEP_ROUNDS = 2
KEEP_RUNS = 3  # runs whose states stay side by side in one state folder (e.g. a run and a rerun)
_NAME = re.compile(r"^(?P<stage>[a-z]+)_round(?P<round>\d+)\.pt$")
_TAG = re.compile(r"^[0-9a-f]{16}$")  # a folder name: nothing else from the server becomes a path


def new_run_tag() -> str:
    """A new federated run's identity: 16 random hex digits, kept in its run.json (so a resumed
    or moved run keeps it) and sent with every training round."""
    return secrets.token_hex(8)


def _base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The plain optimizer behind an Opacus DPOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "original_optimizer", optimizer)


class OtherShapesError(ValueError):
    """A saved optimiser state whose tensors do not have the parameters' shapes (another model)."""


def _fits(optimizer: torch.optim.Optimizer, state: dict) -> bool:
    """True if every per-parameter tensor of ``state`` (a ``state_dict()``) has its parameter's shape."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in state.get("param_groups", []) for i in g.get("params", [])]
    if len(ids) != len(params):
        return False
    saved = state.get("state", {})
    return all(v.shape == p.shape for i, p in zip(ids, params) for v in saved.get(i, {}).values()
               if torch.is_tensor(v) and v.dim() > 0)


class OptimizerStore:
    def __init__(self, state_dir: Path, run_tag: str = ""):
        if run_tag and not _TAG.match(run_tag):
            raise ValueError("the round's run tag is not 16 hex digits")
        self.base = Path(state_dir) / "optimizer"
        self.folder = self.base / run_tag if run_tag else self.base

    def _rounds(self, stage: str) -> dict[int, Path]:
        if not self.folder.is_dir():
            return {}
        found = {}
        for p in self.folder.iterdir():
            m = _NAME.match(p.name)
            if m and m["stage"] == stage:
                found[int(m["round"])] = p
        return found

    def restore(self, optimizer: torch.optim.Optimizer, stage: str, round_number: int,
                stage_start: int = 1) -> int | None:
        """Load the state saved after this site's latest round of ``stage`` before ``round_number``
        into ``optimizer``; returns that round, or None (fresh optimiser) when there is none or it
        does not fit (e.g. the model changed).

        ``stage_start`` is the round at which this run's ``stage`` began: a state saved before it
        was left by another run (e.g. one with fewer VAE rounds in the same state folder) and is
        not used."""
        rounds = self._rounds(stage)
        earlier = [r for r in rounds if stage_start <= r < round_number]
        if not earlier:
            return None
        r = max(earlier)
        path = rounds[r]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            base = _base_optimizer(optimizer)
            if not _fits(base, state):  # load_state_dict checks counts, not shapes: it would fail at step()
                raise OtherShapesError(path.name)
            base.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - any unreadable or mismatched state: start fresh
            # the error's type only: its message may name the site's state folder
            log.warning("optimizer state %s not used (%s): starting this round with a fresh optimizer",
                        path.name, type(e).__name__)
            return None
        return r

    def save(self, optimizer: torch.optim.Optimizer, stage: str, round_number: int) -> Path:
        buf = io.BytesIO()
        torch.save(_base_optimizer(optimizer).state_dict(), buf)
        path = self.folder / f"{stage}_round{int(round_number)}.pt"
        atomic_write_bytes(path, buf.getvalue())
        rounds = self._rounds(stage)
        later = [r for r in rounds if r > round_number]  # left by an aborted attempt or an older run
        for r in later + sorted(r for r in rounds if r <= round_number)[:-KEEP_ROUNDS]:
            rounds[r].unlink(missing_ok=True)
        if self.folder != self.base:
            self._prune_other_runs()
        return path

    def _prune_other_runs(self) -> None:
        """Keep the states of the newest KEEP_RUNS runs (this one was just written to)."""
        runs = [p for p in self.base.iterdir() if p.is_dir() and _TAG.match(p.name)]
        runs.sort(key=lambda p: (p == self.folder, p.stat().st_mtime), reverse=True)
        for old in runs[KEEP_RUNS:]:
            shutil.rmtree(old, ignore_errors=True)
