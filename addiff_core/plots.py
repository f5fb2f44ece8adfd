"""Figures a physicist reads at a glance: dose slices, DVH curves, per-site bars, training curves.

Pure functions: arrays and numbers in, a PNG file out (matplotlib's Agg backend, no display).
Arrays are (z, y, x) as everywhere in addiff-fl; spacing is (x, y, z) in mm.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import dvh_curve  # noqa: E402

ISODOSE_FRACTIONS = (0.3, 0.5, 0.8, 0.95)


def _views(vol: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    z, y, x = centre
    # axial (y, x), coronal (z, x) and sagittal (z, y); superior up in the latter two
    return [vol[z], vol[:, y, :][::-1], vol[:, :, x][::-1]]


def _aspects(spacing: Sequence[float]) -> list[float]:
    sx, sy, sz = spacing
    return [sy / sx, sz / sx, sz / sy]


def dose_slices_figure(path: Path, ct_hu: np.ndarray, ref: np.ndarray | None, pred: np.ndarray, spacing: Sequence[float],
                       rx: float, title: str = "", target: np.ndarray | None = None) -> Path:
    """Axial/coronal/sagittal slices through the target centre: CT with reference dose, predicted
    dose and their difference, colour bars in Gy and isodose lines at 30/50/80/95% of Rx."""
    if target is not None and target.any():
        centre = [int(round(float(np.mean(ix)))) for ix in np.nonzero(target)]
    else:
        centre = [int(np.argmax(pred.max(axis=tuple(a for a in range(3) if a != ax)))) for ax in range(3)]
    rows = [("reference dose", ref), ("predicted dose", pred)] if ref is not None else [("predicted dose", pred)]
    if ref is not None:
        rows.append(("predicted - reference", pred - ref))
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 3.6 * len(rows)), squeeze=False)
    vmax = float(max(pred.max(), ref.max() if ref is not None else 0.0, rx) * 1.05)
    dlim = max(float(np.abs(pred - ref).max()) if ref is not None else 1.0, 1.0)
    ct_views = _views(np.clip(ct_hu, -1000, 1500), centre)
    tgt_views = _views(target.astype(float), centre) if target is not None else [None] * 3
    levels = [f * rx for f in ISODOSE_FRACTIONS]
    for r, (label, vol) in enumerate(rows):
        views = _views(vol, centre)
        for c, (view_name, aspect) in enumerate(zip(("axial", "coronal", "sagittal"), _aspects(spacing))):
            ax = axes[r][c]
            ax.imshow(ct_views[c], cmap="gray", aspect=aspect, vmin=-1000, vmax=1500)
            if label.startswith("predicted -"):
                im = ax.imshow(views[c], cmap="RdBu_r", vmin=-dlim, vmax=dlim, alpha=0.75, aspect=aspect)
            else:
                shown = np.ma.masked_less(views[c], 0.02 * rx)
                im = ax.imshow(shown, cmap="jet", vmin=0, vmax=vmax, alpha=0.5, aspect=aspect)
                if views[c].max() > levels[0]:
                    cs = ax.contour(views[c], levels=levels, colors=["b", "g", "y", "r"], linewidths=0.8)
                    ax.clabel(cs, fmt=lambda v: f"{v:.0f}", fontsize=6)
            if tgt_views[c] is not None and tgt_views[c].any():
                ax.contour(tgt_views[c], levels=[0.5], colors="w", linewidths=0.8, linestyles="--")
            ax.set_title(f"{label}: {view_name}", fontsize=9)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="Gy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def dvh_figure(path: Path, ref: np.ndarray | None, pred: np.ndarray, structures: Mapping[str, np.ndarray],
               title: str = "") -> Path:
    """Cumulative DVH per structure: reference solid, prediction dashed, same colour."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = float(max(pred.max(), ref.max() if ref is not None else 0.0)) * 1.05 + 1e-6
    bins = np.linspace(0.0, top, 200)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, mask) in enumerate(structures.items()):
        if not mask.any():
            continue
        col = colours[i % len(colours)]
        if ref is not None:
            d, v = dvh_curve(ref, mask, bins)
            ax.plot(d, 100 * v, color=col, lw=1.5, label=f"{name}")
        d, v = dvh_curve(pred, mask, bins)
        ax.plot(d, 100 * v, color=col, lw=1.5, ls="--", label=None if ref is not None else name)
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, title="solid: reference, dashed: predicted" if ref is not None else None,
              title_fontsize=7)
    ax.set_title(title or "DVH")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def bar_figure(path: Path, values: Mapping[str, Mapping[str, float]], ylabel: str, title: str = "") -> Path:
    """Grouped bars: ``values[series][site]`` (e.g. series = federated / local / pooled)."""
    series = list(values)
    sites = sorted({s for v in values.values() for s in v})
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(sites) * max(1, len(series)) / 2), 4))
    width = 0.8 / max(len(series), 1)
    for i, name in enumerate(series):
        ys = [values[name].get(s, np.nan) for s in sites]
        xs = np.arange(len(sites)) + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(np.arange(len(sites)), sites)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def curves_figure(path: Path, curves: Mapping[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str,
                  title: str = "", logy: bool = False) -> Path:
    """Line plot of named (x, y) series, e.g. training loss per round per site."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
