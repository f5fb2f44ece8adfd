"""addiff_core.report: `addiff report RUN_DIR` writes report.md/.html and figures, never a traceback.

A fake federated run folder is built by hand (tiny 16^3 model checkpoint, metrics.jsonl,
final_metrics.json, run.json pointing at two synthetic sites; run.json and metrics.jsonl through
``run_folder.RunFolder``, the server's writer), so the test needs no training.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from addiff_core import cli
from addiff_core.checkpoint import save_checkpoint
from addiff_core.config import GridConfig, ModelConfig, load_site_config
from addiff_core.models import build_model
from addiff_core.report import write_report
from addiff_core.run_folder import RunFolder
from addiff_core.synth import write_synthetic_sites

SITES = ("hospital_a", "hospital_b")


def tiny_config() -> ModelConfig:
    return ModelConfig(kind="diffusion", grid=GridConfig(size=16), vae_channels=(8, 16), latent_channels=2,
                       unet_channels=(8, 16), attention_levels=(False, False), cond_channels=4, context_dim=8,
                       num_heads=2, norm_groups=4, train_timesteps=20, sample_steps=2)


def final_row(site: str, mae: float) -> dict:
    return {"site": site, "cases": 1, "mae_gy": mae, "mae_pct_rx": mae / 0.7, "openkbp_dose_score": mae,
            "openkbp_dvh_score": 2 * mae, "hi_pred": None, "mean_isodose_dice": 0.61,
            "spinal_cord_dmax_err_gy": 1.5, "gamma_pass_rate": None, "constraint_compliance_pred": 0.75,
            "constraint_compliance_ref": 1.0}


def make_run(root: Path, site_files: list[Path], *, comparison: bool = True, kind: str = "diffusion") -> Path:
    run = root / "run"
    folder = RunFolder(run)
    cfg = dataclasses.replace(tiny_config(), kind=kind)
    torch.manual_seed(0)
    model = build_model(cfg)
    if kind == "diffusion":
        model.diffusion.latent_scale.fill_(1.0)
        with torch.no_grad():  # MONAI zero-initialises the denoiser's last convs: samples would not differ
            for p in model.diffusion.denoiser.parameters():
                if p.ndim > 1 and not p.any():
                    p.normal_(0.0, 0.05)
    state = model.state_dict()
    meta = {"round": 2, "stage": kind, "strategy": "fedavg"}
    save_checkpoint(folder.checkpoint_path(1), state, cfg, {**meta, "round": 1, "stage": "vae"})
    save_checkpoint(folder.checkpoint_path(2), state, cfg, meta)
    save_checkpoint(folder.final_model, state, cfg, {**meta, "stage": "final"})
    run_config = {"run-dir": str(run), "site-files": ",".join(str(f) for f in site_files),
                  "model-config": "configs/tiny.yaml", "strategy": "fedavg", "vae-rounds": 1,
                  "diffusion-rounds": 1, "local-epochs": 1, "seed": 0, "eval-steps": 2, "eval-gamma": False}
    folder.write_run_json({
        "run_config": run_config, "model": cfg.to_dict(), "created": "2026-01-01T10:00:00+00:00",
        "finished": "2026-01-01T10:05:00+00:00", "status": "complete", "num_rounds": 2,
        "schedule": [{"round": 1, "stage": "vae"}, {"round": 2, "stage": "diffusion"}],
        "sites_planned": [str(f) for f in site_files]})
    rows = []
    for rnd, stage, base in ((1, "vae", 0.5), (2, "diffusion", 1.8)):
        for i, site in enumerate(SITES):
            dp = {"dp_enabled": 1.0, "epsilon": 3.25, "delta": 0.001} if site == "hospital_b" else {"dp_enabled": 0.0}
            rows.append({"kind": "train", "round": rnd, "stage": stage, "site": site, "node_id": 100 + i,
                         "num_examples": 2, "train_loss": base - 0.1 * i, "bytes_down": 1000, "bytes_up": 1000, **dp})
        rows.append({"kind": "round", "round": rnd, "stage": stage, "strategy": "fedavg", "sites": list(SITES),
                     "num_examples": 4, "train_loss": base - 0.05, "bytes_down": 2000, "bytes_up": 2000,
                     "seconds": 3.0})
    rows.append({"kind": "error", "round": 2, "stage": "diffusion", "site": "node-101", "node_id": 101,
                 "reason": "\x1b[36mray::ClientAppActor.run()\x1b[39m\n   ^^^^\nValueError: boom"})
    rows.append({"kind": "rejected", "round": 2, "stage": "diffusion", "site": "hospital_a", "node_id": 100,
                 "reason": "update norm 50 > 10 x the round's median 2"})
    rows += [{"kind": "final", "round": 2, **final_row(s, 3.0 + i)} for i, s in enumerate(SITES)]
    folder.append_metrics(rows)
    with folder.metrics.open("a") as fh:
        fh.write("{half a line")  # a run killed while writing
    (run / "final_metrics.json").write_text(json.dumps([final_row(s, 3.0 + i) for i, s in enumerate(SITES)]))
    if comparison:
        (run / "comparison.json").write_text(json.dumps(
            {"series": {"local": {"hospital_a": 4.5, "hospital_b": {"mae_gy": 5.0}}, "pooled": {"hospital_a": 2.5}}}))
    return run


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    return write_synthetic_sites(tmp_path_factory.mktemp("sites"), n_sites=2, cases_per_site=3, size=16, seed=0)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory, sites) -> Path:
    run = make_run(tmp_path_factory.mktemp("fed"), sites)
    return write_report(run)


def _png_ok(path: Path, min_kb: float = 5.0) -> None:
    import matplotlib.image as mpimg

    assert path.is_file(), path
    assert path.stat().st_size > min_kb * 1024, f"{path.name} is only {path.stat().st_size} bytes"
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 200
    assert float(img[..., :3].std()) > 0.02, f"{path.name} looks blank"


def test_report_sections_tables_and_figures(full_report: Path, sites):
    md = full_report.read_text()
    run = full_report.parent.parent
    for heading in ("# Run report", "## Run summary", "## Training", "### Stage vae", "### Stage diffusion",
                    "## Held-out results", "## Comparison", "## Per-site dose figures", "### Site hospital_a",
                    "### Site hospital_b"):
        assert heading in md, heading
    # summary: strategy, rounds per stage, DP per site
    assert "**Strategy**: fedavg" in md and "vae 1/1, diffusion 1/1" in md
    assert re.search(r"\| hospital_b \| 2 \| 1 \| 2 \| 1 \| on \| 3\.25 \| 0\.001 \|", md), md
    # held-out table: one row per site plus the weighted mean
    assert re.search(r"\| hospital_a \| 1 \| 3\.00 \|", md)
    assert re.search(r"\| hospital_b \| 1 \| 4\.00 \|", md)
    assert re.search(r"\| all sites \(case-weighted\) \| 2 \| 3\.50 \|", md)
    # comparison table: federated (from the final table), local, pooled; a missing value is n/a
    assert "| site | federated | local | pooled |" in md
    assert "| hospital_b | 4.00 | 5.00 | n/a |" in md
    # the failure of an unnamed node is attributed to its site, one line, no ANSI codes
    assert "hospital_a rejected: update norm 50" in md
    assert "hospital_b error: ValueError: boom" in md and "\x1b" not in md
    assert "unreadable line" in md  # the half-written last line of metrics.jsonl
    # figures: every referenced image exists and is a real picture
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    names = {Path(r).name for r in refs}
    for want in ("training_vae.png", "training_diffusion.png", "mae_per_site.png",
                 "site_hospital_a_slices.png", "site_hospital_a_dvh.png", "site_hospital_a_uncertainty.png",
                 "site_hospital_b_slices.png", "site_hospital_b_dvh.png", "site_hospital_b_uncertainty.png"):
        assert want in names, want
    for r in refs:
        _png_ok(full_report.parent / r)
    # DVH points of the shown case
    assert "| structure | type | Dmean ref (Gy) |" in md
    # the std of 8 samples beside the error of their mean: one sentence of numbers per site
    found = re.findall(r"from 8 samples \(prediction seed 0\), inside the evaluation region: Spearman's rho between "
                       r"the sample std and \|mean - reference\| (-?\d\.\d\d), mean std (\d+\.\d{3}) Gy, and the reference "
                       r"lies within mean \+- 2 std in (\d+\.\d) % of the voxels \(calibration\)", md)
    assert len(found) == 2, md
    for rho, std, within in found:
        assert -1 <= float(rho) <= 1 and float(std) > 0 and 0 <= float(within) <= 100
    # a server's report names no case: the shown case is "1", never its folder name
    case_ids = [c.name for s in sites for c in load_site_config(s).data_dir.iterdir()]
    assert "held-out case 1" in md and case_ids and not any(c in md for c in case_ids)
    # html: same content
    html = (run / "report" / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html
    assert html.count("<img ") == len(refs) and 'src="figures/site_hospital_a_slices.png"' in html
    assert "<h2>Held-out results</h2>" in html


def test_site_option_limits_figures_and_explains_the_rest(tmp_path, sites):
    run = make_run(tmp_path, sites, comparison=False)
    (run / "final_model.pt").write_bytes(b"corrupt")  # falls back to the newest valid round checkpoint
    md = write_report(run, site_files=[sites[0]]).read_text()
    assert "### Site hospital_a" in md and "### Site hospital_b" not in md
    assert "newest valid round checkpoint" in md and "round_0002.pt" in md
    assert "### Sites without figures" in md
    assert f"addiff report {run} --site sites/hospital_b.yaml" in md
    figs = {p.name for p in (run / "report" / "figures").glob("*.png")}
    assert "site_hospital_a_slices.png" in figs and not any("hospital_b" in f for f in figs)
    # without comparison.json: the MAE chart of the federated model alone, and a hint
    assert "## MAE (Gy) per site" in md and "comparison.json" in md and "mae_per_site.png" in figs


def test_unet_report_has_no_uncertainty_map(tmp_path, sites):
    run = make_run(tmp_path, sites, comparison=False, kind="unet")
    md = write_report(run, site_files=[sites[0]]).read_text()
    assert "No uncertainty map: the U-Net baseline is deterministic" in md and "Spearman" not in md
    figs = {p.name for p in (run / "report" / "figures").glob("*.png")}
    assert "site_hospital_a_slices.png" in figs and not any("uncertainty" in f for f in figs)


def test_missing_data_never_raises(tmp_path):
    run = tmp_path / "broken"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "round": 1, "stage": "vae", "site": "x", '
                                       '"train_loss": 0.3}\nnot json\n')
    (run / "final_metrics.json").write_text("[{ broken")
    md = write_report(run).read_text()
    assert "`run.json` is missing" in md
    assert "No held-out results" in md
    assert "final_metrics.json` could not be read" in md
    assert "## Missing or unreadable inputs" in md
    assert "x: no site data here" in md and "--site sites/x.yaml" in md  # privacy note
    assert (run / "report" / "report.html").is_file()
    # an empty folder still gets a report that says so
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "does not look like an addiff-fl run" in write_report(empty).read_text()


def test_unreachable_site_files_are_skipped_with_a_note(tmp_path, sites):
    run = make_run(tmp_path, [tmp_path / "elsewhere" / "hospital_a.yaml", tmp_path / "elsewhere" / "hospital_b.yaml"])
    (run / "final_model.pt").write_bytes(b"corrupt")  # falls back to the newest round checkpoint
    md = write_report(run, figures=True).read_text()
    assert "site file not readable here" in md
    assert "server holds no patient data" in md
    assert "--site sites/hospital_a.yaml" in md
    assert not list((run / "report" / "figures").glob("site_*.png"))


def test_local_train_folder(tmp_path):
    run = tmp_path / "local"
    cfg = tiny_config()
    save_checkpoint(run / "model.pt", build_model(cfg).state_dict(), cfg, {"site": "solo"})
    hist = [{"stage": s, "epoch": e, "loss": 1.0 / e} for s in ("vae", "diffusion") for e in (1, 2, 3)]
    (run / "metrics.json").write_text(json.dumps({
        "site": "solo", "model": "diffusion", "train_cases": 5, "heldout_cases": 2, "train_seconds": 12.0,
        "privacy": {"dp_enabled": 0.0}, "history": hist, "skipped": {},
        "heldout": {"num_cases": 2, "mean": {"mae_gy": 2.5, "openkbp_dvh_score": 4.0}, "cases": []}}))
    md = write_report(run).read_text()
    assert "single site" in md and "| solo | 5 | 2 | off |" in md
    assert re.search(r"\| solo \| 2 \| 2\.50 \|", md)
    _png_ok(run / "report" / "figures" / "training_vae.png")
    assert "--site" in md  # no site file is recorded in an `addiff train` folder


def test_cli_report(tmp_path, sites, capsys):
    run = make_run(tmp_path, sites, comparison=False)
    assert cli.main(["report", str(run), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "report.md" in out and "report.html" in out
    md = (run / "report" / "report.md").read_text()
    assert "## Held-out results" in md and "![" not in md and "--no-figures" in md
    assert not list((run / "report").glob("figures/*.png"))
    assert cli.main(["report", str(run), "--site", str(sites[1]), "--site", str(sites[0]), "--no-figures"]) == 0
    assert "Figures were not requested" in (run / "report" / "report.md").read_text()
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert cli.main(["report", str(run), "--site", str(tmp_path / "missing.yaml")]) == 2


def test_the_uncertainty_figure_shows_a_std_far_below_the_error(tmp_path, monkeypatch):
    """The std of an overconfident model is ~100x below its error; on one shared colour scale its
    row was blank. Each row now has its own scale and colour bar, so the std is drawn."""
    import numpy as np

    from addiff_core import plots

    rng = np.random.default_rng(0)
    shape = (12, 16, 16)
    std = rng.uniform(0.01, 0.5, shape).astype(np.float32)
    err = rng.uniform(1.0, 40.0, shape).astype(np.float32)
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or Path(path))
    plots.uncertainty_slices_figure(tmp_path / "u.png", np.zeros(shape), std, err, (2.0, 2.0, 2.0), samples=8)
    (fig,) = figs
    overlays = [ax.get_images()[-1] for ax in fig.axes if len(ax.get_images()) == 2]  # CT + overlay panels
    assert len(overlays) == 6
    std_row, err_row = overlays[:3], overlays[3:]
    assert all(im.get_clim()[1] < 0.6 for im in std_row) and all(im.get_clim()[1] > 30 for im in err_row)
    assert all(np.ma.count(im.get_array()) > 0 for im in std_row)  # something of the std is drawn
    assert sum(1 for ax in fig.axes if ax.get_label() == "<colorbar>") == 2
