"""The demo hospitals of ``addiff simulate`` (``--data-dir``, default ``demo_data/``): written by
the synthetic generator on first use and rewritten when the settings change.

Removing stale demo data is the one place the simulation deletes anything, so it removes only
what the generator itself wrote (#29: a planted ``addiff-demo.json`` naming ``../victim`` made it
delete a folder outside the data folder): names in the stamp must be plain names, and a folder
goes only if it is a real folder directly in the data folder holding the generator's marker file.

``flwr run .`` on a fresh clone names the demo site files (``sites/hospital_*.yaml``) before any
demo data exists: the ServerApp writes it first (:func:`ensure_demo_data`, issue #28).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from addiff_core.config import ConfigError, load_site_config

DEMO_STAMP = "addiff-demo.json"
DEMO_LOCK = ".addiff-demo.lock"
DEMO_DIR = "demo_data"  # beside the demo site files' folder (sites/hospital_a.yaml: ../demo_data/hospital_a/cases)
DEMO_SITES, DEMO_CASES, DEMO_SIZE = 3, 8, 32  # `addiff simulate`'s demo hospitals, the ones sites/*.yaml name
WRITE_IT = ("write it with `addiff simulate` or `addiff data synth --out demo_data --sites 3 --cases-per-site 8`, "
            "or name your own site files (run config site-files)")


def ensure_demo_sites(data_dir: Path, n_sites: int, cases_per_site: int, size: int, seed: int = 0) -> list[Path]:
    """Site files of ``n_sites`` synthetic hospitals under ``data_dir``; written if missing or
    made with other settings. Only what the generator itself wrote is ever removed: a site folder
    directly in ``data_dir`` holding its marker file (``addiff-synth.json``), never on the say-so
    of :data:`DEMO_STAMP` alone (a planted stamp once named ``../victim``)."""
    with _demo_lock(data_dir):
        return _ensure_demo_sites(data_dir, n_sites, cases_per_site, size, seed)


def ensure_demo_data(site_files: Sequence[Path], demo_files: Sequence[str]) -> list[Path]:
    """Write the demo hospitals a run's site files need, before its first round: a site file that
    is one of ``demo_files`` (relative names, e.g. ``sites/hospital_a.yaml``) and whose data folder
    lies in the demo folder beside it but does not exist yet. Returns the demo folders it wrote.
    Raises ConfigError (one line saying how to write the data) when it cannot be written."""
    todo: set[Path] = set()
    for f in map(Path, site_files):
        data_dir = _demo_dir_of(f, demo_files)
        if data_dir is not None and _missing_demo_data(f, data_dir):
            todo.add(data_dir)
    written = []
    for data_dir in sorted(todo):
        with _demo_lock(data_dir):  # a second `flwr run .` waits here, then finds the data written
            if not any(_missing_demo_data(Path(f), data_dir) for f in site_files):
                continue
            try:
                _ensure_demo_sites(data_dir, DEMO_SITES, DEMO_CASES, DEMO_SIZE)
            except ConfigError as e:
                raise ConfigError(f"the demo site files need their data in {data_dir}: {e}; {WRITE_IT}") from None
            still = [str(f) for f in site_files if _missing_demo_data(Path(f), data_dir)]
            if still:  # e.g. a cases folder removed by hand beside an intact stamp
                raise ConfigError(f"{still[0]}: its cases folder is missing, though {data_dir / DEMO_STAMP} says the demo "
                                  f"data was written; remove {data_dir} and run again")
            written.append(data_dir)
    return written


def _demo_dir_of(site_file: Path, demo_files: Sequence[str]) -> Path | None:
    """The demo data folder of ``site_file`` if it is one of ``demo_files`` (by its path's end)."""
    for rel in demo_files:
        parts = Path(rel.strip()).parts
        if parts and site_file.parts[-len(parts):] == parts:
            return site_file.parents[len(parts) - 1] / DEMO_DIR
    return None


def _missing_demo_data(site_file: Path, data_dir: Path) -> bool:
    """True if ``site_file`` is a demo site file whose cases folder, inside ``data_dir``, is missing
    (a site file that points elsewhere, or that does not load, is the run's to report)."""
    try:
        cases = load_site_config(site_file).data_dir.resolve()
    except (ConfigError, OSError):
        return False
    return cases.is_relative_to(data_dir.resolve()) and not cases.is_dir()


@contextmanager
def _demo_lock(data_dir: Path) -> Iterator[None]:
    """One writer of the demo data at a time (``addiff simulate``, ``flwr run .``: another process);
    a blocking lock, unlike ``outputs.output_lock``: the second waits, then uses what was written."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / DEMO_LOCK, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        raise ConfigError(f"{data_dir / DEMO_LOCK}: cannot create the lock file ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _ensure_demo_sites(data_dir: Path, n_sites: int, cases_per_site: int, size: int, seed: int = 0) -> list[Path]:
    # "version": bumped when the written site files change (2: lr 1e-3), so older demo data is rewritten
    want = {"sites": n_sites, "cases_per_site": cases_per_site, "size": size, "seed": seed, "version": 2}
    stamp = data_dir / DEMO_STAMP
    if stamp.is_file():
        have = _read_stamp(stamp)
        files = [data_dir / f for f in have["site_files"]]
        if {k: have.get(k) for k in want} == want and files and all(f.is_file() for f in files):
            return files
        for name in have["site_names"]:  # stale demo hospitals of other settings
            _remove_demo_site(data_dir, name)
    elif data_dir.exists() and any(p.name not in ("state", DEMO_LOCK) for p in data_dir.iterdir()):
        from addiff_core.synth import site_name

        files = [data_dir / f"{site_name(i)}.yaml" for i in range(n_sites)]
        if all(f.is_file() for f in files):  # e.g. written by `addiff data synth --out DIR`
            print(f"using the existing site files in {data_dir} (no {DEMO_STAMP}: settings unchecked)", flush=True)
            return files
        raise ConfigError(f"{data_dir} exists and is not addiff demo data (no {DEMO_STAMP}); "
                          "choose another --data-dir or pass --site-files")
    from addiff_core.synth import write_synthetic_sites

    t0 = time.perf_counter()
    print(f"writing {n_sites} synthetic hospitals x {cases_per_site} cases ({size}^3) to {data_dir} ...", flush=True)
    files = write_synthetic_sites(data_dir, n_sites=n_sites, cases_per_site=cases_per_site, size=size, seed=seed)
    doc = {**want, "site_files": [f.name for f in files], "site_names": [f.stem for f in files]}
    stamp.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
    return list(files)


DEMO_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a plain name: no '..', no '/', not absolute


def _read_stamp(stamp: Path) -> dict:
    """The demo stamp as written by :func:`ensure_demo_sites`: names that are plain names of
    entries directly in its folder, nothing else (an unreadable stamp reads as stale)."""
    try:
        have = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        have = {}
    have = have if isinstance(have, dict) else {}
    names = have.get("site_names") if isinstance(have.get("site_names"), list) else []
    files = have.get("site_files") if isinstance(have.get("site_files"), list) else []
    bad = [str(n) for n in names if not isinstance(n, str) or not DEMO_NAME_RE.fullmatch(n)]
    bad += [str(f) for f in files if not isinstance(f, str) or not f.endswith(".yaml")
            or not DEMO_NAME_RE.fullmatch(f[:-len(".yaml")])]
    if bad:
        raise ConfigError(f"{stamp}: names {bad[0][:80]!r}, not a demo hospital of this folder; nothing removed "
                          "(remove the stamp, or choose another --data-dir)")
    return {**have, "site_names": names, "site_files": files}


def _remove_demo_site(data_dir: Path, name: str) -> None:
    """Remove the demo hospital ``name`` (its folder and site file) if the generator wrote it: a
    real folder (not a link) directly in ``data_dir`` with the generator's marker file."""
    from addiff_core.synth import SITE_FILE_HEADER, SYNTH_MARKER

    folder, site_file = data_dir / name, data_dir / f"{name}.yaml"
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir() or not (folder / SYNTH_MARKER).is_file():
        raise ConfigError(f"{folder}: not written by the demo generator (no {SYNTH_MARKER}); not removed: remove it "
                          "yourself, or choose another --data-dir")
    shutil.rmtree(folder)
    try:
        if site_file.is_file() and not site_file.is_symlink() and \
                site_file.read_text(encoding="utf-8").startswith(SITE_FILE_HEADER):
            site_file.unlink()
    except (OSError, UnicodeDecodeError):
        pass
