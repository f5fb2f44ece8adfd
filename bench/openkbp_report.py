"""The results of bench/openkbp_bench.py: result file names, the per-patient summaries
(uncertainty, latent probe) and the Markdown report. Pure: reads only the result dicts (and, for
the learning curve, the result files beside them)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

RESULTS_STEM = "openkbp_bench"
METRICS = ("mae_gy", "openkbp_dose_score", "openkbp_dvh_score", "gamma_pass_rate", "mean_isodose_dice")
UNC = "uncertainty_spearman"  # per-patient Spearman(std, |mean - reference|) in the possible-dose mask
CAL = "uncertainty_within_2std"  # per-patient fraction of mask voxels whose reference lies in mean +- 2 std
DVH_CELLS = "dvh_cells"  # number of (patient, structure, DVH point) cells behind a DVH score
# published OpenKBP test-set results (100 patients; dose score / DVH score, Gy)
PUBLISHED = {"challenge winner (Babier et al. 2021)": (2.43, 1.48), "later work (best reported)": (2.07, 0.98)}
METHOD_LABELS = {"federated_addiff": "federated ADDiff-Dose", "federated_unet": "federated U-Net",
                 "local_addiff": "each site alone (ADDiff-Dose)", "pooled_addiff": "pooled (ADDiff-Dose)"}
ADDIFF_METHODS = ("federated_addiff", "local_addiff", "pooled_addiff")
# issue #24's bars for the latent probe on held-out patients
PROBE_ORACLE_MAX = 0.35  # oracle / sampled at most this: the latent carries the dose
PROBE_BYPASS_MIN = 1.25  # min(zero, shuffled) / sampled at least this: the diffusion decides


# --------------------------------------------------------------------------------------------
# names and numbers
# --------------------------------------------------------------------------------------------
def scale_suffix(scale: float, seed: int = 0) -> str:
    """``""`` for the bench budget (scale 1) and training seed 0, else ``_x{scale:g}`` (``_x3``,
    ``_x0.5``) and ``_seed{seed}``."""
    return ("" if float(scale) == 1.0 else f"_x{float(scale):g}") + ("" if int(seed) == 0 else f"_seed{int(seed)}")


def results_stem(scale: float, seed: int = 0) -> str:
    """``openkbp_bench`` at scale 1, ``openkbp_bench_x3`` at scale 3, ``openkbp_bench_x3_seed1``
    with training seed 1: a learning-curve point or a second seed never overwrites another run's
    result files."""
    return RESULTS_STEM + scale_suffix(scale, seed)


def scale_epochs(epochs: int, scale: float) -> int:
    """``epochs x scale`` rounded half up to whole epochs, at least 1."""
    return max(1, math.floor(int(epochs) * float(scale) + 0.5))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _mean_finite(vals: Sequence[Any]) -> float | None:
    xs = [float(v) for v in vals if _finite(v)]
    return sum(xs) / len(xs) if xs else None


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _g(v: Any) -> str:
    """Three significant digits (small numbers such as a std of 1e-4 Gy stay readable)."""
    return f"{v:.3g}" if _finite(v) else "n/a"


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}" if _finite(v) else "n/a"


def summarize_uncertainty(rows: list[dict]) -> dict:
    """Mean Spearman and mean +-2 std calibration per site and over every patient (patients where
    a number is undefined left out of its mean)."""
    per_site: dict[str, list] = {}
    for r in rows:
        per_site.setdefault(r["site"], []).append(r)

    def means(v: list[dict]) -> dict:
        return {"spearman_mean": _mean_finite([r["spearman"] for r in v]),
                "calibration_mean": _mean_finite([r.get("calibration_2std") for r in v]),
                "mean_std_gy": _mean_finite([r["mean_std_gy"] for r in v]), "n": len(v),
                "n_defined": sum(r["spearman"] is not None for r in v)}

    spear = [r["spearman"] for r in rows if r["spearman"] is not None]
    cal = [r["calibration_2std"] for r in rows if _finite(r.get("calibration_2std"))]
    return {"per_site": {s: means(v) for s, v in per_site.items()}, **means(rows),
            "spearman_min": min(spear, default=None), "spearman_max": max(spear, default=None),
            "calibration_min": min(cal, default=None), "calibration_max": max(cal, default=None),
            "mean_prediction_dose_score": _mean_finite([r["mean_prediction_dose_score"] for r in rows]),
            "cases": [{k: v for k, v in r.items() if k != "mean_prediction_dvh_errors"} for r in rows]}


def planned_cpu(budget: dict, step_cpu: Mapping[str, Any], n_train: int, n_addiff: int = 3, n_unet: int = 1) -> dict | None:
    """Training CPU seconds a budget implies from measured step times: per ADDiff-Dose method
    (VAE, diffusion, shares), per U-Net run, and for the whole training (``n_addiff`` ADDiff-Dose
    methods + ``n_unet`` U-Net runs, each over ``n_train`` cases per epoch, batch 1)."""
    try:
        tv, td, tu = (float(step_cpu[s]["cpu_seconds_per_step"]) for s in ("vae", "diffusion", "unet"))
    except (KeyError, TypeError, ValueError):
        return None
    steps = lambda e: e * -(-n_train // int(budget.get("batch_size", 1)))  # noqa: E731
    vae, dif, unet = steps(budget["vae_epochs"]) * tv, steps(budget["diffusion_epochs"]) * td, steps(budget["unet_epochs"]) * tu
    return {"addiff_vae_s": vae, "addiff_diffusion_s": dif, "addiff_total_s": vae + dif,
            "vae_share": vae / (vae + dif) if vae + dif else None, "unet_s": unet,
            "unet_over_addiff": unet / (vae + dif) if vae + dif else None,
            "all_training_s": n_addiff * (vae + dif) + n_unet * unet, "training_cases": n_train,
            "addiff_methods": n_addiff, "unet_runs": n_unet}


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _spacing_text(spacing) -> str:
    return "x".join(f"{float(s):g}" for s in spacing) + " mm" if spacing else "each CT's own spacing"


def budget_text(b: dict, cfg, n_site: int | str = "N", n_pool: int | str = "N") -> str:
    g = cfg.grid
    sp = _spacing_text(g.spacing)
    scaled = (f" (the {b['name']} budget's epochs x {b['scale']:g})" if _finite(b.get("scale")) and b["scale"] != 1
              else "")
    return (f"grid {g.size}^3 at {sp}; ADDiff-Dose: {b['vae_epochs']} VAE + {b['diffusion_epochs']} diffusion epochs, "
            f"U-Net: {b['unet_epochs']} epochs{scaled}; an epoch is one pass over the training cases (federated: "
            f"{b['local_epochs']} local epoch per round, so {b['vae_epochs']}+{b['diffusion_epochs']} rounds for "
            f"ADDiff-Dose and {b['unet_epochs']} for the U-Net; local: the same epochs over a site's {n_site} cases; "
            f"pooled: the same epochs over the {n_pool} pooled cases); batch {b['batch_size']}, {b['optimizer']} "
            f"lr {b['lr']:g} constant, grad clip 1; DDIM {cfg.sample_steps} steps at evaluation; CPU only")


def _method_cost(meth: dict) -> tuple[float | None, float | None]:
    """(CPU minutes, wall minutes) of a method: training + evaluation + uncertainty + probe."""
    cpu = [v for v in meth.get("cpu_seconds", {}).values() if _finite(v)]
    wall = [v for v in meth.get("seconds", {}).values() if _finite(v)]
    return (sum(cpu) / 60 if cpu else None), (sum(wall) / 60 if wall else None)


def _md_header(res: dict) -> list[str]:
    b = res["budget"]
    scale = f", epochs x {b['scale']:g}" if _finite(b.get("scale")) and b["scale"] != 1 else ""
    lines = [f"# OpenKBP real-anatomy benchmark (bench/openkbp_bench.py, budget `{b['name']}`{scale})", ""]
    if not res.get("complete", True):
        lines += ["**Partial results: the run was still going (or was stopped) when this file was written.**", ""]
    if res.get("methods_run") and len(res["methods_run"]) < len(METHOD_LABELS):
        lines += [f"Methods run (`--methods`): {', '.join(res['methods_run'])}.", ""]
    if res.get("carried_over"):
        lines += [f"Kept from an earlier run with the same budget, split and model (that run's machine in the "
                  f"JSON, `carried_over_from`): {', '.join(res['carried_over'])}.", ""]
    m = res["machine"]
    cpu_total = res.get("cpu_seconds", {}).get("total")
    lines += [f"Machine: {m.get('cpu_model')}, {m.get('usable_cpus')} CPU cores, torch {m.get('torch')}, no GPU, "
              f"{m.get('torch_threads_per_step', 1)} torch thread per training/evaluation process; load average at "
              f"start {m.get('loadavg_start')} / end {res.get('loadavg_end')} (the machine was shared with other jobs, so "
              f"wall times are inflated and noisy; the metrics are not affected). Wall time {res['wall_seconds'] / 60:.1f} "
              f"min" + (f"; CPU time {cpu_total / 60:.1f} min (this process and every step it ran)"
                        if cpu_total else "") + ".", ""]
    return lines


def _md_data(res: dict) -> list[str]:
    split = res.get("split") or []
    d = res["data"]
    n_held = sum(len(s["heldout"]) for s in split)
    n_pool = sum(len(s["train"]) for s in split)
    lines = ["## Data and split", "",
             f"{d['patients']} OpenKBP head-and-neck patients: {d.get('sample_patients', d['patients'])} of the sample "
             f"(`{d['sample']}`)" + (f" + {d['extra_patients']} of the training pool (`{d['extra']}`)"
                                     if d.get("extra_patients") else "")
             + f", sorted by in-plane voxel spacing (ties: patient number) and cut in thirds; each site holds out "
             f"{res.get('heldout_per_site')} patients (seeded draw, seed {res.get('split_seed', 0)}; {n_held} in all) "
             f"and trains on the rest ({n_pool} training patients in all).", "",
             "| site | patients | in-plane spacing (mm) | slice spacing (mm) | training | held-out patients |",
             "|---|---|---|---|---|---|"]
    for s in split:
        sp = sorted(set(s["in_plane_spacing_mm"].values()))
        sl = sorted(set(s["slice_spacing_mm"].values()))
        lines.append(f"| {s['site']} | {len(s['patients'])} | {sp[0]:.3f} - {sp[-1]:.3f} | {sl[0]:g} - {sl[-1]:g} | "
                     f"{len(s['train'])} | {', '.join(s['heldout'])} |")
    return lines


def _md_budget(res: dict) -> list[str]:
    b = res["budget"]
    lines = ["", "## Training budget (equal compute)", "", b["text"] + ".", ""]
    st = res.get("step_cpu_seconds") or {}
    plan = b.get("planned_cpu") or {}
    if not st.get("vae"):
        return lines
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
        n_add, n_unet = plan.get("addiff_methods", 3), plan.get("unet_runs", 1)
        lines += ["", f"ADDiff-Dose: {100 * plan['vae_share']:.0f} % of its training CPU on the VAE, "
                      f"{100 * (1 - plan['vae_share']):.0f} % on the diffusion stage; the U-Net's epochs cost "
                      f"{plan['unet_over_addiff']:.2f}x ADDiff-Dose's two stages; all training ({n_add} ADDiff-Dose "
                      f"method(s) + {n_unet} U-Net run(s), {plan['training_cases']} training patients each) "
                      f"{plan['all_training_s'] / 60:.1f} CPU min planned from these step times."]
    if b.get("set_from_step_cpu_seconds"):
        sf = b["set_from_step_cpu_seconds"]
        lines += [f"The epochs were set from an earlier measurement (VAE {sf['vae']}, diffusion {sf['diffusion']}, "
                  f"U-Net {sf['unet']} CPU s / step) by the rules: {b.get('rules')} (bench/openkbp_bench.py "
                  "docstring)."]
    return lines + [""]


def _unc_cell(mkey: str, unc: dict, key: str, fmt) -> str:
    if unc.get("cases"):
        return fmt(unc.get(key))
    return "deterministic" if mkey == "federated_unet" else str(unc.get("error", "n/a"))[:60]


def _md_results(res: dict, refs: list) -> list[str]:
    b = res["budget"]
    n_held = sum(len(s["heldout"]) for s in res.get("split") or [])
    lines = [f"## Held-out results, all {n_held} held-out patients", "",
             "Each method evaluated on each site's own held-out patients, on their 128^3 CT grid, with the official "
             "OpenKBP scores (prediction set to 0 outside the possible-dose mask; dose score = MAE over the mask, "
             "mean over patients; DVH score = one mean over every DVH cell). Lower is better for the scores; higher "
             "for gamma (3%/2 mm, 10% cutoff) and isodose Dice. Uncertainty, from the voxel-wise std of "
             f"{b.get('uncertainty_samples', '?')} samples in the possible-dose mask, mean over patients: Spearman "
             "correlation between the std and |mean - reference| (higher = the uncertainty map points at the "
             "errors) and calibration, the % of voxels whose reference dose lies within mean +- 2 std (~95 % for a "
             "calibrated spread).", "",
             "| method | dose score (Gy) | DVH score (Gy) | gamma 3%/2mm (%) | isodose Dice | uncertainty Spearman | "
             "within +-2 std (%) | CPU (min) | wall (min) |", "|---|---|---|---|---|---|---|---|---|"]
    for mkey, label in METHOD_LABELS.items():
        meth = res["methods"].get(mkey)
        if not meth:
            continue
        if meth.get("error"):
            lines.append(f"| {label} | failed: {meth['error']} |" + " |" * 7)
            continue
        o = meth["overall"]
        unc = meth.get("uncertainty", {})
        cpu, wall = _method_cost(meth)
        lines.append(f"| {label} | {_fmt(o.get('openkbp_dose_score'))} | {_fmt(o.get('openkbp_dvh_score'))} | "
                     f"{_fmt(o.get('gamma_pass_rate'), 1)} | {_fmt(o.get('mean_isodose_dice'))} | "
                     f"{_unc_cell(mkey, unc, 'spearman_mean', _fmt)} | {_unc_cell(mkey, unc, 'calibration_mean', _pct)} | "
                     f"{_fmt(cpu, 1)} | {_fmt(wall, 1)} |")
    for label, ref in refs:
        if ref:
            lines.append(f"| *{label}* | {_fmt(ref.get('openkbp_dose_score'))} | {_fmt(ref.get('openkbp_dvh_score'))} | "
                         "| | | | | |")
    return lines + [""]


PER_SITE_TABLES = (("dose score (Gy)", "openkbp_dose_score", _fmt), ("DVH score (Gy)", "openkbp_dvh_score", _fmt),
                   ("gamma pass rate 3%/2 mm (%)", "gamma_pass_rate", lambda v: _fmt(v, 1)),
                   ("isodose Dice", "mean_isodose_dice", _fmt), ("uncertainty Spearman", UNC, _fmt),
                   ("uncertainty calibration, in-mask voxels within mean +- 2 std (%)", CAL, _pct))
UNC_SUMMARY_KEY = {UNC: "spearman_mean", CAL: "calibration_mean"}


def _md_per_site(res: dict, refs: list) -> list[str]:
    split = res.get("split") or []
    sites = [s["site"] for s in split]
    n_held = sum(len(s["heldout"]) for s in split)
    lines = []
    for title, key, fmt in PER_SITE_TABLES:
        head = ["method"] + [f"{s['site']} ({len(s['heldout'])})" for s in split] + [f"all ({n_held})"]
        rows = []
        for mkey, label in METHOD_LABELS.items():
            meth = res["methods"].get(mkey)
            if not meth or meth.get("error"):
                continue
            if key in UNC_SUMMARY_KEY:
                unc, k = meth.get("uncertainty", {}), UNC_SUMMARY_KEY[key]
                if not unc.get("cases"):
                    continue
                rows.append([label] + [fmt(unc["per_site"].get(site, {}).get(k)) for site in sites] + [fmt(unc.get(k))])
            else:
                rows.append([label] + [fmt(meth["per_site"].get(site, {}).get(key)) for site in sites]
                            + [fmt(meth["overall"].get(key))])
        if key in ("openkbp_dose_score", "openkbp_dvh_score"):
            rows += [[f"*{label}*"] + [fmt(ref["per_site"].get(site, {}).get(key)) for site in sites] + [fmt(ref.get(key))]
                     for label, ref in refs if ref]
        if rows:
            lines += [f"**Per site: {title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    return lines


def _md_uncertainty_details(res: dict) -> list[str]:
    parts = []
    for mkey in ADDIFF_METHODS:
        unc = res["methods"].get(mkey, {}).get("uncertainty", {})
        if unc.get("cases"):
            cal = (f", within +-2 std {_pct(unc.get('calibration_min'))} .. {_pct(unc.get('calibration_max'))} %"
                   if unc.get("calibration_min") is not None else "")
            parts.append(f"{METHOD_LABELS[mkey]}: Spearman {_fmt(unc.get('spearman_min'))} .. "
                         f"{_fmt(unc.get('spearman_max'))} over patients ({unc['n_defined']} of {unc['n']} defined)"
                         f"{cal}, mean std {_g(unc.get('mean_std_gy'))} Gy in the mask, dose score of the "
                         f"{unc['samples']}-sample mean {_fmt(unc.get('mean_prediction_dose_score'))} Gy")
    return ["Uncertainty details: " + "; ".join(parts) + ".", ""] if parts else []


PROBE_COLUMNS = ("sampled", "zero", "oracle", "shuffled", "spread", "oracle_over_sampled", "bypass_over_sampled",
                 "bypass_over_sampled_plan_normalised")
PROBE_HEADERS = ("sampled", "z = 0", "oracle", "shuffled", "spread", "oracle / sampled", "min(z = 0, shuffled) / sampled",
                 "the same, each decode plan-normalised")


def _probe_cell(key: str, v: Any) -> str:
    """MAEs with 4 decimals, the spread with 3 significant digits (it can be ~1e-5), ratios with 2."""
    return _g(v) if key == "spread" else _fmt(v, 2 if "_over_sampled" in key else 4)


def probe_table(res: dict) -> list[str]:
    """Markdown section "Does the diffusion decide? (latent probe)": one row per ADDiff method and
    site, and its "all" row; [] when no method has a probe."""
    rows = []
    for mkey in ADDIFF_METHODS:
        probe = res["methods"].get(mkey, {}).get("latent_probe") or {}
        if probe.get("error"):
            rows.append(f"| {METHOD_LABELS[mkey]} | failed: {probe['error'][:80]} |" + " |" * len(PROBE_COLUMNS))
            continue
        if not probe.get("per_site"):
            continue
        parts = [(f"{site} ({v.get('n')})", v) for site, v in probe["per_site"].items()]
        parts.append((f"**all ({probe['overall'].get('n')})**", probe["overall"]))
        rows += [f"| {METHOD_LABELS[mkey]} | {where} | " + " | ".join(_probe_cell(k, v.get(k)) for k in PROBE_COLUMNS) + " |"
                 for where, v in parts]
    if not rows:
        return []
    first = next(res["methods"][k]["latent_probe"] for k in ADDIFF_METHODS
                 if (res["methods"].get(k, {}).get("latent_probe") or {}).get("per_site"))
    return ["## Does the diffusion decide? (latent probe)", "",
            "`addiff_core.latent_probe` on each site's held-out patients, for each ADDiff-Dose model (local: each "
            "site's own model): MAE on the model grid inside the evaluation region, in units of the prescription, of "
            f"the dose decoded from the latent the diffusion samples ({first.get('steps')} DDIM steps), from z = 0 "
            "(no diffusion), from the reference dose's own latent (oracle: decode(encode(dose)), the best the "
            "latent path can do) and from another held-out patient's latent of the same site (shuffled); spread = "
            f"mean voxel std of {first.get('samples')} samples / mean reference dose. Issue #24's bars: oracle / "
            f"sampled <= {PROBE_ORACLE_MAX} (the latent carries the dose) and min(z = 0, shuffled) / sampled >= "
            f"{PROBE_BYPASS_MIN} (the diffusion decides the prediction). With a plan normalisation "
            "(`plan_normalisation` in the model config) the last column repeats that ratio after every decode is "
            "normalised as the model's predictions are (n/a: none).", "",
            "| method | site (patients) | " + " | ".join(PROBE_HEADERS) + " |", "|" + "---|" * (len(PROBE_HEADERS) + 2),
            *rows, ""]


def learning_curve(out_dir: Path, res: dict) -> list[dict]:
    """The result files in ``out_dir`` of the same budget and patients at every scale (this run's
    ``res`` included), sorted by scale: one point of the learning curve each."""
    b, points = res["budget"], {}
    for f in sorted(Path(out_dir).glob(f"{RESULTS_STEM}*.json")):
        try:
            other = json.loads(f.read_text())
            ob = other["budget"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if ob.get("name") == b["name"] and other.get("data", {}).get("patients") == res["data"]["patients"]:
            points[float(ob.get("scale", 1.0))] = other
    points[float(b.get("scale", 1.0))] = res
    return [points[k] for k in sorted(points)]


def _md_learning_curve(points: list[dict]) -> list[str]:
    keys = [k for k in METHOD_LABELS if any((r["methods"].get(k) or {}).get("overall") for r in points)]
    if len(points) < 2 or not keys:
        return []
    lines = ["## Learning curve (this budget x scale, `--scale`)", "",
             "Overall held-out dose score / DVH score (Gy) of each method at each scale of the epochs (files "
             f"`{RESULTS_STEM}[_xK].json` in this folder; -: not run at that scale).", "",
             "| scale | VAE + diffusion epochs | U-Net epochs | " + " | ".join(METHOD_LABELS[k] for k in keys) + " |",
             "|" + "---|" * (3 + len(keys))]
    for r in points:
        b = r["budget"]
        cells = []
        for mkey in keys:
            o = r["methods"].get(mkey, {}).get("overall") or {}
            cells.append(f"{_fmt(o.get('openkbp_dose_score'))} / {_fmt(o.get('openkbp_dvh_score'))}" if o else "-")
        lines.append(f"| x{float(b.get('scale', 1.0)):g} | {b['vae_epochs']} + {b['diffusion_epochs']} | "
                     f"{b['unet_epochs']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _md_caveats(res: dict) -> list[str]:
    b = res["budget"]
    split = res.get("split") or []
    n_held = sum(len(s["heldout"]) for s in split)
    n_site_train = sorted({len(s["train"]) for s in split})
    n_pool = sum(len(s["train"]) for s in split)
    n_site = min(n_site_train) if n_site_train else 0
    n_per = res.get("heldout_per_site")
    zero, floor = res.get("zero_dose"), res.get("grid_floor")
    lines = []
    if zero and zero.get("openkbp_dose_score"):
        parts = [f"{label} {100 * (1 - v / zero['openkbp_dose_score']):.0f}%" for mkey, label in METHOD_LABELS.items()
                 if (v := res["methods"].get(mkey, {}).get("overall", {}).get("openkbp_dose_score")) is not None]
        if parts:
            lines += [f"Share of the 0 Gy reference's dose score that each method removes (all {n_held} patients): "
                      f"{', '.join(parts)}.", ""]
    published = res.get("published_openkbp_test") or {k: {"dose_score": d, "dvh_score": v} for k, (d, v) in PUBLISHED.items()}
    pub = "; ".join(f"{k}: {v['dose_score']:.2f} / {v['dvh_score']:.2f} Gy" for k, v in published.items())
    steps = lambda e, n: e * -(-n // int(b.get("batch_size", 1)))  # noqa: E731
    grid = res["model"]["grid"]
    lines += ["## Caveats", "",
              f"- Small CPU budget: ADDiff-Dose's VAE got {steps(b['vae_epochs'], n_site)} optimiser steps per site "
              f"({steps(b['vae_epochs'], n_pool)} pooled) and its denoiser {steps(b['diffusion_epochs'], n_site)} "
              f"({steps(b['diffusion_epochs'], n_pool)} pooled); the U-Net {steps(b['unet_epochs'], n_site)} per site. "
              "None of the models is trained to convergence, and the ranking of the methods at this budget need not "
              "hold at a full (GPU) budget.",
              f"- Data: {'/'.join(str(n) for n in n_site_train)} training patients per site ({n_pool} pooled) and "
              f"{n_per} held-out patients per site; a site's numbers rest on {n_per} patients (the \"all\" column on "
              f"{n_held}), and no repeats with other seeds were affordable, so differences of a fraction of a Gy are "
              "within the noise.",
              f"- Published OpenKBP test-set scores (dose / DVH score, 100 test patients, 200 training patients, "
              f"native 128^3 grid, GPU training): {pub}. Not comparable in scale with the ones here (other patients, "
              f"{n_pool} vs 200 training patients, a {grid['size']}^3 model grid at {_spacing_text(grid['spacing'])})."]
    if floor:
        lines.append(f"- True dose through the grid: the reference dose itself, mapped onto the {grid['size']}^3 model "
                     f"grid ({_spacing_text(grid['spacing'])}) and back onto the CT grid, scores "
                     f"{floor['openkbp_dose_score']:.2f} Gy dose score and {floor['openkbp_dvh_score']:.2f} Gy DVH score "
                     f"on these {n_held} held-out patients: the floor of any model on this grid.")
    if zero:
        lines.append(f"- Zero reference: predicting 0 Gy everywhere scores {zero['openkbp_dose_score']:.2f} Gy dose "
                     f"score and {zero['openkbp_dvh_score']:.2f} Gy DVH score: a method near these numbers has learned "
                     "little.")
    lines += ["- Pooled training is evaluated with `addiff evaluate` per site on the same held-out patients; "
              "the federated runs evaluate the final global model at each site (numbers only); the uncertainty "
              "predictions (`addiff predict --samples` path) and the latent probe are separate runs on the same "
              "patients.",
              "- CPU minutes per method count its training, evaluation, uncertainty and latent-probe processes (the "
              "larger of getrusage of the finished children and the process tree's own CPU times sampled every 5 s "
              "from /proc, which also counts the federated runs' Ray workers).",
              f"- Run folders and logs: `{res['work']}`; `addiff report "
              f"{res['methods'].get('federated_addiff', {}).get('run_dir', 'RUN')}` shows the federated / local / "
              "pooled comparison (`comparison.json`).", ""]
    return lines


def markdown(res: dict, curve: list[dict] | None = None) -> str:
    """The whole report of one run (``curve``: :func:`learning_curve` points, shown when >= 2)."""
    refs = [("reference: 0 Gy everywhere", res.get("zero_dose")),
            ("reference: true dose through the model grid", res.get("grid_floor"))]
    lines = (_md_header(res) + _md_data(res) + _md_budget(res) + _md_results(res, refs) + _md_per_site(res, refs)
             + _md_uncertainty_details(res) + probe_table(res) + _md_learning_curve(curve or []) + _md_caveats(res))
    return "\n".join(lines)


def write_markdown(path: Path, res: dict) -> None:
    """``path`` (a .md beside the run's JSON) with the learning curve of the result files there."""
    path.write_text(markdown(res, learning_curve(path.parent, res)))
