"""Retrain booth-mini's UNet on a lent GPU machine and bring it back: the run prepared as one command.

The GPU machine (the `device` tool) has torch and transformers but not diffusers, nor the emoji art sources
(over 130 MB: more than its 64 MiB carry), and it is lent for 15 minutes in all. So:

    python tools/gpu_unet.py prepare --clip runs/clipB/clip/final   # here: .carry/ = the diffusers wheel,
                                                                    # the render cache and that mini-CLIP
    # device run, carry [".carry"], timeout 600 (one command, about 7 minutes):
    #   python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl &&
    #   PYTHONPATH=src:/tmp/site python3 tools/gpu_unet.py run --minutes 4 --compile --out $OUT
    python tools/gpu_unet.py assemble FILES_AT --out runs/gpu-export    # here: a pipeline folder
    booth mini check --model runs/gpu-export --data data/mini

``prepare --clip PATH`` (optional) carries a newly trained mini-CLIP as well (a clip stage's final/ folder
or a pipeline's clip/), written in fp16 as an export writes clip/, into .carry/clip; it stops when .carry and
the repository's files together pass the device's 64 MiB carry.

``run`` builds the dataset from the carried render cache (`booth.mini.render.source_version`: the cache
stands in for missing sources; same bytes), takes the bundled mini-CLIP and autoencoder (`--reuse`), times
--probe steps of the recipe (with --compile also under torch.compile, kept only when faster and when it
compiles at all), then trains the UNet stage for as many steps as fit in --minutes (so the cosine schedule
ends where the time does) and exports. Why --compile: a 6 M-parameter UNet on 16 x 16 latents is far too
small to keep a GPU's arithmetic busy, so its eager steps wait on Python and kernel launches, which compiled
graphs cut; on a 2-core CPU, where the arithmetic is the cost, it gained 4%
(`benchmarks/mini_train_compile.py`). Its gain on a GPU is not measured: the probe measures it.

The recipe is the `full` preset's UNet stage with its batch raised to --batch (default 128), its learning
rate scaled with it up to 4x (the text encoder's kept), its warm-up and EMA horizon kept in images. A larger
batch does not make up for fewer steps in full: on 10 concepts 750 x 128 drew less than 3,000 x 32 of the
same images (70 vs 77% among them), so a GPU run wants as many steps as its minutes give. Into --out go
three files: the UNet and text encoder weights and meta.tar (the export's configs, tokenizer, scheduler,
training.json, README, the stage's log). With a carried CLIP (.carry/clip, or `run --clip PATH`) the run
reuses a copy of the --reuse pipeline whose clip/ is that CLIP: the run adopts it, the UNet stage's text
encoder starts from its text tower, and meta.tar brings its clip/ back.
``assemble`` lays them over a copy of the bundled pipeline (its VAE is the one the run took; its CLIP too,
unless meta.tar brings the run's clip/).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".carry"
STYLES = ("noto", "openmoji", "twemoji", "fluent")  # the base styles and the novel split's
# Measured on 10 concepts, 96,000 images each (docs/mini-model.md, "After v5, part 6"): 3,000 x 32 at lr 3e-4
# 77% among the 10; 750 x 128 at lr x 4 (1.2e-3) 70%, at lr x 2 (its square root) 57%. Linear scaling,
# then, up to the 4x measured; past it the lr stays (untested).
LR_SCALE_LIMIT = 4.0
CARRY_LIMIT = 64 * 2**20  # the device tool's carry: the working tree's files and the carried paths
WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


def prepare(args: argparse.Namespace) -> None:
    """The diffusers wheel this machine runs, the masters of the styles a dataset needs and (--clip) a
    mini-CLIP, into .carry/."""
    from importlib.metadata import version

    import diffusers

    from booth.mini.render import renders_dir

    clip = clip_folder(args.clip) if args.clip else None  # checked before .carry is wiped
    wheels = CARRY / "wheels"
    shutil.rmtree(CARRY, ignore_errors=True)
    wheels.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
        + [f"diffusers=={diffusers.__version__}", f"importlib_metadata=={version('importlib_metadata')}"],
        check=True,
    )
    cache = renders_dir()
    for style in STYLES:
        if not (cache / style).is_dir():
            sys.exit(f"no {style} masters in {cache}: build the dataset here first (booth mini dataset)")
        shutil.copytree(cache / style, renders_dir(CARRY / "booth-data") / style)
    if clip:
        carry_clip(clip, CARRY / "clip")
    size = _bytes(CARRY)
    print(f"{CARRY}: {size / 1e6:.1f} MB to carry")
    check_carry(CARRY)


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def clip_folder(path: str) -> Path:
    """`path` as the CLIP folder to carry (a clip stage's final/, or a pipeline's clip/); exit when it is
    not one."""
    if not (Path(path) / "config.json").is_file():
        sys.exit(f"{path} is not a CLIP folder (no config.json)")
    return Path(path)


def carry_clip(source: Path, folder: Path) -> Path:
    """The CLIP folder `source` as an export writes a pipeline's clip/ (fp16 safetensors, config, tokenizer,
    image processor) into `folder` (replaced)."""
    from booth.mini.export import write_clip

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_clip(source, folder)
    return folder


def check_carry(carry: Path) -> None:
    """Exit unless `carry` and the repository's files that travel with it (tracked, and untracked but not
    ignored) fit the device tool's carry."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    tree = sum((REPO / n).stat().st_size for n in listed.decode().split("\0") if n and (REPO / n).is_file())
    parts = {p.name: _bytes(p) for p in sorted(carry.iterdir()) if p.is_dir()}
    if tree + sum(parts.values()) > CARRY_LIMIT:
        sizes = ", ".join(f"{name}/ {n / 2**20:.1f}" for name, n in parts.items())
        sys.exit(
            f"too big to carry: {carry} ({sizes} MiB) plus the repository's files ({tree / 2**20:.1f} MiB) "
            f"pass the device's {CARRY_LIMIT / 2**20:.0f} MiB"
        )


