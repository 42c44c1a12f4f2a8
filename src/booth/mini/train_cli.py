"""Command-line entry points for training booth-mini: ``booth mini train`` and ``booth mini export``.

`add_train_commands` registers both on the subparsers of the ``booth mini`` group; each sets ``func`` to a
``cmd_*(args) -> int``. The full model trains in chunks: run the same command again and it resumes where the
last call stopped, until every stage is done; then it exports the pipeline (default: booth's bundled model
folder, `booth.models.loading.default_model_path()`)::

    booth mini train --minutes 30      # repeat until it prints "exported"; about 2 h in all on 2 CPU cores
    booth mini train --reuse booth-mini --stage unet --work runs/u --export runs/u-export
                                       # the bundled mini-CLIP and autoencoder, a new UNet

A work folder remembers its recipe (config.json, written by its first call): later calls without ``--preset``
or ``--config`` go on with it. ``--config FILE`` trains a recipe from JSON (another run's config.json, or a
preset's `TrainConfig.to_json` with some values changed) without editing the presets. To look at a run
mid-way, ``booth mini export --checkpoint --work DIR --out DIR`` writes a pipeline of its latest UNet checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from booth.errors import BoothError
from booth.mini.train import (
    PRESETS,
    STAGES,
    StageReport,
    TrainConfig,
    adopt_stages,
    check_prerequisites,
    is_finished,
    pinned_run,
    preset,
    read_run_config,
    train_all,
    train_stage,
)


def _default_export() -> Path:
    from booth.models.loading import default_model_path

    return default_model_path()


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``booth mini train``."""
    parser.add_argument(
        "--data", default="data/mini", help="dataset folder, built if missing (default data/mini)"
    )
    parser.add_argument("--work", default="runs/mini", help="checkpoints and logs (default runs/mini)")
    parser.add_argument(
        "--stage", default="all", choices=(*STAGES, "all"), help="stage to train (default all)"
    )
    recipe = parser.add_mutually_exclusive_group()
    recipe.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="configuration (default: the work folder's own, else full)",
    )
    recipe.add_argument("--config", help="configuration from a JSON file (e.g. another run's config.json)")
    parser.add_argument(
        "--minutes", type=float, help="stop after this many minutes (checkpointed; rerun to resume)"
    )
    parser.add_argument("--steps", type=int, help="stop after this many steps in this call")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--seed", type=int, help="training seed (default: the work folder's own, else 0)")
    parser.add_argument(
        "--export",
        help="pipeline folder written when all stages are done (default: bundled model; a --stage call "
        "exports only when this is given)",
    )
    parser.add_argument(
        "--reuse",
        metavar="PIPELINE",
        help="take the clip, vae and decoder stages from a booth-mini pipeline folder (booth-mini: the bundled "
        "one) and train the UNet alone",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the CLIP towers, the UNet and its text encoder (for a GPU; on a 2-core CPU about "
        "a minute more at a stage's start for 1.04x a step)",
    )
    parser.add_argument("--no-export", action="store_true", help="do not export when all stages are done")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def ensure_dataset(data: Path, config: TrainConfig, progress: bool) -> None:
    """Build the dataset `config` trains on into `data` unless a booth-mini dataset is there already."""
    if (data / "train" / "metadata.jsonl").is_file():
        return
    if data.exists() and any(data.iterdir()):
        raise BoothError(f"{data} exists but is not a booth-mini dataset (no train/metadata.jsonl)")
    from booth.mini.dataset import build_dataset

    print(f"building the booth-mini dataset in {data} ({config.dataset_images} training images)")
    build_dataset(
        data,
        config.dataset_images,
        n_test=config.dataset_test,
        n_novel=config.dataset_novel,
        n_pairs=config.dataset_pairs,
        progress=progress,
        overwrite=data.exists(),
    )


def _describe(report: StageReport) -> str:
    state = "done" if report.finished else "stopped; rerun the same command to resume"
    ran = f", {report.ran_steps} steps in {report.seconds / 60:.1f} min" if report.ran_steps else ""
    return f"{report.stage}: step {report.step}/{report.total_steps}{ran} ({state})"


def recipe(args: argparse.Namespace) -> tuple[TrainConfig, int]:
    """The configuration and seed to train: --config, --preset, else the work folder's pinned run, else full."""
    if args.config:
        config, seed = read_run_config(args.config)
    elif args.preset:
        config, seed = preset(args.preset), 0
    else:
        config, seed = pinned_run(args.work) or (preset("full"), 0)
    return config, seed if args.seed is None else args.seed


def cmd_train(args: argparse.Namespace) -> int:
    """Train (a chunk of) booth-mini from parsed flags; export when every stage is done."""
    config, seed = recipe(args)
    data, work = Path(args.data), Path(args.work)
    if args.reuse:
        pipeline = _default_export() if args.reuse == "booth-mini" else Path(args.reuse)
        adopted = adopt_stages(work, pipeline, config)
        if adopted:
            print(f"{', '.join(adopted)}: taken from {pipeline}")
    if args.stage != "all":  # before building a missing dataset (40 s) for a stage that cannot start
        check_prerequisites(work, args.stage, config)
    if args.export and not args.no_export:  # before hours of training, not after
        from booth.mini.export import check_replaceable

        check_replaceable(Path(args.export))
    ensure_dataset(data, config, not args.no_progress)
    options = dict(
        minutes=args.minutes,
        steps=args.steps,
        device=args.device,
        seed=seed,
        progress=not args.no_progress,
        compile_models=args.compile,
    )
    if args.stage == "all":
        reports = train_all(data, work, config, **options)
    else:
        reports = [train_stage(args.stage, data, work, config, **options)]
    for report in reports:
        print(_describe(report))
    if args.no_export or not all(is_finished(work, stage) for stage in config.stages):
        return 0
    if args.stage != "all" and not args.export:
        # one stage retrained beside finished others need not fit them (a new VAE under an old UNet): never
        # replace the bundled weights by default from such a call
        print(f"every stage of {work} is done; export with: booth mini export --work {work} [--out DIR]")
        return 0
    from booth.mini.export import export_pipeline

    out = export_pipeline(work, args.export or _default_export())
    print(f"exported booth-mini to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a finished run (or, with --checkpoint, the UNet stage's latest checkpoint) from parsed flags."""
    from booth.mini.export import export_checkpoint, export_pipeline

    if args.checkpoint:
        if not args.out:
            raise BoothError(
                "--checkpoint needs --out: a mid-run checkpoint never replaces the bundled weights"
            )
        out, step = export_checkpoint(args.work, args.out)
        print(f"exported the UNet checkpoint of {args.work} at step {step} to {out}")
        return 0
    print(f"exported booth-mini to {export_pipeline(args.work, args.out or _default_export())}")
    return 0


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``export`` on the subparsers of the ``booth mini`` group."""
    train = subparsers.add_parser(
        "train",
        help="train booth-mini (CLIP, VAE, its decoder, UNet), resumably, and export it",
        description="Train booth-mini's stages in order; rerun the same command to resume after --minutes.",
    )
    add_train_flags(train)
    train.set_defaults(func=cmd_train)
    export = subparsers.add_parser("export", help="export a finished booth-mini run as a diffusers folder")
    export.add_argument("--work", default="runs/mini", help="the training folder (default runs/mini)")
    export.add_argument("--out", "-o", help="output folder (default: the bundled model folder)")
    export.add_argument(
        "--checkpoint",
        action="store_true",
        help="export the UNet stage's latest checkpoint of a run still training (needs --out), to look at it",
    )
    export.set_defaults(func=cmd_export)
