"""A hospital approves the app bundles (Flower FABs) it runs: ``approved_bundles`` in the site file.

Fast: the hash is Flower's own FAB hash (``flwr build`` / ``flwr run``), the allow-list and the
run's claims are checked, the site file validates the list, ``addiff client bundle-hash`` prints
it, and Flower's ClientApp runner with the guard installed refuses before anything of a bundle is
unpacked (and answers ``INVALID_FAB``), while an approved bundle is unpacked afresh.

In a real deployment (``test_federation_failures.py::test_deployment_sites_that_refuse_or_fail_leak_nothing``):
a site whose list holds the bundle trains; a site whose list does not refuses every message (no
ClientApp code runs there: nothing unpacked, no site log), and the server records it as a failed
site and finishes with the other."""
from __future__ import annotations

import argparse
import hashlib
import textwrap
from pathlib import Path

import pytest

from client.bundle_approval import (BundleRefused, bundle_of_path, bundle_sha256, check_bundle, normalize_hashes,
                                    read_bundle)

TINY_PYPROJECT = textwrap.dedent("""\
    [build-system]
    requires = ["hatchling"]
    build-backend = "hatchling.build"

    [project]
    name = "tinyapp"
    version = "1.0.0"
    dependencies = []

    [tool.flwr.app]
    publisher = "acme"

    [tool.flwr.app.components]
    serverapp = "tinyapp.server_app:app"
    clientapp = "tinyapp.client_app:app"

    [tool.flwr.app.config]
    rounds = 1
    """)


@pytest.fixture
def tiny_app(tmp_path) -> Path:
    app = tmp_path / "tinyapp"
    (app / "tinyapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(TINY_PYPROJECT)
    (app / "tinyapp" / "__init__.py").write_text("")
    (app / "tinyapp" / "client_app.py").write_text("MARKER = 'client'\n")
    (app / "tinyapp" / "server_app.py").write_text("MARKER = 'server'\n")
    return app


def test_hash_is_flowers_fab_hash_and_reproducible(tiny_app):
    from client.flower_compat import build_fab

    fab = build_fab(tiny_app)
    assert bundle_of_path(tiny_app) == fab  # a folder: what `flwr run FOLDER` sends, byte for byte
    assert bundle_sha256(fab) == hashlib.sha256(fab).hexdigest()
    (tiny_app.parent / "x.fab").write_bytes(fab)
    assert bundle_of_path(tiny_app.parent / "x.fab") == fab
    info = read_bundle(fab)
    assert (info.fab_id, info.version) == ("acme/tinyapp", "1.0.0")
    assert "tinyapp/client_app.py" in info.files
    assert info.install_dir_name == f"acme.tinyapp.1.0.0.{info.sha256[:8]}"
    (tiny_app / "tinyapp" / "client_app.py").write_text("MARKER = 'client!'\n")  # one byte more: another bundle
    assert bundle_sha256(bundle_of_path(tiny_app)) != info.sha256


def test_check_bundle_refuses_what_is_not_approved_or_not_what_it_claims(tiny_app):
    fab = bundle_of_path(tiny_app)
    h = bundle_sha256(fab)
    ok = dict(claimed_hash=h, run_fab_hash=h, run_fab_id="acme/tinyapp", run_fab_version="1.0.0")
    assert check_bundle(fab, frozenset({h}), **ok).sha256 == h
    with pytest.raises(BundleRefused, match=f"sha256 {h} is not in this site's approved_bundles"):
        check_bundle(fab, frozenset({"0" * 64}), **ok)
    with pytest.raises(BundleRefused, match="claimed hash"):
        check_bundle(fab, frozenset({h}), **{**ok, "claimed_hash": "f" * 64})
    with pytest.raises(BundleRefused, match="claimed hash"):
        check_bundle(fab, frozenset({h}), **{**ok, "run_fab_hash": "f" * 64})
    with pytest.raises(BundleRefused, match="the run names"):  # Flower would load another folder's code
        check_bundle(fab, frozenset({h}), **{**ok, "run_fab_id": "acme/other"})
    with pytest.raises(BundleRefused, match="the run names"):
        check_bundle(fab, frozenset({h}), **{**ok, "run_fab_version": "2.0.0"})
    junk = b"not a zip"
    with pytest.raises(BundleRefused, match="not a readable Flower app bundle"):
        check_bundle(junk, frozenset({bundle_sha256(junk)}))


def test_normalize_hashes():
    h = "AB" * 32
    assert normalize_hashes([h, f" {h.lower()} "]) == frozenset({h.lower()})
    for bad in ("ab" * 31, "zz" * 32, "sha256:" + "ab" * 32, ""):
        with pytest.raises(ValueError, match="not a SHA-256"):
            normalize_hashes([bad])


def test_site_file_approved_bundles(tmp_path):
    from addiff_core.config import ConfigError, site_config_from_dict

    base = {"name": "h", "data_dir": "cases"}
    assert site_config_from_dict(base, tmp_path / "s.yaml").approved_bundles is None
    h = "AB" * 32
    cfg = site_config_from_dict({**base, "approved_bundles": [h, h.lower(), "cd" * 32]}, tmp_path / "s.yaml")
    assert cfg.approved_bundles == ("ab" * 32, "cd" * 32)
    assert site_config_from_dict({**base, "approved_bundles": []}, tmp_path / "s.yaml").approved_bundles == ()  # none
    for bad in (["ab" * 31], "ab" * 32, [12345], ["ab" * 32, None]):
        with pytest.raises(ConfigError, match="s.yaml: approved_bundles: must be a list of SHA-256"):
            site_config_from_dict({**base, "approved_bundles": bad}, tmp_path / "s.yaml")


def test_bundle_hash_command(tiny_app, capsys):
    from client.bundle_approval import add_parser

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="c"))
    args = p.parse_args(["bundle-hash", str(tiny_app)])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert out.strip() == bundle_sha256(bundle_of_path(tiny_app))
    assert "acme/tinyapp 1.0.0" in err and "tinyapp/client_app.py" in err and "approved_bundles:" in err
    with pytest.raises(Exception, match="no such bundle file or app folder"):
        args.func(p.parse_args(["bundle-hash", str(tiny_app / "missing.fab")]))


