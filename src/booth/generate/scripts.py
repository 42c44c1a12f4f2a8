"""A1111 scripts: prompt matrix, X/Y/Z plot and prompts from file (styles: `booth.prompts.styles`).

Each script is a pure job builder (`*_jobs`: params in, list of resolved `GenerationParams` out, no images)
plus a runner (`run_*`) that calls the engine's `generate(params) -> list[Image]` once per job and assembles
the annotated grid. Seeds handed to `generate` are always resolved (never -1): a base seed of -1 becomes one
random seed drawn from `rng` (default: a fresh system-seeded `random.Random`), as A1111 `fix_seed` does.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import random
import re
import shlex
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import permutations
from typing import Any

from PIL import Image

from booth.errors import BoothError
from booth.generate.grid import annotated_grid, image_grid, prompt_matrix_grid, prompt_matrix_shape
from booth.generate.params import GenerationParams, resolve_seed

Generate = Callable[[GenerationParams], list[Image.Image]]

MAX_AXIS_VALUES = 10_000  # guards against typos like "1-100000000" expanding into a huge plot


@dataclass
class ScriptResult:
    """What a script run produces.

    Attributes:
        grid: the annotated grid image (A1111 inserts it as image 0; here it is separate).
        images: every image `generate` returned, in job order.
        jobs: the resolved params of every job, in grid order (row-major).
        labels: label lists by role: "x" (columns), "y" (rows), "z" (sub-grids), "prompts".
    """

    grid: Image.Image
    images: list[Image.Image]
    jobs: list[GenerationParams]
    labels: dict[str, list[str]]


# --------------------------------------------------------------------------------------------------------
# Seeds and running jobs


def fix_seeds(params: GenerationParams, rng: random.Random) -> GenerationParams:
    """Resolve a -1 seed and subseed, like A1111 `processing.fix_seed`."""
    return params.replace(seed=resolve_seed(params.seed, rng), subseed=resolve_seed(params.subseed, rng))


def _generate_checked(generate: Generate, job: GenerationParams) -> list[Image.Image]:
    images = list(generate(job))
    expected = job.batch_size * job.n_iter
    if len(images) != expected:
        raise RuntimeError(f"generate returned {len(images)} images for a job of {expected}")
    return images


def _cell_image(images: Sequence[Image.Image]) -> Image.Image:
    """One grid cell per job: the image itself, or the job's batch as a sub-grid (A1111 `return_grid`)."""
    return images[0] if len(images) == 1 else image_grid(images)


# --------------------------------------------------------------------------------------------------------
# Prompt matrix (A1111 scripts/prompt_matrix.py)

PROMPT_MATRIX_DELIMITERS = types.MappingProxyType({"comma": ", ", "space": " "})
PROMPT_MATRIX_FIELDS = types.MappingProxyType({"positive": "prompt", "negative": "negative_prompt"})


def split_prompt_matrix(prompt: str) -> list[str]:
    """Split on `|`; each part is stripped of surrounding whitespace and commas."""
    return [part.strip().strip(",").strip() for part in prompt.split("|")]


def prompt_matrix_prompts(
    parts: Sequence[str], *, put_at_start: bool = False, delimiter: str = "comma"
) -> list[str]:
    """All 2^(n-1) prompts: combination i keeps part 0 plus part k+1 where bit k of i is set.

    A1111 `prompt_matrix.py`: with `put_at_start` the optional parts come before the first part. Empty parts
    are left out of the join.
    """
    sep = _lookup_option("delimiter", delimiter, PROMPT_MATRIX_DELIMITERS)
    first, optional = parts[0], parts[1:]
    prompts = []
    for i in range(1 << len(optional)):
        chosen = [text for k, text in enumerate(optional) if i >> k & 1]
        ordered = [*chosen, first] if put_at_start else [first, *chosen]
        prompts.append(sep.join(p for p in ordered if p))
    return prompts


def _lookup_option(name: str, value: str, choices: typing.Mapping[str, str]) -> str:
    if value not in choices:
        raise BoothError(f"unknown prompt matrix {name} {value!r}; valid: {', '.join(choices)}")
    return choices[value]


