"""Training jobs on the server: image uploads, the `train` job kind and its files.

* `POST /booth/v1/uploads` - multipart (`files`) or JSON `{"images": [base64, ...]}` -> 201 `{"id", "count"}`.
  Every image is decoded safely (`security.decode_image`: PNG/JPEG/WEBP, size checked before decoding), at most
  `Limits.max_upload_images` per upload, and re-encoded as `<data_dir>/uploads/<server id>/<n>.png`. Client
  file names are never used.
* `GET  /booth/v1/uploads/{id}` -> `{"id", "count"}`.
* `POST /booth/v1/train` `{method, upload, instance_prompt, class_prompt?, class_upload?, prior_preservation?,
  steps, rank?, lr?, name?, ...}` -> 202 `{"job": {...}}`. The `TrainConfig` is built here (paths are
  server-chosen: images from the upload folder, `out` = `<data_dir>/trainings/<job id>/<name>`), validated, and
  stored in the job's params.
* `GET  /booth/v1/jobs/{id}/files/{kind}` -> a finished training's file: `lora` (kohya `.safetensors`),
  `diffusers`, `embedding`, `log` (log.jsonl), `loss_plot`, `config`, `preview` (latest validation image).

The runner (`TrainingRunner`) calls `booth.train.train` on the queue's worker thread: `resume=True` when the job's
folder holds a checkpoint (a job re-queued after a restart continues from it), progress (step, total, loss,
ETA) goes to the job, and cancel / shutdown set `TrainState.stop_requested` (the trainer checkpoints and raises
`TrainingInterrupted`: cancelled, or re-queued on shutdown). `<data_dir>/trainings` is one of the
LoRA and embeddings folders and its DreamBooth `model/` folders are listed in sd-models, so a finished result is
usable at once: the job result says how (`prompt`: `<lora:NAME:1>` or the textual-inversion word to add;
`model`: the `sd_model_checkpoint` title of a DreamBooth model). A Custom Diffusion result is exported as a kohya
LoRA plus an embedding for its modifier token (`booth.train.merge.export_custom_diffusion_a1111`, exact), so its
`prompt` is "<name>-<token> <lora:<name>:1>" and the files also load in A1111 / ComfyUI (downloads `lora`,
`embedding`; the booth and diffusers files: `custom_diffusion`, `diffusers`).
"""

from __future__ import annotations

import io
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from booth.errors import BoothError
from booth.server.errors import ApiError
from booth.server.queue import JOB_ID_RE, Job, JobContext, JobStopped, Outcome

UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
MAX_TRAIN_STEPS = 20_000
FILE_KINDS = (
    "lora",
    "diffusers",
    "embedding",
    "custom_diffusion",
    "single_file",
    "log",
    "loss_plot",
    "config",
    "preview",
)

# what `options` may set in the TrainConfig (nested sections: these keys only); paths are never client input
ALLOWED_OPTIONS: dict[str, Any] = {
    "seed": None,
    "clip_skip": None,
    "mixed_precision": None,
    "gradient_checkpointing": None,
    "cache_latents": None,
    "ema_decay": None,
    "train_text_encoder": None,
    "keep_checkpoints": None,
    "save_every": None,
    "validation_images": None,
    "data": {
        "resolution",
        "crop",
        "flip",
        "buckets",
        "repeats",
        "shuffle_caption",
        "keep_tokens",
        "tag_dropout",
        "caption_dropout",
    },
    "prior": {"mode", "num_class_images", "weight", "sample_steps", "sampler", "cfg_scale", "seed"},
    "lora": {"rank", "alpha", "unet_targets", "text_encoder", "text_encoder_targets", "dropout", "algo"},
    "tokens": {"placeholder", "initializer", "num_vectors", "learnable_property"},
    "custom_diffusion": {"train_q_out", "augment", "modifier_token"},
    "optim": {
        "lr",
        "text_encoder_lr",
        "scheduler",
        "warmup_steps",
        "batch_size",
        "gradient_accumulation",
        "weight_decay",
        "max_grad_norm",
        "fused_backward_pass",
    },
    "loss": {
        "snr_gamma",
        "noise_offset",
        "multires_iterations",
        "multires_discount",
        "input_perturbation",
        "debiased",
    },
}


