"""The mini benchmark: personalize held-out example subjects on booth-mini with each method and score them.

For one (method, prior preservation, subject) it trains, then generates the subject in `CONTEXTS` (new
backgrounds, positions, styles), the same prompts with the plain class noun on the base model, and "a {class}"
before / after training, and scores:

- subject fidelity: mini CLIP-I of the subject prompts' images to the subject's real images;
- prompt fidelity: share of those images whose asked background / position / style is there (programmatic
  checks and mini-CLIP zero-shot; "all" = every asked part right);
- drift: per-seed mini-CLIP similarity of "a {class}" images before and after (1 = unchanged);
- train time and the size of the files a user keeps.

`compare` runs a grid of methods x prior on/off x subjects and writes ``results.json``, ``table.md`` and an
HTML report; `booth eval mini` is its command line.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from booth.errors import BoothError

# new contexts: (background, position, size, style); the example images never show these combinations
CONTEXTS: tuple[tuple[str | None, str | None, str | None, str | None], ...] = (
    ("red", None, None, None),
    ("green", None, None, None),
    ("purple", "top left", "small", None),
    ("pink", "bottom right", "small", None),
    ("white", None, None, "openmoji"),
    ("grey", None, None, "twemoji"),
)
IDENTIFIER = "sks"
MODIFIER = "<new1>"  # Custom Diffusion's modifier token when a run names none
# per method: LR and Min-SNR gamma for the mini world (booth-mini was trained with a Min-SNR-weighted loss).
# Measured on booth-mini v2 (poodle, 250 steps, no prior, 2 seeds; mini CLIP-I, base model 0.024):
# LoRA lr 5e-4 -0.116, 1e-3 0.036, 2e-3 0.147, 4e-3 0.166 (prompt fidelity 0.67), 2e-3 + Min-SNR 5 0.177 (teapot
# 0.240 vs base 0.213, backpack 0.221 vs 0.140); full DreamBooth lr 2e-5 -0.075, 1e-4 0.149; Custom Diffusion lr
# 1e-4 0.043, 1e-3 0.163 (prompt fidelity 0.58: position lost), so 5e-4.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "lora": {"lr": 2e-3, "snr_gamma": 5.0},
    "dreambooth": {"lr": 1e-4, "snr_gamma": 5.0},
    "textual-inversion": {"lr": 5e-3, "snr_gamma": 5.0},
    "custom-diffusion": {"lr": 5e-4, "snr_gamma": 5.0},
}


@dataclass
class BenchSettings:
    steps: int = 250
    batch_size: int = 2
    num_class_images: int = 16
    seeds: int = 4
    sample_steps: int = 20
    rank: int = 8
    seed: int = 0
    model: str | None = None
    progress: bool = True


def examples_dir() -> Path:
    """The repository's ``examples/`` (next to ``src/``), else ``./examples``."""
    import booth

    for candidate in (Path(booth.__file__).resolve().parents[2] / "examples", Path.cwd() / "examples"):
        if candidate.is_dir():
            return candidate
    raise BoothError("examples/ not found; run from the booth repository or pass a subject folder")


def find_subject(subject: str | Path) -> Path:
    """An example subject by name, or a folder holding subject.json."""
    path = Path(subject)
    if not (path / "subject.json").is_file():
        path = examples_dir() / str(subject)
    if not (path / "subject.json").is_file():
        names = sorted(p.name for p in examples_dir().iterdir() if (p / "subject.json").is_file())
        raise BoothError(f"unknown subject {str(subject)!r}; examples: {', '.join(names)}")
    return path


def subject_word(method: str, noun: str, token: str | None = None) -> str:
    """How prompts name the subject: "<sks>" (textual inversion's learned word), "<new1> dog" (Custom Diffusion's
    modifier token) or "sks dog" (DreamBooth's rare identifier); `token` replaces the modifier token or the
    identifier (several subjects in one model need one each)."""
    if method == "textual-inversion":
        return "<sks>"
    if method == "custom-diffusion":
        return f"{token or MODIFIER} {noun}"
    return f"{token or IDENTIFIER} {noun}"


