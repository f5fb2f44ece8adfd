"""`flwr run .` as the README words it, from a fresh copy of the project (issues #16 and #28).

In a copy of the app folder as a fresh clone has it (pyproject.toml, server/, client/, configs/,
sites/, addiff_core/ sources, no demo_data/; the installed addiff_core stays the checkout's),
with Flower's managed local SuperLink on free ports and a private FLWR_HOME:

1. the README's command (``--federation-config "num-supernodes=3 client-resources-num-cpus=1"``,
   plus run-config overrides for a 1 + 1 round run of the tiny model), the first thing run: the
   ServerApp writes the demo data its default site files (``sites/hospital_*.yaml``) name, the
   run trains, and the relative ``run-dir`` and ``site-files`` resolve against the copy;
2. plain ``flwr run . --stream`` (Flower's default: 2 simulated SuperNodes for 3 site files)
   stops at once with a message naming ``num-supernodes=3``, instead of waiting for ever; its
   run.json says "failed" and so does the stream's last line;
3. plain ``flwr ls`` lists the runs; killing the SuperLink by the PID listening on its port (the
   README's way) ends its SuperExec too: nothing is left running.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from helpers.federation import ROOT, exit_code, read_text

pytestmark = pytest.mark.slow

README_FED = "num-supernodes=3 client-resources-num-cpus=1"


def listening_pids(port: int) -> list[int]:
    """PIDs of the processes with a TCP socket listening on ``port`` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if any(os.readlink(fd).replace("socket:[", "").rstrip("]") in inodes for fd in (d / "fd").iterdir()
                   if os.readlink(fd).startswith("socket:[")):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def copy_app(dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")
    ignore = shutil.ignore_patterns("__pycache__")
    for d in ("server", "client", "configs", "sites", "addiff_core"):
        shutil.copytree(ROOT / d, dst / d, ignore=ignore)
    return dst


def flwr(*args: str) -> list[str]:
    exe = Path(sys.executable).parent / "flwr"
    return [str(exe) if exe.exists() else "flwr", *args]


def test_flwr_run_as_in_the_readme_trains_in_the_app_folder(tmp_path, procs):
    from addiff_core.processes import free_port
    from server.demo_data import DEMO_STAMP
    from server.settings import DEFAULTS

    app = copy_app(tmp_path / "addiff-copy")
    sites = [app / p for p in DEFAULTS["site-files"].split(",")]  # the run config's default: sites/hospital_*.yaml
    assert all(p.is_file() for p in sites) and not (app / "demo_data").exists()  # a fresh clone
    port = free_port()
    env = os.environ.copy()
    env.pop("ADDIFF_PROJECT_DIR", None)
    env.update({"FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
                "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())})
    fast = ("model-config='configs/tiny.yaml' vae-rounds=1 diffusion-rounds=1 "
            "local-epochs=1 eval-steps=2 eval-gamma=false report-figures=false")
    logs = tmp_path / "logs"
    logs.mkdir()

    def run(name: str, *args: str, timeout: float) -> tuple[int | None, str]:
        p = procs.start(flwr(*args), env=env, log_file=logs / f"{name}.log", cwd=app)
        rc = exit_code(p, timeout)
        return rc, read_text(logs / f"{name}.log")

    try:
        # 1. the README's command on a fresh clone: the demo data is written, the run trains, and
        #    relative paths resolve against the app's folder
        rc, out = run("readme", "run", ".", "--stream", "--federation-config", README_FED,
                      "--run-config", f"{fast} run-dir='runs/readme'", timeout=420)
        assert rc == 0, out[-4000:]
        assert (app / "demo_data" / DEMO_STAMP).is_file() and "writing 3 synthetic hospitals" in out, out[-4000:]
        run_dir = app / "runs" / "readme"
        final = json.loads((run_dir / "final_metrics.json").read_text())
        assert sorted(r["site"] for r in final) == sorted(p.stem for p in sites), final
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("round_*.pt")) == ["round_0001.pt",
                                                                                       "round_0002.pt"]
        doc = json.loads((run_dir / "run.json").read_text())
        assert doc["status"] == "complete"
        assert doc["run_config"]["site-files"].split(",") == [str(p.resolve()) for p in sites]
        assert doc["run_config"]["model-config"] == str((app / "configs" / "tiny.yaml").resolve())
        assert not (ROOT / "runs" / "readme").exists() and not (ROOT / "runs" / "plain").exists()
        assert "Aggregation: fedavg" in out and "Central DP: off" in out

        # 2. Flower's default federation (2 simulated SuperNodes): a clear stop, not a hang
        t0 = time.monotonic()
        rc, out = run("plain", "run", ".", "--stream", "--run-config", f"{fast} run-dir='runs/plain'", timeout=240)
        assert rc is not None, f"plain `flwr run . --stream` still running after 240 s:\n{out[-3000:]}"
        assert "num-supernodes=3" in out and "2 SuperNode(s)" in out, out[-3000:]
        assert time.monotonic() - t0 < 240
        assert not (app / "runs" / "plain" / "checkpoints").exists()
        plain_json = app / "runs" / "plain" / "run.json"
        assert json.loads(plain_json.read_text())["status"] == "failed"
        errors = [ln for ln in out.splitlines() if "ERROR" in ln]  # Ray may warn after it, Flower does not
        assert errors and f'the run FAILED (status "failed" in {plain_json.resolve()})' in errors[-1], out[-3000:]

        # 3. `flwr ls` (no app path) lists both runs
        rc, out = run("ls", "ls", timeout=60)
        assert rc == 0, out[-3000:]
    finally:
        # the README's way to stop what `flwr run` leaves behind: the PID listening on the port
        for _ in range(60):  # let the finished runs' processes (flwr-simulation, Ray) exit first
            if len(procs.tracker.alive()) <= 2:
                break
            time.sleep(1)
        for pid in listening_pids(port):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while procs.tracker.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {pid: read_text(f"/proc/{pid}/cmdline").replace("\0", " ")[:200] for pid in procs.tracker.alive()}
    assert not left, f"still running 30 s after the SuperLink was stopped by PID: {left}"
