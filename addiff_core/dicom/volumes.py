"""Image grids from DICOM: a CT series -> a SimpleITK image in HU; an RTDOSE -> Gy on the CT grid.

Geometry as DICOM says: rows/columns from ``ImageOrientationPatient``, slices sorted along their
normal, the first one's position the origin, spacing (PixelSpacing[1], PixelSpacing[0], step). A
series whose slices differ, do not advance along the normal (gantry tilt) or skip one is refused.
Pixels are decoded only after the declared size passed ``limits.max_voxels()``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from ..limits import size_problem
from .files import declared_size_problem, read_dataset_file

__all__ = ["DicomDataError", "series_geometry", "read_ct_series", "read_rtdose", "dose_on_grid"]

POSITION_TOL_MM = 0.05  # slice-step tolerance (mm)


class DicomDataError(ValueError):
    """A DICOM object the importer cannot use; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def _floats(ds: Dataset, key: str, n: int, path) -> np.ndarray:
    v = ds.get(key)
    try:
        a = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        raise DicomDataError(path, f"{key} missing or not numeric") from None
    if a.size != n or not np.all(np.isfinite(a)):
        raise DicomDataError(path, f"{key} must hold {n} numbers, got {v!r}")
    return a


def _orientation(ds: Dataset, path) -> np.ndarray:
    """3x3 direction matrix (columns: row direction, column direction, normal)."""
    iop = _floats(ds, "ImageOrientationPatient", 6, path)
    r, c = iop[:3], iop[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(r @ c) > 1e-3:
        raise DicomDataError(path, f"ImageOrientationPatient {iop.tolist()} is not two orthonormal directions")
    return np.stack([r, c, np.cross(r, c)], axis=1)


def series_geometry(headers: list[tuple[Path, Dataset]]) -> tuple[list[tuple[Path, Dataset]], np.ndarray, tuple, np.ndarray]:
    """Sort the slices of one series and check it -> (sorted, direction 3x3, spacing xyz, origin)."""
    first_path, first = headers[0]
    direction = _orientation(first, first_path)
    spacing_rc = _floats(first, "PixelSpacing", 2, first_path)
    rows, cols = int(first.get("Rows", 0)), int(first.get("Columns", 0))
    for p, ds in headers[1:]:
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, cols):
            raise DicomDataError(p, f"slice size {ds.get('Rows')}x{ds.get('Columns')} differs from the series' {rows}x{cols}")
        if not np.allclose(_orientation(ds, p), direction, atol=1e-4):
            raise DicomDataError(p, "ImageOrientationPatient differs from the other slices of the series")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, p), spacing_rc, atol=1e-4):
            raise DicomDataError(p, "PixelSpacing differs from the other slices of the series")
    tilt = first.get("GantryDetectorTilt")
    if tilt is not None and str(tilt).strip() and abs(float(tilt)) > 1e-3:
        raise DicomDataError(first_path, f"gantry-tilted CT (GantryDetectorTilt {float(tilt):g} deg): resample it to "
                                         f"an untilted grid in the scanner/TPS first")
    pos = np.array([_floats(ds, "ImagePositionPatient", 3, p) for p, ds in headers])
    along = pos @ direction[:, 2]
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    pos, along = pos[order], along[order]
    name = f"CT series {first.get('SeriesInstanceUID', '?')} ({len(headers)} slices)"
    if len(headers) < 2:
        raise DicomDataError(first_path, f"{name}: a volume needs at least 2 slices")
    steps = np.diff(along)
    if np.any(steps < POSITION_TOL_MM):
        i = int(np.argmin(steps))
        raise DicomDataError(headers[i + 1][0], f"{name}: two slices at the same position "
                                                f"({along[i]:.2f} mm): duplicate slice or mixed series")
    in_plane = pos[1:] - pos[:-1] - np.outer(steps, direction[:, 2])
    if np.abs(in_plane).max() > max(POSITION_TOL_MM, 0.01 * float(np.median(steps))):
        raise DicomDataError(first_path, f"{name}: slice positions drift in-plane by up to "
                                         f"{np.abs(in_plane).max():.2f} mm per slice (gantry tilt or oblique "
                                         f"stack): resample it to an untilted grid first")
    dz = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - dz)))
    if abs(steps[worst] - dz) > max(POSITION_TOL_MM, 0.01 * dz):
        hint = " (missing slice?)" if steps[worst] > 1.5 * dz else ""
        raise DicomDataError(headers[worst + 1][0], f"{name}: non-uniform slice spacing: {steps[worst]:.3f} mm between "
                                                    f"slices at {along[worst]:.2f} and {along[worst + 1]:.2f} mm, "
                                                    f"elsewhere {dz:.3f} mm{hint}")
    return headers, direction, (float(spacing_rc[1]), float(spacing_rc[0]), dz), pos[0]


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:160]


