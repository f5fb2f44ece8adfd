"""Real-anatomy benchmark: the 24 OpenKBP head-and-neck patients as three hospitals.

    python bench/openkbp_bench.py [--sample PATH] [--work DIR] [--budget small|default] [--out DIR]
                                  [--threads N] [--render-only]

1. Imports every patient of the OpenKBP sample (``addiff_core.openkbp.import_openkbp``) into
   ``WORK/cases``.
2. Splits them into three sites by in-plane voxel spacing (``voxel_dimensions.csv``; sorted,
   ties broken by the patient number, cut in thirds: spacing follows the source institution, so
   this is a natural per-institution, non-IID split). Each site holds out 2 of its 8 patients,
   drawn with a fixed seed. Site files: ``WORK/sites/openkbp_{a,b,c}.yaml`` (data folders of
   symlinks to the imported cases), plus ``pooled.yaml`` whose folder holds only the union of
   the three sites' training patients (18; nothing held out there).
3. Trains, with the same model config and the same number of epochs over each training case:

   * federated ADDiff-Dose: ``addiff simulate --site-files a,b,c --rounds V,D --local-epochs 1``
   * federated U-Net baseline: ``addiff simulate --model unet --rounds U --local-epochs 1``
   * each site alone: ``addiff train --site SITE --vae-epochs V --diffusion-epochs D`` (x 3)
   * pooled: ``addiff train --site pooled.yaml`` (same epochs over the 18 cases), then
     ``addiff evaluate --checkpoint pooled/model.pt --site SITE`` for each site.

   Every method is evaluated per site on that site's own 2 held-out patients, on their 128^3
   CT grid (MAE in the possible-dose mask, OpenKBP dose and DVH scores, gamma, ...).
4. Writes ``OUT/openkbp_bench.json`` and ``OUT/openkbp_bench.md`` and a ``comparison.json``
   (``addiff_core/report.py`` format) into the federated ADDiff run folder, whose
   ``addiff report`` then shows federated vs. U-Net vs. local vs. pooled.

Budgets: ``default`` (64^3 at 5 mm, ``configs/openkbp64.yaml``; tens of minutes on 2 CPU cores)
and ``small`` (32^3 at 10 mm, one epoch per stage; a few minutes, for checking the pipeline;
results go to ``WORK/results`` unless ``--out`` is given, so they never overwrite the default
budget's results in ``bench/results``).

Training and evaluation processes run with ``--threads`` torch threads (default 1: on a busy,
shared 2-core machine one thread trained 2-4x faster than two). ``--render-only`` rewrites the
result files of an earlier run without training (reference scores recomputed).

Without the sample folder the script prints "OpenKBP sample not found at PATH; skipping" and
exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

DEFAULT_SAMPLE = Path(os.environ.get("ADDIFF_OPENKBP_SAMPLE") or (REPO.parent / "shared" / "openkbp-sample"))
DEFAULT_WORK = REPO / "runs" / "openkbp_bench"
DEFAULT_OUT = BENCH_DIR / "results"
MODEL_CONFIG = REPO / "configs" / "openkbp64.yaml"
SITE_NAMES = ("openkbp_a", "openkbp_b", "openkbp_c")  # finest -> coarsest in-plane spacing
N_HELDOUT = 2
SPLIT_SEED = 0
METRICS = ("mae_gy", "openkbp_dose_score", "openkbp_dvh_score", "gamma_pass_rate", "mean_isodose_dice")
# published OpenKBP test-set results (100 patients; dose score / DVH score, Gy)
PUBLISHED = {"challenge winner (Babier et al. 2021)": (2.43, 1.48), "later work (best reported)": (2.07, 0.98)}

# Training budget. One "epoch" is one pass over a site's (or the pool's) training cases; the
# federated runs train 1 local epoch per round, so rounds = epochs and every method sees each
# training case the same number of times per stage.
BUDGETS: dict[str, dict[str, Any]] = {
    "default": {"grid": None, "sample_steps": None, "vae_epochs": 4, "diffusion_epochs": 12, "unet_epochs": 16,
                "local_epochs": 1, "batch_size": 1, "lr": 1e-3, "optimizer": "adamw", "gamma": True},
    "small": {"grid": {"size": 32, "spacing": [10.0, 10.0, 10.0]}, "sample_steps": 4, "vae_epochs": 1,
              "diffusion_epochs": 1, "unet_epochs": 2, "local_epochs": 1, "batch_size": 1, "lr": 1e-3,
              "optimizer": "adamw", "gamma": True},
}


# --------------------------------------------------------------------------------------------
# the split (pure functions; tests/test_openkbp_bench.py)
# --------------------------------------------------------------------------------------------
def natural_key(name: str) -> list:
    """``pt_3`` before ``pt_11``: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def in_plane_spacing(vd: Sequence[float]) -> float:
    """In-plane voxel size (mm) from OpenKBP ``voxel_dimensions`` (row, column, slice)."""
    return round((float(vd[0]) + float(vd[1])) / 2.0, 6)


