"""The command line in-process, and its one-line errors (tests of bad and hostile input)."""
from __future__ import annotations

from addiff_core.cli import main


def run_cli(capsys, *argv) -> tuple[int, str]:
    """``addiff ARGV`` in this process -> (exit status, stderr stripped); arguments may be paths."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def assert_one_line(err: str, *needles: str) -> None:
    """Exactly one ``addiff: error:`` line, no traceback, holding every needle."""
    lines = [ln for ln in err.splitlines() if ln.startswith("addiff: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
