"""Which app bundles (Flower FABs) a hospital lets run: the SHA-256 allow-list of its site file.

The coordinating server ships the code a hospital's ClientApp runs: ``flwr run`` packs the app
(``client/*.py``, ``server/*.py``, ``configs/*.yaml`` and ``pyproject.toml``) into a FAB, and the
hospital's ClientApp process unpacks and imports it. A site file may therefore list the bundles
the hospital has reviewed::

    approved_bundles:
      - "960813f6b537e04560b17a0ef58c49d01da3a3c689c11cc6953ba686c4f514a7"

and ``addiff client start`` then refuses, before any of its code is unpacked or imported, every
run whose bundle hashes to something else (``client/clientapp_guard.py``). Without the key any
bundle runs; with the key but no hash (``approved_bundles:`` or ``[]``) none does, and the site
refuses to start (:func:`site_approval`). The hash is Flower's
own FAB hash, ``hashlib.sha256(fab_bytes).hexdigest()`` (``flwr build`` / ``flwr run``), of the
whole bundle: one changed byte in any file is another bundle.

``addiff client bundle-hash PATH`` prints it for a bundle file (``flwr build`` writes one) or for
an app folder (what ``flwr run FOLDER`` would send from it, built the way Flower builds it).

This module imports nothing of Flower at import time (it is loaded with every ``addiff`` command):
Flower's FAB constants are mirrored below (a test compares them with ``client.flower_compat``)
and its builder is used through it.
"""
from __future__ import annotations

import hashlib
import io
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
FAB_CONFIG_FILE = "pyproject.toml"  # Flower's FAB_CONFIG_FILE (mirrored: see the module's docstring)
FAB_HASH_TRUNCATION = 8  # Flower's FAB_HASH_TRUNCATION: hash digits in the unpacked bundle folder's name


class BundleRefused(Exception):
    """The app bundle a run brought is not one this site approved (or not what it claims to be)."""


def bundle_sha256(content: bytes) -> str:
    """Flower's FAB hash: SHA-256 of the bundle's bytes, as 64 lowercase hex digits."""
    return hashlib.sha256(content).hexdigest()


def normalize_hashes(values) -> frozenset[str]:
    """The approved hashes as lowercase hex; ValueError on anything that is not a SHA-256."""
    out = set()
    for v in values:
        h = str(v).strip().lower()
        if not SHA256_RE.match(h):
            raise ValueError(f"not a SHA-256 hash (64 hex digits): {str(v)[:80]!r}")
        out.add(h)
    return frozenset(out)


def site_approval(site) -> frozenset[str] | None:
    """What a site file approves: None when it has no ``approved_bundles`` key (any bundle runs,
    with a notice), else the approved hashes. Present but empty (``approved_bundles:`` or ``[]``)
    approves none: a site that would run nothing is refused before it starts (UserError, one line)."""
    from addiff_core.errors import UserError

    if site.approved_bundles is None:
        return None
    if not site.approved_bundles:
        raise UserError(f"{site.source or site.name}: approved_bundles is empty: no app bundle is approved, so this "
                        "site would run nothing; add the SHA-256 of a bundle you reviewed (addiff client bundle-hash "
                        "FAB), or remove the key to run any bundle")
    return normalize_hashes(site.approved_bundles)


@dataclass(frozen=True)
class BundleInfo:
    sha256: str
    fab_id: str  # "publisher/name", as Flower derives it from the bundle's pyproject.toml
    version: str
    files: tuple[str, ...]

    @property
    def install_dir_name(self) -> str:
        """The folder Flower unpacks this bundle into, under $FLWR_HOME/apps."""
        publisher, name = self.fab_id.split("/", 1)
        return f"{publisher}.{name}.{self.version}.{self.sha256[:FAB_HASH_TRUNCATION]}"


