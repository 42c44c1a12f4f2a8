"""Generation jobs: an A1111 request (as JSON) -> `GenerationParams` -> `Engine.generate` -> A1111 response.

Used twice per request: `check_request` on the HTTP side (everything that can be refused is refused before the
job is queued) and `GenerationRunner.run` on the worker, from the job's stored snapshot
`{"request": <A1111 fields>, "model": <title>, "options": <option values>}`.

Mapping (`a1111.md` §12.3-12.5): `sampler_name or sampler_index` + `scheduler` (None: Automatic), `seed` /
`subseed` / `subseed_strength`, `steps`, `cfg_scale`, `width` / `height` (None: the model's native size, where
A1111 defaults to 512), `batch_size`, `n_iter`, `eta` (None: option `eta_ddim` / `eta_ancestral`),
`denoising_strength`, `resize_mode` 0-3, `init_images` and `initial_noise_multiplier` (img2img), inpainting
(`mask`, `mask_blur` or `mask_blur_x` / `_y`, `mask_round`, `inpainting_fill`, `inpaint_full_res`,
`inpaint_full_res_padding`, `inpainting_mask_invert`, `latent_mask`), `tiling`, `disable_extra_networks`; options
`CLIP_stop_at_last_layers` -> clip skip, `emphasis`, `img2img_fix_steps`, `inpainting_mask_weight` (inpainting
models), `sd_vae` (Automatic, None or a file of `--vae-dir`), per request via `override_settings`; `styles`
(names from `--styles-file`, merged into the prompts when the job is queued and kept with it).
Hires fix (txt2img `enable_hr`): `hr_scale`, `hr_upscaler` (None: "Latent"), `hr_second_pass_steps`,
`hr_resize_x` / `_y`, `hr_sampler_name`, `hr_scheduler`, `hr_prompt`, `hr_negative_prompt`, with
`denoising_strength`, `hr_checkpoint_name` (another model of the same family for the second pass, loaded beside
the job's for that job). The refiner: `refiner_checkpoint` (loaded beside the same way), `refiner_switch_at`,
options `refiner_switch_by_sample_steps`, `hires_fix_refiner_pass` and (SDXL's refiner)
`sdxl_refiner_low_aesthetic_score` / `sdxl_refiner_high_aesthetic_score`.
`alwayson_scripts`: the Latent Couple extension (`{"Latent Couple extension": {"args": [enabled, divisions,
positions, weights, end_at_step]}}`, the extension's own argument order) -> `latent_couple`; the ControlNet
extension's units (`booth.server.controlnet`) -> `controlnet_units`.
Also `seed_resize_from_w` / `_h`, Euler's `s_churn` / `s_tmin` / `s_tmax` / `s_noise`, `s_min_uncond` (NGMS; the
option of that name when a request leaves it out; options `s_min_uncond_all`, `skip_early_cond`), img2img's
`image_cfg_scale` (instruct-pix2pix models) and `styles`; the scripts "x/y/z plot", "prompt matrix" and
"prompts from file or textbox" (`booth.server.scripts`); txt2img's `firstpass_image` with `enable_hr`.
Not supported, refused with a clear error rather than ignored: other `script_name`s and `alwayson_scripts`, an
SDXL refiner single file, `restore_faces`, txt2img on a depth model (no picture to read the depth from);
`firstpass_image` without `enable_hr` (A1111 ignores it).
"""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

from booth.errors import BoothError
from booth.generate.params import EMPHASIS_MODES, REFINER_PASSES, GenerationParams
from booth.prompts.styles import PromptStyle
from booth.server.config import Limits
from booth.server.controlnet import controlnet_units
from booth.server.queue import Job, JobContext, JobFailed, JobStopped, Outcome

GENERATION_KINDS = ("txt2img", "img2img")
LATENT_COUPLE_SCRIPT = "latent couple extension"
ALWAYSON_SCRIPTS = (LATENT_COUPLE_SCRIPT, "controlnet")  # lower-case titles, as A1111 matches them
# request fields stored apart from the job's params (pictures; `alwayson_scripts` holds ControlNet's)
TRANSIENT_FIELDS = ("init_images", "mask", "latent_mask", "firstpass_image", "alwayson_scripts")