# ------------------------------------------------------------------------------------------------------
# uploads


class UploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[str]


def uploads_dir(services) -> Path:
    return services.config.data_dir / "uploads"


def trainings_dir(services) -> Path:
    return services.config.data_dir / "trainings"


def upload_folder(services, upload_id: str) -> Path:
    """The folder of an upload id (checked: server ids only); ApiError 404 when unknown."""
    if not isinstance(upload_id, str) or not UPLOAD_ID_RE.match(upload_id):
        raise ApiError(404, "upload not found")
    folder = uploads_dir(services) / upload_id
    if not folder.is_dir():
        raise ApiError(404, "upload not found")
    return folder


def save_upload(services, images: list) -> dict[str, Any]:
    """Re-encode decoded PIL images as PNGs in a new server-named folder."""
    from booth.generate.metadata import atomic_write

    upload_id = uuid.uuid4().hex
    root = uploads_dir(services)
    tmp = root / f".{upload_id}.tmp"
    tmp.mkdir(parents=True)
    try:
        for n, image in enumerate(images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
            atomic_write(tmp / f"{n}.png", lambda f, data=data: f.write(data))
        tmp.rename(root / upload_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"id": upload_id, "count": len(images)}


def _check_count(n: int, limits) -> None:
    if n < 1:
        raise ApiError(400, "upload at least one image")
    if n > limits.max_upload_images:
        raise ApiError(400, f"at most {limits.max_upload_images} images per upload, got {n}")


async def _read_upload(request: Request, limits) -> list:
    """Decoded images from a multipart form (`files` / any file field) or a JSON `{"images": [...]}` body."""
    import base64

    from booth.server.security import decode_image

    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=limits.max_upload_images + 1, max_fields=16)
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        _check_count(len(files), limits)
        images = []
        for i, item in enumerate(files):
            raw = await item.read(limits.max_image_bytes + 1)
            if len(raw) > limits.max_image_bytes:
                raise ApiError(
                    413, f"files[{i}]: larger than {limits.max_image_bytes} bytes", "PayloadTooLarge"
                )
            text = base64.b64encode(raw).decode()
            images.append(await run_in_threadpool(decode_image, text, limits, f"files[{i}]"))
        return images
    try:
        body = UploadRequest.model_validate(await request.json())
    except ValueError as exc:
        raise ApiError(422, f"expected {{'images': [base64, ...]}}: {str(exc).splitlines()[0]}") from None
    _check_count(len(body.images), limits)
    return [
        await run_in_threadpool(decode_image, data, limits, f"images[{i}]")
        for i, data in enumerate(body.images)
    ]


# ------------------------------------------------------------------------------------------------------
# training requests


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = "lora"
    upload: str
    instance_prompt: str = Field(min_length=1, max_length=500)
    name: str | None = None
    model: str | None = None  # a /sdapi/v1/sd-models title; None: the current checkpoint
    steps: int = Field(400, ge=1, le=MAX_TRAIN_STEPS)
    lr: float | None = Field(None, gt=0, le=1)
    rank: int | None = Field(None, ge=1, le=256)
    resolution: int | None = Field(None, ge=8, le=2048)
    batch_size: int | None = Field(None, ge=1, le=64)
    seed: int | None = None
    prior_preservation: bool = False
    prior_mode: str | None = None
    class_prompt: str | None = Field(None, max_length=500)
    class_upload: str | None = None
    num_class_images: int | None = Field(None, ge=1, le=1000)
    placeholder: str | None = Field(None, max_length=64)
    initializer: str | None = Field(None, max_length=64)
    checkpoint_every: int | None = Field(None, ge=1, le=MAX_TRAIN_STEPS)
    preview_every: int | None = Field(None, ge=0, le=MAX_TRAIN_STEPS)
    preview_prompt: str | None = Field(None, max_length=500)
    options: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(0, ge=-100, le=100)


