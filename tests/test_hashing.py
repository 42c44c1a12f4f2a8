"""Model hashes against hashlib, following formats.md §3.3."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest

from booth.errors import BoothError
from booth.models.hashing import (
    addnet_hash_safetensors,
    clear_hash_cache,
    legacy_model_hash,
    lora_shorthash,
    model_hash,
    safetensors_data_offset,
    sha256_file,
)


def write_safetensors(path, data: bytes, metadata: dict[str, str]) -> bytes:
    """A hand-built safetensors file (formats.md §1): u64 header length, JSON header, raw data."""
    header = {
        "w": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]},
        "__metadata__": metadata,
    }
    blob = json.dumps(header).encode()
    content = struct.pack("<Q", len(blob)) + blob + data
    path.write_bytes(content)
    return content


def test_sha256_and_shorthash_match_hashlib_over_several_chunks(tmp_path):
    data = os.urandom(3 * (1 << 20) + 123)  # spans several 1 MiB reads
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == expected
    assert model_hash(path) == expected[:10]
    assert sha256_file(str(path)) == expected  # str and Path give the same cached answer


def test_hash_cache_is_keyed_by_size_and_mtime(tmp_path):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"a" * 100)
    first = sha256_file(path)
    st = path.stat()
    path.write_bytes(b"b" * 100)  # same size; restore the mtime -> the cached digest is returned
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_file(path) == first
    clear_hash_cache()
    assert sha256_file(path) == hashlib.sha256(b"b" * 100).hexdigest()
    path.write_bytes(b"c" * 101)  # size changes -> recomputed without clearing
    assert sha256_file(path) == hashlib.sha256(b"c" * 101).hexdigest()


def test_addnet_hash_covers_only_tensor_data(tmp_path):
    data = os.urandom(5000)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    content_a = write_safetensors(a, data, {"ss_output_name": "a"})
    write_safetensors(b, data, {"ss_output_name": "a much longer name", "note": "edited"})
    n = struct.unpack("<Q", content_a[:8])[0]
    assert safetensors_data_offset(a) == 8 + n
    assert addnet_hash_safetensors(a) == hashlib.sha256(content_a[8 + n :]).hexdigest()
    assert addnet_hash_safetensors(a) == addnet_hash_safetensors(b)  # metadata edits do not change it
    assert sha256_file(a) != sha256_file(b)
    assert lora_shorthash(a) == addnet_hash_safetensors(a)[:12]


def test_lora_shorthash_of_non_safetensors_uses_file_sha256(tmp_path):
    path = tmp_path / "old.pt"
    path.write_bytes(b"pickle bytes")
    assert lora_shorthash(path) == hashlib.sha256(b"pickle bytes").hexdigest()[:12]


def test_legacy_model_hash_reads_64k_at_1m(tmp_path):
    data = os.urandom(0x100000 + 0x10000 + 999)
    path = tmp_path / "big.ckpt"
    path.write_bytes(data)
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    small = tmp_path / "small.ckpt"
    small.write_bytes(b"x" * 1000)  # nothing at 1 MiB: A1111 hashes the empty read
    assert legacy_model_hash(small) == hashlib.sha256(b"").hexdigest()[:8]


def test_hash_errors_are_one_line_booth_errors(tmp_path):
    with pytest.raises(BoothError, match="cannot hash") as missing:
        sha256_file(tmp_path / "nope.safetensors")
    assert "\n" not in str(missing.value)
    with pytest.raises(BoothError, match="not a file"):
        model_hash(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(BoothError, match="not a safetensors file"):
        addnet_hash_safetensors(bad)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(BoothError, match="not a safetensors file"):
        addnet_hash_safetensors(tiny)


def test_digests_persist_on_disk_so_a_new_process_does_not_read_the_file_again(tmp_path, monkeypatch):
    import json

    from booth.models import hashing

    monkeypatch.setenv("BOOTH_HASH_CACHE", "1")
    monkeypatch.setenv("BOOTH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "big.safetensors"
    path.write_bytes(b"x" * 5000)
    digest = sha256_file(path)
    stored = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    assert stored[f"sha256:{path.resolve()}"] == [5000, path.stat().st_mtime_ns, digest]

    clear_hash_cache()  # a new process: nothing in memory

    def no_reading(*args, **kwargs):
        raise AssertionError("the file was read again")

    monkeypatch.setattr(hashing, "_sha256_stream", no_reading)
    assert sha256_file(path) == digest and model_hash(path) == digest[:10]
    monkeypatch.undo()
    monkeypatch.setenv("BOOTH_HASH_CACHE", "1")
    monkeypatch.setenv("BOOTH_CACHE", str(tmp_path / "cache"))

    clear_hash_cache()
    path.write_bytes(b"y" * 5001)  # changed: hashed again, and the new digest stored
    assert sha256_file(path) == hashlib.sha256(b"y" * 5001).hexdigest()
    assert json.loads((tmp_path / "cache" / "hashes.json").read_text())[f"sha256:{path.resolve()}"][0] == 5001

    (tmp_path / "cache" / "hashes.json").write_text("{not json")  # a broken cache: ignored, then replaced
    clear_hash_cache()
    assert sha256_file(path) == hashlib.sha256(b"y" * 5001).hexdigest()
    clear_hash_cache(disk=True)
    assert not (tmp_path / "cache" / "hashes.json").exists()
    monkeypatch.setenv("BOOTH_HASH_CACHE", "0")
    sha256_file(path)
    assert not (tmp_path / "cache" / "hashes.json").exists()  # turned off: no file