def _pixels(path: Path) -> tuple[Dataset, np.ndarray]:
    """The data set and pixels of ``path``; the size its header declares is checked first."""
    try:
        too_large = declared_size_problem(read_dataset_file(path, force=True))
    except Exception as e:  # noqa: BLE001 - unreadable header, or it inflates beyond its bound
        raise DicomDataError(path, f"cannot read the header: {type(e).__name__}: {_first_line(e)}") from None
    if too_large:
        raise DicomDataError(path, too_large)
    try:
        ds = read_dataset_file(path, pixels=True, force=True)
        return ds, ds.pixel_array
    except Exception as e:  # noqa: BLE001 - decoder missing, truncated file, ...
        ts = ""
        try:
            ts = f" (transfer syntax {ds.file_meta.TransferSyntaxUID.name})"  # type: ignore[possibly-undefined]
        except Exception:  # noqa: BLE001
            pass
        raise DicomDataError(path, f"cannot decode the pixel data{ts}: {type(e).__name__}: {_first_line(e)}") from None


def read_ct_series(headers: list[tuple[Path, Dataset]]) -> tuple[sitk.Image, list[Dataset]]:
    """A CT series -> (image in HU: int16 when integral, else float32; sorted slice headers)."""
    headers, direction, spacing, origin = series_geometry(headers)
    first = headers[0][1]
    too_large = size_problem([int(first.get("Columns", 0)), int(first.get("Rows", 0)), len(headers)], 2)
    if too_large:  # the whole series, before any slice is decoded
        raise DicomDataError(headers[0][0], f"CT series of {len(headers)} slices {too_large}")
    slices = []
    for p, _ in headers:
        ds, px = _pixels(p)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        if slope == 1 and intercept == int(intercept) and px.dtype.kind in "iu":  # the usual case: integer HU
            slices.append(px.astype(np.int32) + int(intercept))
        else:
            slices.append(px.astype(np.float64) * slope + intercept)
    hu = np.stack(slices)
    integral = hu.dtype.kind == "i" or np.allclose(hu, np.rint(hu))
    if integral and hu.min() >= -32768 and hu.max() <= 32767:
        hu = hu.astype(np.int16) if hu.dtype.kind == "i" else np.rint(hu).astype(np.int16)
    else:
        hu = hu.astype(np.float32)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(spacing)
    img.SetOrigin([float(v) for v in origin])
    img.SetDirection([float(v) for v in direction.ravel()])
    return img, [ds for _, ds in headers]


def read_rtdose(path: Path, require_absolute: bool = True) -> sitk.Image:
    """An RTDOSE file -> its own dose grid in Gy (float32). ``require_absolute=False`` also reads a
    RELATIVE dose (then the values are the stored integers x DoseGridScaling, unitless)."""
    ds, px = _pixels(path)
    units = str(ds.get("DoseUnits", "")).upper()
    if units not in ("GY", "CGY") and require_absolute:
        raise DicomDataError(path, f"DoseUnits is {units or 'missing'!r}: only absolute dose (GY) can be imported")
    scaling = ds.get("DoseGridScaling")
    if scaling is None or str(scaling).strip() == "":
        raise DicomDataError(path, "DoseGridScaling missing: the stored integers cannot be converted to Gy")
    direction = _orientation(ds, path)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    px = px.reshape((n_frames,) + px.shape[-2:])
    origin = _floats(ds, "ImagePositionPatient", 3, path)
    spacing_rc = _floats(ds, "PixelSpacing", 2, path)
    if n_frames > 1:
        offsets = _floats(ds, "GridFrameOffsetVector", n_frames, path)
        if abs(offsets[0]) > 1e-3:  # absolute form: first offset = the first frame's position
            offsets = offsets - offsets[0]
        order = np.argsort(offsets, kind="stable")
        offsets, px = offsets[order], px[order]
        origin = origin + offsets[0] * direction[:, 2]
        steps = np.diff(offsets)
        dz = float(np.median(steps))
        if dz <= 0 or np.abs(steps - dz).max() > max(POSITION_TOL_MM, 0.01 * dz):
            raise DicomDataError(path, f"GridFrameOffsetVector is not uniformly spaced (steps {steps.min():.3f} to "
                                       f"{steps.max():.3f} mm)")
    else:
        dz = float(ds.get("SliceThickness") or 1.0)
    gy = px.astype(np.float64) * float(scaling) * (0.01 if units == "CGY" else 1.0)
    img = sitk.GetImageFromArray(gy.astype(np.float32))
    img.SetSpacing((float(spacing_rc[1]), float(spacing_rc[0]), dz))
    img.SetOrigin([float(v) for v in origin])
    img.SetDirection([float(v) for v in direction.ravel()])
    return img


def dose_on_grid(dose: sitk.Image, ct: sitk.Image) -> sitk.Image:
    """Resample a dose grid onto the CT grid (linear; 0 Gy outside the dose grid)."""
    out = sitk.Resample(dose, ct, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return out
