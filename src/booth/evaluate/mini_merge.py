"""The merge benchmark: two subjects trained separately (Custom Diffusion or LoRA), merged, then rendered together.

Steps (`merge_benchmark`; `booth eval merge` is its command line):

1. Train Custom Diffusion on subject A with modifier token ``<new1>`` and on subject B with ``<new2>`` (or,
   ``method="lora"``, DreamBooth-LoRA with identifiers ``sks`` and ``zwx``), each alone, on booth-mini (the
   settings of the mini benchmark, `booth.evaluate.mini_bench`); with ``prior=True`` each run also keeps its
   class with prior preservation (DreamBooth) or generated-class regularization (Custom Diffusion), so that
   each adapter changes its own subject and less of everything else the other is drawn with.
2. Merge the two: Custom Diffusion in closed form (`booth.train.merge.merge_custom_diffusion`, Kumari et al.
   2023, sec. 3.3); LoRAs by concatenation (`booth.train.merge.merge_lora`, exactly the sum of both deltas).
3. Render with four models: the base model (class nouns), A alone, B alone, and the merge (with LoRA also a
   fifth, "both, composable": the two LoRAs unmerged, each only in the ``AND`` sub-prompt naming its subject,
   `GenerationParams.composable_lora`; for the one-prompt kind that is both LoRAs at once, as merged):
   - each subject in the mini benchmark's `CONTEXTS` (alone in the image): subject fidelity (mini CLIP-I to
     that subject's real images) and prompt fidelity, so the cost of merging shows against each model alone;
   - `COMPOSED` prompts naming both subjects, each in its own region of the image, in three kinds: one prompt
     ("a <new1> dog on the left and a <new2> teapot on the right"), composable diffusion (A1111's ``AND``,
     Liu et al. 2022: "a small <new1> dog in the top left ... AND a small <new2> teapot in the bottom right
     ...", one guidance term per subject), and Latent Couple (the same ``AND`` with each term confined to its
     half of the image, `booth.generate.regions`). Each region of the image is scored against the real images
     of the subject asked there (mini CLIP-I of the crop, resized to the model's resolution); "two drawn" is
     the share of images that show two objects in those regions (`booth.mini.checks.check_pair`, no learned
     model); "told apart" the share where both regions hold something and each is closer to the subject asked
     there than to the other subject (two subjects touching across the middle count; a model that draws its
     one subject twice scores above base in both regions, but not this); "both shown" the share told apart
     where both regions also score above the base model's mean for that subject and kind (a region of an
     empty image scores too, so the crop scores alone do not tell whether anything was drawn there).

A model that knows only one subject gets the other's class noun in every prompt. booth-mini (v3 on, trained
with the dataset's two-object images, `UNetTrainConfig.pairs`) draws two objects for a one-prompt request, but
it does not bind a concept to its phrase: its two objects are of one kind, so "told apart" measures what the
merge adds and what the base model lacks (docs/mini-benchmark.md). With ``AND`` each term asks for one object,
as in the single-object training captions, and with Latent Couple each term also has its own half.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from booth.errors import BoothError
from booth.evaluate.mini_bench import (
    CONTEXTS,
    BenchSettings,
    find_subject,
    generate,
    personalized_engine,
    run_subject,
    subject_word,
)

# per method: how subjects A and B are named (modifier tokens; DreamBooth identifiers)
TOKENS = {"custom-diffusion": ("<new1>", "<new2>"), "lora": ("sks", "zwx")}

# Regions of the image as (left, top, right, bottom) fractions of its width and height.
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
TOP_LEFT, TOP_RIGHT = (0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5)
BOTTOM_LEFT, BOTTOM_RIGHT = (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)
REGION_NAMES = {  # each region as `booth.mini.checks` names it
    LEFT: "left",
    RIGHT: "right",
    TOP_LEFT: "top left",
    TOP_RIGHT: "top right",
    BOTTOM_LEFT: "bottom left",
    BOTTOM_RIGHT: "bottom right",
}
KINDS = ("one prompt", "AND", "Latent Couple")
HALVES = "divisions=1:2,1:2 positions=0:0,0:1 weights=1,1"  # Latent Couple: first term left, second right


@dataclass(frozen=True)
class Composition:
    """A two-subject prompt: `template` names {first} and {second} (subject phrases without an article), asked
    in `regions` (first's, second's); `kind` is one of `KINDS`; `latent_couple`: its regions setting, if any."""

    kind: str
    template: str
    regions: tuple[tuple[float, ...], tuple[float, ...]]
    latent_couple: str | None = None


WHITE = " on a white background"
COMPOSED: tuple[Composition, ...] = (
    Composition("one prompt", "a {first} on the left and a {second} on the right", (LEFT, RIGHT)),
    Composition("one prompt", "a {first} on the left and a {second} on the right" + WHITE, (LEFT, RIGHT)),
    Composition(
        "AND",
        f"a small {{first}} in the top left{WHITE} AND a small {{second}} in the bottom right{WHITE}",
        (TOP_LEFT, BOTTOM_RIGHT),
    ),
    Composition(
        "AND",
        f"a small {{first}} in the top right{WHITE} AND a small {{second}} in the bottom left{WHITE}",
        (TOP_RIGHT, BOTTOM_LEFT),
    ),
    Composition(
        "Latent Couple",
        f"a {{first}} on the left{WHITE} AND a {{second}} on the right{WHITE}",
        (LEFT, RIGHT),
        HALVES,
    ),
)


@dataclass(frozen=True)
class ComposedPrompt:
    """One rendered two-subject prompt: its text, kind, and the region where subject A and subject B were asked."""

    text: str
    kind: str
    region: dict[str, tuple[float, ...]]
    latent_couple: str | None = None


@dataclass
class ModelScores:
    """What one model scored: per subject in its contexts, and in the two-subject prompts of each kind."""

    model: str
    subject_fidelity: dict[str, float]
    prompt_fidelity: dict[str, float]
    composed_fidelity: dict[str, dict[str, float]]  # kind -> subject -> mini CLIP-I of its region
    composed_whole: dict[str, float]  # per subject: mini CLIP-I of the whole two-subject images
    two_drawn: dict[str, float] = field(default_factory=dict)  # kind -> share showing two objects as asked
    # kind -> share two drawn with each region closer to its own subject than to the other
    told_apart: dict[str, float] = field(default_factory=dict)
    both_shown: dict[str, float] = field(default_factory=dict)  # kind -> share told apart, both above base


@dataclass(frozen=True)
class RegionScore:
    """One two-subject image: per subject ("A", "B"), mini CLIP-I of the region it was asked in to its own
    real images (`own`) and to the other subject's (`other`); whether two separate objects were drawn where
    asked (`two`, `check_pair`) and whether both regions hold something (`filled`, touching objects count)."""

    kind: str
    own: dict[str, float]
    other: dict[str, float]
    two: bool
    filled: bool = True

    @property
    def told_apart(self) -> bool:
        """Something drawn in both regions, each closer to the subject asked there than to the other subject
        (two subjects that touch across the middle count; one object drawn twice, or across both, does not)."""
        return self.filled and all(self.own[k] > self.other[k] for k in "AB")


def crop(image, region: tuple[float, ...]):
    """The `region` (fractions) of an image, resized back to the image's size (the evaluator's input)."""
    w, h = image.size
    box = (round(region[0] * w), round(region[1] * h), round(region[2] * w), round(region[3] * h))
    return image.crop(box).resize((w, h))


def two_drawn(image, prompt: ComposedPrompt) -> bool:
    """Whether `image` shows two objects, one in each region `prompt` asked for (`check_pair`)."""
    from booth.mini.checks import check_pair

    return check_pair(image, tuple(REGION_NAMES[r] for r in prompt.region.values()))


def region_score(
    image, prompt: ComposedPrompt, references: Sequence[Sequence[Any]], evaluator
) -> RegionScore:
    """Score one two-subject image: each region against both subjects' real images, and two objects drawn."""
    from booth.mini.checks import pair_checks

    regions = {key: crop(image, prompt.region[key]) for key in "AB"}
    own = {key: evaluator.subject_fidelity([regions[key]], references[i]) for i, key in enumerate("AB")}
    other = {key: evaluator.subject_fidelity([regions[key]], references[1 - i]) for i, key in enumerate("AB")}
    filled, two = pair_checks(image, tuple(REGION_NAMES[r] for r in prompt.region.values()))
    return RegionScore(prompt.kind, own, other, two, filled)


