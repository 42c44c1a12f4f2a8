"""Does booth-mini's UNet draw a concept's shape when it sees that concept far more often? A training set of a
few concepts, and the concept accuracy of a model on them.

    python tools/mini_concept_subset.py make data/sub10 --concepts 10 --seed 10
    booth mini train --data data/sub10 --work runs/s10 --config RECIPE.json --stage unet --export runs/s10-export
    python tools/mini_concept_subset.py score runs/s10-export data/sub10 --out s10.png

``make`` writes a dataset folder whose train split holds only the images of the chosen concepts (--concepts K
drawn with --seed, or --names; --one keeps a single large centred image), linked to --data's files; its other
splits are --data's. Train a UNet on it with a work folder holding finished clip, vae (and decoder) stages
(e.g. hard links of another run's) and a recipe whose ``unet.init`` is a pipeline or checkpoint and whose
``unet.pairs`` is false. ``score`` generates --per images of "a {concept}" for each chosen concept (seeds 1000
on, DPM++ 2M, 20 steps, CFG 7) and prints the mini-CLIP's zero-shot top-1 over every concept and over the
chosen ones, on them and on real renders of the same prompts (large, centred, on white); --out saves a grid,
each concept's generated row above its renders.

Measured 2026-12-06 (v5 = the shipped weights; docs/mini-model.md, "After v5, part 2"): on 10 concepts (seed
10) v5 scores 11% over all concepts and 58% among the 10 (renders 16% / 66%); its UNet continued 1,000 x 32
steps on those concepts alone (3,200 more views of each, about 5 times its whole training's 600) 17% / 73%,
still blobs by eye; on one image (--one, tiger) 250 steps draw that image back exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from booth.generate.grid import image_grid
from booth.mini.check import (
    DEFAULT_DATA,
    CheckConfig,
    MiniClip,
    Prompt,
    concept_accuracy,
    generate_images,
    real_renders,
)
from booth.mini.compose import caption
from booth.mini.concepts import BASE_CONCEPTS

CHOSEN = "chosen.json"


def _link(source: Path, target: Path) -> None:
    if not target.exists():
        os.symlink(source.resolve(), target)


def make(args: argparse.Namespace) -> None:
    source, out = Path(args.data), Path(args.out)
    meta = source / "train" / "metadata.jsonl"
    if not meta.is_file():
        sys.exit(f"error: {source} has no train split (build it with booth mini dataset)")
    if out.exists():
        sys.exit(f"error: {out} exists; give a new folder")
    records = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    names = [c["name"] for c in json.loads((source / "manifest.json").read_text())["concepts"]]  # its order
    if args.names:
        chosen = sorted(args.names.split(","))
        unknown = set(chosen) - set(names)
        if unknown:
            sys.exit(f"error: not concepts of {source}: {', '.join(sorted(unknown))}")
    else:
        chosen = sorted(random.Random(args.seed).sample(names, min(args.concepts, len(names))))
    kept = [r for r in records if r["concept"] in chosen]
    if args.one:
        kept = [r for r in kept if r["size"] == "large" and r["position"] == "centre"][:1]
    if not kept:
        sys.exit("error: no training image matches")
    (out / "train").mkdir(parents=True)
    for r in kept:
        _link(source / "train" / r["file_name"], out / "train" / r["file_name"])
    (out / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    for split in ("test", "novel", "pairs"):
        if (source / split).is_dir():
            _link(source / split, out / split)
    (out / "manifest.json").write_text((source / "manifest.json").read_text())
    (out / CHOSEN).write_text(json.dumps(sorted({r["concept"] for r in kept})))
    print(f"{out}: {len(kept)} training images of {', '.join(chosen)}")


def score(args: argparse.Namespace) -> None:
    from booth.generate.engine import Engine

    chosen_file = Path(args.subset) / CHOSEN
    if not chosen_file.is_file():
        sys.exit(f"error: {args.subset} was not made by this tool (no {CHOSEN})")
    by_name = {c.name: c for c in BASE_CONCEPTS}
    concepts = [by_name[name] for name in json.loads(chosen_file.read_text())]
    prompts = [Prompt(caption(c.name, None, None), 1000 + k, c) for c in concepts for k in range(args.per)]
    truth = [p.concept for p in prompts]
    clip = MiniClip(Path(args.model) / "clip", Path(args.model) / "tokenizer")
    images = generate_images(Engine.from_model(args.model), prompts, CheckConfig())
    renders = real_renders(prompts, CheckConfig())
    for label, shown in (("generated", images), ("real renders", renders)):
        if shown is None:
            continue
        every = concept_accuracy(clip, shown, truth)
        among = concept_accuracy(clip, shown, truth, concepts)
        print(
            f"{label}: top-1 over all {len(BASE_CONCEPTS)} concepts {100 * every:.1f}%, "
            f"among the {len(concepts)} chosen {100 * among:.1f}%"
        )
    if args.out:  # a row of each concept's images, with its renders' row below
        cells = []
        for start in range(0, len(images), args.per):
            cells += images[start : start + args.per] + (renders or [])[start : start + args.per]
        image_grid(cells, cols=args.per).save(args.out)
        print(f"grid: {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="a dataset folder of a few concepts")
    m.add_argument("out")
    m.add_argument("--data", default=DEFAULT_DATA)
    m.add_argument("--concepts", type=int, default=10, help="how many concepts, drawn with --seed")
    m.add_argument("--seed", type=int, default=10)
    m.add_argument("--names", help="comma-separated concept names instead of a draw")
    m.add_argument("--one", action="store_true", help="keep a single large centred image")
    m.set_defaults(run=make)
    s = sub.add_parser("score", help="concept accuracy of a pipeline on a subset's concepts")
    s.add_argument("model", help="pipeline folder (its clip/ is the evaluator)")
    s.add_argument("subset", help="a folder `make` wrote")
    s.add_argument("--per", type=int, default=10, help="images per concept")
    s.add_argument("--out", help="grid PNG")
    s.set_defaults(run=score)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