# Options (`GET/POST /sdapi/v1/options`) booth understands, with A1111's names and defaults.
OPTION_DEFAULTS: dict[str, Any] = {
    "sd_model_checkpoint": None,  # filled with the default model's title
    "sd_checkpoint_hash": None,
    "CLIP_stop_at_last_layers": 1,
    "emphasis": "Original",
    "img2img_fix_steps": False,
    "inpainting_mask_weight": 1.0,
    "eta_ddim": 0.0,
    "eta_ancestral": 1.0,
    "samples_format": "png",
    "enable_pnginfo": True,
    "live_previews_enable": True,
    "show_progress_every_n_steps": 1,
    "randn_source": "CPU",
    "sd_vae": "Automatic",
    "ESRGAN_tile": 192,  # model upscalers' tile side in input pixels (0: whole picture)
    "ESRGAN_tile_overlap": 16,  # booth: the context margin each tile is run with (A1111: the blend width, 8)
    "extra_networks_default_multiplier": 1.0,  # the weight of a LoRA card's prompt without a preferred weight
    "refiner_switch_by_sample_steps": False,  # the refiner's switch counted in steps, not by the timestep
    "hires_fix_refiner_pass": "second pass",  # with hires fix, the pass(es) the refiner takes part in
    "s_min_uncond": 0.0,  # Negative Guidance minimum sigma, for requests that do not set `s_min_uncond`
    "s_min_uncond_all": False,
    "skip_early_cond": 0.0,
    "img2img_extra_noise": 0.0,  # img2img and the hires pass start from x + (sigma + this) x noise
    "sdxl_refiner_low_aesthetic_score": 2.5,  # what SDXL's refiner is conditioned on, negative prompt / prompt
    "sdxl_refiner_high_aesthetic_score": 6.0,
}
READ_ONLY_OPTIONS = {
    "sd_checkpoint_hash": None,
    "randn_source": "CPU",
    "samples_format": "png",
}
# Options copied into each job (a snapshot: later option changes do not alter queued jobs).
JOB_OPTIONS = (
    "CLIP_stop_at_last_layers",
    "emphasis",
    "img2img_fix_steps",
    "inpainting_mask_weight",
    "eta_ddim",
    "eta_ancestral",
    "sd_vae",
    "refiner_switch_by_sample_steps",
    "hires_fix_refiner_pass",
    "s_min_uncond",
    "s_min_uncond_all",
    "skip_early_cond",
    "sdxl_refiner_low_aesthetic_score",
    "sdxl_refiner_high_aesthetic_score",
    "img2img_extra_noise",
)


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise BoothError(f"option {name} must be true or false, got {value!r}")


