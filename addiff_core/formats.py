"""Plain output formats every writer shares: JSON-safe values, Markdown tables and CSV cells, so
files agree on a missing value (JSON ``null``) and on layout, and no CSV holds a cell a
spreadsheet would run as a formula (:func:`csv_cell` via :func:`csv_text`; the sources are checked
by tests/test_hostile_federation.py).
"""
from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

# what a spreadsheet reads as the start of a formula (OWASP "CSV injection"); tab and CR too
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts: NaN/inf -> None,
    tuples -> lists, dict keys -> str, paths -> str, numpy scalars and arrays -> Python values."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist) and not isinstance(obj, (str, bytes)):
        return json_safe(obj.tolist())  # numpy scalar (-> Python number) or array (-> nested lists)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def markdown_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]],
                   fmt: Callable[[Any], str] = str) -> str:
    """A GitHub-flavoured Markdown table; each cell is ``fmt(value)`` with ``|`` escaped and
    newlines flattened, so that no value can break the table."""
    def cell(v: Any) -> str:
        return str(v if isinstance(v, str) else fmt(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def csv_cell(value: Any) -> Any:
    """``value`` as a CSV cell no spreadsheet runs: a string starting with ``= + - @``, a tab or a
    CR gets a leading ``'`` (shown as text), unless it is a plain number ("-1.5"). Other values
    are returned as they are (numbers are never formulas)."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, Any]], cell: Callable[[Any], Any] = lambda v: v,
             lineterminator: str = "\n") -> str:
    """A CSV table: a header of ``columns``, one line per row (``cell(value)``, a missing key is
    an empty cell), every cell and header through :func:`csv_cell`."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=lineterminator)
    w.writerow([csv_cell(str(c)) for c in columns])
    for r in rows:
        w.writerow([csv_cell(cell(r.get(c, ""))) for c in columns])
    return buf.getvalue()
