"""Where along its long axis does a model miss the targets' dose? (issue #24)

For each checkpoint and each held-out case of the site files, on the model grid (units of the
prescription): the mean of prediction - reference over the target voxels, binned by their
distance from the targets' central slice (the cranio-caudal axis, the long one of head-and-neck
targets), summed over all cases. For an ADDiff-Dose checkpoint also its oracle, decode(encode(the
reference dose)) (plan-normalised as its predictions are), which tells the VAE's share from the
diffusion's. One sample per case, seed = the case's index (as ``training.evaluate``).

    python bench/target_falloff.py addiff=RUN/final_model.pt unet=RUN_UNET/final_model.pt \\
        --sites WORK/sites/openkbp_*.yaml --out bench/results/target_falloff.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from latent_probe import site_samples  # noqa: E402  (bench/latent_probe.py)

BIN_EDGES_MM = (0.0, 20.0, 40.0, 60.0, 80.0, float("inf"))


def distance_bins(targets: np.ndarray, slice_mm: float, edges_mm=BIN_EDGES_MM) -> np.ndarray:
    """Per voxel of a (Z, Y, X) target mask, the index of its slice's distance bin from the
    targets' central slice (``edges_mm``: [lo, hi) in mm), -1 outside the targets (and everywhere
    when there is no target)."""
    inside = targets > 0
    out = np.full(inside.shape, -1, dtype=np.int64)
    zs = np.nonzero(inside.any(axis=(1, 2)))[0]
    if zs.size == 0:
        return out
    dist = np.abs(np.arange(inside.shape[0]) - (zs.min() + zs.max()) / 2.0) * float(slice_mm)
    per_slice = np.searchsorted(np.asarray(edges_mm[1:-1], dtype=float), dist, side="right")
    out[inside] = np.broadcast_to(per_slice[:, None, None], inside.shape)[inside]
    return out


def binned_sum(bins: np.ndarray, n: int, values: np.ndarray | None = None) -> np.ndarray:
    """Per bin of ``bins`` (:func:`distance_bins`; -1 left out) the sum of ``values``, or the
    voxel count when None; ``n`` bins."""
    sel = bins >= 0
    return np.bincount(bins[sel], weights=None if values is None else values[sel], minlength=n)[:n].astype(float)


def _predictions(model, cfg, batch, seed: int) -> dict[str, np.ndarray]:
    import torch

    from addiff_core import diffusion as D
    from addiff_core.plan_normalisation import plan_normalised
    from addiff_core.training import predict_normalised

    with torch.no_grad():
        out = {"prediction": predict_normalised(model, batch, cfg, seed=seed)[0]}
        if hasattr(D.unwrap(model), "diffusion"):
            oracle = D.decoded_dose(model, D.encode_dose(model, batch["dose"]), batch)
            out["oracle"] = plan_normalised(oracle, batch, cfg.plan_normalisation)
    return {k: v[0, 0].numpy() for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = common.checkpoint_sites_parser(__doc__)
    args = ap.parse_args(argv)
    common.quiet_warnings()
    import torch

    from addiff_core.predict import load_model

    labels = [f"{e[0]:g}-{e[1]:g} mm" if np.isfinite(e[1]) else f">= {e[0]:g} mm"
              for e in zip(BIN_EDGES_MM[:-1], BIN_EDGES_MM[1:])]
    results, rows = {}, []
    heldout: dict[tuple, list[dict]] = {}  # (site file, grid) -> its held-out samples, loaded once
    for label, ckpt in (m.split("=", 1) for m in args.models):
        model, cfg, _ = load_model(Path(ckpt), torch.device("cpu"))
        if cfg.grid.spacing is None:
            ap.error(f"{ckpt}: its model grid takes each CT's own spacing; distances need a fixed one")
        sums: dict[str, np.ndarray] = {}
        counts = np.zeros(len(labels))
        for site in args.sites:
            key = (site, cfg.grid)
            if key not in heldout:
                heldout[key] = site_samples(site, cfg.grid)[0]
            for i, sample in enumerate(heldout[key]):
                batch = {k: v[None] for k, v in sample.items()}
                ref = batch["dose"][0, 0].numpy()
                bins = distance_bins(batch["targets"][0, 0].numpy(), cfg.grid.spacing[2])
                counts += binned_sum(bins, len(labels))
                for kind, pred in _predictions(model, cfg, batch, i).items():
                    sums[kind] = sums.get(kind, 0) + binned_sum(bins, len(labels), pred - ref)
        means = {kind: (s / np.maximum(counts, 1)).tolist() for kind, s in sums.items()}
        results[label] = {"checkpoint": ckpt, "voxels": counts.astype(int).tolist(), "mean_error_rx": means}
        rows += [[label, kind, *v] for kind, v in means.items()]
    text = common.md_table(["model", "dose", *labels], rows, nd=3)
    print(text)
    if args.out:
        common.write_json(args.out, {"machine": common.machine_info("cpu"), "bins_mm": labels, "models": results,
                                     "when": common.now_iso()})
        common.write_text(args.out.with_suffix(".md"), text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
