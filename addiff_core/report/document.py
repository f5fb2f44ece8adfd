"""The report's document model and its two renderers (Markdown and HTML, no dependency), plus
the cell formats every section uses."""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..formats import markdown_table
from ..site_table import number as num  # a finite float or None

_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}figure{margin:1em 0}figcaption{color:#666;font-size:0.85em}"
        "code{background:#f4f4f4;padding:0 3px}")


@dataclass
class Doc:
    """A list of blocks (heading, paragraph, list, table, image) rendered to Markdown and HTML."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Iterable[str]) -> None:
        items = list(items)
        if items:
            self.blocks.append(("ul", items))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", list(headers), [[str(c) for c in r] for r in rows]))

    def img(self, alt: str, rel: str) -> None:
        self.blocks.append(("img", alt, rel))

    # -- markdown ---------------------------------------------------------------------------
    def markdown(self) -> str:
        return "\n\n".join(_MD[b[0]](b) for b in self.blocks if b[0] in _MD) + "\n"

    # -- html -------------------------------------------------------------------------------
    def html(self, title: str) -> str:
        body = [_HTML[b[0]](b) for b in self.blocks if b[0] in _HTML]
        return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")


def _md_table(b: tuple) -> str:
    return markdown_table(b[1], b[2])


_MD = {
    "h": lambda b: "#" * b[1] + " " + b[2],
    "p": lambda b: b[1],
    "ul": lambda b: "\n".join(f"- {i}" for i in b[1]),
    "table": _md_table,
    "img": lambda b: f"![{b[1]}]({b[2]})",
}


def _inline(text: str) -> str:
    """Escape, then the two inline marks the report uses: **bold** and `code`."""
    s = html.escape(str(text))
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def _html_table(b: tuple) -> str:
    head = "".join(f"<th>{_inline(c)}</th>" for c in b[1])
    rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html_img(b: tuple) -> str:
    return (f'<figure><img src="{html.escape(b[2], quote=True)}" alt="{html.escape(b[1], quote=True)}">'
            f"<figcaption>{html.escape(b[1])}</figcaption></figure>")


_HTML = {
    "h": lambda b: f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>",
    "p": lambda b: f"<p>{_inline(b[1])}</p>",
    "ul": lambda b: "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>",
    "table": _html_table,
    "img": _html_img,
}


# -- cell formats ----------------------------------------------------------------------------------
def fmt(v: Any, kind: str = "num") -> str:
    """A value as a table cell: kind "gy" (2 decimals), "pct" (1), "frac%" (x 100, %), "int", "num"."""
    f = num(v)
    if f is None:
        return "n/a"
    if kind == "gy":
        return f"{f:.2f}"
    if kind == "pct":
        return f"{f:.1f}"
    if kind == "frac%":
        return f"{100 * f:.0f} %"
    if kind == "int":
        return f"{int(round(f))}"
    return f"{f:.3g}" if abs(f) < 1e4 else f"{f:.4g}"


def seq(v: Any) -> str:
    return "/".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f} MB"


def duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")
