"""Where the tests find the shared OpenKBP sample (never copied into the project):
``$ADDIFF_OPENKBP_SAMPLE``, else ``../shared/openkbp-sample`` next to the project, else
``/work/shared/openkbp-sample``. Tests that need it skip when none exists."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def openkbp_sample() -> Path:
    env = os.environ.get("ADDIFF_OPENKBP_SAMPLE")
    if env:
        return Path(env)
    for p in (ROOT.parent / "shared" / "openkbp-sample", Path("/work/shared/openkbp-sample")):
        if p.is_dir():
            return p
    return ROOT.parent / "shared" / "openkbp-sample"


OPENKBP_SAMPLE = openkbp_sample()
