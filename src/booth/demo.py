"""``booth demo``: the whole path on a laptop CPU in a few minutes.

1. subject   an example subject (5 images with captions) from ``examples/``
2. classes   class images "a {class}" from the base model (cached), for prior preservation
3. train     DreamBooth-LoRA with prior preservation on booth-mini, captions "a ... sks {class} ..."
4. generate  the subject in new contexts (backgrounds, positions, styles), the same prompts with the plain class
             noun on the base model, and "a {class}" before / after (language drift)
5. score     mini CLIP-I (subject fidelity), programmatic background / position checks and mini-CLIP style
             (prompt fidelity), per-seed class-image similarity (drift)
6. report    ``report/index.html`` with the grids, charts, the loss curve and the numbers (also ``scores.json``)

Steps 1-5 are one run of the mini benchmark (`booth.evaluate.mini_bench.run_subject`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from booth.errors import BoothError
from booth.evaluate.mini_bench import BenchSettings, find_subject, run_subject

DEFAULT_SUBJECT = "poodle"


@dataclass
class DemoConfig:
    subject: str = DEFAULT_SUBJECT  # an example name or a folder with subject.json
    out: Path = Path("runs/demo")
    model: str | None = None
    steps: int = 250
    num_class_images: int = 16
    seeds: int = 4
    sample_steps: int = 20
    overwrite: bool = False
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(cfg: DemoConfig) -> Path:
    """Run the demo; returns the report's index.html."""
    started = time.monotonic()
    out = Path(cfg.out)
    subject_dir = find_subject(cfg.subject)
    if out.exists() and any(out.iterdir()):
        if not (out / "demo.json").exists():
            raise BoothError(
                f"--out {out} exists, is not empty and is not a booth demo; choose another folder"
            )
        if not cfg.overwrite:
            raise BoothError(f"{out} holds a demo already; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "demo.json").write_text(json.dumps({"subject": str(subject_dir)}) + "\n")
    settings = BenchSettings(
        steps=cfg.steps,
        num_class_images=cfg.num_class_images,
        seeds=cfg.seeds,
        sample_steps=cfg.sample_steps,
        model=cfg.model,
        progress=cfg.progress,
    )
    run = run_subject("lora", True, subject_dir, out, settings)
    cfg.timings["train (incl. class images)"] = run.train_seconds
    cfg.timings["generate and score"] = time.monotonic() - started - run.train_seconds
    cfg.timings["total"] = time.monotonic() - started
    report_dir = out / "report"
    report_dir.mkdir()
    index = write_report(report_dir, cfg, settings, run)
    summary = {
        "scores": run.scores,
        "timings_s": {k: round(v, 1) for k, v in cfg.timings.items()},
        "files": {k: str(v) for k, v in run.train_result.files.items()},
        "file_mb": run.file_mb,
        "report": str(index),
    }
    (out / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    return index


def write_report(folder: Path, cfg: DemoConfig, settings: BenchSettings, run) -> Path:
    from booth.evaluate.report import Report, bar_chart
    from booth.generate.grid import annotated_grid, image_grid

    def save(image, name):
        image.save(folder / name)
        return name

    def big(im, k=3):  # nearest-neighbour upscaling keeps 64 px images crisp
        return im.resize((im.width * k, im.height * k), 0)

    sc, images = run.scores, run.images
    report = Report(f"booth demo: {run.subject}")
    report.text(
        f"DreamBooth-LoRA (rank {settings.rank}, {settings.steps} steps, batch {settings.batch_size}, "
        f"prior preservation with {settings.num_class_images} class images) on booth-mini; "
        f"{settings.seeds} seeds per prompt; {cfg.timings['total']:.0f} s in all on this machine."
    )
    report.heading("The subject")
    report.image(save(big(image_grid(images["references"], rows=1)), "subject.png"), "training images")
    report.heading("New contexts: personalized (left) and the base model with the class noun (right)")
    rows = [[big(im, 2) for im in t + b] for t, b in zip(images["tuned"], images["base"])]
    report.image(
        save(annotated_grid(rows, run.prompts, []), "contexts.png"),
        f"left {settings.seeds}: personalized; right {settings.seeds}: base model",
    )
    report.heading("Scores")
    keys = ["background", "position", "style", "all"]
    pf, bpf = sc["prompt_fidelity"], sc["base_prompt_fidelity"]
    report.table(
        ["model", "subject fidelity (mini CLIP-I)", *[f"prompt fidelity: {k}" for k in keys]],
        [
            ["personalized", sc["subject_fidelity"], *[pf.get(k, float("nan")) for k in keys]],
            [
                "base model, class noun",
                sc["base_subject_fidelity"],
                *[bpf.get(k, float("nan")) for k in keys],
            ],
            ["real subject images (ceiling)", sc["ceiling_subject_fidelity"], "", "", "", ""],
        ],
    )
    chart = bar_chart(
        folder / "scores.png",
        ["subject fidelity", *keys],
        {
            "personalized": [sc["subject_fidelity"], *[pf.get(k, 0.0) for k in keys]],
            "base model": [sc["base_subject_fidelity"], *[bpf.get(k, 0.0) for k in keys]],
        },
        "personalized vs base",
        ylim=(0, 1.05),
    )
    report.image(chart.name, "mini CLIP-I and the share of images whose context matches the prompt")
    report.heading("Language drift: 'a {class}' before (top) and after (bottom) personalization")
    report.image(save(big(image_grid(images["before"] + images["after"], rows=2)), "drift.png"))
    report.text(
        f"per-seed similarity of the class images before/after: {sc['drift_similarity']:.3f} "
        f"(1 = unchanged); their subject fidelity before {sc['class_subject_fidelity_before']:.3f}, after "
        f"{sc['class_subject_fidelity_after']:.3f}."
    )
    report.heading("Training")
    loss = run.train_result.files.get("loss_plot")
    if loss:
        shutil.copyfile(loss, folder / "loss.png")
        report.image("loss.png", "training loss (instance + prior)")
    report.table(["phase", "seconds"], [[k, round(v, 1)] for k, v in cfg.timings.items()])
    report.text(
        f"Files ({run.file_mb:.2f} MB): " + ", ".join(f"{k}: {v}" for k, v in run.train_result.files.items()),
        note=True,
    )
    return report.save(folder)


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="personalize an example subject on booth-mini and write an HTML report")
    p.add_argument(
        "--subject",
        default=DEFAULT_SUBJECT,
        help="example name (poodle, teddy-bear, backpack, teapot, black-cat) or a folder with subject.json",
    )
    p.add_argument("--out", "-o", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--model", "-m", default=None, help="base model (default booth-mini)")
    p.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    cfg = DemoConfig(
        subject=args.subject,
        out=Path(args.out),
        model=args.model,
        steps=args.steps,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    index = run_demo(cfg)
    print(f"report: {index}")
    print(f"time: {cfg.timings['total']:.0f} s")
    return 0
