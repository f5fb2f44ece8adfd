"""Single-site workflows behind ``addiff train``, ``addiff predict`` and ``addiff evaluate``."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .case_io import CaseError, load_case
from .checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, load_model_state, save_checkpoint
from .config import ConfigError, ModelConfig, SiteConfig, load_model_config, load_site_config, resolve_device
from .data import load_site_data
from .metrics import dvh_curve, dvh_points
from .models import build_model
from .preprocessing import case_to_sample, dose_to_ct_grid
from .regions import evaluation_region, zero_outside
from .fl_task import SiteTask
from .training import evaluate, predict_normalised

log = logging.getLogger(__name__)

NORMALISATION = ("CT: HU clipped to [hu_min, hu_max] and scaled to [-1, 1]; dose: Gy divided by the highest "
                 "prescription of the case (model output x prescription = Gy)")


def ensure_writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create the output folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{path}: output folder is not writable")
    return path


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
    from .outputs import check_output_dir

    check_output_dir(Path(out_dir), results=("model.pt", "metrics.json"), overwrite=overwrite,
                     data_dirs=(site.data_dir,))
    out_dir = ensure_writable_dir(Path(out_dir))
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
    for k, (stage, epochs) in enumerate(stages):
        if epochs == 0:
            continue
        res = task.train(None, stage, epochs=epochs, server_round=k, seed=tcfg.seed, planned_epochs=planned)
        history += [{"stage": stage, "epoch": e + 1, **m} for e, m in enumerate(res.history)]
    train_seconds = time.perf_counter() - t0
    heldout = evaluate(task.model, data.heldout, cfg, task.device, seed=tcfg.seed, steps=steps, progress=progress)
    ckpt = save_checkpoint(out_dir / "model.pt", task.model.state_dict(), cfg,
                           {"site": site.name, "normalisation": NORMALISATION, "history": history,
                            "train_cases": data.train.case_ids})
    privacy = task.privacy(planned)
    summary = {"site": site.name, "model": cfg.kind, "train_cases": data.num_train,
               "privacy": privacy.metrics() if privacy else {"dp_enabled": 0.0}, "heldout_cases": len(data.heldout), "skipped": data.skipped, "train_seconds": train_seconds,
               "history": history, "heldout": heldout, "checkpoint": str(ckpt),
               "metrics_file": str(out_dir / "metrics.json")}
    write_json(out_dir / "metrics.json", summary)
    from .report import write_report_safely

    summary["report"] = str(write_report_safely(out_dir))
    return summary


def load_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, ModelConfig, dict]:
    state, cfg, meta = load_checkpoint(checkpoint)
    model = build_model(cfg)
    load_model_state(model, state, str(checkpoint))
    return model.to(device).eval(), cfg, meta


def _check_case_for_prediction(case_dir: Path) -> None:
    from .checks import check_case

    problems = check_case(case_dir)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s); run 'addiff data check {case_dir}')" if len(problems) > 1 else ""
        raise CaseError(first.case, first.file, first.message + more)


def predict_case(checkpoint: Path, case_dir: Path, out_dir: Path, *, samples: int = 1, steps: int | None = None,
                 seed: int = 0, device: str = "auto", overwrite: bool = False, rtdose: bool = False) -> dict[str, str]:
    """Write ``dose.nii.gz`` (Gy, on the case's CT grid, 0 outside the case's evaluation region:
    ``regions.evaluation_region``), ``dvh.csv`` and ``dvh_curves.csv``; with ``samples > 1`` also
    ``dose_std.nii.gz`` (voxel-wise standard deviation, Gy, 0 outside the region too); with
    ``rtdose`` also ``rtdose.dcm`` (``dicom.writer.write_predicted_rtdose``)."""
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    from .outputs import check_output_dir

    check_output_dir(Path(out_dir), results=("dose.nii.gz", "dose_std.nii.gz", "dvh.csv"), overwrite=overwrite,
                     data_dirs=(Path(case_dir),))
    dev = resolve_device(device)
    model, cfg, _ = load_model(Path(checkpoint), dev)
    case_dir = Path(case_dir)
    _check_case_for_prediction(case_dir)
    case = load_case(case_dir)
    sample, spec = case_to_sample(case, cfg.grid)
    batch = {k: v[None].to(dev) for k, v in sample.items()}
    t0 = time.perf_counter()
    bad_inputs = [k for k, v in sample.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad_inputs:
        raise CaseError(case_dir, "plan.yaml" if bad_inputs[0] in ("beams", "constraints") else ".",
                        f"model inputs are not finite ({', '.join(bad_inputs)}): extreme values in the case")
    mean, std = predict_normalised(model, batch, cfg, steps=steps, seed=seed, num_samples=samples)
    if not bool(torch.isfinite(mean).all()) or (std is not None and not bool(torch.isfinite(std).all())):
        raise CheckpointError(f"{checkpoint}: the model's prediction for {case_dir} is not finite (NaN/inf); "
                              "nothing written")
    seconds = time.perf_counter() - t0
    rx = case.plan.max_prescription
    out_dir = ensure_writable_dir(Path(out_dir))
    region = evaluation_region(case)  # OpenKBP-style: the written prediction is 0 outside the region
    dose_img = zero_outside(dose_to_ct_grid(mean[0, 0], rx, spec, case.ct), region)
    sitk.WriteImage(dose_img, str(out_dir / "dose.nii.gz"), useCompression=True)
    written = {"dose": str(out_dir / "dose.nii.gz")}
    if rtdose:
        from .dicom.writer import write_predicted_rtdose

        written["rtdose"] = str(write_predicted_rtdose(dose_img, case_dir, out_dir / "rtdose.dcm"))
    if std is not None:
        std_img = zero_outside(dose_to_ct_grid(std[0, 0], rx, spec, case.ct), region)
        sitk.WriteImage(std_img, str(out_dir / "dose_std.nii.gz"), useCompression=True)
        written["uncertainty"] = str(out_dir / "dose_std.nii.gz")
    dose = sitk.GetArrayFromImage(dose_img)
    vcc = case.voxel_volume_cc
    rows, curves = [], []
    max_dose = max(float(dose.max()), rx) * 1.1
    bins = np.linspace(0.0, max_dose, 201)
    for name in sorted(case.masks):
        m = case.array(name)
        if not m.any():
            continue
        pts = dvh_points(dose, m, vcc, is_target=name in case.plan.prescriptions)
        rows.append({"structure": name, "volume_cc": float(m.sum() * vcc), **{k: round(float(v), 3) for k, v in pts.items()}})
        axis, frac = dvh_curve(dose, m, bins)
        curves.extend({"structure": name, "dose_gy": round(float(d), 3), "volume_pct": round(100 * float(f), 3)}
                      for d, f in zip(axis, frac))
    for fname, table in (("dvh.csv", rows), ("dvh_curves.csv", curves)):
        if table:
            with open(out_dir / fname, "w", newline="") as fh:
                keys = list(dict.fromkeys(k for r in table for k in r))
                w = csv.DictWriter(fh, fieldnames=keys)
                w.writeheader()
                w.writerows(table)
            written[fname.split(".")[0]] = str(out_dir / fname)
    written["seconds"] = f"{seconds:.2f}"
    return written


def evaluate_checkpoint(checkpoint: Path, site_file: Path, *, steps: int | None = None, seed: int = 0) -> dict:
    site = load_site_config(site_file)
    dev = resolve_device(site.device)
    model, cfg, _ = load_model(Path(checkpoint), dev)
    data = load_site_data(site, cfg.grid)
    return evaluate(model, data.heldout, cfg, dev, seed=seed, steps=steps)
