"""Model file hashes as A1111 and kohya write them (`formats.md` §3.3).

* `sha256_file`: sha256 of the whole file (A1111's new model hash; `sha256` in `/sdapi/v1/sd-models`).
* `model_hash`: its first 10 hex characters, the "shorthash" written as `Model hash:` in infotext.
* `addnet_hash_safetensors`: sha256 of a safetensors file's tensor data only (after the 8 + N byte header),
  kohya's `sshs_model_hash`; `lora_shorthash` is its first 12 characters (A1111 `Lora hashes`).
* `legacy_model_hash`: A1111's old 8-character hash of 64 KiB read at offset 1 MiB (kohya `model_hash`).

Digests are cached by (kind, resolved path, size, mtime): in memory, and on disk in
`$BOOTH_CACHE/hashes.json` (default `~/.cache/booth`, as A1111 keeps its `cache.json`), so a multi-GB
checkpoint is read once, not at every run. A changed file (size or mtime) is hashed again; an unreadable or
unwritable cache file only costs the hashing (`BOOTH_HASH_CACHE=0` turns the file off).
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


def cache_file() -> Path | None:
    """The on-disk digest cache (None when `BOOTH_HASH_CACHE=0`)."""
    if os.environ.get("BOOTH_HASH_CACHE", "1") == "0":
        return None
    return Path(os.environ.get("BOOTH_CACHE", Path.home() / ".cache" / "booth")) / "hashes.json"


def _disk_entries(file: Path) -> dict[str, list]:
    """{"kind:path": [size, mtime_ns, digest]} from the cache file ({} when missing or unreadable)."""
    try:
        import json

        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _from_disk(key: tuple[str, str, int, int]) -> str | None:
    file = cache_file()
    entry = _disk_entries(file).get(f"{key[0]}:{key[1]}") if file is not None else None
    if isinstance(entry, list) and len(entry) == 3 and entry[:2] == [key[2], key[3]]:
        return str(entry[2])
    return None


def _to_disk(key: tuple[str, str, int, int], digest: str) -> None:
    """Add a digest to the cache file (re-read first: another process may have added its own), atomically."""
    file = cache_file()
    if file is None:
        return
    import json

    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        entries = _disk_entries(file)
        entries[f"{key[0]}:{key[1]}"] = [key[2], key[3], digest]
        tmp = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(entries, indent=0, sort_keys=True), encoding="utf-8")
        os.replace(tmp, file)
    except OSError:
        pass  # a read-only home: the digest stays in memory


def _cached(kind: str, path: Path, compute) -> str:
    key = _stat_key(kind, path)
    with _cache_lock:
        found = _cache.get(key)
    if found is None:
        found = _from_disk(key)
    if found is not None:
        with _cache_lock:
            _cache[key] = found
        return found
    try:
        digest = compute()
    except OSError as exc:
        raise BoothError(f"cannot hash {path}: {exc.strerror or exc}") from None
    with _cache_lock:
        _cache[key] = digest
        _to_disk(key, digest)
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


def clear_hash_cache(disk: bool = False) -> None:
    """Forget all cached digests in memory (tests; files rewritten within the filesystem's mtime resolution),
    and with `disk` the cache file too."""
    with _cache_lock:
        _cache.clear()
        file = cache_file()
        if disk and file is not None:
            file.unlink(missing_ok=True)


__all__ = [
    "addnet_hash_safetensors",
    "clear_hash_cache",
    "legacy_model_hash",
    "lora_shorthash",
    "model_hash",
    "safetensors_data_offset",
    "sha256_file",
]
