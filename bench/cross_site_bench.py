"""Cross-site matrix on real anatomy (issue #25.3): the OpenKBP patients as three hospitals,
every model on every site's held-out patients.

    python bench/cross_site_bench.py [--budget small|default] [--split spacing|tumour-size]
                                     [--personalize-epochs N] [--personalize-stages both,diffusion]
                                     [--sample PATH] [--extra PATH|none] [--heldout N] [--work DIR]
                                     [--out DIR] [--threads N] [--no-pooled] [--reuse]

1. The patients, the budget, the model config and the site files exactly as
   ``bench/openkbp_bench.py`` makes them (84 patients with the extra pool, 24 without), split
   into three sites by in-plane voxel spacing (``--split spacing``, the same split as that bench)
   or by the volume of the highest-dose target (``--split tumour-size``: smallest third, middle,
   largest; a more heterogeneous split). Every site file here says
   ``share_models_for_evaluation: true`` (one machine: the full matrix).
2. For each ``--personalize-stages`` value one ``addiff simulate --cross-site --set
   personalize-epochs=N --set personalize-stages=S`` with the budget's rounds (1 local epoch per
   round): the global model, each site's local model (the site alone with the same budget,
   trained in the same run) and each site's personalized model, each evaluated on every site's
   held-out patients with the official OpenKBP dose and DVH scores (gamma off). The first value's
   run gives the matrix; the others add their personalized rows (``<site> personalized
   (diffusion)``).
3. Pooled: ``addiff train --site pooled.yaml`` with the same epochs (the union of the training
   patients), evaluated on each site's held-out patients (``local.evaluate_checkpoint``).
4. ``OUT/cross_site_bench_<split>.json`` / ``.md``: the matrix (MAE, dose score, DVH score,
   isodose Dice) and per site whether the personalized model beats the global one, the global the
   local one, and the pooled the global one (dose score).

``--reuse`` keeps a federated run or the pooled model that a previous call finished (its
``final_metrics.json`` / ``model.pt`` is there): a crash after hours loses only the unfinished step.
``--budget small`` (32^3, 1 + 1 epochs) checks the pipeline in minutes; its results go to
``WORK/results``. Without the OpenKBP sample the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import openkbp_bench as ob  # noqa: E402

SPLITS = ("spacing", "tumour-size")
STAGES = ("both", "diffusion")
WALL_FILE = "bench_wall_seconds.json"  # a federated run's wall time, kept for --reuse
KEY = "openkbp_dose_score"  # the verdicts' metric (the official OpenKBP one)


def target_volume_cc(case_dir: Path) -> float:
    """Volume (cc) of the case's highest-prescription target."""
    import numpy as np

    from addiff_core.case_io import load_case

    case = load_case(case_dir)
    mask = case.array(case.plan.targets[0]) > 0
    sx, sy, sz = case.ct.GetSpacing()
    return float(np.count_nonzero(mask) * sx * sy * sz / 1000.0)


def split_by_key(value: Mapping[str, float], names: Sequence[str] = ob.SITE_NAMES) -> list[list[str]]:
    """Patients sorted by ``value`` (ties: patient number), cut into contiguous thirds."""
    order = sorted(value, key=lambda p: (value[p], ob.natural_key(p)))
    n = len(order)
    cuts = [round(i * n / len(names)) for i in range(len(names) + 1)]
    return [order[cuts[i]:cuts[i + 1]] for i in range(len(names))]


def make_split(kind: str, spacings: Mapping[str, Sequence[float]], cases_dir: Path, n_heldout: int) -> list[dict]:
    """The three sites: ``openkbp_bench.make_split`` (spacing) or by target volume (tumour-size)."""
    if kind == "spacing":
        return ob.make_split(spacings, n_heldout=n_heldout)
    vols = {p: target_volume_cc(cases_dir / p) for p in spacings}
    out = []
    for k, (name, group) in enumerate(zip(ob.SITE_NAMES, split_by_key(vols))):
        held = ob.choose_heldout(group, n_heldout, ob.SPLIT_SEED, k)
        out.append({"site": name, "patients": list(group), "heldout": held, "train": [p for p in group if p not in held],
                    "target_volume_cc": {p: round(vols[p], 2) for p in group},
                    "in_plane_spacing_mm": {p: ob.in_plane_spacing(spacings[p]) for p in group},
                    "slice_spacing_mm": {p: round(float(spacings[p][2]), 6) for p in group}})
    return out


