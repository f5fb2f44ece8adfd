"""What a hospital's files may be before we read them: hostile input stays cheap.

* Only regular files inside their folder are read (:func:`file_problem`, :func:`open_regular`):
  a FIFO or ``/dev/zero`` never ends, a link out of a case reads someone else's file.
* An image may declare at most :func:`max_voxels` voxels (default :data:`DEFAULT_MAX_VOXELS`,
  512^3; ``ADDIFF_MAX_VOXELS`` sets another), checked from the header before decompressing: a
  small ``.nii.gz`` or deflated RTDOSE can declare gigabytes.
* A deflated DICOM data set is inflated only as far as read: :data:`DICOM_HEADER_BYTES` and
  :data:`DICOM_INFLATED_READS` for the header, then the pixel bytes it declares (``dicom/files.py``).
"""
from __future__ import annotations

import errno
import math
import os
import stat
from pathlib import Path
from typing import BinaryIO, Sequence

from .errors import UserError

DEFAULT_MAX_VOXELS = 512 ** 3  # 134,217,728 voxels: 256 MiB as int16, 1 GiB as float64
MAX_VOXELS_ENV = "ADDIFF_MAX_VOXELS"
DICOM_HEADER_BYTES = 128 * 2 ** 20  # a large RTSTRUCT (contours are header, not pixels) is tens of MB
# pydicom reads of one deflated data set (about two per element): inflated zeros parse as empty
# elements, so a bound in bytes alone is not enough (BENCHMARKS.md, "Hostile input: cost bounds")
DICOM_INFLATED_READS = 500_000


def max_voxels() -> int:
    """The most voxels one image may declare: ``$ADDIFF_MAX_VOXELS``, else :data:`DEFAULT_MAX_VOXELS`.

    Raises:
        UserError: the environment variable is not a positive integer.
    """
    raw = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"{MAX_VOXELS_ENV}={raw[:40]!r}: must be a positive whole number of voxels")
    return value


def size_problem(dims: Sequence[int], bytes_per_voxel: float | None = None) -> str | None:
    """None if an image of ``dims`` voxels is within :func:`max_voxels`, else why it is refused."""
    dims = [int(d) for d in dims]
    n, limit = math.prod(dims), max_voxels()
    if all(d >= 0 for d in dims) and n <= limit:
        return None
    size = f", {n * bytes_per_voxel / 2 ** 30:.1f} GiB" if bytes_per_voxel else ""
    return (f"declares {' x '.join(map(str, dims))} voxels ({n:,}{size}), above the limit of {limit:,} voxels "
            f"(set {MAX_VOXELS_ENV} to change it); not read")


def image_size_problem(path: str | Path) -> str | None:
    """The declared size of an image file (NIfTI, ...) against :func:`max_voxels`, read from its
    header only (SimpleITK ``ReadImageInformation``). None also when the header cannot be read:
    the reader that follows says why."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    dims = list(reader.GetSize()) + [reader.GetNumberOfComponents()]
    return size_problem(dims if dims[-1] > 1 else dims[:-1])


def file_problem(path: str | Path, folder: str | Path, what: str = "case") -> str | None:
    """None if ``path`` is a regular file inside ``folder`` (every symbolic link resolved), else
    why it is not read; ``what`` names the folder in the message ("case", "DICOM", ...). A path
    that does not exist at all is the caller's "missing"."""
    path = Path(path)
    try:
        real, base = path.resolve(), Path(folder).resolve()
    except (OSError, RuntimeError):
        return "is a symbolic link that cannot be resolved; not read"
    if base != real and base not in real.parents:
        return f"is a symbolic link to a file outside the {what} folder; not read"
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(mode):
        return f"is not a regular file ({_kind(mode)}); not read"
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a plain file"


def open_regular(path: str | Path) -> BinaryIO:
    """``open(path, "rb")`` that never blocks: a FIFO is opened non-blocking and refused, like a
    device or a folder.

    Raises:
        OSError: not a regular file (``strerror`` says what it is), or it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file ({_kind(mode)})", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
