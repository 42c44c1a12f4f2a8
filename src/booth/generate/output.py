"""Output folders and A1111-style numbered file names (`00000-<seed>.png`), never overwriting.

Numbering follows A1111's `images.save_image` / `get_next_sequence_number`: scan the folder, take the largest
leading number of the names that start with the prefix, add one. A name is claimed by creating the file with
O_EXCL (retrying with the next number when it exists); on POSIX the scan-and-claim also holds an exclusive
`flock` on the folder, so concurrent booth writers never share a number.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from booth.errors import BoothError

MAX_TRIES = 1000


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create `folder` (with parents) if needed and check that files can be created in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BoothError(f"output folder {folder} is not writable: it exists and is not a folder") from None
    except OSError as exc:
        raise BoothError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None
    if not folder.is_dir():
        raise BoothError(f"output folder {folder} is not writable: it exists and is not a folder")
    probe = folder / f".booth-write-test-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BoothError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None
    return folder


def _sequence_number(name: str, stem_prefix: str) -> int | None:
    """A1111 rule: the text after the prefix, extension removed, up to the first "-", as an integer."""
    if not name.startswith(stem_prefix):
        return None
    head = os.path.splitext(name[len(stem_prefix) :])[0].split("-")[0]
    return int(head) if head.isdigit() else None


def next_number(folder: str | os.PathLike, stem_prefix: str = "") -> int:
    """One more than the largest sequence number among names starting with `stem_prefix` (0 if none)."""
    numbers = (_sequence_number(name, stem_prefix) for name in os.listdir(folder))
    return max((n for n in numbers if n is not None), default=-1) + 1


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive `flock` on the folder itself (POSIX); a no-op where unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: O_EXCL alone still prevents overwriting
        fcntl = None
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def next_numbered_path(
    folder: str | os.PathLike, stem_prefix: str = "", ext: str = ".png", *, suffix: str = ""
) -> Path:
    """Claim and return `folder/<stem_prefix><NNNNN><suffix><ext>`, e.g. `00012-1234.png` with suffix "-1234".

    The file is created empty (O_EXCL) so no other writer can take the name; write the image over it
    (`metadata.atomic_write` replaces it). Never returns an existing file.
    """
    folder = Path(folder)
    ext = ext if ext.startswith(".") else f".{ext}"
    with _folder_lock(folder):
        try:
            number = next_number(folder, stem_prefix)
        except OSError as exc:
            raise BoothError(f"output folder {folder} is not readable: {exc.strerror or exc}") from None
        for _ in range(MAX_TRIES):
            path = folder / f"{stem_prefix}{number:05d}{suffix}{ext}"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                number += 1
                continue
            except OSError as exc:
                raise BoothError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None
            os.close(fd)
            return path
    raise BoothError(f"no free file name in {folder} after {MAX_TRIES} tries")


def save_generated(
    image,
    folder: str | os.PathLike,
    seed: int | None,
    infotext: str,
    extra_json: Mapping[str, Any] | None = None,
    *,
    prefix: str = "",
    ext: str = ".png",
) -> Path:
    """Save a generated image as `<prefix>NNNNN-<seed><ext>` with its metadata (`metadata.save_image`)."""
    from booth.generate.metadata import save_image

    folder = ensure_writable_dir(folder)
    path = next_numbered_path(folder, prefix, ext, suffix=f"-{seed}" if seed is not None else "")
    try:
        return save_image(image, path, infotext, extra_json)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()  # the empty placeholder
        raise


__all__ = ["ensure_writable_dir", "next_number", "next_numbered_path", "save_generated"]