def sharing(site_files: list[Path]) -> list[Path]:
    """Each site file with ``share_models_for_evaluation: true`` added (one machine: full matrix)."""
    for f in site_files:
        text = f.read_text()
        if "share_models_for_evaluation" not in text:
            f.write_text(text + "share_models_for_evaluation: true\n")
    return site_files


def simulate(args, setup: dict, stages: str, run_dir: Path, log: Path) -> tuple[int, float]:
    b = setup["budget"]
    cmd = [sys.executable, "-m", "addiff_core.cli", "simulate", "--site-files",
           ",".join(str(f) for f in setup["site_files"]), "--config", str(setup["cfg_file"]),
           "--rounds", f"{b['vae_epochs']},{b['diffusion_epochs']}", "--local-epochs", "1", "--no-gamma",
           "--run-dir", str(run_dir), "--set", f"personalize-epochs={args.personalize_epochs}",
           "--set", f"personalize-stages={stages}", "--set", "report-figures=true"]
    if stages == args.personalize_stages[0]:
        cmd.append("--cross-site")
    rc, wall, _ = ob.run_step(cmd, log, threads=args.threads)
    return rc, wall


def finished_run(run_dir: Path, cross_site: bool) -> bool:
    """A federated run a previous call finished: its final table (and matrix) written."""
    need = ["final_metrics.json"] + (["cross_site.json"] if cross_site else [])
    return all((run_dir / name).is_file() for name in need)


def pooled(args, setup: dict, run_dir: Path, log: Path) -> dict[str, dict]:
    """The pooled model's held-out means at each site ({} if it failed)."""
    from addiff_core.local import evaluate_checkpoint

    b = setup["budget"]
    cmd = [sys.executable, "-m", "addiff_core.cli", "train", "--site", str(setup["pooled_file"]), "--out", str(run_dir),
           "--config", str(setup["cfg_file"]), "--vae-epochs", str(b["vae_epochs"]),
           "--diffusion-epochs", str(b["diffusion_epochs"]), "--overwrite"]
    if not (args.reuse and (run_dir / "model.pt").is_file()):
        rc, _, _ = ob.run_step(cmd, log, threads=args.threads)
        if rc != 0:
            return {}
    return {f.stem: {"cases": r["num_cases"], **r["mean"]}
            for f in setup["site_files"] for r in [evaluate_checkpoint(run_dir / "model.pt", f)]}


def assemble(doc: dict, extra_personalized: dict[str, dict], pooled_cells: dict[str, dict]) -> dict:
    """The matrix of ``cross_site.json`` plus the pooled row and the other personalizations' rows."""
    from addiff_core.cross_site import cell_of

    doc = json.loads(json.dumps(doc))
    for stages, per_site in extra_personalized.items():
        for site, cell in per_site.items():
            name = f"{site} personalized ({stages})"
            doc["models"].append({"model": name, "kind": "personalized", "owner": site, "shared": False,
                                  "evaluated": "at home only", "status": "ok"})
            doc["cells"].append({"model": name, "site": site, "at": "home", **cell})
    if pooled_cells:
        doc["models"].append({"model": "pooled", "kind": "pooled", "owner": None, "shared": True,
                              "evaluated": "every site", "status": "ok"})
        doc["cells"] += [{"model": "pooled", "site": s, "at": "home", **cell_of(m, int(m["cases"]))}
                         for s, m in pooled_cells.items()]
    return doc


