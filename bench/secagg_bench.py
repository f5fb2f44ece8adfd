"""Secure aggregation bench (issue #26.6): time and bytes per round with and without
``secure-aggregation``, for 3 and 10 sites, in simulation and in a TLS deployment on this machine.

* simulation: ``addiff simulate`` (serial backend) of the tiny diffusion model (configs/tiny.yaml,
  32^3 synthetic sites, 3 cases each), 1 VAE + 1 diffusion round, 1 local epoch; the same sites,
  seeds and schedule with and without the option. Also: how far the secure final weights are
  from the plain run's, and both runs' held-out MAE.
* deployment: ``addiff server start`` (TLS, on 127.0.0.1) and one ``addiff client start`` per
  site (each message a ClientApp process, as in production), the tiny U-Net, 1 round.

* main (``--modes main``): the main job (``addiff simulate`` as README runs it: 3 demo
  hospitals x 8 cases, configs/demo.yaml, 8 VAE + 14 diffusion rounds) with and without: its
  held-out metrics (the issue's "within noise of the plain run").

Per round: seconds (server side, from metrics.jsonl) and bytes down / up (the arrays of the train
messages, plus, with the option, the protocol's keys, shares and masked vectors). Processes are
stopped by PID.

    python bench/secagg_bench.py                       # 3 and 10 sites, both modes
    python bench/secagg_bench.py --sites 3 --modes sim # a part
    python bench/secagg_bench.py --modes main --name secagg_main   # the main job, ~2 x 2-6 min

Writes bench/results/secagg_bench.json and .md.
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

TINY = common.REPO / "configs" / "tiny.yaml"
MAE = "mae_gy"
KEYS = (MAE, "openkbp_dose_score", "openkbp_dvh_score", "mean_isodose_dice", "gamma_pass_rate")


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "addiff_core.cli", *map(str, args)]


def _sites(work: Path, n: int) -> list[Path]:
    from addiff_core.synth import write_synthetic_sites

    base = work / f"sites_{n}"
    stamp = base / "sites.json"
    if not stamp.is_file():
        files = write_synthetic_sites(base, n_sites=n, cases_per_site=3, size=32, seed=0)
        stamp.write_text(json.dumps([str(f) for f in files]))
    return [Path(p) for p in json.loads(stamp.read_text())]


def _summary(run_dir: Path, wall: float) -> dict:
    from addiff_core.run_folder import RunFolder
    from addiff_core.site_table import is_overall, overall_row

    folder = RunFolder(run_dir)
    rounds = [r for r in folder.read_metrics() if r["kind"] == "round"]
    final = [r for r in json.loads(folder.final_json.read_text()) if not is_overall(r)]
    keep = ("round", "stage", "seconds", "bytes_down", "bytes_up", "secagg_error_bound", "secagg_max_weight",
            "secagg_stage_seconds")
    overall = overall_row(final, KEYS)  # case-weighted over the sites, as the run's own table
    return {"wall_seconds": wall, "rounds": [{k: r.get(k) for k in keep} for r in rounds],
            "heldout_mae_gy": overall.get(MAE), "heldout": {k: overall.get(k) for k in KEYS}, "run_dir": str(run_dir)}


def simulate(work: Path, n: int, secure: bool, main_job: bool = False, seed: int = 0) -> dict:
    """``addiff simulate``: the tiny model on ``n`` synthetic sites, or (``main_job``) the main job
    exactly as README runs it (demo hospitals, configs/demo.yaml, its default schedule)."""
    from addiff_core.processes import DescendantTracker, flower_env, start, stop

    run_dir = work / f"{'main' if main_job else 'sim'}_{n}_{'secure' if secure else 'plain'}_seed{seed}"
    if main_job:
        cmd = _cli("simulate", "--data-dir", work / "demo_data", "--run-dir", run_dir, "--set", "report-figures=false")
    else:
        cmd = _cli("simulate", "--site-files", ",".join(map(str, _sites(work, n))), "--config", TINY, "--rounds",
                   "1,1", "--local-epochs", 1, "--eval-steps", 2, "--no-gamma", "--backend", "serial",
                   "--run-dir", run_dir, "--set", "report-figures=false")
    cmd += ["--seed", str(seed), "--set", f"secure-aggregation={str(secure).lower()}"]
    t0 = time.perf_counter()
    with DescendantTracker() as tracker:
        proc = start(cmd, env=flower_env(work / "flwr-home-sim"), log_file=work / f"{run_dir.name}.log",
                     cwd=common.REPO)
        try:
            rc = proc.wait(timeout=3600)
        finally:
            stop(proc)
            tracker.terminate()
    if rc != 0:
        raise SystemExit(f"simulation failed ({rc}): see {work / (run_dir.name + '.log')}")
    return _summary(run_dir, time.perf_counter() - t0)


def deploy(work: Path, n: int, secure: bool) -> dict:
    """One TLS deployment: a SuperLink, ``n`` SuperNodes, the U-Net for one round."""
    from addiff_core.processes import DescendantTracker, flower_env, free_port, start, stop
    from server.certs import create_certificates

    tag = f"deploy_{n}_{'secure' if secure else 'plain'}"
    certs = work / "certs"
    if not (certs / "ca.crt").is_file():
        create_certificates(certs, ["localhost"])
    run_dir, port = work / tag, free_port()
    env = flower_env(work / f"flwr-home-{tag}")
    procs = []
    with DescendantTracker() as tracker:
        try:
            t0 = time.perf_counter()
            server = start(_cli("server", "start", "--certs", certs, "--host", "127.0.0.1", "--port", port,
                                "--min-sites", n, "--wait-sites", n, "--config", TINY, "--model", "unet",
                                "--rounds", 1, "--local-epochs", 1, "--eval-steps", 2, "--no-gamma", "--run-dir",
                                run_dir, "--round-timeout", 1800, "--set", "report-figures=false",
                                "--set", f"secure-aggregation={str(secure).lower()}"),
                           env=env, log_file=work / f"{tag}_server.log", cwd=common.REPO)
            procs.append(server)
            for i, f in enumerate(_sites(work, n)):
                procs.append(start(_cli("client", "start", "--site", f, "--superlink", f"127.0.0.1:{port}", "--ca",
                                        certs / "ca.crt", "--port", free_port(), "--threads", 1, "--flwr-home",
                                        work / f"flwr-home-{tag}-{i}"),
                                   env=env, log_file=work / f"{tag}_client_{i}.log", cwd=common.REPO))
            rc = server.wait(timeout=3600)
            wall = time.perf_counter() - t0
        finally:
            for p in reversed(procs):
                stop(p, timeout=20)
            tracker.terminate()
    if rc != 0:
        raise SystemExit(f"deployment failed ({rc}): see {work / (tag + '_server.log')}")
    return _summary(run_dir, wall)


def weight_gap(plain_dir: str, secure_dir: str) -> dict:
    """Largest |secure - plain| over the final weights (and the largest plain weight)."""
    import torch

    a = torch.load(Path(plain_dir) / "final_model.pt", weights_only=True)["state_dict"]
    b = torch.load(Path(secure_dir) / "final_model.pt", weights_only=True)["state_dict"]
    gap = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    return {"max_abs_weight_difference": gap,
            "max_abs_weight": max(float(a[k].abs().max()) for k in a if a[k].is_floating_point())}


def _rows(results: list[dict]) -> list[list]:
    rows = []
    for r in results:
        for rnd in r["rounds"]:
            stages = rnd.get("secagg_stage_seconds") or {}
            split = " / ".join(f"{stages[k]:.1f}" for k in ("setup", "share_keys", "collect_masked_vectors", "unmask")
                               if k in stages) or "–"
            rows.append([r["mode"], r["sites"], "on" if r["secure"] else "off", f"{rnd['round']} {rnd['stage']}",
                         rnd["seconds"], split, rnd["bytes_down"] / 1e6, rnd["bytes_up"] / 1e6, r["heldout_mae_gy"]])
    return rows


def markdown(doc: dict) -> str:
    lines = ["# Secure aggregation: cost (bench/secagg_bench.py)", "", doc["machine_line"], "",
             common.md_table(["mode", "sites", "secure", "round", "seconds", "of which setup / keys / train+mask / unmask",
                              "MB down", "MB up", "held-out MAE (Gy)"],
                             _rows(doc["results"]), nd=3), ""]
    main = [r for r in doc["results"] if r["mode"] == "main"]
    if main:
        lines += ["Main job, held-out metrics over all sites (case-weighted):", "",
                  common.md_table(["secure", *KEYS, "wall s"], [["on" if r["secure"] else "off",
                                                                 *[r["heldout"][k] for k in KEYS], r["wall_seconds"]]
                                                                for r in main], nd=3), ""]
    if doc["weight_gaps"]:
        lines += ["Final weights, secure vs plain (same sites, seeds, schedule):", "",
                  common.md_table(["mode", "sites", "max |difference|", "max |weight|"],
                                  [[g["mode"], g["sites"], g["max_abs_weight_difference"], g["max_abs_weight"]]
                                   for g in doc["weight_gaps"]], nd=7), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="3,10", help="site counts (default 3,10)")
    ap.add_argument("--modes", default="sim,deploy", help="sim, deploy (default both); main: the main job "
                    "(addiff simulate as README runs it, 3 demo hospitals; --sites is ignored)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    ap.add_argument("--name", default="secagg_bench", help="result file name (default secagg_bench)")
    ap.add_argument("--secure", default="off,on", help="which runs: off, on or both (default)")
    ap.add_argument("--seed", type=int, default=0, help="the runs' seed (simulations; default 0)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="secagg_bench_"))
    machine = common.machine_info("cpu")
    machine["loadavg_start"] = common.loadavg()
    results, gaps = [], []
    for mode in common.parse_list(args.modes, str):
        for n in ([3] if mode == "main" else common.parse_list(args.sites)):
            pair = {}
            for secure in [x == "on" for x in common.parse_list(args.secure, str)]:
                common.progress(f"{mode}, {n} sites, secure aggregation {'on' if secure else 'off'} ...")
                r = deploy(work, n, secure) if mode == "deploy" else simulate(work, n, secure, mode == "main", args.seed)
                pair[secure] = r
                results.append({"mode": mode, "sites": n, "secure": secure, "seed": args.seed, **r})
                common.progress(f"  {r['wall_seconds']:.0f} s; rounds {[x['seconds'] for x in r['rounds']]}")
            if len(pair) == 2:
                gaps.append({"mode": mode, "sites": n, **weight_gap(pair[False]["run_dir"], pair[True]["run_dir"])})
    machine["loadavg_end"] = common.loadavg()
    doc = {"created": common.now_iso(), "machine": machine, "machine_line": common.machine_line(machine),
           "results": results, "weight_gaps": gaps}
    common.write_json(args.out / f"{args.name}.json", doc)
    common.write_text(args.out / f"{args.name}.md", markdown(doc))
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
