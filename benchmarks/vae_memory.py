"""Peak memory and time of decoding a batch with Stable Diffusion's VAE: the whole batch at once (what
diffusers' pipelines do), picture by picture (booth, as A1111), and picture by picture in tiles (`--vae-tiling on`).

Builds SD 1.x's AutoencoderKL (block_out_channels 128/256/512/512; random weights: the cost does not depend on
them), decodes the same random latents in each way, each in a fresh process so peak resident memory is its
own, and prints the three and their ratios to the whole-batch decode.

    python benchmarks/vae_memory.py                        # 2 pictures of 768 x 768 on the CPU
    python benchmarks/vae_memory.py --batch 4 --size 1024
"""

from __future__ import annotations

import argparse
import time

from fresh_process import report, run_child

WAYS = ("batch", "per-image", "tiled")


def child(way: str, batch: int, size: int) -> None:
    import torch
    from diffusers import AutoencoderKL

    from booth.generate import vae_decode

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,  # SD 1.x's: diffusers tiles at it, 512 px tiles with a 25% overlap
    ).eval()
    latents = torch.randn(batch, 4, size // 8, size // 8)
    start = time.perf_counter()
    with torch.no_grad():
        if way == "batch":
            pixels = vae.decode(latents).sample
        else:
            pixels = vae_decode.decode(vae, latents, "on" if way == "tiled" else "off")
    report(time.perf_counter() - start, shape=list(pixels.shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="pictures decoded (default 2)")
    parser.add_argument("--size", type=int, default=768, help="picture side in pixels (default 768)")
    parser.add_argument("--child", choices=WAYS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.batch, args.size)
        return
    results = {}
    for way in WAYS:
        results[way] = run_child(__file__, ["--batch", str(args.batch), "--size", str(args.size)], way)
        r = results[way]
        print(f"{way:>9}: {r['seconds']:7.1f} s, peak {r['peak_mib']:7.0f} MiB, output {r['shape']}")
    whole = results["batch"]
    for way in WAYS[1:]:
        r = results[way]
        print(
            f"{way} / batch: time {r['seconds'] / whole['seconds']:.2f}, "
            f"peak memory {r['peak_mib'] / whole['peak_mib']:.2f}"
        )


if __name__ == "__main__":
    main()
