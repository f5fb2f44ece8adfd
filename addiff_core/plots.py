"""Figures a physicist reads at a glance: dose slices, uncertainty beside the error, DVH curves,
per-site bars, training curves. Arrays in, a PNG out (matplotlib Agg).

Arrays (z, y, x) in LPS (``SimpleITK.DICOMOrient(img, "LPS")`` first), spacing (x, y, z) mm. Slices
follow the radiological convention: axial anterior up, patient's left on the right; coronal and
sagittal superior up (sagittal anterior left).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .dvh import dvh_curve  # noqa: E402

ISODOSE_FRACTIONS = (0.3, 0.5, 0.8, 0.95)
ISODOSE_COLOURS = {0.3: "#1f4fff", 0.5: "#00c000", 0.8: "#ffd000", 0.95: "#ff2020", 1.0: "#ffffff",
                   1.05: "#ff00ff"}
CT_WINDOW = (-800.0, 1000.0)  # HU shown from black to white under the dose colourwash
WASH_FROM = 0.1  # dose colourwash from this fraction of Rx up (the CT stays readable in the low-dose bath)
DIFF_FROM = 0.03  # difference colourwash where |pred - ref| >= this fraction of Rx (the 3 % of gamma 3%/2mm)
UNCERTAINTY_FROM = 0.05  # std / |error| colourwash from this fraction of their shared scale's top (CT readable)
TARGET_COLOUR = "#ff00ff"
DPI = 100

# (top, bottom, left, right) orientation letters of each view (radiological convention)
_ORIENT = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}


def _views(vol: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    z, y, x = centre
    # axial (y, x): row 0 = most anterior; coronal (z, x) and sagittal (z, y): flipped so superior is up
    return [vol[z], vol[:, y, :][::-1], vol[:, :, x][::-1]]


def _aspects(spacing: Sequence[float]) -> list[float]:
    sx, sy, sz = spacing
    return [sy / sx, sz / sx, sz / sy]


def _slice_centre(target: np.ndarray | None, peak: np.ndarray) -> list[int]:
    """The (z, y, x) voxel the slices go through: the target's centre, else ``peak``'s maximum."""
    if target is not None and np.asarray(target).any():
        return [int(round(float(np.mean(ix)))) for ix in np.nonzero(target)]
    return [int(v) for v in np.unravel_index(int(np.argmax(peak)), peak.shape)]


def _slice_grid(shape: Sequence[int], spacing: Sequence[float], n_rows: int):
    """(figure, axes[n_rows][3]) for axial/coronal/sagittal panels of a (z, y, x) volume."""
    sx, sy, sz = (float(s) for s in spacing)
    nz, ny, nx = shape
    widths = [nx * sx, nx * sx, ny * sy]  # physical widths: panels of equal mm scale per row
    heights = max(ny * sy, nz * sz)
    row_h = 3.2
    fig_w = row_h * sum(widths) / heights + 1.6
    fig = plt.figure(figsize=(min(max(fig_w, 9.0), 16.0), row_h * n_rows + 1.2), layout="constrained")
    return fig, fig.subplots(n_rows, 3, squeeze=False, gridspec_kw={"width_ratios": widths})


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _isodose_colour(f: float) -> str:
    return ISODOSE_COLOURS.get(round(float(f), 2), "#ffffff")


def _orientation_labels(ax, view: str) -> None:
    top, bottom, left, right = _ORIENT[view]
    kw = dict(transform=ax.transAxes, color="#ffff66", fontsize=8, fontweight="bold", clip_on=False)
    ax.text(0.5, 0.985, top, ha="center", va="top", **kw)
    ax.text(0.5, 0.015, bottom, ha="center", va="bottom", **kw)
    ax.text(0.015, 0.5, left, ha="left", va="center", **kw)
    ax.text(0.985, 0.5, right, ha="right", va="center", **kw)


def dose_slices_figure(path: Path, ct_hu: np.ndarray, ref: np.ndarray | None, pred: np.ndarray, spacing: Sequence[float],
                       rx: float, title: str = "", target: np.ndarray | None = None, target_name: str | None = None,
                       isodose_fractions: Sequence[float] = ISODOSE_FRACTIONS,
                       eval_mask: np.ndarray | None = None) -> Path:
    """Axial/coronal/sagittal slices through the target centre (else the dose maximum): reference,
    predicted (colourwash from ``WASH_FROM`` x Rx) and their difference (from ``DIFF_FROM`` x Rx)
    over the CT, isodose lines and the target outline; writes ``path``.

    Args:
        ct_hu, ref, pred: (z, y, x) in LPS, doses in Gy (``ref`` None: the prediction alone).
        spacing: (x, y, z) mm; rx: prescription (Gy); title: above the figure.
        target, target_name: the outline drawn and its legend; isodose_fractions: of ``rx``.
        eval_mask: the difference is shown inside it (e.g. the body) when given.
    """
    pred = np.asarray(pred, dtype=np.float32)
    ref = None if ref is None else np.asarray(ref, dtype=np.float32)
    centre = _slice_centre(target, ref if ref is not None and ref.max() > 0 else pred)
    rows = [("reference", ref), ("predicted", pred)] if ref is not None else [("predicted", pred)]
    diff = pred - ref if ref is not None else None
    if diff is not None:
        if eval_mask is not None:
            diff = np.where(np.asarray(eval_mask, dtype=bool), diff, 0.0)
        rows.append(("predicted - reference", diff))

    fig, axes = _slice_grid(pred.shape, spacing, len(rows))
    vmax = float(max(pred.max(), ref.max() if ref is not None else 0.0, rx) * 1.05)
    if diff is not None:
        sel = (np.maximum(pred, ref) > 0.05 * rx)
        dlim = float(np.percentile(np.abs(diff[sel]), 99.5)) if sel.any() else 1.0
        dlim = max(float(np.ceil(dlim)), 1.0)
    else:
        dlim = 1.0
    ct_views = _views(np.clip(ct_hu, *CT_WINDOW), centre)
    tgt_views = _views(np.asarray(target, dtype=np.float32), centre) if target is not None else [None] * 3
    fracs = sorted(float(f) for f in isodose_fractions)
    levels = [f * rx for f in fracs]
    colours = [_isodose_colour(f) for f in fracs]
    for r, (label, vol) in enumerate(rows):
        views = _views(vol, centre)
        im = None
        for c, (view, aspect) in enumerate(zip(("axial", "coronal", "sagittal"), _aspects(spacing))):
            ax = axes[r][c]
            ax.imshow(ct_views[c], cmap="gray", aspect=aspect, vmin=CT_WINDOW[0], vmax=CT_WINDOW[1],
                      interpolation="nearest")
            if label.startswith("predicted -"):
                shown = np.ma.masked_where(np.abs(views[c]) < DIFF_FROM * rx, views[c])
                im = ax.imshow(shown, cmap="RdBu_r", vmin=-dlim, vmax=dlim, alpha=0.8, aspect=aspect,
                               interpolation="nearest")
            else:
                shown = np.ma.masked_less(views[c], WASH_FROM * rx)
                im = ax.imshow(shown, cmap="jet", vmin=0, vmax=vmax, alpha=0.45, aspect=aspect,
                               interpolation="bilinear")
                if float(views[c].max()) > levels[0]:
                    ax.contour(views[c], levels=levels, colors=colours, linewidths=1.1)
            if tgt_views[c] is not None and tgt_views[c].any():
                ax.contour(tgt_views[c], levels=[0.5], colors=TARGET_COLOUR, linewidths=1.0, linestyles="--")
            _orientation_labels(ax, view)
            ax.set_title(f"{label}: {view}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        is_diff = label.startswith("predicted -")
        cb = fig.colorbar(im, ax=list(axes[r]), shrink=0.9, pad=0.01, aspect=18,
                          extend="both" if is_diff else "neither")
        cb.set_label(f"predicted - reference (Gy), shown where |diff| >= {100 * DIFF_FROM:g} % Rx" if is_diff
                     else f"dose (Gy), shown from {100 * WASH_FROM:g} % Rx", fontsize=8)
        cb.ax.tick_params(labelsize=7)
        if not is_diff:  # mark the isodose levels on the colour bar
            for lv, col in zip(levels, colours):
                cb.ax.axhline(lv, color=col, lw=2)
    handles = [Line2D([], [], color=col, lw=2, label=f"{100 * f:.0f} % = {lv:.1f} Gy")
               for f, lv, col in zip(fracs, levels, colours)]
    if target is not None and np.asarray(target).any():
        handles.append(Line2D([], [], color=TARGET_COLOUR, lw=1.2, ls="--", label=target_name or "target"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False,
               title=f"isodose lines (Rx = {rx:g} Gy)", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def uncertainty_slices_figure(path: Path, ct_hu: np.ndarray, std: np.ndarray, abs_error: np.ndarray,
                              spacing: Sequence[float], title: str = "", samples: int | None = None,
                              target: np.ndarray | None = None, target_name: str | None = None,
                              dose: np.ndarray | None = None, eval_mask: np.ndarray | None = None) -> Path:
    """Where a sampled prediction is unsure beside where it is wrong: the samples' std (row 1) and
    ``|mean - reference|`` (row 2) in Gy over the CT, in :func:`dose_slices_figure`'s slices. Each
    row has its own colour scale (99.5th percentile in ``eval_mask``): on one scale a std far
    below the error is invisible; the titles give each maximum.

    Args:
        samples: the number of samples behind the std, named in its row's titles.
        dose: picks the slices when there is no target (its maximum); other arguments as
            :func:`dose_slices_figure`'s.
    """
    std = np.asarray(std, dtype=np.float32)
    err = np.asarray(abs_error, dtype=np.float32)
    em = np.ones(std.shape, bool) if eval_mask is None else np.asarray(eval_mask, dtype=bool)
    centre = _slice_centre(target, np.asarray(dose if dose is not None else err, dtype=np.float32))
    fig, axes = _slice_grid(std.shape, spacing, 2)
    ct_views = _views(np.clip(ct_hu, *CT_WINDOW), centre)
    tgt_views = _views(np.asarray(target, dtype=np.float32), centre) if target is not None else [None] * 3
    em_views = _views(em, centre)
    rows = [(f"sample std ({samples} samples)" if samples else "sample std", std), ("|mean - reference|", err)]
    for r, (label, vol) in enumerate(rows):
        vmax = max(float(np.percentile(vol[em], 99.5)) if em.any() else 0.0, 1e-3)
        for c, (view, aspect, v) in enumerate(zip(("axial", "coronal", "sagittal"), _aspects(spacing),
                                                   _views(vol, centre))):
            ax = axes[r][c]
            ax.imshow(ct_views[c], cmap="gray", aspect=aspect, vmin=CT_WINDOW[0], vmax=CT_WINDOW[1],
                      interpolation="nearest")
            shown = np.ma.masked_where(~em_views[c] | (v < UNCERTAINTY_FROM * vmax), v)
            im = ax.imshow(shown, cmap="inferno", vmin=0.0, vmax=vmax, alpha=0.75, aspect=aspect,
                           interpolation="nearest")
            if tgt_views[c] is not None and tgt_views[c].any():
                ax.contour(tgt_views[c], levels=[0.5], colors=TARGET_COLOUR, linewidths=1.0, linestyles="--")
            _orientation_labels(ax, view)
            # the row's maximum: the rows have their own scales, the titles compare the magnitudes
            top = f" (max {float(vol[em].max()) if em.any() else 0.0:.2g} Gy)" if c == 0 else ""
            ax.set_title(f"{label}{top}: {view}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        cb = fig.colorbar(im, ax=list(axes[r]), shrink=0.9, pad=0.01, aspect=15, extend="max")
        cb.set_label(f"Gy (this row; from {100 * UNCERTAINTY_FROM:g} % of its top)", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    if target is not None and np.asarray(target).any():
        fig.legend(handles=[Line2D([], [], color=TARGET_COLOUR, lw=1.2, ls="--", label=target_name or "target")],
                   loc="outside lower center", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def dvh_figure(path: Path, ref: np.ndarray | None, pred: np.ndarray, structures: Mapping[str, np.ndarray],
               title: str = "", rx: float | None = None, targets: Sequence[str] = ()) -> Path:
    """Cumulative DVH per structure (reference solid, prediction dashed, one colour each) written to
    ``path``; ``targets`` (names in ``structures``) thicker; a dotted line at ``rx`` (Gy)."""
    fig, ax = plt.subplots(figsize=(8.5, 4.8), layout="constrained")
    top = float(max(pred.max(), ref.max() if ref is not None else 0.0, rx or 0.0)) * 1.05 + 1e-6
    bins = np.linspace(0.0, top, 300)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for i, (name, mask) in enumerate(structures.items()):
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            continue
        col = colours[i % len(colours)]
        lw = 2.2 if name in (targets or ()) else 1.5
        if ref is not None:
            d, v = dvh_curve(ref, mask, bins)
            ax.plot(d, 100 * v, color=col, lw=lw)
        d, v = dvh_curve(pred, mask, bins)
        ax.plot(d, 100 * v, color=col, lw=lw, ls="--")
        handles.append(Line2D([], [], color=col, lw=lw, label=name + (" (target)" if name in (targets or ()) else "")))
    if rx:
        ax.axvline(rx, color="0.4", lw=0.8, ls=":")
        ax.text(rx, 101, f" Rx {rx:g} Gy", fontsize=7, color="0.3", va="bottom", ha="center")
    if ref is not None:
        handles += [Line2D([], [], color="k", lw=1.6, label="reference"),
                    Line2D([], [], color="k", lw=1.6, ls="--", label="predicted")]
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(title or "DVH", fontsize=10)
    return _save(fig, path)


def bar_figure(path: Path, values: Mapping[str, Mapping[str, float]], ylabel: str, title: str = "") -> Path:
    """Grouped bars: ``values[series][site]`` (e.g. series = federated / local / pooled)."""
    series = list(values)
    sites = sorted({s for v in values.values() for s in v})
    fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(sites) * max(1, len(series)) + 2), 4), layout="constrained")
    width = 0.8 / max(len(series), 1)
    for i, name in enumerate(series):
        ys = np.array([values[name].get(s, np.nan) for s in sites], dtype=float)
        xs = np.arange(len(sites)) + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(xs, np.nan_to_num(ys, nan=0.0), width, label=name)
        ax.bar_label(bars, labels=["n/a" if not np.isfinite(y) else f"{y:.2f}" for y in ys], fontsize=7)
    ax.set_xticks(np.arange(len(sites)), sites)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.12)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)


def curves_figure(path: Path, curves: Mapping[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str,
                  title: str = "", logy: bool = False, styles: Mapping[str, Mapping] | None = None) -> Path:
    """Line plot of named (x, y) series, e.g. training loss per round per site. ``styles[name]``:
    extra matplotlib line keywords for one series (e.g. a dashed aggregate)."""
    fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            kw = {"marker": "o", "ms": 3, **dict((styles or {}).get(name, {}))}
            ax.plot(xs, ys, label=name, **kw)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
