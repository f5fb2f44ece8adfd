"""Does the sampled uncertainty rank the errors, and does that depend on the sampling seed?
(issue #24, point 5)

For each checkpoint and sampling seed, runs ``addiff predict --samples S --seed SEED`` (what the
OpenKBP bench's uncertainty task runs with seed 0) on the held-out patients of an OpenKBP bench
split, then Spearman(std, |mean - reference|) and the share of voxels within mean +- 2 std inside
the possible-dose mask (``openkbp_tasks.uncertainty_in_mask``). Also, per patient, the mean dose
of the mean prediction in the primary target over its prescription, beside the reference's:
a model that misjudges the whole plan's level has errors no local sample spread can rank. A
U-Net checkpoint (deterministic) gets the levels only.

    python bench/uncertainty_seeds.py x1=runs/openkbp_bench/runs/federated_addiff/final_model.pt \\
        x3=runs/openkbp_bench/runs_x3/federated_addiff/final_model.pt \\
        unet_x1=runs/openkbp_bench/runs/federated_unet/final_model.pt \\
        --cases-dir runs/openkbp_bench/cases --seeds 0,1,2 --out bench/results/uncertainty_seeds.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from openkbp_tasks import uncertainty_in_mask  # noqa: E402


def primary_level(dose, case) -> float:
    """Mean dose (Gy) in the plan's primary target over its prescription."""
    import SimpleITK as sitk

    name = case.plan.targets[0]
    mask = sitk.GetArrayFromImage(case.masks[name]).astype(bool)
    return float(np.asarray(dose)[mask].mean() / case.plan.prescriptions[name])


def patient_row(predictor, case_dir: Path, seed: int, samples: int, work: Path) -> dict:
    """One held-out patient: the uncertainty numbers and the primary target's level
    (``predictor``: ``predict.Predictor``, what ``addiff predict --force`` runs)."""
    import SimpleITK as sitk

    from addiff_core.case_io import load_case
    from addiff_core.regions import region_array

    written = predictor.predict(case_dir, work / case_dir.name, samples=samples, seed=seed, overwrite=True,
                                force=True).written
    case = load_case(case_dir)
    mean = sitk.GetArrayFromImage(sitk.ReadImage(written["dose"])).astype(np.float64)
    ref = case.array("dose").astype(np.float64)
    row = {"case_id": case_dir.name, "spearman": None, "calibration_2std": None,
           "primary_level_pred": primary_level(mean, case), "primary_level_ref": primary_level(ref, case)}
    if "uncertainty" in written:
        std = sitk.GetArrayFromImage(sitk.ReadImage(written["uncertainty"])).astype(np.float64)
        row.update(uncertainty_in_mask(mean, std, ref, region_array(case)))
    return row


def heldout_patients(bench_json: Path) -> list[str]:
    """The held-out patients of every site of an OpenKBP bench result's split."""
    return [pid for s in json.loads(bench_json.read_text())["split"] for pid in s["heldout"]]


def summary_rows(results: dict) -> list[list]:
    rows = []
    for name, per_seed in results.items():
        for seed, pts in per_seed.items():
            rho = [p["spearman"] for p in pts if p["spearman"] is not None]
            cal = [p["calibration_2std"] for p in pts if p["calibration_2std"] is not None]
            level = np.mean([abs(p["primary_level_pred"] - p["primary_level_ref"]) for p in pts])
            rows.append([name, seed, len(pts), *((np.mean(rho), min(rho), max(rho), 100 * np.mean(cal)) if rho
                                                 else ("-",) * 4), level])
    return rows


def render(doc: dict) -> str:
    """The result file's Markdown: per model and seed, then per patient (first seed)."""
    results, patients = doc["results"], doc["patients"]
    table = common.md_table(["model", "seed", "patients", "Spearman mean", "min", "max", "within +-2 std (%)",
                             "mean abs(target level - reference's)"], summary_rows(results))
    first = {name: next(iter(per_seed.values())) for name, per_seed in results.items()}
    sampled = [n for n in first if any(p["spearman"] is not None for p in first[n])]
    levels = common.md_table(["patient", *(f"{n} rho" for n in sampled), *(f"{n} target mean / Rx" for n in first),
                              "reference target mean / Rx"],
                             [[pid, *(first[n][i]["spearman"] for n in sampled),
                               *(first[n][i]["primary_level_pred"] for n in first),
                               next(iter(first.values()))[i]["primary_level_ref"]]
                              for i, pid in enumerate(patients)])
    return f"{table}\n\nFirst seed, per patient:\n\n{levels}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="NAME=CHECKPOINT")
    ap.add_argument("--cases-dir", type=Path, required=True, help="the bench's imported cases (WORK/cases)")
    ap.add_argument("--bench-json", type=Path, default=common.DEFAULT_OUT / "openkbp_bench.json",
                    help="the OpenKBP bench result whose split names the held-out patients")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=common.DEFAULT_OUT / "uncertainty_seeds.json")
    args = ap.parse_args(argv)
    common.quiet_warnings()
    common.apply_threads(1)
    from addiff_core.predict import Predictor

    models = dict(m.split("=", 1) for m in args.models)
    patients = heldout_patients(args.bench_json)
    results: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory(prefix="addiff-unc-") as tmp:
        for name, ckpt in models.items():
            predictor = Predictor(Path(ckpt), "cpu")  # loaded once per model
            sampled = predictor.cfg.kind == "diffusion"  # the U-Net predicts one dose: its levels only
            for seed in common.parse_list(args.seeds, int) if sampled else [0]:
                samples = args.samples if sampled else 1
                common.progress(f"{name} seed {seed}: {len(patients)} patients x {samples} sample(s)")
                results.setdefault(name, {})[str(seed)] = [
                    patient_row(predictor, args.cases_dir / pid, seed, samples, Path(tmp)) for pid in patients]
    doc = {"machine": common.machine_info("cpu"), "when": common.now_iso(), "models": models,
           "samples": args.samples, "patients": patients, "results": results}
    common.write_json(args.out, doc)
    common.write_text(args.out.with_suffix(".md"), render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
