"""The A1111-compatible `/sdapi/v1` API (`a1111.md` §12): request models with A1111's field names and defaults,
and the routes.

txt2img / img2img are queued (`booth.server.queue`): the handler checks the request, stores a job and awaits
its end; the response is A1111's `{"images": [base64 PNG], "parameters": {...}, "info": "<JSON string>"}`.
Everything else answers at once; the Extras routes and upscaler lists are in `booth.server.extras`. Routes
for features booth does not have (face restorers, hypernetworks) answer with empty lists so
clients probing them keep working.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from typing import Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from booth.errors import BoothError
from booth.generate.controlnet import REFERENCE_MODULES
from booth.server.errors import ApiError, error_response
from booth.server.extras import add_extras_routes
from booth.server.generation import (
    GENERATION_KINDS,
    OPTION_DEFAULTS,
    TRANSIENT_FIELDS,
    apply_infotext,
    b64,
    build_params,
    decode_inputs,
    job_options,
    latent_preview,
    png_bytes,
    remap_pasted_prompt,
)
from booth.server.queue import JOB_ID_RE, JobFailed, QueueClosed, QueueFull

# ------------------------------------------------------------------------------------------------------
# request models (A1111 `modules/api/models.py`; every field optional)


class _Processing(BaseModel):
    """Fields of A1111's `StableDiffusionProcessing` constructor plus the API-only keys."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = Field(None, description="booth: None = the model's native size (A1111: 512)")
    height: int | None = Field(None, description="booth: None = the model's native size (A1111: 512)")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    # API-only keys
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_Processing):
    """`StableDiffusionTxt2ImgProcessingAPI`."""

    enable_hr: bool = False
    denoising_strength: float | None = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Processing):
    """`StableDiffusionImg2ImgProcessingAPI`."""

    init_images: list[Any] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str = ""


REQUEST_MODELS = {"txt2img": Txt2ImgRequest, "img2img": Img2ImgRequest}


# ------------------------------------------------------------------------------------------------------
# shared by the A1111 routes and booth's own job API


def _job_failed(exc: JobFailed) -> ApiError:
    return ApiError(exc.status_code, exc.detail, error=exc.error)