def prompt_matrix_jobs(
    params: GenerationParams,
    *,
    put_at_start: bool = False,
    different_seeds: bool = False,
    prompt_type: str = "positive",
    delimiter: str = "comma",
    rng: random.Random | None = None,
) -> list[GenerationParams]:
    """One job per prompt-matrix combination (A1111 `scripts/prompt_matrix.py`).

    Args:
        params: base params; `prompt` (or `negative_prompt` for prompt_type "negative") holds the `|` parts.
        put_at_start: put the optional parts before the always-kept first part.
        different_seeds: job i gets seed + i; otherwise every job shares the (resolved) base seed.
        prompt_type: "positive" or "negative": which prompt the matrix is applied to.
        delimiter: "comma" (", ") or "space" (" ").
        rng: source for a -1 base seed.

    Returns:
        2^(n-1) jobs in combination order, each with batch_size = n_iter = 1 (A1111 batches the combinations
        themselves, so each combination yields exactly one image).
    """
    field = _lookup_option("prompt_type", prompt_type, PROMPT_MATRIX_FIELDS)
    parts = split_prompt_matrix(getattr(params, field))
    prompts = prompt_matrix_prompts(parts, put_at_start=put_at_start, delimiter=delimiter)
    base = fix_seeds(params, rng or random.Random()).replace(batch_size=1, n_iter=1)
    return [
        base.replace(**{field: text}, seed=base.seed + (i if different_seeds else 0))
        for i, text in enumerate(prompts)
    ]


def run_prompt_matrix(
    params: GenerationParams,
    generate: Generate,
    *,
    put_at_start: bool = False,
    different_seeds: bool = False,
    prompt_type: str = "positive",
    delimiter: str = "comma",
    margin_size: int = 0,
    rng: random.Random | None = None,
) -> ScriptResult:
    """Generate every prompt-matrix combination and draw the labelled grid (rows = 2^((n-1)//2)).

    Options are those of `prompt_matrix_jobs`, plus `margin_size` (pixels between cells). Column labels show
    the first half of the optional parts, row labels the second half; absent parts are greyed and struck
    through (A1111 `images.draw_prompt_matrix`).
    """
    jobs = prompt_matrix_jobs(
        params,
        put_at_start=put_at_start,
        different_seeds=different_seeds,
        prompt_type=prompt_type,
        delimiter=delimiter,
        rng=rng,
    )
    field = PROMPT_MATRIX_FIELDS[prompt_type]
    parts = split_prompt_matrix(getattr(params, field))
    batches = [_generate_checked(generate, job) for job in jobs]
    grid = prompt_matrix_grid([_cell_image(batch) for batch in batches], parts, margin=margin_size)
    labels = _prompt_matrix_labels(parts)
    labels["prompts"] = [getattr(job, field) for job in jobs]
    return ScriptResult(grid, [im for batch in batches for im in batch], jobs, labels)


def _prompt_matrix_labels(parts: Sequence[str]) -> dict[str, list[str]]:
    """Column ("x") and row ("y") labels as text: the optional parts present in that column or row."""
    rows, cols = prompt_matrix_shape(len(parts))
    optional = list(parts[1:])
    half = (len(optional) + 1) // 2

    def active(texts: Sequence[str], bits: int) -> str:
        return ", ".join(t for k, t in enumerate(texts) if bits >> k & 1)

    return {
        "x": [active(optional[:half], c) for c in range(cols)],
        "y": [active(optional[half:], r) for r in range(rows)],
    }


# --------------------------------------------------------------------------------------------------------
# Typed field values (shared by the X/Y/Z plot and prompts from file)


@dataclass(frozen=True)
class FieldType:
    """The scalar type of a GenerationParams field; `optional` when None is allowed."""

    base: type
    optional: bool = False


def field_types() -> dict[str, FieldType]:
    """Scalar (int/float/str/bool, optionally None) GenerationParams fields by name; lists are left out."""
    hints = typing.get_type_hints(GenerationParams)
    found = {f.name: _scalar_type(hints[f.name]) for f in dataclasses.fields(GenerationParams)}
    return {name: ft for name, ft in found.items() if ft is not None}


def _scalar_type(hint: Any) -> FieldType | None:
    is_union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    args = typing.get_args(hint) if is_union else (hint,)
    concrete = [a for a in args if a is not type(None)]
    if len(concrete) == 1 and concrete[0] in (int, float, str, bool):
        return FieldType(concrete[0], optional=len(concrete) < len(args))
    return None


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def convert_value(text: str, ftype: FieldType) -> Any:
    """Parse `text` as a value of `ftype`; raise ValueError with a user-readable reason."""
    s = text.strip()
    if ftype.optional and s.lower() == "none":
        return None
    if ftype.base is bool:
        if s.lower() in _TRUE + _FALSE:
            return s.lower() in _TRUE
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    if ftype.base is int:
        try:
            return int(s)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if ftype.base is float:
        try:
            value = float(s)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a finite number")
        return value
    return text