def _reuse_with_clip(reuse: Path, clip: Path, folder: Path) -> Path:
    """A copy of the pipeline `reuse` whose clip/ is the CLIP folder `clip` (written as an export writes it)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(reuse, folder)
    carry_clip(clip, folder / "clip")
    return folder


def gpu_recipe(preset_name: str, batch: int, steps: int):
    """The preset's UNet stage at `batch`: lr x the batch ratio up to `LR_SCALE_LIMIT`; warm-up and EMA
    horizon kept in images."""
    from booth.mini.train import preset

    config = preset(preset_name)
    unet = config.unet
    ratio = batch / unet.optim.batch_size
    optim = replace(
        unet.optim,
        batch_size=batch,
        steps=steps,
        lr=unet.optim.lr * min(ratio, LR_SCALE_LIMIT),
        warmup_steps=max(1, round(unet.optim.warmup_steps / ratio)),
    )
    ema = 1.0 - (1.0 - unet.ema_decay) * ratio
    return replace(config, name=f"{preset_name}-gpu", unet=replace(unet, optim=optim, ema_decay=ema))


def _train(data: Path, work: Path, config, reuse: Path, minutes: float | None, compiled: bool = False):
    from booth.mini.train import adopt_stages, train_stage

    adopt_stages(work, reuse, config)
    return train_stage("unet", data, work, config, minutes=minutes, progress=False, compile_models=compiled)


def _copy_latents(latents: Path | None, work: Path) -> None:
    """Start `work`'s UNet stage with another of this run's latent caches (keyed by data and VAE: the same
    latents), instead of encoding the dataset again; nothing when there is none (yet)."""
    if latents is not None and latents.is_file():
        (work / "unet").mkdir(parents=True, exist_ok=True)
        shutil.copy2(latents, work / "unet" / "latents.pt")


def _probe(data: Path, work: Path, config, reuse: Path, compiled: bool, latents: Path | None) -> float | None:
    """Median seconds a step over the second half of a probe run (past warm-up and compiling); None when
    torch.compile fails on this machine."""
    from booth.errors import BoothError
    from booth.mini.train import read_log

    _copy_latents(latents, work)
    try:
        _train(data, work, config, reuse, None, compiled)
    except BoothError as error:
        if not compiled:
            raise
        print(f"probe, compiled: {error}; training eagerly", flush=True)
        return None
    timed = [r["seconds"] for r in read_log(work, "unet") if "loss" in r]
    return statistics.median(timed[len(timed) // 2 :])


def run(args: argparse.Namespace) -> None:
    """On the GPU machine: dataset, probe, the timed UNet stage, export, three files into --out."""
    import os

    os.environ.setdefault("BOOTH_DATA_HOME", str(CARRY / "booth-data"))
    from booth.mini.export import export_checkpoint, export_pipeline
    from booth.mini.train_cli import ensure_dataset
    from booth.models.loading import default_model_path

    started = time.monotonic()
    reuse = Path(args.reuse) if args.reuse else default_model_path()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="gpu-unet-"))
    clip = clip_folder(args.clip) if args.clip else CARRY / "clip" if (CARRY / "clip").is_dir() else None
    if clip is not None:  # the run adopts this CLIP, and its UNet stage's text encoder starts from it
        reuse = _reuse_with_clip(reuse, clip, scratch / "reuse")
        print(f"mini-CLIP: {clip}", flush=True)
    data = Path(args.data) if args.data else scratch / "data"
    ensure_dataset(data, gpu_recipe(args.preset, args.batch, 1), progress=False)
    print(f"dataset ready at {time.monotonic() - started:.0f} s", flush=True)

    steps, compiled = args.steps, args.compile
    latents = scratch / "probe" / "unet" / "latents.pt"
    if steps is None:  # time the recipe here (eagerly, and compiled with --compile), then fill the minutes
        probe = gpu_recipe(args.preset, args.batch, args.probe)
        timings = {False: _probe(data, scratch / "probe", probe, reuse, False, None)}
        if args.compile:
            timings[True] = _probe(data, scratch / "probe-compiled", probe, reuse, True, latents)
        compiled = timings.get(True) is not None and timings[True] < timings[False]
        seconds = timings[compiled]
        steps = max(1, int(60 * args.minutes / seconds))
        ways = ", ".join(f"{'compiled' if c else 'eager'} {t * 1000:.1f} ms" for c, t in timings.items() if t)
        way = "compiled" if compiled else "eager"
        print(f"probe at batch {args.batch}: {ways} a step; {steps} steps, {way}", flush=True)
    config = gpu_recipe(args.preset, args.batch, steps)
    work = scratch / "run"
    _copy_latents(latents, work)
    cap = args.minutes * 1.1 + 1.0 if args.steps is None else None  # the stage's setup counts in its minutes
    report = _train(data, work, config, reuse, cap, compiled)
    print(f"unet: step {report.step}/{report.total_steps} in {report.seconds / 60:.1f} min", flush=True)
    export = scratch / "export"
    if report.finished:
        export_pipeline(work, export)
    else:
        export_checkpoint(work, export)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rel in WEIGHTS.items():
        shutil.copy2(export / rel, out / f"{name}.safetensors")
    left_out = ("vae",) if clip is not None else ("vae", "clip")  # the CLIP the run brought comes back
    with tarfile.open(out / "meta.tar", "w") as tar:
        for path in sorted(export.rglob("*")):
            rel = path.relative_to(export)
            if path.is_file() and str(rel) not in WEIGHTS.values() and rel.parts[0] not in left_out:
                tar.add(path, arcname=str(rel))
        tar.add(work / "unet" / "log.jsonl", arcname="unet-log.jsonl")
    print(f"done in {(time.monotonic() - started) / 60:.1f} min: {sorted(p.name for p in out.iterdir())}")


def assemble(args: argparse.Namespace) -> None:
    """Lay the files `run` wrote over a copy of the pipeline the run reused: a complete pipeline folder (its
    clip/ the one meta.tar brings, when it brings one)."""
    from booth.fsutil import atomic_folder
    from booth.mini.export import check_replaceable
    from booth.models.loading import default_model_path

    files, out = Path(args.files), Path(args.out)
    base = Path(args.base) if args.base else default_model_path()
    missing = [n for n in (*(f"{k}.safetensors" for k in WEIGHTS), "meta.tar") if not (files / n).is_file()]
    if missing:
        sys.exit(f"{files} lacks {', '.join(missing)}: not the output of `gpu_unet.py run`")
    check_replaceable(out)
    with atomic_folder(out) as tmp:
        shutil.copytree(base, tmp, dirs_exist_ok=True)
        with tarfile.open(files / "meta.tar") as tar:
            brings_clip = any(Path(name).parts[0] == "clip" for name in tar.getnames())
            if brings_clip:  # the run's CLIP, not the base's
                shutil.rmtree(tmp / "clip", ignore_errors=True)
            tar.extractall(tmp, filter="data")
        for name, rel in WEIGHTS.items():
            shutil.copy2(files / f"{name}.safetensors", tmp / rel)
    print(f"assembled {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here: the diffusers wheel and the render cache into .carry/")
    p.add_argument("--clip", help="also carry this mini-CLIP (a clip stage's final/ or a pipeline's clip/)")
    r = sub.add_parser("run", help="on the GPU machine: train the UNet stage for --minutes and export")
    r.add_argument("--out", required=True, help="where the three result files go ($OUT)")
    r.add_argument("--minutes", type=float, default=5.0, help="training time after the probe (default 5)")
    r.add_argument("--batch", type=int, default=128, help="UNet batch (default 128)")
    r.add_argument("--probe", type=int, default=40, help="steps timed before the run (default 40)")
    r.add_argument("--steps", type=int, help="train exactly this many steps, no probe (a dry run)")
    r.add_argument(
        "--compile",
        action="store_true",
        help="also probe the UNet stage under torch.compile and train the faster way (eager if it fails)",
    )
    r.add_argument("--preset", default="full", help="the recipe whose UNet stage runs (default full)")
    r.add_argument("--reuse", help="pipeline whose mini-CLIP and autoencoder the run takes (default bundled)")
    r.add_argument(
        "--clip",
        help="the mini-CLIP the run takes instead of --reuse's (default: .carry/clip when there is one)",
    )
    r.add_argument("--data", help="an existing dataset folder (default: built in --scratch)")
    r.add_argument("--scratch", help="work folders (default: a new temporary folder)")
    a = sub.add_parser("assemble", help="here: lay the run's files over the bundled pipeline")
    a.add_argument("files", help="the folder holding run's three files")
    a.add_argument("--out", required=True, help="the pipeline folder to write")
    a.add_argument("--base", help="the pipeline the run reused (default bundled)")
    args = parser.parse_args(argv)
    {"prepare": prepare, "run": run, "assemble": assemble}[args.command](args)


if __name__ == "__main__":
    main()
