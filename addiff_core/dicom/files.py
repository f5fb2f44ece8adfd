"""Reading one DICOM file at a bounded cost, whatever the file says.

Only regular files (``limits.open_regular``); the header up to the pixel data, values over
:data:`DEFER_BYTES` deferred. A deflated data set is inflated only as far as read (pydicom would
inflate it whole, and 2 MB of deflated zeros are 2 GB): at most ``limits.DICOM_HEADER_BYTES`` for
the header, then, once :func:`declared_size_problem` has checked the declared size against
``limits.max_voxels()``, the pixel bytes it declares.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from .. import limits

__all__ = ["DEFER_BYTES", "DicomTooLarge", "read_header", "read_dataset_file", "declared_size_problem"]

DEFER_BYTES = 2 ** 20  # header values larger than this are read only when used
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # (Float / Double Float) Pixel Data


class DicomTooLarge(ValueError):
    """A deflated data set inflates beyond its bound; the message says which."""


class _Inflating:
    """The deflated data set of an open file, inflated only as far as it is read (seek/tell/read
    for pydicom's ``read_dataset``), never beyond ``limit`` bytes."""

    def __init__(self, raw: BinaryIO, limit: int):
        self._raw, self._limit = raw, limit
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._pos = self._reads = 0
        self._done = False

    def _fill(self, end: float) -> None:
        while len(self._buf) < end and not self._done:
            if len(self._buf) >= self._limit:
                raise DicomTooLarge(f"the deflated data set inflates beyond {self._limit:,} bytes")
            src = self._z.unconsumed_tail or self._raw.read(1 << 16)
            if not src:
                self._buf += self._z.flush()
                self._done = True
            else:
                self._buf += self._z.decompress(src, min(1 << 20, self._limit + 1 - len(self._buf)))
                self._done = self._z.eof

    def read(self, n: int | None = -1) -> bytes:
        self._reads += 1
        if self._reads > limits.DICOM_INFLATED_READS:
            raise DicomTooLarge(f"the deflated data set holds more than {limits.DICOM_INFLATED_READS:,} elements")
        if n is None or n < 0:
            self._fill(float("inf"))
            n = len(self._buf) - self._pos
        self._fill(self._pos + n)
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += len(out)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self._fill(float("inf"))
        self._pos = max(0, offset + (0, self._pos, len(self._buf))[whence])
        return self._pos

    def tell(self) -> int:
        return self._pos


def _not_meta(tag, vr, length) -> bool:
    return tag >> 16 != 2


def _at_pixels(tag, vr, length) -> bool:
    return tag in _PIXEL_TAGS


def _deflated(path: Path, pixels: bool) -> FileDataset | None:
    """A deflated file's data set inflated through :class:`_Inflating` (the header, or with
    ``pixels`` the header and the pixel bytes it declares); None if the file is not deflated."""
    limit = limits.DICOM_HEADER_BYTES
    if pixels:
        header = _deflated(path, False)
        if header is None:
            return None
        limit += _declared_bytes(header)
    with limits.open_regular(path) as fh:
        try:
            preamble = read_preamble(fh, False)
            meta = FileMetaDataset(read_dataset(fh, is_implicit_VR=False, is_little_endian=True, stop_when=_not_meta))
            if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
                return None
        except Exception:  # noqa: BLE001 - no preamble, odd meta: pydicom's own reader decides
            return None
        ds = read_dataset(_Inflating(fh, limit), is_implicit_VR=False, is_little_endian=True,  # type: ignore[arg-type]
                          stop_when=None if pixels else _at_pixels)
    out = FileDataset(str(path), ds, preamble, meta, False, True)
    out.set_original_encoding(False, True, ds._character_set)
    return out


def read_dataset_file(path: str | Path, pixels: bool = False, force: bool = False) -> FileDataset:
    """The data set of a DICOM file: its header only (stop before the pixel data, large values
    deferred), or with the pixel data (``pixels``; check :func:`declared_size_problem` first).

    Raises:
        InvalidDicomError: not a DICOM file (without ``force``).
        DicomTooLarge: a deflated data set inflates beyond its bound.
        OSError: not a regular file, or unreadable.
    """
    path = Path(path)
    ds = _deflated(path, pixels)
    if ds is not None:
        return ds
    with limits.open_regular(path):  # a FIFO or a device is refused before pydicom opens it
        pass
    return pydicom.dcmread(str(path), stop_before_pixels=not pixels, defer_size=None if pixels else DEFER_BYTES,
                           force=force)


def read_header(path: str | Path) -> Dataset | None:
    """The DICOM header of ``path`` (no pixel data), or None if it is not a DICOM file (or one
    whose header inflates beyond ``limits.DICOM_HEADER_BYTES``)."""
    try:
        return read_dataset_file(path)
    except InvalidDicomError:
        pass  # no preamble: old files may still be DICOM
    except Exception:  # noqa: BLE001 - a broken file is reported, never fatal
        return None
    try:
        ds = read_dataset_file(path, force=True)
        uid = str(ds.get("SOPClassUID", ""))
        return ds if uid.startswith("1.2.840.10008.") else None
    except Exception:  # noqa: BLE001
        return None


def _dims(ds: Dataset) -> tuple[list[int], int]:
    """([Columns, Rows, NumberOfFrames, SamplesPerPixel], BitsAllocated) as declared."""
    def num(key: str, default: int) -> int:
        v = ds.get(key)
        return default if v is None or str(v).strip() == "" else int(v)

    return ([num("Columns", 0), num("Rows", 0), num("NumberOfFrames", 1), num("SamplesPerPixel", 1)],
            num("BitsAllocated", 16))


def _declared_bytes(ds: Dataset) -> int:
    try:
        dims, bits = _dims(ds)
    except (TypeError, ValueError):
        return 0
    n = 1
    for d in dims:
        n *= max(d, 0)
    return n * max(bits, 1) // 8


def declared_size_problem(ds: Dataset) -> str | None:
    """None if the image ``ds`` declares fits ``limits.max_voxels()``, else why it is refused."""
    try:
        dims, bits = _dims(ds)
    except (TypeError, ValueError):
        return "Rows, Columns, NumberOfFrames or BitsAllocated is not a number"
    shown = dims[:2] + [d for d in dims[2:] if d != 1]
    return limits.size_problem(shown, max(bits, 1) / 8)
