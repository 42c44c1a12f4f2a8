"""`create_app(config)`: the FastAPI (ASGI) app behind `booth serve`.

One app = one `Services` object: the config, the model list, the model manager (one loaded model), the
persistent job queue with its worker thread, and the options. The worker starts and stops with the app's
lifespan (uvicorn, or `with TestClient(app)`).
"""

from __future__ import annotations

import logging
import shutil
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

import booth
from booth.errors import BoothError
from booth.server.config import ServerConfig
from booth.server.errors import install_error_handlers
from booth.server.models import ModelManager, ModelRegistry
from booth.server.queue import JOB_ID_RE, JobQueue

log = logging.getLogger("booth.server")


class Services:
    """What the routes share. `step_hooks` are called as `hook(job, generation_state)` after every step."""

    def __init__(self, config: ServerConfig):
        from booth.server.generation import GenerationRunner
        from booth.server.training import TrainingRunner

        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        config.jobs_dir.mkdir(parents=True, exist_ok=True)
        trainings = config.data_dir / "trainings"
        trainings.mkdir(exist_ok=True)
        (config.data_dir / "uploads").mkdir(exist_ok=True)
        # finished trainings are usable at once: <lora:NAME> and textual-inversion words also come from the
        # trainings folder, and DreamBooth models are listed in sd-models (ModelRegistry)
        if trainings not in config.lora_dirs:
            config.lora_dirs.append(trainings)
        if trainings not in config.embeddings_dirs:
            config.embeddings_dirs.append(trainings)
        self.registry = ModelRegistry(config)
        self.models = ModelManager(config, self.registry)
        runners = {kind: GenerationRunner(kind, self) for kind in ("txt2img", "img2img")}
        runners["train"] = TrainingRunner(self)
        self.queue = JobQueue(
            config.db_path,
            runners,
            keep_finished=config.keep_finished_jobs,
            max_queued=config.limits.max_queued,
            on_prune=self._delete_job_files,
        )
        self.step_hooks: list = []
        self._options_lock = threading.Lock()
        self._preview_key: tuple | None = None
        self._preview: str | None = None
        self._preview_lock = threading.Lock()

    # lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self.queue.start(paused=self.config.start_paused)
        if self.config.preload:
            title = self.current_options()["sd_model_checkpoint"]
            future = self.queue.call_in_worker(lambda: self.models.get(title))
            future.add_done_callback(_log_preload)

    def stop(self) -> None:
        self.queue.stop()

    # options ---------------------------------------------------------------------------------------

    def current_options(self) -> dict[str, Any]:
        from booth.server.api_a1111 import option_defaults

        options = option_defaults(self)
        stored = self.queue.get_options()
        options.update(stored)
        if "sd_model_checkpoint" in stored:
            try:  # a model removed from disk since: back to the default
                options["sd_model_checkpoint"] = self.registry.find(stored["sd_model_checkpoint"]).title
            except BoothError:
                options["sd_model_checkpoint"] = self.registry.default.title
        entry = next((e for e in self.registry.entries() if e.title == options["sd_model_checkpoint"]), None)
        options["sd_checkpoint_hash"] = entry.sha256 if entry is not None else None
        return options

    def set_options(self, values: Any) -> None:
        """A1111 `POST /options`: checked, persisted; a new checkpoint is loaded by the next job that uses it."""
        from booth.server.generation import validate_options

        if not isinstance(values, dict):
            raise BoothError("options must be a JSON object")
        with self._options_lock:
            checked = validate_options(values)
            if "sd_model_checkpoint" in values:
                checked["sd_model_checkpoint"] = self.registry.find(values["sd_model_checkpoint"]).title
            if "sd_vae" in checked:  # a name that is not there fails now, not at the next job
                title = checked.get("sd_model_checkpoint") or self.current_options()["sd_model_checkpoint"]
                self.models.resolve_vae(checked["sd_vae"], title)
            self.queue.set_options(checked)

    def style_table(self) -> dict:
        """Every style of `--styles-file` by name, as the files are now."""
        from booth.prompts.styles import read_styles

        return read_styles(self.config.styles_files)

    def styles(self, names: list[str]) -> list:
        """The `PromptStyle`s a request names, from `--styles-file` as it is now (BoothError: unknown name)."""
        from booth.prompts.styles import select_styles

        if not names:
            return []
        return select_styles(self.style_table(), names)

    def refresh_embeddings(self) -> None:
        self.models.embeddings(refresh=True)

        def apply():
            if self.models.engine is not None:
                self.models.engine.embeddings = self.models.usable_embeddings(self.models.engine)

        self.queue.call_in_worker(apply)

    # live preview ----------------------------------------------------------------------------------

    def preview(self, engine, state) -> str | None:
        """The running job's preview as base64 PNG, computed once per step."""
        from booth.server.api_a1111 import make_preview

        latents = state.latents
        key = (id(state), id(latents), state.job_no, state.sampling_step)
        with self._preview_lock:
            if key != self._preview_key:
                self._preview = make_preview(engine, state) if latents is not None else None
                self._preview_key = key
            return self._preview

    def _delete_job_files(self, ids: list[str]) -> None:
        for job_id in ids:
            if JOB_ID_RE.match(job_id):
                shutil.rmtree(self.config.jobs_dir / job_id, ignore_errors=True)


def _log_preload(future) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("could not load the model: %s", exc)


def create_app(config: ServerConfig) -> FastAPI:
    """The booth server app: `/sdapi/v1` (A1111), `/booth/v1` (queue), behind `SecurityMiddleware`."""
    from booth.server import api_a1111, api_booth, events, loras, training, web
    from booth.server.security import SecurityMiddleware

    services = Services(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services.start()
        try:
            yield
        finally:
            services.stop()

    app = FastAPI(
        title="booth",
        version=booth.__version__,
        description="A1111-compatible /sdapi/v1 API and a persistent job queue (/booth/v1).",
        lifespan=lifespan,
    )
    app.state.booth = services
    install_error_handlers(app)
    app.include_router(api_a1111.build_router(services))
    app.include_router(api_booth.build_router(services))
    app.include_router(training.build_router(services))
    app.include_router(events.build_router(services))
    app.include_router(loras.build_router(services))
    from booth.server import controlnet

    app.include_router(controlnet.build_router(services))
    web.mount(app)
    app.add_middleware(SecurityMiddleware, config=config)
    return app


__all__ = ["Services", "create_app"]