def prepare_instance_folder(subject_dir: Path, target: Path, word: str | None = None) -> tuple[str, str]:
    """Copy the subject's images with captions naming it (`word`, default "sks {noun}").

    Returns (instance prompt, class noun)."""
    meta = json.loads((subject_dir / "subject.json").read_text())
    noun = meta["class_noun"]
    word = word or f"{IDENTIFIER} {noun}"
    target.mkdir(parents=True, exist_ok=True)
    for item in meta["images"]:
        shutil.copyfile(subject_dir / item["file_name"], target / item["file_name"])
        text = re.sub(rf"\b{re.escape(noun)}\b", word, item["caption"], count=1)
        (target / (Path(item["file_name"]).stem + ".txt")).write_text(text + "\n")
    return f"a {word}", noun


def open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def train_config(
    method: str,
    prior: bool,
    instance_dir: Path,
    instance_prompt: str,
    noun: str,
    out: Path,
    s: BenchSettings,
    name: str,
    token: str | None = None,
):
    """The `TrainConfig` of one benchmark run (`token`: Custom Diffusion's modifier token, default <new1>)."""
    from booth.train import DataConfig, LoraConfig, LossConfig, OptimConfig, PriorConfig, TrainConfig
    from booth.train.config import TokenConfig

    settings = METHOD_SETTINGS.get(method, {})
    tokens = TokenConfig()
    if method == "textual-inversion":
        tokens = TokenConfig(placeholder="<sks>", initializer=noun)
    elif method == "custom-diffusion":
        tokens = TokenConfig(placeholder=token or MODIFIER, initializer=noun)
    return TrainConfig(
        method=method,
        model=s.model,
        out=out,
        name=None if method == "textual-inversion" else name,  # TI: the file name is the trigger word
        steps=s.steps,
        seed=s.seed,
        data=DataConfig(images=instance_dir, instance_prompt=instance_prompt),
        prior=PriorConfig(
            enabled=prior,
            class_prompt=f"a {noun}",
            num_class_images=s.num_class_images,
            sample_steps=s.sample_steps,
        ),
        lora=LoraConfig(rank=s.rank),
        tokens=tokens,
        optim=OptimConfig(lr=settings.get("lr"), batch_size=s.batch_size),
        loss=LossConfig(snr_gamma=settings.get("snr_gamma")),
        checkpoint_every=max(s.steps, 1),
    )


def personalized_engine(method: str, result, base_model: str | None):
    """(engine, prompt suffix) that renders the trained subject."""
    from booth.generate.engine import Engine
    from booth.models.loading import load_pipeline

    if method == "lora":
        return lora_engine(result.files["kohya"], base_model)
    if method == "dreambooth":
        return Engine(load_pipeline(str(result.files["diffusers"]))), ""
    if method == "textual-inversion":
        from booth.train.formats.embeddings import load_embeddings_dir

        return Engine(load_pipeline(base_model), embeddings=load_embeddings_dir(result.out)), ""
    if method == "custom-diffusion":
        from booth.train.formats.custom_diffusion import load_custom_diffusion

        loaded = load_pipeline(base_model)
        load_custom_diffusion(loaded.pipe, result.out)  # attn2 processors + modifier tokens, in place
        return Engine(loaded), ""
    raise BoothError(f"no evaluation recipe for method {method!r}")


def lora_engine(file: Path, base_model: str | None):
    """(engine, prompt suffix) applying the kohya-format LoRA `file` at weight 1, as A1111's ``<lora:name:1>``."""
    from booth.generate.engine import Engine
    from booth.generate.networks import LoraNetwork
    from booth.models.loading import load_pipeline
    from booth.prompts import ExtraNetworkRegistry

    file = Path(file)
    engine = Engine(
        load_pipeline(base_model), extra_networks=ExtraNetworkRegistry([LoraNetwork([file.parent])])
    )
    return engine, f" <lora:{file.stem}:1>"


