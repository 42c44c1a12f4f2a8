"""Server settings: where it listens, who may call it, which models/adapters it serves, and input limits.

Nothing here imports FastAPI, so `booth serve --help` and config parsing work without the `serve` extra.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from booth.errors import BoothError
from booth.fsutil import check_folders

DEFAULT_DATA_DIR = Path("outputs") / "server"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Every limit is checked before a job is queued (HTTP 400 / 413).

    Uploads are base64 images inside the JSON body (`init_images`, `png-info`'s `image`): at most
    `max_init_images` per request, `max_image_bytes` decoded each, formats `image_formats` only, and at most
    `max_image_pixels` (and `max_image_side`) pixels, checked from the header before any pixel is decoded
    (decompression bombs are refused, never expanded).
    """

    max_body_bytes: int = 32 * 1024 * 1024  # whole request body (HTTP 413 above it)
    max_init_images: int = 4
    max_upload_images: int = 50  # images in one training upload (`POST /booth/v1/uploads`)
    max_image_bytes: int = 16 * 1024 * 1024  # one decoded upload
    max_image_pixels: int = 4096 * 4096
    max_image_side: int = 8192
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    max_side: int = 2048  # width / height of generated images
    max_batch_pixels: int = 8 * 1024 * 1024  # width * height * batch_size
    max_batch_size: int = 8
    max_n_iter: int = 64
    max_steps: int = 150
    max_prompt_chars: int = 20_000
    max_queued: int = 1000  # queued jobs; more are refused with HTTP 503


@dataclass
class ServerConfig:
    """Everything `create_app` needs.

    Attributes:
        host, port: where `booth serve` listens (loopback unless told otherwise).
        auth: (user, password) pairs for HTTP Basic auth on every route; empty = no auth (A1111 `--api-auth`).
        model: the default model (diffusers folder, .safetensors/.ckpt, hub id) or None for booth-mini.
        model_dirs: folders whose checkpoints and diffusers folders are also served (`/sdapi/v1/sd-models`).
        lora_dirs, embeddings_dirs: the only places `<lora:NAME>` and textual-inversion words come from.
        upscaler_dirs: folders of ESRGAN-type upscaler models (`/sdapi/v1/upscalers`, hires fix, extras).
        vae_dirs: folders of VAE files offered as the `sd_vae` option (`/sdapi/v1/sd-vae`).
        controlnet_dirs: folders of ControlNet models (`/controlnet/model_list`, `alwayson_scripts` "controlnet").
        styles_files: A1111 `styles.csv` files whose styles requests name in `styles` (`/sdapi/v1/prompt-styles`).
        data_dir: the SQLite job queue (`queue.sqlite3`), job results (`jobs/`) and `save_images` outputs.
        device, dtype: where and how models run (None: cuda if present, float16 there, else CPU float32).
        vae_tiling: "auto" (a picture that does not fit is done in tiles), "on" or "off" (`booth.generate.vae_decode`).
        preload: load the default model when the server starts instead of on the first job.
        start_paused: start with the queue paused (jobs are accepted, none run until resumed).
        keep_finished_jobs: finished jobs (and their images) kept in the queue history; older ones are pruned.
        allowed_hosts: Host header values accepted (DNS-rebinding guard); None = loopback names when bound to
            loopback, anything otherwise.
        allowed_origins: browser origins allowed to make cross-origin requests (none by default).
    """

    host: str = "127.0.0.1"
    port: int = 7860
    auth: list[tuple[str, str]] = field(default_factory=list)
    model: str | None = None
    model_dirs: list[Path] = field(default_factory=list)
    lora_dirs: list[Path] = field(default_factory=list)
    embeddings_dirs: list[Path] = field(default_factory=list)
    upscaler_dirs: list[Path] = field(default_factory=list)
    vae_dirs: list[Path] = field(default_factory=list)
    controlnet_dirs: list[Path] = field(default_factory=list)
    styles_files: list[Path] = field(default_factory=list)
    data_dir: Path = DEFAULT_DATA_DIR
    device: str | None = None
    dtype: str | None = None
    vae_tiling: str = "auto"
    limits: Limits = field(default_factory=Limits)
    preload: bool = False
    start_paused: bool = False
    keep_finished_jobs: int = 500
    allowed_hosts: list[str] | None = None
    allowed_origins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.model_dirs = [Path(p) for p in self.model_dirs]
        self.lora_dirs = [Path(p) for p in self.lora_dirs]
        self.embeddings_dirs = [Path(p) for p in self.embeddings_dirs]
        self.upscaler_dirs = [Path(p) for p in self.upscaler_dirs]
        self.vae_dirs = [Path(p) for p in self.vae_dirs]
        self.controlnet_dirs = [Path(p) for p in self.controlnet_dirs]
        self.styles_files = [Path(p) for p in self.styles_files]
        if isinstance(self.auth, str):
            self.auth = parse_auth(self.auth)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "queue.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def trainings_dir(self) -> Path:
        """Training runs of `POST /booth/v1/train`: `<job id>/<name>/` each."""
        return self.data_dir / "trainings"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    def host_allowed(self, host: str) -> bool:
        """Whether a request's Host header (port stripped) may be served."""
        name = host.strip().lower()
        if self.allowed_hosts is not None:
            return name in {h.lower() for h in self.allowed_hosts}
        if is_loopback(self.host):
            return name in LOOPBACK_NAMES
        return True

    def validate(self) -> ServerConfig:
        from booth.devices import resolve_device, resolve_dtype

        if not 0 < self.port < 65536:
            raise BoothError(f"port must be in 1..65535, got {self.port}")
        # before serving: a server whose models cannot load would answer every request with an error
        resolve_dtype(self.dtype, resolve_device(self.device))
        from booth.generate.vae_decode import check_mode

        check_mode(self.vae_tiling)
        for kind, folders in (
            ("--model-dir", self.model_dirs),
            ("--lora-dir", self.lora_dirs),
            ("--embeddings-dir", self.embeddings_dirs),
            ("--upscaler-dir", self.upscaler_dirs),
            ("--vae-dir", self.vae_dirs),
            ("--controlnet-dir", self.controlnet_dirs),
        ):
            check_folders(kind, folders)
        if self.styles_files:
            from booth.prompts.styles import read_styles

            read_styles(self.styles_files)  # a missing or broken file fails at start
        return self


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """`user:pass[,user2:pass2]` (A1111 `--api-auth`) as (user, password) pairs; BoothError when malformed."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise BoothError("--api-auth must be user:password[,user2:password2] (both non-empty)")
        pairs.append((user, password))
    return pairs


def auth_from_env() -> list[tuple[str, str]]:
    """Credentials from BOOTH_API_AUTH (keeps passwords out of the process list)."""
    return parse_auth(os.environ.get("BOOTH_API_AUTH"))


__all__ = ["DEFAULT_DATA_DIR", "Limits", "ServerConfig", "auth_from_env", "is_loopback", "parse_auth"]
