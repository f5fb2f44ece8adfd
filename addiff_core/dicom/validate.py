"""Checks of every DICOM object the project writes, before and after it is written.

No maintained offline dciodvfy-like Python tool exists (``dicom-validator`` downloads the
standard), so: :func:`value_problems` (every value against its VR, pydicom's RAISE mode);
:func:`needs_implicit_vr` (an element over Explicit VR's 2-byte length, e.g. a body's ContourData,
which pydicom would silently write as unreadable VR UN); :func:`file_problems` (the file read back:
it parses, no UN, every value valid, the same elements as written).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

__all__ = ["SHORT_LENGTH_VRS", "MAX_SHORT_LENGTH", "value_problems", "needs_implicit_vr", "file_problems",
           "valid_or_empty", "DicomWriteError"]

# VRs with a 2-byte value length in Explicit VR (PS3.5 7.1.2); the others (OB, OW, SQ, UN, UT, ...) have 4
SHORT_LENGTH_VRS = frozenset({"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "PN", "SH",
                              "SL", "SS", "ST", "TM", "UI", "UL", "US"})
MAX_SHORT_LENGTH = 0xFFFE  # even lengths only
_BINARY_SIZE = {"AT": 4, "FL": 4, "FD": 8, "SL": 4, "SS": 2, "UL": 4, "US": 2}


class DicomWriteError(ValueError):
    """A DICOM object the project would write, or wrote, is not valid; the message says which element."""


def _values(elem) -> list:
    v = elem.value
    if v is None:
        return []
    return list(v) if elem.VM > 1 or isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [v]


def encoded_length(elem) -> int:
    """The value length of a non-sequence element as written (text joined by backslashes, even)."""
    vals = _values(elem)
    if elem.VR in _BINARY_SIZE:
        return _BINARY_SIZE[elem.VR] * len(vals)
    if isinstance(elem.value, (bytes, bytearray)):
        n = len(elem.value)
    else:
        n = sum(len(str(v)) for v in vals) + max(0, len(vals) - 1)
    return n + (n % 2)


def value_problems(ds: Dataset) -> list[str]:
    """Every element (nested ones too) whose value breaks its VR, as ``tag keyword: problem``."""
    out = []
    for elem in ds.iterall():
        if elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or elem.value is None:
            continue
        for v in _values(elem):
            if elem.VR not in _BINARY_SIZE and not isinstance(v, (bytes, str)):
                v = str(v)  # DSfloat, IS, PersonName: checked as the text written
            try:
                validate_value(elem.VR, v, config.RAISE)
            except (ValueError, TypeError) as e:
                out.append(f"{elem.tag} {elem.keyword or '?'}: {e}")
                break
    return out


def needs_implicit_vr(ds: Dataset) -> list[str]:
    """Elements too long for Explicit VR (2-byte length field), as ``tag keyword (bytes)``."""
    return [f"{e.tag} {e.keyword} ({encoded_length(e):,} bytes)" for e in ds.iterall()
            if e.VR in SHORT_LENGTH_VRS and encoded_length(e) > MAX_SHORT_LENGTH]


def _tags(ds: Dataset) -> list[int]:
    return [int(e.tag) for e in ds.iterall()]


def file_problems(path: Path, written: Dataset) -> list[str]:
    """Problems of the file at ``path`` read back with pydicom (empty: valid)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # pydicom's warning on a value it cannot parse
            back = pydicom.dcmread(str(path))
            _ = [e.value for e in back.iterall()]  # parse every value (DS strings -> numbers)
    except Exception as e:  # noqa: BLE001 - whatever the reader trips on
        return [f"cannot be read back: {type(e).__name__}: {str(e)[:160]}"]
    problems = [f"{e.tag} {e.keyword}: written with VR UN" for e in back.iterall() if e.VR == "UN"]
    problems += value_problems(back)
    if _tags(back) != _tags(written):
        problems.append("the file does not hold the elements that were written")
    return problems


def valid_or_empty(vr: str, value: str) -> str:
    """``value`` when it is valid for ``vr``, else "" (an anonymiser's hash in a date, a sex of 'X')."""
    try:
        validate_value(vr, value, config.RAISE)
    except (ValueError, TypeError):
        return ""
    return value