def generate(engine, prompt: str, seeds: int, steps: int, **params):
    """`seeds` images of `prompt` (seeds 1000, 1001, ...); `params`: other `GenerationParams` fields."""
    from booth.generate.params import GenerationParams

    request = GenerationParams(prompt=prompt, steps=steps, seed=1000, batch_size=seeds, **params)
    return engine.generate(request).images


@dataclass
class SubjectRun:
    """Everything one (method, prior, subject) run produced: images and scores."""

    method: str
    prior: bool
    subject: str
    scores: dict[str, Any]
    train_seconds: float
    file_mb: float
    prompts: list[str] = field(default_factory=list)
    images: dict[str, Any] = field(default_factory=dict, repr=False)
    train_result: Any = field(default=None, repr=False)


def run_subject(
    method: str,
    prior: bool,
    subject: str | Path,
    out: Path,
    s: BenchSettings,
    evaluator=None,
    base_engine=None,
    token: str | None = None,
) -> SubjectRun:
    """Train one method on one subject and score it (see the module docstring); `token`: Custom Diffusion's
    modifier token or DreamBooth's identifier (`subject_word`)."""
    from booth.evaluate.mini import MiniEvaluator, context_prompt
    from booth.generate.engine import Engine
    from booth.train import train

    subject_dir = find_subject(subject)
    out.mkdir(parents=True, exist_ok=True)
    noun = json.loads((subject_dir / "subject.json").read_text())["class_noun"]
    word = subject_word(method, noun, token)
    instance_prompt, noun = prepare_instance_folder(subject_dir, out / "subject", word)
    references = [open_rgb(p) for p in sorted((out / "subject").glob("*.png"))]
    evaluator = evaluator or MiniEvaluator(None if s.model is None else Path(s.model) / "clip")
    base_engine = base_engine or Engine.from_model(s.model)

    start = time.monotonic()
    config = train_config(
        method, prior, out / "subject", instance_prompt, noun, out / "run", s, subject_dir.name, token
    )
    result = train(config, overwrite=True, progress=s.progress)
    train_seconds = time.monotonic() - start
    kept = {k: v for k, v in result.files.items() if k not in ("loss_plot", "validation")}
    file_mb = sum(_size(p) for p in kept.values()) / 2**20

    engine, suffix = personalized_engine(method, result, s.model)
    subject_prompts = [context_prompt(word, *c) for c in CONTEXTS]
    class_prompts = [context_prompt(noun, *c) for c in CONTEXTS]
    tuned = [generate(engine, p.text + suffix, s.seeds, s.sample_steps) for p in subject_prompts]
    base = [generate(base_engine, p.text, s.seeds, s.sample_steps) for p in class_prompts]
    before = generate(base_engine, f"a {noun}", s.seeds, s.sample_steps)
    after = generate(engine, f"a {noun}" + suffix, s.seeds, s.sample_steps)

    def flat(rows):
        return [im for row in rows for im in row]

    def repeat(prompts):
        return [p for p in prompts for _ in range(s.seeds)]

    scores = {
        "subject_fidelity": evaluator.subject_fidelity(flat(tuned), references),
        "base_subject_fidelity": evaluator.subject_fidelity(flat(base), references),
        "ceiling_subject_fidelity": evaluator.reference_ceiling(references),
        "prompt_fidelity": evaluator.prompt_fidelity(flat(tuned), repeat(subject_prompts)),
        "base_prompt_fidelity": evaluator.prompt_fidelity(flat(base), repeat(class_prompts)),
        "drift_similarity": evaluator.drift(before, after),
        "class_subject_fidelity_before": evaluator.subject_fidelity(before, references),
        "class_subject_fidelity_after": evaluator.subject_fidelity(after, references),
    }
    images = {"tuned": tuned, "base": base, "before": before, "after": after, "references": references}
    return SubjectRun(
        method,
        prior,
        subject_dir.name,
        scores,
        train_seconds,
        file_mb,
        [p.text for p in subject_prompts],
        images,
        result,
    )


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


# ------------------------------------------------------------------------------------------------
# the comparison table


