"""The child tasks of bench/openkbp_bench.py: each runs in a fresh process (``python
bench/openkbp_bench.py --child JSON``) with the bench's thread count, so the bench's CPU accounting
(getrusage of its children) sees it. Also the pure per-patient helpers they use.

* ``step_times``: CPU seconds of one optimiser step of each training stage;
* ``uncertainty``: ``addiff predict --samples S`` on every held-out patient, then Spearman(std,
  |mean - reference|) and the +-2 std calibration in the possible-dose mask
  (``metrics.sample_uncertainty``);
* ``latent_probe``: ``addiff_core.latent_probe`` on each site's held-out patients (does the
  diffusion decide the prediction? issue #24).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

CALIBRATION_K = 2.0  # the calibration counts reference doses within mean +- K std
PROBE_SAMPLES = 4  # latent probe: samples behind its spread


# --------------------------------------------------------------------------------------------
# pure helpers (tests/test_openkbp_bench.py)
# --------------------------------------------------------------------------------------------
def uncertainty_in_mask(mean: Any, std: Any, ref: Any, mask: Any) -> dict[str, float | None]:
    """Per-patient uncertainty numbers over the possible-dose mask (``metrics.sample_uncertainty``
    with k = 2): ``spearman`` (std vs |mean - reference|), ``calibration_2std`` (the fraction of
    voxels whose reference lies within mean +- 2 std) and ``mean_std_gy``; None where undefined
    (a constant map, an empty mask), so that JSON and the means over patients leave it out."""
    from addiff_core.metrics import sample_uncertainty

    u = sample_uncertainty(mean, std, ref, mask, k=CALIBRATION_K)
    out = {"spearman": u["spearman"], "calibration_2std": u["coverage"], "mean_std_gy": u["mean_std_gy"]}
    return {k: (float(v) if math.isfinite(v) else None) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# the tasks
# --------------------------------------------------------------------------------------------
def _child_step_times(p: dict) -> dict:
    """CPU and wall seconds of one optimiser step (batch 1) of the VAE stage, the diffusion stage
    (VAE frozen) and the U-Net baseline, on ``p['cases']`` (real training cases): per stage a
    fresh seeded model, one untimed warm-up step, then ``p['epochs']`` timed epochs over the cases
    (process CPU time, ``common.epoch_cpu_time``)."""
    import dataclasses

    import common

    common.quiet_warnings()
    common.apply_threads(p.get("threads"))
    import torch

    from addiff_core.config import TrainingConfig, load_model_config
    from addiff_core.data import SampleDataset, load_samples
    from addiff_core.models import build_model
    from addiff_core.training import make_loader, make_optimizer, set_trainable, train_stage_epoch

    cfg = load_model_config(p["config"])
    ds = load_samples([Path(c) for c in p["cases"]], cfg.grid)
    warm = SampleDataset(ds.samples[:1], ds.specs[:1], ds.case_ids[:1], ds.case_dirs[:1])
    tcfg = TrainingConfig(batch_size=1, lr=1e-3, optimizer="adamw")
    dev = torch.device("cpu")
    out: dict[str, Any] = {"cases": ds.case_ids, "epochs": int(p["epochs"]), "threads": torch.get_num_threads(),
                           "grid": cfg.grid.size}
    for stage in ("vae", "diffusion", "unet"):
        c = dataclasses.replace(cfg, kind="unet") if stage == "unet" else cfg
        torch.manual_seed(0)
        model = build_model(c).to(dev)
        set_trainable(model, stage)
        opt = make_optimizer(getattr(model, stage).parameters(), tcfg)
        gen = torch.Generator()
        gen.manual_seed(0)
        kw = {"generator": gen, "grad_clip": 1.0, "progress": False}
        with common.epoch_cpu_time():
            train_stage_epoch(stage, model, make_loader(warm, 1, False, 0), opt, c, dev, **kw)  # warm-up
            cpu = wall = steps = 0.0
            for _ in range(int(p["epochs"])):
                m = train_stage_epoch(stage, model, make_loader(ds, 1, True, 0), opt, c, dev, **kw)
                cpu, wall, steps = cpu + m["cpu_seconds"], wall + m["seconds"], steps + m["steps"]
        out[stage] = {"cpu_seconds_per_step": cpu / steps, "wall_seconds_per_step": wall / steps, "steps_timed": int(steps)}
        print(f"{stage}: {cpu / steps:.2f} CPU s / {wall / steps:.2f} wall s per step", file=sys.stderr, flush=True)
    return out


def _child_uncertainty(p: dict) -> dict:
    """For each job (checkpoint, case, site): ``predict.predict_case(..., samples=S)`` (what
    ``addiff predict --samples S --force`` runs: mean dose and voxel-wise std on the CT grid, 0
    outside the evaluation region; forced, as the bench scores whatever a briefly trained model
    predicts), then :func:`uncertainty_in_mask` over the possible-dose mask and the official
    scores of the mean prediction."""
    import common

    common.quiet_warnings()
    common.apply_threads(p.get("threads"))
    import numpy as np
    import SimpleITK as sitk

    from addiff_core.case_io import load_case
    from addiff_core.predict import predict_case
    from addiff_core.regions import region_array
    from common import openkbp_case_scores

    rows = []
    for job in p["jobs"]:
        t = time.perf_counter()
        written = predict_case(Path(job["checkpoint"]), Path(job["case"]), Path(job["out"]), samples=int(p["samples"]),
                               seed=0, device="cpu", overwrite=True, force=True)
        case = load_case(Path(job["case"]))
        mean_img = sitk.ReadImage(written["dose"])
        mean = sitk.GetArrayFromImage(mean_img).astype(np.float64)
        std = sitk.GetArrayFromImage(sitk.ReadImage(written["uncertainty"])).astype(np.float64)
        ref = case.array("dose").astype(np.float64)
        mask = region_array(case)  # the possible-dose mask of an OpenKBP case, on the CT grid
        dose_score, errs = openkbp_case_scores(case, mean_img)
        rows.append({"site": job["site"], "case_id": Path(job["case"]).name, **uncertainty_in_mask(mean, std, ref, mask),
                     "mask_voxels": int(mask.sum()), "mean_prediction_dose_score": dose_score,
                     "mean_prediction_dvh_errors": errs, "seconds": time.perf_counter() - t})
        r = rows[-1]
        print(f"{job['site']} {r['case_id']}: spearman {r['spearman']}, within +-2 std {r['calibration_2std']}, "
              f"mean std {r['mean_std_gy']}", file=sys.stderr, flush=True)
    return {"samples": int(p["samples"]), "cases": rows}


def _probe_row(site: str, r: Any) -> dict:
    normed = {f"{k}_plan_normalised": v for k, v in (r.mae_plan_normalised or {}).items()}
    return {"site": site, "case_id": r.case_id.split("/", 1)[-1], **r.mae, **normed, "spread": r.spread,
            "mean_of_samples": r.mean_of_samples}


def _child_latent_probe(p: dict) -> dict:
    """For each job (checkpoint, site file, site): ``latent_probe.probe_cases`` on the site's
    held-out patients (``p['samples']`` samples for the spread; the shuffled latent is another
    held-out patient's of the same site), ``latent_probe.summarise`` per site and over every
    probed patient."""
    import common

    common.quiet_warnings()
    common.apply_threads(p.get("threads"))
    import torch

    from addiff_core import latent_probe
    from addiff_core.predict import load_model
    from latent_probe import site_samples  # bench/latent_probe.py

    models: dict[str, tuple] = {}
    per_site, all_rows, cases = {}, [], []
    for job in p["jobs"]:
        t = time.perf_counter()
        if job["checkpoint"] not in models:
            models[job["checkpoint"]] = load_model(Path(job["checkpoint"]), torch.device("cpu"))[:2]
        model, cfg = models[job["checkpoint"]]
        samples, ids = site_samples(Path(job["site_file"]), cfg.grid)
        rows = latent_probe.probe_cases(model, samples, cfg, ids, num_samples=int(p["samples"]), seed=0)
        per_site[job["site"]] = {**latent_probe.summarise(rows), "n": len(rows), "seconds": time.perf_counter() - t}
        all_rows += rows
        cases += [_probe_row(job["site"], r) for r in rows]
        s = per_site[job["site"]]
        print(f"{job['site']}: sampled {s['sampled']:.4f}, zero {s['zero']:.4f}, oracle {s['oracle']:.4f}, "
              f"shuffled {s['shuffled']:.4f}, spread {s['spread']:.4f}", file=sys.stderr, flush=True)
    steps = next(iter(models.values()))[1].sample_steps if models else None
    return {"samples": int(p["samples"]), "steps": steps, "per_site": per_site,
            "overall": {**latent_probe.summarise(all_rows), "n": len(all_rows)}, "cases": cases}


CHILD_TASKS = {"step_times": _child_step_times, "uncertainty": _child_uncertainty,
               "latent_probe": _child_latent_probe}
