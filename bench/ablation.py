"""ADDiff-Dose design ablation on synthetic 32^3 phantoms, at equal CPU-seconds (issues #11, #24).

Each run trains one model on one synthetic hospital's training cases for a fixed budget of
*process CPU seconds* (``time.process_time``: robust to other load on the machine), then scores
the held-out cases on their CT grids with ``training.evaluate`` (MAE, OpenKBP dose and DVH
scores, isodose Dice, gamma 3%/2mm). ADDiff spends a variant's share of the budget on stage 1 (the
VAE), the rest on stage 2; the U-Net baseline spends the whole budget on itself. With
``--samples N`` (default 4) the ADDiff rows also give the Spearman correlation between the
per-voxel std of N samples and the |error| of their mean (held-out, inside the evaluation
region), and the latent probe of issue #24 (``addiff_core.latent_probe``, N samples): held-out
MAE (model grid, evaluation region, units of the prescription) of the dose decoded from the
sampled latent, z = 0, the reference dose's own latent (oracle) and another case's (shuffled);
oracle / sampled (small: the latent carries the dose), min(zero, shuffled) / sampled (large: the
diffusion decides the prediction) and the spread of the N samples (mean std / mean dose).

Every variant overrides ``configs/demo.yaml`` (the #24 design). Issue #11's rows were measured
on the demo config before #24 (``git show 99ac9f2:configs/demo.yaml``); they name its fields
(``BEFORE24``) so that they still mean what they meant: decoder reading the planning volume,
latent dropout 0.5, VAE 8/16/32 (8^3 x 4 latent), denoiser 16/32 with attention at its coarse
level, uniform training timesteps, no residual latent, no dose L1.

Variants of issue #11 (``--variants``; each a set of ModelConfig overrides, a learning rate and
the VAE's share of the budget):
  old        the design before issue #11: epsilon prediction, decoder without anatomy, no latent
             dropout, VAE L1 over the whole grid, KL 1e-3, lr 2e-4, 10 DDIM steps, 25 %% of the
             budget on the VAE (the demo's 5 of 20 rounds)
  x0         old + x0 prediction (1 DDIM step)
  anatomy    old + anatomy-aware ("planning") decoder with latent dropout 0.5
  masked     old + VAE L1 inside the evaluation region
  lr         old + lr 1e-3, KL 1e-6
  split      old + 80 %% of the budget on the VAE
  new        all of the above, constraint hinge off, 1 DDIM step (the demo before #24)
  new+hinge  new with the constraint hinge (weight 0.5) and 2 DDIM steps
  v, eps     new with v / epsilon prediction (10 DDIM steps) instead of x0
  w-half, w-double   new with every channel width halved / doubled (VAE, denoiser, condition
             encoder, context); w-vae2, w-den2: only the VAE's / only the others' doubled
  unet       the U-Net baseline, hinge 0.5 (lr 1e-3; ``unet-old``: lr 2e-4; ``unet-nohinge``: no hinge)

Variants of issue #24 (lr 1e-3; 15 %% of the budget on the VAE unless said; each of the chain
d24-before .. d24-new adds one step to the one before it):
  d24-before    the design before #24 (= new): planning decoder, latent dropout 0.5, 8^3 x 4
                latent, 2-level denoiser, uniform t, no dose L1; 80 %% on the VAE (its share then)
  d24-blind     + anatomy-blind decoder (decoder_anatomy none), no latent dropout (the paper's
                decoder); 80 %%
  d24-residual  + residual latent (DC-AE), VAE 8/16 (16^3 x 4 latent); still the 2-level
                denoiser 16/32 [F, T], uniform t, no dose L1; 15 %% on the VAE
  d24-3level    + 3-level denoiser 16/32/64, attention [F, F, T]
  d24-tbias     + training timesteps t/T ~ Beta(3, 1) (timestep_bias 3)
  d24-l1        + dose L1 weight 1 (the decoded x0 estimate's L1 beside the latent MSE)
  d24-new       the same with weight 20 = configs/demo.yaml as shipped
  d24-planning  d24-l1 with the planning decoder (does the bypass come back?)
  d24-ct        d24-l1 with a decoder that reads the CT
  d24-8cube     d24-l1 with VAE 8/16/32, 8 latent channels (8^3 x 8 latent: more compression)
  d24-nores     d24-l1 without the residual latent (leave-one-out)
  d24-vae80     d24-l1 with 80 %% of the budget on the VAE (leave-one-out of the share)

    python bench/ablation.py --budgets 60 --seeds 0,1
    python bench/ablation.py --variants new+hinge,unet --budgets 30,120 --seeds 0,1
    python bench/ablation.py --variants new+hinge --seeds 2 --steps-sweep 1,2,5,10 --samples 8
    python bench/ablation.py --variants d24-before,d24-new,unet --budgets 60 --seeds 0,1 \\
        --out bench/results/ablation_24.json

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

# configs/demo.yaml before issue #24 (99ac9f2): the base that issue #11's variants changed
BEFORE24 = {"vae_channels": (8, 16, 32), "latent_channels": 4, "unet_channels": (16, 32),
            "attention_levels": (False, True), "decoder_anatomy": "planning", "latent_dropout": 0.5,
            "residual_latent": False, "timestep_bias": 1.0, "dose_l1_weight": 0.0}
OLD = {**BEFORE24, "prediction_type": "epsilon", "decoder_anatomy": "none", "latent_dropout": 0.0,
       "vae_loss_region": "grid", "kl_weight": 1e-3, "sample_steps": 10, "constraint_weight": 0.5}
NEW = {**BEFORE24, "prediction_type": "x0", "vae_loss_region": "body", "kl_weight": 1e-6, "sample_steps": 1,
       "constraint_weight": 0.0}  # the demo before #24
OLD_LR, NEW_LR = 2e-4, 1e-3
OLD_SHARE, NEW_SHARE = 0.25, 0.8  # share of the CPU budget on stage 1 (old: 5 of 20 demo rounds)
D24_SHARE = 0.15  # the residual VAE starts as a block-average codec and learns its residual fast
WIDTHS = {"half": {"vae_channels": (4, 8, 16), "unet_channels": (8, 16), "cond_channels": 4, "context_dim": 16,
                   "norm_groups": 4},
          "double": {"vae_channels": (16, 32, 64), "unet_channels": (32, 64), "cond_channels": 16,
                     "context_dim": 64}}
# issue #24's chain: each step adds one change to the one before
D24_BLIND = {**NEW, "decoder_anatomy": "none", "latent_dropout": 0.0}
D24_RESIDUAL = {**D24_BLIND, "residual_latent": True, "vae_channels": (8, 16)}
D24_3LEVEL = {**D24_RESIDUAL, "unet_channels": (16, 32, 64), "attention_levels": (False, False, True)}
D24_TBIAS = {**D24_3LEVEL, "timestep_bias": 3.0}
D24_L1 = {**D24_TBIAS, "dose_l1_weight": 1.0}  # the leave-one-out rows below are around this one
D24_NEW = {**D24_TBIAS, "dose_l1_weight": 20.0}  # configs/demo.yaml as shipped (a test checks it)
# name -> (ModelConfig overrides, learning rate, VAE share of the budget)
VARIANTS: dict[str, tuple[dict, float, float]] = {
    "old": (OLD, OLD_LR, OLD_SHARE),
    "x0": ({**OLD, "prediction_type": "x0", "sample_steps": 1}, OLD_LR, OLD_SHARE),
    "anatomy": ({**OLD, "decoder_anatomy": "planning", "latent_dropout": 0.5}, OLD_LR, OLD_SHARE),
    "masked": ({**OLD, "vae_loss_region": "body"}, OLD_LR, OLD_SHARE),
    "lr": ({**OLD, "kl_weight": 1e-6}, NEW_LR, OLD_SHARE),
    "split": (OLD, OLD_LR, NEW_SHARE),
    "new": (NEW, NEW_LR, NEW_SHARE),
    "new+hinge": ({**NEW, "constraint_weight": 0.5, "sample_steps": 2}, NEW_LR, NEW_SHARE),
    "v": ({**NEW, "prediction_type": "v"}, NEW_LR, NEW_SHARE),
    "eps": ({**NEW, "prediction_type": "epsilon", "sample_steps": 10}, NEW_LR, NEW_SHARE),
    # channel widths around the demo's before #24 (VAE 8/16/32, denoiser 16/32, condition 8, context 32)
    "w-half": ({**NEW, **WIDTHS["half"]}, NEW_LR, NEW_SHARE),
    "w-double": ({**NEW, **WIDTHS["double"]}, NEW_LR, NEW_SHARE),
    "w-vae2": ({**NEW, "vae_channels": WIDTHS["double"]["vae_channels"]}, NEW_LR, NEW_SHARE),
    "w-den2": ({**NEW, **{k: v for k, v in WIDTHS["double"].items() if k != "vae_channels"}}, NEW_LR, NEW_SHARE),
    "d24-before": (NEW, NEW_LR, NEW_SHARE),
    "d24-blind": (D24_BLIND, NEW_LR, NEW_SHARE),
    "d24-residual": (D24_RESIDUAL, NEW_LR, D24_SHARE),
    "d24-3level": (D24_3LEVEL, NEW_LR, D24_SHARE),
    "d24-tbias": (D24_TBIAS, NEW_LR, D24_SHARE),
    "d24-l1": (D24_L1, NEW_LR, D24_SHARE),
    "d24-new": (D24_NEW, NEW_LR, D24_SHARE),
    "d24-planning": ({**D24_L1, "decoder_anatomy": "planning"}, NEW_LR, D24_SHARE),
    "d24-ct": ({**D24_L1, "decoder_anatomy": "ct"}, NEW_LR, D24_SHARE),
    "d24-8cube": ({**D24_L1, "vae_channels": (8, 16, 32), "latent_channels": 8}, NEW_LR, D24_SHARE),
    "d24-nores": ({**D24_L1, "residual_latent": False}, NEW_LR, D24_SHARE),
    "d24-vae80": (D24_L1, NEW_LR, NEW_SHARE),
    # the U-Net reads only unet_channels[0] (16 before and after #24) and norm_groups
    "unet": ({"kind": "unet", "unet_constraint_weight": 0.5}, NEW_LR, 0.0),
    "unet-old": ({"kind": "unet", "unet_constraint_weight": 0.5}, OLD_LR, 0.0),
    "unet-nohinge": ({"kind": "unet", "unet_constraint_weight": 0.0}, NEW_LR, 0.0),
}
METRICS = ("mae_gy", "openkbp_dose_score", "openkbp_dvh_score", "mean_isodose_dice", "gamma_pass_rate",
           "constraint_compliance_pred")


def train_for(model, stage: str, data, cfg, lr: float, cpu_budget: float, seed: int, batch_size: int,
              steps_target: int | None = None) -> dict:
    """Train ``stage`` in whole epochs until ``cpu_budget`` process CPU seconds are spent, or with
    ``steps_target`` until that many steps are done (``--replay``: a recorded run's whole epochs)."""
    from addiff_core.config import TrainingConfig

    tcfg = TrainingConfig(lr=lr, batch_size=batch_size)
    set_trainable(model, stage)
    opt = make_optimizer(getattr(model, stage).parameters(), tcfg)
    loader = make_loader(data.train, batch_size, shuffle=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    t0, steps, last = time.process_time(), 0, {}
    while (steps < steps_target) if steps_target is not None else (time.process_time() - t0 < cpu_budget):
        last = train_stage_epoch(stage, model, loader, opt, cfg, torch.device("cpu"), generator=gen,
                                 progress=False)
        steps += int(last["steps"])
    return {"steps": steps, "cpu_s": time.process_time() - t0, "final_loss": last.get("loss")}


CONFIG_KEYS = ("prediction_type", "decoder_anatomy", "residual_latent", "latent_dropout", "vae_loss_region",
               "kl_weight", "sample_steps", "timestep_bias", "dose_l1_weight", "constraint_weight", "vae_channels",
               "latent_channels", "unet_channels", "attention_levels", "cond_channels", "context_dim")


def variant_config(variant: str, steps_override: int | None = None):
    """``configs/demo.yaml`` with the variant's overrides, checked as a checkpoint's config is."""
    from addiff_core.config import model_config_from_dict

    overrides = VARIANTS[variant][0]
    cfg = dataclasses.replace(load_model_config(common.DEMO_CONFIG), **overrides)
    if steps_override:
        cfg = dataclasses.replace(cfg, sample_steps=steps_override)
    return model_config_from_dict(cfg.to_dict(), f"ablation variant {variant}")


def run_one(variant: str, budget: float, seed: int, site_file: Path, batch_size: int,
            steps_override: int | None, samples: int = 4, steps_sweep: list[int] | None = None,
            replay: dict | None = None) -> dict:
    """One row: train ``variant`` for ``budget`` CPU seconds (or, with ``replay``, a recorded
    row, for its steps per stage) and score it on the held-out cases."""
    _, lr, vae_share = VARIANTS[variant]
    target = (lambda stage: replay[stage]["steps"]) if replay else (lambda stage: None)
    site = load_site_config(site_file)
    cfg = variant_config(variant, steps_override)
    data = load_site_data(site, cfg.grid)
    torch.manual_seed(seed)
    model = build_model(cfg)
    row: dict = {"variant": variant, "budget_cpu_s": budget, "seed": seed, "lr": lr, "vae_share": vae_share,
                 "config": {k: getattr(cfg, k) for k in CONFIG_KEYS}}
    if cfg.kind == "unet":
        row["unet"] = train_for(model, "unet", data, cfg, lr, budget, seed, batch_size, target("unet"))
    else:
        row["vae"] = train_for(model, "vae", data, cfg, lr, budget * vae_share, seed, batch_size, target("vae"))
        row["diffusion"] = train_for(model, "diffusion", data, cfg, lr, budget * (1 - vae_share), seed + 1,
                                     batch_size, target("diffusion"))
    t0 = time.process_time()
    res = evaluate(model, data.heldout, cfg, torch.device("cpu"), seed=seed, progress=False)
    row["eval_cpu_s"] = time.process_time() - t0
    row["heldout"] = {k: res["mean"].get(k) for k in METRICS}
    row["num_heldout"] = res["num_cases"]
    if cfg.kind == "diffusion" and samples > 1:
        row["uncertainty_spearman"] = uncertainty_spearman(model, data.heldout, cfg, samples, seed)
    if cfg.kind == "diffusion" and len(data.heldout) > 1:
        row["probe"] = probe(model, data.heldout, cfg, samples, seed)
    if cfg.kind == "diffusion" and steps_sweep:  # the same trained model, other DDIM step counts
        row["steps_sweep"] = {}
        for n in steps_sweep:
            t0 = time.process_time()
            r = evaluate(model, data.heldout, cfg, torch.device("cpu"), seed=seed, steps=n, progress=False)
            row["steps_sweep"][str(n)] = {**{k: r["mean"].get(k) for k in METRICS},
                                          "eval_cpu_s": time.process_time() - t0}
    return row


def probe(model, dataset, cfg, samples: int, seed: int) -> dict:
    """The latent probe (issue #24) on ``dataset``: its summary and each case's MAEs."""
    from addiff_core import latent_probe

    rows = latent_probe.probe_cases(model, [dataset[i] for i in range(len(dataset))], cfg, list(dataset.case_ids),
                                    num_samples=samples, seed=seed)
    return {**latent_probe.summarise(rows), "num_samples": samples,
            "cases": [{"case": r.case_id, **r.mae, "spread": r.spread} for r in rows]}


def uncertainty_spearman(model, dataset, cfg, samples: int, seed: int) -> float:
    """Mean over held-out cases of Spearman's rho between the per-voxel std of ``samples``
    samples and the |error| of their mean, inside the evaluation region on the model grid."""
    from addiff_core.metrics import sample_uncertainty
    from addiff_core.training import predict_normalised

    rhos = []
    for i in range(len(dataset)):
        batch = {k: v[None] for k, v in dataset[i].items()}
        mean, std = predict_normalised(model, batch, cfg, seed=seed + i, num_samples=samples)
        rho = sample_uncertainty(mean[0, 0].numpy(), std[0, 0].numpy(), batch["dose"][0, 0].numpy(),
                                 batch["body"][0, 0].numpy() > 0.5)["spearman"]
        if np.isfinite(rho):
            rhos.append(float(rho))
    return float(np.mean(rhos)) if rhos else float("nan")


PROBE = (("sampled", "sampled"), ("zero", "z = 0"), ("oracle", "oracle"), ("shuffled", "shuffled"),
         ("oracle_over_sampled", "oracle / sampled"), ("bypass_over_sampled", "min(zero, shuffled) / sampled"),
         ("spread", "spread"))


def _cell(vals: list, nd: int = 3) -> str:
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    return f"{np.mean(vals):.{nd}f} ± {np.std(vals):.{nd}f}" if vals else "-"


def _groups(rows: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """Rows by (variant, budget), ordered by budget, then as ``VARIANTS`` lists the variants."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["budget_cpu_s"]), []).append(r)
    order = {v: i for i, v in enumerate(VARIANTS)}
    return sorted(groups.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], len(order)), kv[0][0]))


def summarise(rows: list[dict]) -> str:
    out, probes = [], []
    for (variant, budget), rs in _groups(rows):
        cells = [_cell([r["heldout"].get(m) for r in rs]) for m in METRICS]
        rho = _cell([r.get("uncertainty_spearman") for r in rs], 2)
        out.append([variant, budget, len(rs), *cells, rho])
        if any("probe" in r for r in rs):
            probes.append([variant, budget, len(rs), *(_cell([r.get("probe", {}).get(k) for r in rs], 4)
                                                      for k, _ in PROBE), rho])
    text = common.md_table(["variant", "CPU s", "seeds", *METRICS, "std~|err| rho"], out)
    if probes:
        text += ("\n\nLatent probe (issue #24), held-out cases: MAE on the model grid inside the evaluation "
                 "region, in units of the prescription; spread = mean voxel std of the samples / mean dose\n\n"
                 + common.md_table(["variant", "CPU s", "seeds", *(h for _, h in PROBE), "std~|err| rho"], probes))
    return text


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


def _same_config(variant: str, recorded: dict) -> bool:
    """Does ``variant`` still define the config a recorded row names (the keys both know; of a
    U-Net only its width, the one of these keys it reads)?"""
    cfg = variant_config(variant)
    now = {k: getattr(cfg, k) for k in CONFIG_KEYS}
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (JSON has lists)
    if cfg.kind == "unet":
        return norm(now["unet_channels"])[0] == norm(recorded["unet_channels"])[0]
    return all(norm(now[k]) == norm(v) for k, v in recorded.items() if k in now)


def replay(source: Path, out: Path, part: tuple[int, int], site_file: Path, batch_size: int, samples: int) -> int:
    """Re-train every row of ``source`` (every ``part[1]``-th from ``part[0]``) for its recorded
    steps per stage, with today's evaluation (issue #31: gamma), into ``out``; each row keeps the
    held-out numbers it replaces under ``replayed_from``. A CPU-second budget buys a machine- and
    load-dependent number of steps, so a replay, not a second budgeted run, is what reproduces a
    table's models: the same seeds, epochs and order give the same weights on the same CPU type."""
    recorded = json.loads(source.read_text())
    rows = json.loads(out.read_text())["rows"] if out.exists() else []  # a replay that stopped goes on
    done = {_key(r) for r in rows}
    for i, old in enumerate(recorded["rows"]):
        if i % part[1] != part[0] or _key(old) in done:
            continue
        if not _same_config(old["variant"], old["config"]):
            raise SystemExit(f"{source}: row {i} ({old['variant']}): the variant's config has changed since")
        common.progress(f"replay {old['variant']} budget {old['budget_cpu_s']:.0f} seed {old['seed']}")
        row = run_one(old["variant"], old["budget_cpu_s"], old["seed"], site_file, batch_size, None, samples,
                      replay=old)
        row["replayed_from"] = {"when": recorded.get("when"), "cpu_model": recorded["machine"].get("cpu_model"),
                                "heldout": old["heldout"]}
        common.progress(f"  -> MAE {row['heldout']['mae_gy']:.4f} (recorded {old['heldout']['mae_gy']:.4f})")
        rows.append(row)
        write_results(out, rows, {"threads": recorded.get("threads"), "cases": recorded.get("cases")})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="old,x0,anatomy,masked,lr,split,new,new+hinge,unet,unet-nohinge")
    ap.add_argument("--budgets", default="90", help="process CPU seconds of training per run")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--cases", type=int, default=16, help="cases of the synthetic hospital (25%% held out)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--sample-steps", type=int, default=None, help="override DDIM steps of every variant")
    ap.add_argument("--samples", type=int, default=4,
                    help="samples for the uncertainty correlation and the probe's spread (1: off)")
    ap.add_argument("--steps-sweep", default="", help="also evaluate ADDiff at these DDIM step counts, e.g. 1,2,5,10")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=None, help="synthetic data folder (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=common.DEFAULT_OUT / "ablation.json")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="only merge the rows of these result files (runs made in parallel) into --out")
    ap.add_argument("--replay", type=Path, default=None,
                    help="re-train the rows of this result file for their recorded steps (same seeds, "
                         "today's evaluation) into --out; --cases, --batch-size and --samples as that run's")
    ap.add_argument("--replay-part", default="0/1", help="K/N: replay rows K, K+N, ... (parallel replays)")
    args = ap.parse_args(argv)
    if args.merge is not None:
        return merge(args.merge, args.out)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    for v in variants:  # a variant the config loader refuses stops here, not after an hour
        variant_config(v, args.sample_steps)
    common.quiet_warnings()
    common.apply_threads(args.threads)
    data_root = args.data or Path(tempfile.mkdtemp(prefix="addiff-ablation-"))
    site_file = data_root / "hospital_a.yaml"
    if not site_file.exists():
        write_synthetic_sites(data_root, n_sites=1, cases_per_site=args.cases, size=32, seed=11)
    if args.replay is not None:
        k, n = (int(x) for x in args.replay_part.split("/"))
        return replay(args.replay, args.out, (k, n), site_file, args.batch_size, args.samples)
    previous = json.loads(args.out.read_text()).get("rows", []) if args.out.exists() else []
    rows = []
    for budget in common.parse_list(args.budgets, float):
        for seed in common.parse_list(args.seeds, int):
            for variant in variants:
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
