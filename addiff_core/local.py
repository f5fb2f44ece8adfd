"""Single-site workflows behind ``addiff train``, ``addiff predict`` and ``addiff evaluate``."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from .checkpoint import atomic_write_bytes, save_checkpoint
from .config import ModelConfig, SiteConfig, load_model_config, load_site_config, resolve_device
from .data import load_site_data
from .site_task import SiteTask
from .outputs import ensure_writable_dir
from .predict import load_model
from .round_plan import RoundPlan
from .training import evaluate

log = logging.getLogger(__name__)

NORMALISATION = ("CT: HU clipped to [hu_min, hu_max] and scaled to [-1, 1]; dose: Gy divided by the highest "
                 "prescription of the case (model output x prescription = Gy)")


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=float).encode())


def train_site(site_file: Path, out_dir: Path, *, model_kind: str | None = None, model_config: Path | None = None,
               vae_epochs: int | None = None, diffusion_epochs: int | None = None, steps: int | None = None,
               progress: bool = True, site: SiteConfig | None = None, overwrite: bool = False) -> dict:
    """Train on one site's training cases, evaluate on its held-out cohort, write checkpoint + metrics.

    ``out_dir`` must not be (in) a case or data folder, and an existing ``model.pt`` there is kept
    unless ``overwrite``. With DP the site's one accountant (``state_dir``) is charged: a local run
    spends the same budget as the federated rounds."""
    site = site or load_site_config(site_file)
    cfg: ModelConfig = load_model_config(model_config) if model_config else site.model
    if model_kind:
        cfg = dataclasses.replace(cfg, kind=model_kind)
    from .options import check_steps
    from .outputs import output_lock

    check_steps("--steps", steps, cfg)
    _check_out(out_dir, site, overwrite)
    with output_lock(ensure_writable_dir(Path(out_dir))):  # two `train --out X` at once: the second stops here
        _check_out(out_dir, site, overwrite)  # what the lock holder before this one wrote
        return _train(site, cfg, Path(out_dir), vae_epochs=vae_epochs, diffusion_epochs=diffusion_epochs, steps=steps,
                      progress=progress)


def _check_out(out_dir: Path, site: SiteConfig, overwrite: bool) -> None:
    from .outputs import check_output_dir
    from .run_folder import LOCAL_METRICS, LOCAL_MODEL

    check_output_dir(Path(out_dir), results=(LOCAL_MODEL, LOCAL_METRICS), overwrite=overwrite,
                     data_dirs=(site.data_dir,))


def _train(site: SiteConfig, cfg: ModelConfig, out_dir: Path, *, vae_epochs: int | None, diffusion_epochs: int | None,
           steps: int | None, progress: bool) -> dict:
    """The training of :func:`train_site` into a checked, locked ``out_dir``."""
    from .run_folder import RunFolder

    folder = RunFolder(out_dir)
    tcfg = site.training
    task = SiteTask(site, cfg, progress=progress)
    data = task.data
    stages = ([("vae", tcfg.vae_epochs if vae_epochs is None else vae_epochs),
               ("diffusion", tcfg.diffusion_epochs if diffusion_epochs is None else diffusion_epochs)]
              if cfg.kind == "diffusion" else
              [("unet", tcfg.diffusion_epochs if diffusion_epochs is None else diffusion_epochs)])
    planned = sum(e for _, e in stages)
    history: list[dict] = []
    t0 = time.perf_counter()
    # One site alone trains each stage in one go: to the site's task that is one round per stage,
    # numbered from 0 in stage order (the number seeds the data order and keys the stage's
    # optimiser state; the same numbers as ever, so a run is reproduced exactly).
    for round_number, (stage, epochs) in enumerate(stages):
        if epochs == 0:
            continue
        res = task.train(None, RoundPlan(stage, round_number, epochs=epochs, seed=tcfg.seed, planned_epochs=planned))
        history += [{"stage": stage, "epoch": e + 1, **m} for e, m in enumerate(res.history)]
    train_seconds = time.perf_counter() - t0
    heldout = evaluate(task.model, data.heldout, cfg, task.device, seed=tcfg.seed, steps=steps, progress=progress)
    ckpt = save_checkpoint(folder.local_model, task.model.state_dict(), cfg,
                           {"site": site.name, "normalisation": NORMALISATION, "history": history,
                            "train_cases": data.train.case_ids})
    privacy = task.privacy(planned)
    summary = {"site": site.name, "model": cfg.kind, "train_cases": data.num_train,
               "privacy": privacy.metrics() if privacy else {"dp_enabled": 0.0}, "heldout_cases": len(data.heldout), "skipped": data.skipped, "train_seconds": train_seconds,
               "history": history, "heldout": heldout, "checkpoint": str(ckpt),
               "metrics_file": str(folder.local_metrics)}
    write_json(folder.local_metrics, summary)
    from .report import write_report_safely

    summary["report"] = str(write_report_safely(folder.path))
    return summary


def evaluate_checkpoint(checkpoint: Path, site_file: Path, *, steps: int | None = None, seed: int = 0) -> dict:
    site = load_site_config(site_file)
    dev = resolve_device(site.device)
    model, cfg, _ = load_model(Path(checkpoint), dev)
    from .options import check_steps

    check_steps("--steps", steps, cfg)
    data = load_site_data(site, cfg.grid)
    return evaluate(model, data.heldout, cfg, dev, seed=seed, steps=steps)
