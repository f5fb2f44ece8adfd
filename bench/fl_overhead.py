"""What Flower costs: the default federated demo against the same work without Flower.

Measures, for the demo settings of ``addiff simulate`` (3 synthetic hospitals, configs/demo.yaml,
VAE + diffusion rounds, each site's local epochs):

1. wall time of ``addiff simulate`` (a fresh process: Flower, its backend, data loading, rounds,
   final evaluation) with each simulation backend in ``--backends`` (serial: the sites in turn in
   one process; ray: one Ray actor per site at once) against a plain loop doing the same rounds
   without Flower: the same SiteTask.train calls one site after the other in one process, a
   weighted mean of the weights, the same final evaluation. Ratio = federated / plain (aim <= 1.1,
   issue #15). The headline is the backend ``addiff simulate`` picks on this machine.
2. bytes on the wire per round and stage (from the run's metrics.jsonl), VAE / diffusion sizes.
3. start-up overhead of the simulation mechanisms (in-process run_simulation with each backend, a
   local SuperLink + flwr run) on a 1 + 1 round run of the tiny model config.
4. per-site held-out MAE of the federated model against each site trained alone (same epochs)
   and against one model trained on all sites' training cases pooled.

    python bench/fl_overhead.py [--quick] [--skip-baselines] [--backends serial,ray]

Writes bench/results/fl_overhead.json and bench/results/fl_overhead.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from addiff_core.run_folder import RunFolder  # noqa: E402


def sh(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("wb") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return time.perf_counter() - t0


def flower_env(tmp: Path) -> dict:
    env = os.environ.copy()
    env.update({"FLWR_HOME": str(tmp / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    return env


# ------------------------------------------------------------------------------------------
# the plain loop (no Flower)
# ------------------------------------------------------------------------------------------
def plain_loop(site_files: list[Path], settings, *, seed: int = 0, evaluate: bool = True,
               eval_on: dict | None = None) -> dict:
    """The federated schedule without Flower: same SiteTask.train calls, FedAvg by hand."""
    from addiff_core.config import load_site_config
    from addiff_core.site_task import SiteTask, initial_arrays
    from addiff_core.round_plan import RoundPlan

    cfg = settings.model
    t0 = time.perf_counter()
    tasks = [SiteTask(load_site_config(f), cfg) for f in site_files]
    t_load = time.perf_counter() - t0
    arrays = initial_arrays(cfg, seed)
    dtypes = {k: v.dtype for k, v in arrays.items()}
    plan = {}
    for r in settings.schedule:
        plan[r.stage] = r.stage_rounds

    def epochs_of(task, stage):
        t = task.site.training
        return settings.local_epochs or (t.vae_epochs if stage == "vae" else t.diffusion_epochs)

    t1 = time.perf_counter()
    round_seconds = []
    for r in settings.schedule:
        t_round = time.perf_counter()
        sent = {k: v for k, v in arrays.items() if k.startswith(r.stage + ".") or
                (r.stage == "diffusion" and r.stage_round == 1 and k.startswith("vae."))}
        results = []
        for task in tasks:
            e = epochs_of(task, r.stage)
            planned = sum(n * epochs_of(task, st) for st, n in plan.items())
            results.append(task.train(sent, RoundPlan(r.stage, r.number, epochs=e, seed=seed, planned_epochs=planned,
                                                      stage_round=r.stage_round, stage_rounds=r.stage_rounds)))
        total = sum(res.num_examples for res in results)
        for k in results[0].arrays:
            arrays[k] = sum(res.arrays[k] * (res.num_examples / total) for res in results).astype(dtypes[k])
        round_seconds.append(time.perf_counter() - t_round)
    t_train = time.perf_counter() - t1
    out = {"load_seconds": t_load, "train_seconds": t_train, "round_seconds": round_seconds, "arrays": arrays}
    if evaluate:
        t2 = time.perf_counter()
        targets = eval_on or {t.site.name: t for t in tasks}
        out["eval"] = {name: t.evaluate(arrays, seed=seed, steps=settings.eval_steps or None,
                                        gamma=settings.eval_gamma) for name, t in targets.items()}
        out["eval_seconds"] = time.perf_counter() - t2
    out["total_seconds"] = time.perf_counter() - t0
    return out


def pooled_site(site_files: list[Path], out_dir: Path) -> Path:
    """A site file whose data are every site's TRAINING cases (symlinks); nothing held out."""
    import yaml

    from addiff_core.case_io import list_cases
    from addiff_core.config import load_site_config
    from addiff_core.data import split_case_ids

    data = out_dir / "pooled_cases"
    data.mkdir(parents=True, exist_ok=True)
    for f in site_files:
        site = load_site_config(f)
        dirs = {d.name: d for d in list_cases(site.data_dir)}
        train, _ = split_case_ids(list(dirs), site.heldout)
        for cid in train:
            link = data / cid
            if not link.exists():
                link.symlink_to(dirs[cid].resolve(), target_is_directory=True)
    first = load_site_config(site_files[0])
    path = out_dir / "pooled.yaml"
    path.write_text(yaml.safe_dump({
        "name": "pooled", "data_dir": str(data), "state_dir": str(out_dir / "state" / "pooled"),
        "heldout": {"fraction": 0.0, "seed": 0}, "device": first.device,
        "training": {"batch_size": first.training.batch_size, "optimizer": first.training.optimizer,
                     "lr": first.training.lr, "vae_epochs": first.training.vae_epochs,
                     "diffusion_epochs": first.training.diffusion_epochs, "seed": 0}}, sort_keys=False))
    return path


