"""Does ADDiff-Dose's diffusion decide its prediction? (issue #24)

For a trained checkpoint and a set of cases, prints per case and on average the MAE (model grid,
inside the evaluation region, in units of the prescription) of the dose decoded from:

  sampled   the latent the diffusion samples (what ``addiff predict`` does)
  zero      z = 0 (no diffusion at all)
  oracle    the reference dose's own latent, decode(encode(dose)) (the best the latent path can do)
  shuffled  another case's encoded dose

and the spread of ``--samples`` samples (mean voxel std / mean reference dose, in the region).
A latent diffusion whose diffusion matters has oracle << sampled << zero, shuffled.

    python bench/latent_probe.py runs/simulation-.../final_model.pt demo_data/hospital_*.yaml
    python bench/latent_probe.py CHECKPOINT path/to/cases_folder --split all

CASES: site files (their held-out cases; ``--split train`` their training cases) or folders of
case folders (every case in them). Writes ``--out`` (JSON + Markdown) when given.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from addiff_core import latent_probe  # noqa: E402
from addiff_core.case_io import list_cases  # noqa: E402
from addiff_core.config import load_site_config  # noqa: E402
from addiff_core.data import load_samples, split_case_ids  # noqa: E402
from addiff_core.predict import load_model  # noqa: E402


def site_case_dirs(site_file: Path, split: str = "heldout") -> tuple[str, list[Path]]:
    """The site's name and the case folders of its ``split`` (heldout, train or all: train then
    held-out), split as the site splits them (``data.split_case_ids``)."""
    site = load_site_config(site_file)
    by_id = {d.name: d for d in list_cases(site.data_dir)}
    train, held = split_case_ids(list(by_id), site.heldout)
    return site.name, [by_id[i] for i in {"heldout": held, "train": train, "all": train + held}[split]]


def site_samples(site_file: Path, grid, split: str = "heldout") -> tuple[list[dict], list[str]]:
    """The samples of one site file's ``split`` (:func:`site_case_dirs`) and their ids
    (``SITE/CASE``), loading only the cases asked for."""
    name, dirs = site_case_dirs(site_file, split)
    ds = load_samples(dirs, grid, True, {})
    return [ds[i] for i in range(len(ds))], [f"{name}/{c}" for c in ds.case_ids]


def load_probe_cases(sources: list[Path], grid, split: str) -> tuple[list[dict], list[str]]:
    """Samples and ids of every case named by ``sources`` (site files or case folders)."""
    samples, ids = [], []
    for src in sources:
        if src.suffix in (".yaml", ".yml"):
            got, names = site_samples(src, grid, split)
        else:
            ds = load_samples(list_cases(src), grid, require_dose=True, skipped={})
            got, names = [ds[i] for i in range(len(ds))], list(ds.case_ids)
        samples += got
        ids += names
    return samples, ids


def report(rows: list[latent_probe.CaseProbe], summary: dict) -> str:
    cols = [*latent_probe.VARIANTS, "spread"]
    table = [[r.case_id, *(r.mae[k] for k in latent_probe.VARIANTS), r.spread] for r in rows]
    table.append(["**mean**", *(summary[k] for k in cols)])
    text = common.md_table(["case", *cols], table, nd=4)
    return (text + f"\n\noracle / sampled = {summary['oracle_over_sampled']:.3f} (the latent carries the dose "
            f"when small); min(zero, shuffled) / sampled = {summary['bypass_over_sampled']:.3f} (the diffusion "
            "decides the prediction when large)\n" + _plan_normalised_line(summary))


def _plan_normalised_line(summary: dict) -> str:
    if "bypass_over_sampled_plan_normalised" not in summary:
        return ""
    return ("with every decode plan-normalised as the model's predictions are: sampled "
            f"{summary['sampled_plan_normalised']:.4f}, z = 0 {summary['zero_plan_normalised']:.4f}, shuffled "
            f"{summary['shuffled_plan_normalised']:.4f}; min(zero, shuffled) / sampled = "
            f"{summary['bypass_over_sampled_plan_normalised']:.3f}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("cases", type=Path, nargs="+", help="site files (held-out cases) or folders of cases")
    ap.add_argument("--split", choices=("heldout", "train", "all"), default="heldout",
                    help="which cases of a site file (default: held-out)")
    ap.add_argument("--samples", type=int, default=4, help="samples for the spread (1: none)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="results file (JSON; a .md beside it)")
    args = ap.parse_args(argv)
    common.quiet_warnings()
    common.apply_threads(args.threads)
    model, cfg, _ = load_model(args.checkpoint, common.resolve_devices("cpu")[0])
    samples, ids = load_probe_cases(args.cases, cfg.grid, args.split)
    rows = latent_probe.probe_cases(model, samples, cfg, ids, num_samples=args.samples, steps=args.steps,
                                    seed=args.seed)
    summary = latent_probe.summarise(rows)
    text = report(rows, summary)
    print(text)
    if args.out:
        common.write_json(args.out, {"machine": common.machine_info("cpu"), "checkpoint": str(args.checkpoint),
                                     "cases": [str(c) for c in args.cases], "split": args.split,
                                     "samples": args.samples, "steps": args.steps or cfg.sample_steps,
                                     "rows": [{"case": r.case_id, **r.mae, "spread": r.spread} for r in rows],
                                     "summary": summary, "when": common.now_iso(),
                                     "finite": bool(np.isfinite(summary["sampled"]))})
        common.write_text(args.out.with_suffix(".md"), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
