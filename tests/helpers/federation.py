"""Shared helpers of the federation tests: an in-process Grid, synthetic sites, process control.

``FakeGrid`` implements the two Grid methods the ServerApp uses (``get_node_ids``,
``send_and_receive``) and calls the real ``client.client_app.app`` with a per-node Context,
so the server loop, the strategies and the ClientApp run unchanged, without Ray or sockets.
"""
from __future__ import annotations

from flwr.app import Context, Message, RecordDict

from client.flower_compat import set_task_identity


class FakeGrid:
    def __init__(self, n_nodes: int, client_app=None, node_configs: list[dict] | None = None, run_config=None):
        from client.client_app import app as default_app

        set_task_identity()
        self.client_app = client_app or default_app
        self.node_ids = [1000 + i for i in range(n_nodes)]
        cfgs = node_configs or [{"partition-id": i, "num-partitions": n_nodes} for i in range(n_nodes)]
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config=cfg, state=RecordDict(),
                                      run_config=dict(run_config or {}))
                         for nid, cfg in zip(self.node_ids, cfgs)}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            out.append(self.client_app(message=m, context=self.contexts[m.metadata.dst_node_id]))
        return out


ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"  # the 32^3 model of federation smoke runs (a file: it travels as a path)


def synthetic_sites(base, n_sites: int = 3, cases_per_site: int = 3, size: int = 32):
    """Site files of small synthetic hospitals under ``base`` (written once per folder)."""
    import json
    from pathlib import Path

    from addiff_core.synth import write_synthetic_sites

    base = Path(base)
    stamp = base / "sites.json"
    if stamp.is_file():
        return [Path(p) for p in json.loads(stamp.read_text())]
    files = write_synthetic_sites(base, n_sites=n_sites, cases_per_site=cases_per_site, size=size, seed=0)
    stamp.write_text(json.dumps([str(f) for f in files]))
    return [Path(f) for f in files]


def site_file_variant(src, out, **changes):
    """A copy of site file ``src`` at ``out`` with top-level keys set to ``changes`` (YAML keys;
    ``data_dir`` made absolute, so that the copy may live in another folder). Returns ``out``."""
    from pathlib import Path

    import yaml

    src, out = Path(src), Path(out)
    doc = yaml.safe_load(src.read_text())
    doc["data_dir"] = str((src.parent / doc["data_dir"]).resolve())
    doc.update(changes)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def flower_test_env(tmp_path) -> dict:
    """Environment for Flower processes in tests: a private FLWR_HOME, no dependency install."""
    import os

    env = os.environ.copy()
    env.update({"FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    return env


class Processes:
    """Processes a test starts (each in its own session), stopped by PID at the end, also when
    the test fails: SIGTERM to the leader, then its group and every descendant seen while it
    ran (some of Flower's processes start sessions of their own), then SIGKILL."""

    def __init__(self):
        from addiff_core.processes import DescendantTracker

        self.procs = []
        self.tracker = DescendantTracker()  # everything spawned below the test process
        self.tracker.__enter__()

    def start(self, cmd, *, env, log_file, cwd=None):
        import subprocess

        fh = open(log_file, "wb")  # noqa: SIM115 - closed in stop_all
        p = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        p._log_fh = fh  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def stop_all(self) -> list[int]:
        from addiff_core.processes import stop

        for p in reversed(self.procs):
            stop(p, timeout=20)
            p._log_fh.close()
        self.tracker.__exit__(None, None, None)
        return self.tracker.terminate(timeout=10)  # PIDs that were still alive (now killed)


def cli(*args) -> list[str]:
    import sys

    return [sys.executable, "-m", "addiff_core.cli", *map(str, args)]


# ------------------------------------------------------------------------------------------
# failure tests (tests/test_federation_failures.py): crashes by PID, polling, run folder rows
# ------------------------------------------------------------------------------------------
def kill_tree(proc) -> list[int]:
    """Crash a process a test started: SIGSTOP it, its process group and every descendant
    (Flower's SuperExec, flwr-serverapp and flwr-clientapp run in sessions of their own), then
    SIGKILL them all, by PID (start times checked). Returns the PIDs killed."""
    import os
    import signal

    from addiff_core.processes import descendants, identity, running

    def group_and_tree() -> set[tuple[int, float]]:
        out = set(descendants(proc.pid))
        me = identity(proc.pid)
        if me is not None:
            out.add(me)
        return out

    def send(targets, sig) -> None:
        try:
            os.killpg(proc.pid, sig)  # Processes.start: each process leads its own session
        except (ProcessLookupError, PermissionError):
            pass
        for pid, start in targets:
            if running(pid, start):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    targets = group_and_tree()
    send(targets, signal.SIGSTOP)  # frozen: nothing spawns or exits cleanly between listing and killing
    targets |= group_and_tree()
    send(targets, signal.SIGKILL)
    proc.wait(timeout=20)
    return sorted(pid for pid, _ in targets)


def wait_until(pred, timeout: float, what: str, *, interval: float = 0.5, watch=(), logs=None):
    """Poll ``pred()`` until it returns something truthy (returned), else fail with ``what``
    (and ``logs()``). A process of ``watch`` that exits meanwhile fails it at once."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        val = pred()
        if val:
            return val
        dead = [p for p in watch if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"exited with {dead[0].returncode}" if dead else f"not within {timeout:.0f} s"
            raise AssertionError(f"{what}: {why}\n{logs() if logs else ''}")
        time.sleep(interval)


def exit_code(proc, timeout: float) -> int | None:
    """The process's exit status, or None if it is still running after ``timeout`` seconds."""
    import subprocess

    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def read_text(path) -> str:
    from pathlib import Path

    p = Path(path)
    return p.read_text(errors="replace") if p.is_file() else ""


def metrics_rows(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in read_text(run_dir / "metrics.jsonl").splitlines() if line.strip()]


def tail_logs(folder, chars: int = 3000) -> str:
    """The end of every *.log under ``folder`` (for assertion messages)."""
    from pathlib import Path

    return "\n".join(f"--- {p}\n{read_text(p)[-chars:]}" for p in sorted(Path(folder).rglob("*.log")))