def prepare_job(services, kind: str, req: BaseModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a generation request completely; return the job's params snapshot and its inputs (in a thread)."""

    pasted = functools.partial(remap_pasted_prompt, services)
    request = apply_infotext(req.model_dump(), set(req.model_fields_set), pasted)
    options = services.current_options()
    overrides = dict(request.get("override_settings") or {})
    uploads: dict[str, Any] = {}
    try:
        snapshot_options = job_options(options, overrides)
        title = overrides.get("sd_model_checkpoint") or options["sd_model_checkpoint"]
        model = services.registry.find(title).title
        # a VAE this request names must be there; the stored option's may have gone (the model's own, then)
        services.models.resolve_vae(snapshot_options["sd_vae"], model, missing_ok="sd_vae" not in overrides)
        uploads = decode_inputs(kind, request, services.config.limits)
        styles = services.styles(request.get("styles") or [])
        params = build_params(kind, request, snapshot_options, services.config.limits, uploads, styles)
        if params.enable_hr:
            from booth.generate.hires import check_upscaler

            check_upscaler(params.hr_upscaler, services.models.upscalers)
        script = _check_script(services, request, params, model)
        for unit in params.controlnet_units:  # a ControlNet model of --controlnet-dir
            if unit.module not in REFERENCE_MODULES:
                services.models.controlnets.find(unit.model)
        for name in (params.hires_checkpoint(), params.refiner()):  # titles of the server's models (their
            if name is not None:  # family is checked when the job runs)
                services.registry.find(name)
    except JobFailed as exc:
        raise _job_failed(exc) from None
    finally:
        for image in [
            *uploads.get("init_images", []),
            *(uploads.get(k) for k in ("mask", "latent_mask", "firstpass_image")),
        ]:
            if image is not None:
                image.close()
    # Uploaded images are stored apart from the params (listing the queue never reads them).
    inputs = {key: request[key] for key in TRANSIENT_FIELDS if request.get(key)}
    request.update(dict.fromkeys(inputs))
    counts = {key: len(value) if isinstance(value, list) else 1 for key, value in inputs.items()}
    snapshot = {"request": request, "model": model, "options": snapshot_options, "inputs": counts}
    snapshot["styles"] = [[style.name, style.prompt, style.negative_prompt] for style in styles]
    if script is not None:
        snapshot["script"] = script
    return snapshot, inputs


def _check_script(services, request: dict[str, Any], params, model: str) -> dict[str, Any] | None:
    """The request's script (`booth.server.scripts`), every cell checked: its settings, checkpoint and VAE."""
    from booth.server.scripts import ScriptError, parse_script, script_jobs

    try:
        script = parse_script(request)
        if script is None:
            return None
        cells = script_jobs(script, params, services.style_table())
    except (ScriptError, BoothError) as exc:
        raise JobFailed(422, str(exc)) from None
    checked = set()
    for cell in cells:
        settings = cell.override_settings
        key = (settings.get("sd_model_checkpoint"), settings.get("sd_vae"))
        if key in checked:
            continue
        checked.add(key)
        title = services.registry.find(key[0]).title if key[0] else model
        if key[1] is not None:
            services.models.resolve_vae(key[1], title)
    for name in {n for cell in cells for n in (cell.hires_checkpoint(), cell.refiner())} - {None}:
        services.registry.find(name)  # a hires checkpoint or refiner axis
    return script


async def submit(services, kind: str, req: BaseModel, wait: bool):
    """Check and queue a request; with `wait`, also return the future of its end."""
    params, inputs = await run_in_threadpool(prepare_job, services, kind, req)
    job_id = getattr(req, "force_task_id", None)
    if job_id is not None and not JOB_ID_RE.match(job_id):
        raise ApiError(422, "force_task_id must be 1-64 characters of letters, digits and _ ( ) - .")
    loop = asyncio.get_running_loop() if wait else None
    try:
        return services.queue.submit(kind, params, job_id=job_id, inputs=inputs, loop=loop)
    except (QueueFull, QueueClosed) as exc:
        raise ApiError(503, str(exc), error=type(exc).__name__) from None
    except BoothError as exc:
        raise ApiError(409, str(exc), error="BoothError") from None


def finished_response(services, finished) -> JSONResponse:
    """The HTTP answer for a job that ended (or could not end because the server stops)."""
    job = finished.job if finished is not None else None
    if job is None or job.status in ("queued", "running"):
        return error_response(503, "QueueClosed", "the server stopped before this job ran; it stays queued")
    if job.status == "cancelled":
        return error_response(409, "JobCancelled", f"job {job.id} was cancelled")
    if job.status == "failed":
        error = job.error or {}
        detail, name = error.get("detail", "the job failed"), error.get("error", "JobFailed")
        errors = None if name == "HTTPException" else detail
        return error_response(int(error.get("status_code", 500)), name, detail, errors)
    if finished.response is None:
        from booth.server.generation import response_from_job

        return JSONResponse(response_from_job(job, services.config.jobs_dir))
    return JSONResponse(finished.response)


# ------------------------------------------------------------------------------------------------------
# progress


def _a1111_state(ctx, gs) -> dict[str, Any]:
    if ctx is None:
        return {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": "",
            "job_count": 0,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        }
    job_count = max(1, gs.job_count if gs is not None else 1)
    job_no = gs.job_no if gs is not None else 0
    return {
        "skipped": bool(gs.skipped) if gs is not None else False,
        "interrupted": bool(ctx.interrupt_requested or (gs is not None and gs.interrupted)),
        "stopping_generation": False,
        "job": f"Batch {min(job_no + 1, job_count)} out of {job_count}",
        "job_count": job_count,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(ctx.job.started or time.time())),
        "job_no": job_no,
        "sampling_step": gs.sampling_step if gs is not None else 0,
        "sampling_steps": gs.sampling_steps if gs is not None else 0,
    }


