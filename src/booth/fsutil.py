"""Atomic file-system writes shared by the dataset builder, trainers and exporters."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from booth.errors import BoothError


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` (old one removed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / target.name)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_folders(flag: str, folders) -> None:
    """BoothError "<flag> <folder> is not a folder" for the first of `folders` that is not an existing folder."""
    for folder in folders:
        if not Path(folder).is_dir():
            raise BoothError(f"{flag} {folder} is not a folder")


def check_replaceable(target: Path, marker: str, what: str) -> None:
    """BoothError unless `atomic_folder(target)` may replace `target` whole: it is missing, an empty folder, or
    holds `marker`, the file that makes it `what` (never a folder of the user's other files)."""
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not (target / marker).is_file()):
        raise BoothError(
            f"refusing to replace {target}: it is not {what} (no {marker}); give a new or empty folder"
        )