def split_by_spacing(spacings: Mapping[str, Sequence[float]], n_sites: int = 3) -> list[list[str]]:
    """Patients sorted by in-plane spacing (ties: patient number), cut into ``n_sites`` contiguous
    groups of (nearly) equal size, finest spacing first."""
    if n_sites < 1 or len(spacings) < n_sites:
        raise ValueError(f"cannot split {len(spacings)} patient(s) into {n_sites} site(s)")
    order = sorted(spacings, key=lambda p: (in_plane_spacing(spacings[p]), natural_key(p)))
    n = len(order)
    cuts = [round(i * n / n_sites) for i in range(n_sites + 1)]
    return [order[cuts[i]:cuts[i + 1]] for i in range(n_sites)]


def choose_heldout(patients: Sequence[str], n: int = N_HELDOUT, seed: int = SPLIT_SEED, site_index: int = 0) -> list[str]:
    """``n`` patients of one site, drawn with a seed that depends only on (seed, site_index) and on
    the site's patients (sorted), so the choice is the same on every run. At least one patient
    is always left for training."""
    import numpy as np

    ids = sorted(patients, key=natural_key)
    if not 0 <= n < len(ids):
        raise ValueError(f"cannot hold out {n} of {len(ids)} patient(s) and still train")
    rng = np.random.default_rng([seed, site_index])
    picked = rng.choice(len(ids), size=n, replace=False)
    return sorted((ids[int(i)] for i in picked), key=natural_key)


def make_split(spacings: Mapping[str, Sequence[float]], names: Sequence[str] = SITE_NAMES, n_heldout: int = N_HELDOUT,
               seed: int = SPLIT_SEED) -> list[dict]:
    """One dict per site: name, patients, heldout, train, in-plane spacing of each patient."""
    out = []
    for k, (name, group) in enumerate(zip(names, split_by_spacing(spacings, len(names)))):
        held = choose_heldout(group, n_heldout, seed, k)
        out.append({"site": name, "patients": list(group), "heldout": held,
                    "train": [p for p in group if p not in held],
                    "in_plane_spacing_mm": {p: in_plane_spacing(spacings[p]) for p in group},
                    "slice_spacing_mm": {p: round(float(spacings[p][2]), 6) for p in group}})
    return out


def find_patients(sample: Path) -> dict[str, Path]:
    """OpenKBP patient folders (those holding ct.csv) of the sample, by patient id."""
    return {p.name: p for p in sorted(sample.iterdir(), key=lambda q: natural_key(q.name))
            if p.is_dir() and (p / "ct.csv").is_file()}


def read_spacings(patients: Mapping[str, Path]) -> dict[str, tuple[float, float, float]]:
    from addiff_core.openkbp import read_voxel_dimensions

    return {pid: read_voxel_dimensions(path) for pid, path in patients.items()}


# --------------------------------------------------------------------------------------------
# files in the work folder
# --------------------------------------------------------------------------------------------
def _link_cases(folder: Path, cases_dir: Path, ids: Sequence[str]) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for pid in ids:
        target = cases_dir / pid
        try:
            (folder / pid).symlink_to(os.path.relpath(target, folder), target_is_directory=True)
        except OSError:  # no symlinks on this file system: copy
            shutil.copytree(target, folder / pid)


def _site_doc(name: str, data_dir: str, heldout: dict, budget: dict, note: str) -> str:
    import yaml

    doc = {"name": name, "data_dir": data_dir, "state_dir": f"state/{name}", "heldout": heldout, "device": "cpu",
           "training": {"batch_size": budget["batch_size"], "optimizer": budget["optimizer"], "lr": budget["lr"],
                        "lr_schedule": "constant", "vae_epochs": budget["local_epochs"],
                        "diffusion_epochs": budget["local_epochs"], "grad_clip": 1.0, "seed": 0}}
    return f"# {note}\n# Written by bench/openkbp_bench.py; rewritten on every run.\n" + yaml.safe_dump(doc, sort_keys=False)