# --------------------------------------------------------------------------------------------------------
# Range syntax (A1111 scripts/xyz_grid.py `re_range*`)

_INT = r"[+-]?\d+"
_FLOAT = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"


def _range_pattern(num: str) -> re.Pattern[str]:
    return re.compile(rf"\s*({num})\s*-\s*({num})\s*(?:\(\s*({num})\s*\)|\[\s*(\d+)\s*\])?\s*")


_INT_RANGE = _range_pattern(_INT)
_FLOAT_RANGE = _range_pattern(_FLOAT)


def expand_range(text: str, kind: type) -> list[Any] | None:
    """Expand `a-b`, `a-b (+step)` or `a-b [count]` into values of `kind` (int or float); None if no range.

    Both ends are inclusive. Without an increment the step is +1, or -1 when b < a. `[count]` gives `count`
    evenly spaced values from a to b (ints truncated, as A1111's `int(np.linspace(...))`). A zero increment,
    or one that moves away from b, raises ValueError.
    """
    m = (_INT_RANGE if kind is int else _FLOAT_RANGE).fullmatch(text)
    if m is None:
        return None
    start, end = kind(m[1]), kind(m[2])
    if m[4] is not None:
        return _linspace(start, end, int(m[4]), kind)
    step = kind(m[3]) if m[3] is not None else (1 if end >= start else -1)
    if step == 0 or (end - start) * step < 0:
        raise ValueError(f"range {text.strip()!r} never reaches its end")
    count = math.floor((end - start) / step + 1e-9) + 1
    _check_count(text, count)
    return [_clean(start + i * step, kind) for i in range(count)]


def _linspace(start: float, end: float, count: int, kind: type) -> list[Any]:
    if count < 1:
        raise ValueError(f"range count must be at least 1, got {count}")
    _check_count(f"[{count}]", count)
    if count == 1:
        return [kind(start)]
    return [_clean(start + (end - start) * i / (count - 1), kind) for i in range(count)]


def _check_count(text: str, count: int) -> None:
    if count > MAX_AXIS_VALUES:
        raise ValueError(f"{text.strip()!r} expands to {count} values (limit {MAX_AXIS_VALUES})")


def _clean(value: float, kind: type) -> Any:
    """Truncate to int, or round away float noise like 0.30000000000000004."""
    return int(value) if kind is int else round(value, 10)


# --------------------------------------------------------------------------------------------------------
# X/Y/Z plot axes (A1111 scripts/xyz_grid.py)

NOTHING = "Nothing"
PROMPT_SR = "Prompt S/R"
PROMPT_ORDER = "Prompt order"
SIZE = "Size"

# A1111 axis label -> GenerationParams field.
FIELD_AXES = types.MappingProxyType(
    {
        "Seed": "seed",
        "Var. seed": "subseed",
        "Var. strength": "subseed_strength",
        "Steps": "steps",
        "Hires steps": "hr_second_pass_steps",
        "CFG Scale": "cfg_scale",
        "Image CFG Scale": "image_cfg_scale",
        "Sampler": "sampler_name",
        "Hires sampler": "hr_sampler_name",
        "Schedule type": "scheduler",
        "Eta": "eta",
        "Clip skip": "clip_skip",
        "Denoising": "denoising_strength",
        "Hires upscaler": "hr_upscaler",
        "Guidance rescale": "guidance_rescale",
        "Sigma Churn": "s_churn",
        "Sigma min": "s_tmin",
        "Sigma max": "s_tmax",
        "Sigma noise": "s_noise",
        "Initial noise multiplier": "initial_noise_multiplier",
        "Cond. Image Mask Weight": "inpainting_mask_weight",
        "Refiner checkpoint": "refiner_checkpoint",
        "Refiner switch at": "refiner_switch_at",
        "Negative Guidance minimum sigma": "s_min_uncond",
        "Extra noise": "img2img_extra_noise",
    }
)
CHECKPOINT = "Checkpoint name"
VAE = "VAE"
STYLES = "Styles"
# Axes that set an A1111 option for the cell (`GenerationParams.override_settings`): label -> option.
SETTING_AXES = types.MappingProxyType({CHECKPOINT: "sd_model_checkpoint", VAE: "sd_vae"})
# Axes that are not a single field: label -> kind.
SPECIAL_AXES = types.MappingProxyType(
    {
        NOTHING: "nothing",
        PROMPT_SR: "prompt_sr",
        PROMPT_ORDER: "prompt_order",
        SIZE: "size",
        CHECKPOINT: "setting",
        VAE: "setting",
        STYLES: "styles",
    }
)
_SEED_FIELDS = ("seed", "subseed")
_SIZE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")