class _Run:
    def __init__(self, fab_id="acme/tinyapp", fab_version="1.0.0", fab_hash=""):
        self.run_id, self.fab_id, self.fab_version, self.fab_hash = 7, fab_id, fab_version, fab_hash


def _guarded_flower(monkeypatch, tmp_path, approved, fab, run):
    """Flower's ClientApp runner module with the guard installed over fake task-input/push
    functions (monkeypatch restores Flower's own at the end)."""
    from flwr.app import Message, RecordDict

    from client.clientapp_guard import install_guard
    from client.flower_compat import Fab, run_clientapp_module, set_task_identity

    set_task_identity(run_id=7)  # what Flower's own task-input pull sets
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    pushed = []
    rc = run_clientapp_module()
    monkeypatch.setattr(rc, "pull_task_input", lambda client: (msg, None, run, Fab(run.fab_hash, fab, {})))
    monkeypatch.setattr(rc, "push_message", lambda client, message, context: pushed.append(message))
    monkeypatch.setattr(rc, "install_from_fab", rc.install_from_fab)
    guard = install_guard(frozenset(approved))
    rc.pull_task_input(None)
    return rc, guard, pushed


def test_guard_refuses_before_unpacking_and_answers_invalid_fab(monkeypatch, tmp_path, tiny_app, capsys):
    from flwr.app import Error, Message

    from client.flower_compat import ErrorCode

    fab = bundle_of_path(tiny_app)
    h = bundle_sha256(fab)
    rc, guard, pushed = _guarded_flower(monkeypatch, tmp_path, {"0" * 64}, fab, _Run(fab_hash=h))
    with pytest.raises(BundleRefused):
        rc.install_from_fab(fab, skip_prompt=True)
    home = tmp_path / "flwr-home"
    assert not (home / "apps").exists()  # nothing unpacked
    assert (home / "refused-bundles" / f"{h}.fab").read_bytes() == fab  # kept for review
    assert f"REFUSED run 7: app bundle sha256 {h} is not in this site's approved_bundles" in capsys.readouterr().err
    # Flower's error path pushes its own error reply: the guard turns it into INVALID_FAB
    rc.push_message(None, Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="x"),
                                  reply_to=guard.message), None)
    assert pushed[-1].has_error() and pushed[-1].error.code == ErrorCode.INVALID_FAB


