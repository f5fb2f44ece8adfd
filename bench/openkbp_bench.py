"""Real-anatomy benchmark: 84 OpenKBP head-and-neck patients as three hospitals.

    python bench/openkbp_bench.py [--sample PATH] [--extra PATH|none] [--heldout N] [--work DIR]
                                  [--budget small|default] [--out DIR] [--threads N] [--render-only]

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
   patient ``addiff predict --samples 4`` (``local.predict_case``: mean dose + voxel-wise std,
   both on the CT grid), then the Spearman correlation (``scipy.stats.spearmanr``) between the std
   and |mean - reference dose| over the voxels of the possible-dose mask; the mean over patients
   is reported per site and per method (the U-Net is deterministic: no uncertainty).
6. Writes ``OUT/openkbp_bench.json`` and ``OUT/openkbp_bench.md`` after every method (``complete``
   false until the end, so a stopped run keeps what it measured) and a ``comparison.json``
   (``addiff_core/report.py`` format) into the federated ADDiff run folder, whose
   ``addiff report`` then shows federated vs. U-Net vs. local vs. pooled.

Budget at equal compute (``default``, 64^3 at 5 mm, ``configs/openkbp64.yaml``). CPU seconds of
one optimiser step, batch 1, 1 torch thread, on the 2-core shared machine, measured by this
script's step timing (``step_cpu_seconds`` in the results holds each run's own measurement): VAE
1.89 s, diffusion 1.57 s, U-Net 2.15 s at a load average of ~3.5 (under a load average of 11-15 the
same steps cost 3.2 / 2.1 / 3.1 CPU s: contention inflates CPU time too). Rules: (a) ADDiff-Dose
spends ~80 % of its training CPU on the VAE (the study behind the redesign: the VAE bounds the
model), ~20 % on the diffusion stage; (b) the U-Net's epochs cost about as much CPU as ADDiff-Dose's
two stages together; (c) the whole run (two federations, three local trainings, pooled, every
held-out evaluation with gamma, uncertainty) stays within ~55 CPU minutes on 1 thread. With 69
training patients an epoch of a method is 69 steps; ADDiff-Dose is trained three times (federated,
local = 3 x 23 cases, pooled) and the U-Net once, so training costs 69 x (3 x (V x 1.89 + D x 1.57)
+ U x 2.15) CPU s. The diffusion stage cannot go below 1 epoch, so D = 1 and V = 3 (5.67 s of VAE
per case, 78 %; V = 2: 71 %, V = 4: 83 % but 53 CPU min in all, too close to (c)); the U-Net U = 3
(6.45 s per case, 0.89x ADDiff-Dose's 7.24 s; U = 4: 1.19x). Planned: 69 x (3 x 7.24 + 6.45) =
1944 CPU s (32 min) of training, plus ~10-12 min of imports, start-ups (Ray), data loading,
evaluation with gamma, uncertainty and the step timing: ~45 CPU min. Measured (step times 2.26 /
1.83 / 2.47 s that day): 55.8 CPU min, of which 3-4 min per federated run went to Ray and the three
site processes beyond their training steps; 69.6 min of wall time. Wall time on the loaded 2-core
machine is 1.3-3x the CPU time, depending on the other jobs. ``small`` (32^3 at 10 mm,
1 + 1 epochs, U-Net 2) checks the pipeline; its results go to ``WORK/results`` unless ``--out`` is
given, so they never overwrite the default budget's results in ``bench/results``.

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
UNCERTAINTY_SAMPLES = 4  # addiff predict --samples
METRICS = ("mae_gy", "openkbp_dose_score", "openkbp_dvh_score", "gamma_pass_rate", "mean_isodose_dice")
UNC = "uncertainty_spearman"  # per-patient Spearman(std, |mean - reference|) in the possible-dose mask
DVH_CELLS = "dvh_cells"  # number of (patient, structure, DVH point) cells behind a DVH score
# published OpenKBP test-set results (100 patients; dose score / DVH score, Gy)
PUBLISHED = {"challenge winner (Babier et al. 2021)": (2.43, 1.48), "later work (best reported)": (2.07, 0.98)}

# Training budget. One "epoch" is one pass over a site's (or the pool's) training cases; the
# federated runs train 1 local epoch per round, so rounds = epochs and every method sees each
# training case the same number of times per stage. Why these numbers: the module docstring.
BUDGETS: dict[str, dict[str, Any]] = {
    "default": {"grid": None, "sample_steps": None, "vae_epochs": 3, "diffusion_epochs": 1, "unet_epochs": 3,
                "local_epochs": 1, "batch_size": 1, "lr": 1e-3, "optimizer": "adamw", "gamma": True,
                "uncertainty_samples": UNCERTAINTY_SAMPLES,
                # what the epochs were set from (CPU s per optimiser step, batch 1, 1 thread, 64^3)
                "set_from_step_cpu_seconds": {"vae": 1.89, "diffusion": 1.57, "unet": 2.15},
                "rules": "VAE ~80 % / diffusion ~20 % of ADDiff-Dose's training CPU; U-Net epochs ~ ADDiff-Dose's two "
                         "stages in CPU; whole run <= ~55 CPU minutes on 1 thread"},
    "small": {"grid": {"size": 32, "spacing": [10.0, 10.0, 10.0]}, "sample_steps": None, "vae_epochs": 1,
              "diffusion_epochs": 1, "unet_epochs": 2, "local_epochs": 1, "batch_size": 1, "lr": 1e-3,
              "optimizer": "adamw", "gamma": True, "uncertainty_samples": UNCERTAINTY_SAMPLES},
}
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
# child tasks (fresh processes with the bench's thread count)
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


def spearman_in_mask(std: Any, err: Any, mask: Any) -> float | None:
    """Spearman correlation of ``std`` and ``err`` over the voxels of ``mask``; None when it is
    undefined (fewer than 3 voxels, or either map constant there)."""
    import numpy as np
    from scipy.stats import spearmanr

    a, b = np.asarray(std, float)[mask], np.asarray(err, float)[mask]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    rho = spearmanr(a, b).statistic
    return float(rho) if math.isfinite(float(rho)) else None


def _child_uncertainty(p: dict) -> dict:
    """For each job (checkpoint, case, site): ``local.predict_case(..., samples=S)`` (what ``addiff
    predict --samples S`` runs: mean dose and voxel-wise std on the CT grid, 0 outside the
    evaluation region), then Spearman(std, |mean - reference|) over the possible-dose mask, the
    std's mean there, and the official scores of the mean prediction."""
    import common

    common.quiet_warnings()
    common.apply_threads(p.get("threads"))
    import numpy as np
    import SimpleITK as sitk

    from addiff_core.case_io import load_case
    from addiff_core.local import predict_case
    from addiff_core.regions import region_array
    from common import openkbp_case_scores

    rows = []
    for job in p["jobs"]:
        t = time.perf_counter()
        written = predict_case(Path(job["checkpoint"]), Path(job["case"]), Path(job["out"]), samples=int(p["samples"]),
                               seed=0, device="cpu", overwrite=True)
        case = load_case(Path(job["case"]))
        mean_img = sitk.ReadImage(written["dose"])
        mean = sitk.GetArrayFromImage(mean_img).astype(np.float64)
        std = sitk.GetArrayFromImage(sitk.ReadImage(written["uncertainty"])).astype(np.float64)
        ref = case.array("dose").astype(np.float64)
        mask = region_array(case)  # the possible-dose mask of an OpenKBP case, on the CT grid
        rho = spearman_in_mask(std, np.abs(mean - ref), mask)
        dose_score, errs = openkbp_case_scores(case, mean_img)
        rows.append({"site": job["site"], "case_id": Path(job["case"]).name, "spearman": rho,
                     "mean_std_gy": float(std[mask].mean()) if mask.any() else None,
                     "mask_voxels": int(mask.sum()), "mean_prediction_dose_score": dose_score,
                     "mean_prediction_dvh_errors": errs, "seconds": time.perf_counter() - t})
        print(f"{job['site']} {rows[-1]['case_id']}: spearman {rho}, mean std {rows[-1]['mean_std_gy']}",
              file=sys.stderr, flush=True)
    return {"samples": int(p["samples"]), "cases": rows}


