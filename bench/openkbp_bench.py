"""Real-anatomy benchmark: 84 OpenKBP head-and-neck patients as three hospitals.

    python bench/openkbp_bench.py [--sample PATH] [--extra PATH|none] [--heldout N] [--work DIR]
                                  [--budget small|default] [--methods M1,M2,...] [--scale K]
                                  [--out DIR] [--threads N] [--render-only]

1. Imports every patient of the OpenKBP sample (24, ``--sample``) and of the extra training pool
   (``--extra``: 60 more, ``../shared/openkbp-train/openkbp-train-60.tar.xz`` when present; the
   ``.tar.xz`` is unpacked with ``tar -xJf`` into ``WORK/extra`` once, or an unpacked folder is
   read as it is; ``--extra none``: the sample alone) with ``addiff_core.openkbp.import_openkbp``
   into ``WORK/cases``. The data never enter the repository.
2. Splits all of them into three sites by in-plane voxel spacing (``voxel_dimensions.csv``;
   sorted, ties broken by the patient number, cut in thirds: spacing follows the source
   institution, so this is a natural per-institution, non-IID split). Each site holds out a fixed
   set of ``--heldout`` patients (default 5 of its 28 with the extra pool, 2 of 8 for the sample
   alone), drawn with a fixed seed (``choose_heldout``). Site files: ``WORK/sites/openkbp_{a,b,c}.yaml``
   (data folders of hard links to the imported cases), plus ``pooled.yaml`` whose folder holds only
   the union of the three sites' training patients (nothing held out there).
3. Measures the CPU seconds of one optimiser step (batch 1, ``--threads`` threads, 2 real
   training cases, after a warm-up step) of the VAE stage, the diffusion stage and the U-Net in a
   child process, for the record (the budget below was set from the same measurement).
4. Trains, with the same model config and the same number of epochs over each training case:

   * federated ADDiff-Dose: ``addiff simulate --site-files a,b,c --rounds V,D --local-epochs 1``
   * federated U-Net baseline: ``addiff simulate --model unet --rounds U --local-epochs 1``
   * each site alone: ``addiff train --site SITE --vae-epochs V --diffusion-epochs D`` (x 3)
   * pooled: ``addiff train --site pooled.yaml`` (same epochs over the pooled cases), then
     ``addiff evaluate --checkpoint pooled/model.pt --site SITE`` for each site.

   Every method is evaluated per site on that site's own held-out patients, on their 128^3 CT
   grid, with the official OpenKBP scores (dose score over the possible-dose mask, DVH score one
   mean over every DVH cell; the prediction is set to 0 outside the mask first), gamma 3%/2 mm and
   isodose Dice.
5. Uncertainty of the ADDiff-Dose models (federated, each site alone, pooled): for every held-out
   patient ``addiff predict --samples 8 --force`` (``predict.predict_case``: mean dose + voxel-wise
   std, both on the CT grid), then over the voxels of the possible-dose mask the Spearman
   correlation (``scipy.stats.spearmanr``) between the std and |mean - reference dose|, and the
   calibration: the fraction of voxels whose reference dose lies within mean +- 2 std; both
   averaged over patients, per site and per method (the U-Net is deterministic: no uncertainty).
6. Latent probe of the same ADDiff-Dose models (issue #24: does the diffusion decide?):
   ``addiff_core.latent_probe.probe_cases`` (4 samples) on each site's held-out patients: MAE of
   the sampled latent, z = 0, the oracle decode(encode(dose)) and another patient's (shuffled)
   latent, the spread, oracle / sampled and min(z = 0, shuffled) / sampled, per site and overall.
   Steps 3, 5 and 6 run in child processes (``bench/openkbp_tasks.py``), so their CPU is counted.
7. Writes ``OUT/openkbp_bench.json`` and ``OUT/openkbp_bench.md`` (``bench/openkbp_report.py``)
   after every method (``complete`` false until the end, so a stopped run keeps what it measured)
   and a ``comparison.json`` (``addiff_core/report.py`` format) into the federated ADDiff run
   folder, whose ``addiff report`` then shows federated vs. U-Net vs. local vs. pooled.

``--methods`` runs a subset (comma list of federated_addiff, federated_unet, local_addiff,
pooled_addiff; default all); the run folders of the others are left alone, and so are their
results when ``OUT`` already holds a results file of the same budget, split and model
(``carried_over`` in the JSON). ``--scale K``
multiplies the budget's VAE, diffusion and U-Net epochs by K (rounded half up, at least 1), for a
learning curve: its results go to ``OUT/openkbp_bench_xK.json/.md`` and its runs and logs to
``WORK/runs_xK``, ``WORK/logs_xK`` (K = 1: ``openkbp_bench.json``, ``WORK/runs``), and the
Markdown shows a learning-curve table over the result files of the same budget in ``OUT``.

Budget at equal compute (``default``, 64^3 at 5 mm, ``configs/openkbp64.yaml``; the epochs and the
step times they were set from: ``DEFAULT_EPOCHS`` and ``DEFAULT_SET_FROM_STEP_CPU_SECONDS``). CPU seconds of
one optimiser step, batch 1, 1 torch thread, on the 2-core machine with little other load, of the
design of issue #24 (a 16^3 x 8 residual latent, a decoder that reads only its latent, a
three-level denoiser, the decoded-x0 L1): VAE 0.65 s, diffusion 0.77 s, U-Net 1.2 s
(``step_cpu_seconds`` in the results holds each run's own measurement; contention inflates CPU
time too). Rules: (a) ADDiff-Dose's two stages cost about the U-Net's epochs in CPU; (b) most of
ADDiff-Dose's CPU goes to the diffusion stage: the diffusion decides the dose, and one VAE epoch
already reconstructs to ~1/3 of the sampled error (federated pilots on the 84 patients, dose /
DVH score: VAE 2 + diffusion 3 epochs 7.56 / 10.53 Gy, 1 + 4 epochs 7.36 / 10.14 Gy); (c) the
whole run stays within ~55 CPU minutes on 1 thread. With 69 training patients an epoch of a method
is 69 steps: V = 1, D = 4 costs 0.65 + 4 x 0.77 = 3.73 CPU s per case and U = 3 costs 3.6 (0.97x;
U = 4: 1.29x). Planned: 69 x (3 x 3.73 + 3.6) = 1021 CPU s (17 min) of training, plus imports,
start-ups (Ray), data loading, evaluation with gamma, 8-sample uncertainty and the latent probe.
Wall time on the loaded 2-core machine is 1.3-3x the CPU time, depending on the other jobs.
``small`` (32^3 at 10 mm,
1 + 1 epochs, U-Net 2) checks the pipeline; its results go to ``WORK/results`` unless ``--out`` is
given, so they never overwrite the default budget's results in ``bench/results``.

Training and evaluation processes run with ``--threads`` torch threads (default 1: on a busy,
shared 2-core machine one thread trained 2-4x faster than two). ``--render-only`` rewrites the
result files of an earlier run without training (reference scores recomputed; ``--scale K``
picks ``openkbp_bench_xK.json``).

Without the sample folder the script prints "OpenKBP sample not found at PATH; skipping" and
exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
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

from openkbp_report import (ADDIFF_METHODS, CAL, DVH_CELLS, METHOD_LABELS, METRICS, PUBLISHED, UNC,  # noqa: E402
                            budget_text, planned_cpu, results_stem, scale_epochs, scale_suffix,
                            summarize_uncertainty, write_markdown)
from openkbp_tasks import CHILD_TASKS, PROBE_SAMPLES  # noqa: E402

DEFAULT_SAMPLE = Path(os.environ.get("ADDIFF_OPENKBP_SAMPLE") or (REPO.parent / "shared" / "openkbp-sample"))
DEFAULT_EXTRA = Path(os.environ.get("ADDIFF_OPENKBP_EXTRA")
                     or (REPO.parent / "shared" / "openkbp-train" / "openkbp-train-60.tar.xz"))
DEFAULT_WORK = REPO / "runs" / "openkbp_bench"
DEFAULT_OUT = BENCH_DIR / "results"
MODEL_CONFIG = REPO / "configs" / "openkbp64.yaml"
SCRIPT = Path(__file__).resolve()
SITE_NAMES = ("openkbp_a", "openkbp_b", "openkbp_c")  # finest -> coarsest in-plane spacing
N_HELDOUT = 2  # held-out patients per site, the sample alone (24 patients: 8 per site)
HELDOUT_WITH_EXTRA = 5  # held-out patients per site with the extra pool (84 patients: 28 per site)
SPLIT_SEED = 0
UNCERTAINTY_SAMPLES = 8  # addiff predict --samples (issue #24: 8 samples behind the std map)
METHODS = tuple(METHOD_LABELS)  # --methods: which of these to run (default all)

# Training budget. One "epoch" is one pass over a site's (or the pool's) training cases; the
# federated runs train 1 local epoch per round, so rounds = epochs and every method sees each
# training case the same number of times per stage. Why these numbers: the module docstring.
# The default budget's numbers to change are these three names; everything else derives from them.
DEFAULT_EPOCHS = {"vae": 1, "diffusion": 4, "unet": 3}
# what the default epochs were set from (CPU s per optimiser step, batch 1, 1 thread, 64^3, idle machine)
DEFAULT_SET_FROM_STEP_CPU_SECONDS = {"vae": 0.65, "diffusion": 0.77, "unet": 1.2}
DEFAULT_RULES = ("ADDiff-Dose's two stages ~ the U-Net's epochs in CPU; most of ADDiff-Dose's CPU to the "
                 "diffusion stage (the diffusion decides the dose; one VAE epoch reconstructs to ~1/3 of the "
                 "sampled error); whole run <= ~55 CPU minutes on 1 thread")
SMALL_EPOCHS = {"vae": 1, "diffusion": 1, "unet": 2}  # the pipeline check


def make_budget(epochs: Mapping[str, int], grid: dict | None = None, set_from: Mapping[str, float] | None = None,
                rules: str | None = None) -> dict[str, Any]:
    """One budget: per-stage ``epochs`` (vae, diffusion, unet), the model ``grid`` (None: the
    model config's), the same optimiser for every method; ``set_from``/``rules``: what the epochs
    were chosen from (shown in the report)."""
    b: dict[str, Any] = {"grid": grid, "sample_steps": None, "vae_epochs": int(epochs["vae"]),
                         "diffusion_epochs": int(epochs["diffusion"]), "unet_epochs": int(epochs["unet"]),
                         "local_epochs": 1, "batch_size": 1, "lr": 1e-3, "optimizer": "adamw", "gamma": True,
                         "uncertainty_samples": UNCERTAINTY_SAMPLES, "probe_samples": PROBE_SAMPLES}
    if set_from is not None:
        b["set_from_step_cpu_seconds"] = dict(set_from)
        b["rules"] = rules
    return b


BUDGETS: dict[str, dict[str, Any]] = {
    "default": make_budget(DEFAULT_EPOCHS, None, DEFAULT_SET_FROM_STEP_CPU_SECONDS, DEFAULT_RULES),
    "small": make_budget(SMALL_EPOCHS, {"size": 32, "spacing": [10.0, 10.0, 10.0]}),
}
MAX_SCALE = 100.0  # --scale bound: 100x the default budget is ~90 CPU hours, past any run on this machine


def scaled_budget(name: str, scale: float) -> dict[str, Any]:
    """The budget ``name`` with its VAE / diffusion / U-Net epochs x ``scale`` (``scale_epochs``:
    rounded half up, at least 1); ``base_epochs`` keeps the unscaled ones when scale != 1."""
    b = {"name": name, **BUDGETS[name], "scale": float(scale)}
    if float(scale) != 1.0:
        b["base_epochs"] = {k: b[f"{k}_epochs"] for k in ("vae", "diffusion", "unet")}
        for k in ("vae", "diffusion", "unet"):
            b[f"{k}_epochs"] = scale_epochs(b[f"{k}_epochs"], scale)
    return b


def parse_methods(text: str | None) -> list[str]:
    """``--methods`` (comma list) -> method keys in the bench's order; ValueError for an unknown
    or empty list."""
    if text is None:
        return list(METHODS)
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise ValueError(f"--methods: {'unknown ' + ', '.join(bad) if bad else 'empty'} (choose from "
                         f"{', '.join(METHODS)})")
    return [m for m in METHODS if m in names]


STEP_TIMING_CASES = 2  # real training cases behind the step-time measurement (1 warm-up step, then 2 epochs)


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


def find_extra_patients(folder: Path) -> dict[str, Path]:
    """OpenKBP patient folders anywhere up to 3 levels below ``folder`` (the unpacked archive holds
    ``okbp-train/pt_*``), by patient id (``addiff_core.openkbp.find_patients``)."""
    from addiff_core.openkbp import find_patients as find_any

    out: dict[str, Path] = {}
    for p in find_any(Path(folder)):
        if (p / "ct.csv").is_file():
            if p.name in out:
                raise ValueError(f"{folder}: patient {p.name} found twice ({out[p.name]}, {p})")
            out[p.name] = p
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))


def is_archive(path: Path) -> bool:
    return path.name.endswith((".tar.xz", ".txz", ".tar.gz", ".tgz", ".tar"))


def unpack_extra(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` (``tar -xJf`` for .tar.xz) into ``dest`` once: a marker file records the
    archive's path, size and mtime, and a matching earlier unpacking is reused. Returns ``dest``."""
    archive = Path(archive).resolve()
    st = archive.stat()
    stamp = f"{archive}\n{st.st_size}\n{int(st.st_mtime)}\n"
    marker = dest / ".unpacked-from"
    if marker.is_file() and marker.read_text() == stamp:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    flag = "-xJf" if archive.name.endswith((".tar.xz", ".txz")) else ("-xzf" if archive.name.endswith(("gz", "tgz")) else "-xf")
    proc = subprocess.run(["tar", flag, str(archive), "-C", str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise RuntimeError(f"tar {flag} {archive} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    marker.write_text(stamp)
    return dest


def resolve_extra(extra: str | Path | None, work: Path) -> Path | None:
    """The folder of the extra patients: ``None`` for none; an archive is unpacked into
    ``WORK/extra``; a folder is used as it is. FileNotFoundError when the path does not exist."""
    if extra is None or str(extra).lower() in ("", "none", "no"):
        return None
    extra = Path(extra).expanduser()
    if extra.is_dir():
        return extra
    if extra.is_file() and is_archive(extra):
        return unpack_extra(extra, work / "extra")
    raise FileNotFoundError(f"extra OpenKBP patients: {extra} is neither a folder nor a .tar.xz archive")


def import_all(patients: Mapping[str, Path], cases_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """``import_openkbp`` once per parent folder of the patients (each parent's patients land
    directly in ``cases_dir``); (imported ids, skipped (id, reason))."""
    from addiff_core.openkbp import import_openkbp

    parents = list(dict.fromkeys(p.parent for p in patients.values()))
    imported, skipped = [], []
    for parent in parents:
        summary = import_openkbp(parent, cases_dir, progress=False)
        imported += [p.name for p in summary.imported]
        skipped += list(summary.skipped)
    wanted = set(patients)
    return [p for p in imported if p in wanted], [s for s in skipped if Path(s[0]).name in wanted]


# --------------------------------------------------------------------------------------------
# files in the work folder
# --------------------------------------------------------------------------------------------
def _link_cases(folder: Path, cases_dir: Path, ids: Sequence[str]) -> None:
    """``folder/<id>`` for each case: a tree of hard links to the imported case's files (no copy of
    the data, and no symbolic link, which a site refuses to follow out of its data folder); a copy
    where the file system has no hard links."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for pid in ids:
        shutil.copytree(cases_dir / pid, folder / pid, copy_function=link)


def _site_doc(name: str, data_dir: str, heldout: dict, budget: dict, note: str) -> str:
    import yaml

    doc = {"name": name, "data_dir": data_dir, "state_dir": f"state/{name}", "heldout": heldout, "device": "cpu",
           "training": {"batch_size": budget["batch_size"], "optimizer": budget["optimizer"], "lr": budget["lr"],
                        "lr_schedule": "constant", "vae_epochs": budget["local_epochs"],
                        "diffusion_epochs": budget["local_epochs"], "grad_clip": 1.0,
                        "seed": int(budget.get("seed", 0))}}
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


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


CPU_SPENT: list[float] = []  # CPU seconds of every finished step (run_step, run_child_task) of this process


def _proc_cpu(pid: int) -> tuple[int, float] | None:
    """(parent pid, own user + system CPU seconds) of a live process, from /proc (None if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample_tree_cpu(root: int, seen: dict[int, float]) -> None:
    """Update ``seen`` (pid -> largest own CPU seconds observed) with every live process of the tree
    below ``root`` (included). Summing ``seen`` counts processes that are never waited for by their
    parent chain, such as the Ray workers of a federated simulation, which getrusage misses."""
    if not Path("/proc").is_dir():
        return
    procs: dict[int, tuple[int, float]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            info = _proc_cpu(int(d))
            if info is not None:
                procs[int(d)] = info
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    stack = [root] + [pid for pid in seen if pid in procs]  # known pids too, also once orphaned
    while stack:
        pid = stack.pop()
        if pid in procs:
            seen[pid] = max(seen.get(pid, 0.0), procs[pid][1])
        stack.extend(kids.get(pid, []))


def thread_env(threads: int) -> dict[str, str]:
    """Environment of a child: ``threads`` torch/OpenMP/MKL/ITK threads, no Flower telemetry."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}


# what a federated simulation prints when Ray could not start (its raylet waits a fixed 30 s for the
# GCS, too short on an overloaded machine) or its runtime crashed; Flower then may hang instead of
# exiting, so the process is stopped and the run tried again (RAY_START_RETRIES)
RAY_CRASH_MARKERS = ("timed out during startup", "Simulation Runtime crashed")
RAY_START_RETRIES = 2
HANG_GRACE_SECONDS = 120.0


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group the child was started in (its own session)."""
    import signal

    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(cmd: list[str], log: Path, threads: int = 1, timeout: float | None = None) -> tuple[int, float, float]:
    """Run one addiff command with ``threads`` torch/OpenMP threads, output to ``log``;
    (exit status, wall seconds, CPU seconds of the process tree: the larger of getrusage of the
    children, which counts every descendant that was waited for, and the sum of every descendant's
    own CPU time sampled every 5 s from /proc, which also counts Ray's workers). The command runs in a session
    of its own; it is stopped (status 124) after ``timeout`` seconds, or ``HANG_GRACE_SECONDS``
    after its log shows a Ray crash (``RAY_CRASH_MARKERS``) if it has not exited by then."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t, c = time.perf_counter(), _children_cpu()
    crashed_at = None
    tree: dict[int, float] = {}
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=thread_env(threads),
                                start_new_session=True)
        while True:
            try:
                rc = proc.wait(timeout=5.0)
                sample_tree_cpu(proc.pid, tree)  # descendants that outlive it
                break
            except subprocess.TimeoutExpired:
                pass
            sample_tree_cpu(proc.pid, tree)
            now = time.perf_counter()
            if crashed_at is None and any(m in log.read_text(errors="replace") for m in RAY_CRASH_MARKERS):
                crashed_at = now
            if (timeout is not None and now - t > timeout) or (crashed_at is not None
                                                                and now - crashed_at > HANG_GRACE_SECONDS):
                why = "timed out" if crashed_at is None else "hung after a Ray crash"
                _stop_group(proc)
                fh.write(f"\n[openkbp_bench: stopped, {why}]\n")
                rc = 124
                break
    cpu = max(_children_cpu() - c, sum(tree.values()))  # the tree: processes getrusage never saw
    CPU_SPENT.append(cpu)
    return rc, time.perf_counter() - t, cpu


def ray_start_failed(log: Path) -> bool:
    """True when a federated run's log shows that Ray crashed (then no round had run: worth a retry)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return False
    return any(m in text for m in RAY_CRASH_MARKERS)


def run_child_task(payload: dict, log: Path, timeout: float = 7200.0) -> tuple[dict, float, float]:
    """``python bench/openkbp_bench.py --child JSON`` (one of the ``_child_*`` tasks below) in a
    fresh process with ``payload['threads']`` threads; (result, wall s, CPU s). Raises
    RuntimeError (with the log's tail) when it fails."""
    from common import RESULT_PREFIX

    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SCRIPT), "--child", json.dumps(payload)]
    t, c = time.perf_counter(), _children_cpu()
    with open(log, "w") as fh:
        fh.write(f"$ {sys.executable} {SCRIPT} --child {payload.get('task')}\n\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout, cwd=REPO,
                              env={**thread_env(int(payload.get("threads") or 1)), "PYTHONWARNINGS": "ignore"})
        fh.write(proc.stdout)
    wall, cpu = time.perf_counter() - t, _children_cpu() - c
    CPU_SPENT.append(cpu)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child task {payload.get('task')} exited with status {proc.returncode}; log {log}\n"
                           + _log_tail(log))
    return json.loads(lines[-1][len(RESULT_PREFIX):]), wall, cpu


def _log_tail(log: Path, n: int = 15) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])



# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def _site_metrics(mean: Mapping[str, Any], n: int, cases: list[dict] | None = None) -> dict:
    out: dict[str, Any] = {"n_heldout": int(n)}
    for k in METRICS + (DVH_CELLS,):  # dvh_cells: the weight of the site's DVH score in _overall
        v = mean.get(k)
        out[k] = float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None
    if cases is not None:
        out["cases"] = [{"case_id": c.get("case_id"), **{k: c.get(k) for k in METRICS}} for c in cases]
    return out


def _overall(per_site: Mapping[str, dict]) -> dict:
    """Held-out-case-weighted mean over the sites; the DVH score weighted by the sites' DVH cells
    (one mean over every cell, as OpenKBP): ``metrics.combine_site_means``."""
    from addiff_core.metrics import combine_site_means

    out: dict[str, Any] = {"n_heldout": int(sum(v.get("n_heldout", 0) for v in per_site.values()))}
    comb = combine_site_means(list(per_site.values()), METRICS + (DVH_CELLS,), cases_key="n_heldout")
    out.update({k: (v if math.isfinite(v) else None) for k, v in comb.items()})
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def reference_scores(work: Path, split: list[dict], cfg) -> dict:
    """Two references on the same held-out patients, no training involved:

    * ``grid_floor``: the reference dose mapped onto the model grid and back onto the CT grid
      (the best any model on this grid can score);
    * ``zero_dose``: predicting 0 Gy everywhere (what a model that learned nothing scores).
    Each is scored like a model's prediction (``common.openkbp_case_scores``: 0 outside the
    evaluation region, dose score per patient averaged, DVH score one mean over every cell); per
    site and over all held-out patients; {} where it could not be computed.
    """
    out: dict[str, Any] = {}
    try:
        import numpy as np
        import SimpleITK as sitk

        from addiff_core.case_io import load_case
        from addiff_core.metrics import cohort_dvh_score
        from addiff_core.preprocessing import case_to_sample, dose_to_ct_grid
        from common import openkbp_case_scores

        # per method and site: [(dose score, DVH errors)] of each held-out patient
        rows: dict[str, dict[str, list]] = {"grid_floor": {}, "zero_dose": {}}
        for s in split:
            for pid in s["heldout"]:
                c = load_case(work / "cases" / pid)
                sample, spec = case_to_sample(c, cfg.grid)
                zero = sitk.Image(c.ct.GetSize(), sitk.sitkFloat32)
                zero.CopyInformation(c.ct)
                preds = {"grid_floor": dose_to_ct_grid(sample["dose"][0], float(sample["rx"]), spec, c.ct),
                         "zero_dose": zero}
                for name, p in preds.items():
                    rows[name].setdefault(s["site"], []).append(openkbp_case_scores(c, p))

        def scores(v: list) -> dict:  # dose: mean over patients; DVH: one mean over every cell
            return {"openkbp_dose_score": float(np.mean([a for a, _ in v])),
                    "openkbp_dvh_score": cohort_dvh_score([e for _, e in v]), DVH_CELLS: sum(len(e) for _, e in v)}

        for name, per in rows.items():
            per_site = {site: {"n_heldout": len(v), **scores(v)} for site, v in per.items()}
            allv = [x for v in per.values() for x in v]
            out[name] = {"per_site": per_site, "n": len(allv), **scores(allv)}
    except Exception as e:  # noqa: BLE001 - reference numbers; never cost the run its results
        print(f"(reference scores not computed: {type(e).__name__}: {e})", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def run_as_child(payload_json: str) -> int:
    from common import child_result

    payload = json.loads(payload_json)
    child_result(CHILD_TASKS[payload["task"]](payload))
    return 0


def work_dir(args: argparse.Namespace) -> Path:
    return (args.work or (DEFAULT_WORK if args.budget == "default" else Path(f"{DEFAULT_WORK}_{args.budget}"))).resolve()


def out_dir(args: argparse.Namespace) -> Path:
    return (args.out or (DEFAULT_OUT if args.budget == "default" else work_dir(args) / "results")).resolve()


def render_only(args: argparse.Namespace) -> int:
    """Rewrite the result files of an earlier run (same training results; references recomputed)."""
    out = out_dir(args)
    path = out / f"{results_stem(args.scale, args.seed)}.json"
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
    from common import json_safe

    path.write_text(json.dumps(json_safe(res), indent=2) + "\n")
    md = path.with_suffix(".md")
    write_markdown(md, res)
    print(f"rewritten: {path}, {md}", flush=True)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE,
                   help=f"OpenKBP sample folder (default {DEFAULT_SAMPLE}; or $ADDIFF_OPENKBP_SAMPLE)")
    p.add_argument("--extra", default=None,
                   help=f"more OpenKBP patients: a .tar.xz archive (unpacked into WORK/extra) or a folder; 'none' for "
                        f"the sample alone (default {DEFAULT_EXTRA} when it exists; or $ADDIFF_OPENKBP_EXTRA)")
    p.add_argument("--heldout", type=int, default=None,
                   help=f"held-out patients per site (default {HELDOUT_WITH_EXTRA} with the extra patients, "
                        f"{N_HELDOUT} for the sample alone)")
    p.add_argument("--work", type=Path, default=None,
                   help=f"work folder: imported cases, site files, run folders, logs (default {DEFAULT_WORK}[_small])")
    p.add_argument("--budget", choices=tuple(BUDGETS), default="default",
                   help="default: 64^3, equal compute, ~55 CPU minutes on 1 thread; small: 32^3, one epoch, minutes")
    p.add_argument("--methods", default=None,
                   help=f"comma list of the methods to run (default all: {','.join(METHODS)})")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the budget's VAE, diffusion and U-Net epochs by K (rounded, at least 1) for a "
                        "learning curve; K != 1 writes OUT/openkbp_bench_xK.json/.md and WORK/runs_xK, logs_xK "
                        f"(default 1; at most {MAX_SCALE:g})")
    p.add_argument("--out", type=Path, default=None,
                   help="where openkbp_bench[_xK].json/.md go (default bench/results; small budget: WORK/results)")
    p.add_argument("--render-only", action="store_true",
                   help="train nothing: re-read OUT/openkbp_bench[_xK].json (--scale K), recompute the reference "
                        "scores (grid floor, 0 Gy) from its work folder's cases and rewrite the .json and .md")
    p.add_argument("--seed", type=int, default=0,
                   help="training seed of every method (federated runs' --seed, the site files' training seed); "
                        "not 0 writes OUT/openkbp_bench[_xK]_seedN.json/.md and WORK/runs[_xK]_seedN; the split "
                        "and the sampling seeds stay")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per training/evaluation process (default 1: on a shared, busy CPU one "
                        "thread ran 2-4x faster than two); the federated runs use one process per site")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one child task (JSON payload)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem of the options (one line), or None."""
    if args.threads < 1:
        return "--threads must be >= 1"
    if not (math.isfinite(args.scale) and 0 < args.scale <= MAX_SCALE):
        return f"--scale must be > 0 and <= {MAX_SCALE:g} (got {args.scale:g})"
    try:
        args.methods = parse_methods(args.methods)
    except ValueError as e:
        return str(e)
    return None


def carried_over_methods(path: Path, res: Mapping[str, Any], selected: Sequence[str]) -> dict[str, dict]:
    """The methods of the earlier results file ``path`` that this run does not re-run, when that
    file measured the same budget, split and model as ``res``: a run with other ``--methods``
    adds to the file instead of replacing what it holds ({} when there is no such file, or it
    measured something else). Each carried method records the earlier run it came from."""
    from common import json_safe

    if not path.is_file():
        return {}
    try:
        old = _read_json(path)
    except (OSError, ValueError):
        return {}

    def measured(r: Mapping[str, Any]) -> dict:  # the budget's planned CPU is each run's own measurement
        return {**r, "budget": {k: v for k, v in (r.get("budget") or {}).items() if k != "planned_cpu"}}

    now = measured(json.loads(json.dumps(json_safe({k: res[k] for k in ("budget", "split", "model")}))))
    if any(measured(old).get(k) != v for k, v in now.items()):
        return {}
    failed = set(old.get("failed") or [])
    origin = {"machine": old.get("machine"), "methods_run": old.get("methods_run"), "work": old.get("work")}
    return {k: {**v, "carried_over_from": origin} for k, v in (old.get("methods") or {}).items()
            if k not in selected and k not in failed and isinstance(v, dict)}


class Bench:
    """One run: the selected methods trained, evaluated, their uncertainty and latent probe
    measured, the results saved after every step (``complete`` false until the end)."""

    def __init__(self, args: argparse.Namespace, setup: Mapping[str, Any], res: dict, t0: float, cpu0: float) -> None:
        """``setup``: budget, split, work, out, cases_dir, site_files, pooled_file, cfg_file, cfg,
        n_train, n_heldout (what :func:`run_bench` prepared); ``res``: the results so far."""
        self.args, self.t0, self.cpu0 = args, t0, cpu0
        for k in ("budget", "split", "work", "out", "cases_dir", "site_files", "pooled_file", "cfg_file", "cfg",
                  "n_train", "n_heldout"):
            setattr(self, k, setup[k])
        self.selected: list[str] = list(args.methods)
        suffix = scale_suffix(args.scale, args.seed)
        self.stem = results_stem(args.scale, args.seed)
        self.runs, self.logs, self.unc_dir = (self.work / f"{n}{suffix}" for n in ("runs", "logs", "uncertainty"))
        self.py = [sys.executable, "-m", "addiff_core.cli"]
        self.methods: dict[str, dict] = dict(setup.get("carried") or {})
        self.failed: list[str] = []
        self.res = res
        res.update({"methods": self.methods, "failed": self.failed, "carried_over": sorted(self.methods)})
        self.site_file_of = {s["site"]: f for s, f in zip(self.split, self.site_files)}

    # ---- bookkeeping
    def progress(self, msg: str) -> None:
        _progress(self.t0, msg)

    def save(self, complete: bool = False) -> None:
        from common import json_safe, loadavg

        res = self.res
        res["complete"] = complete
        res["loadavg_end"] = loadavg()
        res["wall_seconds"] = time.perf_counter() - self.t0
        res["cpu_seconds"] = {**res.get("cpu_seconds", {}), "total": _self_cpu() - self.cpu0 + sum(CPU_SPENT)}
        tmp = self.out / f".{self.stem}.json.tmp"
        tmp.write_text(json.dumps(json_safe(res), indent=2) + "\n")
        tmp.replace(self.out / f"{self.stem}.json")
        write_markdown(self.out / f"{self.stem}.md", res)

    def fail(self, key: str, step: str, rc: int, log: Path) -> None:
        msg = f"{step} exited with status {rc}; log {log}"
        self.progress(f"FAILED: {msg}\n{_log_tail(log)}")
        self.methods[key] = {"error": msg, "log": str(log)}
        self.failed.append(key)
        self.save()

    def clear_runs(self) -> None:
        """Remove the run folders of the selected methods (the others' stay, e.g. from a run with
        other --methods)."""
        self.runs.mkdir(parents=True, exist_ok=True)
        names = {"federated_addiff": ["federated_addiff"], "federated_unet": ["federated_unet"],
                 "local_addiff": [f"local_{s['site']}" for s in self.split], "pooled_addiff": ["pooled"]}
        for key in self.selected:
            for d in [self.runs / n for n in names[key]] + [self.unc_dir / key]:
                if d.exists():
                    shutil.rmtree(d)

    # ---- the measurements of an ADDiff-Dose method's final models (child processes)
    def _child(self, key: str, task: str, payload: dict) -> dict | None:
        """Run a child task for method ``key``; its seconds and CPU seconds go to the method's."""
        log = self.logs / f"{task}_{key}.log"
        try:
            r, wsecs, csecs = run_child_task({"task": task, "threads": self.args.threads, **payload}, log)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            self.progress(f"  {task} FAILED: {e}")
            self.methods[key][task] = {"error": str(e).splitlines()[0]}
            return None
        self.methods[key].setdefault("seconds", {})[task] = wsecs
        self.methods[key].setdefault("cpu_seconds", {})[task] = csecs
        r["seconds"] = wsecs
        return r

    def uncertainty(self, key: str, ckpt: Mapping[str, Path]) -> None:
        """Spearman and +-2 std calibration of ``budget['uncertainty_samples']`` samples on every
        held-out patient (one child process)."""
        jobs = [{"checkpoint": str(ckpt[s["site"]]), "case": str(self.cases_dir / pid), "site": s["site"],
                 "out": str(self.unc_dir / key / pid)} for s in self.split for pid in s["heldout"]]
        self.progress(f"  uncertainty: {len(jobs)} held-out patients x {self.budget['uncertainty_samples']} samples ...")
        r = self._child(key, "uncertainty", {"jobs": jobs, "samples": self.budget["uncertainty_samples"]})
        if r is None:
            return
        meth = self.methods[key]
        u = summarize_uncertainty(r["cases"])
        u["samples"] = r["samples"]
        meth["uncertainty"] = u
        for site, v in u["per_site"].items():
            if site in meth.get("per_site", {}):
                meth["per_site"][site].update({UNC: v["spearman_mean"], CAL: v["calibration_mean"]})
        meth.setdefault("overall", {}).update({UNC: u["spearman_mean"], CAL: u["calibration_mean"]})
        cal = u["calibration_mean"]
        self.progress(f"  uncertainty: Spearman mean {_num(u['spearman_mean'])} ({u['n_defined']}/{u['n']} defined), "
                      f"within +-2 std {_num(100 * cal if cal is not None else None, 1)} % ({r['seconds']:.0f} s)")

    def latent_probe(self, key: str, ckpt: Mapping[str, Path]) -> None:
        """``addiff_core.latent_probe`` of the method's final model(s) on each site's held-out
        patients (one child process)."""
        jobs = [{"checkpoint": str(ckpt[s["site"]]), "site_file": str(self.site_file_of[s["site"]]), "site": s["site"]}
                for s in self.split]
        self.progress(f"  latent probe: {len(jobs)} site(s), {self.budget['probe_samples']} samples ...")
        r = self._child(key, "latent_probe", {"jobs": jobs, "samples": self.budget["probe_samples"]})
        if r is None:
            return
        self.methods[key]["latent_probe"] = r
        o = r["overall"]
        self.progress(f"  latent probe: sampled {_num(o.get('sampled'), 4)}, z = 0 {_num(o.get('zero'), 4)}, oracle "
                      f"{_num(o.get('oracle'), 4)}, shuffled {_num(o.get('shuffled'), 4)}; oracle / sampled "
                      f"{_num(o.get('oracle_over_sampled'))}, min(z = 0, shuffled) / sampled "
                      f"{_num(o.get('bypass_over_sampled'))} ({r['seconds']:.0f} s)")

    def measure_addiff(self, key: str, ckpt: Mapping[str, Path]) -> None:
        """Uncertainty and latent probe of an ADDiff-Dose method's final model(s) (site -> checkpoint)."""
        self.uncertainty(key, ckpt)
        self.save()
        self.latent_probe(key, ckpt)


    # ---- the steps
    def references_and_timing(self) -> None:
        """Reference scores (no training) and the CPU seconds of one optimiser step per stage."""
        res, budget = self.res, self.budget
        c = _self_cpu()
        refs = reference_scores(self.work, self.split, self.cfg)
        res.update({"grid_floor": refs.get("grid_floor"), "zero_dose": refs.get("zero_dose")})
        res["cpu_seconds"] = {"reference_scores": _self_cpu() - c}
        self.progress("references: 0 Gy dose score "
                      f"{_num((refs.get('zero_dose') or {}).get('openkbp_dose_score'))}, true dose through the grid "
                      f"{_num((refs.get('grid_floor') or {}).get('openkbp_dose_score'))} Gy")
        timing_cases = [str(self.cases_dir / s["train"][0]) for s in (self.split[0], self.split[-1])][:STEP_TIMING_CASES]
        self.progress("measuring CPU seconds per optimiser step (VAE, diffusion, U-Net) ...")
        try:
            st, wsecs, csecs = run_child_task({"task": "step_times", "threads": self.args.threads,
                                               "config": str(self.cfg_file), "cases": timing_cases, "epochs": 2},
                                              self.logs / "step_times.log")
            st.pop("child_wall_seconds", None)
            res["step_cpu_seconds"] = st
            res["cpu_seconds"]["step_timing"] = csecs
            n_addiff = sum(k in ADDIFF_METHODS for k in self.selected)
            budget["planned_cpu"] = planned_cpu(budget, st, self.n_train, n_addiff, int("federated_unet" in self.selected))
            self.progress("  CPU s / step: " + ", ".join(f"{k} {st[k]['cpu_seconds_per_step']:.2f}"
                                                         for k in ("vae", "diffusion", "unet"))
                          + f" ({wsecs:.0f} s); planned training CPU {budget['planned_cpu']['all_training_s'] / 60:.1f} "
                            f"min, VAE share {100 * budget['planned_cpu']['vae_share']:.0f} %")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            self.progress(f"step timing failed (the run goes on): {e}")
            res["step_cpu_seconds"] = {"error": str(e).splitlines()[0]}
        self.save()

    def federated(self, key: str) -> None:
        """``addiff simulate`` of ADDiff-Dose (``federated_addiff``) or the U-Net (``federated_unet``),
        tried again when Ray crashed at start."""
        b = self.budget
        kind, rounds = (("diffusion", f"{b['vae_epochs']},{b['diffusion_epochs']}") if key == "federated_addiff"
                        else ("unet", str(b["unet_epochs"])))
        run_dir, log = self.runs / key, self.logs / f"{key}.log"
        cmd = self.py + ["simulate", "--site-files", ",".join(str(f) for f in self.site_files), "--config",
                         str(self.cfg_file), "--local-epochs", str(b["local_epochs"]), "--seed", str(self.args.seed)]
        cmd += ([] if b["gamma"] else ["--no-gamma"]) + ["--model", kind, "--rounds", rounds, "--run-dir", str(run_dir)]
        self.progress(f"{METHOD_LABELS[key]}: addiff simulate --model {kind} --rounds {rounds} ... (log {log})")
        secs = csecs = 0.0
        for attempt in range(RAY_START_RETRIES + 1):
            if run_dir.exists():  # a fresh run folder for each try
                shutil.rmtree(run_dir)
            rc, s1, c1 = run_step(cmd, log, self.args.threads)
            secs, csecs = secs + s1, csecs + c1
            if rc == 0 or attempt == RAY_START_RETRIES or not ray_start_failed(log):
                break
            kept = log.with_name(f"{log.stem}.try{attempt + 1}.log")
            shutil.copy(log, kept)
            self.progress(f"  Ray crashed (overloaded machine?); trying again ({attempt + 2} of {RAY_START_RETRIES + 1}); "
                          f"log of the failed try: {kept}")
            self.res.setdefault("ray_retries", []).append({"method": key, "attempt": attempt + 1, "seconds": s1})
        fm = run_dir / "final_metrics.json"
        if rc != 0 or not fm.is_file():
            return self.fail(key, "addiff simulate", rc, log)
        rows = {r["site"]: r for r in _read_json(fm)}
        per_site = {s["site"]: _site_metrics(rows.get(s["site"], {}), rows.get(s["site"], {}).get("cases", 0))
                    for s in self.split}
        self.methods[key] = {"run_dir": str(run_dir), "per_site": per_site, "overall": _overall(per_site),
                             "seconds": {"simulate_total": secs}, "cpu_seconds": {"simulate_total": csecs}, "log": str(log)}
        self.progress(f"  done in {secs:.0f} s ({csecs:.0f} CPU s): dose score per site "
                      + ", ".join(f"{k} {_num(v['openkbp_dose_score'])}" for k, v in per_site.items()))
        self.save()
        if kind == "diffusion" and (run_dir / "final_model.pt").is_file():
            self.measure_addiff(key, {s["site"]: run_dir / "final_model.pt" for s in self.split})
            self.save()

    def local(self) -> None:
        """``addiff train`` on each site's own training cases, evaluated on its held-out ones."""
        b = self.budget
        per_site, secs_local, cpu_local = {}, {}, {}
        for s, f in zip(self.split, self.site_files):
            run_dir, log = self.runs / f"local_{s['site']}", self.logs / f"local_{s['site']}.log"
            self.progress(f"{s['site']} alone: addiff train --vae-epochs {b['vae_epochs']} --diffusion-epochs "
                          f"{b['diffusion_epochs']} ... (log {log})")
            rc, secs, csecs = run_step(self.py + ["train", "--site", str(f), "--out", str(run_dir), "--config",
                                                  str(self.cfg_file), "--model", "diffusion", "--vae-epochs",
                                                  str(b["vae_epochs"]), "--diffusion-epochs", str(b["diffusion_epochs"]),
                                                  "--quiet"], log, self.args.threads)
            mj = run_dir / "metrics.json"
            if rc != 0 or not mj.is_file():
                return self.fail("local_addiff", f"addiff train ({s['site']})", rc, log)
            h = _read_json(mj)["heldout"]
            per_site[s["site"]] = _site_metrics(h["mean"], h["num_cases"], h.get("cases"))
            secs_local[s["site"]], cpu_local[s["site"]] = secs, csecs
            self.progress(f"  done in {secs:.0f} s ({csecs:.0f} CPU s): dose score "
                          f"{_num(per_site[s['site']]['openkbp_dose_score'])}")
        self.methods["local_addiff"] = {"run_dirs": [str(self.runs / f"local_{s['site']}") for s in self.split],
                                        "per_site": per_site, "overall": _overall(per_site), "seconds": secs_local,
                                        "cpu_seconds": cpu_local}
        self.save()
        self.measure_addiff("local_addiff", {s["site"]: self.runs / f"local_{s['site']}" / "model.pt" for s in self.split})
        self.save()

    def pooled(self) -> None:
        """``addiff train`` on the union of the training cases, ``addiff evaluate`` per site."""
        b = self.budget
        run_dir, log = self.runs / "pooled", self.logs / "pooled_train.log"
        self.progress(f"pooled: addiff train on {self.n_train} cases ... (log {log})")
        rc, secs, csecs = run_step(self.py + ["train", "--site", str(self.pooled_file), "--out", str(run_dir), "--config",
                                              str(self.cfg_file), "--model", "diffusion", "--vae-epochs",
                                              str(b["vae_epochs"]), "--diffusion-epochs", str(b["diffusion_epochs"]),
                                              "--quiet"], log, self.args.threads)
        if rc != 0 or not (run_dir / "model.pt").is_file():
            return self.fail("pooled_addiff", "addiff train (pooled)", rc, log)
        self.progress(f"  trained in {secs:.0f} s ({csecs:.0f} CPU s)")
        per_site, secs_pool, cpu_pool = {}, {"train": secs}, {"train": csecs}
        for s, f in zip(self.split, self.site_files):
            ev_json, log = run_dir / f"eval_{s['site']}.json", self.logs / f"pooled_eval_{s['site']}.log"
            rc, esecs, ecpu = run_step(self.py + ["evaluate", "--checkpoint", str(run_dir / "model.pt"), "--site", str(f),
                                                  "--out", str(ev_json)], log, self.args.threads)
            if rc != 0 or not ev_json.is_file():
                return self.fail("pooled_addiff", f"addiff evaluate (pooled on {s['site']})", rc, log)
            e = _read_json(ev_json)
            per_site[s["site"]] = _site_metrics(e["mean"], e["num_cases"], e.get("cases"))
            secs_pool[f"evaluate_{s['site']}"], cpu_pool[f"evaluate_{s['site']}"] = esecs, ecpu
            self.progress(f"  {s['site']}: dose score {_num(per_site[s['site']]['openkbp_dose_score'])} ({esecs:.0f} s)")
        self.methods["pooled_addiff"] = {"run_dir": str(run_dir), "per_site": per_site, "overall": _overall(per_site),
                                         "seconds": secs_pool, "cpu_seconds": cpu_pool}
        self.save()
        self.measure_addiff("pooled_addiff", {s["site"]: run_dir / "model.pt" for s in self.split})
        self.save()

    def comparison(self) -> None:
        """``comparison.json`` (addiff_core/report format) in the federated ADDiff run folder, and
        ``addiff report`` of it: federated vs. U-Net vs. local vs. pooled."""
        fed = self.methods.get("federated_addiff", {})
        if not fed.get("run_dir") or not Path(fed["run_dir"]).is_dir():
            return
        series = {}
        for key, name in (("federated_addiff", "federated"), ("federated_unet", "federated U-Net"),
                          ("local_addiff", "local"), ("pooled_addiff", "pooled")):
            if self.methods.get(key, {}).get("per_site"):
                series[name] = {site: {k: v[k] for k in METRICS if v.get(k) is not None}
                                for site, v in self.methods[key]["per_site"].items()}
        comp = {"metric": "openkbp_dose_score", "series": series,
                "note": (f"OpenKBP real-anatomy benchmark (bench/openkbp_bench.py, budget {self.budget['name']}"
                         f"{'' if self.args.scale == 1 else f' x {self.args.scale:g}'}): {self.budget['text']}. "
                         "federated = ADDiff-Dose FedAvg; federated U-Net = the direct-regression baseline, FedAvg; "
                         "local = ADDiff-Dose trained on one site's training cases; pooled = ADDiff-Dose trained on "
                         f"the {self.n_train} training cases of all sites. Each site's {self.n_heldout} held-out "
                         "patients.")}
        Path(fed["run_dir"], "comparison.json").write_text(json.dumps(comp, indent=2) + "\n")
        log = self.logs / "report.log"
        rc, rsecs, rcpu = run_step(self.py + ["report", fed["run_dir"]], log, self.args.threads)
        self.res["report"] = {"run_dir": fed["run_dir"], "status": rc, "seconds": rsecs, "cpu_seconds": rcpu,
                              "path": str(Path(fed["run_dir"]) / "report" / "report.md")}

    def run(self) -> int:
        self.clear_runs()
        self.references_and_timing()
        for key in ("federated_addiff", "federated_unet"):
            if key in self.selected:
                self.federated(key)
        if "local_addiff" in self.selected:
            self.local()
        if "pooled_addiff" in self.selected:
            self.pooled()
        self.comparison()
        self.save(complete=True)
        md = self.out / f"{self.stem}.md"
        self.progress(f"written: {self.out / f'{self.stem}.json'}, {md}")
        print(md.read_text(), flush=True)
        if self.failed:
            print(f"openkbp_bench: {len(self.failed)} method(s) failed: {', '.join(self.failed)} (see the logs above)",
                  file=sys.stderr)
            return 1
        return 0

def _num(v: Any, nd: int = 2) -> str:
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) and math.isfinite(float(v)) else "n/a"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_as_child(args.child)
    sample = args.sample.expanduser()
    problem = check_args(args)
    if problem:
        print(f"openkbp_bench: {problem}", file=sys.stderr)
        return 2
    if args.render_only:
        return render_only(args)
    if not sample.is_dir():
        print(f"OpenKBP sample not found at {sample}; skipping (give --sample PATH or set ADDIFF_OPENKBP_SAMPLE)",
              flush=True)
        return 0
    return run_bench(args, sample)