@dataclass(frozen=True)
class Axis:
    """A parsed plot axis: what it changes (`kind`, `field`) and its typed values with their labels."""

    which: str  # "X", "Y" or "Z", for messages
    label: str  # A1111 label (or field name); "" for Nothing
    kind: str  # "nothing" | "field" | "size" | "prompt_sr" | "prompt_order" | "setting" | "styles"
    field: str | None
    values: tuple[Any, ...]
    labels: tuple[str, ...]

    def fail(self, problem: str) -> BoothError:
        return BoothError(f"{self.which} axis {self.label!r}: {problem}")


# A1111 axis labels in the order of its axis dropdown (`xyz_grid.py` `axis_options`).
AXIS_NAMES = (
    NOTHING,
    "Seed",
    "Var. seed",
    "Var. strength",
    "Steps",
    "Hires steps",
    "CFG Scale",
    "Image CFG Scale",
    PROMPT_SR,
    PROMPT_ORDER,
    "Sampler",
    "Hires sampler",
    "Schedule type",
    "Eta",
    "Clip skip",
    "Denoising",
    "Hires upscaler",
    "Guidance rescale",
    "Sigma Churn",
    "Sigma min",
    "Sigma max",
    "Sigma noise",
    "Initial noise multiplier",
    "Cond. Image Mask Weight",
    SIZE,
    CHECKPOINT,
    VAE,
    STYLES,
    "Refiner checkpoint",
    "Refiner switch at",
    "Negative Guidance minimum sigma",
    "Extra noise",
)


def axis_names() -> list[str]:
    """Every A1111 axis label accepted (any scalar GenerationParams field name is accepted too)."""
    return list(AXIS_NAMES)


def resolve_axis_name(which: str, name: str) -> tuple[str, str, str | None]:
    """Map an axis name (A1111 label or field name, case-insensitive) to (label, kind, field)."""
    key = name.strip().lower()
    for label, kind in SPECIAL_AXES.items():
        if key == label.lower():
            return label, kind, SETTING_AXES.get(label)
    for label, field in FIELD_AXES.items():
        if key in (label.lower(), field):
            return label, "field", field
    if key in field_types():
        return key, "field", key
    raise BoothError(
        f"unknown {which} axis {name!r}; valid: {', '.join(axis_names())}, "
        f"or a GenerationParams field: {', '.join(field_types())}"
    )


def split_values(text: str) -> list[str]:
    """A1111 `csv_string_to_list_strip`: CSV with optional quotes, each value stripped."""
    rows = csv.reader(io.StringIO(text), skipinitialspace=True)
    return [value.strip() for row in rows for value in row]


def parse_axis(
    which: str,
    name: str | None,
    values: str | None,
    rng: random.Random,
    styles: typing.Mapping[str, Any] | None = None,
) -> Axis:
    """Parse one axis: its name (None = Nothing) and its CSV/range value string.

    Seed and Var. seed values of -1 each become a random seed (A1111 fixes them the same way). A Styles value
    names one style or several ("Oil,Cinematic", quoted), looked up in `styles` (`booth.prompts.styles`).
    """
    if name is None:
        if values and values.strip():
            raise BoothError(f"{which} values {values!r} given without a {which} axis")
        name = NOTHING
    label, kind, field = resolve_axis_name(which, name)
    axis = Axis(which, label, kind, field, (), ())
    if kind == "nothing":
        return dataclasses.replace(axis, label="", values=(None,), labels=("",))
    raw = split_values(values or "")
    if kind != "prompt_sr":  # an empty S/R replacement deletes the search string, as in A1111
        raw = [v for v in raw if v]
    if not raw:
        raise axis.fail("no values")
    if kind == "styles":
        parsed = _parse_styles(axis, raw, styles)
    else:
        parsed = _PARSERS[kind](axis, raw, rng)
    return dataclasses.replace(
        axis, values=tuple(parsed), labels=tuple(format_axis_label(axis, v) for v in parsed)
    )


def _parse_field_values(axis: Axis, raw: list[str], rng: random.Random) -> list[Any]:
    ftype = field_types()[axis.field]
    values: list[Any] = []
    for text in raw:
        try:
            expanded = expand_range(text, ftype.base) if ftype.base in (int, float) else None
            values.extend(expanded if expanded is not None else [convert_value(text, ftype)])
        except ValueError as err:
            raise axis.fail(str(err)) from None
    if len(values) > MAX_AXIS_VALUES:
        raise axis.fail(f"{len(values)} values (limit {MAX_AXIS_VALUES})")
    if axis.field in _SEED_FIELDS:
        values = [resolve_seed(v, rng) for v in values]
    return values