def write_site_files(work: Path, cases_dir: Path, split: list[dict], budget: dict) -> tuple[list[Path], Path]:
    """Per-site data folders + site files, and the pooled site (union of the training cases)."""
    sites_dir = work / "sites"
    sites_dir.mkdir(parents=True, exist_ok=True)
    if (sites_dir / "state").exists():  # a fresh federation: no cached global VAE of an older run
        shutil.rmtree(sites_dir / "state")
    files = []
    for s in split:
        _link_cases(sites_dir / s["site"], cases_dir, s["patients"])
        spac = sorted(set(s["in_plane_spacing_mm"].values()))
        note = (f"OpenKBP site {s['site']}: {len(s['patients'])} patients, in-plane spacing {spac[0]}..{spac[-1]} mm, "
                f"held out: {', '.join(s['heldout'])}")
        f = sites_dir / f"{s['site']}.yaml"
        f.write_text(_site_doc(s["site"], s["site"], {"case_ids": list(s["heldout"])}, budget, note))
        files.append(f)
    pooled_ids = [p for s in split for p in s["train"]]
    _link_cases(sites_dir / "pooled", cases_dir, pooled_ids)
    pooled = sites_dir / "pooled.yaml"
    pooled.write_text(_site_doc("pooled", "pooled", {"fraction": 0.0}, budget,
                                f"pooled: the {len(pooled_ids)} training patients of all sites in one place "
                                "(nothing held out here; evaluated per site with addiff evaluate)"))
    return files, pooled


