"""How well a booth-mini autoencoder keeps object colours: PSNR over whole images and over the object's pixels,
and a grid of the example subjects and one of them hue-rotated, encoded and decoded.

    python tools/mini_vae_colours.py src/booth/mini/weights/vae runs/mini8/vae/final --out vae-colours.png

For each VAE folder it prints PSNR (posterior-mean reconstructions; `booth.mini.check.vae_psnr`) on up to 300
held-out renders of --data and on the example subjects' images, whole images and object pixels apart, and the
colour error of flat squares of 12 hues on grey, white and black (`booth.mini.check.colour_error`, 0-255). The grid
(top: input, then one row of reconstructions per VAE) shows one image of each example subject and the first
example's image hue-rotated by 60, 120, 180 and 240 degrees. With ``--clip DIR`` (a mini-CLIP: a shipped
``clip/`` or a run's ``clip/final``) it also prints the concept and style zero-shot on the held-out renders and
on each VAE's reconstructions of them: the autoencoder's cap on `booth mini check`'s concept and style gates.
It also prints the held-out PSNR when the latents carry Gaussian noise of 0.1, 0.2 and 0.3 latent stds (errors
of about the size a UNet's samples carry; a decoder that falls apart there draws speckles).

Measured 2026-12-01 on the v2 VAE: held-out 24.66 dB (objects 15.40 dB), examples 23.81 (15.83); the
teapot's and backpack's pink come back orange.

Measured 2026-12-06 (colour error: v1 51.4, v2 48.3, v3 36.5; 70.3 would be no colour at all): v3's VAE
trained 1,600 steps more (same recipe, warm start) gives colour error 5.5, held-out 26.51 dB (objects 18.05),
examples 27.32 (20.84), and the mini-CLIP reads the concept of 21.0% of its reconstructions (v3: 9.3%) -- the
pink subjects come back pink and the purple cat purple (v3: orange, teal).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from booth.mini.check import (
    MiniClip,
    colour_error,
    concept_accuracy,
    split_records,
    split_renders,
    style_accuracy,
    vae_psnr,
    vae_reconstructions,
)
from booth.mini.train import rotate_hue

ROOT = Path(__file__).resolve().parents[1]


def example_images() -> tuple[list[Image.Image], list[Image.Image]]:
    """All example-subject images, and one per subject for the grid."""
    every, one_each = [], []
    for subject in sorted(p for p in (ROOT / "examples").iterdir() if (p / "subject.json").is_file()):
        files = [
            subject / item["file_name"]
            for item in json.loads((subject / "subject.json").read_text())["images"]
        ]
        images = [Image.open(f).convert("RGB") for f in files]
        every += images
        one_each.append(images[0])
    return every, one_each


def hue_rotations(image: Image.Image, degrees=(60, 120, 180, 240)) -> list[Image.Image]:
    x = torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    out = []
    for d in degrees:
        y = rotate_hue(x, torch.tensor([math.radians(d)]))[0]
        out.append(Image.fromarray(((y.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)))
    return out


def zero_shot(clip: MiniClip, images: list[Image.Image], prompts) -> str:
    concept = concept_accuracy(clip, images, [p.concept for p in prompts])
    return f"concept {100 * concept:.1f}%, style {100 * style_accuracy(clip, images, prompts):.1f}%"


NOISE_LEVELS = (0.1, 0.2, 0.3)  # latent noise, in unit-variance latent stds (`vae_psnr`'s latent_noise)


def main() -> None:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vae", nargs="+", help="diffusers AutoencoderKL folders")
    parser.add_argument("--data", default="data/mini", help="booth-mini dataset (default data/mini)")
    parser.add_argument("--images", type=int, default=300, help="held-out renders (default 300)")
    parser.add_argument("--out", default="vae-colours.png", help="grid image (default vae-colours.png)")
    parser.add_argument(
        "--clip", help="mini-CLIP folder: also zero-shot concept/style on renders and reconstructions"
    )
    args = parser.parse_args()
    examples, one_each = example_images()
    shown = one_each + hue_rotations(one_each[0])
    records = split_records(Path(args.data), "test", args.images)
    test, (named, prompts) = [im for im, _ in records], split_renders(records)
    clip = MiniClip(args.clip) if args.clip else None
    if clip and named:
        print(f"{args.clip}: held-out renders ({len(named)}): {zero_shot(clip, named, prompts)}")
    rows = [shown]
    for folder in args.vae:
        vae = AutoencoderKL.from_pretrained(folder).float().eval()
        for name, images in (("held-out renders", test), ("example subjects", examples)):
            if images:
                s = vae_psnr(vae, images)
                print(
                    f"{folder}: {name} ({len(images)}): {s['all']:.2f} dB, object pixels {s['object']:.2f} dB"
                )
        print(f"{folder}: colour error of flat squares {colour_error(vae):.1f} (0-255; no colour: 70.3)")
        if test:
            noisy = [f"{vae_psnr(vae, test, latent_noise=n)['all']:.2f}" for n in NOISE_LEVELS]
            print(
                f"{folder}: held-out, latents + noise {'/'.join(map(str, NOISE_LEVELS))} std: {' / '.join(noisy)} dB"
            )
        if clip and named:
            print(
                f"{folder}: its reconstructions: {zero_shot(clip, vae_reconstructions(vae, named), prompts)}"
            )
        rows.append(vae_reconstructions(vae, shown))
    side = shown[0].width
    grid = Image.new("RGB", (side * len(shown), side * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * side, r * side))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(args.out)
    print(f"grid: {args.out} (top: inputs; then one row per VAE)")


if __name__ == "__main__":
    main()
