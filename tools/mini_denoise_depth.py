"""At which noise level does a booth-mini pipeline lose the concept and the style of what it draws?

    python tools/mini_denoise_depth.py MODEL [MODEL ...] --n 150 --out depth.png

Each held-out render of the test split (its exact caption) goes through image-to-image at rising strength:
noised to the timestep that strength starts from, then denoised by the pipeline (DPM++ 2M, 20 steps, CFG 7,
seeds 1000 on). Strength 0 is the autoencoder's round trip alone, 1 a generation from pure noise (the
caption alone). The mini-CLIP (the first model's clip/ unless --clip) reads the concept ("a {concept}",
over every base concept) and the style of each output; a denoiser that only sharpens what the noisy latents
still show keeps the round trip's numbers at low strength. --out saves a grid: the renders, then a row per
strength (first model).

Measured 2026-12-07 (v5, the shipped weights; docs/mini-model.md, "After v5, part 4"): concept 32.7% on the
150 renders, 23.3% after the autoencoder's round trip, 19.3% from strength 0.05, 10.7% from 0.3: half the
concept is gone from a start at t = 300 (SNR 1.4), where the noisy latents still tell the concept apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_STRENGTHS = "0,0.05,0.3,0.5,0.7,1.0"


def depth(model: str, images, prompts, strengths, clip, batch: int = 25) -> tuple[dict, dict]:
    """{strength: (concept, style)} of `model` on the renders, and {strength: outputs}."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from booth.mini.check import concept_accuracy, style_accuracy, vae_reconstructions

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model, safety_checker=None, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scores, outputs = {}, {}
    for strength in strengths:
        out = []
        for i in range(0, len(images), batch):
            chunk = slice(i, i + batch)
            if strength == 0:
                out += vae_reconstructions(pipe.vae, images[chunk])
                continue
            seeds = [torch.Generator().manual_seed(1000 + j) for j in range(i, min(i + batch, len(images)))]
            out += pipe(
                [p.text for p in prompts[chunk]],
                image=images[chunk],
                strength=strength,
                num_inference_steps=20,
                guidance_scale=7.0,
                generator=seeds,
            ).images
        concept = concept_accuracy(clip, out, [p.concept for p in prompts])
        scores[strength] = (concept, style_accuracy(clip, out, prompts))
        outputs[strength] = out
        print(
            f"{model}: strength {strength}: concept {100 * concept:.1f}%  style {100 * scores[strength][1]:.1f}%"
        )
    return scores, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="booth-mini pipeline folders")
    parser.add_argument("--data", default="data/mini", help="dataset with a test split")
    parser.add_argument("--clip", help="mini-CLIP evaluator (default: the first model's clip/)")
    parser.add_argument("--n", type=int, default=150, help="test renders (default 150)")
    parser.add_argument("--strengths", default=DEFAULT_STRENGTHS, help=f"default {DEFAULT_STRENGTHS}")
    parser.add_argument("--out", help="grid PNG of the first model")
    parser.add_argument("--json", help="write the table as JSON")
    args = parser.parse_args()
    try:
        strengths = [float(s) for s in args.strengths.split(",")]
    except ValueError:
        sys.exit(f"error: --strengths takes comma-separated numbers, not {args.strengths!r}")
    if any(not 0 <= s <= 1 for s in strengths):
        sys.exit("error: strengths lie in [0, 1]")
    from booth.generate.grid import image_grid
    from booth.mini.check import MiniClip, concept_accuracy, split_records, split_renders, style_accuracy

    images, prompts = split_renders(split_records(Path(args.data), "test", args.n))
    if not images:
        sys.exit(f"error: no test split in {args.data} (build it with booth mini dataset)")
    for model in args.models:
        if not (Path(model) / "model_index.json").is_file():
            sys.exit(f"error: {model} is not a diffusers pipeline folder")
    clip = MiniClip(args.clip or Path(args.models[0]) / "clip")
    real = (
        concept_accuracy(clip, images, [p.concept for p in prompts]),
        style_accuracy(clip, images, prompts),
    )
    print(f"{len(images)} test renders: concept {100 * real[0]:.1f}%  style {100 * real[1]:.1f}%")
    table = {"renders": len(images), "real": real, "models": {}}
    for k, model in enumerate(args.models):
        scores, outputs = depth(model, images, prompts, strengths, clip)
        table["models"][model] = {str(s): v for s, v in scores.items()}
        if k == 0 and args.out:
            rows = [images[:12]] + [outputs[s][:12] for s in strengths]
            image_grid([im for row in rows for im in row], rows=len(rows)).save(args.out)
    print("| strength | " + " | ".join(f"{m}: concept / style" for m in args.models) + " |")
    print("|---|" + "---|" * len(args.models))
    for s in strengths:
        cells = [table["models"][m][str(s)] for m in args.models]
        print(f"| {s} | " + " | ".join(f"{100 * c:.1f} / {100 * st:.1f}%" for c, st in cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
