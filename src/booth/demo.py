"""``booth demo``: the whole path on a laptop CPU in a few minutes.

1. subject   an example subject (4-5 images with captions) from ``examples/``
2. classes   class images "a {class}" from the base model (cached), for prior preservation and as the baseline
3. train     DreamBooth-LoRA with prior preservation on booth-mini, captions "a ... sks {class} ..."
4. generate  the subject in new contexts (backgrounds, positions, styles), the same prompts with the plain class
             noun on the base model, and "a {class}" before / after (language drift)
5. score     mini CLIP-I (subject fidelity), programmatic background / position checks and mini-CLIP style
             (prompt fidelity), per-seed class-image similarity (drift)
6. report    ``report/index.html`` with the grids, charts, the loss curve and the numbers (also ``scores.json``)
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from booth.errors import BoothError

IDENTIFIER = "sks"
DEFAULT_SUBJECT = "poodle"
# new contexts: (background, position, size, style); the example images never show these combinations
CONTEXTS: tuple[tuple[str | None, str | None, str | None, str | None], ...] = (
    ("red", None, None, None),
    ("green", None, None, None),
    ("purple", "top left", "small", None),
    ("pink", "bottom right", "small", None),
    ("white", None, None, "openmoji"),
    ("grey", None, None, "twemoji"),
)


@dataclass
class DemoConfig:
    subject: str = DEFAULT_SUBJECT  # an example name or a folder with subject.json
    out: Path = Path("runs/demo")
    model: str | None = None
    steps: int = 250
    rank: int = 8
    lr: float = 5e-4
    batch_size: int = 2
    num_class_images: int = 16
    seeds: int = 4
    sample_steps: int = 20
    overwrite: bool = False
    progress: bool = True
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def examples_dir() -> Path:
    """The repository's ``examples/`` (next to ``src/``), else ``./examples``."""
    import booth

    for candidate in (Path(booth.__file__).resolve().parents[2] / "examples", Path.cwd() / "examples"):
        if candidate.is_dir():
            return candidate
    raise BoothError("examples/ not found; run booth demo from the booth repository or pass --subject DIR")


def find_subject(subject: str) -> Path:
    path = Path(subject)
    if not (path / "subject.json").is_file():
        path = examples_dir() / subject
    if not (path / "subject.json").is_file():
        names = sorted(p.name for p in examples_dir().iterdir() if (p / "subject.json").is_file())
        raise BoothError(f"unknown subject {subject!r}; examples: {', '.join(names)}")
    return path


def prepare_instance_folder(subject_dir: Path, target: Path) -> tuple[str, str]:
    """Copy the subject's images with captions naming the identifier; returns (instance prompt, class noun)."""
    meta = json.loads((subject_dir / "subject.json").read_text())
    noun = meta["class_noun"]
    target.mkdir(parents=True, exist_ok=True)
    for item in meta["images"]:
        shutil.copyfile(subject_dir / item["file_name"], target / item["file_name"])
        text = re.sub(rf"\b{re.escape(noun)}\b", f"{IDENTIFIER} {noun}", item["caption"], count=1)
        (target / (Path(item["file_name"]).stem + ".txt")).write_text(text + "\n")
    return f"a {IDENTIFIER} {noun}", noun