def load_patients(args: argparse.Namespace, sample: Path, work: Path, t0: float) -> tuple[dict, dict, Path | None, str | None]:
    """(sample patients, extra patients, the extra folder, the --extra value used); ValueError
    (one line) when the extra pool cannot be read or shares a patient id with the sample."""
    extra_arg = args.extra
    if extra_arg is None:  # the default pool, when it is there
        extra_arg = str(DEFAULT_EXTRA) if DEFAULT_EXTRA.exists() else None
    elif extra_arg.lower() != "none" and not Path(extra_arg).expanduser().exists():
        raise ValueError(f"--extra {extra_arg}: not found")
    elif extra_arg.lower() == "none":
        extra_arg = None
    patients = find_patients(sample)
    extra_dir, extra_patients = None, {}
    if extra_arg:
        _progress(t0, f"extra patients: {extra_arg}" + (" (unpacking with tar -xJf ...)" if is_archive(Path(extra_arg)) else ""))
        try:
            extra_dir = resolve_extra(extra_arg, work)
        except (OSError, RuntimeError) as e:
            raise ValueError(str(e)) from None
        extra_patients = find_extra_patients(extra_dir) if extra_dir else {}
        both = sorted(set(patients) & set(extra_patients), key=natural_key)
        if both:
            raise ValueError(f"patient id(s) in both the sample and the extra pool: {', '.join(both)}")
    return patients, extra_patients, extra_dir, extra_arg


