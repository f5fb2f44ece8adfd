"""Shared helpers of the ``bench/`` scripts: model configs per grid, machine description,
timing, resident-memory measurement, child processes and result files (JSON + Markdown).

The bench scripts are plain scripts (``python bench/model_bench.py``), not part of the installed
package; they import this module from their own folder.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from addiff_core.formats import json_safe, markdown_table  # the one JSON and Markdown writer

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
DEFAULT_OUT = BENCH_DIR / "results"
RESULT_PREFIX = "BENCH_RESULT_JSON "

# Reference points quoted in issue 3 (seconds per case).
REFERENCE_SECONDS = {
    "paper_rtx4090_s_per_case": 22.5,  # ADDiff-Dose paper, one RTX 4090
    "gdp_hmm_challenge_limit_s": 3.0,  # GDP-HMM challenge limit per case
    "goal_h100_128_s": 1.0,  # this project's aim on one H100 at 128^3
}

_T0 = time.perf_counter()


def quiet_warnings() -> None:
    """Silence the known, harmless warnings that would drown the progress lines."""
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    warnings.filterwarnings("ignore", message=".*Using a non-full backward hook.*")
    warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")


def progress(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# model configs per grid
# --------------------------------------------------------------------------------------------
def bench_model_config(size: int):
    """``(name, ModelConfig)`` used by the benches for a ``size``^3 grid.

    * 16 (smoke runs only): the tiny test config (2 DDIM steps).
    * 32: ``configs/demo.yaml`` as shipped (10 DDIM steps; latent 8^3).
    * 64: scaled up: VAE (16, 32, 64) = 4x down -> 16^3 latent; denoiser (64, 128, 256) with
      attention at the two coarse levels, context 128, GroupNorm 16; 25 DDIM steps.
    * 128: VAE (16, 32, 64, 128) = 8x down -> the same 16^3 latent and the same denoiser as 64^3.
    Every config is validated through ``model_config_from_dict`` (the checkpoint loader's check).
    """
    from addiff_core.config import GridConfig, ModelConfig, load_model_config, model_config_from_dict

    if size == 16:
        name, cfg = "tiny16", ModelConfig(grid=GridConfig(size=16), vae_channels=(8, 16), unet_channels=(16, 16),
                                           attention_levels=(False, True), cond_channels=8, context_dim=16,
                                           num_heads=2, norm_groups=4, sample_steps=2)
    elif size == 32:
        name, cfg = "demo.yaml", load_model_config(DEMO_CONFIG)
    elif size == 64:
        name, cfg = "scaled64", ModelConfig(grid=GridConfig(size=64), vae_channels=(16, 32, 64),
                                             unet_channels=(64, 128, 256), attention_levels=(False, True, True),
                                             context_dim=128, norm_groups=16)
    elif size == 128:
        name, cfg = "scaled128", ModelConfig(grid=GridConfig(size=128), vae_channels=(16, 32, 64, 128),
                                              unet_channels=(64, 128, 256), attention_levels=(False, True, True),
                                              context_dim=128, norm_groups=16)
    else:
        raise ValueError(f"no bench model config for a {size}^3 grid (use 16, 32, 64 or 128)")
    cfg = model_config_from_dict(cfg.to_dict(), f"bench config {name}")
    return name, cfg


def config_summary(cfg) -> dict:
    d = cfg.to_dict()
    d["downsample"] = cfg.downsample
    d["latent_size"] = cfg.latent_size
    return d


def parameter_counts(cfg) -> dict[str, int]:
    """Parameters of the VAE, condition encoder, denoiser and the U-Net baseline for ``cfg``."""
    import torch

    from addiff_core.models import build_model, count_parameters

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        diff = build_model(dataclasses.replace(cfg, kind="diffusion"))
        unet = build_model(dataclasses.replace(cfg, kind="unet"))
    return {"vae": count_parameters(diff.vae),
            "condition_encoder": count_parameters(diff.diffusion.cond),
            "denoiser": count_parameters(diff.diffusion.denoiser),
            "diffusion_stage": count_parameters(diff.diffusion),
            "diffusion_model_total": count_parameters(diff),
            "unet_baseline": count_parameters(unet)}


# --------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def have_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def machine_info(device: str) -> dict:
    import torch

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_start": loadavg(),
        "memory_method": ("psutil" if have_psutil() else "getrusage ru_maxrss / VmHWM") +
                         ", one child process per measured configuration, peak reset with /proc/self/clear_refs "
                         "where the kernel allows it",
    }
    for mod in ("monai", "opacus", "SimpleITK", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (default: torch's own choice, all cores).

    On a machine shared with other jobs, 1 thread degrades gracefully while a thread team that
    spans every core slows down many times over whenever one core is taken by someone else.
    """
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def resolve_devices(spec: str) -> list[str]:
    """``auto`` -> cuda if available else cpu; ``cpu``, ``cuda``, ``cuda:N``; or a comma list."""
    from addiff_core.config import resolve_device

    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        out.append(str(resolve_device(part)))
    if not out:
        raise ValueError("--device: give auto, cpu, cuda or a comma-separated list")
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def sync(device: Any = None) -> None:
    import torch

    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


class Stopwatch:
    """``with Stopwatch(device) as sw: ...`` -> ``sw.wall``, ``sw.cpu`` (process CPU seconds, all
    threads). Synchronises CUDA on entry and exit so GPU work is inside the interval."""

    def __init__(self, device: Any = None):
        self.device = device
        self.wall = float("nan")
        self.cpu = float("nan")

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self._w = time.perf_counter()
        self._c = time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def summarize(values: Iterable[float]) -> dict | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    return {"n": len(vals), "min": min(vals), "median": statistics.median(vals), "mean": statistics.fmean(vals),
            "max": max(vals), "values": vals}


@contextlib.contextmanager
def epoch_cpu_time():
    """Within the block, every training epoch's metrics also carry ``cpu_seconds``.

    Wraps ``addiff_core.training._run_epoch`` (looked up at call time by every stage function)
    and restores it on exit; the wall-clock ``seconds`` it reports is left as it is. Process CPU
    time is far less sensitive than wall time to other jobs sharing the machine.
    """
    import addiff_core.training as tr

    orig = tr._run_epoch

    def wrapped(*args, **kwargs):
        c0 = time.process_time()
        out = orig(*args, **kwargs)
        out["cpu_seconds"] = time.process_time() - c0
        return out

    tr._run_epoch = wrapped
    try:
        yield
    finally:
        tr._run_epoch = orig


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
def current_rss_mib() -> float:
    if have_psutil():
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set of this process (since start, or since the last ``reset_peak_rss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cuda_reset_peak(device: Any) -> None:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_mib(device: Any) -> float | None:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


# --------------------------------------------------------------------------------------------
# child processes
# --------------------------------------------------------------------------------------------
def child_result(obj: Any) -> None:
    """Print the child's result as the last stdout line (read back by ``run_child``)."""
    print(RESULT_PREFIX + json.dumps(json_safe(obj)), flush=True)


def run_child(script: Path, payload: dict, timeout: float = 3600.0) -> dict:
    """Run ``python script --child JSON`` in a fresh process and return its result dict.
    ``payload["threads"]``, when set, also becomes OMP_NUM_THREADS of the child."""
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    if payload.get("threads"):
        env["OMP_NUM_THREADS"] = str(payload["threads"])
    cmd = [sys.executable, str(script), "--child", json.dumps(payload)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"bench child {payload.get('task')} failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(lines[-1][len(RESULT_PREFIX):])
    out["child_wall_seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------
# scoring predictions the way training.evaluate and OpenKBP do
# --------------------------------------------------------------------------------------------
DVH_CELLS = "dvh_cells"


def openkbp_case_scores(case: Any, pred_img: Any, signed: bool = False) -> tuple[float, dict[str, float]]:
    """``(dose score, DVH errors)`` of a predicted dose (SimpleITK image, Gy, on the case's CT
    grid) for a loaded case: the prediction is first set to 0 outside the case's evaluation
    region (``addiff_core.regions``, OpenKBP's ``pred * possible_dose_mask``), then scored with
    ``metrics.openkbp_dose_score`` over that region and ``metrics.openkbp_dvh_errors`` (one
    error per DVH cell; the cohort score is ``metrics.cohort_dvh_score`` of these; ``signed``:
    prediction minus reference)."""
    import SimpleITK as sitk

    from addiff_core.metrics import BODY_NAMES, openkbp_dose_score, openkbp_dvh_errors
    from addiff_core.regions import evaluation_region, zero_outside

    region = evaluation_region(case)
    pred = sitk.GetArrayFromImage(zero_outside(pred_img, region)).astype("float64")
    ref = case.array("dose")
    masks = {k: case.array(k) for k in case.masks if k not in BODY_NAMES}
    errs = openkbp_dvh_errors(pred, ref, masks, case.voxel_volume_cc, case.plan.prescriptions.keys(), signed=signed)
    return openkbp_dose_score(pred, ref, sitk.GetArrayFromImage(region) > 0), errs


def cohort_overall(case_rows: Sequence[dict], keys: Iterable[str]) -> dict[str, float | None]:
    """Cohort value of ``keys`` over per-case rows of ``training.evaluate`` (each holding its
    ``dvh_cells``): ``metrics.cohort_means`` (mean over cases; the DVH score one mean over every
    DVH cell, as OpenKBP), None where there is no finite value."""
    from addiff_core.metrics import cohort_means

    means = cohort_means(case_rows)
    return {k: (means[k] if k in means and math.isfinite(means[k]) else None) for k in keys}


# --------------------------------------------------------------------------------------------
# result files
# --------------------------------------------------------------------------------------------
def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def write_json(path: Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        return f"{x:.{nd}f}"
    return str(x)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], nd: int = 2) -> str:
    """The project's Markdown table (``addiff_core.formats``) with the bench's number format."""
    return markdown_table(headers, rows, fmt=lambda v: fmt(v, nd))


def machine_line(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['cpu_model']}, {m['usable_cpus']} usable CPU(s), {m['torch_threads']} torch threads, "
            f"{m['memory_total_gib']} GiB RAM{gpu}; torch {m['torch']}, Python {m['python']}; device {m['device']}; "
            f"load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}")


def checkpoint_sites_parser(description: str) -> argparse.ArgumentParser:
    """The command line of the per-model diagnostics (dvh_breakdown, target_falloff): ``LABEL=CHECKPOINT``
    ..., ``--sites`` (their held-out cases) and ``--out`` (JSON, a .md beside it)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="LABEL=CHECKPOINT")
    ap.add_argument("--sites", type=Path, nargs="+", required=True, help="site files: their held-out cases")
    ap.add_argument("--out", type=Path, default=None, help="results file (JSON; a .md beside it)")
    return ap


def parse_list(text: str, kind=int) -> list:
    return [kind(p) for p in str(text).split(",") if p.strip()]