CHILD_TASKS = {"step_times": _child_step_times, "uncertainty": _child_uncertainty}


def run_as_child(payload_json: str) -> int:
    from common import child_result

    payload = json.loads(payload_json)
    child_result(CHILD_TASKS[payload["task"]](payload))
    return 0


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


def _mean_finite(vals: Sequence[Any]) -> float | None:
    xs = [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(float(v))]
    return sum(xs) / len(xs) if xs else None


def summarize_uncertainty(rows: list[dict]) -> dict:
    """Mean Spearman per site and over every patient (patients where it is undefined left out)."""
    per_site: dict[str, dict] = {}
    for r in rows:
        per_site.setdefault(r["site"], []).append(r)
    return {"per_site": {s: {"spearman_mean": _mean_finite([r["spearman"] for r in v]),
                             "mean_std_gy": _mean_finite([r["mean_std_gy"] for r in v]), "n": len(v),
                             "n_defined": sum(r["spearman"] is not None for r in v)} for s, v in per_site.items()},
            "spearman_mean": _mean_finite([r["spearman"] for r in rows]),
            "spearman_min": min((r["spearman"] for r in rows if r["spearman"] is not None), default=None),
            "spearman_max": max((r["spearman"] for r in rows if r["spearman"] is not None), default=None),
            "mean_std_gy": _mean_finite([r["mean_std_gy"] for r in rows]),
            "mean_prediction_dose_score": _mean_finite([r["mean_prediction_dose_score"] for r in rows]),
            "n": len(rows), "n_defined": sum(r["spearman"] is not None for r in rows),
            "cases": [{k: v for k, v in r.items() if k != "mean_prediction_dvh_errors"} for r in rows]}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _g(v: Any) -> str:
    """Three significant digits (small numbers such as a std of 1e-4 Gy stay readable)."""
    return f"{v:.3g}" if isinstance(v, (int, float)) and math.isfinite(float(v)) else "n/a"