def progress_payload(services, skip_current_image: bool) -> dict[str, Any]:
    """A1111 `/sdapi/v1/progress`: progress = 0.01 + job_no / job_count + step / steps / job_count."""
    ctx = services.queue.current()
    if ctx is None:
        return {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": _a1111_state(None, None),
            "current_image": None,
            "textinfo": None,
            "current_task": None,
        }
    engine = ctx.data.get("engine") if ctx.job.kind in GENERATION_KINDS else None
    gs = engine.state if engine is not None else None
    state = _a1111_state(ctx, gs)
    if gs is not None:
        progress = 0.01 + state["job_no"] / state["job_count"]
        if state["sampling_steps"] > 0:
            progress += state["sampling_step"] / state["sampling_steps"] / state["job_count"]
    else:
        progress = 0.01 + float(ctx.job.progress or 0.0)
    elapsed = time.time() - (ctx.job.started or time.time())
    eta = gs.eta() if gs is not None else None  # measured step times; A1111's extrapolation until then
    if eta is None:
        eta = elapsed / progress - elapsed
    image = None
    options = services.current_options()
    if not skip_current_image and gs is not None and options.get("live_previews_enable", True):
        image = services.preview(engine, gs)
    return {
        "progress": min(progress, 1.0),
        "eta_relative": eta,
        "state": state,
        "current_image": image,
        "textinfo": ctx.job.message,
        "current_task": ctx.job.id,
    }


def make_preview(engine, gs) -> str | None:
    latents = gs.latents
    if latents is None or gs.sampling_step <= 0:
        return None
    image = latent_preview(latents, sdxl=bool(getattr(engine.family, "uses_pooled_text", False)))
    return b64(png_bytes(image, "", pnginfo=False))


# ------------------------------------------------------------------------------------------------------
# routes


def _memory() -> dict[str, Any]:
    rss, total = None, None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        try:
            import psutil

            rss, total = psutil.Process().memory_info().rss, psutil.virtual_memory().total
        except ImportError:
            pass
    ram = {"free": (total - rss) if rss and total else None, "used": rss, "total": total}
    cuda: dict[str, Any]
    try:
        import torch

        if torch.cuda.is_available():
            free, total_cuda = torch.cuda.mem_get_info()
            stats = torch.cuda.memory_stats()
            cuda = {
                "system": {"free": free, "used": total_cuda - free, "total": total_cuda},
                "active": {"current": stats.get("active_bytes.all.current"), "peak": stats.get("active_bytes.all.peak")},
                "allocated": {"current": stats.get("allocated_bytes.all.current"), "peak": stats.get("allocated_bytes.all.peak")},
                "reserved": {"current": stats.get("reserved_bytes.all.current"), "peak": stats.get("reserved_bytes.all.peak")},
                "inactive": {"current": stats.get("inactive_split_bytes.all.current"), "peak": stats.get("inactive_split_bytes.all.peak")},
                "events": {"retries": stats.get("num_alloc_retries"), "oom": stats.get("num_ooms")},
            }  # fmt: skip
        else:
            cuda = {"error": "CUDA is not available"}
    except Exception as exc:  # noqa: BLE001 - memory reporting must not fail the route
        cuda = {"error": type(exc).__name__}
    return {"ram": ram, "cuda": cuda}