def run_bench(args: argparse.Namespace, sample: Path) -> int:
    """Import, split, write the site files, then :class:`Bench` runs the selected methods."""
    from common import machine_info, quiet_warnings

    quiet_warnings()
    from addiff_core.config import load_model_config

    budget = {**scaled_budget(args.budget, args.scale), "seed": int(args.seed)}
    work, out = work_dir(args), out_dir(args)
    work.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), _self_cpu()

    # 1. the patients: the sample + the extra pool (unpacked once into WORK/extra)
    try:
        sample_patients, extra_patients, extra_dir, extra_arg = load_patients(args, sample, work, t0)
    except ValueError as e:
        print(f"openkbp_bench: {e}", file=sys.stderr)
        return 2
    patients = {**sample_patients, **extra_patients}
    n_heldout = args.heldout if args.heldout is not None else (HELDOUT_WITH_EXTRA if extra_patients else N_HELDOUT)
    need = len(SITE_NAMES) * (n_heldout + 1)
    if n_heldout < 1 or len(patients) < need:
        print(f"openkbp_bench: {len(patients)} OpenKBP patient(s) cannot make {len(SITE_NAMES)} sites holding out "
              f"{n_heldout} each (need at least {need}, and --heldout >= 1)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    import SimpleITK as sitk

    import common

    common.apply_threads(args.threads)  # the reference scores in this process: same thread count
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    machine = machine_info("cpu")
    machine.pop("memory_method", None)  # no memory measured here
    machine["torch_threads_per_step"] = args.threads  # what the training/evaluation processes use

    _progress(t0, f"importing {len(patients)} OpenKBP patients ({len(sample_patients)} sample + {len(extra_patients)} "
                  f"extra) into {work / 'cases'} ...")
    cases_dir = work / "cases"
    imported, skipped = import_all(patients, cases_dir)
    if skipped or len(imported) != len(patients):  # the split below needs every patient
        print(f"openkbp_bench: imported {len(imported)} of {len(patients)} patients; skipped: "
              + "; ".join(f"{p}: {r}" for p, r in skipped), file=sys.stderr)
        return 1
    import_seconds = time.perf_counter() - t0
    split = make_split(read_spacings(patients), n_heldout=n_heldout)
    site_files, pooled_file = write_site_files(work, cases_dir, split, budget)
    cfg_file = model_config_file(budget, work)
    cfg = load_model_config(cfg_file)
    n_train = sum(len(s["train"]) for s in split)
    budget["model_config"] = str(cfg_file.relative_to(REPO) if cfg_file.is_relative_to(REPO) else cfg_file)
    budget["text"] = budget_text(budget, cfg, "/".join(str(n) for n in sorted({len(s["train"]) for s in split})), n_train)
    budget["case_passes_per_method"] = {k: n_train * budget[f"{k}_epochs"] for k in ("vae", "diffusion", "unet")}
    budget["execution"] = (f"federated: addiff simulate, one Ray actor per site with 1 CPU (two sites train at once "
                           f"on 2 cores); local, pooled, evaluations, uncertainty and latent probe: one process at a "
                           f"time, {args.threads} torch thread(s) each")
    for s in split:
        sp = sorted(set(s["in_plane_spacing_mm"].values()))
        _progress(t0, f"{s['site']}: {len(s['patients'])} patients (in-plane {sp[0]:.3f}..{sp[-1]:.3f} mm); "
                      f"held out {', '.join(s['heldout'])}")
    _progress(t0, f"budget {budget['name']}" + (f" x {args.scale:g}" if args.scale != 1 else "")
                  + f": {budget['text']}; methods: {', '.join(args.methods)}")
    res: dict[str, Any] = {
        "bench": "openkbp_bench",
        "complete": False,
        "budget": budget,
        "methods_run": list(args.methods),
        "data": {"sample": str(sample), "sample_patients": len(sample_patients),
                 "extra": str(extra_arg) if extra_arg else None, "extra_dir": str(extra_dir) if extra_dir else None,
                 "extra_patients": len(extra_patients), "patients": len(patients), "cases_dir": str(cases_dir),
                 "import_seconds": import_seconds},
        "heldout_per_site": n_heldout,
        "split_seed": SPLIT_SEED,
        "split": split,
        "split_rule": (f"patients sorted by in-plane voxel spacing (voxel_dimensions.csv rows 1-2; ties: patient "
                       f"number), cut into {len(SITE_NAMES)} contiguous thirds; {n_heldout} held-out patients per site "
                       f"drawn with numpy default_rng([{SPLIT_SEED}, site index])"),
        "model": {"config": budget["model_config"], **cfg.to_dict()},
        "metric_keys": list(METRICS) + [UNC, CAL],
        "published_openkbp_test": {k: {"dose_score": d, "dvh_score": v} for k, (d, v) in PUBLISHED.items()},
        "machine": machine,
        "work": str(work),
    }
    setup = {"budget": budget, "split": split, "work": work, "out": out, "cases_dir": cases_dir,
             "site_files": site_files, "pooled_file": pooled_file, "cfg_file": cfg_file, "cfg": cfg,
             "n_train": n_train, "n_heldout": n_heldout}
    earlier = out / f"{results_stem(args.scale, args.seed)}.json"
    setup["carried"] = carried_over_methods(earlier, res, args.methods)
    if setup["carried"]:
        _progress(t0, f"keeping {', '.join(setup['carried'])} from {earlier} (same budget, split and model)")
    return Bench(args, setup, res, t0, cpu0).run()


if __name__ == "__main__":
    sys.exit(main())