def read_bundle(content: bytes) -> BundleInfo:
    """Hash and metadata of a bundle. Reads its ``pyproject.toml`` as data (TOML), never runs code.
    Call it on an approved bundle, or on one the hospital asked to look at."""
    import tomllib

    digest = bundle_sha256(content)
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as z:
            files = tuple(n for n in z.namelist() if not n.endswith("/"))
            config = tomllib.loads(z.read(FAB_CONFIG_FILE).decode("utf-8"))
        fab_id = f"{config['tool']['flwr']['app']['publisher']}/{config['project']['name']}"
        version = str(config["project"]["version"])
    except (zipfile.BadZipFile, KeyError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BundleRefused(f"app bundle sha256 {digest} is not a readable Flower app bundle "
                            f"({type(e).__name__})") from None
    if fab_id.count("/") != 1 or "/" in version or any(c in fab_id + version for c in ("\\", "\0")):
        raise BundleRefused(f"app bundle sha256 {digest}: unusable app id {fab_id!r} / version {version!r}")
    return BundleInfo(digest, fab_id, version, files)


def check_bundle(content: bytes, approved: frozenset[str], *, claimed_hash: str | None = None,
                 run_fab_hash: str | None = None, run_fab_id: str | None = None,
                 run_fab_version: str | None = None) -> BundleInfo:
    """Refuse (:class:`BundleRefused`) unless ``content`` hashes to an approved SHA-256 and is what
    the run says it is. Flower unpacks a bundle into a folder named after the bundle's own app id,
    version and hash, but loads the ClientApp from the folder named after the *run's* app id,
    version and claimed hash: they must all agree, else an approved bundle could be unpacked and
    another folder's code imported."""
    digest = bundle_sha256(content)
    if digest not in approved:
        raise BundleRefused(f"app bundle sha256 {digest} is not in this site's approved_bundles")
    info = read_bundle(content)
    for what, claim in (("the bundle's", claimed_hash), ("the run's", run_fab_hash)):
        if claim is not None and claim != digest:
            raise BundleRefused(f"app bundle sha256 {digest}: {what} claimed hash {str(claim)[:80]!r} differs")
    if run_fab_id is not None and (run_fab_id, run_fab_version) != (info.fab_id, info.version):
        raise BundleRefused(f"app bundle sha256 {digest} is {info.fab_id} {info.version}, but the run names "
                            f"{str(run_fab_id)[:80]!r} {str(run_fab_version)[:40]!r}")
    return info


def bundle_of_path(path: Path) -> bytes:
    """The bytes of a bundle file, or the bundle ``flwr run FOLDER`` would build from an app folder
    (Flower's own builder: fixed timestamps, sorted files, ``fab-include`` and .gitignore rules)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / FAB_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {FAB_CONFIG_FILE} (not a Flower app folder)")
        from .flower_compat import build_fab

        return build_fab(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such bundle file or app folder")
    return path.read_bytes()


# ------------------------------------------------------------------------------------------
# addiff client bundle-hash PATH
# ------------------------------------------------------------------------------------------
def cmd_bundle_hash(args) -> int:
    from addiff_core.errors import UserError

    path = Path(args.path)
    try:
        info = read_bundle(bundle_of_path(path))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    except BundleRefused as e:
        raise UserError(f"{path}: {e}") from None
    print(info.sha256)
    if not args.quiet:
        print(f"  {info.fab_id} {info.version}, {len(info.files)} files:", file=sys.stderr)
        for f in info.files:
            print(f"    {f}", file=sys.stderr)
        print("  after reviewing these files, approve the bundle in the site file:\n"
              f"    approved_bundles:\n      - \"{info.sha256}\"", file=sys.stderr)
    return 0


def add_parser(client_subparsers) -> None:
    h = client_subparsers.add_parser(
        "bundle-hash", help="SHA-256 of an app bundle (a .fab file or an app folder), for approved_bundles",
        description="Print the SHA-256 Flower gives an app bundle: of a .fab file (flwr build; or one a "
                    "site refused, saved under FLWR_HOME/refused-bundles/), or of the bundle `flwr run "
                    "FOLDER` would build from an app folder. The files it holds go to stderr.")
    h.add_argument("path", help="a .fab file or an app folder (with pyproject.toml)")
    h.add_argument("--quiet", action="store_true", help="print only the hash")
    h.set_defaults(func=cmd_bundle_hash)