def build_router(services) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")

    async def generate(kind: str, req: BaseModel):
        _, future = await submit(services, kind, req, wait=True)
        return finished_response(services, await future)

    @router.post("/txt2img")
    async def txt2img(req: Txt2ImgRequest):
        return await generate("txt2img", req)

    @router.post("/img2img")
    async def img2img(req: Img2ImgRequest):
        return await generate("img2img", req)

    @router.get("/progress")
    async def progress(skip_current_image: bool = Query(False)):
        return await run_in_threadpool(progress_payload, services, skip_current_image)

    @router.post("/interrupt")
    async def interrupt():
        services.queue.interrupt_current()
        return {}

    @router.post("/skip")
    async def skip():
        services.queue.skip_current()
        return None

    @router.get("/options")
    async def get_options():
        return services.current_options()

    @router.post("/options")
    async def set_options(req: dict[str, Any]):
        await run_in_threadpool(services.set_options, req)
        return None

    @router.get("/cmd-flags")
    async def cmd_flags():
        config = services.config
        return {
            "api": True,
            "nowebui": True,
            "listen": config.host not in ("127.0.0.1", "localhost", "::1"),
            "port": config.port,
            "api_auth": "<set>" if config.auth else None,
            "ckpt": config.model,
            "ckpt_dir": [str(p) for p in config.model_dirs] or None,
            "lora_dir": [str(p) for p in config.lora_dirs] or None,
            "embeddings_dir": [str(p) for p in config.embeddings_dirs] or None,
            "esrgan_models_path": [str(p) for p in config.upscaler_dirs] or None,
            "vae_dir": [str(p) for p in config.vae_dirs] or None,
            "data_dir": str(config.data_dir),
        }

    @router.get("/sd-models")
    async def sd_models():
        entries = await run_in_threadpool(services.registry.entries)
        return [e.api() for e in entries]

    @router.post("/refresh-checkpoints")
    async def refresh_checkpoints():
        await run_in_threadpool(services.registry.entries, True)
        return None

    @router.get("/samplers")
    async def samplers():
        from booth.generate.samplers import sampler_list

        return sampler_list()

    @router.get("/schedulers")
    async def schedulers():
        from booth.generate.samplers import scheduler_list

        return scheduler_list()

    @router.get("/loras")
    async def loras():
        from booth.generate.networks import lora_list

        return await run_in_threadpool(lora_list, services.config.lora_dirs)

    @router.post("/refresh-loras")
    async def refresh_loras():
        return None  # LoRA folders are scanned on every lookup

    @router.get("/embeddings")
    async def embeddings():
        return await run_in_threadpool(services.models.embeddings_api)

    @router.post("/refresh-embeddings")
    async def refresh_embeddings():
        await run_in_threadpool(services.refresh_embeddings)
        return None

    @router.post("/png-info")
    async def png_info(req: PngInfoRequest):
        if not req.image.strip():
            return {"info": "", "items": {}, "parameters": {}}
        return await run_in_threadpool(_png_info, services, req.image)

    @router.post("/unload-checkpoint")
    async def unload_checkpoint():
        await asyncio.wrap_future(services.queue.call_in_worker(services.models.unload))
        return None

    @router.post("/reload-checkpoint")
    async def reload_checkpoint():
        title = services.current_options()["sd_model_checkpoint"]
        await asyncio.wrap_future(services.queue.call_in_worker(lambda: services.models.get(title) and None))
        return None

    @router.get("/memory")
    async def memory():
        return await run_in_threadpool(_memory)

    # Features booth does not have: empty answers in A1111's shapes, so probing clients keep working.
    for path in (
        "/hypernetworks",
        "/face-restorers",
        "/extensions",
    ):
        router.add_api_route(path, _empty_list, methods=["GET"])

    add_extras_routes(router, services)

    @router.get("/prompt-styles")
    async def prompt_styles():
        from booth.prompts.styles import read_styles

        styles = await run_in_threadpool(read_styles, services.config.styles_files)
        return [style.api() for style in styles.values()]

    @router.get("/sd-vae")
    async def sd_vae():
        files = await run_in_threadpool(services.models.vae_files)
        return [{"model_name": name, "filename": str(path)} for name, path in files.items()]

    @router.post("/refresh-vae")
    async def refresh_vae():
        return None  # the VAE folders are read on each use

    @router.get("/script-info")
    async def script_info():
        from booth.server.scripts import script_info

        return script_info()

    @router.get("/scripts")
    async def scripts():
        from booth.server.generation import ALWAYSON_SCRIPTS
        from booth.server.scripts import SCRIPTS

        names = [*SCRIPTS, *ALWAYSON_SCRIPTS]
        return {"txt2img": names, "img2img": list(names)}

    return router


async def _empty_list():
    return []


def _png_info(services, data: str) -> dict[str, Any]:
    from booth.generate.metadata import read_image_metadata
    from booth.server.security import decode_image

    image = decode_image(data, services.config.limits, "image", convert=None)
    try:
        response = read_image_metadata(image).png_info_response()
    finally:
        image.close()
    remap_pasted_prompt(services, response["parameters"])  # A1111 runs its infotext-pasted callbacks here too
    return response


def option_defaults(services) -> dict[str, Any]:
    out = dict(OPTION_DEFAULTS)
    out["sd_model_checkpoint"] = services.registry.default.title
    return out


__all__ = [
    "Img2ImgRequest",
    "PngInfoRequest",
    "Txt2ImgRequest",
    "build_router",
    "finished_response",
    "option_defaults",
    "prepare_job",
    "progress_payload",
    "submit",
]