def planned_cpu(budget: dict, step_cpu: Mapping[str, Any], n_train: int) -> dict | None:
    """Training CPU seconds a budget implies from measured step times: per ADDiff-Dose method
    (VAE, diffusion, shares), per U-Net run, and for the whole training (3 ADDiff-Dose methods +
    1 U-Net, each over ``n_train`` cases per epoch, batch 1)."""
    try:
        tv, td, tu = (float(step_cpu[s]["cpu_seconds_per_step"]) for s in ("vae", "diffusion", "unet"))
    except (KeyError, TypeError, ValueError):
        return None
    steps = lambda e: e * -(-n_train // int(budget.get("batch_size", 1)))  # noqa: E731
    vae, dif, unet = steps(budget["vae_epochs"]) * tv, steps(budget["diffusion_epochs"]) * td, steps(budget["unet_epochs"]) * tu
    return {"addiff_vae_s": vae, "addiff_diffusion_s": dif, "addiff_total_s": vae + dif,
            "vae_share": vae / (vae + dif) if vae + dif else None, "unet_s": unet,
            "unet_over_addiff": unet / (vae + dif) if vae + dif else None,
            "all_training_s": 3 * (vae + dif) + unet, "training_cases": n_train}


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
METHOD_LABELS = {"federated_addiff": "federated ADDiff-Dose", "federated_unet": "federated U-Net",
                 "local_addiff": "each site alone (ADDiff-Dose)", "pooled_addiff": "pooled (ADDiff-Dose)"}
ADDIFF_METHODS = ("federated_addiff", "local_addiff", "pooled_addiff")


def _spacing_text(spacing) -> str:
    return "x".join(f"{float(s):g}" for s in spacing) + " mm" if spacing else "each CT's own spacing"


def budget_text(b: dict, cfg, n_site: int | str = "N", n_pool: int | str = "N") -> str:
    g = cfg.grid
    sp = _spacing_text(g.spacing)
    return (f"grid {g.size}^3 at {sp}; ADDiff-Dose: {b['vae_epochs']} VAE + {b['diffusion_epochs']} diffusion epochs, "
            f"U-Net: {b['unet_epochs']} epochs; an epoch is one pass over the training cases (federated: "
            f"{b['local_epochs']} local epoch per round, so {b['vae_epochs']}+{b['diffusion_epochs']} rounds for "
            f"ADDiff-Dose and {b['unet_epochs']} for the U-Net; local: the same epochs over a site's {n_site} cases; "
            f"pooled: the same epochs over the {n_pool} pooled cases); batch {b['batch_size']}, {b['optimizer']} "
            f"lr {b['lr']:g} constant, grad clip 1; DDIM {cfg.sample_steps} steps at evaluation; CPU only")


def _method_cost(meth: dict) -> tuple[float | None, float | None]:
    """(CPU minutes, wall minutes) of a method: training + evaluation + uncertainty."""
    cpu = [v for v in meth.get("cpu_seconds", {}).values() if isinstance(v, (int, float))]
    wall = [v for v in meth.get("seconds", {}).values() if isinstance(v, (int, float))]
    return (sum(cpu) / 60 if cpu else None), (sum(wall) / 60 if wall else None)


def write_markdown(path: Path, res: dict) -> None:
    b = res["budget"]
    split = res.get("split") or []
    n_held = sum(len(s["heldout"]) for s in split)
    n_site_train = sorted({len(s["train"]) for s in split})
    n_site_text = "/".join(str(n) for n in n_site_train)
    n_pool = sum(len(s["train"]) for s in split)
    lines = [f"# OpenKBP real-anatomy benchmark (bench/openkbp_bench.py, budget `{b['name']}`)", ""]
    if not res.get("complete", True):
        lines += ["**Partial results: the run was still going (or was stopped) when this file was written.**", ""]
    m = res["machine"]
    cpu_total = res.get("cpu_seconds", {}).get("total")
    lines += [f"Machine: {m.get('cpu_model')}, {m.get('usable_cpus')} CPU cores, torch {m.get('torch')}, no GPU, "
              f"{m.get('torch_threads_per_step', 1)} torch thread per training/evaluation process; load average at "
              f"start {m.get('loadavg_start')} / end {res.get('loadavg_end')} (the machine was shared with other jobs, so "
              f"wall times are inflated and noisy; the metrics are not affected). Wall time {res['wall_seconds'] / 60:.1f} "
              f"min" + (f"; CPU time {cpu_total / 60:.1f} min (this process and every step it ran)"
                        if cpu_total else "") + ".", ""]
    d = res["data"]
    lines += ["## Data and split", "",
              f"{d['patients']} OpenKBP head-and-neck patients: {d.get('sample_patients', d['patients'])} of the sample "
              f"(`{d['sample']}`)" + (f" + {d['extra_patients']} of the training pool (`{d['extra']}`)"
                                      if d.get("extra_patients") else "")
              + f", sorted by in-plane voxel spacing (ties: patient number) and cut in thirds; each site holds out "
              f"{res.get('heldout_per_site', N_HELDOUT)} patients (seeded draw, seed {SPLIT_SEED}; {n_held} in all) and "
              f"trains on the rest ({n_pool} training patients in all).", "",
              "| site | patients | in-plane spacing (mm) | slice spacing (mm) | training | held-out patients |",
              "|---|---|---|---|---|---|"]
    for s in split:
        sp = sorted(set(s["in_plane_spacing_mm"].values()))
        sl = sorted(set(s["slice_spacing_mm"].values()))
        lines.append(f"| {s['site']} | {len(s['patients'])} | {sp[0]:.3f} - {sp[-1]:.3f} | {sl[0]:g} - {sl[-1]:g} | "
                     f"{len(s['train'])} | {', '.join(s['heldout'])} |")
    lines += ["", "## Training budget (equal compute)", "", b["text"] + ".", ""]
    st = res.get("step_cpu_seconds") or {}
    plan = b.get("planned_cpu") or {}
    if st.get("vae"):
        epochs = {"vae": b["vae_epochs"], "diffusion": b["diffusion_epochs"], "unet": b["unet_epochs"]}
        per = {"vae": plan.get("addiff_vae_s"), "diffusion": plan.get("addiff_diffusion_s"), "unet": plan.get("unet_s")}
        lines += [f"CPU seconds of one optimiser step (batch 1, {st.get('threads', 1)} thread, {st.get('grid')}^3, "
                  f"measured in this run on {len(st.get('cases', []))} training patients after a warm-up step):", "",
                  "| stage | CPU s / step | wall s / step | epochs | planned training CPU per method |", "|---|---|---|---|---|"]
        for stage, label in (("vae", "ADDiff-Dose VAE"), ("diffusion", "ADDiff-Dose diffusion"), ("unet", "U-Net")):
            v = st.get(stage, {})
            lines.append(f"| {label} | {_fmt(v.get('cpu_seconds_per_step'))} | {_fmt(v.get('wall_seconds_per_step'))} | "
                         f"{epochs[stage]} | {_fmt(per[stage] / 60 if per[stage] else None, 1)} min |")
        if plan:
            lines += ["", f"ADDiff-Dose: {100 * plan['vae_share']:.0f} % of its training CPU on the VAE, "
                          f"{100 * (1 - plan['vae_share']):.0f} % on the diffusion stage; the U-Net's epochs cost "
                          f"{plan['unet_over_addiff']:.2f}x ADDiff-Dose's two stages; all training (3 ADDiff-Dose "
                          f"methods + the U-Net, {plan['training_cases']} training patients each) "
                          f"{plan['all_training_s'] / 60:.1f} CPU min planned from these step times."]
        if b.get("set_from_step_cpu_seconds"):
            sf = b["set_from_step_cpu_seconds"]
            lines += [f"The epochs were set from an earlier measurement (VAE {sf['vae']}, diffusion {sf['diffusion']}, "
                      f"U-Net {sf['unet']} CPU s / step) by the rules: {b.get('rules')} (bench/openkbp_bench.py "
                      "docstring)."]
        lines.append("")

    sites = [s["site"] for s in split]
    refs = [("reference: 0 Gy everywhere", res.get("zero_dose")),
            ("reference: true dose through the model grid", res.get("grid_floor"))]
    lines += [f"## Held-out results, all {n_held} held-out patients", "",
              "Each method evaluated on each site's own held-out patients, on their 128^3 CT grid, with the official "
              "OpenKBP scores (prediction set to 0 outside the possible-dose mask; dose score = MAE over the mask, "
              "mean over patients; DVH score = one mean over every DVH cell). Lower is better for the scores; higher "
              "for gamma (3%/2 mm, 10% cutoff) and isodose Dice. Uncertainty: Spearman correlation between the "
              f"voxel-wise std of {b.get('uncertainty_samples', UNCERTAINTY_SAMPLES)} samples and |mean - reference| in "
              "the possible-dose mask, mean over patients (higher = the uncertainty map points at the errors).", "",
              "| method | dose score (Gy) | DVH score (Gy) | gamma 3%/2mm (%) | isodose Dice | uncertainty Spearman | "
              "CPU (min) | wall (min) |", "|---|---|---|---|---|---|---|---|"]
    for mkey, label in METHOD_LABELS.items():
        meth = res["methods"].get(mkey)
        if not meth:
            continue
        if meth.get("error"):
            lines.append(f"| {label} | failed: {meth['error']} |" + " |" * 6)
            continue
        o = meth["overall"]
        unc = meth.get("uncertainty", {})
        unc_txt = (_fmt(unc.get("spearman_mean")) if unc.get("cases") else
                   ("deterministic" if mkey == "federated_unet" else unc.get("error", "n/a")[:60]))
        cpu, wall = _method_cost(meth)
        lines.append(f"| {label} | {_fmt(o.get('openkbp_dose_score'))} | {_fmt(o.get('openkbp_dvh_score'))} | "
                     f"{_fmt(o.get('gamma_pass_rate'), 1)} | {_fmt(o.get('mean_isodose_dice'))} | {unc_txt} | "
                     f"{_fmt(cpu, 1)} | {_fmt(wall, 1)} |")
    for label, ref in refs:
        if ref:
            lines.append(f"| *{label}* | {_fmt(ref.get('openkbp_dose_score'))} | {_fmt(ref.get('openkbp_dvh_score'))} | "
                         "| | | | |")
    lines.append("")
    for title, key, nd in (("dose score (Gy)", "openkbp_dose_score", 2), ("DVH score (Gy)", "openkbp_dvh_score", 2),
                           ("gamma pass rate 3%/2 mm (%)", "gamma_pass_rate", 1),
                           ("isodose Dice", "mean_isodose_dice", 2), ("uncertainty Spearman", UNC, 2)):
        head = ["method"] + [f"{s['site']} ({len(s['heldout'])})" for s in split] + [f"all ({n_held})"]
        lines += [f"**Per site: {title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for mkey, label in METHOD_LABELS.items():
            meth = res["methods"].get(mkey)
            if not meth or meth.get("error"):
                continue
            if key == UNC:
                unc = meth.get("uncertainty", {})
                if not unc.get("cases"):
                    continue
                row = [label] + [_fmt(unc["per_site"].get(site, {}).get("spearman_mean"), nd) for site in sites]
                row.append(_fmt(unc.get("spearman_mean"), nd))
            else:
                row = [label] + [_fmt(meth["per_site"].get(site, {}).get(key), nd) for site in sites]
                row.append(_fmt(meth["overall"].get(key), nd))
            lines.append("| " + " | ".join(row) + " |")
        if key in ("openkbp_dose_score", "openkbp_dvh_score"):
            for label, ref in refs:
                if ref:
                    row = [f"*{label}*"] + [_fmt(ref["per_site"].get(site, {}).get(key), nd) for site in sites]
                    lines.append("| " + " | ".join(row + [_fmt(ref.get(key), nd)]) + " |")
        lines.append("")
    unc_lines = []
    for mkey in ADDIFF_METHODS:
        unc = res["methods"].get(mkey, {}).get("uncertainty", {})
        if unc.get("cases"):
            unc_lines.append(f"{METHOD_LABELS[mkey]}: Spearman {_fmt(unc.get('spearman_min'))} .. "
                             f"{_fmt(unc.get('spearman_max'))} over patients ({unc['n_defined']} of {unc['n']} defined), "
                             f"mean std {_g(unc.get('mean_std_gy'))} Gy in the mask, dose score of the "
                             f"{unc['samples']}-sample mean {_fmt(unc.get('mean_prediction_dose_score'))} Gy")
    if unc_lines:
        lines += ["Uncertainty details: " + "; ".join(unc_lines) + ".", ""]
    zero = res.get("zero_dose")
    floor = res.get("grid_floor")
    if zero and zero.get("openkbp_dose_score"):
        parts = []
        for mkey, label in METHOD_LABELS.items():
            v = res["methods"].get(mkey, {}).get("overall", {}).get("openkbp_dose_score")
            if v is not None:
                parts.append(f"{label} {100 * (1 - v / zero['openkbp_dose_score']):.0f}%")
        if parts:
            lines += [f"Share of the 0 Gy reference's dose score that each method removes (all {n_held} patients): "
                      f"{', '.join(parts)}.", ""]
    pub = "; ".join(f"{k}: {d:.2f} / {v:.2f} Gy" for k, (d, v) in PUBLISHED.items())
    n_site = min(n_site_train) if n_site_train else 0
    steps = lambda e, n: e * -(-n // int(b.get("batch_size", 1)))  # noqa: E731
    lines += ["## Caveats", "",
              f"- Small CPU budget: ADDiff-Dose's VAE got {steps(b['vae_epochs'], n_site)} optimiser steps per site "
              f"({steps(b['vae_epochs'], n_pool)} pooled) and its denoiser {steps(b['diffusion_epochs'], n_site)} "
              f"({steps(b['diffusion_epochs'], n_pool)} pooled); the U-Net {steps(b['unet_epochs'], n_site)} per site. "
              "None of the models is trained to convergence, and the ranking of the methods at this budget need not "
              "hold at a full (GPU) budget.",
              f"- Data: {n_site_text} training patients per site ({n_pool} pooled) and "
              f"{res.get('heldout_per_site', N_HELDOUT)} held-out patients per site; a site's numbers rest on "
              f"{res.get('heldout_per_site', N_HELDOUT)} patients (the \"all\" column on {n_held}), and no repeats "
              "with other seeds were affordable, so differences of a fraction of a Gy are within the noise.",
              f"- Published OpenKBP test-set scores (dose / DVH score, 100 test patients, 200 training patients, "
              f"native 128^3 grid, GPU training): {pub}. Not comparable in scale with the ones here (other patients, "
              f"{n_pool} vs 200 training patients, a {res['model']['grid']['size']}^3 model grid at "
              f"{_spacing_text(res['model']['grid']['spacing'])}).",
              ]
    if floor:
        lines.append(f"- True dose through the grid: the reference dose itself, mapped onto the "
                     f"{res['model']['grid']['size']}^3 model grid ({_spacing_text(res['model']['grid']['spacing'])}) "
                     f"and back onto the CT grid, scores {floor['openkbp_dose_score']:.2f} Gy dose score and "
                     f"{floor['openkbp_dvh_score']:.2f} Gy DVH score on these {n_held} held-out patients: the floor of "
                     "any model on this grid.")
    if zero:
        lines.append(f"- Zero reference: predicting 0 Gy everywhere scores {zero['openkbp_dose_score']:.2f} Gy dose "
                     f"score and {zero['openkbp_dvh_score']:.2f} Gy DVH score: a method near these numbers has learned "
                     "little.")
    lines += ["- Pooled training is evaluated with `addiff evaluate` per site on the same held-out patients; "
              "the federated runs evaluate the final global model at each site (numbers only); the uncertainty "
              "predictions (`addiff predict --samples` path) are separate runs on the same patients.",
              "- CPU minutes per method count its training, evaluation and uncertainty processes (the larger of "
              "getrusage of the finished children and the process tree's own CPU times sampled every 5 s from "
              "/proc, which also counts the federated runs' Ray workers).",
              f"- Run folders and logs: `{res['work']}`; `addiff report "
              f"{res['methods'].get('federated_addiff', {}).get('run_dir', 'RUN')}` shows the federated / local / "
              "pooled comparison (`comparison.json`).", ""]
    path.write_text("\n".join(lines))


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
    from common import json_safe

    path.write_text(json.dumps(json_safe(res), indent=2) + "\n")
    write_markdown(out / "openkbp_bench.md", res)
    print(f"rewritten: {path}, {out / 'openkbp_bench.md'}", flush=True)
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
    p.add_argument("--out", type=Path, default=None,
                   help="where openkbp_bench.json/.md go (default bench/results; small budget: WORK/results)")
    p.add_argument("--render-only", action="store_true",
                   help="train nothing: re-read OUT/openkbp_bench.json, recompute the reference scores (grid floor, "
                        "0 Gy) from its work folder's cases and rewrite OUT/openkbp_bench.json and .md")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per training/evaluation process (default 1: on a shared, busy CPU one "
                        "thread ran 2-4x faster than two); the federated runs use one process per site")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one child task (JSON payload)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_as_child(args.child)
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
    extra_arg = args.extra
    if extra_arg is None:  # the default pool, when it is there
        extra_arg = str(DEFAULT_EXTRA) if DEFAULT_EXTRA.exists() else None
    elif extra_arg.lower() != "none" and not Path(extra_arg).expanduser().exists():
        print(f"openkbp_bench: --extra {extra_arg}: not found", file=sys.stderr)
        return 2

    from common import json_safe, loadavg, machine_info, quiet_warnings

    quiet_warnings()
    from addiff_core.config import load_model_config

    budget = {"name": args.budget, **BUDGETS[args.budget]}
    work = (args.work or (DEFAULT_WORK if args.budget == "default" else Path(f"{DEFAULT_WORK}_{args.budget}"))).resolve()
    out = (args.out or (DEFAULT_OUT if args.budget == "default" else work / "results")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cpu0 = _self_cpu()

    # 1. the patients: the sample + the extra pool (unpacked once into WORK/extra)
    patients = find_patients(sample)
    extra_dir = None
    extra_patients: dict[str, Path] = {}
    if extra_arg:
        _progress(t0, f"extra patients: {extra_arg}" + (" (unpacking with tar -xJf ...)" if is_archive(Path(extra_arg)) else ""))
        try:
            extra_dir = resolve_extra(extra_arg, work)
        except (OSError, RuntimeError) as e:
            print(f"openkbp_bench: {e}", file=sys.stderr)
            return 2
        extra_patients = find_extra_patients(extra_dir) if extra_dir else {}
        both = sorted(set(patients) & set(extra_patients), key=natural_key)
        if both:
            print(f"openkbp_bench: patient id(s) in both the sample and the extra pool: {', '.join(both)}", file=sys.stderr)
            return 2
    n_sample = len(patients)
    patients = {**patients, **extra_patients}
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
    py = [sys.executable, "-m", "addiff_core.cli"]

    _progress(t0, f"importing {len(patients)} OpenKBP patients ({n_sample} sample + {len(extra_patients)} extra) into "
                  f"{work / 'cases'} ...")
    cases_dir = work / "cases"
    imported, skipped = import_all(patients, cases_dir)
    if skipped or len(imported) != len(patients):  # the split below needs every patient
        print(f"openkbp_bench: imported {len(imported)} of {len(patients)} patients; skipped: "
              + "; ".join(f"{p}: {r}" for p, r in skipped), file=sys.stderr)
        return 1
    import_seconds = time.perf_counter() - t0
    spacings = read_spacings(patients)
    split = make_split(spacings, n_heldout=n_heldout)
    site_files, pooled_file = write_site_files(work, cases_dir, split, budget)
    cfg_file = model_config_file(budget, work)
    cfg = load_model_config(cfg_file)
    n_train = sum(len(s["train"]) for s in split)
    budget["model_config"] = str(cfg_file.relative_to(REPO) if cfg_file.is_relative_to(REPO) else cfg_file)
    budget["text"] = budget_text(budget, cfg, "/".join(str(n) for n in sorted({len(s["train"]) for s in split})), n_train)
    budget["case_passes_per_method"] = {"vae": n_train * budget["vae_epochs"],
                                        "diffusion": n_train * budget["diffusion_epochs"],
                                        "unet": n_train * budget["unet_epochs"]}
    budget["execution"] = (f"federated: addiff simulate, one Ray actor per site with 1 CPU (two sites train at once "
                           f"on 2 cores); local, pooled, evaluations and uncertainty: one process at a time, "
                           f"{args.threads} torch thread(s) each")
    for s in split:
        sp = sorted(set(s["in_plane_spacing_mm"].values()))
        _progress(t0, f"{s['site']}: {len(s['patients'])} patients (in-plane {sp[0]:.3f}..{sp[-1]:.3f} mm); "
                      f"held out {', '.join(s['heldout'])}")
    _progress(t0, f"budget {args.budget}: {budget['text']}")

    runs = work / "runs"
    logs = work / "logs"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    methods: dict[str, dict] = {}
    failed: list[str] = []
    res: dict[str, Any] = {
        "bench": "openkbp_bench",
        "complete": False,
        "budget": budget,
        "data": {"sample": str(sample), "sample_patients": n_sample,
                 "extra": str(extra_arg) if extra_arg else None, "extra_dir": str(extra_dir) if extra_dir else None,
                 "extra_patients": len(extra_patients), "patients": len(patients), "cases_dir": str(cases_dir),
                 "import_seconds": import_seconds},
        "heldout_per_site": n_heldout,
        "split": split,
        "split_rule": (f"patients sorted by in-plane voxel spacing (voxel_dimensions.csv rows 1-2; ties: patient "
                       f"number), cut into {len(SITE_NAMES)} contiguous thirds; {n_heldout} held-out patients per site "
                       f"drawn with numpy default_rng([{SPLIT_SEED}, site index])"),
        "model": {"config": budget["model_config"], **cfg.to_dict()},
        "methods": methods,
        "metric_keys": list(METRICS) + [UNC],
        "published_openkbp_test": {k: {"dose_score": d, "dvh_score": v} for k, (d, v) in PUBLISHED.items()},
        "machine": machine,
        "work": str(work),
        "failed": failed,
    }

    def save(complete: bool = False) -> None:
        res["complete"] = complete
        res["loadavg_end"] = loadavg()
        res["wall_seconds"] = time.perf_counter() - t0
        res["cpu_seconds"] = {**res.get("cpu_seconds", {}), "total": _self_cpu() - cpu0 + sum(CPU_SPENT)}
        tmp = out / ".openkbp_bench.json.tmp"
        tmp.write_text(json.dumps(json_safe(res), indent=2) + "\n")
        tmp.replace(out / "openkbp_bench.json")
        write_markdown(out / "openkbp_bench.md", res)

    # 2. references (no training) and the step times behind the budget
    c = _self_cpu()
    refs = reference_scores(work, split, cfg)
    res.update({"grid_floor": refs.get("grid_floor"), "zero_dose": refs.get("zero_dose")})
    res["cpu_seconds"] = {"reference_scores": _self_cpu() - c}
    _progress(t0, "references: 0 Gy dose score "
                  f"{_fmt((refs.get('zero_dose') or {}).get('openkbp_dose_score'))}, true dose through the grid "
                  f"{_fmt((refs.get('grid_floor') or {}).get('openkbp_dose_score'))} Gy")
    timing_cases = [str(cases_dir / s["train"][0]) for s in (split[0], split[-1])][:STEP_TIMING_CASES]
    _progress(t0, "measuring CPU seconds per optimiser step (VAE, diffusion, U-Net) ...")
    try:
        st, wsecs, csecs = run_child_task({"task": "step_times", "threads": args.threads, "config": str(cfg_file),
                                           "cases": timing_cases, "epochs": 2}, logs / "step_times.log")
        st.pop("child_wall_seconds", None)
        res["step_cpu_seconds"] = st
        res["cpu_seconds"]["step_timing"] = csecs
        budget["planned_cpu"] = planned_cpu(budget, st, n_train)
        _progress(t0, "  CPU s / step: " + ", ".join(f"{k} {st[k]['cpu_seconds_per_step']:.2f}"
                                                     for k in ("vae", "diffusion", "unet"))
                      + f" ({wsecs:.0f} s); planned training CPU {budget['planned_cpu']['all_training_s'] / 60:.1f} min, "
                        f"VAE share {100 * budget['planned_cpu']['vae_share']:.0f} %")
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        _progress(t0, f"step timing failed (the run goes on): {e}")
        res["step_cpu_seconds"] = {"error": str(e).splitlines()[0]}
    save()

    site_csv = ",".join(str(f) for f in site_files)
    common_sim = ["simulate", "--site-files", site_csv, "--config", str(cfg_file), "--local-epochs",
                  str(budget["local_epochs"]), "--seed", "0"] + ([] if budget["gamma"] else ["--no-gamma"])

    def fail(key: str, step: str, rc: int, log: Path) -> None:
        msg = f"{step} exited with status {rc}; log {log}"
        _progress(t0, f"FAILED: {msg}\n{_log_tail(log)}")
        methods[key] = {"error": msg, "log": str(log)}
        failed.append(key)
        save()

    def uncertainty(key: str, jobs: list[dict]) -> None:
        """Uncertainty of one ADDiff method (one child process for all its held-out patients)."""
        log = logs / f"uncertainty_{key}.log"
        _progress(t0, f"  uncertainty: {len(jobs)} held-out patients x {budget['uncertainty_samples']} samples "
                      f"(log {log}) ...")
        meth = methods[key]
        try:
            r, wsecs, csecs = run_child_task({"task": "uncertainty", "threads": args.threads, "jobs": jobs,
                                              "samples": budget["uncertainty_samples"]}, log)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            _progress(t0, f"  uncertainty FAILED: {e}")
            meth["uncertainty"] = {"error": str(e).splitlines()[0]}
            return
        u = summarize_uncertainty(r["cases"])
        u["samples"] = r["samples"]
        meth["uncertainty"] = u
        for site, v in u["per_site"].items():
            if site in meth.get("per_site", {}):
                meth["per_site"][site][UNC] = v["spearman_mean"]
        meth.setdefault("overall", {})[UNC] = u["spearman_mean"]
        meth.setdefault("seconds", {})["uncertainty"] = wsecs
        meth.setdefault("cpu_seconds", {})["uncertainty"] = csecs
        _progress(t0, f"  uncertainty Spearman mean {_fmt(u['spearman_mean'])} ({u['n_defined']}/{u['n']} defined; "
                      f"{wsecs:.0f} s)")

    def jobs_for(key: str, ckpt_of_site: Mapping[str, Path]) -> list[dict]:
        return [{"checkpoint": str(ckpt_of_site[s["site"]]), "case": str(cases_dir / pid), "site": s["site"],
                 "out": str(work / "uncertainty" / key / pid)} for s in split for pid in s["heldout"]]

    # 3. federated runs
    for key, kind, rounds in (("federated_addiff", "diffusion", f"{budget['vae_epochs']},{budget['diffusion_epochs']}"),
                              ("federated_unet", "unet", str(budget["unet_epochs"]))):
        run_dir = runs / key
        log = logs / f"{key}.log"
        _progress(t0, f"{METHOD_LABELS[key]}: addiff simulate --model {kind} --rounds {rounds} ... (log {log})")
        secs = csecs = 0.0
        for attempt in range(RAY_START_RETRIES + 1):
            if run_dir.exists():  # a fresh run folder for each try
                shutil.rmtree(run_dir)
            rc, s1, c1 = run_step(py + common_sim + ["--model", kind, "--rounds", rounds, "--run-dir", str(run_dir)],
                                  log, args.threads)
            secs, csecs = secs + s1, csecs + c1
            if rc == 0 or attempt == RAY_START_RETRIES or not ray_start_failed(log):
                break
            shutil.copy(log, log.with_name(f"{log.stem}.try{attempt + 1}.log"))
            _progress(t0, f"  Ray crashed (overloaded machine?); trying again ({attempt + 2} of {RAY_START_RETRIES + 1}); "
                          f"log of the failed try: {log.with_name(f'{log.stem}.try{attempt + 1}.log')}")
            res.setdefault("ray_retries", []).append({"method": key, "attempt": attempt + 1, "seconds": s1})
        fm = run_dir / "final_metrics.json"
        if rc != 0 or not fm.is_file():
            fail(key, "addiff simulate", rc, log)
            continue
        rows = {r["site"]: r for r in _read_json(fm)}
        per_site = {s["site"]: _site_metrics(rows.get(s["site"], {}), rows.get(s["site"], {}).get("cases", 0))
                    for s in split}
        methods[key] = {"run_dir": str(run_dir), "per_site": per_site, "overall": _overall(per_site),
                        "seconds": {"simulate_total": secs}, "cpu_seconds": {"simulate_total": csecs}, "log": str(log)}
        _progress(t0, f"  done in {secs:.0f} s ({csecs:.0f} CPU s): dose score per site "
                      + ", ".join(f"{k} {_fmt(v['openkbp_dose_score'])}" for k, v in per_site.items()))
        if kind == "diffusion" and (run_dir / "final_model.pt").is_file():
            uncertainty(key, jobs_for(key, {s["site"]: run_dir / "final_model.pt" for s in split}))
        save()

    # 4. each site alone
    per_site, secs_local, cpu_local, ok = {}, {}, {}, True
    for s, f in zip(split, site_files):
        run_dir = runs / f"local_{s['site']}"
        log = logs / f"local_{s['site']}.log"
        _progress(t0, f"{s['site']} alone: addiff train --vae-epochs {budget['vae_epochs']} --diffusion-epochs "
                      f"{budget['diffusion_epochs']} ... (log {log})")
        rc, secs, csecs = run_step(py + ["train", "--site", str(f), "--out", str(run_dir), "--config", str(cfg_file),
                                         "--model", "diffusion", "--vae-epochs", str(budget["vae_epochs"]),
                                         "--diffusion-epochs", str(budget["diffusion_epochs"]), "--quiet"], log,
                                   args.threads)
        mj = run_dir / "metrics.json"
        if rc != 0 or not mj.is_file():
            fail("local_addiff", f"addiff train ({s['site']})", rc, log)
            ok = False
            break
        h = _read_json(mj)["heldout"]
        per_site[s["site"]] = _site_metrics(h["mean"], h["num_cases"], h.get("cases"))
        secs_local[s["site"]] = secs
        cpu_local[s["site"]] = csecs
        _progress(t0, f"  done in {secs:.0f} s ({csecs:.0f} CPU s): dose score "
                      f"{_fmt(per_site[s['site']]['openkbp_dose_score'])}")
    if ok:
        methods["local_addiff"] = {"run_dirs": [str(runs / f"local_{s['site']}") for s in split], "per_site": per_site,
                                   "overall": _overall(per_site), "seconds": secs_local, "cpu_seconds": cpu_local}
        uncertainty("local_addiff", jobs_for("local_addiff", {s["site"]: runs / f"local_{s['site']}" / "model.pt"
                                                              for s in split}))
        save()

    # 5. pooled: train on the union of the training cases, evaluate per site
    run_dir = runs / "pooled"
    log = logs / "pooled_train.log"
    _progress(t0, f"pooled: addiff train on {n_train} cases ... (log {log})")
    rc, secs, csecs = run_step(py + ["train", "--site", str(pooled_file), "--out", str(run_dir), "--config", str(cfg_file),
                                     "--model", "diffusion", "--vae-epochs", str(budget["vae_epochs"]),
                                     "--diffusion-epochs", str(budget["diffusion_epochs"]), "--quiet"], log, args.threads)
    if rc != 0 or not (run_dir / "model.pt").is_file():
        fail("pooled_addiff", "addiff train (pooled)", rc, log)
    else:
        _progress(t0, f"  trained in {secs:.0f} s ({csecs:.0f} CPU s)")
        per_site, secs_pool, cpu_pool = {}, {"train": secs}, {"train": csecs}
        for s, f in zip(split, site_files):
            ev_json = run_dir / f"eval_{s['site']}.json"
            log = logs / f"pooled_eval_{s['site']}.log"
            rc, esecs, ecpu = run_step(py + ["evaluate", "--checkpoint", str(run_dir / "model.pt"), "--site", str(f),
                                             "--out", str(ev_json)], log, args.threads)
            if rc != 0 or not ev_json.is_file():
                fail("pooled_addiff", f"addiff evaluate (pooled on {s['site']})", rc, log)
                break
            e = _read_json(ev_json)
            per_site[s["site"]] = _site_metrics(e["mean"], e["num_cases"], e.get("cases"))
            secs_pool[f"evaluate_{s['site']}"] = esecs
            cpu_pool[f"evaluate_{s['site']}"] = ecpu
            _progress(t0, f"  {s['site']}: dose score {_fmt(per_site[s['site']]['openkbp_dose_score'])} ({esecs:.0f} s)")
        else:
            methods["pooled_addiff"] = {"run_dir": str(run_dir), "per_site": per_site, "overall": _overall(per_site),
                                        "seconds": secs_pool, "cpu_seconds": cpu_pool}
            uncertainty("pooled_addiff", jobs_for("pooled_addiff", {s["site"]: run_dir / "model.pt" for s in split}))
            save()

    # 6. comparison for addiff report, final results
    fed = methods.get("federated_addiff", {})
    if fed.get("run_dir"):
        series = {}
        for key, name in (("federated_addiff", "federated"), ("federated_unet", "federated U-Net"),
                          ("local_addiff", "local"), ("pooled_addiff", "pooled")):
            if methods.get(key, {}).get("per_site"):
                series[name] = {site: {k: v[k] for k in METRICS if v.get(k) is not None}
                                for site, v in methods[key]["per_site"].items()}
        comp = {"metric": "openkbp_dose_score", "series": series,
                "note": (f"OpenKBP real-anatomy benchmark (bench/openkbp_bench.py, budget {args.budget}): "
                         f"{budget['text']}. federated = ADDiff-Dose FedAvg; federated U-Net = the direct-regression "
                         "baseline, FedAvg; local = ADDiff-Dose trained on one site's training cases; pooled = "
                         f"ADDiff-Dose trained on the {n_train} training cases of all sites. Each site's "
                         f"{n_heldout} held-out patients.")}
        Path(fed["run_dir"], "comparison.json").write_text(json.dumps(comp, indent=2) + "\n")
        log = logs / "report.log"
        rc, rsecs, rcpu = run_step(py + ["report", fed["run_dir"]], log, args.threads)
        res["report"] = {"run_dir": fed["run_dir"], "status": rc, "seconds": rsecs, "cpu_seconds": rcpu,
                         "path": str(Path(fed["run_dir"]) / "report" / "report.md")}
    save(complete=True)
    _progress(t0, f"written: {out / 'openkbp_bench.json'}, {out / 'openkbp_bench.md'}")
    print((out / "openkbp_bench.md").read_text(), flush=True)
    if failed:
        print(f"openkbp_bench: {len(failed)} method(s) failed: {', '.join(failed)} (see the logs above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
