"""Personalization learning rate (issue #25 follow-up): a cross-site bench run's global model
fine-tuned at one site (4 epochs per stage, both stages, as the run did) at a given learning rate;
the official dose and DVH scores of the global and the fine-tuned model on the site's held-out
patients, one JSON line on stdout.

    python bench/personalize_lr.py SITE LR [--work runs/openkbp_bench_cross_site_default]
                                           [--run cross_site_tumour-size_both]

Run after ``bench/cross_site_bench.py`` (its site files and final model); with the site's own lr
it reproduces the run's personalized row. Writes its state under /tmp, never the run's.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from addiff_core.checkpoint import load_checkpoint
from addiff_core.config import load_site_config
from addiff_core.personalize import evaluate_at_home, fine_tune
from addiff_core.site_task import SiteTask, state_to_arrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("site")
    ap.add_argument("lr", type=float)
    ap.add_argument("--work", type=Path, default=Path("runs/openkbp_bench_cross_site_default"))
    ap.add_argument("--run", default="cross_site_tumour-size_both")
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    state, cfg, _ = load_checkpoint(args.work / "runs" / args.run / "final_model.pt")
    g = state_to_arrays(state)
    site = load_site_config(args.work / "sites" / f"{args.site}.yaml")
    site = replace(site, state_dir=Path(tempfile.mkdtemp(prefix="addiff-plr-")),
                   training=replace(site.training, lr=args.lr))
    task = SiteTask(site, cfg)
    t = time.perf_counter()
    base = evaluate_at_home(task, g, seed=0)
    res = evaluate_at_home(task, fine_tune(task, g, epochs=args.epochs, which="both", seed=0, run_tag="plr"), seed=0)
    print(json.dumps({"site": args.site, "lr": args.lr, "run": args.run,
                      "global": base["openkbp_dose_score"], "personalized": res["openkbp_dose_score"],
                      "global_dvh": base["openkbp_dvh_score"], "personalized_dvh": res["openkbp_dvh_score"],
                      "s": time.perf_counter() - t}))


if __name__ == "__main__":
    main()
