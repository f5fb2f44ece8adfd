"""Wire bench (issue 15): stage weights in float32 vs float16 on the wire, the main job otherwise
unchanged. Two ``addiff simulate`` runs (default settings, the same demo hospitals, seeds and
schedule) that differ only in ``--set wire-dtype=...``; per run: bytes down/up per round and stage
(``metrics.jsonl``), held-out metrics of the final model over all sites (``final_metrics.json``)
and wall time.

    python bench/wire_dtype.py            # ~6 min on a 2-core CPU
    python bench/wire_dtype.py --quick    # tiny model, 1+1 rounds (smoke run of this script)

Writes bench/results/wire_dtype.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from fl_overhead import flower_env, sh  # noqa: E402

KEYS = ("mae_gy", "openkbp_dose_score", "openkbp_dvh_score", "mean_isodose_dice", "gamma_pass_rate")


def run_once(wire: str, work: Path, quick: bool) -> dict:
    from addiff_core.run_folder import RunFolder
    from addiff_core.site_table import is_overall, overall_row

    run_dir = work / f"run-{wire}"
    cmd = [sys.executable, "-m", "addiff_core.cli", "simulate", "--data-dir", str(work / "demo_data"),
           "--run-dir", str(run_dir), "--set", f"wire-dtype={wire}"]
    if quick:
        cmd += ["--config", str(common.REPO / "configs" / "tiny.yaml"), "--rounds", "1,1", "--no-gamma"]
    t0 = time.perf_counter()
    sh(cmd, flower_env(work), work / f"{wire}.log")
    wall = time.perf_counter() - t0
    folder = RunFolder(run_dir)
    rounds = [r for r in folder.read_metrics() if r["kind"] == "round"]
    final = [r for r in json.loads(folder.final_json.read_text()) if not is_overall(r)]
    overall = overall_row(final, KEYS)  # case-weighted over the sites, as the run's own table
    per_stage: dict[str, dict] = {}
    for r in rounds:
        s = per_stage.setdefault(r["stage"], {"rounds": 0, "bytes_down": 0, "bytes_up": 0})
        s["rounds"] += 1
        s["bytes_down"] += int(r["bytes_down"])
        s["bytes_up"] += int(r["bytes_up"])
    return {"wire_dtype": wire, "wall_seconds": wall, "stages": per_stage,
            "bytes_total": sum(s["bytes_down"] + s["bytes_up"] for s in per_stage.values()),
            "heldout": {k: overall.get(k) for k in KEYS}, "sites": final}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="wire_dtype_"))
    machine = common.machine_info("cpu")
    runs = []
    for wire in ("float32", "float16"):
        common.progress(f"addiff simulate, wire-dtype {wire} ...")
        runs.append(run_once(wire, work, args.quick))
        common.progress(f"  {runs[-1]['bytes_total'] / 1e6:.1f} MB, held-out MAE {runs[-1]['heldout']['mae_gy']}")
    machine["loadavg_end"] = common.loadavg()
    res = {"bench": "wire_dtype", "quick": args.quick, "created": common.now_iso(), "machine": machine, "runs": runs,
           "bytes_ratio": runs[1]["bytes_total"] / runs[0]["bytes_total"]}
    common.write_json(args.out / "wire_dtype.json", res)
    common.write_text(args.out / "wire_dtype.md", render(res))
    return res


def render(res: dict) -> str:
    head = ["wire", "wall s", "MB total", *(f"{st} MB/round" for st in res["runs"][0]["stages"]), *KEYS]
    rows = []
    for r in res["runs"]:
        per_round = [(s["bytes_down"] + s["bytes_up"]) / s["rounds"] / 1e6 for s in r["stages"].values()]
        rows.append([r["wire_dtype"], r["wall_seconds"], r["bytes_total"] / 1e6, *per_round, *(r["heldout"][k] for k in KEYS)])
    return "\n".join([f"# Wire bench{' (quick)' if res['quick'] else ''}", "",
                      f"Machine: {common.machine_line(res['machine'])}", "",
                      "`addiff simulate` (defaults, 3 demo hospitals) twice, differing only in `wire-dtype`; bytes are "
                      "the serialised arrays of every train message and reply (metrics.jsonl), down + up, all sites; "
                      "held-out metrics of the final model over all sites.", "",
                      common.md_table(head, rows, nd=3), "",
                      f"Bytes float16 / float32: {res['bytes_ratio']:.3f}."]) + "\n"


if __name__ == "__main__":
    main()
