"""A1111's Extras routes (`a1111.md` §12.2, §12.5) and the upscaler listings.

* POST `/sdapi/v1/extra-single-image` `{image, resize_mode, upscaling_resize, upscaling_resize_w / _h,
  upscaling_crop, upscaler_1, upscaler_2, extras_upscaler_2_visibility, ...}` -> `{"html_info", "image"}`;
  POST `/sdapi/v1/extra-batch-images` `{imageList: [{data, name}], ...}` -> `{"html_info", "images"}`.
  Pictures are upscaled by `booth.generate.upscale.postprocess` on the queue's worker thread (between
  generation jobs, as A1111 runs them under its queue lock); each keeps its `parameters` text and gets A1111's
  `postprocessing` text. Face restoration (GFPGAN / CodeFormer visibility above 0) is refused: booth has none.
* GET `/sdapi/v1/upscalers` -> `[{"name", "model_name", "model_path", "model_url", "scale"}]` (the built-ins
  and the model files of `--upscaler-dir`, read again on each call), `/sdapi/v1/realesrgan-models` -> the
  Real-ESRGAN ones as `[{"name", "path", "scale"}]`, and `/sdapi/v1/latent-upscale-modes` -> `[{"name"}]`.
"""

from __future__ import annotations

import asyncio
import html
import io
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from booth.errors import BoothError
from booth.server.errors import ApiError
from booth.server.queue import JobFailed, QueueClosed


class ExtrasBaseRequest(BaseModel):
    """A1111 `ExtrasBaseRequest` (field names and defaults)."""

    model_config = ConfigDict(extra="ignore")

    resize_mode: int = Field(
        0, description="0: scale by upscaling_resize, 1: scale to upscaling_resize_w x _h"
    )
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = ""


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(default_factory=list)  # noqa: N815 - A1111's field name


def _params(req: ExtrasBaseRequest, upscalers):
    from booth.generate.upscale import ExtrasParams

    if req.gfpgan_visibility > 0 or req.codeformer_visibility > 0:
        raise ApiError(
            400, "face restoration (GFPGAN / CodeFormer) is not available in booth; set its visibility to 0"
        )
    params = ExtrasParams(
        resize_mode=req.resize_mode,
        upscaling_resize=req.upscaling_resize,
        upscaling_resize_w=req.upscaling_resize_w,
        upscaling_resize_h=req.upscaling_resize_h,
        upscaling_crop=req.upscaling_crop,
        upscaler_1=req.upscaler_1 or "None",
        upscaler_2=req.upscaler_2 or "None",
        extras_upscaler_2_visibility=req.extras_upscaler_2_visibility,
    )
    params.validate(upscalers)
    return params


def _decode(services, items: list[str], params) -> list:
    """The request's pictures, decoded under the upload limits, each checked for its output size."""
    from booth.server.generation import _check_size
    from booth.server.security import decode_image

    limits = services.config.limits
    if not items:
        raise ApiError(400, "no image given")
    if len(items) > limits.max_upload_images:
        raise ApiError(400, f"at most {limits.max_upload_images} images a request, got {len(items)}")
    images = []
    try:
        for i, data in enumerate(items):
            what = "image" if len(items) == 1 else f"imageList[{i}]"
            image = decode_image(data, limits, what, convert=None)
            images.append(image)
            try:
                _check_size(*params.output_size(*image.size), 1, limits, f"{what}: the upscaled size")
            except JobFailed as exc:
                raise ApiError(exc.status_code, exc.detail) from None
    except BaseException:
        for image in images:
            image.close()
        raise
    return images


def _run(services, images: list, params) -> tuple[list[str], str]:
    """Upscale each picture (on the worker thread): base64 PNGs and the html_info of the last."""
    from PIL.PngImagePlugin import PngInfo

    from booth.generate.metadata import PARAMETERS_KEY
    from booth.generate.upscale import postprocess, postprocess_infotext
    from booth.server.generation import b64

    options = services.current_options()
    services.models.set_upscaler_tiles(options)
    pnginfo = options.get("enable_pnginfo", True)
    encoded, infotext = [], ""
    for image in images:
        parameters = (
            image.info.get(PARAMETERS_KEY) if isinstance(image.info.get(PARAMETERS_KEY), str) else None
        )
        result, info = postprocess(image, params, services.models.upscalers)
        infotext = postprocess_infotext(info)
        chunks = PngInfo()
        if parameters:
            chunks.add_text(PARAMETERS_KEY, parameters)
        if infotext:
            chunks.add_text("postprocessing", infotext)
        buffer = io.BytesIO()
        result.save(buffer, format="PNG", pnginfo=chunks if pnginfo else None)
        encoded.append(b64(buffer.getvalue()))
    return encoded, f"<p>{html.escape(infotext)}</p>"  # A1111 `plaintext_to_html`


async def _extras(services, req: ExtrasBaseRequest, items: list[str]) -> tuple[list[str], str]:
    params = await run_in_threadpool(_params, req, services.models.upscalers)
    images = await run_in_threadpool(_decode, services, items, params)
    try:
        return await asyncio.wrap_future(
            services.queue.call_in_worker(lambda: _run(services, images, params))
        )
    except QueueClosed as exc:
        raise ApiError(503, str(exc), error="QueueClosed") from None
    except BoothError as exc:
        raise ApiError(400, str(exc), error="BoothError") from None
    finally:
        for image in images:
            image.close()


def upscaler_list(upscalers) -> list[dict[str, Any]]:
    """`/sdapi/v1/upscalers`: A1111's `UpscalerItem`s."""
    upscalers.refresh()
    return [
        {
            "name": entry.name,
            "model_name": entry.path.stem if entry.path else None,
            "model_path": str(entry.path) if entry.path else None,
            "model_url": None,
            "scale": entry.scale,
        }
        for entry in upscalers.entries()
    ]


def add_extras_routes(router: APIRouter, services) -> None:
    @router.post("/extra-single-image")
    async def extra_single_image(req: ExtrasSingleImageRequest):
        images, html_info = await _extras(services, req, [req.image] if req.image else [])
        return {"html_info": html_info, "image": images[0]}

    @router.post("/extra-batch-images")
    async def extra_batch_images(req: ExtrasBatchImagesRequest):
        images, html_info = await _extras(services, req, [item.data for item in req.imageList])
        return {"html_info": html_info, "images": images}

    @router.get("/upscalers")
    async def upscalers():
        return await run_in_threadpool(upscaler_list, services.models.upscalers)

    @router.get("/realesrgan-models")
    async def realesrgan_models():  # A1111's RealesrganModel items: the published Real-ESRGAN files found
        entries = await run_in_threadpool(upscaler_list, services.models.upscalers)
        return [
            {"name": e["name"], "path": e["model_path"], "scale": e["scale"]}
            for e in entries
            if e["name"].startswith("R-ESRGAN")
        ]

    @router.get("/latent-upscale-modes")
    async def latent_upscale_modes():
        from booth.generate.hires import LATENT_UPSCALERS

        return [{"name": name} for name in LATENT_UPSCALERS]
