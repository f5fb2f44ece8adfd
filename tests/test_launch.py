"""addiff_core/processes.py: the processes a launcher starts are found (psutil) and stopped by PID, a
reused PID never signalled; `addiff client start` starts from an empty unpacked-app cache."""
from __future__ import annotations

import os
import sys

from addiff_core import processes


def test_a_started_process_is_a_descendant_until_stopped(tmp_path):
    proc = processes.start([sys.executable, "-c", "import time; time.sleep(60)"], env=dict(os.environ),
                        log_file=tmp_path / "p.log")
    try:
        me = processes.identity(proc.pid)
        assert me is not None and me in processes.descendants()
        assert processes.running(*me)
        assert not processes.running(proc.pid, me[1] + 1.0)  # same PID, another process: never it
    finally:
        processes.stop(proc, timeout=5)
    assert proc.poll() is not None
    assert not processes.running(*me) and me not in processes.descendants()
    assert processes.identity(proc.pid) is None or processes.identity(proc.pid) != me


def test_the_tracker_remembers_orphans_and_ends_them(tmp_path):
    # a child that starts a grandchild and exits at once: the grandchild is orphaned
    code = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True)")
    with processes.DescendantTracker(interval=0.05) as tracker:
        proc = processes.start([sys.executable, "-c", code + "; import time; time.sleep(1.0)"], env=dict(os.environ),
                            log_file=tmp_path / "p.log")
        proc.wait(timeout=30)
    orphans = tracker.alive()
    assert orphans, "the grandchild was not seen"
    left = tracker.terminate(timeout=5)
    assert not tracker.alive()
    assert set(left) <= set(orphans)


def test_client_start_empties_the_unpacked_app_cache_a_crash_may_have_left_half_written(tmp_path):
    """A SuperNode killed while Flower unpacked a bundle leaves a partial app folder that Flower
    would reuse (tests/test_federation_failures.py restarts such a site): `addiff client start`
    empties $FLWR_HOME/apps first, and only that."""
    from client.supernode import clear_unpacked_apps

    home = tmp_path / "flwr-home"
    partial = home / "apps" / "addiff.addiff-fl.0.1.0.c79c41e9"
    (partial / "client").mkdir(parents=True)
    (partial / "client" / "__init__.py").write_text("")  # no pyproject.toml: the copy was cut short
    (home / "config.toml").write_text("[superlink]\n")
    assert clear_unpacked_apps({"FLWR_HOME": str(home)}) == home / "apps"
    assert not (home / "apps").exists()
    assert (home / "config.toml").read_text() == "[superlink]\n"
    assert clear_unpacked_apps({"FLWR_HOME": str(home)}) == home / "apps"  # nothing there: no error
