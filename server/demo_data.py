"""The demo hospitals of ``addiff simulate`` (``--data-dir``, default ``demo_data/``): written by
the synthetic generator on first use and rewritten when the settings change.

Removing stale demo data is the one place the simulation deletes anything, so it removes only
what the generator itself wrote (#29: a planted ``addiff-demo.json`` naming ``../victim`` made it
delete a folder outside the data folder): names in the stamp must be plain names, and a folder
goes only if it is a real folder directly in the data folder holding the generator's marker file.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from addiff_core.config import ConfigError

DEMO_STAMP = "addiff-demo.json"


def ensure_demo_sites(data_dir: Path, n_sites: int, cases_per_site: int, size: int, seed: int = 0) -> list[Path]:
    """Site files of ``n_sites`` synthetic hospitals under ``data_dir``; written if missing or
    made with other settings. Only what the generator itself wrote is ever removed: a site folder
    directly in ``data_dir`` holding its marker file (``addiff-synth.json``), never on the say-so
    of :data:`DEMO_STAMP` alone (a planted stamp once named ``../victim``)."""
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
    elif data_dir.exists() and any(p.name != "state" for p in data_dir.iterdir()):
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