def stage_bytes(run_dir: Path) -> dict:
    rounds = [r for r in RunFolder(run_dir).read_metrics() if r["kind"] == "round"]
    n_sites = len(rounds[0]["sites"]) if rounds else 0
    out: dict = {"sites": n_sites, "per_round": [
        {"round": r["round"], "stage": r["stage"], "bytes_down": r["bytes_down"], "bytes_up": r["bytes_up"],
         "vae_sent": r.get("vae_sent", False), "seconds": round(r["seconds"], 2)} for r in rounds]}
    for stage in ("vae", "diffusion", "unet"):
        rs = [r for r in rounds if r["stage"] == stage]
        if not rs:
            continue
        steady = [r for r in rs if not r.get("vae_sent")] or rs
        out[stage] = {"rounds": len(rs),
                      "bytes_per_round": int(np.median([r["bytes_down"] + r["bytes_up"] for r in steady])),
                      "down_per_site": int(np.median([r["bytes_down"] for r in steady]) / max(n_sites, 1)),
                      "up_per_site": int(np.median([r["bytes_up"] for r in steady]) / max(n_sites, 1))}
        first = [r for r in rs if r.get("vae_sent")]
        if first:
            out[stage]["first_round_bytes"] = int(first[0]["bytes_down"] + first[0]["bytes_up"])
            out[stage]["first_round_down_per_site"] = int(first[0]["bytes_down"] / max(n_sites, 1))
    out["total_bytes"] = int(sum(r["bytes_down"] + r["bytes_up"] for r in rounds))
    return out


def model_sizes(cfg) -> dict:
    from addiff_core.site_task import initial_arrays

    arrays = initial_arrays(cfg, 0)
    sizes: dict[str, int] = {}
    for k, v in arrays.items():
        sizes[k.split(".")[0]] = sizes.get(k.split(".")[0], 0) + v.nbytes
    return sizes


