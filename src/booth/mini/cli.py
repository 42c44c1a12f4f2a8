"""Command-line entry points for booth-mini's data: ``booth mini dataset`` and ``booth mini examples``.

`add_data_commands` registers both on an argparse subparsers object (the ``mini`` group of the main CLI);
each sets ``func`` to a ``cmd_*(args) -> int`` like the other booth commands. `main_dataset` runs the
dataset command standalone (``python -m booth.mini.cli --out data/mini --n 20000``).
"""

from __future__ import annotations

import argparse
import sys

from booth.errors import BoothError
from booth.mini.dataset import build_dataset, write_example_subjects


def add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``booth mini dataset``."""
    parser.add_argument("--out", "-o", default="data/mini", help="output folder (default ./data/mini)")
    parser.add_argument("--n", type=int, default=20000, help="training images (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0): same seed, same bytes")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--n-test", type=int, default=300, help="held-out test images (default 300)")
    parser.add_argument(
        "--n-novel", type=int, default=100, help="held-out Fluent subject images (default 100)"
    )
    parser.add_argument(
        "--n-pairs",
        type=int,
        default=4000,
        help="two-object images in a 'pairs' split, for the UNet stage (default 4000; 0: none)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_examples_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``booth mini examples``."""
    parser.add_argument("--out", "-o", default="examples", help="output folder (default ./examples)")
    parser.add_argument("--images", type=int, default=5, help="images per subject, 1..5 (default 5)")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (default 64)")


def cmd_dataset(args: argparse.Namespace) -> int:
    """Build the dataset from parsed flags and print where it went."""
    manifest = build_dataset(
        args.out,
        args.n,
        seed=args.seed,
        resolution=args.resolution,
        n_test=args.n_test,
        n_novel=args.n_novel,
        n_pairs=args.n_pairs,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    counts = ", ".join(f"{name} {count}" for name, count in manifest.splits.items())
    print(
        f"booth-mini dataset in {manifest.root}: {counts} images ({len(manifest.data['concepts'])} concepts)"
    )
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    """Write the example subjects from parsed flags and print their folders."""
    for folder in write_example_subjects(args.out, n_images=args.images, resolution=args.resolution):
        print(folder)
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``dataset`` and ``examples`` on the subparsers of the ``booth mini`` group."""
    dataset = subparsers.add_parser(
        "dataset",
        help="build the booth-mini training set (seeded, reproducible)",
        description="Render emoji concepts x styles x backgrounds x positions x sizes with exact captions.",
    )
    add_dataset_flags(dataset)
    dataset.set_defaults(func=cmd_dataset)
    examples = subparsers.add_parser(
        "examples", help="write the held-out Fluent example subjects (4-5 images each)"
    )
    add_examples_flags(examples)
    examples.set_defaults(func=cmd_examples)


def main_dataset(argv: list[str] | None = None) -> int:
    """``booth mini dataset`` as a standalone program; returns the exit code."""
    parser = argparse.ArgumentParser(prog="booth mini dataset", description="Build the booth-mini dataset.")
    add_dataset_flags(parser)
    try:
        return cmd_dataset(parser.parse_args(argv))
    except BoothError as exc:
        print(f"booth: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main_dataset())
