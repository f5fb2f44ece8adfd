"""A NIfTI file read with Python alone, for what SimpleITK does not say.

SimpleITK 2.5 silently reads a truncated ``.nii.gz`` (zeros) and turns NaN/inf into 0, so
``addiff data check`` reads every image here first: a complete gzip stream with every announced
voxel (:func:`nifti_gz_problem`), non-finite voxels counted (:func:`nifti_nonfinite_count`); the
header's size is checked against ``limits.max_voxels()`` before decompressing, and no more than
the announced voxels (plus :data:`TRAILING_BYTES`) is decompressed.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .limits import open_regular, size_problem

__all__ = ["NiftiRaw", "read_nifti_raw", "nifti_gz_problem", "nifti_nonfinite_count"]

TRAILING_BYTES = 2 ** 20  # data after the voxels: read (to verify the gzip CRC) up to this, else refused
_FLOAT_CODES = {16: "f4", 64: "f8"}


@dataclass
class NiftiRaw:
    """What a raw read of a NIfTI file found: a problem, or the voxel bytes and their type."""

    problem: str | None
    data: bytes = b""
    offset: int = 0
    count: int = 0
    dtype: str = ""  # numpy dtype string for float types ('<f4', '>f8'), '' otherwise


@dataclass
class _Header:
    dims: tuple[int, ...]
    datatype: int
    bitpix: int
    vox_offset: int
    endian: str


def _header(data: bytes) -> _Header | str:
    """The NIfTI-1/2 header at the start of ``data``, or what is wrong with it."""
    if len(data) < 348:
        return f"truncated: {len(data)} bytes after decompression, shorter than a NIfTI header"
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", data[:4])[0]
        if sizeof_hdr == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", data[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", data[70:74])
            vox_offset = struct.unpack(endian + "f", data[108:112])[0]
            vox_offset = int(vox_offset) if np.isfinite(vox_offset) else -1
            break
        if sizeof_hdr == 540 and len(data) >= 540:  # NIfTI-2
            datatype, bitpix = struct.unpack(endian + "2h", data[12:16])
            dims = struct.unpack(endian + "8q", data[16:80])
            vox_offset = int(struct.unpack(endian + "q", data[168:176])[0])
            break
    else:
        return "not a NIfTI file (bad header size field)"
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1:ndim + 1]) or bitpix <= 0 or vox_offset < 0:
        return f"bad NIfTI header dimensions {dims}"
    return _Header(tuple(int(d) for d in dims[1:ndim + 1]), datatype, bitpix, vox_offset, endian)


def _read(fh: BinaryIO) -> NiftiRaw:
    """Header, then exactly the bytes it announces, then at most TRAILING_BYTES more."""
    head = fh.read(540)
    hdr = _header(head)
    if isinstance(hdr, str):
        return NiftiRaw(hdr)
    too_large = size_problem(hdr.dims, hdr.bitpix / 8)
    if too_large:
        return NiftiRaw(too_large)
    count = int(np.prod(hdr.dims, dtype=np.int64))
    need = hdr.vox_offset + count * hdr.bitpix // 8
    data = head + fh.read(max(0, need - len(head)))
    if len(data) < need:
        return NiftiRaw(f"truncated: {len(data)} bytes after decompression, the header needs {need}")
    if len(fh.read(TRAILING_BYTES)) == TRAILING_BYTES and fh.read(1):
        return NiftiRaw(f"more than {TRAILING_BYTES:,} bytes after the {count:,} voxels its header declares")
    code = _FLOAT_CODES.get(hdr.datatype)
    return NiftiRaw(None, data, hdr.vox_offset, count, hdr.endian + code if code else "")


def read_nifti_raw(path: str | Path) -> NiftiRaw:
    """Read a .nii/.nii.gz file with Python alone: gzip integrity (CRC, length), NIfTI-1/2
    header, its declared size, and that the data holds every voxel the header announces."""
    path = Path(path)
    try:
        with open_regular(path) as raw:
            if path.name.endswith(".gz"):
                with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
                    return _read(fh)
            return _read(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        return NiftiRaw(f"truncated or corrupt gzip stream ({e})")
    except OSError as e:
        return NiftiRaw(f"cannot read ({e.strerror or e})")


def nifti_gz_problem(path: str | Path) -> str | None:
    """Integrity of a (gzipped) NIfTI file: None if complete, else what is wrong.

    SimpleITK reads a truncated .nii.gz without complaint (missing voxels become zeros), hence
    this check: the gzip stream must end properly (CRC and length) and hold every voxel its
    NIfTI-1/2 header announces.
    """
    return read_nifti_raw(Path(path)).problem


def nifti_nonfinite_count(path: str | Path) -> int:
    """Number of NaN/inf voxels stored in a float NIfTI file (0 for integer types or unreadable
    files). Needed because SimpleITK's NIfTI reader silently turns NaN/inf into 0."""
    raw = read_nifti_raw(Path(path))
    if raw.problem or not raw.dtype:
        return 0
    a = np.frombuffer(raw.data, dtype=raw.dtype, count=raw.count, offset=raw.offset)
    return int(a.size - np.count_nonzero(np.isfinite(a)))
