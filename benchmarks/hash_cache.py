"""Time to get a checkpoint's A1111 hash in a new process: read and hashed (the first run) against taken
from booth's on-disk digest cache (every later run), side by side in one run.

Writes a file of --size MiB (a stand-in for a checkpoint: the cost is the reading and hashing, not the
content) and a cache folder under a temporary directory, then runs `sha256_file` in two fresh processes.

    python benchmarks/hash_cache.py               # 2048 MiB, about the size of an SD 1.x fp16 checkpoint
    python benchmarks/hash_cache.py --size 6800   # an SDXL checkpoint
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from fresh_process import report, run_child


def child(path: str) -> None:
    from booth.models.hashing import model_hash

    start = time.perf_counter()
    digest = model_hash(Path(path))
    report(time.perf_counter() - start, hash=digest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="file size in MiB (default 2048)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        block = os.urandom(1 << 20)
        with open(path, "wb") as f:
            for _ in range(args.size):
                f.write(block)
        os.environ.update(BOOTH_CACHE=str(Path(tmp) / "cache"), BOOTH_HASH_CACHE="1")
        first = run_child(__file__, [], str(path))
        again = run_child(__file__, [], str(path))
    assert first["hash"] == again["hash"]
    print(f"first run (read + sha256): {first['seconds']:8.3f} s")
    print(f"later run (disk cache):    {again['seconds']:8.3f} s")
    print(f"cached / first: time {again['seconds'] / first['seconds']:.4f} for a {args.size} MiB file")


if __name__ == "__main__":
    main()
