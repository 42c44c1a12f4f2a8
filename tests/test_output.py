"""A1111-style numbered output files (`00000-<seed>.png`) that never overwrite, and output-folder checks."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from booth.errors import BoothError
from booth.generate import output
from booth.generate.metadata import read_image_metadata
from booth.generate.output import ensure_writable_dir, next_number, next_numbered_path, save_generated


def tiny(color="blue") -> Image.Image:
    return Image.new("RGB", (8, 8), color)


def test_numbering_starts_at_zero_and_continues_after_the_largest(tmp_path):
    assert next_numbered_path(tmp_path, suffix="-42").name == "00000-42.png"
    for name in ["00007-1.png", "00003-9.jpg", "foo.png", "grid-00020-1.png", "12abc.png", ".00099-x.tmp"]:
        (tmp_path / name).write_bytes(b"")
    assert next_number(tmp_path) == 8
    assert next_numbered_path(tmp_path, suffix="-5").name == "00008-5.png"
    assert next_numbered_path(tmp_path, "grid-", ".png", suffix="-1").name == "grid-00021-1.png"
    assert next_numbered_path(tmp_path, ext="webp").name == "00009.webp"


def test_an_existing_name_is_never_reused(tmp_path, monkeypatch):
    taken = tmp_path / "00000-5.png"
    taken.write_bytes(b"precious")
    monkeypatch.setattr(output, "next_number", lambda folder, prefix="": 0)  # a stale scan
    path = next_numbered_path(tmp_path, suffix="-5")
    assert path.name == "00001-5.png" and path.exists()
    assert taken.read_bytes() == b"precious"


def test_save_generated_writes_metadata_and_numbered_names(tmp_path):
    infotext = "a cat\nSteps: 20, Sampler: Euler, Seed: 1234"
    first = save_generated(tiny(), tmp_path / "out", 1234, infotext, {"seed": 1234})
    second = save_generated(tiny(), tmp_path / "out", 1235, infotext, None)
    assert (first.name, second.name) == ("00000-1234.png", "00001-1235.png")
    meta = read_image_metadata(first)
    assert meta.source == "booth" and meta.parameters["Seed"] == "1234" and meta.booth["seed"] == 1234
    jpg = save_generated(tiny(), tmp_path / "out", 7, infotext, None, ext=".jpg", prefix="grid-")
    assert jpg.name == "grid-00000-7.jpg" and read_image_metadata(jpg).infotext == infotext
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "00000-1234.png", "00001-1235.png", "grid-00000-7.jpg"
    ]  # fmt: skip


def test_failed_save_removes_its_placeholder(tmp_path):
    class Broken:
        info: dict = {}

        def save(self, *args, **kwargs):
            raise OSError(5, "Input/output error")

    with pytest.raises(BoothError, match="Input/output error"):
        save_generated(Broken(), tmp_path, 1, "x", None)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_get_distinct_numbers(tmp_path):
    paths, errors = [], []

    def worker(seed: int):
        try:
            for i in range(4):
                paths.append(save_generated(tiny(), tmp_path, seed * 10 + i, "p", None))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    numbers = sorted(int(p.name.split("-")[0]) for p in paths)
    assert numbers == list(range(24))  # no number shared, none skipped
    assert all(p.stat().st_size > 0 for p in paths)


def test_ensure_writable_dir(tmp_path):
    nested = tmp_path / "a" / "b"
    assert ensure_writable_dir(nested) == nested and nested.is_dir()
    assert [p.name for p in nested.iterdir()] == []  # the write probe is removed
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for bad in (a_file, a_file / "sub"):
        with pytest.raises(BoothError, match=r"^output folder .* is not writable: ") as err:
            ensure_writable_dir(bad)
        assert "\n" not in str(err.value)