# ------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 1+2 rounds (smoke test of this script)")
    ap.add_argument("--skip-baselines", action="store_true", help="no site-alone / pooled training")
    ap.add_argument("--workdir", help="keep data and runs here (default: a temporary folder; runs of an earlier "
                    "call are replaced)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the existing .json")
    ap.add_argument("--backends", default="serial,ray", help="simulation backends to time (default serial,ray)")
    args = ap.parse_args()
    if args.report_only:
        result = json.loads((RESULTS / "fl_overhead.json").read_text())
        (RESULTS / "fl_overhead.md").write_text(report(result))
        print(report(result))
        return 0

    import torch

    from server.settings import DEFAULTS, from_run_config
    from server.demo_data import ensure_demo_sites
    from server.simulate import choose_backend, client_resources, sites_at_once

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="addiff-fl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = flower_env(work)
    cases = 4 if args.quick else 8
    site_files = ensure_demo_sites(work / "demo_data", 3, cases, 32)
    model_config = ROOT / "configs" / ("tiny.yaml" if args.quick else "demo.yaml")
    rounds = "1,2" if args.quick else f"{DEFAULTS['vae-rounds']},{DEFAULTS['diffusion-rounds']}"
    for old in [*work.glob("run-federated*"), *work.glob("run-mech-*")]:  # this script's runs of an earlier call
        shutil.rmtree(old, ignore_errors=True)
    default_backend = choose_backend("auto", len(site_files))  # what `addiff simulate` picks here
    backends = list(dict.fromkeys([default_backend, *[b.strip() for b in args.backends.split(",") if b.strip()]]))
    federated = {}
    for backend in backends:
        d = work / f"run-federated-{backend}"
        sim = [sys.executable, "-m", "addiff_core.cli", "simulate", "--site-files", ",".join(map(str, site_files)),
               "--config", str(model_config), "--rounds", rounds, "--run-dir", str(d), "--backend", backend]
        print(f"[1/4] federated simulation, {backend} backend ({rounds} rounds, {model_config.name}) ...", flush=True)
        wall = sh(sim, env, work / f"federated-{backend}.log")
        rounds_s = [r["seconds"] for r in RunFolder(d).read_metrics() if r["kind"] == "round"]
        federated[backend] = {"run_dir": d, "wall": wall, "rounds": rounds_s}
    run_dir = federated[default_backend]["run_dir"]
    wall_fl, fl_rounds = federated[default_backend]["wall"], federated[default_backend]["rounds"]
    folder = RunFolder(run_dir)
    settings = from_run_config(folder.stored_run_config())
    fl_train = sum(fl_rounds)
    fl_final = {r["site"]: r for r in json.loads(folder.final_json.read_text())}

    print("[2/4] the same rounds without Flower (plain loop, one process) ...", flush=True)
    t0 = time.perf_counter()
    plain = plain_loop(site_files, settings)
    wall_plain = time.perf_counter() - t0 + startup_seconds()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each simulated site (one Ray CPU each)
    plain1 = plain_loop(site_files, settings, evaluate=False)
    torch.set_num_threads(threads)
    from addiff_core.checkpoint import load_checkpoint

    # the simulation ends by writing its run report (tables, figures); the plain loop writes none
    from addiff_core.report.writer import write_report_safely

    t_report = time.perf_counter()
    write_report_safely(run_dir, figures=True)  # the same report again, timed
    report_s = time.perf_counter() - t_report
    max_diff = {}
    for backend, f in federated.items():
        fl_w, _, _ = load_checkpoint(RunFolder(f["run_dir"]).final_model)
        max_diff[backend] = max(float(np.abs(fl_w[k].numpy() - plain["arrays"][k]).max()) for k in plain["arrays"])

    print("[3/4] start-up overhead of the simulation mechanisms ...", flush=True)
    mech = {}
    for name, extra in (("inprocess-serial", ["--backend", "serial"]), ("inprocess-ray", ["--backend", "ray"]),
                        ("flwr", ["--via", "flwr"])):
        d = work / f"run-mech-{name}"
        t = sh([sys.executable, "-m", "addiff_core.cli", "simulate", "--site-files", ",".join(map(str, site_files)),
                "--config", str(ROOT / "configs" / "tiny.yaml"), "--rounds", "1,1", "--local-epochs", "1",
                "--eval-steps", "1", "--no-gamma", "--run-dir", str(d), *extra], env, work / f"mech-{name}.log")
        work_s = sum(r["seconds"] for r in RunFolder(d).read_metrics() if r["kind"] == "round")
        mech[name] = {"wall_seconds": round(t, 1), "round_seconds": round(work_s, 1),
                      "overhead_seconds": round(t - work_s, 1)}

    baselines = {}
    if not args.skip_baselines:
        print("[4/4] each site alone, and all training cases pooled ...", flush=True)
        from addiff_core.config import load_site_config
        from addiff_core.site_task import SiteTask

        evaluators = {load_site_config(f).name: SiteTask(load_site_config(f), settings.model) for f in site_files}
        alone = {}
        for f in site_files:
            name = load_site_config(f).name
            res = plain_loop([f], settings, eval_on={name: evaluators[name]})
            alone[name] = res["eval"][name]
        pooled_file = pooled_site(site_files, work / "pooled")
        pooled = plain_loop([pooled_file], settings, eval_on=evaluators)
        baselines = {"alone": alone, "pooled": pooled["eval"]}

    sizes = model_sizes(settings.model)
    cpus_per_site = client_resources(len(site_files), gpus=0)["num_cpus"]  # as `addiff simulate` chose them
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available(),
                    "load_average_at_end": os.getloadavg()[0]},
        "settings": {"sites": len(site_files), "cases_per_site": cases, "backend": default_backend,
                     "sites_at_once": sites_at_once(len(site_files), cpus_per_site), "cpus_per_site": cpus_per_site,
                     "model_config": model_config.name,
                     "rounds": rounds, "strategy": settings.strategy, "eval_steps": settings.eval_steps},
        "time": {"federated_wall_seconds": round(wall_fl, 1), "plain_wall_seconds": round(wall_plain, 1),
                 "ratio_wall": round(wall_fl / wall_plain, 3), "report_seconds": round(report_s, 1),
                 "ratio_wall_without_report": round((wall_fl - report_s) / wall_plain, 3),
                 "federated_round_seconds": round(fl_train, 1), "plain_train_seconds": round(plain["train_seconds"], 1),
                 "ratio_train": round(fl_train / plain["train_seconds"], 3),
                 "plain_1thread_train_seconds": round(plain1["train_seconds"], 1),
                 "ratio_train_vs_1thread": round(fl_train / plain1["train_seconds"], 3),
                 "federated_first_round_seconds": round(fl_rounds[0], 1),
                 "plain_first_round_seconds": round(plain["round_seconds"][0], 1),
                 "federated_later_rounds_seconds": round(sum(fl_rounds[1:]), 1),
                 "plain_later_rounds_seconds": round(sum(plain["round_seconds"][1:]), 1),
                 "ratio_later_rounds": round(sum(fl_rounds[1:]) / sum(plain["round_seconds"][1:]), 3),
                 "plain_1thread_later_rounds_seconds": round(sum(plain1["round_seconds"][1:]), 1),
                 "ratio_later_rounds_vs_1thread": round(sum(fl_rounds[1:]) / sum(plain1["round_seconds"][1:]), 3),
                 "plain_load_seconds": round(plain["load_seconds"], 1),
                 "plain_eval_seconds": round(plain.get("eval_seconds", 0.0), 1),
                 "max_abs_weight_difference_federated_vs_plain": max_diff[default_backend]},
        "backends": {b: backend_times(f, plain, wall_plain, max_diff[b]) for b, f in federated.items()},
        "mechanisms": mech,
        "bytes": {"model_bytes": sizes, **stage_bytes(run_dir)},
        "mae_gy": {name: {"federated": fl_final[name]["mae_gy"],
                          **({"alone": baselines["alone"][name]["mae_gy"],
                              "pooled": baselines["pooled"][name]["mae_gy"]} if baselines else {})}
                   for name in sorted(fl_final)},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fl_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "fl_overhead.md").write_text(report(result))
    print(report(result))
    return 0


