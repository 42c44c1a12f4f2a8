"""A1111's selectable scripts over the API: `script_name` "x/y/z plot" and "prompt matrix", with A1111's
positional `script_args` (`booth.generate.scripts` runs them).

* "x/y/z plot": `[x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
  z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x,
  vary_seeds_y, vary_seeds_z, margin_size, csv_mode]` (A1111 1.6+; shorter lists take the defaults). An axis
  type is its label ("Steps", "CFG Scale", "Checkpoint name", ...; 0 or "Nothing": none): A1111's type
  numbers index a list that differs between its versions, so a number other than 0 is refused rather than
  guessed. Values are the CSV / range text, or the dropdown list when the text is empty. Checkpoint name values
  and Refiner checkpoint values are the server's model titles, VAE values its `sd_vae` names. `no_fixed_seeds` and `vary_seeds_*` are
  refused.
* "prompt matrix": `[put_at_start, different_seeds, prompt_type, variations_delimiter, margin_size]`.
* "prompts from file or textbox": `[checkbox_iterate, checkbox_iterate_batch, prompt_position, prompt_txt]`
  (A1111 1.8+; the three-value list of earlier versions, without `prompt_position`, is read too): one job a
  line of `prompt_txt`, a plain prompt or `--key value` options (`booth.generate.scripts.parse_prompt_line`).

The response holds the grid first (`index_of_first_image` 1, as A1111's), then every picture (x/y/z plot:
only with `include_lone_images`), each with its infotext; prompts from file returns its pictures alone, as
A1111's does.
"""

from __future__ import annotations

import csv
import io
from typing import Any

PROMPTS = "prompts from file or textbox"
SCRIPTS = ("prompt matrix", "x/y/z plot", PROMPTS)
_XYZ_ARGS = (
    ("x_type", "Nothing"),
    ("x_values", ""),
    ("x_values_dropdown", []),
    ("y_type", "Nothing"),
    ("y_values", ""),
    ("y_values_dropdown", []),
    ("z_type", "Nothing"),
    ("z_values", ""),
    ("z_values_dropdown", []),
    ("draw_legend", True),
    ("include_lone_images", False),
    ("include_sub_grids", False),
    ("no_fixed_seeds", False),
    ("vary_seeds_x", False),
    ("vary_seeds_y", False),
    ("vary_seeds_z", False),
    ("margin_size", 0),
    ("csv_mode", False),
)
_PROMPTS_ARGS = (
    ("checkbox_iterate", False),
    ("checkbox_iterate_batch", False),
    ("prompt_position", "start"),
    ("prompt_txt", ""),
)
_MATRIX_ARGS = (
    ("put_at_start", False),
    ("different_seeds", False),
    ("prompt_type", "positive"),
    ("variations_delimiter", "comma"),
    ("margin_size", 0),
)


class ScriptError(ValueError):
    """A script request that cannot run (the caller answers it with a 422)."""


def parse_script(request: dict[str, Any]) -> dict[str, Any] | None:
    """{"name", "args"} of the request's script (None without one), its arguments named and checked."""
    name = (request.get("script_name") or "").strip().lower()
    if not name:
        return None
    if name not in SCRIPTS:
        raise ScriptError(
            f"Script not found: {request.get('script_name')!r}; booth runs {', '.join(SCRIPTS)}"
        )
    raw = request.get("script_args") or []
    spec = {"x/y/z plot": _XYZ_ARGS, PROMPTS: _PROMPTS_ARGS}.get(name, _MATRIX_ARGS)
    if not isinstance(raw, list) or len(raw) > len(spec):
        raise ScriptError(f"{name}: script_args must be a list of at most {len(spec)} values")
    if name == PROMPTS and len(raw) == 3:  # A1111 before 1.8: no prompt_position
        raw = [raw[0], raw[1], "start", raw[2]]
    args = {key: raw[i] if i < len(raw) else default for i, (key, default) in enumerate(spec)}
    check = {"x/y/z plot": _xyz, PROMPTS: _prompts}.get(name, _matrix)
    return {"name": name, "args": check(args)}


def _flag(args: dict[str, Any], key: str) -> bool:
    if not isinstance(args[key], bool):
        raise ScriptError(f"{key} must be true or false, got {args[key]!r}")
    return args[key]