def _parse_sizes(axis: Axis, raw: list[str], rng: random.Random) -> list[tuple[int, int]]:
    sizes = []
    for text in raw:
        m = _SIZE.fullmatch(text)
        if m is None:
            raise axis.fail(f"{text!r} is not a size like 512x768")
        sizes.append((int(m[1]), int(m[2])))
    return sizes


def _parse_sr(axis: Axis, raw: list[str], rng: random.Random) -> list[str]:
    return raw


def _parse_styles(axis: Axis, raw: list[str], styles: typing.Mapping[str, Any] | None) -> list[tuple]:
    """Each value: the styles it names (A1111 `apply_styles` splits a value on ","), as `PromptStyle`s."""
    if not styles:
        raise axis.fail("no styles loaded: give the styles.csv (--styles-file)")
    try:
        return [_named_styles(styles, v) for v in raw]
    except BoothError as err:
        raise axis.fail(str(err)) from None


def _named_styles(styles: typing.Mapping[str, Any], names: str) -> tuple:
    """The `PromptStyle`s a comma-separated list of names picks (A1111 `apply_styles` splits on ",")."""
    from booth.prompts.styles import select_styles

    return tuple(select_styles(dict(styles), [n.strip() for n in names.split(",") if n.strip()]))


def _parse_order(axis: Axis, raw: list[str], rng: random.Random) -> list[tuple[str, ...]]:
    if len(raw) > 6:
        raise axis.fail(f"{len(raw)} tokens give {math.factorial(len(raw))} orders (limit 6 tokens)")
    return list(permutations(raw))


_PARSERS: types.MappingProxyType[str, Callable[[Axis, list[str], random.Random], list[Any]]] = (
    types.MappingProxyType(
        {
            "field": _parse_field_values,
            "size": _parse_sizes,
            "prompt_sr": _parse_sr,
            "prompt_order": _parse_order,
            "setting": _parse_sr,  # the values as given; the job's runner checks them
        }
    )
)


def format_value(value: Any) -> str:
    """Floats rounded to 8 places (A1111 `format_value_add_label`), and integral floats shown as ints."""
    if isinstance(value, float):
        value = round(value, 8)
        return str(int(value)) if value.is_integer() else str(value)
    return str(value)


def format_axis_label(axis: Axis, value: Any) -> str:
    """A1111 cell labels: "Steps: 20"; Prompt S/R shows the value alone, Prompt order the tokens joined."""
    if axis.kind == "prompt_sr":
        return value
    if axis.kind == "prompt_order":
        return ", ".join(value)
    if axis.kind == "size":
        return f"{axis.label}: {value[0]}x{value[1]}"
    if axis.label in (CHECKPOINT, "Refiner checkpoint"):
        return _model_label(value)  # A1111 `format_remove_path`
    if axis.kind == "styles":
        return f"{axis.label}: {', '.join(style.name for style in value)}"
    return f"{axis.label}: {format_value(value)}"


def _model_label(value: str) -> str:
    """A model's file or folder name without its folders (a hub id stays whole)."""
    import os

    if value is None:  # a refiner axis's "None"
        return "None"
    return os.path.basename(os.path.normpath(value)) if os.path.exists(value) else value


def apply_axis(axis: Axis, params: GenerationParams, value: Any) -> GenerationParams:
    """Return `params` with one axis value applied (A1111 `AxisOption.apply`)."""
    if axis.kind == "field":
        return params.replace(**{axis.field: value})
    if axis.kind == "size":
        return params.replace(width=value[0], height=value[1])
    if axis.kind == "prompt_sr":
        return _apply_prompt_sr(axis, params, value)
    if axis.kind == "prompt_order":
        return params.replace(prompt=_reorder_prompt(axis, params.prompt, value))
    if axis.kind == "setting":
        return params.replace(override_settings={**params.override_settings, axis.field: value})
    if axis.kind == "styles":
        return _merge_styles(params, value)
    return params


def _merge_styles(params: GenerationParams, chosen: Sequence[Any]) -> GenerationParams:
    """`params` with the `PromptStyle`s `chosen` merged in, their names added to those already recorded."""
    from booth.prompts.styles import apply_to_params

    styled = apply_to_params(params, chosen)
    return styled.replace(styles=params.styles + styled.styles)


