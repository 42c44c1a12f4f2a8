"""Peak memory and time of an ESRGAN upscale in tiles against one pass over the whole picture.

Builds RealESRGAN_x4plus's network (RRDBNet, 64 features, 23 blocks; random weights: the cost does not depend
on them), upscales the same random picture x4 once whole and once in booth's default tiles (192 px with a
16 px margin), each in a fresh process so peak resident memory is its own, and prints both and their ratios.

    python benchmarks/upscale_tiles.py                  # a 256 x 256 picture on the CPU (about 2 x 1 min here)
    python benchmarks/upscale_tiles.py --size 384 --blocks 6   # RealESRGAN_x4plus_anime_6B's depth
"""

from __future__ import annotations

import argparse
import time

from fresh_process import report, run_child


def child(size: int, blocks: int, tile: int) -> None:
    import torch

    from booth.models.upscalers import RRDBNet, UpscalerModel

    torch.manual_seed(0)
    net = RRDBNet(3, 3, nf=64, nb=blocks, gc=32, n_up=2).eval().requires_grad_(False)
    model = UpscalerModel(net, 4, "ESRGAN")
    x = torch.rand(1, 3, size, size)
    start = time.perf_counter()
    out = model.upscale(x, tile=tile, pad=16)
    report(time.perf_counter() - start, shape=list(out.shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="input side in pixels (default 256)")
    parser.add_argument("--blocks", type=int, default=23, help="RRDB blocks (default 23, RealESRGAN_x4plus)")
    parser.add_argument("--tile", type=int, default=192, help="tile side in pixels (default 192)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.size, args.blocks, args.child)
        return
    results = {}
    for label, tile in (("whole", 0), ("tiled", args.tile)):
        results[label] = run_child(
            __file__, ["--size", str(args.size), "--blocks", str(args.blocks)], str(tile)
        )
        r = results[label]
        print(f"{label:>5}: {r['seconds']:7.1f} s, peak {r['peak_mib']:7.0f} MiB, output {r['shape']}")
    whole, tiled = results["whole"], results["tiled"]
    print(
        f"tiled / whole: time {tiled['seconds'] / whole['seconds']:.2f}, peak memory {tiled['peak_mib'] / whole['peak_mib']:.2f}"
    )


if __name__ == "__main__":
    main()