def _merge_options(base: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    for key, value in options.items():
        if key not in ALLOWED_OPTIONS:
            raise ApiError(400, f"options: {key!r} cannot be set here; allowed: {', '.join(ALLOWED_OPTIONS)}")
        allowed = ALLOWED_OPTIONS[key]
        if allowed is None:
            base[key] = value
            continue
        if not isinstance(value, dict):
            raise ApiError(400, f"options.{key} must be an object")
        for sub, subvalue in value.items():
            if sub not in allowed:
                raise ApiError(
                    400, f"options.{key}.{sub} cannot be set here; allowed: {', '.join(sorted(allowed))}"
                )
            base.setdefault(key, {})[sub] = subvalue
    return base


def build_train_config(services, req: TrainRequest, job_id: str, name: str):
    """The TrainConfig of a request (all paths chosen here); ApiError 400 when the settings are invalid."""
    from booth.train.config import METHODS, TrainConfig

    if req.method not in METHODS:
        raise ApiError(400, f"method must be one of {', '.join(METHODS)}")
    images = upload_folder(services, req.upload)
    title = req.model or services.current_options()["sd_model_checkpoint"]
    try:
        entry = services.registry.find(title)
    except BoothError as exc:
        raise ApiError(400, str(exc)) from None
    steps = req.steps
    data: dict[str, Any] = {
        "method": req.method,
        "out": str(trainings_dir(services) / job_id / name),
        "model": entry.source,
        "steps": steps,
        "name": name,
        "checkpoint_every": req.checkpoint_every or max(10, steps // 10),
        "data": {"images": str(images), "instance_prompt": req.instance_prompt},
        "optim": {},
        "lora": {},
        "tokens": {},
        "prior": {},
    }
    _merge_options(data, req.options)
    if req.lr is not None:
        data["optim"]["lr"] = req.lr
    if req.batch_size is not None:
        data["optim"]["batch_size"] = req.batch_size
    if req.rank is not None:
        data["lora"]["rank"] = req.rank
    if req.resolution is not None:
        data["data"]["resolution"] = req.resolution
    if req.seed is not None:
        data["seed"] = req.seed
    if req.placeholder:
        data["tokens"]["placeholder"] = req.placeholder
    if req.initializer:
        data["tokens"]["initializer"] = req.initializer
    if req.prior_preservation or req.class_upload:
        prior = data["prior"]
        prior["enabled"] = True
        prior["class_prompt"] = req.class_prompt
        if req.prior_mode:
            prior["mode"] = req.prior_mode
        if req.num_class_images is not None:
            prior["num_class_images"] = req.num_class_images
        if req.class_upload:
            prior["class_images"] = str(upload_folder(services, req.class_upload))
        prior["cache_dir"] = str(services.config.data_dir / "class-images")
    if req.preview_every:
        data["validation_every"] = req.preview_every
        data["validation_prompts"] = [req.preview_prompt or req.instance_prompt]
        data["validation_images"] = 1
    if services.config.device:
        data["device"] = services.config.device
    try:
        config = TrainConfig.from_dict(data)
        config.validate()
    except BoothError as exc:
        raise ApiError(400, str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"invalid training settings: {exc}") from None
    return config


def _taken_names(services) -> set[str]:
    """LoRA names in use: files in the LoRA folders and the names of queued / running training jobs."""
    from booth.generate.networks import LoraNetwork

    names = set(LoraNetwork(services.config.lora_dirs).available())
    for status in ("queued", "running"):
        for job in services.queue.list(status=status, kind="train", limit=10_000):
            names.add(job.params.get("name"))
    return names


# ------------------------------------------------------------------------------------------------------
# the runner


class TrainingRunner:
    """Runs `train` jobs on the worker thread (`booth.server.queue.Runner`).

    `hooks` are called as `hook(job, train_state)` after every step (tests use them).
    """

    def __init__(self, services):
        self.services = services
        self.hooks: list = []

    def run(self, job: Job, ctx: JobContext) -> Outcome:
        from booth.train.config import TrainConfig
        from booth.train.loop import TrainingInterrupted, TrainState, latest_checkpoint, train

        config = TrainConfig.from_dict(job.params["config"])
        out = Path(config.out)
        checkpoint = latest_checkpoint(out)
        resumed_from = int(checkpoint.name.rpartition("-")[2]) if checkpoint is not None else 0
        state = TrainState(total=config.steps, step=resumed_from)
        ctx.data["train_state"] = state
        message = f"resuming from step {resumed_from}" if checkpoint is not None else "preparing"
        ctx.report(
            step=resumed_from,
            total=config.steps,
            progress=resumed_from / config.steps,
            message=message,
            force=True,
        )

        def callback(s: TrainState) -> None:
            for hook in list(self.hooks):
                hook(job, s)
            if ctx.stop_requested:
                s.stop_requested = True
            metrics = {"loss": s.loss, "phase": s.phase, "resumed_from": resumed_from}
            ctx.report(
                step=s.step,
                total=s.total,
                progress=s.step / s.total if s.total else 0.0,
                eta=s.eta_seconds,
                message=None,
                metrics=metrics,
                force=s.step >= s.total,
            )

        try:
            result = train(
                config,
                resume=checkpoint is not None,
                overwrite=checkpoint is None,
                progress=False,
                state=state,
                callback=callback,
            )
        except TrainingInterrupted:
            if ctx.cancel_requested and not ctx.shutdown_requested:  # cancelled: nothing will resume it
                shutil.rmtree(out.parent, ignore_errors=True)
            raise JobStopped() from None
        if not result.completed:
            raise JobStopped()
        # a stop that came during the last step is too late: the run is complete and the job done
        ctx.cancel_requested = ctx.shutdown_requested = False
        root = trainings_dir(self.services).resolve()
        files = {}
        for kind, path in result.files.items():
            if path is None:
                continue
            path = Path(path).resolve()
            if path.is_relative_to(root):
                files[kind] = str(path.relative_to(root))
        # the kohya file is the one A1111 / ComfyUI load; name it "lora" for downloads
        if "kohya" in files:
            files["lora"] = files.pop("kohya")
        ctx.report(
            message=None,
            metrics={"loss": state.loss, "phase": "done", "resumed_from": resumed_from},
            force=True,
        )
        usage = self._make_usable(config, files)
        return Outcome(
            result={
                "name": config.run_name,
                "method": config.method,
                "steps": result.steps,
                "seconds": result.seconds,
                "final_loss": result.losses[-1] if result.losses else state.loss,
                "resumed_from": resumed_from,
                "files": files,
                **usage,
            }
        )

    def _make_usable(self, config, files: dict[str, str]) -> dict[str, Any]:
        """Refresh the server's lists so the result is usable at once; how to use it (`prompt` text to add,
        or the sd-models `model` title to select)."""
        services = self.services
        if config.method == "lora":
            return {"prompt": f"<lora:{config.run_name}:1>", "model": None}
        if config.method == "textual-inversion" and "embedding" in files:
            models = services.models
            models.embeddings(refresh=True)
            if models.engine is not None:  # on the worker thread: no job is using the engine now
                models.engine.embeddings = models.usable_embeddings(models.engine)
            return {"prompt": Path(files["embedding"]).stem, "model": None}
        if config.method == "dreambooth" and "diffusers" in files:
            services.registry.entries(refresh=True)
            return {"prompt": None, "model": config.run_name}
        if config.method == "custom-diffusion" and "custom_diffusion" in files:
            return self._custom_diffusion_usable(config, files)
        return {"prompt": None, "model": None}

    def _custom_diffusion_usable(self, config, files: dict[str, str]) -> dict[str, Any]:
        """Export the Custom Diffusion model as a kohya LoRA + embedding (``a1111/`` beside it), which the
        LoRA and embeddings folders serve: the prompt says "<name>-sks dog <lora:<name>:1>" for the token "<sks>"."""
        from booth.train.merge import export_custom_diffusion_a1111

        root = trainings_dir(self.services).resolve()
        source = root / files["custom_diffusion"]
        export = export_custom_diffusion_a1111(source, source.parent / "a1111", config.run_name)
        files["lora"] = str(export.lora.resolve().relative_to(root))
        for path in export.embeddings.values():
            files.setdefault("embedding", str(path.resolve().relative_to(root)))
        models = self.services.models
        models.embeddings(refresh=True)
        if models.engine is not None:  # on the worker thread: no job is using the engine now
            models.engine.embeddings = models.usable_embeddings(models.engine)
        word = export.words.get(config.tokens.placeholder) or next(iter(export.words.values()), "")
        return {"prompt": f"{word} <lora:{config.run_name}:1>".strip(), "model": None}


def _file_path(services, job, kind: str) -> Path:
    root = trainings_dir(services)
    if kind == "preview":
        folder = root / job.id
        found = sorted(folder.glob("*/validation/step-*.png")) if folder.is_dir() else []
        if not found:
            raise ApiError(404, "no preview yet")
        return found[-1]
    if kind in ("log", "loss_plot", "config"):
        name = job.params.get("name") or ""
        filename = {"log": "log.jsonl", "loss_plot": "loss.png", "config": "config.json"}[kind]
        path = root / job.id / name / filename
        if not NAME_RE.match(name) or not path.is_file():
            raise ApiError(404, f"no {kind} file")
        return path
    relative = ((job.result or {}).get("files") or {}).get(kind)
    if job.status != "done" or not relative:
        raise ApiError(404, f"no {kind} file (job is {job.status})")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()) or not path.exists():
        raise ApiError(404, f"{kind} file not found")
    return path


# ------------------------------------------------------------------------------------------------------
# routes


def build_router(services) -> APIRouter:
    router = APIRouter(prefix="/booth/v1")
    limits = services.config.limits

    @router.post("/uploads", status_code=201)
    async def upload(request: Request):
        images = await _read_upload(request, limits)
        saved = await run_in_threadpool(save_upload, services, images)
        return JSONResponse(saved, status_code=201)

    @router.get("/uploads/{upload_id}")
    async def get_upload(upload_id: str):
        folder = upload_folder(services, upload_id)
        return {"id": upload_id, "count": len(list(folder.glob("*.png")))}

    @router.post("/train", status_code=202)
    async def start_training(req: TrainRequest):
        job_id = uuid.uuid4().hex
        name = req.name or f"booth-{job_id[:8]}"
        if not NAME_RE.match(name):
            raise ApiError(400, "name: 1-64 letters, digits, _ and -, starting with a letter or digit")
        if name in await run_in_threadpool(_taken_names, services):
            raise ApiError(409, f"a LoRA or training named {name!r} exists already; choose another name")
        config = await run_in_threadpool(build_train_config, services, req, job_id, name)
        params = {"name": name, "method": req.method, "config": config.to_dict()}
        try:
            job, _ = services.queue.submit("train", params, job_id=job_id, priority=req.priority)
        except BoothError as exc:
            raise ApiError(503, str(exc)) from None
        return JSONResponse({"job": job.to_dict()}, status_code=202)

    @router.get("/jobs/{job_id}/files/{kind}")
    async def job_file(job_id: str, kind: str):
        job = services.queue.get(job_id) if JOB_ID_RE.match(job_id) else None
        if job is None or job.kind != "train":
            raise ApiError(404, "training job not found")
        if kind not in FILE_KINDS:
            raise ApiError(404, f"kind must be one of {', '.join(FILE_KINDS)}")
        path = _file_path(services, job, kind)
        if path.is_dir():  # a diffusers LoRA folder: its weights file
            from booth.train.formats.lora import DIFFUSERS_LORA_FILE

            path = path / DIFFUSERS_LORA_FILE
            if not path.is_file():
                raise ApiError(404, f"{kind} is a folder; not downloadable")
        media = "image/png" if path.suffix == ".png" else "application/octet-stream"
        return FileResponse(path, media_type=media, filename=path.name)

    return router


__all__ = ["TrainingRunner", "build_router", "build_train_config", "save_upload"]
