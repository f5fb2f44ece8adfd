"""Where relative paths of a run point: the project folder, the one owner of that rule.

Paths in a run's configuration (site files, model config, run folder) are lists written as one
string (:func:`split_list`) and resolve against :func:`project_root` (:func:`resolve_path`), in
the coordinator, at a site and in the report alike.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError

PROJECT_ENV = "ADDIFF_PROJECT_DIR"
_APP_PATTERNS = ("server/*.py", "client/*.py", "configs/*.yaml")  # pyproject's fab-include


class ProjectRootError(ConfigError):
    """The folder relative paths should resolve against cannot be told (see project_root)."""


def split_list(value: Any) -> list[str]:
    """'a.yaml, b.yaml' or one per line (run config strings cannot be lists), or a list ->
    ['a.yaml', 'b.yaml']; blanks dropped."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value or "").replace("\n", ",").split(",") if v.strip()]


def is_checkout(d: Path) -> bool:
    """An addiff-fl project folder: its pyproject.toml, the ServerApp and the addiff_core sources."""
    try:
        return (d / "addiff_core").is_dir() and (d / "server" / "server_app.py").is_file() and \
            'name = "addiff-fl"' in (d / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False


def enclosing_checkout(start: Path) -> Path | None:
    return next((d for d in (start, *start.parents) if is_checkout(d)), None)


def installed_checkout() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    return root if is_checkout(root) else None


def is_bundle(d: Path) -> bool:
    """An unpacked app bundle (FAB): the app's pyproject.toml and glue, no ``addiff_core``."""
    return (d / "pyproject.toml").is_file() and (d / "client" / "client_app.py").is_file() and \
        not (d / "addiff_core").is_dir()


def bundle_dir() -> Path | None:
    """The app bundle this process runs (``flwr run`` unpacks it and puts its folder on
    ``sys.path`` to import the app from it), or None (a checkout or an install)."""
    for entry in sys.path:
        d = Path(entry or ".").resolve()
        if is_bundle(d):
            return d
    return None


def same_app(bundle: Path, folder: Path) -> bool:
    """True if ``folder`` holds exactly the app files of ``bundle`` (the fab-include patterns;
    pyproject.toml compared as parsed TOML: Flower rewrites it into the bundle)."""
    import tomllib

    def files(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for pat in _APP_PATTERNS for p in sorted(d.glob(pat))}

    def toml(d: Path) -> dict:
        doc = tomllib.loads((d / "pyproject.toml").read_text(encoding="utf-8"))
        doc.get("tool", {}).get("flwr", {}).pop("federations", None)
        return doc

    try:
        return files(bundle) == files(folder) and toml(bundle) == toml(folder)
    except (OSError, ValueError):
        return False


def project_root() -> Path:
    """The folder relative paths of the run configuration resolve against: the app's own folder.

    1. ``$ADDIFF_PROJECT_DIR`` if set (our launchers set it for the processes they start);
    2. run from an app bundle (FAB: ``flwr run`` unpacks ``server/``, ``client/``, ``configs/``
       and pyproject.toml into ``$FLWR_HOME/apps/...``, without the site files and data): the
       addiff-fl folder the process runs in (where the local SuperLink was started) when it
       holds exactly the app of the bundle, else the checkout ``addiff_core`` is installed from
       if that one does; else :class:`ProjectRootError`, never a guess;
    3. otherwise the addiff-fl folder the current directory is in (so a copy of the project
       works on its own files), else the checkout ``addiff_core`` is installed from, else the
       current directory.
    """
    env = os.environ.get(PROJECT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return _project_root(str(Path.cwd().resolve()), bundle_dir())


@functools.lru_cache(maxsize=16)
def _project_root(cwd: str, bundle: Path | None) -> Path:
    here = enclosing_checkout(Path(cwd))
    installed = installed_checkout()
    if bundle is None:
        return here or installed or Path(cwd)
    candidates = list(dict.fromkeys(c for c in (here, installed) if c is not None))
    for cand in candidates:
        if same_app(bundle, cand):
            return cand
    raise ProjectRootError(
        f"cannot tell which folder this app was started from: the app bundle ({bundle}) matches no addiff-fl "
        f"folder this server can see (tried: {', '.join(map(str, candidates)) or 'none'}). Flower's local "
        f"SuperLink keeps the folder it was started in: stop it (README, 'flwr run') and run `flwr run .` again "
        f"from the app's folder, or give absolute paths for run-dir, site-files and model-config in the run "
        f"config, or start the SuperLink with {PROJECT_ENV}=/path/to/the/app")


def resolve_path(value: str | os.PathLike, base: Path | None = None) -> Path:
    """``value`` if absolute, else against ``base`` (default :func:`project_root`), resolved."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else ((base or project_root()) / p).resolve()
