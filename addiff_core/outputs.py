"""Where local commands may write: never into a case or data folder, never over an existing
result unless ``--overwrite``, never through a link (issue #29: ``predict --out CASE`` replaced a
reference dose, a planted ``rtdose.dcm`` link got a case's dose overwritten).

:func:`check_output_dir` / :func:`check_output_file` resolve the output (dangling links too) and
refuse those; :func:`write_output` writes beside and renames into place (exclusively without
``overwrite``); :func:`output_lock`: one command at a time per folder.
"""
from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .case_io import is_case_dir
from .config import ConfigError

LOCK_NAME = ".addiff.lock"


def _holds_cases(p: Path) -> bool:
    try:
        return p.is_dir() and any(is_case_dir(c) for c in p.iterdir())
    except OSError:
        return False


def data_folder_of(case_dir: Path) -> Path:
    """The data folder a case folder lies in (its parent): no output goes there either."""
    return Path(case_dir).expanduser().resolve().parent


def _refuse_case_or_data(shown: Path, real: Path, data_dirs: tuple[Path, ...], how: str = "") -> None:
    """ConfigError (one line) if ``real`` is, or is inside, a case folder, holds case folders or
    lies inside one of ``data_dirs``. ``how``: how the output gets there (e.g. through a link)."""
    for p in (real, *real.parents):
        if is_case_dir(p):
            raise ConfigError(f"{shown}: {how}is {'a case folder' if p == real else 'inside the case folder ' + str(p)}; "
                              "outputs never go into case folders: choose another --out")
    if _holds_cases(real):
        raise ConfigError(f"{shown}: {how}holds case folders (a data folder); choose another --out")
    for d in data_dirs:
        d = Path(d).expanduser().resolve()
        if real == d or d in real.parents:
            raise ConfigError(f"{shown}: {how}is inside the data folder {d}; choose another --out")


def check_output_dir(out: Path, *, results: tuple[str, ...], overwrite: bool,
                     data_dirs: tuple[Path, ...] = ()) -> Path:
    """Refuse (ConfigError, one line) an output folder that is, or is inside, a case folder;
    that holds case folders; that is inside one of ``data_dirs``; or that already holds one of
    ``results`` (unless ``overwrite``; a link counts, even a dangling one). Returns the folder,
    resolved."""
    out = Path(out).expanduser()
    real = out.resolve()
    _refuse_case_or_data(out, real, data_dirs)
    if not overwrite:
        have = [r for r in results if os.path.lexists(real / r)]
        if have:
            raise ConfigError(f"{out}: already holds {have[0]} from an earlier run; kept (use --overwrite to "
                              "replace it, or another --out)")
    return real


def check_output_file(out: Path, *, overwrite: bool, data_dirs: tuple[Path, ...] = ()) -> Path:
    """Like :func:`check_output_dir` for a single output file: its folder, and where a link at its
    name points (also a dangling link), must not be a case or data folder; an existing entry is
    kept unless ``overwrite``."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    check_output_dir(parent, results=(), overwrite=True, data_dirs=data_dirs)
    if out.is_symlink():
        target = out.resolve()
        _refuse_case_or_data(out, target.parent, data_dirs, how=f"is a link to {target}, whose folder ")
    if os.path.lexists(out) and not overwrite:
        raise ConfigError(f"{out}: exists; kept (use --overwrite to replace it)")
    return out


def _temp_beside(path: Path) -> Path:
    """A new empty file in ``path``'s folder whose name ends like ``path``'s (writers pick the
    format by the suffix: ``.nii.gz``), created exclusively with the usual permissions."""
    while True:
        tmp = path.with_name(f".tmp-{secrets.token_hex(4)}-{path.name}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o666))
            return tmp
        except FileExistsError:
            continue


def write_output(path: Path, write: Callable[[Path], Any], *, overwrite: bool) -> Path:
    """``write(tmp)`` writes the file under a temporary name beside ``path``; then it is renamed
    to ``path``. An existing link at ``path`` is replaced, never followed. Without ``overwrite``
    an entry that exists at ``path`` by now is kept (ConfigError, one line). Returns ``path``."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)  # fails on any existing name: an exclusive rename
        except FileExistsError:
            raise ConfigError(f"{path}: exists (written by another command meanwhile?); kept (use --overwrite "
                              "to replace it)") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if os.path.lexists(path):  # a file system without hard links: check, then rename
                raise ConfigError(f"{path}: exists; kept (use --overwrite to replace it)") from None
            os.replace(tmp, path)
        return path
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_output_bytes(path: Path, data: bytes, *, overwrite: bool) -> Path:
    """:func:`write_output` of ``data``."""
    return write_output(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite)


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``OUT/.addiff.lock`` (an advisory lock, released when the process ends) while a
    command writes into ``out_dir``; a second command on the same folder fails at once (one
    line) instead of replacing the first one's results. A no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    lock = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        raise ConfigError(f"{lock}: cannot create the lock file ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out_dir}: another addiff command is writing into this folder now; wait for it "
                              "to finish or choose another --out") from None
        yield  # the lock file stays: removing it would let a third command lock a new file beside a holder
    finally:
        os.close(fd)


def ensure_writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create the output folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{path}: output folder is not writable")
    return path