def run_demo(cfg: DemoConfig) -> Path:
    """Run the demo; returns the report's index.html."""
    from booth.evaluate.mini import MiniEvaluator, context_prompt
    from booth.generate.engine import Engine
    from booth.generate.networks import LoraNetwork
    from booth.models.loading import load_pipeline
    from booth.prompts import ExtraNetworkRegistry
    from booth.train import DataConfig, LoraConfig, OptimConfig, PriorConfig, TrainConfig, train

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
    report_dir = out / "report"
    report_dir.mkdir()

    # 1. Subject: images with identifier captions.
    instance_prompt, noun = prepare_instance_folder(subject_dir, out / "subject")
    references = [_open(p) for p in sorted((out / "subject").glob("*.png"))]
    evaluator = MiniEvaluator(None if cfg.model is None else Path(cfg.model) / "clip")

    # 2-3. Train DreamBooth-LoRA with prior preservation (class images generated and cached by the trainer).
    mark = time.monotonic()
    config = TrainConfig(
        method="lora",
        model=cfg.model,
        out=out / "lora",
        name=f"{Path(subject_dir).name}",
        steps=cfg.steps,
        seed=cfg.seed,
        data=DataConfig(images=out / "subject", instance_prompt=instance_prompt),
        prior=PriorConfig(
            enabled=True,
            class_prompt=f"a {noun}",
            num_class_images=cfg.num_class_images,
            sample_steps=cfg.sample_steps,
        ),
        lora=LoraConfig(rank=cfg.rank),
        optim=OptimConfig(lr=cfg.lr, batch_size=cfg.batch_size),
        checkpoint_every=max(cfg.steps, 1),
    )
    result = train(config, progress=cfg.progress)
    cfg.timings["train (incl. class images)"] = time.monotonic() - mark

    # 4. Generate: new contexts with the subject (tuned) and with the class noun (base), class drift.
    mark = time.monotonic()
    loaded = load_pipeline(cfg.model)
    lora_name = config.run_name
    engine = Engine(loaded, extra_networks=ExtraNetworkRegistry([LoraNetwork([config.out])]))
    subject_prompts = [context_prompt(f"{IDENTIFIER} {noun}", b, p, s, st) for b, p, s, st in CONTEXTS]
    class_prompts = [context_prompt(noun, b, p, s, st) for b, p, s, st in CONTEXTS]
    tag = f" <lora:{lora_name}:1>"
    tuned = [_generate(engine, p.text + tag, cfg) for p in subject_prompts]
    base = [_generate(engine, p.text, cfg) for p in class_prompts]
    drift_before = _generate(engine, f"a {noun}", cfg)
    drift_after = _generate(engine, f"a {noun}" + tag, cfg)
    cfg.timings["generate"] = time.monotonic() - mark

    # 5. Score.
    flat = lambda rows: [im for row in rows for im in row]  # noqa: E731
    repeat = lambda prompts: [p for p in prompts for _ in range(cfg.seeds)]  # noqa: E731
    scores = {
        "subject_fidelity": {
            "personalized": evaluator.subject_fidelity(flat(tuned), references),
            "base (class noun)": evaluator.subject_fidelity(flat(base), references),
            "real images (ceiling)": evaluator.reference_ceiling(references),
        },
        "prompt_fidelity": {
            "personalized": evaluator.prompt_fidelity(flat(tuned), repeat(subject_prompts)),
            "base (class noun)": evaluator.prompt_fidelity(flat(base), repeat(class_prompts)),
        },
        "class_drift_similarity": evaluator.drift(drift_before, drift_after),
        "class_images_subject_fidelity": {
            "before": evaluator.subject_fidelity(drift_before, references),
            "after": evaluator.subject_fidelity(drift_after, references),
        },
    }
    cfg.timings["total"] = time.monotonic() - started

    # 6. Report.
    index = write_report(
        report_dir,
        cfg,
        subject_dir,
        references,
        subject_prompts,
        class_prompts,
        tuned,
        base,
        drift_before,
        drift_after,
        scores,
        result,
    )
    summary = {
        "scores": scores,
        "timings_s": {k: round(v, 1) for k, v in cfg.timings.items()},
        "lora": {k: str(v) for k, v in result.files.items()},
        "report": str(index),
    }
    (out / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    return index


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _generate(engine, prompt: str, cfg: DemoConfig):
    from booth.generate.params import GenerationParams

    params = GenerationParams(prompt=prompt, steps=cfg.sample_steps, seed=1000, batch_size=cfg.seeds)
    return engine.generate(params).images


def write_report(
    folder,
    cfg,
    subject_dir,
    references,
    subject_prompts,
    class_prompts,
    tuned,
    base,
    drift_before,
    drift_after,
    scores,
    result,
) -> Path:
    from booth.evaluate.report import Report, bar_chart
    from booth.generate.grid import annotated_grid, image_grid

    def save(image, name):
        image.save(folder / name)
        return name

    scale = lambda im, k=3: im.resize((im.width * k, im.height * k), 0)  # noqa: E731 (nearest: crisp pixels)
    report = Report(f"booth demo: {Path(subject_dir).name}")
    report.text(
        f"DreamBooth-LoRA (rank {cfg.rank}, {cfg.steps} steps, prior preservation with "
        f"{cfg.num_class_images} class images) on booth-mini; {cfg.seeds} seeds per prompt; total "
        f"{cfg.timings['total']:.0f} s on this machine."
    )
    report.heading("The subject")
    report.image(save(scale(image_grid(references, rows=1)), "subject.png"), "training images", pixel=True)

    report.heading("New contexts: personalized (left) vs the base model with the class noun (right)")
    rows = [t + b for t, b in zip(tuned, base)]
    grid = annotated_grid(
        [[scale(im, 2) for im in row] for row in rows], [p.text for p in subject_prompts], []
    )
    report.image(save(grid, "contexts.png"), f"left {cfg.seeds}: personalized; right {cfg.seeds}: base")

    report.heading("Scores")
    sf, pf = scores["subject_fidelity"], scores["prompt_fidelity"]
    keys = ["background", "position", "style", "all"]
    report.table(
        ["model", "subject fidelity (mini CLIP-I)", *[f"prompt fidelity: {k}" for k in keys]],
        [[name, sf[name], *[pf[name].get(k, float("nan")) for k in keys]] for name in pf]
        + [["real subject images (ceiling)", sf["real images (ceiling)"], "", "", "", ""]],
    )
    chart = bar_chart(
        folder / "scores.png",
        ["subject fidelity", *keys],
        {name: [sf[name], *[pf[name].get(k, 0.0) for k in keys]] for name in pf},
        "personalized vs base",
        ylim=(0, 1.05),
    )
    report.image(chart.name, "mini CLIP-I and the share of images whose context matches the prompt")

    report.heading("Language drift: 'a {class}' before (top) and after (bottom) personalization")
    report.image(save(scale(image_grid(drift_before + drift_after, rows=2)), "drift.png"), pixel=True)
    report.text(
        f"per-seed similarity of the class images before/after: {scores['class_drift_similarity']:.3f} "
        "(1 = unchanged); subject fidelity of the class images before "
        f"{scores['class_images_subject_fidelity']['before']:.3f}, after "
        f"{scores['class_images_subject_fidelity']['after']:.3f}."
    )
    report.heading("Training")
    loss = result.files.get("loss_plot")
    if loss:
        shutil.copyfile(loss, folder / "loss.png")
        report.image("loss.png", "training loss (instance + prior)")
    report.table(["phase", "seconds"], [[k, round(v, 1)] for k, v in cfg.timings.items()])
    report.text("Files: " + ", ".join(f"{k}: {v}" for k, v in result.files.items()), note=True)
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
