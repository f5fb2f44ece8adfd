"""A GDP-HMM plan file (``.npz``) read without running code from it.

The challenge stores each plan as ``np.savez_compressed(path, data_dict)`` (DICOM2NPZ.py, the
last lines of its ``__main__``), so ``arr_0.npy`` is a 0-d *object* array: a pickle of the dict.
The challenge's own code reads it with ``np.load(path, allow_pickle=True)`` (data_loader.py,
``MyDataset.__getitem__``; evaluation.ipynb), which runs whatever the pickle asks for. Here the
pickle goes through :class:`RestrictedUnpickler`: plain containers (dict, list, tuple), strings,
bytes, numbers, booleans and None are built by the pickle's own opcodes, and the only callables
it may name are the four numpy needs to rebuild arrays, dtypes and numpy scalars. Anything else
(``os.system``, ``builtins.exec``, any class) is refused before it is called.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

try:  # numpy >= 2 pickles under numpy._core; numpy 1.x under numpy.core
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

ARRAY_MEMBER = "arr_0.npy"
MAX_MEMBER_BYTES = 8 << 30
"""Largest ``arr_0.npy`` read (uncompressed, as the zip declares it): a plan is ~0.1-1 GB."""
MAX_HEADER_BYTES = 10_000

# (module, name) -> the object it stands for. ``_reconstruct`` + ``ndarray`` + ``dtype`` rebuild
# an array (ndarray.__reduce__); ``scalar`` a numpy scalar such as the float32 items of
# DICOM2NPZ.spatial_crop_dict's ``isocenter`` list. Both spellings of the module: the challenge's
# files were written by numpy 1.x (numpy.core), files re-saved by numpy 2 name numpy._core.
_ALLOWED: dict[tuple[str, str], Any] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(_mod, "scalar")] = _multiarray.scalar
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = np.dtype


class UnsafeNpz(ValueError):
    """The file is not a GDP-HMM plan that can be read safely; the message says why (one line)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only containers, strings, numbers and numpy arrays/scalars."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeNpz(f"refused: the pickle asks for {module[:60]}.{name[:60]}, which is not a "
                            "numpy array, dtype or scalar (a plan holds only those, dicts, lists, "
                            "strings and numbers); nothing was run") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeNpz("refused: the pickle uses persistent ids; nothing was run")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    Raises:
        UnsafeNpz: a refused global, or a stream that is not a valid pickle.
    """
    return _load(io.BytesIO(data))


def _load(fp: io.BufferedIOBase) -> Any:
    try:
        return RestrictedUnpickler(fp).load()
    except UnsafeNpz:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OverflowError) as e:
        raise UnsafeNpz(f"arr_0 is not a readable pickle ({type(e).__name__}: {str(e)[:100]})") from None


def _member(zf: zipfile.ZipFile) -> zipfile.ZipInfo:
    try:
        info = zf.getinfo(ARRAY_MEMBER)
    except KeyError:
        names = ", ".join(n[:40] for n in zf.namelist()[:5]) or "nothing"
        raise UnsafeNpz(f"no arr_0 in the npz (holds {names}); a GDP-HMM plan is "
                        "np.savez_compressed(path, data_dict)") from None
    if info.file_size > MAX_MEMBER_BYTES:
        raise UnsafeNpz(f"arr_0 declares {info.file_size} bytes (at most {MAX_MEMBER_BYTES})")
    return info


def load_plan_dict(path: str | Path) -> dict[str, Any]:
    """The ``arr_0`` dict of a GDP-HMM ``.npz``, unpickled with :class:`RestrictedUnpickler`.

    Raises:
        UnsafeNpz: not a zip, no ``arr_0``, not a pickled 0-d object array of a dict, or a pickle
            that names anything but numpy arrays/dtypes/scalars (refused, never called).
        OSError: the file cannot be read.
    """
    try:
        with zipfile.ZipFile(path) as zf, zf.open(_member(zf)) as raw:
            fp = io.BufferedReader(raw)  # type: ignore[arg-type]
            try:
                version = np.lib.format.read_magic(fp)
                reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, _, dtype = reader(fp, max_header_size=MAX_HEADER_BYTES)
            except ValueError as e:
                raise UnsafeNpz(f"arr_0 is not a .npy array ({str(e)[:100]})") from None
            if dtype != np.dtype(object):
                raise UnsafeNpz(f"arr_0 is a {dtype} array of shape {shape}, not the pickled dict of a GDP-HMM plan")
            obj = _load(fp)
    except zipfile.BadZipFile as e:
        raise UnsafeNpz(f"not an npz (zip) file: {str(e)[:100]}") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise UnsafeNpz(f"arr_0 holds a {type(obj).__name__}, not the dict of a GDP-HMM plan")
    return obj
