"""booth-mini training with and without ``--compile``: seconds a step of each stage, side by side.

For each stage of the `full` recipe it trains chunks of a few steps eagerly and compiled in turn
(`train_stage(..., compile_models=True)`, the loop `booth mini train --compile` runs; two work folders on the
same small dataset, each resuming its own chunks), and prints the median seconds a step of each (each chunk's
first steps left out: the first compiled one is where torch.compile builds its kernels, printed apart; later
chunks find them in inductor's cache), and the ratio eager / compiled. The UNet
stage takes the bundled booth-mini's CLIP and VAE (`--reuse`), as a UNet-only run does.

`--candidates` also times what the stages could compile instead: the VAE's encoder and decoder (it compiles
nothing), the UNet stage's UNet alone (it compiles the text encoder too).

    python benchmarks/mini_train_compile.py                     # clip, vae, unet; 3 x 8 steps each way
    python benchmarks/mini_train_compile.py --stages clip,unet --rounds 4 --candidates
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from booth.mini.train import PRESETS, adopt_stages, read_log, train_stage
from booth.mini.train.autoencoder import VaeTask
from booth.mini.train.unet import UNetTask

SKIPPED = 2  # steps left out of each median: the first (compiling, warming oneDNN) and one more


def _candidate_targets() -> dict[str, tuple[type, object]]:
    """What a stage could compile beyond its `compile_targets`: {name: (task class, replacement method)}."""
    return {
        "vae (encoder + decoder)": (
            VaeTask,
            lambda task: {"encoder": task.model.encoder, "decoder": task.model.decoder},
        ),
        "unet (the UNet alone)": (UNetTask, lambda task: {"unet": task.model.unet}),
    }


def time_chunks(stage: str, data: Path, work: Path, steps: int, compiled: bool) -> tuple[list[float], float]:
    """One more chunk of `steps` in `work` (made on the first call): the seconds of its steps after the first
    `SKIPPED`, and its first step's seconds."""
    config = PRESETS["full"]
    if stage == "unet" and not work.exists():
        from booth.models.loading import default_model_path

        adopt_stages(work, default_model_path(), config)
    before = len([r for r in read_log(work, stage) if "loss" in r]) if work.exists() else 0
    train_stage(stage, data, work, config, steps=steps, progress=False, compile_models=compiled)
    seconds = [r["seconds"] for r in read_log(work, stage) if "loss" in r][before:]
    return seconds[SKIPPED:], seconds[0]


def compare(stage: str, label: str, data: Path, root: Path, steps: int, rounds: int) -> None:
    """Eager and compiled chunks in turn, `rounds` of each, in two work folders; one table row."""
    times: dict[bool, list[float]] = {False: [], True: []}
    first: dict[bool, float] = {}
    for _ in range(rounds):
        for compiled in (False, True):
            kept, start = time_chunks(stage, data, root / f"{label}-{compiled}", steps, compiled)
            times[compiled] += kept
            first.setdefault(compiled, start)
    eager, compiled = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"| {label} | {eager:.3f} | {compiled:.3f} | {eager / compiled:.2f}x | "
        f"{first[False]:.1f} / {first[True]:.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="clip,vae,unet", help="comma-separated (default clip,vae,unet)")
    parser.add_argument("--steps", type=int, default=8, help="steps a chunk (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="chunks each way, in turn (default 3)")
    parser.add_argument(
        "--images", type=int, default=512, help="training images of the dataset (default 512)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--candidates", action="store_true", help="also time what the stages do not compile")
    args = parser.parse_args()
    if args.steps <= SKIPPED + 1:
        parser.error(f"--steps must be over {SKIPPED + 1}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from booth.mini.dataset import build_dataset

    with tempfile.TemporaryDirectory(prefix="booth-compile-") as tmp:
        root = Path(tmp)
        data = root / "data"
        build_dataset(data, n_images=args.images, seed=0, n_test=8, n_novel=4, n_pairs=64, progress=False)
        print(
            f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; {args.rounds} chunks of "
            f"{args.steps} steps each way, in turn; medians of the steps after each chunk's first {SKIPPED}"
        )
        print(
            "| stage | eager s/step | compiled s/step | eager / compiled | first step s (eager / compiled) |"
        )
        print("|---|---|---|---|---|")
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        for stage in stages:
            compare(stage, stage, data, root, args.steps, args.rounds)
        if args.candidates:
            for label, (task, targets) in _candidate_targets().items():
                stage = label.split()[0]
                if stage not in stages:
                    continue
                original = task.compile_targets
                task.compile_targets = targets
                try:
                    compare(stage, label, data, root, args.steps, args.rounds)
                finally:
                    task.compile_targets = original


if __name__ == "__main__":
    main()
