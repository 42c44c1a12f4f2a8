"""A1111's ControlNet extension over the API: `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}` with the
extension's unit objects, and its `/controlnet/model_list`, `/controlnet/module_list`, `/controlnet/version`.

A unit: `enabled` (true), `model` (a title of `--controlnet-dir`, "name [hash]" or the name; "None": the unit is
off), `image` (base64, or `{"image": ..., "mask": ...}`; legacy `input_image`; img2img without one: the first
init image, as the extension does), `module` (none, invert, canny, threshold, tile_resample, blur_gaussian;
reference_only, which takes no model),
`weight` (1), `guidance_start` (0), `guidance_end` (1), `control_mode` (0-2 or the label), `resize_mode` (0-2
or the label; the extension's older labels "Inner Fit (Scale to Fit)" and "Outer Fit (Shrink to Fit)" too),
`processor_res`, `threshold_a`, `threshold_b` (-1: the preprocessor's defaults), `pixel_perfect` (false),
`hr_option` (with hires fix: "Both", "Low res only", "High res only", or 0-2).
`POST /controlnet/detect` runs a preprocessor on pictures and answers with the maps. Fields booth has no use for (`low_vram`, `guess_mode`,
`save_detected_map` ...) are ignored, as the extension ignores unknown ones.
"""

from __future__ import annotations

from typing import Any

from booth.server.queue import JobFailed

SCRIPT = "controlnet"
_RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
}
_NUMBERS = {  # -1: the preprocessor's own default (the extension's API)
    "weight": 1.0,
    "guidance_start": 0.0,
    "guidance_end": 1.0,
    "processor_res": -1,
    "threshold_a": -1.0,
    "threshold_b": -1.0,
}


def controlnet_units(kind: str, request: dict[str, Any], limits, init_image=None) -> list:
    """The `ControlUnit`s of a request's ControlNet entry (the enabled ones with a model), images decoded."""
    entry = next(
        (v for k, v in (request.get("alwayson_scripts") or {}).items() if str(k).lower() == SCRIPT), None
    )
    if entry is None:
        return []
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise JobFailed(422, "ControlNet args: a list of unit objects")
    return [unit for i, raw in enumerate(args) if (unit := _unit(i, raw, limits, init_image)) is not None]


def _unit(i: int, raw: Any, limits, init_image):
    from booth.generate.controlnet import (
        CONTROL_MODES,
        HR_OPTIONS,
        REFERENCE_MODULES,
        RESIZE_MODES,
        ControlUnit,
    )
    from booth.server.security import decode_image

    if not isinstance(raw, dict):
        raise JobFailed(422, f"ControlNet unit {i}: a JSON object of the unit's fields")
    model = raw.get("model") or "None"
    module = str(raw.get("module") or "none").lower()
    needs_model = module not in REFERENCE_MODULES  # reference_only runs on the UNet alone
    if not raw.get("enabled", True) or (needs_model and str(model).strip() in ("None", "none")):
        return None
    image = raw.get("image") or raw.get("input_image")
    if isinstance(image, dict):
        image = image.get("image")
    if image:
        picture = decode_image(image, limits, f"ControlNet unit {i} image")
    elif init_image is not None:
        picture = init_image.copy()
    else:
        raise JobFailed(422, f"ControlNet unit {i}: no image (give `image`)")
    fields: dict[str, Any] = {}
    for key, default in _NUMBERS.items():
        value = raw.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise JobFailed(422, f"ControlNet unit {i}: {key} must be a number, got {value!r}")
        fields[key] = type(default)(value)
    fields["control_mode"] = _label(i, "control_mode", raw.get("control_mode", 0), CONTROL_MODES)
    resize = raw.get("resize_mode", 1)
    fields["resize_mode"] = _label(i, "resize_mode", _RESIZE_ALIASES.get(resize, resize), RESIZE_MODES)
    unit = ControlUnit(
        model=str(model),
        image=picture,
        module=module,
        hr_option=_label(i, "hr_option", raw.get("hr_option", "Both"), HR_OPTIONS),
        pixel_perfect=bool(raw.get("pixel_perfect", False)),
        **fields,
    )
    try:
        return unit.validate()
    except Exception as exc:  # BoothError: a one-line reason
        raise JobFailed(422, f"ControlNet unit {i}: {exc}") from None


def _label(i: int, key: str, value: Any, labels: tuple[str, ...]) -> str:
    """A mode given as its number (the extension's enum index) or its label."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return labels[value]
    if value in labels:
        return value
    raise JobFailed(
        422, f"ControlNet unit {i}: {key} {value!r}: choose 0-{len(labels) - 1} or one of {', '.join(labels)}"
    )


def _detect(body: dict[str, Any], limits) -> dict[str, Any]:
    """The extension's `/controlnet/detect`: `controlnet_module`, `controlnet_input_images` (base64),
    `controlnet_processor_res`, `controlnet_threshold_a` / `_b` -> `{"images": [maps, base64 PNG], "info"}`."""
    import base64
    import io

    from booth.errors import BoothError
    from booth.generate.controlnet import ControlUnit
    from booth.server.errors import ApiError
    from booth.server.security import decode_image

    images = body.get("controlnet_input_images") or []
    if not isinstance(images, list) or not images:
        raise ApiError(422, "controlnet_input_images: a list of base64 pictures")
    maps = []
    for i, data in enumerate(images):
        try:
            unit = ControlUnit(
                model="None",
                image=decode_image(data, limits, f"controlnet_input_images[{i}]"),
                module=str(body.get("controlnet_module") or "none"),
                processor_res=int(body.get("controlnet_processor_res", -1)),
                threshold_a=float(body.get("controlnet_threshold_a", -1)),
                threshold_b=float(body.get("controlnet_threshold_b", -1)),
            )
            picture = unit.validate().detected_map()
        except (TypeError, ValueError) as exc:
            raise ApiError(422, f"controlnet/detect: {exc}") from None
        except BoothError as exc:
            raise ApiError(422, str(exc)) from None
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        maps.append(base64.b64encode(buffer.getvalue()).decode())
    return {"images": maps, "info": "Success"}


def build_router(services):
    from fastapi import APIRouter
    from starlette.concurrency import run_in_threadpool

    from booth.generate.controlnet import PREPROCESSORS

    router = APIRouter(prefix="/controlnet")

    @router.get("/version")
    async def version():
        return {"version": 2}

    @router.get("/model_list")
    async def model_list(update: bool = True):
        entries = await run_in_threadpool(services.models.controlnets.entries)
        titles = await run_in_threadpool(lambda: [entry.title for entry in entries])
        return {"model_list": titles}

    @router.get("/module_list")
    async def module_list(alias_names: bool = False):
        return {"module_list": list(PREPROCESSORS), "module_detail": {name: {} for name in PREPROCESSORS}}

    @router.post("/detect")
    async def detect(body: dict[str, Any]):
        return await run_in_threadpool(_detect, body, services.config.limits)

    return router


__all__ = ["SCRIPT", "build_router", "controlnet_units"]
