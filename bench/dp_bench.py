"""DP bench (issue 5): cost of sample-level differential privacy (Opacus DP-SGD) per site.

    python bench/dp_bench.py                 # full run (~15 min on a 2-core CPU)
    python bench/dp_bench.py --smoke         # tiny sizes, 1 repetition (the test uses this)

Writes ``OUT/dp_bench.json`` and ``OUT/dp_bench.md``. Everything goes through
``addiff_core.site_task.SiteTask`` with a site config whose ``privacy`` section is set here
(``dataclasses.replace``) and a private ``state_dir`` per run under a scratch folder.

* Step time: one synthetic site (``--timing-cases`` cases at 32^3, demo.yaml, batch 2), for each
  trained stage (vae, diffusion, unet): one untimed warm-up epoch each, then ``--reps`` epochs
  with DP and without, interleaved (DP first on even repetitions, last on odd ones). Per-step
  time = epoch seconds / steps (Opacus' Poisson sampling gives the same number of steps with
  batches of random size, mean = batch size, so per-sample times are reported as well). The
  headline ratio is the median over repetitions of (DP epoch / the non-DP epoch next to it),
  per step; wall-clock and process CPU time are both given (CPU time is less affected by other
  jobs on a shared machine). DP runs use a fixed noise multiplier (1.0) so no budget can run out.
* Memory of one training step: one child process per (grid, stage, batch size, DP or not), a site
  with exactly ``batch`` training cases so that the one step of the epoch has exactly ``batch``
  samples (Poisson rate 1). Peak resident set of the whole process during the step (VmHWM /
  ru_maxrss, reset before the step where the kernel allows), RSS before it, and on CUDA
  ``torch.cuda.max_memory_allocated``. A straight line through peak(batch) gives MiB per extra
  sample and the largest batch that fits a memory size.
* Utility: ``--sites`` synthetic hospitals x ``--cases`` cases at 32^3; every site trains its own
  model locally (like ``addiff train``: VAE epochs then diffusion epochs, one planned budget) at
  each epsilon (``inf`` = DP off), evaluated on its own held-out cases (MAE in Gy on the CT grid).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import progress  # noqa: E402

SCRIPT = Path(__file__).resolve()
TIMING_SIGMA = 1.0


def _privacy(eps: float | None, *, sigma: float | None = None, max_grad_norm: float = 1.0, mode: str | None = None):
    """PrivacyConfig: eps None/inf -> DP off; sigma given -> fixed noise multiplier, no target.
    ``mode``: Opacus grad_sample_mode (default: the site file default)."""
    from addiff_core.config import PrivacyConfig

    extra = {"grad_sample_mode": mode} if mode else {}
    if sigma is not None:
        return PrivacyConfig(enabled=True, target_epsilon=None, noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                             **extra)
    if eps is None or math.isinf(eps):
        return PrivacyConfig(enabled=False)
    return PrivacyConfig(enabled=True, target_epsilon=float(eps), max_grad_norm=max_grad_norm, **extra)


def _stage_cfg(cfg, stage: str):
    return dataclasses.replace(cfg, kind="unet" if stage == "unet" else "diffusion")


# --------------------------------------------------------------------------------------------
# step time, DP vs not, interleaved
# --------------------------------------------------------------------------------------------
def bench_step_time(args, device: str, work: Path) -> dict:
    from addiff_core.config import load_site_config
    from addiff_core.site_task import SiteTask
    from addiff_core.round_plan import RoundPlan
    from addiff_core.synth import write_synthetic_sites

    name, cfg = common.bench_model_config(args.timing_grid)
    files = write_synthetic_sites(work / "timing", n_sites=1, cases_per_site=args.timing_cases, size=args.timing_grid,
                                  seed=args.seed)
    base = dataclasses.replace(load_site_config(files[0]), device=device)
    base = dataclasses.replace(base, training=dataclasses.replace(base.training, batch_size=args.batch_size))
    out = {"grid": args.timing_grid, "config_name": name, "batch_size": args.batch_size, "device": device,
           "noise_multiplier": TIMING_SIGMA, "max_grad_norm": 1.0, "stages": {}}
    for stage in common.parse_list(args.timing_stages, str):
        scfg = _stage_cfg(cfg, stage)
        tasks = {}
        for label, priv in (("dp", _privacy(None, sigma=TIMING_SIGMA, mode=args.grad_sample_mode)),
                            ("no_dp", _privacy(None))):
            site = dataclasses.replace(base, privacy=priv, state_dir=work / "timing_state" / stage / label)
            tasks[label] = SiteTask(site, scfg)
        n_train = tasks["dp"].data.num_train
        rows = {"dp": [], "no_dp": []}

        def epoch(label: str, rnd: int) -> dict:
            res = tasks[label].train(None, RoundPlan(stage, rnd, epochs=1, seed=args.seed,
                                                     planned_epochs=args.reps + 1))
            return res.history[0]

        for label in ("dp", "no_dp"):  # warm-up, untimed (also calibrates the latent scale)
            epoch(label, 0)
        for r in range(args.reps):
            order = ("dp", "no_dp") if r % 2 == 0 else ("no_dp", "dp")
            for label in order:
                h = epoch(label, r + 1)
                rows[label].append({"seconds": h["seconds"], "cpu_seconds": h.get("cpu_seconds"),
                                    "steps": h["steps"], "samples": h["samples"]})
        per = {}
        for label, rs in rows.items():
            per[label] = {
                "epochs": rs,
                "wall_s_per_step": common.summarize(r["seconds"] / r["steps"] for r in rs),
                "cpu_s_per_step": common.summarize(r["cpu_seconds"] / r["steps"] for r in rs),
                "wall_s_per_sample": common.summarize(r["seconds"] / max(r["samples"], 1) for r in rs),
                "cpu_s_per_sample": common.summarize(r["cpu_seconds"] / max(r["samples"], 1) for r in rs),
                "mean_batch": statistics.fmean(r["samples"] / r["steps"] for r in rs),
            }

        def paired(key: str, per_sample: bool) -> dict | None:
            vals = []
            for a, b in zip(rows["dp"], rows["no_dp"]):
                da = a[key] / (max(a["samples"], 1) if per_sample else a["steps"])
                db = b[key] / (max(b["samples"], 1) if per_sample else b["steps"])
                if db > 0:
                    vals.append(da / db)
            return common.summarize(vals)

        ratios = {"wall_per_step": paired("seconds", False), "cpu_per_step": paired("cpu_seconds", False),
                  "wall_per_sample": paired("seconds", True), "cpu_per_sample": paired("cpu_seconds", True),
                  "wall_per_step_of_min": (per["dp"]["wall_s_per_step"]["min"] / per["no_dp"]["wall_s_per_step"]["min"])}
        from addiff_core.models import count_parameters

        params = count_parameters(getattr(tasks["dp"].model, stage))
        out["stages"][stage] = {"train_cases": n_train, "steps_per_epoch": tasks["dp"].steps_per_epoch(),
                                "trainable_parameters": params, **per, "ratio": ratios,
                                "ratio_headline": ratios["wall_per_step"]["median"],
                                "meets_3x_aim": ratios["wall_per_step"]["median"] <= 3.0}
        progress(f"  step time {stage}: no DP {per['no_dp']['wall_s_per_step']['median'] * 1e3:.0f} ms, DP "
                 f"{per['dp']['wall_s_per_step']['median'] * 1e3:.0f} ms per step (median); DP/no-DP "
                 f"{ratios['wall_per_step']['median']:.2f}x wall, {ratios['cpu_per_step']['median']:.2f}x CPU")
        del tasks
        gc.collect()
    return out


# --------------------------------------------------------------------------------------------
# memory of one step (child process per configuration)
# --------------------------------------------------------------------------------------------
def _child_memory(p: dict) -> dict:
    common.quiet_warnings()
    common.apply_threads(p.get("threads"))
    import torch

    from addiff_core.case_io import list_cases
    from addiff_core.config import HeldOutConfig, load_site_config
    from addiff_core.site_task import SiteTask
    from addiff_core.round_plan import RoundPlan
    from addiff_core.models import count_parameters

    rss_imports = common.current_rss_mib()
    b = int(p["batch"])
    stage = p["stage"]
    site = load_site_config(p["site_file"])
    ids = sorted(d.name for d in list_cases(site.data_dir))
    priv = _privacy(None, sigma=TIMING_SIGMA, mode=p.get("grad_sample_mode")) if p["dp"] else _privacy(None)
    site = dataclasses.replace(site, device=p["device"], state_dir=Path(p["state_dir"]), privacy=priv,
                               heldout=HeldOutConfig(case_ids=tuple(ids[b:]), fraction=None, seed=0),
                               training=dataclasses.replace(site.training, batch_size=b))
    _, cfg = common.bench_model_config(int(p["size"]))
    task = SiteTask(site, _stage_cfg(cfg, stage))
    if stage == "diffusion":  # same for both arms: no calibration pass inside the measured step
        task.model.diffusion.latent_scale.fill_(1.0)
    dev = task.device
    gc.collect()
    rss_before = common.current_rss_mib()
    can_reset = common.reset_peak_rss()
    common.cuda_reset_peak(dev)
    cuda_before = torch.cuda.memory_allocated() / 2**20 if dev.type == "cuda" else None
    with common.Stopwatch(dev) as sw:
        res = task.train(None, RoundPlan(stage, 0, epochs=1, seed=0, planned_epochs=1))
    h = res.history[0]
    return {"size": p["size"], "batch": b, "stage": stage, "dp": bool(p["dp"]), "device": str(dev),
            "train_cases": task.data.num_train, "steps": h["steps"], "samples": h["samples"],
            "step_seconds_first": sw.wall, "trainable_parameters": count_parameters(getattr(task.model, stage)),
            "rss_after_imports_mib": rss_imports, "rss_before_step_mib": rss_before,
            "peak_rss_mib": common.peak_rss_mib(), "peak_rss_is_per_step": can_reset,
            "cuda_allocated_before_mib": cuda_before, "cuda_max_allocated_mib": common.cuda_peak_mib(dev)}


def _fit(points: list[tuple[int, float]]) -> dict | None:
    """Least-squares line peak = a + b * batch."""
    if len(points) < 2:
        return None
    xs, ys = [float(x) for x, _ in points], [float(y) for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return {"intercept_mib": my - slope * mx, "mib_per_sample": slope}


def _max_batch(fit: dict | None, budget_gib: float) -> int | None:
    if not fit or fit["mib_per_sample"] <= 0:
        return None
    return max(0, int((budget_gib * 1024 - fit["intercept_mib"]) // fit["mib_per_sample"]))


def bench_memory(args, device: str, work: Path, machine: dict) -> dict:
    from addiff_core.synth import write_synthetic_sites

    sizes = common.parse_list(args.mem_sizes)
    batches = common.parse_list(args.mem_batches)
    stages = common.parse_list(args.mem_stages, str)
    runs = []
    for size in sizes:
        files = write_synthetic_sites(work / f"mem{size}", n_sites=1, cases_per_site=max(batches), size=size,
                                      seed=args.seed)
        for stage in stages:
            for b in batches:
                for dp in (False, True):
                    payload = {"task": "memory", "site_file": str(files[0]), "size": size, "batch": b, "stage": stage,
                               "dp": dp, "device": device,
                               "state_dir": str(work / "mem_state" / f"{size}_{stage}_{b}_{int(dp)}"),
                               "threads": args.threads, "grad_sample_mode": args.grad_sample_mode}
                    r = common.run_child(SCRIPT, payload)
                    runs.append(r)
                    progress(f"  memory {size}^3 {stage} batch {b} {'DP' if dp else 'no DP'}: peak RSS "
                             f"{r['peak_rss_mib']:.0f} MiB (before step {r['rss_before_step_mib']:.0f})"
                             + (f", CUDA {r['cuda_max_allocated_mib']:.0f} MiB" if r.get("cuda_max_allocated_mib") else ""))
    cuda = device.startswith("cuda")
    key = "cuda_max_allocated_mib" if cuda else "peak_rss_mib"
    budgets = {"machine_ram": machine.get("memory_total_gib") or 0.0, "24GiB": 24.0, "80GiB": 80.0}
    summary = []
    for size in sizes:
        for stage in stages:
            for dp in (False, True):
                pts = [(r["batch"], r[key]) for r in runs if r["size"] == size and r["stage"] == stage and r["dp"] == dp
                       and r.get(key) is not None]
                fit = _fit(pts)
                params = next((r["trainable_parameters"] for r in runs if r["size"] == size and r["stage"] == stage), 0)
                summary.append({"size": size, "stage": stage, "dp": dp, "measure": key, "fit": fit,
                                "grad_sample_mib_per_sample_theory": params * 4 / 2**20 if dp else 0.0,
                                "max_batch": {k: _max_batch(fit, v) for k, v in budgets.items() if v}})
    return {"device": device, "measure": key, "budgets_gib": budgets, "runs": runs, "fits": summary}


# --------------------------------------------------------------------------------------------
# utility: held-out MAE per epsilon
# --------------------------------------------------------------------------------------------
MAE_KEYS = ("mae_gy", "mae_pct_rx", "openkbp_dvh_score", "mean_isodose_dice", "gamma_pass_rate")


def bench_utility(args, device: str, work: Path, checkpoint=None) -> dict:
    import numpy as np

    from addiff_core.config import load_site_config
    from addiff_core.site_task import SiteTask
    from addiff_core.round_plan import RoundPlan
    from addiff_core.synth import write_synthetic_sites
    from addiff_core.training import evaluate

    name, cfg = common.bench_model_config(args.mae_grid)
    files = write_synthetic_sites(work / "utility", n_sites=args.sites, cases_per_site=args.cases, size=args.mae_grid,
                                  seed=args.seed)
    sites = [dataclasses.replace(load_site_config(f), device=device) for f in files]
    epsilons = [float(e) for e in common.parse_list(args.epsilons, str)]
    out = {"grid": args.mae_grid, "config_name": name, "device": device, "sites": len(sites),
           "cases_per_site": args.cases, "max_grad_norm": args.max_grad_norm, "eval_sample_steps": cfg.sample_steps,
           "kinds": {}}
    for kind in common.parse_list(args.kinds, str):
        kcfg = dataclasses.replace(cfg, kind=kind)
        stages = ([("vae", args.vae_epochs), ("diffusion", args.diffusion_epochs)] if kind == "diffusion"
                  else [("unet", args.vae_epochs + args.diffusion_epochs)])
        planned = sum(e for _, e in stages)
        rows = []
        for eps in epsilons:
            per_site, cases, t_train, t_cpu = {}, [], 0.0, 0.0
            for site in sites:
                tag = "inf" if math.isinf(eps) else f"{eps:g}"
                s = dataclasses.replace(site, privacy=_privacy(eps, max_grad_norm=args.max_grad_norm,
                                                                        mode=args.grad_sample_mode),
                                        state_dir=work / "utility_state" / kind / tag / site.name,
                                        training=dataclasses.replace(site.training, batch_size=args.batch_size))
                task = SiteTask(s, kcfg)
                metrics, steps = {}, 0
                for k, (stage, epochs) in enumerate(stages):
                    if epochs <= 0:
                        continue
                    res = task.train(None, RoundPlan(stage, k, epochs=epochs, seed=s.training.seed,
                                                     planned_epochs=planned))
                    metrics = res.metrics
                    t_train += sum(h["seconds"] for h in res.history)
                    t_cpu += sum(h.get("cpu_seconds", 0.0) for h in res.history)
                    steps += int(sum(h["steps"] for h in res.history))
                ev = evaluate(task.model, task.data.heldout, kcfg, task.device, seed=args.seed, gamma=not args.smoke,
                              progress=False)
                per_site[site.name] = {"train_cases": task.data.num_train, "heldout_cases": ev["num_cases"],
                                       "optimizer_steps": steps,
                                       "epsilon_spent": metrics.get("epsilon") if metrics.get("dp_enabled") else None,
                                       "delta": metrics.get("delta"), "noise_multiplier": metrics.get("noise_multiplier"),
                                       **{k: ev["mean"].get(k) for k in MAE_KEYS}}
                cases += [{k: c.get(k) for k in MAE_KEYS} for c in ev["cases"]]
            overall = {k: float(np.nanmean([c[k] for c in cases]))
                       if any(c[k] is not None and np.isfinite(c[k]) for c in cases) else None for k in MAE_KEYS}
            sig = [v["noise_multiplier"] for v in per_site.values() if v["noise_multiplier"] is not None]
            row = {"epsilon": None if math.isinf(eps) else eps, "epsilon_label": "inf" if math.isinf(eps) else f"{eps:g}",
                   "dp_enabled": not math.isinf(eps), "per_site": per_site, "overall_mean_over_cases": overall,
                   "site_mean_mae_gy": float(np.mean([v["mae_gy"] for v in per_site.values()])),
                   "noise_multiplier": statistics.fmean(sig) if sig else None,
                   "train_seconds": t_train, "train_cpu_seconds": t_cpu}
            rows.append(row)
            out["kinds"][kind] = {"stages": [{"stage": s, "epochs": e} for s, e in stages], "planned_epochs": planned,
                                  "batch_size": args.batch_size, "rows": rows}
            if checkpoint is not None:
                checkpoint(out)
            progress(f"  utility {kind} eps={row['epsilon_label']}: held-out MAE {overall['mae_gy']:.2f} Gy "
                     f"(sigma {row['noise_multiplier'] if sig else 0:.2f}, train {t_train:.0f} s)")
    return out


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def summary_lines(res: dict) -> list[str]:
    """A few plain sentences with the headline numbers (top of the Markdown)."""
    lines = []
    st = res.get("step_time")
    if st and st["stages"]:
        parts = [f"{k} {v['ratio']['wall_per_step']['median']:.2f}x" for k, v in st["stages"].items()]
        worst = max(v["ratio"]["wall_per_step"]["median"] for v in st["stages"].values())
        lines.append(f"* **Step time**, DP / no DP per step at {st['grid']}^3: {', '.join(parts)} "
                     f"({'within' if worst <= 3.0 else 'above'} the 3x aim).")
    mem = res.get("memory")
    if mem and mem["fits"]:
        by = {(f["size"], f["stage"], f["dp"]): f for f in mem["fits"]}
        for size in sorted({f["size"] for f in mem["fits"]}):
            bits = []
            for stage in sorted({f["stage"] for f in mem["fits"] if f["size"] == size}):
                dp, nodp = by.get((size, stage, True)), by.get((size, stage, False))
                if not dp or not dp["fit"] or not nodp or not nodp["fit"]:
                    continue
                extra = dp["fit"]["mib_per_sample"] - nodp["fit"]["mib_per_sample"]
                fit80 = dp["max_batch"].get("80GiB")
                bits.append(f"{stage} {dp['fit']['mib_per_sample']:.0f} MiB per sample with DP vs "
                            f"{nodp['fit']['mib_per_sample']:.0f} without (per-sample gradients: +{extra:.0f} MiB per "
                            f"sample; batch <= {dp['max_batch'].get('machine_ram')} in this machine's RAM, "
                            f"~{fit80} in 80 GiB)")
            if bits:
                lines.append(f"* **Memory at {size}^3**: " + "; ".join(bits) + ".")
    ut = res.get("utility")
    if ut:
        for kind, k in ut["kinds"].items():
            maes = ", ".join(f"eps {r['epsilon_label']}: {r['overall_mean_over_cases']['mae_gy']:.2f}"
                             for r in k["rows"])
            lines.append(f"* **Utility** ({kind}, held-out MAE in Gy): {maes}.")
    return (["## Summary", ""] + lines + [""]) if lines else []


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"# DP bench ({'smoke run' if res['smoke'] else 'full run'})", "",
           f"Written by `python bench/dp_bench.py{' --smoke' if res['smoke'] else ''}` on {res['created']} in "
           f"{res['wall_seconds'] / 60:.1f} min. Machine: {common.machine_line(m)}.", "",
           *(["**Partial result: the run stopped before every section was measured.**", ""]
             if not res.get("complete", True) else []),
           "Sample-level DP with Opacus DP-SGD (per-sample gradients, clipping, Gaussian noise, Poisson sampling) "
           "through `SiteTask`, as a site runs it. The machine may be shared with other jobs: wall times are noisy, "
           "which is why DP and non-DP epochs are interleaved and CPU time is given as well.", ""]
    out += summary_lines(res)
    st = res.get("step_time")
    if st:
        out += ["## Time per training step, DP vs no DP", "",
                f"{st['grid']}^3 ({st['config_name']}), batch {st['batch_size']} (DP: Poisson-sampled, same mean), "
                f"noise multiplier {st['noise_multiplier']}, {res['settings']['reps']} interleaved repetitions after a "
                "warm-up. Ratio = median over repetitions of DP epoch / adjacent non-DP epoch, per step. "
                "Aim: <= 3x on this CPU.", ""]
        rows = []
        for stage, s in st["stages"].items():
            rows.append([stage, f"{s['trainable_parameters']:,}", s["steps_per_epoch"],
                         s["no_dp"]["wall_s_per_step"]["median"] * 1e3, s["dp"]["wall_s_per_step"]["median"] * 1e3,
                         f"**{s['ratio']['wall_per_step']['median']:.2f}x**",
                         f"{s['ratio']['cpu_per_step']['median']:.2f}x", f"{s['ratio']['wall_per_sample']['median']:.2f}x",
                         f"{s['dp']['mean_batch']:.2f}", "yes" if s["meets_3x_aim"] else "**no**"])
        out += [common.md_table(["stage", "trainable params", "steps/epoch", "no DP ms/step", "DP ms/step",
                                 "DP/no DP (wall)", "(CPU time)", "(per sample)", "DP mean batch", "<= 3x"], rows, nd=0), ""]
        other = res.get("step_time_other_modes") or {}
        if other:
            mode = res["settings"].get("grad_sample_mode") or "functorch"
            out += [f"Per-sample gradient mode above: Opacus `{mode}` (the site-file default "
                    "`privacy.grad_sample_mode`). Other modes, same benchmark (see `source` in the JSON):", ""]
            rows = [[stage, f"`{m}`", o["stages"][stage]["no_dp"]["wall_s_per_step"]["median"] * 1e3,
                     o["stages"][stage]["dp"]["wall_s_per_step"]["median"] * 1e3,
                     f"{o['stages'][stage]['ratio']['wall_per_step']['median']:.2f}x",
                     f"{st['stages'][stage]['ratio']['wall_per_step']['median']:.2f}x" if stage in st["stages"] else "-"]
                    for m, o in other.items() for stage in o["stages"]]
            out += [common.md_table(["stage", "mode", "no DP ms/step", "DP ms/step", "DP/no DP (wall)",
                                     f"`{mode}` DP/no DP"], rows, nd=0), ""]
    mem = res.get("memory")
    if mem:
        meas = "CUDA max allocated" if mem["measure"].startswith("cuda") else "peak resident set (whole process)"
        out += ["## Memory of one training step: what the per-sample gradients cost", "",
                f"One child process per row; {meas} during one optimizer step of exactly `batch` samples "
                f"(model: 32^3 `configs/demo.yaml`, 64^3 the scaled 64 config of `bench/common.py`). "
                "'DP extra' = DP peak - non-DP peak. The theoretical per-sample gradient store is "
                "4 bytes x trainable parameters per sample (Opacus `grad_sample`); computing them also needs "
                "per-sample activations and, in the `hooks` mode, an unfolded copy of each conv input (im2col, "
                "27x the activation), which is what dominates at full resolution.", ""]
        rows = []
        runs = mem["runs"]
        key = mem["measure"]
        for r in runs:
            if r["dp"]:
                continue
            twin = next((x for x in runs if x["dp"] and x["size"] == r["size"] and x["stage"] == r["stage"]
                         and x["batch"] == r["batch"]), None)
            rows.append([f"{r['size']}^3", r["stage"], r["batch"], f"{r['trainable_parameters']:,}",
                         r[key], twin[key] if twin else None,
                         (twin[key] - r[key]) if twin else None,
                         r["trainable_parameters"] * 4 * r["batch"] / 2**20])
        out += [common.md_table(["grid", "stage", "batch", "trainable params", "no DP MiB", "DP MiB", "DP extra MiB",
                                 "grad_sample theory MiB"], rows, nd=0), ""]
        b = mem["budgets_gib"]
        frow = []
        for f in mem["fits"]:
            fit = f["fit"]
            frow.append([f"{f['size']}^3", f["stage"], "DP" if f["dp"] else "no DP",
                         fit["mib_per_sample"] if fit else None, fit["intercept_mib"] if fit else None,
                         f["max_batch"].get("machine_ram"), f["max_batch"].get("24GiB"), f["max_batch"].get("80GiB")])
        out += ["Linear fit peak = fixed + per-sample x batch, and the largest batch that would fit "
                f"(this machine's {b.get('machine_ram')} GiB RAM, a 24 GiB and an 80 GiB GPU; an extrapolation from "
                "CPU resident memory, which includes ~0.4-0.6 GiB of torch runtime; a GPU's allocator and kernels "
                "differ, so treat GPU numbers as a first estimate and measure with `--device cuda`):", "",
                common.md_table(["grid", "stage", "", "MiB / sample", "fixed MiB", "max batch (RAM)",
                                 "max batch (24 GiB)", "max batch (80 GiB)"], frow, nd=0), ""]
    ut = res.get("utility")
    if ut:
        out += ["## Utility: held-out MAE at epsilon = inf, 8, 3, 1 after the same budget", "",
                f"{ut['sites']} synthetic sites x {ut['cases_per_site']} cases at {ut['grid']}^3 ({ut['config_name']}); "
                "every site trains its own model locally on its training cases (no federation), the DP noise "
                "calibrated once for the whole planned budget, delta = 1/(10 n), clipping norm "
                f"{ut['max_grad_norm']}; evaluation on each site's held-out cases with {ut['eval_sample_steps']} "
                "DDIM steps. MAE in Gy on the CT grid, mean over all held-out cases (per site in the JSON).", ""]
        for kind, k in ut["kinds"].items():
            budget = " + ".join(f"{s['epochs']} {s['stage']}" for s in k["stages"])
            rows = []
            for r in k["rows"]:
                eps_spent = [v["epsilon_spent"] for v in r["per_site"].values() if v["epsilon_spent"] is not None]
                rows.append([r["epsilon_label"], r["noise_multiplier"],
                             max(eps_spent) if eps_spent else None, r["overall_mean_over_cases"]["mae_gy"],
                             r["overall_mean_over_cases"]["mae_pct_rx"],
                             " / ".join(f"{v['mae_gy']:.2f}" for v in r["per_site"].values()), r["train_seconds"]])
            out += [f"**{kind}** ({budget} epochs, batch {k['batch_size']}):", "",
                    common.md_table(["epsilon", "noise multiplier", "epsilon spent", "MAE Gy", "MAE % Rx",
                                     "MAE Gy per site", "train s (all sites)"], rows), ""]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repetition (seconds)")
    p.add_argument("--out", default=str(common.DEFAULT_OUT), help="folder for dp_bench.json / .md")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--batch-size", type=int, default=2, help="batch size of the timing and utility runs")
    p.add_argument("--reps", type=int, default=None, help="interleaved DP/no-DP epochs per stage (default 6)")
    p.add_argument("--timing-grid", type=int, default=None, help="default 32")
    p.add_argument("--timing-cases", type=int, default=None, help="cases of the timing site (default 16)")
    p.add_argument("--timing-stages", default=None, help="default vae,diffusion,unet")
    p.add_argument("--mem-sizes", default=None, help="grids of the memory runs (default 32,64)")
    p.add_argument("--mem-batches", default=None, help="batch sizes of the memory runs (default 1,2,4)")
    p.add_argument("--mem-stages", default=None, help="stages of the memory runs (default vae,diffusion)")
    p.add_argument("--epsilons", default=None, help="default inf,8,3,1 (inf = DP off)")
    p.add_argument("--kinds", default=None, help="models of the utility runs (default diffusion,unet; smoke: diffusion)")
    p.add_argument("--sites", type=int, default=None, help="synthetic sites of the utility runs (default 3)")
    p.add_argument("--cases", type=int, default=None, help="cases per site (default 8)")
    p.add_argument("--mae-grid", type=int, default=None, help="default 32")
    p.add_argument("--vae-epochs", type=int, default=None, help="default 10 (U-Net: vae + diffusion epochs)")
    p.add_argument("--diffusion-epochs", type=int, default=None, help="default 10")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-utility", action="store_true")
    p.add_argument("--grad-sample-mode", choices=("microbatch", "functorch", "hooks"), default=None,
                   help="Opacus per-sample gradient mode (default: the site-file default, functorch)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); 1 is steadier on a shared machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--rewrite-md", action="store_true", help="only re-render OUT/dp_bench.md from OUT/dp_bench.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def _defaults(args) -> None:
    s = args.smoke
    d = dict(reps=1 if s else 6, timing_grid=16 if s else 32, timing_cases=3 if s else 16,
             timing_stages="vae,diffusion" if s else "vae,diffusion,unet", mem_sizes="16" if s else "32,64",
             mem_batches="1" if s else "1,2,4", mem_stages="vae" if s else "vae,diffusion",
             epsilons="inf,8" if s else "inf,8,3,1", kinds="diffusion" if s else "diffusion,unet", sites=1 if s else 3, cases=3 if s else 8,
             mae_grid=16 if s else 32, vae_epochs=1 if s else 10, diffusion_epochs=1 if s else 10)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.child is not None:
        common.child_result(_child_memory(json.loads(args.child)))
        return {}
    if args.rewrite_md:
        res = json.loads((Path(args.out) / "dp_bench.json").read_text())
        common.write_text(Path(args.out) / "dp_bench.md", markdown(res))
        return res
    _defaults(args)
    common.quiet_warnings()
    common.apply_threads(args.threads)
    import logging

    core_log = logging.getLogger("addiff_core")
    old_level = core_log.level
    core_log.setLevel(logging.WARNING)
    t_start = time.perf_counter()
    device = common.resolve_devices(args.device)[0]
    machine = common.machine_info(device)
    progress(f"DP bench on {device}; {machine['cpu_model']}, {machine['usable_cpus']} CPU(s); "
             f"load average {machine['loadavg_start']}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="addiff_dp_bench_"))
    tmp.mkdir(parents=True, exist_ok=True)
    result: dict = {"bench": "dp_bench", "issue": 5, "created": common.now_iso(), "smoke": args.smoke,
                    "argv": sys.argv[1:] if argv is None else list(argv), "machine": machine,
                    "settings": {k: v for k, v in vars(args).items() if k != "child"}}
    sections: dict = {}

    def save(complete: bool) -> None:
        """Write what is measured so far (a killed run still leaves its finished sections)."""
        machine["loadavg_end"] = common.loadavg()
        result["complete"] = complete
        result["section_seconds"] = sections
        result["wall_seconds"] = time.perf_counter() - t_start
        common.write_json(out_dir / "dp_bench.json", result)
        common.write_text(out_dir / "dp_bench.md", markdown(result))

    try:
        if not args.skip_timing:
            progress("step time: DP vs no DP, interleaved")
            t0 = time.perf_counter()
            with common.epoch_cpu_time():
                result["step_time"] = bench_step_time(args, device, tmp)
            sections["step_time"] = time.perf_counter() - t0
            save(False)
        if not args.skip_memory:
            progress("memory of one step: one child process per configuration")
            t0 = time.perf_counter()
            result["memory"] = bench_memory(args, device, tmp, machine)
            sections["memory"] = time.perf_counter() - t0
            save(False)
        if not args.skip_utility:
            progress("utility: held-out MAE per epsilon")
            t0 = time.perf_counter()
            with common.epoch_cpu_time():
                def partial(ut: dict) -> None:
                    result["utility"] = ut
                    save(False)

                result["utility"] = bench_utility(args, device, tmp, checkpoint=partial)
            sections["utility"] = time.perf_counter() - t0
    finally:
        core_log.setLevel(old_level)
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    save(True)
    progress(f"wrote {out_dir / 'dp_bench.json'} and {out_dir / 'dp_bench.md'} ({result['wall_seconds'] / 60:.1f} min)")
    return result


if __name__ == "__main__":
    main()
