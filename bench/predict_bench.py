"""Predict bench (issue 15): the whole ``addiff predict`` path per case, where its time goes, and
held-out quality next to each speed setting.

    python bench/predict_bench.py              # the OpenKBP benchmark's models (run openkbp_bench.py first)
    python bench/predict_bench.py --smoke      # tiny synthetic site, untrained models (the test uses this)
    python bench/predict_bench.py --device cuda --out bench/results/gpu

Writes ``OUT/predict_bench.json`` and ``OUT/predict_bench.md``. What is measured, in this process:

* **Settings**: ADDiff-Dose with ``--steps`` DDIM steps (default 1, 2, 5, 10) and the U-Net
  baseline, both the federated models of ``bench/openkbp_bench.py`` (64^3, 5 mm), on the 15
  held-out patients of its three sites. Each setting: ``predict.Predictor`` (the code behind
  ``addiff predict``) loads the checkpoint once, one untimed warm-up case, then ``--reps`` passes
  over every held-out case. Per case the seconds of each phase of the path (``check``, ``read``,
  ``preprocess``, ``model``, ``map_back``, ``write`` NIfTI, ``dvh`` tables) and, inside ``model``,
  ``condition`` (condition encoder), ``decode`` (VAE decoder) and the rest (DDIM denoising).
  The first pass's predictions are scored against the reference dose with the official OpenKBP
  dose score and the cohort DVH score (``common.openkbp_case_scores``).
* **Cold**: ``predict.predict_case`` for one case (checkpoint load + verification included), the
  ``addiff predict`` command in a new process (Python and torch start-up included) for one case
  and for the folder of held-out cases.
* **128^3**: the same model configs on a 128^3 grid at 2.5 mm (the same 320 mm cube), seeded
  untrained weights (speed only), on ``--cases-128`` held-out cases.
Wall seconds (medians; the machine may be shared: the load average is recorded).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import progress  # noqa: E402

PHASES = ("check", "read", "preprocess", "model", "map_back", "write", "dvh")
MODEL_PARTS = ("condition", "decode")


class ModelPartTimer:
    """Times the condition encoder and the VAE decoder inside the model phase by wrapping
    ``diffusion.decode_latent`` and the encoder's ``forward`` (restored by ``close``)."""

    def __init__(self, model, device) -> None:
        import addiff_core.diffusion as diff

        self.diff, self.device, self.parts = diff, device, {p: 0.0 for p in MODEL_PARTS}
        self._decode = diff.decode_latent
        diff.decode_latent = self._wrap(self._decode, "decode")
        self._cond = getattr(getattr(model, "diffusion", None), "cond", None)
        if self._cond is not None:
            self._cond_forward = self._cond.forward
            self._cond.forward = self._wrap(self._cond_forward, "condition")

    def _wrap(self, fn, part):
        def timed(*a, **k):
            common.sync(self.device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            common.sync(self.device)
            self.parts[part] += time.perf_counter() - t0
            return out
        return timed

    def take(self) -> dict[str, float]:
        out, self.parts = self.parts, {p: 0.0 for p in MODEL_PARTS}
        return out

    def close(self) -> None:
        self.diff.decode_latent = self._decode
        if self._cond is not None:
            self._cond.forward = self._cond_forward


def heldout_cases(bench_dir: Path) -> list[tuple[str, Path]]:
    """(site, case folder) of every held-out case of the OpenKBP bench's site files."""
    from addiff_core.config import load_site_config

    out = []
    for f in sorted((bench_dir / "sites").glob("*.yaml")):
        if f.stem == "pooled":
            continue
        site = load_site_config(f)
        out += [(site.name, site.data_dir / cid) for cid in site.heldout.case_ids]
    return out


def run_setting(name: str, checkpoint: Path, cases: list[tuple[str, Path]], steps: int | None, reps: int,
                device: str, work: Path, score: bool, force: bool = False) -> dict:
    """One speed setting: load once, warm up, ``reps`` passes over ``cases``; scores of pass 1.
    ``force``: an untrained stand-in model, whose implausible doses predict would refuse."""
    import SimpleITK as sitk

    from addiff_core.case_io import load_case
    from addiff_core.metrics import cohort_dvh_score
    from addiff_core.predict import Predictor

    pred = Predictor(checkpoint, device)
    timer = ModelPartTimer(pred.model, pred.device)
    pred.predict(cases[0][1], work / name / "warmup", steps=steps, overwrite=True, force=force)
    timer.take()
    per_case, dose_scores, dvh_errors = [], [], []
    try:
        for rep in range(reps):
            for site, case_dir in cases:
                p = pred.predict(case_dir, work / name / case_dir.name, steps=steps, overwrite=True, force=force)
                parts = timer.take()
                row = {"site": site, "case": case_dir.name, "rep": rep, "total": p.total_seconds, **p.seconds, **parts,
                       "denoise": p.seconds["model"] - sum(parts.values())}
                if score and rep == 0:
                    ds, errs = common.openkbp_case_scores(load_case(case_dir), sitk.ReadImage(p.written["dose"]))
                    row["dose_score"] = ds
                    dose_scores.append(ds)
                    dvh_errors.append(errs)
                per_case.append(row)
    finally:
        timer.close()
    keys = ("total",) + PHASES + MODEL_PARTS + ("denoise",)
    out = {"name": name, "checkpoint": str(checkpoint),
           "steps": None if pred.cfg.kind == "unet" else (steps or pred.cfg.sample_steps),
           "kind": pred.cfg.kind, "grid": pred.cfg.grid.size, "load_seconds": pred.load_seconds,
           "median": {k: common.summarize(r[k] for r in per_case)["median"] for k in keys}, "cases": per_case}
    if score:
        out["dose_score"] = sum(dose_scores) / len(dose_scores)
        out["dvh_score"] = cohort_dvh_score(dvh_errors)
    progress(f"{name}: {out['median']['total']:.2f} s/case (median), model {out['median']['model']:.2f} s"
             + (f", dose score {out['dose_score']:.2f}, DVH score {out['dvh_score']:.2f}" if score else ""))
    return out


def cold_runs(checkpoint: Path, cases: list[tuple[str, Path]], device: str, work: Path, force: bool = False) -> dict:
    """predict_case with the checkpoint load, and the command line (new process) for one case
    and for a folder of cases (``force``: a stand-in model, as in :func:`run_setting`)."""
    from addiff_core.predict import predict_case

    with common.Stopwatch() as sw:
        predict_case(checkpoint, cases[0][1], work / "cold" / "one", device=device, overwrite=True, force=force)
    folder = work / "cold_cases"
    folder.mkdir(parents=True, exist_ok=True)
    for _, c in cases:  # copies: a case folder that is a symlink out of its folder is refused (checks.py)
        if not (folder / c.name).exists():
            shutil.copytree(c, folder / c.name)
    cli = [sys.executable, "-m", "addiff_core.cli", "predict", "--checkpoint", str(checkpoint), "--device", device,
           "--overwrite"] + (["--force"] if force else [])
    t0 = time.perf_counter()
    subprocess.run(cli + ["--case", str(cases[0][1]), "--out", str(work / "cold" / "cli_one")], check=True,
                   capture_output=True, cwd=common.REPO)
    t1 = time.perf_counter()
    subprocess.run(cli + ["--case", str(folder), "--out", str(work / "cold" / "cli_folder")], check=True,
                   capture_output=True, cwd=common.REPO)
    t2 = time.perf_counter()
    return {"predict_case_with_load": sw.wall, "cli_one_case": t1 - t0, "cli_folder": t2 - t1,
            "cli_folder_cases": len(cases), "cli_folder_per_case": (t2 - t1) / len(cases)}


def grid128_checkpoints(cfg64, work: Path) -> dict[str, Path]:
    """Seeded untrained 128^3 (2.5 mm) checkpoints of both kinds with the 64^3 config's widths."""
    import torch

    from addiff_core.checkpoint import save_checkpoint
    from addiff_core.models import build_model

    grid = dataclasses.replace(cfg64.grid, size=128, spacing=tuple(s / 2 for s in cfg64.grid.spacing)
                               if cfg64.grid.spacing else None)
    out = {}
    for kind in ("diffusion", "unet"):
        cfg = dataclasses.replace(cfg64, grid=grid, kind=kind)
        torch.manual_seed(0)
        out[kind] = save_checkpoint(work / f"{kind}128.pt", build_model(cfg).state_dict(), cfg, {"bench": "predict_bench"})
    return out


def smoke_setup(work: Path) -> tuple[dict[str, Path], list[tuple[str, Path]]]:
    """A tiny synthetic site and seeded untrained 16^3 checkpoints of both kinds."""
    import torch

    from addiff_core.checkpoint import save_checkpoint
    from addiff_core.models import build_model
    from addiff_core.synth import write_synthetic_sites

    _, cfg = common.bench_model_config(16)
    site_file = write_synthetic_sites(work / "sites", n_sites=1, cases_per_site=2, size=16, seed=0)[0]
    cases = [("smoke", c.parent) for c in sorted((site_file.parent / site_file.stem).rglob("ct.nii.gz"))]
    ckpts = {}
    for kind in ("diffusion", "unet"):
        torch.manual_seed(0)
        k_cfg = dataclasses.replace(cfg, kind=kind)
        ckpts[kind] = save_checkpoint(work / f"{kind}.pt", build_model(k_cfg).state_dict(), k_cfg, {"bench": "smoke"})
    return ckpts, cases


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-dir", type=Path, default=common.REPO / "runs" / "openkbp_bench")
    ap.add_argument("--steps", default="1,2,5,10", help="ADDiff DDIM steps to measure (comma list)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cases-128", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    args = ap.parse_args(argv)
    common.quiet_warnings()
    common.apply_threads(args.threads)
    device = common.resolve_devices(args.device)[0]
    machine = common.machine_info(device)
    work = Path(tempfile.mkdtemp(prefix="predict_bench_"))
    try:
        res = _measure(args, device, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = common.loadavg()
    res = {"bench": "predict_bench", "smoke": args.smoke, "created": common.now_iso(), "machine": machine, **res}
    common.write_json(args.out / "predict_bench.json", res)
    common.write_text(args.out / "predict_bench.md", render(res))
    return res


def _measure(args, device: str, work: Path) -> dict:
    from addiff_core.predict import load_model

    if args.smoke:
        ckpts, cases = smoke_setup(work)
        reps, steps_list, cases128 = 1, [1, 2], []
    else:
        runs = args.bench_dir / "runs"
        ckpts = {"diffusion": runs / "federated_addiff" / "final_model.pt", "unet": runs / "federated_unet" / "final_model.pt"}
        missing = [str(p) for p in ckpts.values() if not p.is_file()]
        if missing:
            raise SystemExit(f"{missing[0]}: not found; run bench/openkbp_bench.py first")
        cases = heldout_cases(args.bench_dir)
        reps, steps_list, cases128 = args.reps, common.parse_list(args.steps), cases[:args.cases_128]
    progress(f"{len(cases)} held-out case(s), {reps} pass(es), device {device}")
    stand_in = args.smoke  # untrained smoke models: predict's plausibility check would refuse their doses
    settings = [run_setting(f"addiff_{s}step", ckpts["diffusion"], cases, s, reps, device, work, score=True,
                            force=stand_in) for s in steps_list]
    settings.append(run_setting("unet", ckpts["unet"], cases, None, reps, device, work, score=True, force=stand_in))
    # each cold run starts two processes (~9 CPU-s of imports each): the smoke run times one model's cold start
    cold_kinds = ("diffusion",) if args.smoke else ("diffusion", "unet")
    cold = {kind: cold_runs(ckpts[kind], cases, device, work / f"cold_{kind}", force=stand_in) for kind in cold_kinds}
    grid128 = []
    if cases128:
        import torch

        _, cfg64, _ = load_model(ckpts["diffusion"], torch.device("cpu"))
        for kind, ck in grid128_checkpoints(cfg64, work).items():
            grid128.append(run_setting(f"{'addiff' if kind == 'diffusion' else 'unet'}_128", ck, cases128, None, reps,
                                       device, work, score=False, force=True))  # untrained: speed only
    default = next(s for s in settings if s["kind"] == "diffusion" and s["steps"] == _default_steps(ckpts["diffusion"]))
    unet = settings[-1]
    return {"settings": settings, "cold": cold, "grid128": grid128,
            "summary": {"addiff_default_steps": default["steps"], "addiff_s_per_case": default["median"]["total"],
                        "unet_s_per_case": unet["median"]["total"],
                        "ratio_addiff_to_unet": default["median"]["total"] / unet["median"]["total"],
                        "challenge_limit_s": common.REFERENCE_SECONDS["gdp_hmm_challenge_limit_s"]}}


def _default_steps(checkpoint: Path) -> int:
    from addiff_core.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)[1].sample_steps


def render(res: dict) -> str:
    s = res["summary"]
    lines = [f"# Predict bench{' (smoke)' if res['smoke'] else ''}", "", f"Machine: {common.machine_line(res['machine'])}", "",
             f"Whole `addiff predict` path per case, model loaded once (median over cases x passes): ADDiff-Dose "
             f"({s['addiff_default_steps']} DDIM steps, the config's default) **{s['addiff_s_per_case']:.2f} s**, U-Net "
             f"**{s['unet_s_per_case']:.2f} s**, ratio {s['ratio_addiff_to_unet']:.2f} (challenge limit "
             f"{s['challenge_limit_s']:.0f} s).", "",
             "## Speed and quality per setting (64^3, held-out cases)", "",
             common.md_table(["setting", "steps", "s/case", *PHASES, *MODEL_PARTS, "denoise", "dose score", "DVH score"],
                             [[x["name"], x["steps"], x["median"]["total"], *(x["median"][p] for p in PHASES),
                               *(x["median"][p] for p in MODEL_PARTS), x["median"]["denoise"], x.get("dose_score"),
                               x.get("dvh_score")] for x in res["settings"]], nd=3), "",
             "## Cold starts (seconds)", "",
             common.md_table(["model", "predict_case incl. load", "CLI one case", "CLI folder", "CLI folder per case"],
                             [[k, v["predict_case_with_load"], v["cli_one_case"], v["cli_folder"], v["cli_folder_per_case"]]
                              for k, v in res["cold"].items()])]
    if res["grid128"]:
        lines += ["", "## 128^3 (2.5 mm, untrained weights: speed only)", "",
                  common.md_table(["setting", "steps", "s/case", *PHASES, *MODEL_PARTS, "denoise"],
                                  [[x["name"], x["steps"], x["median"]["total"], *(x["median"][p] for p in PHASES),
                                    *(x["median"][p] for p in MODEL_PARTS), x["median"]["denoise"]]
                                   for x in res["grid128"]], nd=3)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