def test_guard_refuses_an_approved_bundle_sent_under_another_name(monkeypatch, tmp_path, tiny_app):
    fab = bundle_of_path(tiny_app)
    h = bundle_sha256(fab)
    # approved bytes, but the run points Flower's loader at another app's folder
    rc, guard, _ = _guarded_flower(monkeypatch, tmp_path, {h}, fab, _Run(fab_id="acme/other", fab_hash=h))
    with pytest.raises(BundleRefused, match="the run names"):
        rc.install_from_fab(fab, skip_prompt=True)
    assert not (tmp_path / "flwr-home" / "apps").exists()


def test_guard_unpacks_an_approved_bundle_afresh(monkeypatch, tmp_path, tiny_app):
    fab = bundle_of_path(tiny_app)
    h = bundle_sha256(fab)
    target = tmp_path / "flwr-home" / "apps" / f"acme.tinyapp.1.0.0.{h[:8]}"
    (target / "tinyapp").mkdir(parents=True)  # a folder left behind, with other code in it
    (target / "tinyapp" / "client_app.py").write_text("MARKER = 'planted'\n")
    (target / "tinyapp" / "extra.py").write_text("")
    rc, guard, pushed = _guarded_flower(monkeypatch, tmp_path, {h}, fab, _Run(fab_hash=h))
    assert Path(rc.install_from_fab(fab, skip_prompt=True)) == target
    assert (target / "tinyapp" / "client_app.py").read_text() == "MARKER = 'client'\n"
    assert not (target / "tinyapp" / "extra.py").exists()
    assert guard.refused is None


def test_the_mirrored_fab_constants_are_flowers():
    # bundle_approval keeps copies (it is imported by every addiff command, Flower is not)
    from client import bundle_approval, flower_compat

    assert bundle_approval.FAB_CONFIG_FILE == flower_compat.FAB_CONFIG_FILE
    assert bundle_approval.FAB_HASH_TRUNCATION == flower_compat.FAB_HASH_TRUNCATION


def test_guarded_process_imports_the_bundles_own_client_package(tmp_path):
    """The guard itself is imported from this installation's ``client`` package; once it has
    checked the bundle, Flower must import ``client.client_app`` from the bundle's folder (as the
    plain flwr-clientapp does), not from this installation."""
    import subprocess
    import sys

    app = tmp_path / "addiff.addiff-fl.0.1.0.12345678"
    (app / "client").mkdir(parents=True)
    (app / "client" / "__init__.py").write_text("")
    (app / "client" / "client_app.py").write_text("MARKER = 'from the bundle'\n")
    code = ("import sys, client.clientapp_guard as g, client.flower_compat as fc; g._forget_app_packages(); "
            "print(fc.load_app('client.client_app:MARKER', ValueError, sys.argv[1]))")
    out = subprocess.run([sys.executable, "-P", "-c", code, str(app)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.stdout.strip() == "from the bundle", out.stderr[-2000:]


def test_supernode_is_stopped_when_the_guard_launcher_dies(monkeypatch, capsys):
    """Fail-closed and loud: without the launcher no ClientApp can run, so `addiff client start`
    stops the SuperNode (SIGTERM to its main thread, SystemExit by launch.exit_on_sigterm)."""
    import os
    import signal
    import sys
    import time

    from client import clientapp_guard as g

    monkeypatch.setattr(g, "launcher_cmd", lambda *a: [sys.executable, "-c", "import sys; sys.exit(3)"])

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    def supernode(cmd, env, **kw):  # stands in for run_foreground(flower-supernode ...)
        time.sleep(60)
        return 0

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        t0 = time.monotonic()
        with pytest.raises(SystemExit):
            g.run_guarded(supernode, ["flower-supernode", "--isolation", "process"], approved=["ab" * 32],
                          runtime_port=1, env=dict(os.environ))
        assert time.monotonic() - t0 < 30
    finally:
        signal.signal(signal.SIGTERM, old)
    assert "exited with status 3: no ClientApp can run; stopping the SuperNode" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--isolation process"):
        g.run_guarded(supernode, ["flower-supernode", "--isolation", "subprocess"], approved=["ab" * 32],
                      runtime_port=1, env={})