def model_config_file(budget: dict, work: Path) -> Path:
    """configs/openkbp64.yaml, or a copy with the budget's grid / DDIM steps (small budget)."""
    if budget["grid"] is None and budget["sample_steps"] is None:
        return MODEL_CONFIG
    import yaml

    from addiff_core.config import model_config_from_dict

    doc = yaml.safe_load(MODEL_CONFIG.read_text())
    if budget["grid"] is not None:
        doc["grid"] = {**doc.get("grid", {}), **budget["grid"]}
    if budget["sample_steps"] is not None:
        doc["sample_steps"] = budget["sample_steps"]
    model_config_from_dict(doc, "bench small-budget model config")  # validate
    path = work / "model_config.yaml"
    path.write_text("# configs/openkbp64.yaml with the small budget's grid (bench/openkbp_bench.py)\n"
                    + yaml.safe_dump(doc, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# running the steps
# --------------------------------------------------------------------------------------------
def _progress(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def run_step(cmd: list[str], log: Path, threads: int = 1) -> tuple[int, float]:
    """Run one addiff command with ``threads`` torch/OpenMP threads, output to ``log``;
    (exit status, wall seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    return rc, time.perf_counter() - t


def _log_tail(log: Path, n: int = 15) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _site_metrics(mean: Mapping[str, Any], n: int, cases: list[dict] | None = None) -> dict:
    out: dict[str, Any] = {"n_heldout": int(n)}
    for k in METRICS:
        v = mean.get(k)
        out[k] = float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None
    if cases is not None:
        out["cases"] = [{"case_id": c.get("case_id"), **{k: c.get(k) for k in METRICS}} for c in cases]
    return out


def _overall(per_site: Mapping[str, dict]) -> dict:
    """Held-out-case-weighted mean over the sites."""
    out: dict[str, Any] = {"n_heldout": int(sum(v.get("n_heldout", 0) for v in per_site.values()))}
    for k in METRICS:
        vals = [(v[k], v["n_heldout"]) for v in per_site.values() if v.get(k) is not None and v.get("n_heldout")]
        w = sum(n for _, n in vals)
        out[k] = sum(x * n for x, n in vals) / w if w else None
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
METHOD_LABELS = {"federated_addiff": "federated ADDiff-Dose", "federated_unet": "federated U-Net",
                 "local_addiff": "each site alone (ADDiff-Dose)", "pooled_addiff": "pooled (ADDiff-Dose)"}


def _spacing_text(spacing) -> str:
    return "x".join(f"{float(s):g}" for s in spacing) + " mm" if spacing else "each CT's own spacing"


def budget_text(b: dict, cfg) -> str:
    g = cfg.grid
    sp = _spacing_text(g.spacing)
    return (f"grid {g.size}^3 at {sp}; ADDiff-Dose: {b['vae_epochs']} VAE + {b['diffusion_epochs']} diffusion epochs, "
            f"U-Net: {b['unet_epochs']} epochs; an epoch is one pass over the training cases (federated: "
            f"{b['local_epochs']} local epoch per round, so {b['vae_epochs']}+{b['diffusion_epochs']} rounds for "
            f"ADDiff-Dose and {b['unet_epochs']} for the U-Net; local: the same epochs over a site's 6 cases; "
            f"pooled: the same epochs over the 18 pooled cases); batch {b['batch_size']}, {b['optimizer']} "
            f"lr {b['lr']:g} constant, grad clip 1; DDIM {cfg.sample_steps} steps at evaluation; CPU only")


def write_markdown(path: Path, res: dict) -> None:
    lines = [f"# OpenKBP real-anatomy benchmark (bench/openkbp_bench.py, budget `{res['budget']['name']}`)", ""]
    m = res["machine"]
    lines += [f"Machine: {m.get('cpu_model')}, {m.get('usable_cpus')} CPU cores, torch {m.get('torch')}, no GPU; "
              f"load average at start {m.get('loadavg_start')} / end {res.get('loadavg_end')} (the machine was shared "
              f"with other jobs, so times are inflated and noisy; the metrics are not affected). "
              f"Total wall time {res['wall_seconds'] / 60:.1f} min.", ""]
    lines += ["## Data and split", "",
              f"{res['data']['patients']} OpenKBP head-and-neck patients (`{res['data']['sample']}`), sorted by in-plane "
              "voxel spacing (ties: patient number) and cut in thirds: three sites of 8, each holding out 2 patients "
              f"(seeded draw, seed {SPLIT_SEED}) and training on 6.", "",
              "| site | in-plane spacing (mm) | training patients | held-out patients |", "|---|---|---|---|"]
    for s in res["split"]:
        sp = sorted(set(s["in_plane_spacing_mm"].values()))
        lines.append(f"| {s['site']} | {sp[0]:.3f} - {sp[-1]:.3f} | {', '.join(s['train'])} | {', '.join(s['heldout'])} |")
    lines += ["", "## Training budget", "", res["budget"]["text"] + ".", ""]
    lines += ["## Held-out results per site", "",
              "Each method evaluated on each site's own 2 held-out patients, on their 128^3 CT grid. MAE is taken "
              "inside the possible-dose mask, so it equals the OpenKBP dose score here. \"all\" = mean over the 6 "
              "held-out patients. Lower is better; gamma (3%/2 mm, 10% cutoff): higher is better.", ""]
    sites = [s["site"] for s in res["split"]]
    refs = [("reference: 0 Gy everywhere", res.get("zero_dose")),
            ("reference: grid floor (true dose via the model grid)", res.get("grid_floor"))]
    for title, key, nd in (("MAE = OpenKBP dose score (Gy)", "openkbp_dose_score", 2),
                           ("OpenKBP DVH score (Gy)", "openkbp_dvh_score", 2),
                           ("gamma pass rate 3%/2 mm (%)", "gamma_pass_rate", 1)):
        head = ["method"] + sites + ["all (6)"] + (["train + eval time"] if key == "openkbp_dose_score" else [])
        lines += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for mkey, label in METHOD_LABELS.items():
            meth = res["methods"].get(mkey)
            if not meth:
                continue
            if meth.get("error"):
                lines.append(f"| {label} | failed: {meth['error']} |" + " |" * (len(head) - 2))
                continue
            row = [label] + [_fmt(meth["per_site"].get(site, {}).get(key), nd) for site in sites]
            row.append(_fmt(meth["overall"].get(key), nd))
            if key == "openkbp_dose_score":
                secs = [v for v in meth.get("seconds", {}).values() if isinstance(v, (int, float))]
                row.append(f"{sum(secs) / 60:.1f} min" if secs else "")
            lines.append("| " + " | ".join(row) + " |")
        if key != "gamma_pass_rate":
            for label, ref in refs:
                if ref:
                    row = [f"*{label}*"] + [_fmt(ref["per_site"].get(site, {}).get(key), nd) for site in sites]
                    row += [_fmt(ref.get(key), nd)] + ([""] if key == "openkbp_dose_score" else [])
                    lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    floor = res.get("grid_floor")
    zero = res.get("zero_dose")
    if zero and zero.get("openkbp_dose_score"):
        parts = []
        for mkey, label in METHOD_LABELS.items():
            v = res["methods"].get(mkey, {}).get("overall", {}).get("mae_gy")
            if v is not None:
                parts.append(f"{label} {100 * (1 - v / zero['openkbp_dose_score']):.0f}%")
        if parts:
            lines += [f"Share of the 0 Gy reference's MAE that each method removes (all 6 patients): {', '.join(parts)}.", ""]
    pub = "; ".join(f"{k}: {d:.2f} / {v:.2f} Gy" for k, (d, v) in PUBLISHED.items())
    b = res["budget"]
    n_site = len(res["split"][0]["train"]) if res.get("split") else 0
    steps = lambda e, n: e * -(-n // int(b.get("batch_size", 1)))  # noqa: E731
    lines += ["## Caveats", "",
              f"- ADDiff-Dose is far from trained at this budget: its denoiser got {steps(b['diffusion_epochs'], n_site)} "
              f"optimiser steps per site ({steps(b['diffusion_epochs'], 3 * n_site)} pooled) after "
              f"{steps(b['vae_epochs'], n_site)} VAE steps, where latent diffusion models are usually trained for "
              "tens of thousands of steps; its samples are still noisy, hot-spotted doses. So the ADDiff rows (and "
              "federated vs. local vs. pooled among them) measure an undertrained denoiser, not the method; the "
              "direct-regression U-Net learns much faster per step and is the only model here that has clearly "
              "started to learn the dose distribution.",
              "- Tiny data: 6 training patients per site (18 pooled) and 2 held-out patients per site; a site's "
              "numbers rest on 2 patients (the \"all\" row on 6), so differences of about a Gy between methods "
              "are within the noise; no repeats with other seeds were affordable.",
              "- CPU budget: a few epochs on 2 shared cores; none of the models is trained to convergence. The "
              "ranking of the methods at this budget need not hold at a full budget (ADDiff-Dose in particular "
              "needs a well-trained VAE before its diffusion stage can be good).",
              f"- Published OpenKBP test-set scores (dose / DVH score, 100 test patients, 200 training patients, "
              f"native 128^3 grid, GPU training): {pub}. These numbers are not comparable in scale with "
              "the ones here (other patients, 18 vs 200 training patients, "
              f"a {res['model']['grid']['size']}^3 model grid at {_spacing_text(res['model']['grid']['spacing'])}).",
              ]
    if floor:
        lines.append(f"- Grid floor: the reference dose itself, mapped onto the {res['model']['grid']['size']}^3 model "
                     f"grid ({_spacing_text(res['model']['grid']['spacing'])}) and back onto the CT grid, scores "
                     f"{floor['openkbp_dose_score']:.2f} Gy dose score and {floor['openkbp_dvh_score']:.2f} Gy DVH "
                     "score on these 6 held-out patients: no model on this grid can do better (the price of the "
                     "coarse voxels; configs/openkbp64.yaml says why 5 mm).")
    if zero:
        per = ", ".join(f"{k} {v['openkbp_dose_score']:.2f}" for k, v in zero["per_site"].items())
        lines.append(f"- Zero reference: predicting 0 Gy everywhere scores {zero['openkbp_dose_score']:.2f} Gy dose "
                     f"score / MAE ({per}) and {zero['openkbp_dvh_score']:.2f} Gy DVH score: a method near these "
                     "numbers has learned little.")
    lines += ["- Pooled training is evaluated with `addiff evaluate` per site on the same held-out patients; "
              "the federated runs evaluate the final global model at each site (numbers only).",
              f"- Run folders and logs: `{res['work']}`; `addiff report {res['methods'].get('federated_addiff', {}).get('run_dir', 'RUN')}` "
              "shows the federated / local / pooled comparison (`comparison.json`).", ""]
    path.write_text("\n".join(lines))


def reference_scores(work: Path, split: list[dict], cfg) -> dict:
    """Two references on the same held-out patients, no training involved:

    * ``grid_floor``: the reference dose mapped onto the model grid and back onto the CT grid
      (the best any model on this grid can score);
    * ``zero_dose``: predicting 0 Gy everywhere (what a model that learned nothing scores).
    Each: per site and over all held-out patients; {} where it could not be computed.
    """
    out: dict[str, Any] = {}
    try:
        import numpy as np
        import SimpleITK as sitk

        from addiff_core.case_io import load_case
        from addiff_core.metrics import openkbp_dose_score, openkbp_dvh_score
        from addiff_core.preprocessing import case_to_sample, dose_to_ct_grid

        rows: dict[str, dict[str, list]] = {"grid_floor": {}, "zero_dose": {}}
        for s in split:
            for pid in s["heldout"]:
                c = load_case(work / "cases" / pid)
                sample, spec = case_to_sample(c, cfg.grid)
                ref = c.array("dose")
                pdm = c.array("possible_dose_mask").astype(bool)
                masks = {k: c.array(k).astype(bool) for k in c.masks}
                vcc = float(np.prod(c.ct.GetSpacing())) / 1000.0
                preds = {"grid_floor": sitk.GetArrayFromImage(
                             dose_to_ct_grid(sample["dose"][0], float(sample["rx"]), spec, c.ct)),
                         "zero_dose": np.zeros_like(ref)}
                for name, p in preds.items():
                    rows[name].setdefault(s["site"], []).append(
                        (openkbp_dose_score(p, ref, pdm), openkbp_dvh_score(p, ref, masks, vcc, c.plan.prescriptions.keys())))
        for name, per in rows.items():
            per_site = {site: {"n_heldout": len(v), "openkbp_dose_score": float(np.mean([a for a, _ in v])),
                               "openkbp_dvh_score": float(np.mean([b for _, b in v]))} for site, v in per.items()}
            allv = [x for v in per.values() for x in v]
            out[name] = {"per_site": per_site, "n": len(allv),
                         "openkbp_dose_score": float(np.mean([a for a, _ in allv])),
                         "openkbp_dvh_score": float(np.mean([b for _, b in allv]))}
    except Exception as e:  # noqa: BLE001 - reference numbers; never cost the run its results
        print(f"(reference scores not computed: {type(e).__name__}: {e})", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def render_only(args: argparse.Namespace) -> int:
    """Rewrite the result files of an earlier run (same training results; references recomputed)."""
    out = (args.out or (DEFAULT_OUT if args.budget == "default" else
                        (args.work or Path(f"{DEFAULT_WORK}_{args.budget}")) / "results")).resolve()
    path = out / "openkbp_bench.json"
    if not path.is_file():
        print(f"openkbp_bench: --render-only: {path} not found (run the benchmark first)", file=sys.stderr)
        return 2
    from addiff_core.config import model_config_from_dict

    res = _read_json(path)
    work = Path(args.work).resolve() if args.work else Path(res["work"])
    cfg = model_config_from_dict({k: v for k, v in res["model"].items() if k != "config"}, str(path))
    refs = reference_scores(work, res["split"], cfg)
    res.update({"grid_floor": refs.get("grid_floor"), "zero_dose": refs.get("zero_dose")})
    res["rendered_again"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    from common import sanitize

    path.write_text(json.dumps(sanitize(res), indent=2) + "\n")
    write_markdown(out / "openkbp_bench.md", res)
    print(f"rewritten: {path}, {out / 'openkbp_bench.md'}", flush=True)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE,
                   help=f"OpenKBP sample folder (default {DEFAULT_SAMPLE}; or $ADDIFF_OPENKBP_SAMPLE)")
    p.add_argument("--work", type=Path, default=None,
                   help=f"work folder: imported cases, site files, run folders, logs (default {DEFAULT_WORK}[_small])")
    p.add_argument("--budget", choices=tuple(BUDGETS), default="default",
                   help="default: 64^3, tens of minutes on 2 CPU cores; small: 32^3, one epoch, a few minutes")
    p.add_argument("--out", type=Path, default=None,
                   help="where openkbp_bench.json/.md go (default bench/results; small budget: WORK/results)")
    p.add_argument("--render-only", action="store_true",
                   help="train nothing: re-read OUT/openkbp_bench.json, recompute the reference scores (grid floor, "
                        "0 Gy) from its work folder's cases and rewrite OUT/openkbp_bench.json and .md")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per training/evaluation process (default 1: on a shared, busy CPU one "
                        "thread ran 2-4x faster than two); the federated runs use one process per site")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sample = args.sample.expanduser()
    if args.threads < 1:
        print("openkbp_bench: --threads must be >= 1", file=sys.stderr)
        return 2
    if args.render_only:
        return render_only(args)
    if not sample.is_dir():
        print(f"OpenKBP sample not found at {sample}; skipping (give --sample PATH or set ADDIFF_OPENKBP_SAMPLE)",
              flush=True)
        return 0
    patients = find_patients(sample)
    need = len(SITE_NAMES) * (N_HELDOUT + 1)
    if len(patients) < need:
        print(f"openkbp_bench: {sample} holds {len(patients)} OpenKBP patient folder(s); need at least {need}",
              file=sys.stderr)
        return 2

    from common import loadavg, machine_info, quiet_warnings

    quiet_warnings()
    from addiff_core.config import load_model_config
    from addiff_core.openkbp import import_openkbp

    budget = {"name": args.budget, **BUDGETS[args.budget]}
    work = (args.work or (DEFAULT_WORK if args.budget == "default" else Path(f"{DEFAULT_WORK}_{args.budget}"))).resolve()
    out = (args.out or (DEFAULT_OUT if args.budget == "default" else work / "results")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    machine = machine_info("cpu")
    machine.pop("memory_method", None)  # no memory measured here
    machine["torch_threads_per_step"] = args.threads  # what the training/evaluation processes use
    py = [sys.executable, "-m", "addiff_core.cli"]

    # 1. import + split + site files
    _progress(t0, f"importing {len(patients)} OpenKBP patients from {sample} into {work / 'cases'} ...")
    cases_dir = work / "cases"
    import_openkbp(sample, cases_dir, progress=False)
    import_seconds = time.perf_counter() - t0
    spacings = read_spacings(patients)
    split = make_split(spacings)
    site_files, pooled_file = write_site_files(work, cases_dir, split, budget)
    cfg_file = model_config_file(budget, work)
    cfg = load_model_config(cfg_file)
    budget["model_config"] = str(cfg_file.relative_to(REPO) if cfg_file.is_relative_to(REPO) else cfg_file)
    budget["text"] = budget_text(budget, cfg)
    n_train = sum(len(s["train"]) for s in split)
    budget["case_passes_per_method"] = {"vae": n_train * budget["vae_epochs"],
                                        "diffusion": n_train * budget["diffusion_epochs"],
                                        "unet": n_train * budget["unet_epochs"]}
    budget["execution"] = (f"federated: addiff simulate, one Ray actor per site with 1 CPU (two sites train at once "
                           f"on 2 cores); local, pooled and evaluations: one process at a time, {args.threads} torch "
                           f"thread(s) each")
    for s in split:
        sp = sorted(set(s["in_plane_spacing_mm"].values()))
        _progress(t0, f"{s['site']}: {', '.join(s['patients'])} (in-plane {sp[0]:.3f}..{sp[-1]:.3f} mm); "
                      f"held out {', '.join(s['heldout'])}")
    _progress(t0, f"budget {args.budget}: {budget['text']}")

    runs = work / "runs"
    logs = work / "logs"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    methods: dict[str, dict] = {}
    failed: list[str] = []
    site_csv = ",".join(str(f) for f in site_files)
    common_sim = ["simulate", "--site-files", site_csv, "--config", str(cfg_file), "--local-epochs",
                  str(budget["local_epochs"]), "--seed", "0"] + ([] if budget["gamma"] else ["--no-gamma"])

    def fail(key: str, step: str, rc: int, log: Path) -> None:
        msg = f"{step} exited with status {rc}; log {log}"
        _progress(t0, f"FAILED: {msg}\n{_log_tail(log)}")
        methods[key] = {"error": msg, "log": str(log)}
        failed.append(key)

    # 2. federated runs
    for key, kind, rounds in (("federated_addiff", "diffusion", f"{budget['vae_epochs']},{budget['diffusion_epochs']}"),
                              ("federated_unet", "unet", str(budget["unet_epochs"]))):
        run_dir = runs / key
        log = logs / f"{key}.log"
        _progress(t0, f"{METHOD_LABELS[key]}: addiff simulate --model {kind} --rounds {rounds} ... (log {log})")
        rc, secs = run_step(py + common_sim + ["--model", kind, "--rounds", rounds, "--run-dir", str(run_dir)], log, args.threads)
        fm = run_dir / "final_metrics.json"
        if rc != 0 or not fm.is_file():
            fail(key, "addiff simulate", rc, log)
            continue
        rows = {r["site"]: r for r in _read_json(fm)}
        per_site = {s["site"]: _site_metrics(rows.get(s["site"], {}), rows.get(s["site"], {}).get("cases", 0))
                    for s in split}
        methods[key] = {"run_dir": str(run_dir), "per_site": per_site, "overall": _overall(per_site),
                        "seconds": {"simulate_total": secs}, "log": str(log)}
        _progress(t0, f"  done in {secs:.0f} s: MAE per site "
                      + ", ".join(f"{k} {_fmt(v['mae_gy'])}" for k, v in per_site.items()))

    # 3. each site alone
    per_site, secs_local, ok = {}, {}, True
    for s, f in zip(split, site_files):
        run_dir = runs / f"local_{s['site']}"
        log = logs / f"local_{s['site']}.log"
        _progress(t0, f"{s['site']} alone: addiff train --vae-epochs {budget['vae_epochs']} --diffusion-epochs "
                      f"{budget['diffusion_epochs']} ... (log {log})")
        rc, secs = run_step(py + ["train", "--site", str(f), "--out", str(run_dir), "--config", str(cfg_file),
                                  "--model", "diffusion", "--vae-epochs", str(budget["vae_epochs"]),
                                  "--diffusion-epochs", str(budget["diffusion_epochs"]), "--quiet"], log, args.threads)
        mj = run_dir / "metrics.json"
        if rc != 0 or not mj.is_file():
            fail("local_addiff", f"addiff train ({s['site']})", rc, log)
            ok = False
            break
        h = _read_json(mj)["heldout"]
        per_site[s["site"]] = _site_metrics(h["mean"], h["num_cases"], h.get("cases"))
        secs_local[s["site"]] = secs
        _progress(t0, f"  done in {secs:.0f} s: MAE {_fmt(per_site[s['site']]['mae_gy'])}")
    if ok:
        methods["local_addiff"] = {"run_dirs": [str(runs / f"local_{s['site']}") for s in split], "per_site": per_site,
                                   "overall": _overall(per_site), "seconds": secs_local}

    # 4. pooled: train on the union of the training cases, evaluate per site
    run_dir = runs / "pooled"
    log = logs / "pooled_train.log"
    _progress(t0, f"pooled: addiff train on {sum(len(s['train']) for s in split)} cases ... (log {log})")
    rc, secs = run_step(py + ["train", "--site", str(pooled_file), "--out", str(run_dir), "--config", str(cfg_file),
                              "--model", "diffusion", "--vae-epochs", str(budget["vae_epochs"]),
                              "--diffusion-epochs", str(budget["diffusion_epochs"]), "--quiet"], log, args.threads)
    if rc != 0 or not (run_dir / "model.pt").is_file():
        fail("pooled_addiff", "addiff train (pooled)", rc, log)
    else:
        _progress(t0, f"  trained in {secs:.0f} s")
        per_site, secs_pool = {}, {"train": secs}
        for s, f in zip(split, site_files):
            ev_json = run_dir / f"eval_{s['site']}.json"
            log = logs / f"pooled_eval_{s['site']}.log"
            rc, esecs = run_step(py + ["evaluate", "--checkpoint", str(run_dir / "model.pt"), "--site", str(f),
                                       "--out", str(ev_json)], log, args.threads)
            if rc != 0 or not ev_json.is_file():
                fail("pooled_addiff", f"addiff evaluate (pooled on {s['site']})", rc, log)
                break
            e = _read_json(ev_json)
            per_site[s["site"]] = _site_metrics(e["mean"], e["num_cases"], e.get("cases"))
            secs_pool[f"evaluate_{s['site']}"] = esecs
            _progress(t0, f"  {s['site']}: MAE {_fmt(per_site[s['site']]['mae_gy'])} ({esecs:.0f} s)")
        else:
            methods["pooled_addiff"] = {"run_dir": str(run_dir), "per_site": per_site, "overall": _overall(per_site),
                                        "seconds": secs_pool}

    # 5. results
    refs = reference_scores(work, split, cfg)
    res = {
        "bench": "openkbp_bench",
        "budget": budget,
        "data": {"sample": str(sample), "patients": len(patients), "cases_dir": str(cases_dir),
                 "import_seconds": import_seconds},
        "split": split,
        "split_rule": (f"patients sorted by in-plane voxel spacing (voxel_dimensions.csv rows 1-2; ties: patient "
                       f"number), cut into {len(SITE_NAMES)} contiguous thirds; {N_HELDOUT} held-out patients per site "
                       f"drawn with numpy default_rng([{SPLIT_SEED}, site index])"),
        "model": {"config": budget["model_config"], **cfg.to_dict()},
        "methods": methods,
        "metric_keys": list(METRICS),
        "grid_floor": refs.get("grid_floor"),
        "zero_dose": refs.get("zero_dose"),
        "published_openkbp_test": {k: {"dose_score": d, "dvh_score": v} for k, (d, v) in PUBLISHED.items()},
        "machine": machine,
        "loadavg_end": loadavg(),
        "work": str(work),
        "wall_seconds": time.perf_counter() - t0,
        "failed": failed,
    }
    fed = methods.get("federated_addiff", {})
    if fed.get("run_dir"):
        series = {}
        for key, name in (("federated_addiff", "federated"), ("federated_unet", "federated U-Net"),
                          ("local_addiff", "local"), ("pooled_addiff", "pooled")):
            if methods.get(key, {}).get("per_site"):
                series[name] = {site: {k: v[k] for k in METRICS if v.get(k) is not None}
                                for site, v in methods[key]["per_site"].items()}
        comp = {"metric": "mae_gy", "series": series,
                "note": (f"OpenKBP real-anatomy benchmark (bench/openkbp_bench.py, budget {args.budget}): "
                         f"{budget['text']}. federated = ADDiff-Dose FedAvg; federated U-Net = the direct-regression "
                         "baseline, FedAvg; local = ADDiff-Dose trained on one site's 6 cases; pooled = ADDiff-Dose "
                         "trained on the 18 training cases of all sites. Each site's 2 held-out patients.")}
        Path(fed["run_dir"], "comparison.json").write_text(json.dumps(comp, indent=2) + "\n")
        log = logs / "report.log"
        rc, rsecs = run_step(py + ["report", fed["run_dir"]], log, args.threads)
        res["report"] = {"run_dir": fed["run_dir"], "status": rc, "seconds": rsecs,
                         "path": str(Path(fed["run_dir"]) / "report" / "report.md")}
        res["wall_seconds"] = time.perf_counter() - t0
    from common import sanitize

    (out / "openkbp_bench.json").write_text(json.dumps(sanitize(res), indent=2) + "\n")
    write_markdown(out / "openkbp_bench.md", res)
    _progress(t0, f"written: {out / 'openkbp_bench.json'}, {out / 'openkbp_bench.md'}")
    print((out / "openkbp_bench.md").read_text(), flush=True)
    if failed:
        print(f"openkbp_bench: {len(failed)} method(s) failed: {', '.join(failed)} (see the logs above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
