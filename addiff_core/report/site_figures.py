"""The report's per-site figures: the run's model predicts one held-out case of every site whose
data is reachable here, with the product's prediction path (``training.predict_normalised``, then
``preprocessing.dose_to_ct_grid`` and ``regions.zero_outside``, as ``addiff predict``), and the
report shows dose slices, the DVH and a few DVH points; for a diffusion model also the std of
``UNCERTAINTY_SAMPLES`` samples beside the error of their mean (``metrics.sample_uncertainty``)."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from ..project import resolve_path
from ..run_folder import CHECKPOINTS
from .context import ReportContext, figure
from .document import fmt, num
from .run_data import RunData

log = logging.getLogger("addiff_core.report")
MAX_OARS_IN_DVH = 6
# samples behind the std map, each one more DDIM pass (BENCHMARKS.md, "DDIM steps (x0 model) and the uncertainty map")
UNCERTAINTY_SAMPLES = 8


# -- the model -------------------------------------------------------------------------------------
def _load_model_lenient(path: Path):
    """``predict.load_model`` on the CPU, tolerating weights whose shape differs only by size-1
    dimensions (e.g. a 0-d buffer stored as shape (1,) after a round trip through numpy)."""
    from ..checkpoint import load_checkpoint, load_model_state
    from ..models import build_model

    state, cfg, meta = load_checkpoint(path)
    model = build_model(cfg)
    own = model.state_dict()
    state = {k: (v.reshape(own[k].shape) if k in own and tuple(v.shape) != tuple(own[k].shape)
                 and v.numel() == own[k].numel() else v) for k, v in state.items()}
    load_model_state(model, state, str(path))
    return model.eval(), cfg, meta


def load_report_model(d: RunData):
    """(model, cfg, meta, description) from the final model, else the newest checkpoint that
    loads; raises RuntimeError with a one-line reason when none does."""
    from ..errors import CheckpointError

    problems = []
    for c in d.folder.model_files():
        try:
            model, cfg, meta = _load_model_lenient(c)
        except (CheckpointError, RuntimeError, ValueError, KeyError, OSError) as e:
            problems.append(f"{c.name}: {e}")
            continue
        if c.parent.name == CHECKPOINTS:
            desc = (f"`{CHECKPOINTS}/{c.name}` (round {meta.get('round', '?')}, stage {meta.get('stage', '?')}): "
                    "the final model is not available, so this is the newest valid round checkpoint")
        else:
            desc = f"`{c.name}`"
        return model, cfg, meta, desc
    raise RuntimeError("no usable model: " + ("; ".join(problems[:3]) if problems else
                                              "no final_model.pt, model.pt or checkpoints/round_*.pt"))


# -- the section -----------------------------------------------------------------------------------
def _hospital_note(site: str, run_dir: Path) -> str:
    return (f"run `addiff report {run_dir} --site sites/{site}.yaml` at the hospital to add its figures "
            "(they stay at the hospital)")


def _site_config(sf: Path, skipped: list[str]):
    """The site config of ``sf`` when its file is readable here, else None (the reason
    appended to ``skipped``)."""
    from ..config import ConfigError, load_site_config

    if not sf.is_file():
        skipped.append(f"`{sf}`: site file not readable here")
        return None
    try:
        return load_site_config(sf)
    except ConfigError as e:
        skipped.append(f"`{sf}`: {e}")
        return None


def site_sections(ctx: ReportContext) -> None:
    d, doc = ctx.data, ctx.doc
    doc.h(2, "Per-site dose figures")
    if ctx.fig_dir is None:
        doc.p(f"Figures were not requested (`addiff report --no-figures`, or the run config's "
              f"`report-figures = false`); `addiff report {d.path}` draws them.")
        return
    given = ctx.site_files is not None
    cand = [Path(p) for p in ctx.site_files] if given else [resolve_path(p) for p in d.planned_site_files()]
    doc.p("One held-out case per site (the first of the site's held-out split, the same split and seed as the "
          "evaluation): reference, predicted and difference dose on the CT in axial, coronal and sagittal "
          "slices through the target centre, and the DVH. In a real deployment the server holds no patient "
          "data, so these figures can only be made where the data is.")
    bundle: Any = None
    done: set[str] = set()
    skipped: list[str] = []
    for sf in cand:
        site = _site_config(sf, skipped)
        if site is None or site.name in done:
            continue
        if not site.data_dir.is_dir():
            skipped.append(f"{site.name}: data folder not reachable here")
            continue
        if bundle is None:
            try:
                bundle = load_report_model(d)
            except Exception as e:  # noqa: BLE001
                doc.p(f"No figures: {e}.")
                ctx.notes.append(f"per-site figures: {e}")
                return
            doc.p(f"Model: {bundle[3]}.")
        doc.h(3, f"Site {site.name}")
        if _one_site_safely(ctx, site, bundle, show_ids=given):
            done.add(site.name)
    _sites_without_figures(ctx, done, skipped, given, bool(cand))


def _sites_without_figures(ctx: ReportContext, done: set[str], skipped: list[str], given: bool,
                           any_candidate: bool) -> None:
    d = ctx.data
    others = [s for s in d.sites() if s not in done]
    if skipped or others:
        ctx.doc.h(3, "Sites without figures")
        items = list(skipped)
        items += [f"{s}: {'not among the given --site files' if given else 'no site data here'}; "
                  + _hospital_note(s, d.path) for s in others]
        ctx.doc.ul(items)
    if not any_candidate and not others:
        ctx.doc.p("No site files are known for this run: add figures with "
                  f"`addiff report {d.path} --site SITE_FILE`.")


def _one_site_safely(ctx: ReportContext, site, bundle, show_ids: bool) -> bool:
    try:
        return one_site(ctx, site, bundle, show_ids=show_ids)
    except Exception as e:  # noqa: BLE001 - one site never stops the report
        # the message may name the site's data path or a case: it stays out of the report
        log.debug("report: site %s failed: %s", site.name, e, exc_info=True)
        ctx.doc.p(f"No figures for {site.name}: {type(e).__name__}")
        ctx.notes.append(f"site {site.name}: figures failed ({type(e).__name__})")
        return False


# -- one site --------------------------------------------------------------------------------------
def _first_heldout_case(ctx: ReportContext, site, show_ids: bool):
    """The first readable case of the site's held-out split (the evaluation's split), or None
    (a paragraph says why)."""
    from ..case_io import list_cases, load_case
    from ..errors import CaseError
    from ..data import split_case_ids

    _, held = split_case_ids([p.name for p in list_cases(site.data_dir)], site.heldout)
    if not held:
        ctx.doc.p(f"{site.name} has no held-out case (heldout.fraction is 0 or case_ids is empty): no figures.")
        return None
    problems = []
    for cid in held:
        try:
            return load_case(site.data_dir / cid, require_dose=True)
        except CaseError as e:
            problems.append(f"{cid}: {e.file}: {e.problem}")
    ctx.doc.p(f"No usable held-out case at {site.name}"
              + (": " + "; ".join(problems[:3]) if show_ids else f" ({len(problems)} unusable)"))
    return None


def predict_on_ct_grid(model, cfg, case, device: str, *, steps: int | None, seed: int):
    """(predicted dose in Gy on the case's CT grid, zero outside its evaluation region; the
    region): the path ``addiff predict`` takes, on ``device`` (the CPU if it is not available)."""
    mean, _, region = sample_on_ct_grid(model, cfg, case, device, steps=steps, seed=seed)
    return mean, region


def sample_on_ct_grid(model, cfg, case, device: str, *, steps: int | None, seed: int, num_samples: int = 1):
    """(mean dose of ``num_samples`` samples, their voxel-wise std or None, the evaluation
    region): images in Gy on the case's CT grid, zero outside the region, as ``addiff predict
    --samples`` writes ``dose.nii.gz`` and ``dose_std.nii.gz``."""
    import torch

    from ..config import ConfigError, resolve_device
    from ..preprocessing import case_to_sample, dose_to_ct_grid
    from ..regions import evaluation_region, zero_outside
    from ..training import predict_normalised

    try:
        dev = resolve_device(device)
    except ConfigError:
        dev = torch.device("cpu")
    model.to(dev)
    sample, spec = case_to_sample(case, cfg.grid)
    batch = {k: v[None].to(dev) for k, v in sample.items()}
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        mean_n, std_n = predict_normalised(model, batch, cfg, steps=steps, seed=seed, num_samples=num_samples)
    region = evaluation_region(case)  # the prediction is shown and scored as it is written: 0 outside
    rx = float(case.plan.max_prescription)

    def on_ct(x):
        return None if x is None else zero_outside(dose_to_ct_grid(x.cpu()[0, 0], rx, spec, case.ct), region)

    return on_ct(mean_n), on_ct(std_n), region


def _lps(img):
    """``img`` anterior up / patient left on the right whatever the file says."""
    import SimpleITK as sitk

    try:
        return sitk.DICOMOrient(img, "LPS")
    except Exception:  # noqa: BLE001 - oblique directions: leave as is
        return img


def _lps_array(img):
    import numpy as np
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(_lps(img)).astype(np.float32)


def _lps_arrays(case, pred_img, region) -> dict[str, Any]:
    """CT, reference, prediction, masks and region as arrays in LPS order (``_lps``), cropped
    to the evaluation region (plus a margin; the crop is ``"crop"``)."""
    import numpy as np
    import SimpleITK as sitk

    ct_img = _lps(case.ct)
    a = {"ct": sitk.GetArrayFromImage(ct_img).astype(np.float32), "ref": _lps_array(case.dose),
         "pred": _lps_array(pred_img), "em": _lps_array(region) > 0}
    masks = {n: sitk.GetArrayFromImage(_lps(m)) > 0 for n, m in case.masks.items()}
    sl = _bbox(a["em"] | (a["ref"] > 0.05 * float(case.plan.max_prescription)), margin=4)  # a 512^2 CT is mostly air
    out = {k: v[sl] for k, v in a.items()}
    out["masks"] = {n: m[sl] for n, m in masks.items()}
    out["spacing"] = ct_img.GetSpacing()
    out["crop"] = sl
    return out


def one_site(ctx: ReportContext, site, bundle, show_ids: bool = True) -> bool:
    """Figures of one held-out case of ``site``. Without ``show_ids`` (the report a server writes
    for every site it can read, e.g. in a simulation) no case id or data path is written: a case
    folder may be named after the patient."""
    import numpy as np

    from ..metrics import BODY_NAMES, MIN_STRUCTURE_VOXELS, mae

    model, cfg, _, _ = bundle
    case = _first_heldout_case(ctx, site, show_ids)
    if case is None:
        return False
    label = case.case_id if show_ids else "1"
    seed = int(num(ctx.data.run_config.get("seed")) or 0)
    steps = int(num(ctx.data.run_config.get("eval-steps")) or 0) or None
    pred_img, region = predict_on_ct_grid(model, cfg, case, site.device, steps=steps, seed=seed)
    rx = float(case.plan.max_prescription)
    a = _lps_arrays(case, pred_img, region)
    masks = a["masks"]
    targets = [t for t in case.plan.targets if t in masks and masks[t].any()]
    oars = [n for n in masks if n not in targets and n not in BODY_NAMES and int(masks[n].sum()) > MIN_STRUCTURE_VOXELS]
    oars = sorted(oars, key=lambda n: -float(a["ref"][masks[n]].mean()))[:MAX_OARS_IN_DVH]
    structs = {t: masks[t] for t in targets} | {o: masks[o] for o in oars}
    ctx.doc.p(f"Held-out case **{label}** ({case.plan.tumour_site.replace('_', ' ')}, {case.plan.technique}, "
              f"Rx {', '.join(f'{t} {case.plan.prescriptions[t]:g} Gy' for t in case.plan.targets)}, "
              f"{case.plan.fractions} fractions): MAE {mae(a['pred'], a['ref'], a['em']):.2f} Gy in the evaluation "
              f"region. Prediction seed {seed}" + (f", {steps} DDIM steps" if steps else "") + ".")
    figure(ctx, f"{site.name}: dose slices of held-out case {label}", f"site_{site.name}_slices.png",
           "dose_slices_figure", a["ct"], a["ref"], a["pred"], a["spacing"], rx,
           title=f"{site.name} / {label}: reference vs predicted dose (Rx {rx:g} Gy)",
           target=masks[targets[0]] if targets else None, target_name=targets[0] if targets else None,
           eval_mask=a["em"])
    figure(ctx, f"{site.name}: DVH of held-out case {label}", f"site_{site.name}_dvh.png",
           "dvh_figure", a["ref"], a["pred"], structs, title=f"{site.name} / {label}: DVH", rx=rx, targets=targets)
    _dvh_points_table(ctx, a, structs, targets, float(np.prod(a["spacing"])) / 1000.0)
    target = (masks[targets[0]], targets[0]) if targets else (None, None)
    _uncertainty_safely(ctx, site, bundle, case, a, label, seed=seed, steps=steps, target=target)
    return True


def _uncertainty_safely(ctx: ReportContext, site, bundle, case, a: dict, label: str, **kw) -> None:
    try:
        _uncertainty(ctx, site, bundle, case, a, label, **kw)
    except Exception as e:  # noqa: BLE001 - the dose figures above stand without it
        log.debug("report: uncertainty of site %s failed: %s", site.name, e, exc_info=True)
        ctx.doc.p(f"No uncertainty map for {site.name}: {type(e).__name__}")  # no message: it may name a path
        ctx.notes.append(f"site {site.name}: uncertainty map failed ({type(e).__name__})")


def _uncertainty(ctx: ReportContext, site, bundle, case, a: dict, label: str, *, seed: int, steps: int | None,
                 target: tuple) -> None:
    """The std of ``UNCERTAINTY_SAMPLES`` samples beside the error of their mean, and one
    sentence of numbers (inside the evaluation region); the U-Net gets a sentence instead."""
    from ..metrics import sample_uncertainty

    model, cfg = bundle[0], bundle[1]
    n = UNCERTAINTY_SAMPLES
    if cfg.kind != "diffusion":
        ctx.doc.p("No uncertainty map: the U-Net baseline is deterministic (one prediction, nothing to sample).")
        return
    t0 = time.perf_counter()
    mean_img, std_img, _ = sample_on_ct_grid(model, cfg, case, site.device, steps=steps, seed=seed, num_samples=n)
    mean, std = _lps_array(mean_img)[a["crop"]], _lps_array(std_img)[a["crop"]]
    u = sample_uncertainty(mean, std, a["ref"], a["em"])
    figure(ctx, f"{site.name}: sample std and error of held-out case {label}", f"site_{site.name}_uncertainty.png",
           "uncertainty_slices_figure", a["ct"], std, abs(mean - a["ref"]), a["spacing"],
           title=f"{site.name} / {label}: where the model is unsure vs where it is wrong", samples=n,
           target=target[0], target_name=target[1], dose=a["ref"] if a["ref"].max() > 0 else a["pred"],
           eval_mask=a["em"])
    rho = "n/a (the std or the error is the same everywhere)" if math.isnan(u["spearman"]) else f"{u['spearman']:.2f}"
    ctx.doc.p(f"Uncertainty of case {label} from {n} samples (prediction seed {seed}), inside the evaluation region: "
              f"Spearman's rho between the sample std and |mean - reference| {rho}, mean std {u['mean_std_gy']:.3f} Gy, "
              f"and the reference lies within mean +- 2 std in {100 * u['coverage']:.1f} % of the voxels (calibration).")
    log.debug("report: %d samples of site %s in %.2f s", n, site.name, time.perf_counter() - t0)


def _dvh_points_table(ctx: ReportContext, a: dict, structs: dict, targets: list[str], vcc: float) -> None:
    from ..dvh import dvh_points

    rows = []
    for n, m in structs.items():
        is_t = n in targets
        pr, pp = dvh_points(a["ref"], m, vcc, is_t), dvh_points(a["pred"], m, vcc, is_t)
        key = "D95" if is_t else "D_0.1cc"
        rows.append([n, "target" if is_t else "OAR", fmt(pr["Dmean"], "gy"), fmt(pp["Dmean"], "gy"),
                     key.replace("_", ""), fmt(pr[key], "gy"), fmt(pp[key], "gy")])
    if rows:
        ctx.doc.table(["structure", "type", "Dmean ref (Gy)", "Dmean pred (Gy)", "DVH point", "ref (Gy)", "pred (Gy)"],
                      rows)


def _bbox(mask, margin: int = 4) -> tuple[slice, ...]:
    import numpy as np

    if not mask.any():
        return tuple(slice(None) for _ in mask.shape)
    out = []
    for ax in range(mask.ndim):
        idx = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))[0]
        out.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin + 1, mask.shape[ax])))
    return tuple(out)
