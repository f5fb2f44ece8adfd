"""addiff_core/project.py: an app bundle is recognised from where Flower imports the app (its
folder on sys.path), in any process, core modules included (the report resolves paths too)."""
from __future__ import annotations

from pathlib import Path

from addiff_core import project


def _bundle(d: Path) -> Path:
    (d / "client").mkdir(parents=True)
    (d / "client" / "client_app.py").write_text("app = None\n")
    (d / "pyproject.toml").write_text('[project]\nname = "addiff-fl"\n')
    return d


def test_the_bundle_is_the_app_folder_flower_imports_from(tmp_path, monkeypatch):
    assert project.bundle_dir() is None  # a checkout's folder (addiff_core beside it) is no bundle
    bundle = _bundle(tmp_path / "apps" / "addiff.addiff-fl.0.1.0.abc")
    monkeypatch.syspath_prepend(str(bundle))
    assert project.bundle_dir() == bundle.resolve()
    (bundle / "addiff_core").mkdir()  # an app folder with the core in it is a checkout
    assert project.bundle_dir() is None


def test_a_bundle_that_matches_no_folder_is_an_error_not_a_guess(tmp_path, monkeypatch):
    import pytest

    monkeypatch.delenv(project.PROJECT_ENV, raising=False)
    monkeypatch.syspath_prepend(str(_bundle(tmp_path / "bundle")))
    monkeypatch.chdir(tmp_path)
    project._project_root.cache_clear()
    try:
        with pytest.raises(project.ProjectRootError, match="cannot tell which folder"):
            project.resolve_path("sites/hospital_a.yaml")
    finally:
        project._project_root.cache_clear()