def backend_times(fed: dict, plain: dict, wall_plain: float, max_diff: float) -> dict:
    """One backend's federated times next to the plain loop's (default torch threads)."""
    later, plain_later = sum(fed["rounds"][1:]), sum(plain["round_seconds"][1:])
    return {"wall_seconds": round(fed["wall"], 1), "ratio_wall": round(fed["wall"] / wall_plain, 3),
            "round_seconds": round(sum(fed["rounds"]), 1),
            "ratio_train": round(sum(fed["rounds"]) / plain["train_seconds"], 3),
            "first_round_seconds": round(fed["rounds"][0], 1), "later_rounds_seconds": round(later, 1),
            "ratio_later_rounds": round(later / plain_later, 3), "max_abs_weight_difference_vs_plain": max_diff}


def startup_seconds() -> float:
    """Python + torch import time of a fresh process (the federated figure includes its own)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import addiff_core.site_task"], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def simulation_line(r: dict) -> str:
    st = r["settings"]
    if st.get("backend", "ray") == "serial":
        return (f"The simulation (serial backend, `addiff simulate`'s choice on this machine) runs the sites in turn "
                f"in its own process with torch's default threads ({r['machine']['torch_threads']}).")
    return (f"The simulation runs {st.get('sites_at_once', '?')} sites at once as Ray actors of "
            f"{st.get('cpus_per_site', 1)} CPU each (1 torch thread each).")


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def report(r: dict) -> str:
    t, b, m = r["time"], r["bytes"], r["mechanisms"]
    lines = [
        "# Federation overhead (bench/fl_overhead.py)", "",
        f"Machine: {r['machine']['cpus']} CPU cores, GPU: {r['machine']['gpu']}, torch {r['machine']['torch']}; "
        f"load average at the end {r['machine']['load_average_at_end']:.1f}.",
        f"Settings: {r['settings']['sites']} synthetic hospitals x {r['settings']['cases_per_site']} cases (32^3), "
        f"`{r['settings']['model_config']}`, rounds (VAE,diffusion) {r['settings']['rounds']}, "
        f"{r['settings']['strategy']}, each site's local epochs.", "",
        "## Time: `addiff simulate` vs the same rounds without Flower", "",
        "The plain loop makes the same `SiteTask.train` calls (same rounds, sites, local epochs, seeds) one "
        "site after the other in one process and averages the weights with numpy. " + simulation_line(r), "",
        "| what | federated (Flower simulation) | plain loop (no Flower) | ratio |", "|---|---|---|---|",
    ]
    if "ratio_later_rounds" in t:
        lines += [
            f"| rounds 2-{len(b['per_round'])}, plain loop with torch's default threads ({r['machine']['torch_threads']}) | "
            f"{t['federated_later_rounds_seconds']} s | {t['plain_later_rounds_seconds']} s | **{t['ratio_later_rounds']}** |",
            f"| rounds 2-{len(b['per_round'])}, plain loop with 1 torch thread | {t['federated_later_rounds_seconds']} s | "
            f"{t['plain_1thread_later_rounds_seconds']} s | {t['ratio_later_rounds_vs_1thread']} |",
            f"| round 1 only | {t['federated_first_round_seconds']} s | {t['plain_first_round_seconds']} s | "
            f"{t['federated_first_round_seconds'] / max(t['plain_first_round_seconds'], 1e-9):.2f} |",
        ]
    lines += [
        f"| all training rounds, plain loop with torch's default threads ({r['machine']['torch_threads']}) | "
        f"{t['federated_round_seconds']} s | {t['plain_train_seconds']} s | {t['ratio_train']} |",
        f"| all training rounds, plain loop with 1 torch thread | {t['federated_round_seconds']} s | "
        f"{t['plain_1thread_train_seconds']} s | {t['ratio_train_vs_1thread']} |",
        f"| end to end (process start, Flower, data, rounds, final evaluation, run report) vs plain loop with default threads | "
        f"{t['federated_wall_seconds']} s | {t['plain_wall_seconds']} s | {t['ratio_wall']} |",
    ]
    if "ratio_wall_without_report" in t:
        lines.append(f"| end to end less the run report ({t['report_seconds']} s of tables and figures, which the plain "
                     f"loop does not write) | {t['federated_wall_seconds'] - t['report_seconds']:.1f} s | "
                     f"{t['plain_wall_seconds']} s | {t['ratio_wall_without_report']} |")
    lines += [
        "",
        "Round 1 of the simulation also loads every site's data (and, with Ray, starts a Ray actor process "
        "per site, each importing torch and MONAI); the plain loop did its one import and data loading "
        "before its clock started. Rounds 2 onwards are the cost of federating that grows with the run. "
        "Final weights of federated and plain runs differ by at most "
        f"{t['max_abs_weight_difference_federated_vs_plain']:.2e} (float summation order).", "",
    ]
    if "backends" in r:
        lines += ["### Each simulation backend against the same plain loop (default torch threads)", "",
                  "| backend | end to end | ratio | all rounds | ratio | round 1 | rounds 2-N | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, v in r["backends"].items():
            mark = " (`addiff simulate`'s choice here)" if name == r["settings"].get("backend") else ""
            lines.append(f"| {name}{mark} | {v['wall_seconds']} s | {v['ratio_wall']} | {v['round_seconds']} s | "
                         f"{v['ratio_train']} | {v['first_round_seconds']} s | {v['later_rounds_seconds']} s | "
                         f"{v['ratio_later_rounds']} |")
        lines.append("")
    lines += ["## Start-up overhead of the simulation mechanisms (tiny model, 1+1 rounds)", "",
              "| mechanism | wall | in rounds | overhead |", "|---|---|---|---|"]
    names = {"inprocess": "in-process `run_simulation`, Ray", "inprocess-serial": "in-process `run_simulation`, serial backend",
             "inprocess-ray": "in-process `run_simulation`, Ray backend", "flwr": "local SuperLink + `flwr run` (Ray)"}
    for via, v in m.items():
        lines.append(f"| {names.get(via, via)} | {v['wall_seconds']} s | {v['round_seconds']} s | "
                     f"{v['overhead_seconds']} s |")
    lines += ["", "## Bytes on the wire per round (all sites, down + up)", "",
              "| stage | rounds | per round | per site down / up |", "|---|---|---|---|"]
    for stage in ("vae", "diffusion", "unet"):
        if stage in b:
            s = b[stage]
            lines.append(f"| {stage} | {s['rounds']} | {mb(s['bytes_per_round'])} | {mb(s['down_per_site'])} / "
                         f"{mb(s['up_per_site'])} |")
            if "first_round_bytes" in s:
                lines.append(f"| {stage}, first round (+ frozen VAE) | 1 | {mb(s['first_round_bytes'])} | "
                             f"{mb(s['first_round_down_per_site'])} / {mb(s['up_per_site'])} |")
    lines += ["", "Model (float32): " + ", ".join(f"{k} {mb(v)}" for k, v in b["model_bytes"].items())
              + f". Whole run: {mb(b['total_bytes'])}.", "",
              "## Held-out MAE (Gy) per site", "", "| site | federated | site alone | pooled |", "|---|---|---|---|"]
    for name, v in r["mae_gy"].items():
        lines.append(f"| {name} | {v['federated']:.2f} | {v.get('alone', float('nan')):.2f} | "
                     f"{v.get('pooled', float('nan')):.2f} |")
    lines += ["", "Same schedule for all three: site alone = the federated rounds with one site; pooled = one "
              "model on every site's training cases. Held-out cohorts are each site's own (never trained on).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
