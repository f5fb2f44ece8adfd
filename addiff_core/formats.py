"""Plain output formats every writer shares: JSON-safe values and Markdown tables.

One implementation each, so that a metrics file, a run description and a report agree on what a
missing value looks like (JSON ``null``) and on how a table is laid out.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence


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