def _apply_prompt_sr(axis: Axis, params: GenerationParams, replacement: str) -> GenerationParams:
    """A1111 `apply_prompt`: the first value is the search string, replaced in prompt and negative prompt."""
    search = axis.values[0]
    if search not in params.prompt and search not in params.negative_prompt:
        raise axis.fail(f"{search!r} not found in the prompt or negative prompt")
    return params.replace(
        prompt=params.prompt.replace(search, replacement),
        negative_prompt=params.negative_prompt.replace(search, replacement),
    )


def _reorder_prompt(axis: Axis, prompt: str, order: tuple[str, ...]) -> str:
    """A1111 `apply_order`: the tokens' slots, in order of first appearance, are refilled in `order`."""
    missing = [t for t in order if t not in prompt]
    if missing:
        raise axis.fail(f"{missing[0]!r} not found in the prompt")
    gaps, rest = [], prompt
    for token in sorted(order, key=prompt.find):
        cut = rest.find(token)
        gaps.append(rest[:cut])
        rest = rest[cut + len(token) :]
    return "".join(gap + token for gap, token in zip(gaps, order)) + rest


# --------------------------------------------------------------------------------------------------------
# X/Y/Z plot jobs and runner

Jobs3D = list[list[list[GenerationParams]]]


def xyz_grid_jobs(
    params: GenerationParams,
    x_axis: str,
    x_values: str,
    y_axis: str | None = None,
    y_values: str | None = None,
    z_axis: str | None = None,
    z_values: str | None = None,
    *,
    rng: random.Random | None = None,
    styles: typing.Mapping[str, Any] | None = None,
) -> tuple[Jobs3D, list[str], list[str], list[str]]:
    """Jobs for an X/Y/Z plot, indexed `jobs[z][y][x]`, plus the x, y and z labels.

    A base seed (or subseed) of -1 becomes one random seed shared by every cell (A1111 with "Keep -1 for
    seeds" off). Cells apply X, then Y, then Z; each cell is validated before anything is generated. `styles`
    are the styles a Styles axis may name.
    """
    rng = rng or random.Random()
    x = parse_axis("X", x_axis, x_values, rng, styles)
    y = parse_axis("Y", y_axis, y_values, rng, styles)
    z = parse_axis("Z", z_axis, z_values, rng, styles)
    base = fix_seeds(params, rng)
    jobs = [
        [[_cell_job(base, (x, xv), (y, yv), (z, zv)) for xv in x.values] for yv in y.values]
        for zv in z.values
    ]
    return jobs, list(x.labels), list(y.labels), list(z.labels)


def _grouped_order(jobs: list[GenerationParams]) -> list[int]:
    """The order to run `jobs` in: grouped by checkpoint, then by VAE, hires checkpoint and refiner, each group
    in the order its value first appears in the grid, grid order within a group (so a plot over models loads
    each model once)."""
    firsts: dict[tuple[str, str], int] = {}
    keys = []
    for job in jobs:
        key = []
        values = [(option, job.override_settings.get(option, "")) for option in SETTING_AXES.values()]
        values += [("hires", job.hires_checkpoint() or ""), ("refiner", job.refiner() or "")]
        for value in values:
            key.append(firsts.setdefault(value, len(firsts)))
        keys.append(tuple(key))
    return sorted(range(len(jobs)), key=lambda i: keys[i])


def _cell_job(base: GenerationParams, *settings: tuple[Axis, Any]) -> GenerationParams:
    job = base
    for axis, value in settings:
        job = apply_axis(axis, job, value)
    try:
        return job.validate()
    except BoothError as err:
        where = ", ".join(format_axis_label(a, v) for a, v in settings if a.kind != "nothing")
        raise BoothError(f"X/Y grid cell [{where}]: {err}") from None


def xy_grid_jobs(
    params: GenerationParams,
    x_axis: str,
    x_values: str,
    y_axis: str | None = None,
    y_values: str | None = None,
    *,
    rng: random.Random | None = None,
) -> tuple[list[list[GenerationParams]], list[str], list[str]]:
    """Jobs for an X/Y plot, indexed `jobs[y][x]`, plus x and y labels (y is [""] when there is no Y axis).

    Axis names are A1111 labels ("Steps", "CFG Scale", "Prompt S/R", "Size", ...; see `axis_names`) or any
    scalar GenerationParams field name. Values are CSV with optional quotes; int and float axes accept the
    range syntax `1-5`, `1-5 (+2)`, `1-10 [5]`, `0.5-1.0 (+0.25)`.
    """
    jobs, x_labels, y_labels, _ = xyz_grid_jobs(params, x_axis, x_values, y_axis, y_values, rng=rng)
    return jobs[0], x_labels, y_labels


