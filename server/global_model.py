"""The global model in the run folder: a new run's start, a checkpoint after every round (with
the strategy's state, e.g. FedAdam's moments), the final model, and resuming from the newest
checkpoint that loads."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from addiff_core.checkpoint import save_checkpoint
from addiff_core.errors import CheckpointError
from addiff_core.config import ConfigError
from addiff_core.optimizer_state import new_run_tag
from addiff_core.run_folder import RunFolder, timestamp

from .settings import Round, RunSettings

log = logging.getLogger("flwr.addiff")


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def save_round(folder: RunFolder, rnd: Round, arrays: dict[str, np.ndarray], strategy, settings: RunSettings,
               extra: dict) -> Path:
    """``checkpoints/round_NNNN.pt``: the global model after round ``rnd`` and the strategy's state."""
    sstate = {k: (_tensors(v) if isinstance(v, dict) else v) for k, v in strategy.state_dict().items()}
    meta = {"round": rnd.number, "stage": rnd.stage, "stage_round": rnd.stage_round,
            "num_rounds": settings.num_rounds, "strategy": settings.strategy,
            "strategy_state": sstate, "run_config": settings.to_json(), "created": timestamp(), **extra}
    return save_checkpoint(folder.checkpoint_path(rnd.number), _tensors(arrays), settings.model, meta)


def save_final(folder: RunFolder, arrays: dict[str, np.ndarray], settings: RunSettings) -> Path:
    """``final_model.pt`` (the format of a round checkpoint)."""
    return save_checkpoint(folder.final_model, _tensors(arrays), settings.model,
                           {"round": settings.num_rounds, "stage": "final", "strategy": settings.strategy,
                            "run_config": settings.to_json(), "created": timestamp()})


def start(folder: RunFolder, settings: RunSettings) -> None:
    """A new run: refuse a folder holding checkpoints, then a fresh metrics.jsonl and run.json."""
    import flwr

    folder.refuse_if_started()
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.clear_metrics()
    s = settings
    folder.write_run_json({
        "run_config": s.to_json(), "model": s.model.to_dict(), "created": timestamp(), "status": "running",
        "run_tag": new_run_tag(),  # the sites keep this run's optimiser states apart by it
        "flwr": getattr(flwr, "__version__", "?"), "num_rounds": s.num_rounds,
        "schedule": [{"round": r.number, "stage": r.stage} for r in s.schedule],
        "sites_planned": [str(p) for p in s.site_files]})


def resume(folder: RunFolder, settings: RunSettings, arrays: dict[str, np.ndarray], strategy
           ) -> tuple[int, dict[str, np.ndarray]]:
    """(the first round to run, the global arrays) of a resumed run: the newest valid checkpoint's
    weights and strategy state (metrics of later rounds dropped), else round 1."""
    found = folder.latest_valid(warn=log.warning)
    doc = folder.read_run_json()
    doc.setdefault("resumed", []).append(timestamp())
    doc["status"] = "running"
    if found is None:
        log.warning("resume %s: no valid checkpoint, starting from round 1", settings.run_dir)
        folder.truncate_metrics(0)
        folder.write_run_json(doc)
        return 1, arrays
    rnd, state, cfg, meta = found
    path = folder.checkpoint_path(rnd)
    if cfg != settings.model:
        raise ConfigError(f"{path}: model config differs from the planned run")
    if meta.get("strategy") != settings.strategy:
        raise ConfigError(f"{path}: strategy {meta.get('strategy')!r} differs from the planned {settings.strategy!r}")
    missing = set(arrays) - set(state)
    if missing:
        raise CheckpointError(f"{path}: lacks weights {sorted(missing)[:3]}")
    arrays = {k: state[k].numpy().astype(arrays[k].dtype) for k in arrays}
    strategy.load_state_dict({k: ({kk: vv.numpy() for kk, vv in v.items()} if isinstance(v, dict) else v)
                              for k, v in (meta.get("strategy_state") or {}).items()})
    folder.truncate_metrics(rnd)
    folder.write_run_json(doc)
    log.info("resuming %s after round %d of %d (%s)", settings.run_dir, rnd, settings.num_rounds, path.name)
    return rnd + 1, arrays
