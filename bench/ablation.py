"""ADDiff-Dose design ablation on synthetic 32^3 phantoms, at equal CPU-seconds (issue #11).

Each run trains one model on one synthetic hospital's training cases for a fixed budget of
*process CPU seconds* (``time.process_time``: robust to other load on the machine), then scores
the held-out cases on their CT grids with ``training.evaluate`` (MAE, OpenKBP dose and DVH
scores, isodose Dice, gamma 3%/2mm). ADDiff spends a variant's share of the budget on stage 1 (the
VAE), the rest on stage 2; the U-Net baseline spends the whole budget on itself. With
``--samples N`` (default 4) the ADDiff rows also give the Spearman correlation between the
per-voxel std of N samples and the |error| of their mean (held-out, inside the evaluation region).

Variants (``--variants``; each a set of ModelConfig / TrainingConfig overrides):
  old        the design before issue #11: epsilon prediction, decoder without anatomy, no latent
             dropout, VAE L1 over the whole grid, KL 1e-3, lr 2e-4, 10 DDIM steps, 25 %% of the
             budget on the VAE (the demo's 5 of 20 rounds)
  x0         old + x0 prediction (1 DDIM step)
  anatomy    old + anatomy-aware decoder with latent dropout 0.5
  masked     old + VAE L1 inside the evaluation region
  lr         old + lr 1e-3, KL 1e-6
  split      old + 80 %% of the budget on the VAE
  new        all of the above, constraint hinge off, 1 DDIM step (the defaults of configs/demo.yaml)
  new+hinge  new with the constraint hinge (weight 0.5) and 2 DDIM steps
  v, eps     new with v / epsilon prediction (10 DDIM steps) instead of x0
  w-half, w-double   new with every channel width halved / doubled (VAE, denoiser, condition
             encoder, context); w-vae2, w-den2: only the VAE's / only the others' doubled
  unet       the U-Net baseline, hinge 0.5 (lr 1e-3; ``unet-old``: lr 2e-4; ``unet-nohinge``: no hinge)

    python bench/ablation.py --budgets 60 --seeds 0,1
    python bench/ablation.py --variants new+hinge,unet --budgets 30,120 --seeds 0,1
    python bench/ablation.py --variants new+hinge --seeds 2 --steps-sweep 1,2,5,10 --samples 8

Writes ``bench/results/ablation.json`` (+ ``.md``), merged with earlier rows of other settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from addiff_core.config import load_model_config, load_site_config  # noqa: E402
from addiff_core.data import load_site_data  # noqa: E402
from addiff_core.models import build_model  # noqa: E402
from addiff_core.synth import write_synthetic_sites  # noqa: E402
from addiff_core.training import evaluate, make_loader, make_optimizer, set_trainable, train_stage_epoch  # noqa: E402

OLD = {"prediction_type": "epsilon", "anatomy_decoder": False, "latent_dropout": 0.0, "vae_loss_region": "grid",
       "kl_weight": 1e-3, "sample_steps": 10, "constraint_weight": 0.5}
NEW = {"prediction_type": "x0", "anatomy_decoder": True, "latent_dropout": 0.5, "vae_loss_region": "body",
       "kl_weight": 1e-6, "sample_steps": 1, "constraint_weight": 0.0}  # configs/demo.yaml
OLD_LR, NEW_LR = 2e-4, 1e-3
OLD_SHARE, NEW_SHARE = 0.25, 0.8  # share of the CPU budget on stage 1 (old: 5 of 20 demo rounds)
WIDTHS = {"half": {"vae_channels": (4, 8, 16), "unet_channels": (8, 16), "cond_channels": 4, "context_dim": 16,
                   "norm_groups": 4},
          "double": {"vae_channels": (16, 32, 64), "unet_channels": (32, 64), "cond_channels": 16,
                     "context_dim": 64}}
# name -> (ModelConfig overrides, learning rate, VAE share of the budget)
VARIANTS: dict[str, tuple[dict, float, float]] = {
    "old": (OLD, OLD_LR, OLD_SHARE),
    "x0": ({**OLD, "prediction_type": "x0", "sample_steps": 1}, OLD_LR, OLD_SHARE),
    "anatomy": ({**OLD, "anatomy_decoder": True, "latent_dropout": 0.5}, OLD_LR, OLD_SHARE),
    "masked": ({**OLD, "vae_loss_region": "body"}, OLD_LR, OLD_SHARE),
    "lr": ({**OLD, "kl_weight": 1e-6}, NEW_LR, OLD_SHARE),
    "split": (OLD, OLD_LR, NEW_SHARE),
    "new": (NEW, NEW_LR, NEW_SHARE),
    "new+hinge": ({**NEW, "constraint_weight": 0.5, "sample_steps": 2}, NEW_LR, NEW_SHARE),
    "v": ({**NEW, "prediction_type": "v"}, NEW_LR, NEW_SHARE),
    "eps": ({**NEW, "prediction_type": "epsilon", "sample_steps": 10}, NEW_LR, NEW_SHARE),
    # channel widths around the demo's (VAE 8/16/32, denoiser 16/32, condition 8, context 32)
    "w-half": ({**NEW, **WIDTHS["half"]}, NEW_LR, NEW_SHARE),
    "w-double": ({**NEW, **WIDTHS["double"]}, NEW_LR, NEW_SHARE),
    "w-vae2": ({**NEW, "vae_channels": WIDTHS["double"]["vae_channels"]}, NEW_LR, NEW_SHARE),
    "w-den2": ({**NEW, **{k: v for k, v in WIDTHS["double"].items() if k != "vae_channels"}}, NEW_LR, NEW_SHARE),
    "unet": ({"kind": "unet", "unet_constraint_weight": 0.5}, NEW_LR, 0.0),
    "unet-old": ({"kind": "unet", "unet_constraint_weight": 0.5}, OLD_LR, 0.0),
    "unet-nohinge": ({"kind": "unet", "unet_constraint_weight": 0.0}, NEW_LR, 0.0),
}
METRICS = ("mae_gy", "openkbp_dose_score", "openkbp_dvh_score", "mean_isodose_dice", "gamma_pass_rate",
           "constraint_compliance_pred")


def train_for(model, stage: str, data, cfg, lr: float, cpu_budget: float, seed: int, batch_size: int) -> dict:
    """Train ``stage`` in whole epochs until ``cpu_budget`` process CPU seconds are spent."""
    from addiff_core.config import TrainingConfig

    tcfg = TrainingConfig(lr=lr, batch_size=batch_size)
    set_trainable(model, stage)
    opt = make_optimizer(getattr(model, stage).parameters(), tcfg)
    loader = make_loader(data.train, batch_size, shuffle=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    t0, steps, last = time.process_time(), 0, {}
    while time.process_time() - t0 < cpu_budget:
        last = train_stage_epoch(stage, model, loader, opt, cfg, torch.device("cpu"), generator=gen,
                                 progress=False)
        steps += int(last["steps"])
    return {"steps": steps, "cpu_s": time.process_time() - t0, "final_loss": last.get("loss")}


def run_one(variant: str, budget: float, seed: int, site_file: Path, batch_size: int,
            steps_override: int | None, samples: int = 4, steps_sweep: list[int] | None = None) -> dict:
    overrides, lr, vae_share = VARIANTS[variant]
    site = load_site_config(site_file)
    cfg = dataclasses.replace(load_model_config(common.DEMO_CONFIG), **overrides)
    if steps_override:
        cfg = dataclasses.replace(cfg, sample_steps=steps_override)
    data = load_site_data(site, cfg.grid)
    torch.manual_seed(seed)
    model = build_model(cfg)
    row: dict = {"variant": variant, "budget_cpu_s": budget, "seed": seed, "lr": lr, "vae_share": vae_share,
                 "config": {k: getattr(cfg, k) for k in ("prediction_type", "anatomy_decoder", "latent_dropout",
                                                         "vae_loss_region", "kl_weight", "sample_steps",
                                                         "constraint_weight", "vae_channels", "unet_channels",
                                                         "cond_channels", "context_dim")}}
    if cfg.kind == "unet":
        row["unet"] = train_for(model, "unet", data, cfg, lr, budget, seed, batch_size)
    else:
        row["vae"] = train_for(model, "vae", data, cfg, lr, budget * vae_share, seed, batch_size)
        row["diffusion"] = train_for(model, "diffusion", data, cfg, lr, budget * (1 - vae_share), seed + 1,
                                     batch_size)
    t0 = time.process_time()
    res = evaluate(model, data.heldout, cfg, torch.device("cpu"), seed=seed, progress=False)
    row["eval_cpu_s"] = time.process_time() - t0
    row["heldout"] = {k: res["mean"].get(k) for k in METRICS}
    row["num_heldout"] = res["num_cases"]
    if cfg.kind == "diffusion" and samples > 1:
        row["uncertainty_spearman"] = uncertainty_spearman(model, data.heldout, cfg, samples, seed)
    if cfg.kind == "diffusion" and steps_sweep:  # the same trained model, other DDIM step counts
        row["steps_sweep"] = {}
        for n in steps_sweep:
            t0 = time.process_time()
            r = evaluate(model, data.heldout, cfg, torch.device("cpu"), seed=seed, steps=n, progress=False)
            row["steps_sweep"][str(n)] = {**{k: r["mean"].get(k) for k in METRICS},
                                          "eval_cpu_s": time.process_time() - t0}
    return row


def uncertainty_spearman(model, dataset, cfg, samples: int, seed: int) -> float:
    """Mean over held-out cases of Spearman's rho between the per-voxel std of ``samples``
    samples and the |error| of their mean, inside the evaluation region on the model grid."""
    from scipy.stats import spearmanr

    from addiff_core.training import predict_normalised

    rhos = []
    for i in range(len(dataset)):
        batch = {k: v[None] for k, v in dataset[i].items()}
        mean, std = predict_normalised(model, batch, cfg, seed=seed + i, num_samples=samples)
        inside = batch["body"][0, 0] > 0.5
        err = (mean - batch["dose"])[0, 0][inside].abs().numpy()
        rho = spearmanr(std[0, 0][inside].numpy(), err).statistic
        if np.isfinite(rho):
            rhos.append(float(rho))
    return float(np.mean(rhos)) if rhos else float("nan")


def summarise(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["budget_cpu_s"]), []).append(r)
    out = []
    for (variant, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = []
        for m in METRICS:
            vals = [r["heldout"][m] for r in rs if r["heldout"].get(m) is not None]
            cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if vals else "-")
        rho = [r["uncertainty_spearman"] for r in rs if r.get("uncertainty_spearman") is not None]
        cells.append(f"{np.mean(rho):.2f}" if rho else "-")
        out.append([variant, budget, len(rs), *cells])
    return common.md_table(["variant", "CPU s", "seeds", *METRICS, "std~|err| rho"], out)


def _key(r: dict) -> tuple:
    return r["variant"], r["budget_cpu_s"], r["seed"]


def write_results(out: Path, rows: list[dict], extra: dict) -> None:
    common.write_json(out, {"machine": common.machine_info("cpu"), **extra, "rows": rows, "when": common.now_iso()})
    common.write_text(out.with_suffix(".md"), summarise(rows) + "\n")


def merge(files: list[Path], out: Path) -> int:
    """Rows of ``files`` (later files win for the same variant, budget and seed) into ``out``."""
    rows: dict[tuple, dict] = {}
    extra: dict = {}
    for f in [out, *files] if out.exists() else files:
        d = json.loads(f.read_text())
        extra.update({k: d[k] for k in ("threads", "cases") if k in d})
        rows.update({_key(r): r for r in d.get("rows", [])})
    write_results(out, list(rows.values()), extra)
    print(summarise(list(rows.values())))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="old,x0,anatomy,masked,lr,split,new,new+hinge,unet,unet-nohinge")
    ap.add_argument("--budgets", default="90", help="process CPU seconds of training per run")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--cases", type=int, default=16, help="cases of the synthetic hospital (25%% held out)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--sample-steps", type=int, default=None, help="override DDIM steps of every variant")
    ap.add_argument("--samples", type=int, default=4, help="samples for the uncertainty correlation (1: off)")
    ap.add_argument("--steps-sweep", default="", help="also evaluate ADDiff at these DDIM step counts, e.g. 1,2,5,10")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=None, help="synthetic data folder (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=common.DEFAULT_OUT / "ablation.json")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="only merge the rows of these result files (runs made in parallel) into --out")
    args = ap.parse_args(argv)
    if args.merge is not None:
        return merge(args.merge, args.out)
    common.quiet_warnings()
    common.apply_threads(args.threads)
    data_root = args.data or Path(tempfile.mkdtemp(prefix="addiff-ablation-"))
    site_file = data_root / "hospital_a.yaml"
    if not site_file.exists():
        write_synthetic_sites(data_root, n_sites=1, cases_per_site=args.cases, size=32, seed=11)
    previous = json.loads(args.out.read_text()).get("rows", []) if args.out.exists() else []
    rows = []
    for budget in common.parse_list(args.budgets, float):
        for seed in common.parse_list(args.seeds, int):
            for variant in args.variants.split(","):
                common.progress(f"{variant} budget {budget:.0f} CPU s seed {seed}")
                row = run_one(variant, budget, seed, site_file, args.batch_size, args.sample_steps, args.samples,
                              common.parse_list(args.steps_sweep, int))
                common.progress(f"  -> {row['heldout']}")
                rows.append(row)
                done = {_key(x) for x in rows}
                merged = [r for r in previous if _key(r) not in done] + rows
                write_results(args.out, merged, {"threads": args.threads, "cases": args.cases})
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