def run_xy_grid(
    params: GenerationParams,
    generate: Generate,
    x_axis: str,
    x_values: str,
    y_axis: str | None = None,
    y_values: str | None = None,
    *,
    z_axis: str | None = None,
    z_values: str | None = None,
    draw_legend: bool = True,
    margin_size: int = 0,
    rng: random.Random | None = None,
    styles: typing.Mapping[str, Any] | None = None,
    check: Callable[[GenerationParams], None] | None = None,
) -> ScriptResult:
    """Generate an X/Y (or X/Y/Z) plot and draw it (A1111 `scripts/xyz_grid.py`, `draw_xyz_grid`).

    A cell whose job yields several images (batch_size * n_iter > 1) shows them as a sub-grid. With a Z axis
    the X/Y grids are laid side by side under the Z labels. Without `draw_legend` no labels are drawn.
    `check(job)` is called on every cell before any is generated (the runner's own checks, e.g. that a
    Checkpoint name exists). Cells that set a checkpoint or VAE run grouped by them (each model loads once,
    as A1111 orders its loops by axis cost); `images` and `jobs` stay in grid order.
    """
    jobs, x_labels, y_labels, z_labels = xyz_grid_jobs(
        params, x_axis, x_values, y_axis, y_values, z_axis, z_values, rng=rng, styles=styles
    )
    flat = [job for plane in jobs for row in plane for job in row]
    for job in flat if check is not None else []:
        check(job)
    order = _grouped_order(flat)
    ran = {i: _generate_checked(generate, flat[i]) for i in order}
    batches = [ran[i] for i in range(len(flat))]
    cells = iter(_cell_image(batch) for batch in batches)
    legend = (y_labels, x_labels) if draw_legend else ([], [])
    sub_grids = [
        annotated_grid([[next(cells) for _ in x_labels] for _ in y_labels], *legend, margin=margin_size)
        for _ in z_labels
    ]
    grid = sub_grids[0]
    if z_labels != [""]:
        grid = annotated_grid([sub_grids], [], z_labels if draw_legend else [], margin=margin_size)
    images = [im for batch in batches for im in batch]
    return ScriptResult(grid, images, flat, {"x": x_labels, "y": y_labels, "z": z_labels})


# --------------------------------------------------------------------------------------------------------
# Prompts from file (A1111 scripts/prompts_from_file.py)

# Keys A1111 accepts that have no GenerationParams field: rejected rather than silently dropped.
UNSUPPORTED_FILE_KEYS = (
    "restore_faces",
    "do_not_save_samples",
    "do_not_save_grid",
    "sampler_index",
    "outpath_samples",
    "outpath_grids",
    "prompt_for_display",
)
_TEXT_KEYS = ("prompt", "negative_prompt")
PROMPT_POSITIONS = ("start", "end")  # where a line's prompt goes in the base prompt
# Keys that are no GenerationParams field but a line may set: the checkpoint (as the X/Y plot's axis does,
# through `override_settings`) and styles (names from the styles.csv, comma-separated).
_SETTING_KEYS = {"sd_model": "sd_model_checkpoint"}
_STYLES_KEY = "styles"


def parse_prompt_line(line: str, line_number: int) -> dict[str, Any]:
    """One line of a prompts file: a plain prompt, or `--key value` options when it starts with `--`.

    A1111 `cmdargs`: values are shell-quoted (`shlex`); `--prompt` and `--negative_prompt` take every token up
    to the next `--` option, joined by spaces; other keys take one value, typed by the GenerationParams field.
    Keys are A1111's (`--steps`, `--cfg_scale`, `--sampler_name`, ...) or any scalar GenerationParams field.
    """
    if not line.lstrip().startswith("--"):
        return {"prompt": line.strip()}
    try:
        tokens = shlex.split(line)
    except ValueError as err:
        raise BoothError(f"line {line_number}: {err}") from None
    options: dict[str, Any] = {}
    pos = 0
    while pos < len(tokens):
        key, values, pos = _next_option(tokens, pos, line_number)
        options[key] = _option_value(key, values, line_number)
    return options


def _next_option(tokens: list[str], pos: int, line_number: int) -> tuple[str, list[str], int]:
    option = tokens[pos]
    if not option.startswith("--"):
        raise BoothError(f"line {line_number}: expected an option starting with '--', got {option!r}")
    key = option[2:]
    end = pos + 2
    if key in _TEXT_KEYS:
        while end < len(tokens) and not tokens[end].startswith("--"):
            end += 1
    values = tokens[pos + 1 : end]
    if not values:
        raise BoothError(f"line {line_number}: missing value for {option}")
    return key, values, end


