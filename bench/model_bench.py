"""Model bench (issue 3): prediction time per case, peak memory, parameter counts, and held-out
MAE of ADDiff-Dose vs the U-Net baseline after the same training budget.

    python bench/model_bench.py                  # full run (~10-15 min on a 2-core CPU)
    python bench/model_bench.py --smoke          # tiny sizes, 1 repetition (the test uses this)
    python bench/model_bench.py --device cuda --out bench/results/gpu   # on a GPU machine

Writes ``OUT/model_bench.json`` and ``OUT/model_bench.md``. What is measured:

* Prediction, per grid size (default 32, 64, 128; configs in ``common.bench_model_config``), in
  one fresh child process per size (so the sizes' memory peaks do not mask each other), with
  untrained seeded weights saved as a real checkpoint:
  - ``predict``: ``addiff_core.local.predict_case`` = the whole ``addiff predict`` path after the
    process has started (load + verify checkpoint, check + load case, preprocess, DDIM sampling
    with the config's default steps, decode, map back to the CT grid, write NIfTI + DVH tables);
  - ``sample``: ``diffusion.sample`` alone (condition encoder + DDIM loop + VAE decode), and its
    parts ``condition`` and ``decode``; ``preprocess``, ``map_back`` and ``load_model`` as well;
  - ``cli``: the ``addiff predict`` command in a new process (includes Python/torch start-up);
  - peak resident memory (VmHWM / ru_maxrss) during one ``predict_case`` and during ``sample``,
    and ``torch.cuda.max_memory_allocated`` on CUDA.
  One untimed warm-up prediction first; then ``--reps`` repetitions, ``predict`` interleaved with
  the component timings. Medians and minima are reported (the machine may be shared).
* MAE: ``--mae-sites`` synthetic hospitals x ``--mae-cases`` cases at 32^3 (demo.yaml), the
  sites' own held-out split (25 %). Pooled training over all sites' training cases, the same
  number of optimizer steps for both models: diffusion = VAE epochs + diffusion epochs, U-Net =
  the same total epochs (batch 2, AdamW 2e-4). Per-site held-out MAE in Gy on each case's CT
  grid (``training.evaluate``), plus a constant-dose guess (the training cases' mean normalised
  dose inside the body, times the case's prescription).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import progress  # noqa: E402

SCRIPT = Path(__file__).resolve()


# --------------------------------------------------------------------------------------------
# prediction timing (child process, one per grid size)
# --------------------------------------------------------------------------------------------
def _child_predict(p: dict) -> dict:
    common.quiet_warnings()
    common.apply_threads(p.get("threads"))
    import torch

    from addiff_core import diffusion as diff
    from addiff_core.case_io import load_case
    from addiff_core.checks import check_case
    from addiff_core.config import resolve_device
    from addiff_core.predict import load_model, predict_case
    from addiff_core.preprocessing import case_to_sample, dose_to_ct_grid

    rss_imports = common.current_rss_mib()
    dev = resolve_device(p["device"])
    ckpt = Path(p["checkpoint"])
    cases = [Path(c) for c in p["cases"]]
    out = Path(p["out_dir"])
    can_reset = common.reset_peak_rss()

    # warm-up (not timed): first-call allocations, oneDNN/cuDNN kernel selection. force: untrained
    # weights, whose doses predict's plausibility check would refuse (speed only)
    predict_case(ckpt, cases[0], out / "warmup", device=p["device"], force=True)
    parts = ("load_model", "case_check", "preprocess", "sample", "map_back")
    times: dict[str, list[float]] = {k: [] for k in ("predict", *parts, "condition", "decode", "remainder")}
    cpu: dict[str, list[float]] = {"predict": [], "sample": []}
    peak_predict, peak_sample, rss_before = [], [], []
    cuda_predict, cuda_sample = [], []
    for r in range(int(p["reps"])):
        case_dir = cases[r % len(cases)]
        gc.collect()
        rss_before.append(common.current_rss_mib())
        common.reset_peak_rss()
        common.cuda_reset_peak(dev)
        with common.Stopwatch(dev) as sw:
            predict_case(ckpt, case_dir, out / f"rep{r}", device=p["device"], force=True)
        times["predict"].append(sw.wall)
        cpu["predict"].append(sw.cpu)
        peak_predict.append(common.peak_rss_mib())
        cuda_predict.append(common.cuda_peak_mib(dev))

        # the same work in parts, on a model loaded here
        with common.Stopwatch(dev) as sw:
            model, cfg, _ = load_model(ckpt, dev)
        times["load_model"].append(sw.wall)
        with common.Stopwatch(dev) as sw:
            check_case(case_dir)
        times["case_check"].append(sw.wall)
        with common.Stopwatch(dev) as sw:
            case = load_case(case_dir)
            sample, spec = case_to_sample(case, cfg.grid)
            batch = {k: v[None].to(dev) for k, v in sample.items()}
        times["preprocess"].append(sw.wall)
        gc.collect()
        common.reset_peak_rss()
        common.cuda_reset_peak(dev)
        with torch.no_grad():
            with common.Stopwatch(dev) as sw:
                mean, _ = diff.sample(model, batch, cfg, seed=r)
            times["sample"].append(sw.wall)
            cpu["sample"].append(sw.cpu)
            peak_sample.append(common.peak_rss_mib())
            cuda_sample.append(common.cuda_peak_mib(dev))
            with common.Stopwatch(dev) as sw:
                model.diffusion.cond(batch)
            times["condition"].append(sw.wall)
            z = torch.randn((1, cfg.latent_channels) + (cfg.latent_size,) * 3, device=dev)
            with common.Stopwatch(dev) as sw:
                diff.decode_latent(model, z, batch)
            times["decode"].append(sw.wall)
        with common.Stopwatch(dev) as sw:
            dose_to_ct_grid(mean[0, 0], float(case.plan.max_prescription), spec, case.ct)
        times["map_back"].append(sw.wall)
        # what predict_case does besides the parts above: NIfTI writing and the DVH tables
        times["remainder"].append(max(times["predict"][-1] - sum(times[k][-1] for k in parts), 0.0))
        del model, batch, sample, mean, z
    return {
        "device": str(dev),
        "seconds": {k: common.summarize(v) for k, v in times.items()},
        "cpu_seconds": {k: common.summarize(v) for k, v in cpu.items()},
        "rss_after_imports_mib": rss_imports,
        "rss_before_predict_mib": max(rss_before),
        "peak_rss_predict_mib": max(peak_predict),
        "peak_rss_sample_mib": max(peak_sample),
        "peak_rss_is_per_call": can_reset,
        "peak_rss_process_mib": common.peak_rss_mib() if not can_reset else None,
        "cuda_max_allocated_predict_mib": max(cuda_predict) if cuda_predict[0] is not None else None,
        "cuda_max_allocated_sample_mib": max(cuda_sample) if cuda_sample[0] is not None else None,
    }


def _cli_seconds(ckpt: Path, case_dir: Path, out: Path, device: str, reps: int, threads: int | None = None
                 ) -> dict | None:
    """``addiff predict`` as a user runs it: a new Python process (start-up and imports included)."""
    import os

    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    vals = []
    for r in range(reps):
        cmd = [sys.executable, "-c", "import sys; from addiff_core.cli import main; sys.exit(main())", "predict",
               "--checkpoint", str(ckpt), "--case", str(case_dir), "--out", str(out / f"cli{r}"), "--device", device,
               "--force"]  # untrained weights (see _child_predict)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(common.REPO), env=env)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"addiff predict failed: {proc.stderr.strip()[-800:]}")
        vals.append(dt)
    return common.summarize(vals)


def bench_prediction(size: int, device: str, reps: int, cli_reps: int, work: Path, seed: int,
                     threads: int | None = None) -> dict:
    import torch

    from addiff_core.case_io import list_cases
    from addiff_core.checkpoint import save_checkpoint
    from addiff_core.models import build_model
    from addiff_core.synth import write_synthetic_sites

    name, cfg = common.bench_model_config(size)
    root = work / f"predict{size}"
    if not (root / "hospital_a" / "cases").is_dir():
        write_synthetic_sites(root, n_sites=1, cases_per_site=2, size=size, seed=seed)
    cases = list_cases(root / "hospital_a" / "cases")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg)
    ckpt = save_checkpoint(work / f"untrained_{size}.pt", model.state_dict(), cfg, {"what": "untrained bench weights"})
    del model
    params = common.parameter_counts(cfg)
    progress(f"predict {size}^3 ({name}, {cfg.sample_steps} DDIM steps, latent {cfg.latent_size}^3) on {device}: "
             f"{reps} rep(s) in a child process")
    res = common.run_child(SCRIPT, {"task": "predict", "checkpoint": str(ckpt), "cases": [str(c) for c in cases],
                                    "reps": reps, "device": device, "out_dir": str(work / f"out{size}_{device}"),
                                    "threads": threads})
    cli = None
    if cli_reps > 0:
        cli = _cli_seconds(ckpt, cases[0], work / f"out{size}_{device}", device, cli_reps, threads)
    best, med = res["seconds"]["predict"]["min"], res["seconds"]["predict"]["median"]
    progress(f"  {size}^3: predict {best:.2f} s/case best of {reps} (median {med:.2f}), sample "
             f"{res['seconds']['sample']['min']:.2f} s best, peak RSS {res['peak_rss_predict_mib']:.0f} MiB"
             + (f", CLI {cli['median']:.2f} s" if cli else ""))
    import SimpleITK as sitk

    ct_size = list(sitk.ReadImage(str(cases[0] / "ct.nii.gz")).GetSize()) if (cases[0] / "ct.nii.gz").exists() else None
    return {"grid": size, "config_name": name, "model_config": common.config_summary(cfg),
            "sample_steps": cfg.sample_steps, "latent_size": cfg.latent_size, "ct_size_xyz": ct_size,
            "parameters": params, **res, "cli_seconds": cli,
            "predict_best_s": best, "predict_median_s": med, "sample_best_s": res["seconds"]["sample"]["min"],
            "sample_median_s": res["seconds"]["sample"]["median"],
            "within_gdp_hmm_limit": best <= common.REFERENCE_SECONDS["gdp_hmm_challenge_limit_s"]}


# --------------------------------------------------------------------------------------------
# MAE: diffusion vs U-Net after the same budget (in this process)
# --------------------------------------------------------------------------------------------
def _constant_model(level: float):
    import torch

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("level", torch.tensor(float(level)))

        def forward(self, batch):
            return self.level * batch["body"].float()

    class ConstantDose(torch.nn.Module):
        kind = "unet"

        def __init__(self):
            super().__init__()
            self.unet = Head()

        def forward(self, batch):  # as DoseRegressor
            return self.unet(batch)

    return ConstantDose()


def pooled_train_set(datas):
    from addiff_core.data import SampleDataset

    return SampleDataset([s for d in datas for s in d.train.samples], [s for d in datas for s in d.train.specs],
                         [s for d in datas for s in d.train.case_ids], [s for d in datas for s in d.train.case_dirs])


def train_pooled(cfg, stages: list[tuple[str, int]], train_set, tcfg, device, seed: int):
    """Train ``build_model(cfg)`` stage by stage on ``train_set``; returns (model, info)."""
    import torch

    from addiff_core.models import build_model
    from addiff_core.training import make_loader, make_optimizer, set_trainable, train_stage_epoch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg).to(device)
    steps, cpu, history = 0, 0.0, []
    t0 = time.perf_counter()
    for stage, epochs in stages:
        if epochs <= 0:
            continue
        set_trainable(model, stage)
        opt = make_optimizer(getattr(model, stage).parameters(), tcfg)
        loader = make_loader(train_set, tcfg.batch_size, shuffle=True, seed=seed)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        for e in range(epochs):
            m = train_stage_epoch(stage, model, loader, opt, cfg, device, generator=gen, grad_clip=tcfg.grad_clip,
                                  progress=False, desc=f"{stage} {e + 1}/{epochs}")
            steps += int(m["steps"])
            cpu += float(m.get("cpu_seconds", 0.0))
            history.append({"stage": stage, "epoch": e + 1, "loss": m["loss"], "seconds": m["seconds"]})
        progress(f"  {cfg.kind}: {stage} {epochs} epoch(s) done, last loss {history[-1]['loss']:.4f}")
    return model, {"seconds": time.perf_counter() - t0, "cpu_seconds": cpu, "optimizer_steps": steps,
                   "final_loss": {s: next(h["loss"] for h in reversed(history) if h["stage"] == s)
                                  for s, e in stages if e > 0},
                   "history": history}


MAE_KEYS = ("mae_gy", "mae_pct_rx", "openkbp_dvh_score", "mean_isodose_dice", "gamma_pass_rate")


def _pick(res: dict) -> dict:
    return {k: res["mean"].get(k) for k in MAE_KEYS}


def bench_mae(args, device: str, work: Path) -> dict:
    import torch

    from addiff_core.config import TrainingConfig, load_site_config
    from addiff_core.data import load_site_data
    from addiff_core.synth import write_synthetic_sites
    from addiff_core.training import evaluate

    size = args.mae_grid
    name, cfg = common.bench_model_config(size)
    root = work / f"mae{size}"
    files = write_synthetic_sites(root, n_sites=args.mae_sites, cases_per_site=args.mae_cases, size=size,
                                  seed=args.seed)
    sites = [load_site_config(f) for f in files]
    datas = [load_site_data(s, cfg.grid) for s in sites]
    train_set = pooled_train_set(datas)
    tcfg = TrainingConfig(batch_size=2, optimizer="adamw", lr=2e-4, seed=args.seed)
    dev = torch.device(device)
    unet_epochs = args.unet_epochs if args.unet_epochs is not None else args.vae_epochs + args.diffusion_epochs
    progress(f"MAE: {len(sites)} sites, {len(train_set)} pooled training cases, held-out "
             f"{[len(d.heldout) for d in datas]}, {size}^3 ({name}); diffusion {args.vae_epochs}+"
             f"{args.diffusion_epochs} epochs vs U-Net {unet_epochs} epochs")

    diff_model, diff_info = train_pooled(cfg, [("vae", args.vae_epochs), ("diffusion", args.diffusion_epochs)],
                                         train_set, tcfg, dev, args.seed)
    unet_cfg = dataclasses.replace(cfg, kind="unet")
    unet_model, unet_info = train_pooled(unet_cfg, [("unet", unet_epochs)], train_set, tcfg, dev, args.seed)

    # constant guess: mean normalised dose inside the body over the training cases
    num = sum(float((s["dose"] * s["body"]).sum()) for s in train_set.samples)
    den = sum(float(s["body"].sum()) for s in train_set.samples)
    level = num / max(den, 1.0)
    const_model = _constant_model(level).to(dev)

    per_site, all_cases = {}, {"diffusion": [], "unet": [], "constant": []}
    eval_seconds = {"diffusion": 0.0, "unet": 0.0, "constant": 0.0}
    for site, data in zip(sites, datas):
        row = {"heldout_cases": len(data.heldout)}
        for label, model, mcfg in (("diffusion", diff_model, cfg), ("unet", unet_model, unet_cfg),
                                   ("constant", const_model, unet_cfg)):
            t0 = time.perf_counter()
            res = evaluate(model, data.heldout, mcfg, dev, seed=args.seed, gamma=not args.smoke, progress=False)
            eval_seconds[label] += time.perf_counter() - t0
            row[label] = _pick(res)
            all_cases[label] += [{k: c.get(k) for k in MAE_KEYS + (common.DVH_CELLS,)} for c in res["cases"]]
        per_site[site.name] = row
        progress(f"  {site.name}: held-out MAE diffusion {row['diffusion']['mae_gy']:.2f} Gy, "
                 f"U-Net {row['unet']['mae_gy']:.2f} Gy, constant {row['constant']['mae_gy']:.2f} Gy")
    # mean over all held-out cases; the DVH score one mean over every DVH cell (OpenKBP)
    overall = {label: common.cohort_overall(rows, MAE_KEYS) for label, rows in all_cases.items()}
    return {
        "grid": size, "config_name": name, "model_config": common.config_summary(cfg), "device": device,
        "sites": len(sites), "cases_per_site": args.mae_cases, "train_cases_pooled": len(train_set),
        "heldout_cases": {s.name: len(d.heldout) for s, d in zip(sites, datas)},
        "training": {"batch_size": tcfg.batch_size, "optimizer": tcfg.optimizer, "lr": tcfg.lr,
                     "lr_schedule": tcfg.lr_schedule, "grad_clip": tcfg.grad_clip, "seed": args.seed},
        "budget": {"diffusion": {"vae_epochs": args.vae_epochs, "diffusion_epochs": args.diffusion_epochs,
                                 "optimizer_steps": diff_info["optimizer_steps"]},
                   "unet": {"epochs": unet_epochs, "optimizer_steps": unet_info["optimizer_steps"]}},
        "training_seconds": {"diffusion": diff_info["seconds"], "unet": unet_info["seconds"]},
        "training_cpu_seconds": {"diffusion": diff_info["cpu_seconds"], "unet": unet_info["cpu_seconds"]},
        "final_loss": {"diffusion": diff_info["final_loss"], "unet": unet_info["final_loss"]},
        "eval_sample_steps": cfg.sample_steps,
        "eval_seconds": eval_seconds,
        "constant_level_normalised": level,
        "per_site": per_site,
        "overall_mean_over_cases": overall,
        "history": {"diffusion": diff_info["history"], "unet": unet_info["history"]},
    }


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    m = res["machine"]
    ref = common.REFERENCE_SECONDS
    out = [f"# Model bench ({'smoke run' if res['smoke'] else 'full run'})", "",
           f"Written by `python bench/model_bench.py{' --smoke' if res['smoke'] else ''}` on {res['created']} "
           f"in {res['wall_seconds'] / 60:.1f} min. Machine: {common.machine_line(m)}.", "",
           *(["**Partial result: the run stopped before every section was measured.**", ""]
             if not res.get("complete", True) else []),
           "Timings: best of the repetitions after one warm-up, median in brackets (all values in the JSON). "
           "The machine is shared with other jobs, which only ever add time, so the best is the closest to the "
           "machine's own speed; CPU seconds (process time, all threads) are given as well.", ""]
    if res.get("prediction"):
        out += ["## Prediction time per case (untrained weights, default DDIM steps of each config)", "",
                f"Reference: paper {ref['paper_rtx4090_s_per_case']} s/case on an RTX 4090; GDP-HMM limit "
                f"{ref['gdp_hmm_challenge_limit_s']} s/case; goal < {ref['goal_h100_128_s']} s on an H100 at 128^3.", ""]
        rows = []
        for e in res["prediction"]:
            s = e["seconds"]

            def bm(k):
                return f"{s[k]['min']:.2f} ({s[k]['median']:.2f})"

            rows.append([f"{e['grid']}^3", e["config_name"], e["device"], str(e["sample_steps"]), bm("predict"),
                         f"{e['cpu_seconds']['predict']['min']:.2f}", bm("sample"),
                         f"{s['sample']['min'] / e['sample_steps']:.3f}",
                         " / ".join(f"{s[k]['min']:.2f}" for k in ("case_check", "preprocess", "condition", "decode",
                                                                   "map_back", "remainder")),
                         f"{e['cli_seconds']['min']:.1f}" if e.get("cli_seconds") else "–",
                         f"{e['peak_rss_predict_mib']:.0f}",
                         f"{e['cuda_max_allocated_predict_mib']:.0f}" if e.get("cuda_max_allocated_predict_mib") else "–",
                         common.fmt(e["within_gdp_hmm_limit"])])
        out += [common.md_table(["grid", "config", "device", "DDIM steps", "predict s", "predict CPU s",
                                 "sample s", "sample s / step", "check / preprocess / condition / decode / map back / "
                                 "files+DVH s", "CLI s", "peak RSS MiB", "CUDA peak MiB", "<= 3 s"], rows), "",
                "`predict` = `addiff_core.local.predict_case` (the `addiff predict` path after start-up: checkpoint, "
                "case check, preprocessing, sampling, decode, map back, NIfTI + DVH files); `sample` = "
                "`diffusion.sample` (condition encoder + DDIM loop + VAE decode; `condition` and `decode` are its "
                "first and last part); `files+DVH` = predict minus the measured parts (NIfTI writing, DVH tables); "
                "`CLI` = `addiff predict` in a new process (Python, torch and Flower imports included). Peak RSS: "
                "resident memory of the whole process (torch runtime included, ~0.5 GiB after imports) during one "
                "`predict_case` call, one child process per size.", "",
                "### Parameters", ""]
        prow = [[f"{e['grid']}^3", e["config_name"], e["parameters"]["vae"], e["parameters"]["condition_encoder"],
                 e["parameters"]["denoiser"], e["parameters"]["diffusion_model_total"], e["parameters"]["unet_baseline"]]
                for e in res["prediction"]]
        out += [common.md_table(["grid", "config", "VAE", "condition encoder", "denoiser", "diffusion total",
                                 "U-Net baseline"], prow), ""]
        out += ["Configs: " + "; ".join(
            f"{e['config_name']}: vae {tuple(e['model_config']['vae_channels'])} ({e['model_config']['downsample']}x, "
            f"latent {e['latent_size']}^3), unet {tuple(e['model_config']['unet_channels'])}, attention "
            f"{tuple(e['model_config']['attention_levels'])}, context {e['model_config']['context_dim']}, "
            f"groups {e['model_config']['norm_groups']}, {e['sample_steps']} steps"
            for e in res["prediction"]) + ".", ""]
    mae = res.get("mae")
    if mae:
        b = mae["budget"]
        out += ["## Held-out MAE after the same training budget", "",
                f"{mae['sites']} synthetic sites x {mae['cases_per_site']} cases at {mae['grid']}^3 "
                f"({mae['config_name']}); pooled training on {mae['train_cases_pooled']} cases, batch "
                f"{mae['training']['batch_size']}, {mae['training']['optimizer']} lr {mae['training']['lr']:g}. "
                f"Diffusion: {b['diffusion']['vae_epochs']} VAE + {b['diffusion']['diffusion_epochs']} diffusion "
                f"epochs ({b['diffusion']['optimizer_steps']} steps, {mae['training_seconds']['diffusion']:.0f} s); "
                f"U-Net: {b['unet']['epochs']} epochs ({b['unet']['optimizer_steps']} steps, "
                f"{mae['training_seconds']['unet']:.0f} s). Evaluation with {mae['eval_sample_steps']} DDIM steps, "
                "MAE in Gy inside the possible-dose mask on each case's CT grid.", ""]
        rows = []
        for site, r in mae["per_site"].items():
            rows.append([site, r["heldout_cases"], r["diffusion"]["mae_gy"], r["unet"]["mae_gy"],
                         r["constant"]["mae_gy"], r["diffusion"]["mae_pct_rx"], r["unet"]["mae_pct_rx"]])
        o = mae["overall_mean_over_cases"]
        rows.append(["**all held-out cases**", sum(mae["heldout_cases"].values()), o["diffusion"]["mae_gy"],
                     o["unet"]["mae_gy"], o["constant"]["mae_gy"], o["diffusion"]["mae_pct_rx"],
                     o["unet"]["mae_pct_rx"]])
        out += [common.md_table(["site", "held-out", "diffusion MAE Gy", "U-Net MAE Gy", "constant MAE Gy",
                                 "diffusion % Rx", "U-Net % Rx"], rows), ""]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repetition, no CLI run (seconds)")
    p.add_argument("--out", default=str(common.DEFAULT_OUT), help="folder for model_bench.json / .md")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N], or a comma list (e.g. cpu,cuda)")
    p.add_argument("--sizes", default=None, help="grid sizes for prediction timing (default 32,64,128)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per size (default 5)")
    p.add_argument("--cli-reps", type=int, default=None, help="'addiff predict' process runs per size (default 1)")
    p.add_argument("--mae-grid", type=int, default=None, help="grid of the MAE comparison (default 32)")
    p.add_argument("--mae-sites", type=int, default=None, help="synthetic sites (default 3)")
    p.add_argument("--mae-cases", type=int, default=None, help="cases per site (default 8)")
    p.add_argument("--vae-epochs", type=int, default=None, help="diffusion model: VAE epochs (default 30)")
    p.add_argument("--diffusion-epochs", type=int, default=None, help="diffusion model: stage-2 epochs (default 30)")
    p.add_argument("--unet-epochs", type=int, default=None, help="U-Net epochs (default: VAE + diffusion epochs)")
    p.add_argument("--skip-predict", action="store_true")
    p.add_argument("--skip-mae", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); 1 is steadier on a shared machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--rewrite-md", action="store_true",
                   help="only re-render OUT/model_bench.md from OUT/model_bench.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def _defaults(args) -> None:
    smoke = args.smoke
    d = dict(sizes="16" if smoke else "32,64,128", reps=1 if smoke else 5, cli_reps=0 if smoke else 1,
             mae_grid=16 if smoke else 32, mae_sites=2 if smoke else 3, mae_cases=3 if smoke else 8,
             vae_epochs=1 if smoke else 30, diffusion_epochs=1 if smoke else 30)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.child is not None:
        payload = json.loads(args.child)
        common.child_result(_child_predict(payload))
        return {}
    if args.rewrite_md:
        res = json.loads((Path(args.out) / "model_bench.json").read_text())
        common.write_text(Path(args.out) / "model_bench.md", markdown(res))
        return res
    _defaults(args)
    common.quiet_warnings()
    common.apply_threads(args.threads)
    t_start = time.perf_counter()
    devices = common.resolve_devices(args.device)
    machine = common.machine_info(",".join(devices))
    progress(f"model bench: devices {devices}; {machine['cpu_model']}, {machine['usable_cpus']} CPU(s); "
             f"load average {machine['loadavg_start']}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="addiff_model_bench_"))
    tmp.mkdir(parents=True, exist_ok=True)
    result: dict = {"bench": "model_bench", "issue": 3, "created": common.now_iso(), "smoke": args.smoke,
                    "argv": sys.argv[1:] if argv is None else list(argv), "machine": machine,
                    "reference_seconds": common.REFERENCE_SECONDS,
                    "settings": {k: v for k, v in vars(args).items() if k != "child"}}

    def save(complete: bool) -> None:
        """Write what is measured so far (a killed run still leaves its finished sections)."""
        machine["loadavg_end"] = common.loadavg()
        result["complete"] = complete
        result["wall_seconds"] = time.perf_counter() - t_start
        common.write_json(out_dir / "model_bench.json", result)
        common.write_text(out_dir / "model_bench.md", markdown(result))

    try:
        if not args.skip_predict:
            result["prediction"] = [bench_prediction(s, dev, args.reps, args.cli_reps, tmp, args.seed, args.threads)
                                    for dev in devices for s in common.parse_list(args.sizes)]
            save(False)
        if not args.skip_mae:
            with common.epoch_cpu_time():
                result["mae"] = bench_mae(args, devices[0], tmp)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    save(True)
    progress(f"wrote {out_dir / 'model_bench.json'} and {out_dir / 'model_bench.md'} "
             f"({result['wall_seconds'] / 60:.1f} min)")
    return result


if __name__ == "__main__":
    main()