def compare(
    methods: Sequence[str], subjects: Sequence[str], priors: Sequence[bool], out: Path, s: BenchSettings
) -> Path:
    """Run every (method, prior, subject); write results.json, table.md and report/index.html. Returns table.md."""
    from booth.evaluate.mini import MiniEvaluator
    from booth.generate.engine import Engine

    started = time.monotonic()
    evaluator = MiniEvaluator(None if s.model is None else Path(s.model) / "clip")
    base_engine = Engine.from_model(s.model)
    runs: list[SubjectRun] = []
    for method in methods:
        for prior in priors:
            if prior and method == "textual-inversion":
                continue  # only the new word trains; a class prompt never contains it (the method refuses it)
            for subject in subjects:
                folder = out / "runs" / f"{method}-{'prior' if prior else 'noprior'}-{Path(subject).name}"
                runs.append(run_subject(method, prior, subject, folder, s, evaluator, base_engine))
    rows = summarize(runs)
    results = {
        "protocol": "booth mini benchmark v1",
        "settings": asdict(s),
        "contexts": [list(c) for c in CONTEXTS],
        "runs": [{k: v for k, v in asdict(r).items() if k not in ("images", "train_result")} for r in runs],
        "table": rows,
        "seconds": round(time.monotonic() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown_table(rows)
    (out / "table.md").write_text(table)
    write_comparison_report(out / "report", runs, rows, s)
    return out / "table.md"


def summarize(runs: list[SubjectRun]) -> list[dict[str, Any]]:
    """One row per (method, prior): mean and spread (population std) over subjects."""
    groups: dict[tuple[str, bool], list[SubjectRun]] = {}
    for r in runs:
        groups.setdefault((r.method, r.prior), []).append(r)
    rows = []
    for (method, prior), rs in groups.items():

        def stat(values):
            return {
                "mean": statistics.fmean(values),
                "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            }

        rows.append(
            {
                "method": method,
                "prior": prior,
                "subjects": len(rs),
                "subject_fidelity": stat([r.scores["subject_fidelity"] for r in rs]),
                "base_subject_fidelity": stat([r.scores["base_subject_fidelity"] for r in rs]),
                "prompt_fidelity": stat([r.scores["prompt_fidelity"]["all"] for r in rs]),
                "drift_similarity": stat([r.scores["drift_similarity"] for r in rs]),
                "train_seconds": stat([r.train_seconds for r in rs]),
                "file_mb": stat([r.file_mb for r in rs]),
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def cell(v, digits=3):
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"

    lines = [
        "| method | prior | subjects | subject fidelity (mini CLIP-I) | base model's class images | "
        "prompt fidelity (all parts) | class similarity before/after (drift) | train s | files MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {'yes' if r['prior'] else 'no'} | {r['subjects']} | {cell(r['subject_fidelity'])} | "
            f"{cell(r['base_subject_fidelity'])} | {cell(r['prompt_fidelity'])} | {cell(r['drift_similarity'])} | "
            f"{cell(r['train_seconds'], 0)} | {cell(r['file_mb'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def write_comparison_report(
    folder: Path, runs: list[SubjectRun], rows: list[dict[str, Any]], s: BenchSettings
):
    from booth.evaluate.report import Report, bar_chart
    from booth.generate.grid import annotated_grid

    folder.mkdir(parents=True, exist_ok=True)
    report = Report("booth mini benchmark: method comparison")
    report.text(
        f"{s.steps} steps, batch {s.batch_size}, {s.seeds} seeds per prompt, {s.sample_steps} sampling "
        f"steps; contexts: {len(CONTEXTS)} prompts per subject."
    )
    labels = [f"{r['method']}{' +prior' if r['prior'] else ''}" for r in rows]
    chart = bar_chart(
        folder / "fidelity.png",
        labels,
        {
            "subject fidelity": [r["subject_fidelity"]["mean"] for r in rows],
            "prompt fidelity": [r["prompt_fidelity"]["mean"] for r in rows],
            "class similarity (drift)": [r["drift_similarity"]["mean"] for r in rows],
        },
        "mean over subjects",
        ylim=(0, 1.05),
    )
    report.image(chart.name)
    scatter = fidelity_scatter(folder / "scatter.png", runs)
    report.image(scatter.name, "each point one subject: subject fidelity vs prompt fidelity")
    report.heading("Table")
    report.table(
        ["method", "prior", "subject fidelity", "prompt fidelity", "drift similarity", "train s", "MB"],
        [
            [
                r["method"],
                "yes" if r["prior"] else "no",
                r["subject_fidelity"]["mean"],
                r["prompt_fidelity"]["mean"],
                r["drift_similarity"]["mean"],
                round(r["train_seconds"]["mean"]),
                round(r["file_mb"]["mean"], 2),
            ]
            for r in rows
        ],
    )
    for i, run in enumerate(runs):
        report.heading(f"{run.method}{' + prior' if run.prior else ''}: {run.subject}")
        big = [[im.resize((im.width * 2, im.height * 2), 0) for im in row] for row in run.images["tuned"]]
        name = f"run-{i:02d}.png"
        annotated_grid(big, run.prompts, []).save(folder / name)
        report.image(name)
    report.save(folder)


def fidelity_scatter(path: Path, runs: list[SubjectRun]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    for label in dict.fromkeys(f"{r.method}{' +prior' if r.prior else ''}" for r in runs):
        pts = [r for r in runs if f"{r.method}{' +prior' if r.prior else ''}" == label]
        ax.scatter(
            [r.scores["subject_fidelity"] for r in pts],
            [r.scores["prompt_fidelity"]["all"] for r in pts],
            label=label,
        )
    ax.set_xlabel("subject fidelity (mini CLIP-I)")
    ax.set_ylabel("prompt fidelity (all parts right)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    from booth.evaluate.report import save_figure

    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# command line: booth eval mini


def add_eval_commands(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate personalization: DreamBench protocol, the mini benchmark, result comparison"
    )
    eval_sub = p.add_subparsers(dest="eval_command", metavar="COMMAND")
    m = eval_sub.add_parser("mini", help="method comparison on booth-mini's held-out example subjects")
    m.add_argument(
        "--methods", default="lora,dreambooth", help="comma-separated methods (default lora,dreambooth)"
    )
    m.add_argument("--subjects", default="poodle,teapot", help="comma-separated example subjects or folders")
    m.add_argument(
        "--prior", choices=["yes", "no", "both"], default="both", help="prior preservation (default both)"
    )
    m.add_argument("--steps", type=int, default=BenchSettings.steps, help="training steps per run")
    m.add_argument("--seeds", type=int, default=BenchSettings.seeds, help="images per prompt")
    m.add_argument("--sample-steps", type=int, default=BenchSettings.sample_steps, help="sampling steps")
    m.add_argument(
        "--num-class-images",
        type=int,
        default=BenchSettings.num_class_images,
        help="class images for prior preservation",
    )
    m.add_argument("--model", default=None, help="base model (default booth-mini)")
    m.add_argument("--out", "-o", default="runs/mini-bench", help="output folder (default runs/mini-bench)")
    m.add_argument("--no-progress", action="store_true", help="hide progress bars")
    m.set_defaults(func=cmd_eval_mini)
    from booth.evaluate.dreambench import add_dreambench_command
    from booth.evaluate.mini_merge import add_merge_eval_command

    add_dreambench_command(eval_sub)
    add_merge_eval_command(eval_sub)
    p.set_defaults(func=lambda args: p.print_help() or 0)


def cmd_eval_mini(args) -> int:
    priors = {"yes": [True], "no": [False], "both": [False, True]}[args.prior]
    s = BenchSettings(
        steps=args.steps,
        seeds=args.seeds,
        sample_steps=args.sample_steps,
        num_class_images=args.num_class_images,
        model=args.model,
        progress=not args.no_progress,
    )
    started = time.monotonic()
    table = compare(
        [m.strip() for m in args.methods.split(",") if m.strip()],
        [x.strip() for x in args.subjects.split(",") if x.strip()],
        priors,
        Path(args.out),
        s,
    )
    print(table.read_text())
    print(
        f"results: {table.parent / 'results.json'}; report: {table.parent / 'report' / 'index.html'}; "
        f"{time.monotonic() - started:.0f} s"
    )
    return 0