def _option_value(key: str, values: list[str], line_number: int) -> Any:
    if key in _TEXT_KEYS:
        return " ".join(values)
    if key in _SETTING_KEYS or key == _STYLES_KEY:
        return values[0]
    ftype = field_types().get(key)
    if ftype is None:
        if key in UNSUPPORTED_FILE_KEYS:
            raise BoothError(f"line {line_number}: --{key} is an A1111 option booth does not support")
        raise BoothError(f"line {line_number}: unknown option --{key}")
    try:
        return convert_value(values[0], ftype)
    except ValueError as err:
        raise BoothError(f"line {line_number}: --{key}: {err}") from None


def prompts_from_file_jobs(
    text: str,
    base: GenerationParams,
    *,
    iterate_seed: bool = False,
    same_seed: bool = False,
    rng: random.Random | None = None,
    styles: typing.Mapping[str, Any] | None = None,
    prompt_position: str = "start",
) -> list[GenerationParams]:
    """One job per non-blank line of `text`, each `base` with that line's prompt or options applied.

    A line's prompt (and negative prompt) joins `base`'s with a space, before it (`prompt_position` "start") or
    after it ("end"), when both have one (A1111 1.8+: "Insert prompts at the"); an empty base takes the line's.

    `--sd_model M` sets the job's checkpoint (`override_settings`, for the runner to load); `--styles "A,B"`
    merges those of `styles` (the styles.csv) into the line's prompts.

    Seeds (A1111 `prompts_from_file.py`): by default a -1 seed is resolved per job, so every line gets its
    own random seed. `same_seed` resolves the base seed once for all lines ("Use same random seed for all
    lines"); `iterate_seed` also adds batch_size * n_iter of the base to it after each line ("Iterate seed
    every line"). A line's explicit `--seed` always wins. Lines are not treated as comments (A1111 parity).
    """
    if prompt_position not in PROMPT_POSITIONS:
        raise BoothError(f"prompt position must be start or end, got {prompt_position!r}")
    rng = rng or random.Random()
    seed = resolve_seed(base.seed, rng) if iterate_seed or same_seed else base.seed
    jobs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        options = parse_prompt_line(line, number)
        for key in _TEXT_KEYS:
            mine, theirs = options.get(key), getattr(base, key)
            if mine and theirs:
                options[key] = f"{mine} {theirs}" if prompt_position == "start" else f"{theirs} {mine}"
        settings = {_SETTING_KEYS[k]: options.pop(k) for k in list(options) if k in _SETTING_KEYS}
        style_names = options.pop(_STYLES_KEY, None)
        job = fix_seeds(base.replace(**{"seed": seed, **options}), rng)
        if settings:
            job = job.replace(override_settings={**job.override_settings, **settings})
        try:
            if style_names is not None:
                job = _with_styles(job, style_names, styles)
            jobs.append(job.validate())
        except BoothError as err:
            raise BoothError(f"line {number}: {err}") from None
        if iterate_seed:
            seed += base.batch_size * base.n_iter
    if not jobs:
        raise BoothError("the prompts file has no prompts")
    return jobs


def run_prompts_from_file(
    text: str,
    base: GenerationParams,
    generate: Generate,
    *,
    iterate_seed: bool = False,
    same_seed: bool = False,
    rng: random.Random | None = None,
    styles: typing.Mapping[str, Any] | None = None,
    check: Callable[[GenerationParams], None] | None = None,
    prompt_position: str = "start",
) -> ScriptResult:
    """Generate every line of a prompts file; the grid holds all images (A1111 `image_grid` rule). `check`
    and the run order as in `run_xy_grid` (lines naming a checkpoint run grouped by it); images in line order."""
    jobs = prompts_from_file_jobs(
        text,
        base,
        iterate_seed=iterate_seed,
        same_seed=same_seed,
        rng=rng,
        styles=styles,
        prompt_position=prompt_position,
    )
    for job in jobs if check is not None else []:
        check(job)
    ran = {i: _generate_checked(generate, jobs[i]) for i in _grouped_order(jobs)}
    images = [im for i in range(len(jobs)) for im in ran[i]]
    return ScriptResult(image_grid(images), images, jobs, {"prompts": [job.prompt for job in jobs]})


def _with_styles(
    job: GenerationParams, names: str, styles: typing.Mapping[str, Any] | None
) -> GenerationParams:
    """`job` with the comma-separated styles `names` merged in (A1111 `apply_styles`)."""
    if not styles:
        raise BoothError("--styles needs the styles.csv (--styles-file)")
    return _merge_styles(job, _named_styles(styles, names))
