"""Model file hashes as A1111 and kohya write them (`formats.md` §3.3).

* `sha256_file`: sha256 of the whole file (A1111's new model hash; `sha256` in `/sdapi/v1/sd-models`).
* `model_hash`: its first 10 hex characters, the "shorthash" written as `Model hash:` in infotext.
* `addnet_hash_safetensors`: sha256 of a safetensors file's tensor data only (after the 8 + N byte header),
  kohya's `sshs_model_hash`; `lora_shorthash` is its first 12 characters (A1111 `Lora hashes`).
* `legacy_model_hash`: A1111's old 8-character hash of 64 KiB read at offset 1 MiB (kohya `model_hash`).

Full-file hashes are cached in memory by (resolved path, size, mtime) so a model is read once per process.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from pathlib import Path

from booth.errors import BoothError

CHUNK = 1 << 20  # 1 MiB reads
LEGACY_OFFSET = 0x100000  # A1111 legacy hash: 64 KiB read at 1 MiB
LEGACY_LENGTH = 0x10000
SHORTHASH_LENGTH = 10  # A1111 `Model hash:` / `hash` in /sdapi/v1/sd-models
LORA_SHORTHASH_LENGTH = 12  # A1111 Lora network shorthash (unverified in the reference)

_cache: dict[tuple[str, str, int, int], str] = {}  # (kind, path, size, mtime_ns) -> hex digest
_cache_lock = threading.Lock()


def _stat_key(kind: str, path: Path) -> tuple[str, str, int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise BoothError(f"cannot hash {path}: {exc.strerror or exc}") from None
    if not path.is_file():
        raise BoothError(f"cannot hash {path}: not a file")
    return kind, str(path.resolve()), st.st_size, st.st_mtime_ns


def _cached(kind: str, path: Path, compute) -> str:
    key = _stat_key(kind, path)
    with _cache_lock:
        found = _cache.get(key)
    if found is not None:
        return found
    try:
        digest = compute()
    except OSError as exc:
        raise BoothError(f"cannot hash {path}: {exc.strerror or exc}") from None
    with _cache_lock:
        _cache[key] = digest
    return digest


def _sha256_stream(path: Path, start: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of the whole file, streamed and cached by (path, size, mtime)."""
    path = Path(path)
    return _cached("sha256", path, lambda: _sha256_stream(path))


def model_hash(path: str | os.PathLike) -> str:
    """A1111's checkpoint shorthash: the first 10 hex characters of the file's sha256 (`formats.md` §3.3)."""
    return sha256_file(path)[:SHORTHASH_LENGTH]


def safetensors_data_offset(path: str | os.PathLike) -> int:
    """Byte offset of the tensor data: 8 (header length, little-endian u64) + N (`formats.md` §1)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise BoothError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(head) < 8:
        raise BoothError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
        raise BoothError(f"{path} is not a safetensors file: header length {n} exceeds the file size {size}")
    return 8 + n


def addnet_hash_safetensors(path: str | os.PathLike) -> str:
    """sha256 hex of the safetensors tensor data after the header (kohya `sshs_model_hash`, `formats.md` §3.3).

    Editing the file's `__metadata__` does not change it.
    """
    path = Path(path)
    offset = safetensors_data_offset(path)
    return _cached("addnet", path, lambda: _sha256_stream(path, offset))


def lora_shorthash(path: str | os.PathLike) -> str:
    """The 12-character hash A1111 writes in `Lora hashes`: addnet hash for .safetensors, else file sha256."""
    path = Path(path)
    full = addnet_hash_safetensors(path) if path.suffix.lower() == ".safetensors" else sha256_file(path)
    return full[:LORA_SHORTHASH_LENGTH]


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-character hash: sha256 of 0x10000 bytes read at offset 0x100000 (`formats.md` §3.3).

    Files shorter than 1 MiB hash whatever is read there (possibly nothing), as A1111 does.
    """
    path = Path(path)

    def compute() -> str:
        with open(path, "rb") as f:
            f.seek(LEGACY_OFFSET)
            return hashlib.sha256(f.read(LEGACY_LENGTH)).hexdigest()[:8]

    return _cached("legacy", path, compute)


def clear_hash_cache() -> None:
    """Forget all cached digests (tests; files rewritten within the filesystem's mtime resolution)."""
    with _cache_lock:
        _cache.clear()


__all__ = [
    "addnet_hash_safetensors",
    "clear_hash_cache",
    "legacy_model_hash",
    "lora_shorthash",
    "model_hash",
    "safetensors_data_offset",
    "sha256_file",
]
