"""Where local commands may write: never into a case folder or a data folder, and never over
an existing result unless asked (``--overwrite``).

``addiff predict --out CASE`` once replaced the case's reference ``dose.nii.gz`` with a
prediction; ``addiff train --out RUN`` silently replaced a trained ``model.pt``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError

CASE_MARKERS = ("plan.yaml", "ct.nii.gz")


def _is_case_dir(p: Path) -> bool:
    return p.is_dir() and any((p / m).exists() for m in CASE_MARKERS)


def _holds_cases(p: Path) -> bool:
    try:
        return p.is_dir() and any(_is_case_dir(c) for c in p.iterdir())
    except OSError:
        return False


def check_output_dir(out: Path, *, results: tuple[str, ...], overwrite: bool,
                     data_dirs: tuple[Path, ...] = ()) -> Path:
    """Refuse (ConfigError, one line) an output folder that is, or is inside, a case folder;
    that holds case folders; that is inside one of ``data_dirs``; or that already holds one of
    ``results`` (unless ``overwrite``). Returns the folder, resolved."""
    out = Path(out).expanduser()
    real = out.resolve()
    for p in (real, *real.parents):
        if _is_case_dir(p):
            raise ConfigError(f"{out}: is {'a case folder' if p == real else 'inside the case folder ' + str(p)}; "
                              "outputs never go into case folders: choose another --out")
    if _holds_cases(real):
        raise ConfigError(f"{out}: holds case folders (a data folder); choose another --out")
    for d in data_dirs:
        d = Path(d).resolve()
        if real == d or d in real.parents:
            raise ConfigError(f"{out}: is inside the data folder {d}; choose another --out")
    if not overwrite:
        have = [r for r in results if (real / r).exists()]
        if have:
            raise ConfigError(f"{out}: already holds {have[0]} from an earlier run; kept (use --overwrite to "
                              "replace it, or another --out)")
    return real


def check_output_file(out: Path, *, overwrite: bool, data_dirs: tuple[Path, ...] = ()) -> Path:
    """Like :func:`check_output_dir` for a single output file."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; give a file name")
    check_output_dir(out.parent if str(out.parent) else Path("."), results=(), overwrite=True, data_dirs=data_dirs)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: exists; kept (use --overwrite to replace it)")
    return out


def ensure_writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create the output folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{path}: output folder is not writable")
    return path