def pasted_pair(references: Sequence[Sequence[Any]], prompt: ComposedPrompt, index: int, size: int):
    """A white `size` x `size` image with the subject of real image `index` of each subject (cut from its flat
    background, the colour of its corner) shrunk into the region asked for it: what a model that draws both
    subjects exactly would show (the benchmark's ceiling)."""
    from PIL import Image, ImageChops

    canvas = Image.new("RGB", (size, size), "white")
    for i, key in enumerate("AB"):
        left, top, right, bottom = (round(v * size) for v in prompt.region[key])
        side = min(right - left, bottom - top)
        real = references[i][index % len(references[i])].convert("RGB").resize((side, side))
        background = Image.new("RGB", real.size, real.getpixel((0, 0)))
        mask = ImageChops.difference(real, background).convert("L").point(lambda v: 255 if v > 24 else 0)
        canvas.paste(real, (left + (right - left - side) // 2, top + (bottom - top - side) // 2), mask)
    return canvas


def ceiling(
    references: Sequence[Sequence[Any]], evaluator, seeds: int, size: int
) -> dict[str, dict[str, float]]:
    """Per kind, the share of pasted real pairs (`pasted_pair`, `seeds` per prompt) with two objects drawn and
    told apart: how far the program check and the evaluator can go on these subjects."""
    scores = [
        region_score(pasted_pair(references, c, n, size), c, references, evaluator)
        for c in composed_prompts(("A", "B"))
        for n in range(seeds)
    ]
    return {
        kind: {
            "two_drawn": statistics.fmean(r.two for r in scores if r.kind == kind),
            "told_apart": statistics.fmean(r.told_apart for r in scores if r.kind == kind),
        }
        for kind in KINDS
    }


def composed_prompts(words: Sequence[str]) -> list[ComposedPrompt]:
    """Every `COMPOSED` prompt with subject A first and with subject B first."""
    prompts = []
    for c in COMPOSED:
        for first in (0, 1):
            second = 1 - first
            text = c.template.format(first=words[first], second=words[second])
            region = {"AB"[first]: c.regions[0], "AB"[second]: c.regions[1]}
            prompts.append(ComposedPrompt(text, c.kind, region, c.latent_couple))
    return prompts


def score_model(
    label: str,
    engine,
    suffix: str,
    words: Sequence[str],
    references: Sequence[Sequence[Any]],
    s: BenchSettings,
    evaluator,
    **params,
) -> tuple[ModelScores, dict[str, Any]]:
    """Render both subjects alone (in `CONTEXTS`) and together (`COMPOSED`) with one model; score them.

    `words`: how this model's prompts name subjects A and B; `references`: each subject's real images.
    Returns the scores and the images (for the report and for `both_shown`)."""
    from booth.evaluate.mini import context_prompt

    fidelity, prompt_fidelity, images = {}, {}, {}
    for i, key in enumerate("AB"):
        prompts = [context_prompt(words[i], *c) for c in CONTEXTS]
        rows = [generate(engine, p.text + suffix, s.seeds, s.sample_steps, **params) for p in prompts]
        flat = [im for row in rows for im in row]
        fidelity[key] = evaluator.subject_fidelity(flat, references[i])
        repeated = [p for p in prompts for _ in range(s.seeds)]
        prompt_fidelity[key] = evaluator.prompt_fidelity(flat, repeated)["all"]
        images[f"alone-{key}"] = (rows, [p.text for p in prompts])
    composed = composed_prompts(words)
    rows = [
        generate(engine, c.text + suffix, s.seeds, s.sample_steps, latent_couple=c.latent_couple, **params)
        for c in composed
    ]
    region_scores: list[RegionScore] = []
    whole = {"A": [], "B": []}
    for c, row in zip(composed, rows):
        for image in row:
            region_scores.append(region_score(image, c, references, evaluator))
            for i, key in enumerate("AB"):
                whole[key].append(evaluator.subject_fidelity([image], references[i]))
    images["composed"] = (rows, [c.text for c in composed])
    images["region_scores"] = region_scores
    of_kind = {kind: [r for r in region_scores if r.kind == kind] for kind in KINDS}
    by_kind = {kind: {k: statistics.fmean(r.own[k] for r in of_kind[kind]) for k in "AB"} for kind in KINDS}
    scores = ModelScores(
        label,
        fidelity,
        prompt_fidelity,
        by_kind,
        {k: statistics.fmean(v) for k, v in whole.items()},
        {kind: statistics.fmean(r.two for r in of_kind[kind]) for kind in KINDS},
        {kind: statistics.fmean(r.told_apart for r in of_kind[kind]) for kind in KINDS},
    )
    return scores, images


def both_shown(region_scores: Sequence[RegionScore], base: ModelScores) -> dict[str, float]:
    """Per kind: share of two-subject images told apart (`RegionScore.told_apart`) where each subject's region
    also beats the base model's mean for that subject and kind."""
    shares = {}
    for kind in KINDS:
        hits = [
            r.told_apart and all(r.own[k] > base.composed_fidelity[kind][k] for k in "AB")
            for r in region_scores
            if r.kind == kind
        ]
        shares[kind] = sum(hits) / len(hits)
    return shares


def merge_benchmark(
    subjects: Sequence[str],
    out: Path,
    s: BenchSettings,
    method: str = "custom-diffusion",
    prior: bool = False,
) -> Path:
    """Steps 1-3 of the module docstring; writes results.json, table.md and report/index.html. Returns table.md."""
    from booth.evaluate.mini import MiniEvaluator
    from booth.generate.engine import Engine

    if method not in TOKENS:
        raise BoothError(f"the merge benchmark merges {' or '.join(TOKENS)}, not {method!r}")
    if len(subjects) != 2:
        raise BoothError(f"the merge benchmark takes two subjects, got {len(subjects)}")
    dirs = [find_subject(x) for x in subjects]
    if dirs[0].resolve() == dirs[1].resolve():
        raise BoothError("the merge benchmark needs two different subjects")
    nouns = [json.loads((d / "subject.json").read_text())["class_noun"] for d in dirs]
    started = time.monotonic()
    evaluator = MiniEvaluator(None if s.model is None else Path(s.model) / "clip")
    base_engine = Engine.from_model(s.model)
    # 1. train each subject alone, with its own modifier token or identifier
    tokens = TOKENS[method]
    runs = [
        run_subject(method, prior, d, out / "runs" / f"{d.name}", s, evaluator, base_engine, token)
        for d, token in zip(dirs, tokens)
    ]
    train_seconds = [r.train_seconds for r in runs]
    references = [r.images["references"] for r in runs]
    words = [subject_word(method, noun, token) for noun, token in zip(nouns, tokens)]
    # 2. merge
    tick = time.monotonic()
    merge_info, merged_engine = _merge(method, runs, out / "merged", s.model)
    merge_seconds = time.monotonic() - tick
    # 3. render and score with each model
    engines: list[tuple[str, Any, str, list[str]]] = [("base model", base_engine, "", list(nouns))]
    for i, run in enumerate(runs):
        engine, suffix = personalized_engine(method, run.train_result, s.model)
        named = list(nouns)
        named[i] = words[i]
        engines.append((f"{dirs[i].name} alone", engine, suffix, named))
    engines.append(("merged", *merged_engine, list(words)))
    params: list[dict[str, Any]] = [{} for _ in engines]
    if method == "lora":  # 4. both LoRAs unmerged, each in the sub-prompt that names its subject
        engines.append(("both, composable", *_composable(runs, words, s.model)))
        params.append({"composable_lora": True})
    results, all_images = [], []
    for (label, engine, suffix, named), extra in zip(engines, params):
        scores, images = score_model(label, engine, suffix, named, references, s, evaluator, **extra)
        results.append(scores)
        all_images.append(images)
    for scores, images in zip(results, all_images):
        scores.both_shown = both_shown(images["region_scores"], results[0])
    size = all_images[0]["composed"][0][0][0].width
    real = ceiling(references, evaluator, s.seeds, size)
    summary = {
        "protocol": "booth mini merge benchmark v3",
        "method": method,
        "prior": prior,
        "subjects": {"A": dirs[0].name, "B": dirs[1].name},
        "words": {"A": words[0], "B": words[1]},
        "settings": asdict(s),
        "contexts": [list(c) for c in CONTEXTS],
        "composed_prompts": [asdict(c) for c in composed_prompts(words)],
        "train_seconds": train_seconds,
        "merge_seconds": round(merge_seconds, 2),
        "merge": merge_info,
        "models": [asdict(r) for r in results],
        "ceiling": real,
        "seconds": round(time.monotonic() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    table = merge_table(results, dirs[0].name, dirs[1].name, real)
    (out / "table.md").write_text(table)
    write_merge_report(out / "report", results, all_images, summary)
    return out / "table.md"


def _merge(method: str, runs, folder: Path, model: str | None) -> tuple[dict[str, Any], tuple[Any, str]]:
    """Merge the two runs' adapters into `folder`: (what the merge reports, (engine, prompt suffix))."""
    from booth.evaluate.mini_bench import lora_engine
    from booth.generate.engine import Engine
    from booth.models.loading import load_pipeline
    from booth.train.merge import merge_custom_diffusion, merge_lora, regularization_prompts

    if method == "lora":
        files = [r.train_result.files["kohya"] for r in runs]
        merged = merge_lora(files, None, folder, mode="concat", name="merged")
        return {"mode": "concat", "rank": merged.rank}, lora_engine(merged.files["kohya"], model)
    from booth.train.formats.custom_diffusion import load_custom_diffusion

    pipe = load_pipeline(model, device="cpu").pipe
    adapters = [r.train_result.out for r in runs]
    merged = merge_custom_diffusion(adapters, regularization_prompts(), pipe, folder, name="merged")
    loaded = load_pipeline(model)
    load_custom_diffusion(loaded.pipe, folder)
    info = {
        "constraint_error": merged.constraint_error,
        "reg_change": merged.reg_change,
        "average_reg_change": merged.average_reg_change,
    }
    return info, (Engine(loaded), "")


def _composable(runs, words: Sequence[str], model: str | None) -> tuple[Any, str, list[str]]:
    """(engine, "", words): an engine with both runs' LoRAs, each subject's word tagged with its own LoRA, for
    composable LoRA (`GenerationParams.composable_lora`)."""
    from booth.generate.engine import Engine
    from booth.generate.networks import LoraNetwork
    from booth.models.loading import load_pipeline
    from booth.prompts import ExtraNetworkRegistry

    files = {f"subject{i}": Path(r.train_result.files["kohya"]) for i, r in enumerate(runs)}
    network = LoraNetwork([], files)
    engine = Engine(load_pipeline(model), extra_networks=ExtraNetworkRegistry([network]))
    return engine, "", [f"{word} <lora:subject{i}:1>" for i, word in enumerate(words)]


def merge_table(results: Sequence[ModelScores], a: str, b: str, real: dict[str, dict[str, float]]) -> str:
    """The markdown table: one row per model; two-subject images per kind (`KINDS`); under it, the `ceiling`."""
    head = f"| model | {a} fidelity (alone) | {b} fidelity (alone) | prompt fidelity (alone, mean) |"
    for kind in KINDS:
        head += f" {kind}: {a} region | {kind}: {b} region |"
        head += f" {kind}: two drawn | {kind}: told apart | {kind}: both shown |"
    lines = [head, "|---" * (4 + 5 * len(KINDS)) + "|"]
    for r in results:
        pf = statistics.fmean(r.prompt_fidelity.values())
        line = f"| {r.model} | {r.subject_fidelity['A']:.3f} | {r.subject_fidelity['B']:.3f} | {pf:.3f} |"
        for kind in KINDS:
            c = r.composed_fidelity[kind]
            line += f" {c['A']:.3f} | {c['B']:.3f} | {r.two_drawn[kind]:.3f} | {r.told_apart[kind]:.3f} |"
            line += f" {r.both_shown[kind]:.3f} |"
        lines.append(line)
    return "\n".join(lines) + "\n\n" + ceiling_line(real) + "\n"


def ceiling_line(real: dict[str, dict[str, float]]) -> str:
    shares = "; ".join(f"{kind} {v['two_drawn']:.3f} / {v['told_apart']:.3f}" for kind, v in real.items())
    return f"Real images pasted into the asked regions (the ceiling), two drawn / told apart: {shares}."


def write_merge_report(folder: Path, results, all_images, summary: dict) -> None:
    from booth.evaluate.report import Report, bar_chart
    from booth.generate.grid import annotated_grid

    folder.mkdir(parents=True, exist_ok=True)
    a, b = summary["subjects"]["A"], summary["subjects"]["B"]
    report = Report(f"booth mini merge benchmark: {a} + {b}")
    if summary["method"] == "lora":
        how = f"DreamBooth-LoRA, merged by concatenation (rank {summary['merge']['rank']})"
    else:
        how = (
            "Custom Diffusion, merged in closed form "
            f"(constraint error {summary['merge']['constraint_error']:.1e})"
        )
    report.text(
        f"{a} ({summary['words']['A']}) and {b} ({summary['words']['B']}) trained separately "
        f"{'with' if summary['prior'] else 'without'} prior preservation, with {how}. "
        f"Two-subject prompts ({', '.join(KINDS)}): each region scored against the subject asked there; "
        "'two drawn': two separate objects where asked (read by program); 'told apart': something in both "
        "regions, each closer to the subject asked there than to the other; 'both shown': told apart and both "
        "regions above the base model's mean. " + ceiling_line(summary["ceiling"])
    )
    labels = [r.model for r in results]
    chart = bar_chart(
        folder / "fidelity.png",
        labels,
        {
            f"{a} alone": [r.subject_fidelity["A"] for r in results],
            f"{b} alone": [r.subject_fidelity["B"] for r in results],
            **{
                f"{x} region ({kind})": [r.composed_fidelity[kind][key] for r in results]
                for kind in KINDS
                for key, x in (("A", a), ("B", b))
            },
        },
        "mini CLIP-I to the real images",
        ylim=(0, 1.05),
    )
    report.image(chart.name)
    report.heading("Table")
    report.table(
        ["model", f"{a} alone", f"{b} alone"]
        + [
            f"{kind}: {x}"
            for kind in KINDS
            for x in (f"{a} region", f"{b} region", "two drawn", "told apart", "both shown")
        ],
        [
            [r.model, r.subject_fidelity["A"], r.subject_fidelity["B"]]
            + [
                v
                for kind in KINDS
                for v in (
                    r.composed_fidelity[kind]["A"],
                    r.composed_fidelity[kind]["B"],
                    r.two_drawn[kind],
                    r.told_apart[kind],
                    r.both_shown[kind],
                )
            ]
            for r in results
        ],
    )
    for i, (r, images) in enumerate(zip(results, all_images)):
        report.heading(r.model)
        for key in ("composed", "alone-A", "alone-B"):
            rows, texts = images[key]
            big = [[im.resize((im.width * 2, im.height * 2), 0) for im in row] for row in rows]
            name = f"model-{i}-{key}.png"
            annotated_grid(big, texts, []).save(folder / name)
            report.image(name)
    report.save(folder)


def add_merge_eval_command(eval_sub) -> None:
    m = eval_sub.add_parser(
        "merge",
        help="two subjects trained separately (Custom Diffusion or LoRA), merged, rendered together on booth-mini",
    )
    m.add_argument("--subjects", default="poodle,teapot", help="two example subjects or folders")
    m.add_argument(
        "--method",
        choices=sorted(TOKENS),
        default="custom-diffusion",
        help="custom-diffusion (closed-form merge, default) or lora (concatenation)",
    )
    m.add_argument(
        "--prior",
        action="store_true",
        help="train each subject with prior preservation / class regularization (default: without)",
    )
    m.add_argument(
        "--num-class-images", type=int, default=BenchSettings.num_class_images, help="with --prior"
    )
    m.add_argument("--steps", type=int, default=BenchSettings.steps, help="training steps per subject")
    m.add_argument("--seeds", type=int, default=BenchSettings.seeds, help="images per prompt")
    m.add_argument("--sample-steps", type=int, default=BenchSettings.sample_steps, help="sampling steps")
    m.add_argument("--model", default=None, help="base model (default booth-mini)")
    m.add_argument("--out", "-o", default="runs/mini-merge", help="output folder (default runs/mini-merge)")
    m.add_argument("--no-progress", action="store_true", help="hide progress bars")
    m.set_defaults(func=cmd_eval_merge)


def cmd_eval_merge(args) -> int:
    s = BenchSettings(
        steps=args.steps,
        seeds=args.seeds,
        sample_steps=args.sample_steps,
        num_class_images=args.num_class_images,
        model=args.model,
        progress=not args.no_progress,
    )
    started = time.monotonic()
    subjects = [x.strip() for x in args.subjects.split(",") if x.strip()]
    table = merge_benchmark(subjects, Path(args.out), s, args.method, prior=args.prior)
    print(table.read_text())
    print(
        f"results: {table.parent / 'results.json'}; report: {table.parent / 'report' / 'index.html'}; "
        f"{time.monotonic() - started:.0f} s"
    )
    return 0
