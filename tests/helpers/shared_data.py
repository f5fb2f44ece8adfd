"""Where the tests find the shared OpenKBP sample (never copied into the project):
``$ADDIFF_OPENKBP_SAMPLE``, else ``../shared/openkbp-sample`` next to the project, else
``/work/shared/openkbp-sample``. Tests that need it skip when none exists."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shared_folder(name: str, env: str) -> Path:
    """``$env``, else ``../shared/<name>`` next to the project, else ``/work/shared/<name>``."""
    value = os.environ.get(env)
    if value:
        return Path(value)
    for p in (ROOT.parent / "shared" / name, Path("/work/shared") / name):
        if p.is_dir():
            return p
    return ROOT.parent / "shared" / name


def openkbp_sample() -> Path:
    return shared_folder("openkbp-sample", "ADDIFF_OPENKBP_SAMPLE")


OPENKBP_SAMPLE = openkbp_sample()