def _margin(args: dict[str, Any]) -> int:
    value = args["margin_size"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 500:
        raise ScriptError(f"margin_size must be 0..500 pixels, got {value!r}")
    return int(value)


def _axis(args: dict[str, Any], which: str) -> tuple[str | None, str | None]:
    kind, text, dropdown = args[f"{which}_type"], args[f"{which}_values"], args[f"{which}_values_dropdown"]
    if kind in (0, None, "", "Nothing") and not isinstance(kind, bool):
        return None, None
    if not isinstance(kind, str):
        raise ScriptError(
            f"{which}_type {kind!r}: give the axis by its name (e.g. 'Steps'); A1111's type numbers differ "
            "between its versions"
        )
    if isinstance(text, str) and text.strip():
        return kind, text
    if isinstance(dropdown, list) and dropdown:
        buffer = io.StringIO()
        csv.writer(buffer).writerow([str(v) for v in dropdown])
        return kind, buffer.getvalue().strip()
    raise ScriptError(f"{which} axis {kind!r}: no values")


def _xyz(args: dict[str, Any]) -> dict[str, Any]:
    for key in ("no_fixed_seeds", "vary_seeds_x", "vary_seeds_y", "vary_seeds_z"):
        if _flag(args, key):
            raise ScriptError(f"{key} is not supported by booth's x/y/z plot")
    axes = {which: _axis(args, which) for which in ("x", "y", "z")}
    if axes["x"][0] is None:
        raise ScriptError("x/y/z plot: x_type names no axis")
    if axes["z"][0] is not None and axes["y"][0] is None:
        raise ScriptError("x/y/z plot: a z axis needs a y axis")
    return {
        "x": list(axes["x"]),
        "y": list(axes["y"]),
        "z": list(axes["z"]),
        "draw_legend": _flag(args, "draw_legend"),
        "include_lone_images": _flag(args, "include_lone_images"),
        "margin_size": _margin(args),
    }


def _prompts(args: dict[str, Any]) -> dict[str, Any]:
    if args["prompt_position"] not in ("start", "end"):
        raise ScriptError(f"prompt_position must be start or end, got {args['prompt_position']!r}")
    text = args["prompt_txt"]
    if not isinstance(text, str) or not text.strip():
        raise ScriptError("prompts from file or textbox: prompt_txt holds no prompts")
    return {
        "iterate_seed": _flag(args, "checkbox_iterate"),
        "same_seed": _flag(args, "checkbox_iterate_batch"),
        "prompt_position": args["prompt_position"],
        "text": text,
    }


def _matrix(args: dict[str, Any]) -> dict[str, Any]:
    if args["prompt_type"] not in ("positive", "negative"):
        raise ScriptError(f"prompt_type must be positive or negative, got {args['prompt_type']!r}")
    if args["variations_delimiter"] not in ("comma", "space"):
        raise ScriptError(
            f"variations_delimiter must be comma or space, got {args['variations_delimiter']!r}"
        )
    return {
        "put_at_start": _flag(args, "put_at_start"),
        "different_seeds": _flag(args, "different_seeds"),
        "prompt_type": args["prompt_type"],
        "delimiter": args["variations_delimiter"],
        "margin_size": _margin(args),
    }


def script_info() -> list[dict[str, Any]]:
    """A1111 `/sdapi/v1/script-info` entries of these scripts (txt2img and img2img): their `script_args` in
    order, each `{label, value, minimum, maximum, step, choices}`; an axis type's choices are booth's axes."""
    from booth.generate.scripts import axis_names

    def arg(label, value, choices=None, minimum=None, maximum=None, step=None):
        return {
            "label": label,
            "value": value,
            "minimum": minimum,
            "maximum": maximum,
            "step": step,
            "choices": choices,
        }

    axes = axis_names()
    xyz = []
    for key, default in _XYZ_ARGS:
        label = key.replace("_", " ").capitalize()
        choices = axes if key.endswith("_type") else None
        xyz.append(arg(label, default, choices, *((0, 500, 2) if key == "margin_size" else ())))
    matrix = [
        arg("Put variable parts at start of prompt", False),
        arg("Use different seed for each picture", False),
        arg("Select prompt", "positive", ["positive", "negative"]),
        arg("Select joining char", "comma", ["comma", "space"]),
        arg("Grid margins (px)", 0, None, 0, 500, 2),
    ]
    prompts = [
        arg("Iterate seed every line", False),
        arg("Use same random seed for all lines", False),
        arg("Insert prompts at the", "start", ["start", "end"]),
        arg("List of prompt inputs", ""),
    ]
    return [
        {"name": name, "is_alwayson": False, "is_img2img": img2img, "args": args}
        for img2img in (False, True)
        for name, args in (("prompt matrix", matrix), ("x/y/z plot", xyz), (PROMPTS, prompts))
    ]


def script_jobs(script: dict[str, Any], params, styles=None) -> list:
    """Every job the script will run (the checks of `booth.generate.scripts`, before anything is queued)."""
    from booth.generate.scripts import prompt_matrix_jobs, prompts_from_file_jobs, xyz_grid_jobs

    args = script["args"]
    if script["name"] == PROMPTS:
        options = {k: args[k] for k in ("iterate_seed", "same_seed", "prompt_position")}
        return prompts_from_file_jobs(args["text"], params, styles=styles, **options)
    if script["name"] == "prompt matrix":
        options = {k: args[k] for k in ("put_at_start", "different_seeds", "prompt_type", "delimiter")}
        return prompt_matrix_jobs(params, **options)
    (xa, xv), (ya, yv), (za, zv) = args["x"], args["y"], args["z"]
    jobs = xyz_grid_jobs(params, xa, xv, ya, yv, za, zv, styles=styles)[0]
    return [job for plane in jobs for row in plane for job in row]


def run_script(script: dict[str, Any], params, generate, styles=None):
    """Run the script with `generate(job) -> images`; its `ScriptResult`."""
    from booth.generate.scripts import run_prompt_matrix, run_prompts_from_file, run_xy_grid

    args = script["args"]
    if script["name"] == PROMPTS:
        options = {k: args[k] for k in ("iterate_seed", "same_seed", "prompt_position")}
        return run_prompts_from_file(args["text"], params, generate, styles=styles, **options)
    if script["name"] == "prompt matrix":
        return run_prompt_matrix(
            params,
            generate,
            put_at_start=args["put_at_start"],
            different_seeds=args["different_seeds"],
            prompt_type=args["prompt_type"],
            delimiter=args["delimiter"],
            margin_size=args["margin_size"],
        )
    (xa, xv), (ya, yv), (za, zv) = args["x"], args["y"], args["z"]
    return run_xy_grid(
        params,
        generate,
        xa,
        xv,
        ya,
        yv,
        z_axis=za,
        z_values=zv,
        draw_legend=args["draw_legend"],
        margin_size=args["margin_size"],
        styles=styles,
    )


__all__ = ["SCRIPTS", "ScriptError", "parse_script", "run_script", "script_info", "script_jobs"]
