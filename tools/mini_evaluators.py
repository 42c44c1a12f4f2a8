"""One model's `booth mini check` images read by several mini-CLIP evaluators: is a gate capped by the
evaluator or by the images?

    python tools/mini_evaluators.py src/booth/mini/weights/clip runs/ev/clip/final --model src/booth/mini/weights

Generates the check's concept prompts ("a {concept}", every concept) and layout prompts (--samples, --seed)
once with --model (DPM++ 2M, 20 steps, CFG 7, as the check does), then for each evaluator (a CLIPModel folder:
a shipped ``clip/`` or a run's ``clip/final``) prints the concept and style zero-shot accuracy on them and on
the test split's real renders (the ceilings). The tokenizer is the model's.

Measured 2026-12-06 (v5, seed 0): the shipped mini-CLIP reads generated concept 5.5% / style 49.0% (renders
32.0 / 58.3%); the same CLIP continued 300 steps with the style term (`ClipTrainConfig.style_weight` 1, lr
3e-4, runs/ev) reads 3.0% / 49.0% (renders 37.7 / 78.0%).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from booth.generate.engine import Engine
from booth.mini.check import (
    DEFAULT_DATA,
    CheckConfig,
    MiniClip,
    concept_accuracy,
    concept_prompts,
    generate_images,
    layout_prompts,
    split_records,
    split_renders,
    style_accuracy,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clips", nargs="+", help="mini-CLIP folders (CLIPModel) to evaluate with")
    parser.add_argument("--model", default="src/booth/mini/weights", help="pipeline that draws the images")
    parser.add_argument("--data", default=DEFAULT_DATA, help="dataset with a test split (the real renders)")
    parser.add_argument("--samples", type=int, default=100, help="layout prompts (the style gate's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for folder in args.clips:
        if not (Path(folder) / "config.json").is_file():
            parser.error(f"{folder} is not a CLIPModel folder (no config.json)")
    config = CheckConfig(samples=args.samples, seed=args.seed)
    c_prompts, l_prompts = concept_prompts(config), layout_prompts(config)
    engine = Engine.from_model(args.model)
    c_images = generate_images(engine, c_prompts, config)
    l_images = generate_images(engine, l_prompts, config)
    t_images, t_prompts = split_renders(split_records(Path(args.data), "test", 300))
    print("| evaluator | generated concept | generated style | renders concept | renders style |")
    print("|---|---|---|---|---|")
    for folder in args.clips:
        clip = MiniClip(folder, Path(args.model) / "tokenizer")
        row = (
            concept_accuracy(clip, c_images, [p.concept for p in c_prompts]),
            style_accuracy(clip, l_images, l_prompts),
            concept_accuracy(clip, t_images, [p.concept for p in t_prompts]),
            style_accuracy(clip, t_images, t_prompts),
        )
        print(f"| {folder} | " + " | ".join(f"{100 * v:.1f}%" for v in row) + " |")


if __name__ == "__main__":
    main()