def _number(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and int(value) != value):
        raise BoothError(f"option {name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not lo <= value <= hi:
        raise BoothError(f"option {name} must be in [{lo:g}, {hi:g}], got {value!r}")
    return int(value) if integer else float(value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BoothError(f"option {name} must be a non-empty string, got {value!r}")
    return value


def _choice(name: str, value: Any, choices) -> str:
    if value not in choices:
        raise BoothError(f"option {name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


OPTION_VALIDATORS = {
    "CLIP_stop_at_last_layers": lambda v: _number("CLIP_stop_at_last_layers", v, 1, 12, integer=True),
    "emphasis": lambda v: _choice("emphasis", v, EMPHASIS_MODES),
    "img2img_fix_steps": lambda v: _bool("img2img_fix_steps", v),
    "inpainting_mask_weight": lambda v: _number("inpainting_mask_weight", v, 0.0, 1.0),
    "eta_ddim": lambda v: _number("eta_ddim", v, 0.0, 1.0),
    "eta_ancestral": lambda v: _number("eta_ancestral", v, 0.0, 1.0),
    "enable_pnginfo": lambda v: _bool("enable_pnginfo", v),
    "live_previews_enable": lambda v: _bool("live_previews_enable", v),
    "show_progress_every_n_steps": lambda v: _number(
        "show_progress_every_n_steps", v, -1, 1000, integer=True
    ),
    "sd_vae": lambda v: _text("sd_vae", v),  # a listed name: checked against the VAE folders by the caller
    "ESRGAN_tile": lambda v: _number("ESRGAN_tile", v, 0, 4096, integer=True),
    "ESRGAN_tile_overlap": lambda v: _number("ESRGAN_tile_overlap", v, 0, 512, integer=True),
    "extra_networks_default_multiplier": lambda v: _number("extra_networks_default_multiplier", v, 0.0, 2.0),
    "refiner_switch_by_sample_steps": lambda v: _bool("refiner_switch_by_sample_steps", v),
    "hires_fix_refiner_pass": lambda v: _choice("hires_fix_refiner_pass", v, REFINER_PASSES),
    "s_min_uncond": lambda v: _number("s_min_uncond", v, 0.0, 15.0),  # A1111's slider range
    "s_min_uncond_all": lambda v: _bool("s_min_uncond_all", v),
    "skip_early_cond": lambda v: _number("skip_early_cond", v, 0.0, 1.0),
    "img2img_extra_noise": lambda v: _number("img2img_extra_noise", v, 0.0, 1.0),
    "sdxl_refiner_low_aesthetic_score": lambda v: _number("sdxl_refiner_low_aesthetic_score", v, 0.0, 10.0),
    "sdxl_refiner_high_aesthetic_score": lambda v: _number("sdxl_refiner_high_aesthetic_score", v, 0.0, 10.0),
}


def validate_options(values: dict[str, Any]) -> dict[str, Any]:
    """Checked values of the options booth knows (others are ignored, as A1111 ignores unknown keys);
    read-only options may only be 'set' to their fixed value. `sd_model_checkpoint` is checked by the caller."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in READ_ONLY_OPTIONS:
            if value not in (READ_ONLY_OPTIONS[key], None) and key != "sd_checkpoint_hash":
                raise BoothError(f"option {key} is fixed to {READ_ONLY_OPTIONS[key]!r} in booth")
        elif key in OPTION_VALIDATORS:
            out[key] = OPTION_VALIDATORS[key](value)
    return out


# ------------------------------------------------------------------------------------------------------
# request -> GenerationParams


def apply_infotext(request: dict[str, Any], fields_set: set[str], pasted=None) -> dict[str, Any]:
    """A1111 `apply_infotext`: fields absent from the request are taken from its `infotext` string, after
    `pasted(parsed)` (A1111's infotext-pasted callbacks, e.g. `remap_pasted_prompt`) adjusted the parsed fields."""
    from booth.generate.metadata import parse_infotext

    text = request.get("infotext")
    if not text:
        return request
    parsed = parse_infotext(text)
    if pasted is not None:
        pasted(parsed)
    mapping = {
        "Prompt": ("prompt", str),
        "Negative prompt": ("negative_prompt", str),
        "Steps": ("steps", int),
        "Sampler": ("sampler_name", str),
        "Schedule type": ("scheduler", str),
        "CFG scale": ("cfg_scale", float),
        "Image CFG scale": ("image_cfg_scale", float),
        "Seed": ("seed", int),
        "Size-1": ("width", int),
        "Size-2": ("height", int),
        "Variation seed": ("subseed", int),
        "Variation seed strength": ("subseed_strength", float),
        "Seed resize from-1": ("seed_resize_from_w", int),
        "Sigma churn": ("s_churn", float),
        "Sigma tmin": ("s_tmin", float),
        "Sigma tmax": ("s_tmax", float),
        "Sigma noise": ("s_noise", float),
        "Seed resize from-2": ("seed_resize_from_h", int),
        "Denoising strength": ("denoising_strength", float),
        "Hires upscale": ("hr_scale", float),
        "Hires steps": ("hr_second_pass_steps", int),
        "Hires upscaler": ("hr_upscaler", str),
        "Hires resize-1": ("hr_resize_x", int),
        "Hires resize-2": ("hr_resize_y", int),
        "Hires sampler": ("hr_sampler_name", str),
        "Hires schedule type": ("hr_scheduler", str),
        "Hires prompt": ("hr_prompt", str),
        "Hires negative prompt": ("hr_negative_prompt", str),
        "Hires checkpoint": ("hr_checkpoint_name", str),  # "name [hash]": the registry takes the suffix
        "Refiner": ("refiner_checkpoint", str),
        "Refiner switch at": ("refiner_switch_at", float),
        "NGMS": ("s_min_uncond", float),
        "Mask blur": ("mask_blur", int),
        "Masked area padding": ("inpaint_full_res_padding", int),
        "Noise multiplier": ("initial_noise_multiplier", float),
    }
    out = dict(request)
    for key, (name, kind) in mapping.items():
        if key in parsed and name not in fields_set:
            try:
                out[name] = kind(parsed[key])
            except ValueError:
                raise BoothError(f"infotext: {key} {parsed[key]!r} is not a valid {kind.__name__}") from None
    hires_keys = ("Hires upscale", "Hires upscaler", "Hires resize-1")  # as A1111's paste enables hires fix
    if (
        "enable_hr" not in fields_set
        and "Denoising strength" in parsed
        and any(k in parsed for k in hires_keys)
    ):
        out["enable_hr"] = True
    if "Tiling" in parsed and "tiling" not in fields_set:
        out["tiling"] = parsed["Tiling"] == "True"
    for key, option, kind in (
        ("Clip skip", "CLIP_stop_at_last_layers", int),
        ("Extra noise", "img2img_extra_noise", float),
    ):
        if key in parsed:  # A1111: infotext keys of options become override settings
            overrides = dict(out.get("override_settings") or {})
            try:
                overrides.setdefault(option, kind(parsed[key]))
            except ValueError:
                raise BoothError(f"infotext: {key} {parsed[key]!r} is not a valid {kind.__name__}") from None
            out["override_settings"] = overrides
    return out


def _unsupported(request: dict[str, Any], kind: str) -> None:
    from booth.server.scripts import ScriptError, parse_script

    try:
        parse_script(request)
    except ScriptError as exc:
        raise JobFailed(422, str(exc)) from None
    for name in request.get("alwayson_scripts") or {}:
        if name.lower() not in ALWAYSON_SCRIPTS:
            raise JobFailed(422, f"always on script {name} not found")
    if request.get("restore_faces"):
        raise JobFailed(400, "face restoration (restore_faces) is not available in booth")
    if kind == "img2img" and request.get("resize_mode", 0) not in (0, 1, 2, 3):
        raise JobFailed(
            400,
            "resize_mode must be 0 (just resize), 1 (crop and resize), 2 (resize and fill) or 3 (just resize, "
            "latent upscale)",
        )


def _check_limits(request: dict[str, Any], limits: Limits, kind: str) -> None:
    def bad(detail: str):
        raise JobFailed(400, detail)

    for name in ("prompt", "negative_prompt"):
        if len(request.get(name) or "") > limits.max_prompt_chars:
            bad(f"{name} is longer than {limits.max_prompt_chars} characters")
    steps, batch, n_iter = request.get("steps", 1), request.get("batch_size", 1), request.get("n_iter", 1)
    if not 1 <= steps <= limits.max_steps:
        bad(f"steps must be in 1..{limits.max_steps}, got {steps}")
    if not 1 <= batch <= limits.max_batch_size:
        bad(f"batch_size must be in 1..{limits.max_batch_size}, got {batch}")
    if not 1 <= n_iter <= limits.max_n_iter:
        bad(f"n_iter must be in 1..{limits.max_n_iter}, got {n_iter}")
    width, height = request.get("width"), request.get("height")
    for name, value in (("width", width), ("height", height)):
        if value is not None and not 8 <= value <= limits.max_side:
            bad(f"{name} must be in 8..{limits.max_side}, got {value}")
    if width and height and width * height * batch > limits.max_batch_pixels:
        bad(f"width x height x batch_size must be at most {limits.max_batch_pixels} pixels")
    if kind == "txt2img" and request.get("enable_hr"):
        from booth.generate.hires import hires_target

        scale, resize = (
            request.get("hr_scale", 2.0),
            (request.get("hr_resize_x", 0), request.get("hr_resize_y", 0)),
        )
        if not 0 < scale <= 8 and not any(resize):
            bad(f"hr_scale must be in (0, 8], got {scale}")
        if any(not 0 <= side <= limits.max_side for side in resize):
            bad(f"hr_resize_x and hr_resize_y must be in 0..{limits.max_side}, got {resize[0]}x{resize[1]}")
        if width and height:  # the model's native size is known to the worker only (`check_output_size`)
            (to_x, to_y), _ = hires_target(width, height, scale, *resize, vae_scale=8)
            _check_size(to_x, to_y, batch, limits, "the hires size")
    if kind == "img2img" and not request.get("init_images"):
        raise JobFailed(404, "Init image not found")  # A1111's answer (their count: `decode_inputs`)


def latent_couple_setting(request: dict[str, Any]) -> str | None:
    """The Latent Couple settings of a request's `alwayson_scripts` entry (args: enabled, divisions, positions,
    weights, end at step), in the PNG-info form `GenerationParams.latent_couple` takes; None when off."""
    entry = next(
        (v for k, v in (request.get("alwayson_scripts") or {}).items() if k.lower() == LATENT_COUPLE_SCRIPT),
        None,
    )
    if entry is None:
        return None
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list) or len(args) < 5:
        raise JobFailed(
            422, "Latent Couple extension args: [enabled, divisions, positions, weights, end_at_step]"
        )
    from booth.generate.regions import format_settings

    enabled, divisions, positions, weights, end = args[:5]
    if not enabled:
        return None
    return format_settings(
        {"divisions": divisions, "positions": positions, "weights": weights, "end at step": end}
    )


def resolve_sampler_checked(request: dict[str, Any]):
    """A1111: `sampler_name or sampler_index`; unknown -> 404 "Sampler not found" (with the valid names)."""
    from booth.generate.samplers import resolve_sampler

    name = request.get("sampler_name") or request.get("sampler_index") or "Euler"
    scheduler = request.get("scheduler") or "Automatic"
    try:
        resolve_sampler(name, "Automatic")
    except BoothError as exc:
        raise JobFailed(404, f"Sampler not found: {exc}") from None
    return resolve_sampler(name, scheduler)  # BoothError (400) for an unknown / impossible schedule type


def check_output_size(engine: Any, params: GenerationParams, limits: Limits) -> None:
    """The size a job renders at, against the limits, once its model is known: a request without width and
    height takes the model's native size (or the init image's), and hires fix multiplies it."""
    from booth.generate.hires import plan_hires

    width, height = engine._size(params)
    if params.enable_hr:
        plan = plan_hires(params, width, height, engine.vae_scale)
        width, height = plan.width, plan.height
    _check_size(
        width, height, params.batch_size, limits, "the hires size" if params.enable_hr else "the size"
    )


def _check_size(width: int, height: int, batch: int, limits: Limits, what: str) -> None:
    if max(width, height) > limits.max_side:
        raise JobFailed(400, f"{what} {width}x{height} is over {limits.max_side} pixels a side")
    if width * height * batch > limits.max_batch_pixels:
        raise JobFailed(400, f"{what} {width}x{height} x batch_size is over {limits.max_batch_pixels} pixels")


def decode_inputs(kind: str, request: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The uploaded images of a request, decoded safely: `init_images` (RGB), `mask` (RGBA: its alpha can be
    the mask) and `latent_mask` (L); txt2img's `firstpass_image` (RGB). Raises ApiError for anything
    unreadable."""
    from booth.server.security import decode_image

    if kind != "img2img":
        first = request.get("firstpass_image")
        return {"firstpass_image": decode_image(first, limits, "firstpass_image")} if first else {}
    raw = request.get("init_images") or []
    if len(raw) > limits.max_init_images:
        raise JobFailed(400, f"at most {limits.max_init_images} init images per request, got {len(raw)}")
    decoded: dict[str, Any] = {
        "init_images": [decode_image(data, limits, f"init_images[{i}]") for i, data in enumerate(raw)]
    }
    for key, mode in (("mask", "RGBA"), ("latent_mask", "L")):
        if request.get(key):
            decoded[key] = decode_image(request[key], limits, key, convert=mode)
    return decoded


def build_params(
    kind: str,
    request: dict[str, Any],
    options: dict[str, Any],
    limits: Limits,
    uploads: dict | None = None,
    styles: list | None = None,
) -> GenerationParams:
    """The `GenerationParams` of a stored request, with the request's `styles` (`PromptStyle`s) merged in;
    raises JobFailed / BoothError for anything refused."""
    _unsupported(request, kind)
    _check_limits(request, limits, kind)
    sampler, _ = resolve_sampler_checked(request)
    eta = request.get("eta")
    if eta is None and sampler.eta == "ddim" and options.get("eta_ddim", 0.0) != 0.0:
        eta = options["eta_ddim"]
    elif eta is None and sampler.eta == "fixed" and options.get("eta_ancestral", 1.0) != 1.0:
        eta = options["eta_ancestral"]
    params = GenerationParams(
        prompt=request.get("prompt") or "",
        negative_prompt=request.get("negative_prompt") or "",
        steps=request["steps"],
        cfg_scale=request["cfg_scale"],
        sampler_name=request.get("sampler_name") or request.get("sampler_index") or "Euler",
        scheduler=request.get("scheduler") or "Automatic",
        seed=request["seed"],
        subseed=request["subseed"],
        subseed_strength=request["subseed_strength"],
        seed_resize_from_w=request.get("seed_resize_from_w", -1),
        s_churn=request.get("s_churn") or 0.0,
        s_tmin=request.get("s_tmin") or 0.0,
        s_tmax=request.get("s_tmax") or 0.0,
        s_noise=1.0 if request.get("s_noise") is None else request["s_noise"],
        s_min_uncond=options.get("s_min_uncond", 0.0)
        if request.get("s_min_uncond") is None
        else request["s_min_uncond"],
        s_min_uncond_all=bool(options.get("s_min_uncond_all", False)),
        skip_early_cond=options.get("skip_early_cond", 0.0),
        img2img_extra_noise=options.get("img2img_extra_noise", 0.0),
        seed_resize_from_h=request.get("seed_resize_from_h", -1),
        width=request.get("width"),
        height=request.get("height"),
        batch_size=request["batch_size"],
        n_iter=request["n_iter"],
        eta=eta,
        clip_skip=options.get("CLIP_stop_at_last_layers", 1),
        emphasis=options.get("emphasis", "Original"),
        inpainting_mask_weight=options.get("inpainting_mask_weight", 1.0),
        disable_extra_networks=bool(request.get("disable_extra_networks")),
        latent_couple=latent_couple_setting(request),
        tiling=bool(request.get("tiling")),
        controlnet_units=controlnet_units(
            kind, request, limits, ((uploads or {}).get("init_images") or [None])[0]
        ),
        refiner_checkpoint=request.get("refiner_checkpoint"),
        refiner_switch_at=request.get("refiner_switch_at"),  # None (A1111's default): from the first step
        refiner_switch_by_sample_steps=bool(options.get("refiner_switch_by_sample_steps", False)),
        hires_fix_refiner_pass=options.get("hires_fix_refiner_pass", "second pass"),
        sdxl_refiner_low_aesthetic_score=options.get("sdxl_refiner_low_aesthetic_score", 2.5),
        sdxl_refiner_high_aesthetic_score=options.get("sdxl_refiner_high_aesthetic_score", 6.0),
    )
    params = params.replace(refiner_checkpoint=params.refiner())  # "None": none
    if kind == "img2img":
        uploads = uploads or {}
        strength, noise = request.get("denoising_strength"), request.get("initial_noise_multiplier")
        params = params.replace(
            init_images=list(uploads.get("init_images") or []),
            denoising_strength=0.75 if strength is None else strength,
            resize_mode=request.get("resize_mode", 0),
            img2img_fix_steps=bool(options.get("img2img_fix_steps", False)),
            initial_noise_multiplier=1.0 if noise is None else noise,
            image_cfg_scale=1.5 if request.get("image_cfg_scale") is None else request["image_cfg_scale"],
        )
        if uploads.get("mask") is not None:  # A1111's API defaults: fill 0, "Only masked", no padding
            blur = request.get("mask_blur")
            params = params.replace(
                mask=uploads["mask"],
                latent_mask=uploads.get("latent_mask"),
                mask_blur_x=request.get("mask_blur_x", 4) if blur is None else blur,
                mask_blur_y=request.get("mask_blur_y", 4) if blur is None else blur,
                mask_round=bool(request.get("mask_round", True)),
                inpainting_fill=request.get("inpainting_fill", 0),
                inpaint_full_res=bool(request.get("inpaint_full_res", True)),
                inpaint_full_res_padding=request.get("inpaint_full_res_padding", 0),
                inpainting_mask_invert=bool(request.get("inpainting_mask_invert", 0)),
            )
    elif (uploads or {}).get("firstpass_image") and not request.get("enable_hr"):
        raise JobFailed(
            400, "a first-pass image is the first pass of hires fix: turn hires fix on (enable_hr)"
        )
    elif request.get("enable_hr"):
        strength = request.get("denoising_strength")
        params = params.replace(
            enable_hr=True,
            denoising_strength=0.75 if strength is None else strength,
            hr_scale=request.get("hr_scale", 2.0),
            hr_upscaler=request.get("hr_upscaler") or "Latent",
            hr_second_pass_steps=request.get("hr_second_pass_steps", 0),
            hr_resize_x=request.get("hr_resize_x", 0),
            hr_resize_y=request.get("hr_resize_y", 0),
            hr_sampler_name=request.get("hr_sampler_name"),
            hr_scheduler=request.get("hr_scheduler"),
            hr_prompt=request.get("hr_prompt") or "",
            hr_negative_prompt=request.get("hr_negative_prompt") or "",
            hr_checkpoint_name=request.get("hr_checkpoint_name"),
            firstpass_image=(uploads or {}).get("firstpass_image"),
        )
        params = params.replace(hr_checkpoint_name=params.hires_checkpoint())  # "Use same checkpoint": None
    if styles:
        from booth.prompts.styles import apply_to_params

        params = apply_to_params(params, styles)
    return params.validate()


def remap_pasted_prompt(services, parsed: dict[str, Any]) -> dict[str, Any]:
    """A1111's infotext-pasted callback of its Lora extension: each `<lora:NAME:` of the pasted "Prompt" whose
    `Lora hashes` entry matches the hash of one of the server's LoRA files is renamed to that file's card name
    (`remap_pasted_loras`)."""
    if parsed.get("Prompt") and parsed.get("Lora hashes") and services.config.lora_dirs:
        from booth.generate.networks import LoraNetwork, remap_pasted_loras

        network = LoraNetwork(services.config.lora_dirs)
        parsed["Prompt"] = remap_pasted_loras(parsed["Prompt"], parsed["Lora hashes"], network)
    return parsed


def job_options(options: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The option snapshot stored with a job: current options + the request's `override_settings`."""
    snapshot = {key: options.get(key, OPTION_DEFAULTS[key]) for key in JOB_OPTIONS}
    snapshot.update({k: v for k, v in validate_options(dict(overrides or {})).items() if k in JOB_OPTIONS})
    return snapshot


# ------------------------------------------------------------------------------------------------------
# images


def png_bytes(image, infotext: str, extra: dict[str, Any] | None = None, pnginfo: bool = True) -> bytes:
    """PNG bytes with A1111's `parameters` text chunk and booth's JSON chunk."""
    from PIL.PngImagePlugin import PngInfo

    from booth.generate.metadata import BOOTH_KEY, PARAMETERS_KEY, booth_json

    info = None
    if pnginfo:
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, infotext)
        info.add_text(BOOTH_KEY, booth_json(infotext, extra))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# A1111 "Approx cheap" live preview (`sd_vae_approx.cheap_approximation`): a linear map from 4 latent channels.
_CHEAP_SD = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
_CHEAP_SDXL = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163), (-0.3730, -0.2499, -0.2088))  # fmt: skip


def latent_preview(latents, sdxl: bool = False):
    """A small RGB preview of the first image's latents (no VAE call)."""
    import numpy as np
    import torch
    from PIL import Image

    with torch.no_grad():
        x = latents[0].detach().float().cpu()
        if x.shape[0] == 4:
            coeffs = torch.tensor(_CHEAP_SDXL if sdxl else _CHEAP_SD)
            rgb = torch.einsum("chw,cr->rhw", x, coeffs)
        else:
            rgb = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
        array = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ------------------------------------------------------------------------------------------------------
# the runner


def echo_parameters(request: dict[str, Any]) -> dict[str, Any]:
    """The response's `parameters`: the request, without init images / mask unless `include_init_images`."""
    out = dict(request)
    if not out.get("include_init_images"):
        for key in TRANSIENT_FIELDS:
            if key in out:
                out[key] = None
    return out


class GenerationRunner:
    """Runs txt2img / img2img jobs on the worker thread (`booth.server.queue.Runner`)."""

    def __init__(self, kind: str, services):
        self.kind = kind
        self.services = services

    def run(self, job: Job, ctx: JobContext) -> Outcome:
        from starlette.exceptions import HTTPException

        from booth.generate.engine import GenerationState

        services = self.services
        request = {**job.params["request"], **services.queue.inputs(job.id)}  # uploads are stored apart
        options = job.params.get("options") or {}
        limits = services.config.limits
        ctx.report(message="loading model", force=True)
        engine = services.models.get(job.params["model"])
        try:
            uploads = decode_inputs(self.kind, request, limits)
            styles = [PromptStyle(*row) for row in job.params.get("styles") or []]
            params = build_params(self.kind, request, options, limits, uploads, styles)
        except HTTPException as exc:
            raise JobFailed(exc.status_code, str(exc.detail)) from None
        check_output_size(engine, params, limits)
        vae = options.get("sd_vae", "Automatic")
        engine.set_vae(services.models.resolve_vae(vae, job.params["model"], missing_ok=True))  # gone since
        services.models.set_upscaler_tiles(services.current_options())
        engine.state = GenerationState()
        ctx.data["engine"] = engine
        ctx.report(message=None)
        hooks = services.step_hooks

        def on_step(state) -> None:
            for hook in list(hooks):
                hook(job, state)
            if ctx.interrupt_requested or ctx.stop_requested:
                state.interrupted = True
            if state.sampling_step < state.sampling_steps and ctx.take_skip():
                state.skipped = True
            ctx.report(
                progress=state.progress,
                step=state.job_no * state.sampling_steps + state.sampling_step,
                total=state.job_count * state.sampling_steps,
                eta=state.eta(),  # from the measured step times, hires fix's pass at its own cost
            )

        script = job.params.get("script")
        if script:
            return self._run_script(job, ctx, request, params, script, on_step)
        side = _SideModels(services, ctx)
        result = engine.generate(
            params, callback=on_step, **side.engines_for(params, job.params["model"], engine, vae)
        )
        del side  # the hires checkpoint and refiner are this job's alone
        if ctx.stop_requested:
            raise JobStopped()
        return self._outcome(job, request, result)

    def _run_script(self, job: Job, ctx: JobContext, request, params, script, on_step) -> Outcome:
        """An x/y/z plot or prompt matrix (`booth.server.scripts`): each cell on its checkpoint and VAE; the
        progress runs over all cells; the grid first in the response."""
        import dataclasses

        from booth.generate.engine import GenerationState
        from booth.server.scripts import run_script

        services, options = self.services, job.params.get("options") or {}
        results = {}
        cells = {"done": 0, "count": 0}
        side = _SideModels(services, ctx)

        def generate(cell):
            settings = dict(cell.override_settings)
            title = services.registry.find(
                settings.pop("sd_model_checkpoint", None) or job.params["model"]
            ).title
            engine = services.models.get(title)
            vae = settings.pop("sd_vae", None)
            engine.set_vae(
                services.models.resolve_vae(vae or options.get("sd_vae", "Automatic"), title, vae is None)
            )
            engine.state = GenerationState()
            ctx.data["engine"] = engine

            def step(state) -> None:
                on_step(state)
                total = max(1, cells["count"])
                ctx.report(progress=(cells["done"] + state.progress) / total)

            engines = side.engines_for(cell, title, engine, vae or options.get("sd_vae", "Automatic"))
            result = engine.generate(cell.replace(override_settings=settings), callback=step, **engines)
            results[id(cell)] = result
            cells["done"] += 1
            if result.interrupted or ctx.stop_requested:
                ctx.interrupt_requested = True  # the cells after an interrupt stop at their first step
            return result.images

        from booth.server.scripts import script_jobs

        styles = services.style_table()  # the styles.csv files read once for the count and the run
        cells["count"] = len(script_jobs(script, params, styles))
        outcome = run_script(script, params, generate, styles)
        if ctx.stop_requested:
            raise JobStopped()
        ordered = [results[id(cell)] for cell in outcome.jobs if id(cell) in results]
        first = ordered[0]
        from booth.server.scripts import PROMPTS

        grid = script["name"] != PROMPTS  # A1111's prompts from file answers with the lines' pictures alone
        lone = not grid or script["name"] == "prompt matrix" or script["args"].get("include_lone_images")
        picked = ordered if lone else []
        head = [first] if grid else []  # the grid's entry: the first cell's seed and infotext

        def joined(name: str) -> list:
            return [getattr(r, name)[0] for r in head] + [v for r in picked for v in getattr(r, name)]

        combined = dataclasses.replace(
            first,
            images=[outcome.grid] * len(head) + [im for r in picked for im in r.images],
            seeds=joined("seeds"),
            subseeds=joined("subseeds"),
            infotexts=joined("infotexts"),
            prompts=joined("prompts"),
            negative_prompts=joined("negative_prompts"),
            interrupted=any(r.interrupted for r in ordered),
            grids=len(head),
        )
        return self._outcome(job, request, combined)

    def _outcome(self, job: Job, request: dict[str, Any], result) -> Outcome:
        """PNGs (A1111 `parameters` chunk + booth JSON) in the job folder and the A1111 response."""
        services = self.services
        folder = services.config.jobs_dir / job.id
        folder.mkdir(parents=True, exist_ok=True)
        pnginfo = services.current_options().get("enable_pnginfo", True)
        names, encoded = [], []
        for i, (image, seed, infotext) in enumerate(zip(result.images, result.seeds, result.infotexts)):
            extra = {"params": result.params.to_dict(), "seed": seed, "job": job.id}
            extra.update(model=result.model_name, model_hash=result.model_hash)
            data = png_bytes(image, infotext, extra, pnginfo)
            name = f"{i}.png"
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(folder / name)
            names.append(name)
            if request.get("send_images", True):
                encoded.append(b64(data))
            if request.get("save_images"):
                from booth.generate.output import save_generated

                save_generated(image, services.config.outputs_dir, seed, infotext, extra)
        info = json.dumps(result.info(), default=str)
        response = {"images": encoded, "parameters": echo_parameters(request), "info": info}
        stored = {"images": names, "info": info, "interrupted": result.interrupted}
        return Outcome(result=stored, response=response)


class _SideModels:
    """The hires checkpoint and refiner of one job, loaded beside the job's model when a job or cell names one
    other than the model it runs on (`booth.generate.side_models`, keyed by the server's titles)."""

    def __init__(self, services, ctx: JobContext):
        from booth.generate.side_models import SideModels

        self.services, self.ctx = services, ctx
        self.models = SideModels(self._load)

    def _load(self, role: str, title: str):
        what = "hires checkpoint" if role == "hires_engine" else "refiner"
        self.ctx.report(message=f"loading the {what}", force=True)
        return self.services.models.load_beside(title)

    def engines_for(self, params, model_title: str, engine, vae: str = "Automatic") -> dict[str, Any]:
        """`Engine.generate`'s `hires_engine` and `refiner_engine` for `params` run on `engine`, the model
        `model_title`; each side model with the VAE the option `sd_vae` = `vae` means for it, as A1111 applies
        the option to whatever model is loaded."""
        from booth.generate.side_models import side_model_names

        names = side_model_names(params)
        titles = {
            role: self.services.registry.find(n).title if n is not None else None for role, n in names.items()
        }
        engines = self.models.engines_for(titles, model_title, engine)
        for role, side in engines.items():
            if side is not None and side is not engine:
                side.set_vae(self.services.models.resolve_vae(vae, titles[role], missing_ok=True))
        return engines


def response_from_job(job: Job, jobs_dir) -> dict[str, Any]:
    """The A1111 response of a finished job, rebuilt from its stored files (after a restart, or by job id)."""
    result = job.result or {}
    images = []
    for name in result.get("images", []):
        path = jobs_dir / job.id / str(name)
        if re.fullmatch(r"\d+\.png", str(name)) and path.is_file():
            images.append(b64(path.read_bytes()))
    return {
        "images": images,
        "parameters": echo_parameters(job.params.get("request") or {}),
        "info": result.get("info", "{}"),
    }


__all__ = [
    "GENERATION_KINDS",
    "OPTION_DEFAULTS",
    "GenerationRunner",
    "apply_infotext",
    "remap_pasted_prompt",
    "build_params",
    "job_options",
    "latent_preview",
    "png_bytes",
    "response_from_job",
    "validate_options",
]