def verdict_rows(doc: dict) -> list[dict]:
    from addiff_core.cross_site import grid_of, verdicts

    models, sites, vals = grid_of(doc, KEY)
    pooled_row = dict(zip(sites, vals[models.index("pooled")])) if "pooled" in models else {}
    out = []
    for v in verdicts(doc, KEY):
        p = pooled_row.get(v["site"])
        v["pooled"] = p
        v["pooled_beats_global"] = None if p is None or p != p or v["global"] != v["global"] else p < v["global"]
        out.append(v)
    return out


def markdown(res: dict) -> str:
    from addiff_core.cross_site import MATRIX_METRICS, grid_of
    from addiff_core.formats import markdown_table

    doc = res["matrix"]
    lines = [f"# Cross-site matrix, OpenKBP ({res['patients']} patients, split by {res['split']}, budget "
             f"{res['budget']})", "", res["what"], ""]
    for key, title in MATRIX_METRICS:
        models, sites, vals = grid_of(doc, key)
        lines += [f"## {title}", "", markdown_table(["model", *sites], [[m, *[f"{x:.3f}" if x == x else "-" for x in row]]
                                                                       for m, row in zip(models, vals)]), ""]
    yn = {True: "yes", False: "no", None: "n/a"}
    lines += [f"## Verdicts ({KEY}, each site's own held-out patients)", "", markdown_table(
        ["site", "global", "personalized", "local", "pooled", "personalized beats global", "global beats local",
         "pooled beats global"],
        [[v["site"], *[f"{v[k]:.3f}" if v[k] is not None and v[k] == v[k] else "-"
                       for k in ("global", "personalized", "local", "pooled")],
          yn[v["personalized_beats_global"]], yn[v["global_beats_local"]], yn[v["pooled_beats_global"]]]
         for v in res["verdicts"]]), ""]
    lines += [f"Seconds: {json.dumps(res['seconds'])}", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", choices=tuple(ob.BUDGETS), default="default")
    p.add_argument("--split", choices=SPLITS, default="spacing")
    p.add_argument("--personalize-epochs", type=int, default=None,
                   help="fine-tuning epochs per stage (default: the budget's diffusion epochs)")
    p.add_argument("--personalize-stages", default="both", help="comma list of both, diffusion (the first: matrix)")
    p.add_argument("--sample", type=Path, default=ob.DEFAULT_SAMPLE)
    p.add_argument("--extra", default=None)
    p.add_argument("--heldout", type=int, default=None)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-pooled", action="store_true")
    p.add_argument("--reuse", action="store_true", help="keep the federated runs / pooled model a previous call finished")
    args = p.parse_args(argv)
    args.personalize_stages = [s.strip() for s in args.personalize_stages.split(",") if s.strip()]
    if not args.personalize_stages or any(s not in STAGES for s in args.personalize_stages):
        p.error(f"--personalize-stages: a comma list of {', '.join(STAGES)}")
    args.scale, args.methods, args.child, args.render_only = 1.0, list(ob.METHODS), None, False
    return args


def prepare(args, t0: float) -> dict | None:
    """Patients imported, split, site files (sharing) and the model config, as openkbp_bench."""
    from addiff_core.config import load_model_config

    budget = ob.scaled_budget(args.budget, 1.0)
    work = (args.work or Path(f"{ob.DEFAULT_WORK}_cross_site_{args.budget}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sample_p, extra_p, _, _ = ob.load_patients(args, args.sample.expanduser(), work, t0)
    patients = {**sample_p, **extra_p}
    n_heldout = args.heldout if args.heldout is not None else (ob.HELDOUT_WITH_EXTRA if extra_p else ob.N_HELDOUT)
    imported, skipped = ob.import_all(patients, work / "cases")
    if skipped:
        print(f"cross_site_bench: skipped {skipped}", file=sys.stderr)
        return None
    split = make_split(args.split, ob.read_spacings(patients), work / "cases", n_heldout)
    site_files, pooled_file = ob.write_site_files(work, work / "cases", split, budget)
    cfg_file = ob.model_config_file(budget, work)
    load_model_config(cfg_file)
    return {"budget": budget, "work": work, "split": split, "site_files": sharing(site_files),
            "pooled_file": pooled_file, "cfg_file": cfg_file, "patients": len(patients),
            "out": (args.out or (ob.DEFAULT_OUT if args.budget == "default" else work / "results")).resolve()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.sample.expanduser().is_dir():
        print(f"OpenKBP sample not found at {args.sample}; skipping", flush=True)
        return 0
    t0 = time.perf_counter()
    setup = prepare(args, t0)
    if setup is None:
        return 1
    b, work = setup["budget"], setup["work"]
    if args.personalize_epochs is None:
        args.personalize_epochs = int(b["diffusion_epochs"])
    seconds: dict[str, float] = {}
    runs: dict[str, Path] = {}
    for stages in args.personalize_stages:
        runs[stages] = work / "runs" / f"cross_site_{args.split}_{stages}"
        if args.reuse and finished_run(runs[stages], cross_site=stages == args.personalize_stages[0]):
            ob._progress(t0, f"federated run, personalize-stages {stages}: kept {runs[stages]}")
            seconds[f"federated_{stages}"] = json.loads((runs[stages] / WALL_FILE).read_text())["seconds"] \
                if (runs[stages] / WALL_FILE).is_file() else float("nan")
            continue
        if runs[stages].exists():
            import shutil

            shutil.rmtree(runs[stages])
        ob._progress(t0, f"federated run, personalize-stages {stages} -> {runs[stages]} ...")
        rc, seconds[f"federated_{stages}"] = simulate(args, setup, stages, runs[stages], work / "logs" / f"sim_{args.split}_{stages}.log")
        (runs[stages] / WALL_FILE).write_text(json.dumps({"seconds": seconds[f"federated_{stages}"]}) + "\n")
        if rc != 0:
            print(f"cross_site_bench: addiff simulate failed (status {rc}); log {work / 'logs'}", file=sys.stderr)
            return 1
    first = args.personalize_stages[0]
    matrix = json.loads((runs[first] / "cross_site.json").read_text())
    extra = {}
    for stages in args.personalize_stages[1:]:
        from addiff_core.cross_site import cell_of

        rows = json.loads((runs[stages] / "final_metrics.json").read_text())
        extra[stages] = {r["site"]: cell_of({k[len("personalized_"):]: v for k, v in r.items()
                                             if k.startswith("personalized_")}, int(r.get("cases", 0))) for r in rows}
    pooled_cells: dict[str, dict] = {}
    if not args.no_pooled:
        ob._progress(t0, "pooled model ...")
        t = time.perf_counter()
        # one folder per split: --reuse must never take another split's pooled model
        pooled_cells = pooled(args, setup, work / "runs" / f"pooled_{args.split}", work / "logs" / f"pooled_{args.split}.log")
        seconds["pooled"] = time.perf_counter() - t
    doc = assemble(matrix, extra, pooled_cells)
    res = {"bench": "cross_site_bench", "split": args.split, "budget": args.budget, "patients": setup["patients"],
           "personalize_epochs": args.personalize_epochs, "personalize_stages": args.personalize_stages,
           "what": (f"global: {b['vae_epochs']} VAE + {b['diffusion_epochs']} diffusion rounds of 1 local epoch; local: "
                    "each site alone with the same epochs, trained in the same run; personalized: the global model "
                    f"fine-tuned {args.personalize_epochs} epoch(s) per stage at the site ({first}); pooled: every "
                    "training patient in one place, the same epochs. Official OpenKBP scores, gamma off."),
           "split_detail": setup["split"], "matrix": doc, "verdicts": verdict_rows(doc), "seconds": seconds,
           "runs": {k: str(v) for k, v in runs.items()}}
    out = setup["out"]
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cross_site_bench_{args.split.replace('-', '_')}"
    from addiff_core.formats import json_safe

    (out / f"{stem}.json").write_text(json.dumps(json_safe(res), indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    ob._progress(t0, f"results: {out / stem}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
