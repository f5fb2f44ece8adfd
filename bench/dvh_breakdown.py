"""Which DVH points make a model's OpenKBP DVH score, and in which direction? (issue #24)

For each checkpoint and each held-out case of the site files: ``addiff predict`` (one sample,
seed 0), the prediction set to 0 outside the evaluation region (as the official scores do), then
the *signed* OpenKBP DVH-point errors (``common.openkbp_case_scores(..., signed=True)``: prediction
minus reference, Gy; targets D99 / D95 / D1, OARs D_0.1cc / mean). Per point kind: cells, mean
|error|, mean signed error, and its share of the DVH score (sum |error| / all cells), so a gap
between two models can be read as "cold targets" or "hot OARs".

    python bench/dvh_breakdown.py addiff=RUN/final_model.pt unet=RUN_UNET/final_model.pt \\
        --sites WORK/sites/openkbp_*.yaml --out bench/results/dvh_breakdown.json
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from addiff_core.case_io import load_case  # noqa: E402
from addiff_core.predict import predict_case  # noqa: E402
from latent_probe import site_case_dirs  # noqa: E402  (bench/latent_probe.py)

KINDS = ("D99", "D95", "D1", "D_0.1cc", "mean")


def signed_errors(checkpoint: Path, case_dir: Path, work: Path) -> dict[str, float]:
    """Signed DVH-point errors of one predicted case (see the module docstring)."""
    import SimpleITK as sitk

    written = predict_case(checkpoint, case_dir, work / case_dir.name, samples=1, seed=0, device="cpu",
                           overwrite=True, force=True)
    return common.openkbp_case_scores(load_case(case_dir), sitk.ReadImage(written["dose"]), signed=True)[1]


def breakdown(errors: list[float], kinds: list[str]) -> dict[str, dict[str, float]]:
    """Per point kind: cells, mean |error|, mean signed error, share of the DVH score (Gy)."""
    e, k = np.asarray(errors, float), np.asarray(kinds)
    out = {}
    for kind in KINDS:
        sel = e[k == kind]
        if sel.size:
            out[kind] = {"cells": int(sel.size), "mean_abs": float(np.abs(sel).mean()),
                         "mean_signed": float(sel.mean()), "share_of_score": float(np.abs(sel).sum() / e.size)}
    out["all"] = {"cells": int(e.size), "mean_abs": float(np.abs(e).mean()), "mean_signed": float(e.mean()),
                  "share_of_score": float(np.abs(e).mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = common.checkpoint_sites_parser(__doc__)
    args = ap.parse_args(argv)
    common.quiet_warnings()
    models = dict(m.split("=", 1) for m in args.models)
    cases = [d for s in args.sites for d in site_case_dirs(s)[1]]
    results, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="addiff-dvh-") as tmp:
        for label, ckpt in models.items():
            errs = {d.name: signed_errors(Path(ckpt), d, Path(tmp) / label) for d in cases}
            flat = [(v, key.rsplit("/", 1)[1]) for per in errs.values() for key, v in per.items()]
            results[label] = {"checkpoint": ckpt, "per_case": errs,
                              "by_point": breakdown([v for v, _ in flat], [k for _, k in flat])}
            rows += [[label, kind, b["cells"], b["mean_abs"], b["mean_signed"], b["share_of_score"]]
                     for kind, b in results[label]["by_point"].items()]
    text = common.md_table(["model", "DVH point", "cells", "mean abs error (Gy)", "mean signed error (Gy)",
                            "share of the DVH score (Gy)"], rows)
    print(text)
    if args.out:
        common.write_json(args.out, {"machine": common.machine_info("cpu"), "cases": [d.name for d in cases],
                                     "models": results, "when": common.now_iso()})
        common.write_text(args.out.with_suffix(".md"), text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
