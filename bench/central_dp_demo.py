"""Client-level central DP on the demo federation: held-out error against the noise multiplier.

For each noise multiplier (0 = central DP off, plain FedAvg) one ``addiff simulate`` of the demo
hospitals (3 synthetic sites x 8 cases at 32^3, 6 training + 2 held out each) with the U-Net
baseline, one after the other, each in a fresh process with OMP_NUM_THREADS=1. Records per run:
the held-out MAE per site and over all sites (Gy, % of Rx), the MAE of predicting 0 Gy
everywhere (``mae_zero_dose_gy``), the client-level epsilon after the last round, and the
median L2 norm of the sites' updates (to compare with ``central-dp-clip``).

    python bench/central_dp_demo.py                      # noise 0,0.001,0.1,0.3,1.0; 10 rounds
    python bench/central_dp_demo.py --noise 0,1.0 --rounds 3 --out /tmp/cdp   # quick look

Writes ``bench/results/central_dp_demo.json`` (and ``.md``) after every run (partial results
survive an interrupted bench).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = common.REPO


def one_run(noise: float, args, data_dir: Path, work: Path) -> dict:
    run_dir = work / f"noise-{noise:g}"
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(args.threads), "FLWR_HOME": str(work / "flwr-home"),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONWARNINGS": "ignore"})
    cmd = [sys.executable, "-m", "addiff_core.cli", "simulate", "--model", "unet", "--rounds", str(args.rounds),
           "--sites", str(args.sites), "--data-dir", str(data_dir), "--run-dir", str(run_dir), "--no-gamma",
           "--cpus-per-site", "1", "--set", f"central-dp-noise={noise}", "--set", f"central-dp-clip={args.clip}",
           "--set", f"central-dp-delta={args.delta}"]
    log = work / f"noise-{noise:g}.log"
    common.progress(f"noise {noise:g}: {' '.join(cmd[3:])}")
    t0 = time.perf_counter()
    with log.open("wb") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT)).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"noise {noise}: addiff simulate failed ({rc}); see {log}")
    final = json.loads((run_dir / "final_metrics.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [r for r in rows if r.get("kind") == "round"]
    norms = [r["update_norm"] for r in rows if r.get("kind") == "train" and r.get("update_norm") is not None]
    per_site = {r["site"]: {k: r.get(k) for k in ("cases", "mae_gy", "mae_pct_rx", "mae_zero_dose_gy")}
                for r in final}
    cases = sum(r["cases"] for r in final)

    def overall(key: str) -> float | None:
        vals = [(r.get(key), r["cases"]) for r in final if r.get(key) is not None]
        return sum(v * c for v, c in vals) / sum(c for _, c in vals) if vals else None

    out = {"noise_multiplier": noise, "clip": args.clip, "delta": args.delta, "seconds": seconds,
           "central_dp_epsilon": rounds[-1].get("central_dp_epsilon") if rounds else None,
           "heldout_cases": cases, "mae_gy": overall("mae_gy"), "mae_pct_rx": overall("mae_pct_rx"),
           "mae_zero_dose_gy": overall("mae_zero_dose_gy"), "per_site": per_site,
           "update_norm_median": statistics.median(norms) if norms else None,
           "update_norm_first_round_median": statistics.median(
               [r["update_norm"] for r in rows if r.get("kind") == "train" and r.get("round") == 1
                and r.get("update_norm") is not None] or [float("nan")]),
           "train_loss_last_round": rounds[-1].get("train_loss") if rounds else None}
    out["worse_than_zero_dose"] = bool(out["mae_gy"] is not None and out["mae_zero_dose_gy"] is not None
                                       and out["mae_gy"] > out["mae_zero_dose_gy"])
    common.progress(f"noise {noise:g}: MAE {out['mae_gy']:.2f} Gy ({out['mae_pct_rx']:.1f} % Rx), zero dose "
                    f"{out['mae_zero_dose_gy']:.2f} Gy, epsilon {out['central_dp_epsilon']}, {seconds:.0f} s")
    return out


def markdown(doc: dict) -> str:
    def flagged(r: dict) -> str:  # sites whose MAE exceeds their own zero-dose MAE (the run's WARNING lines)
        bad = [s for s, v in sorted(r["per_site"].items()) if v.get("mae_gy") is not None
               and v.get("mae_zero_dose_gy") is not None and v["mae_gy"] > v["mae_zero_dose_gy"]]
        return ", ".join(bad) or "none"

    rows = [[f"{r['noise_multiplier']:g}", r["central_dp_epsilon"] if r["noise_multiplier"] > 0 else "inf (off)",
             r["mae_gy"], r["mae_pct_rx"], r["mae_zero_dose_gy"], "yes" if r["worse_than_zero_dose"] else "no",
             flagged(r), r["update_norm_median"], r["seconds"]] for r in doc["runs"]]
    return ("# Central DP on the demo federation\n\n"
            f"{doc['setup']}\n\nMachine: {common.machine_line(doc['machine'])}\n\n"
            + common.md_table(["noise", f"epsilon (delta {doc['delta']:g})", "held-out MAE (Gy)", "MAE (% Rx)",
                               "MAE of 0 Gy (Gy)", "overall worse than 0 Gy", "sites worse than their own 0 Gy",
                               "median update norm", "seconds"], rows)
            + "\n")


def _git() -> dict:
    """The commit the code came from and the files changed on top of it (results depend on both)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=str(ROOT), capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"head": git("rev-parse", "HEAD"), "changed": git("status", "--porcelain").splitlines()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--noise", default="0,0.001,0.1,0.3,1.0", help="comma-separated noise multipliers")
    ap.add_argument("--rounds", type=int, default=10, help="U-Net rounds (default 10)")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--clip", type=float, default=1.0, help="central-dp-clip (default 1.0, the run-config default)")
    ap.add_argument("--delta", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--out", default=str(common.DEFAULT_OUT))
    ap.add_argument("--append", action="store_true",
                    help="keep the runs of other noise levels already in OUT/central_dp_demo.json (same settings)")
    args = ap.parse_args()
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="addiff-central-dp-"))
    data_dir = work / "demo_data"
    doc = {"bench": "central_dp_demo", "started": common.now_iso(), "machine": common.machine_info("cpu"),
           "delta": args.delta, "work_dir": str(work), "git": _git(),
           "setup": (f"`addiff simulate --model unet --rounds {args.rounds} --sites {args.sites}` (demo hospitals: "
                     f"8 cases each at 32^3, 6 training + 2 held out; each site file's local epochs per round), "
                     f"`--set central-dp-noise=X central-dp-clip={args.clip:g} central-dp-delta={args.delta:g}`; "
                     "noise 0 = central DP off (case-weighted FedAvg). Model config `configs/demo.yaml` (U-Net "
                     "baseline channels); one process per run, OMP_NUM_THREADS="
                     f"{args.threads}, runs one after the other."), "runs": []}
    noises = common.parse_list(args.noise, float)
    if args.append and (out / "central_dp_demo.json").is_file():
        old = json.loads((out / "central_dp_demo.json").read_text())
        if old.get("setup") != doc["setup"]:
            raise SystemExit("--append: the existing results were made with other settings")
        doc["runs"] = [r for r in old.get("runs", []) if r["noise_multiplier"] not in noises]
        doc["earlier"] = {k: old.get(k) for k in ("started", "machine", "git", "work_dir")}
    for noise in noises:
        doc["runs"].append(one_run(noise, args, data_dir, work))
        doc["runs"].sort(key=lambda r: r["noise_multiplier"])
        doc["machine"]["loadavg_end"] = common.loadavg()
        doc["finished"] = common.now_iso()
        common.write_json(out / "central_dp_demo.json", doc)
        common.write_text(out / "central_dp_demo.md", markdown(doc))
    common.progress(f"wrote {out / 'central_dp_demo.json'}")


if __name__ == "__main__":
    main()
