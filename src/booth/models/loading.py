"""Load a Stable Diffusion model from whatever the user points at, as a diffusers pipeline.

`load_pipeline(model)` accepts a local diffusers folder (`model_index.json`), a single-file `.safetensors`
/ `.ckpt` checkpoint in the A1111 layout (loaded fully offline, see `booth.models.single_file`), a Hugging
Face hub id ("org/name", only when the hub is reachable or the model is cached), or None for booth's
default model, booth-mini. It returns a `LoadedModel`: the pipeline (eval mode, no safety checker), its
`ModelFamily`, and the A1111-style name and short hash that go into infotext.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from booth.devices import resolve_device
from booth.errors import BoothError, NetworkRequiredError
from booth.models.families import SUPPORTED, ModelFamily, detect_family

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
DEFAULT_MODEL_NAME = "booth-mini"
PREDICTION_TYPES = ("epsilon", "v_prediction")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A loaded pipeline and what booth reports about it.

    Attributes:
        pipe: the diffusers pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, or an SDXL refiner's
            StableDiffusionXLImg2ImgPipeline), in eval mode.
        family: its `ModelFamily`.
        name: A1111-style model name: the file stem, folder name, hub id, or "booth-mini".
        path: the local file or folder, None for a hub id.
        hash: A1111 short hash (first 10 hex digits of the file's sha256) of a single file, else None.
        prediction_source: how the prediction type was decided ("config", "override", "booth metadata",
            "v_pred key", "detected (A1111 test)", "family default").
    """

    pipe: Any
    family: ModelFamily
    name: str
    path: Path | None
    hash: str | None
    prediction_source: str = "config"

    @property
    def short_title(self) -> str:
        """A1111's `short_title`: "name [short hash]", or the name alone when there is no hash."""
        return f"{self.name} [{self.hash}]" if self.hash else self.name


def default_model_path() -> Path:
    """Where booth-mini, booth's default model, is installed (inside the package)."""
    import booth

    return Path(booth.__file__).parent / "mini" / "weights"


def load_pipeline(
    model: str | Path | None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    prediction_type: str | None = None,
    local_files_only: bool | None = None,
) -> LoadedModel:
    """Load `model` as a diffusers pipeline on `device`.

    Args:
        model: a diffusers folder, a `.safetensors` / `.ckpt` file, a hub id ("org/name"), or None for
            booth-mini. A `Path` is always a local path; a string of the form "org/name" that does not
            exist locally is a hub id.
        device: torch device for every component.
        dtype: weight dtype (torch dtype or "float16" / "bf16" / ...); None keeps float32.
        prediction_type: "epsilon" or "v_prediction", overriding the model's own (or detected) one.
        local_files_only: hub ids only: True never contacts the hub (cache only); None decides from
            HF_HUB_OFFLINE and whether the hub answers (`hub_offline`).

    Raises:
        BoothError: the path is missing or not a model; NetworkRequiredError: a hub id while offline.
    """
    torch_device = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise BoothError(
            f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}"
        )
    if model is None:
        path = default_model_path()
        if not path.exists():
            raise BoothError(
                "the default model booth-mini is not installed yet; pass --model PATH "
                "(a diffusers folder or .safetensors/.ckpt)"
            )
        loaded = _load_local(path, prediction_type, torch_dtype)
        loaded.name = DEFAULT_MODEL_NAME
    else:
        if not str(model).strip():
            raise BoothError(
                "the model path is empty; pass a diffusers folder, a .safetensors/.ckpt file or a hub id"
            )
        kind = classify_model(model)
        if kind == "hub":
            loaded = _load_hub(str(model), prediction_type, local_files_only, torch_dtype)
        else:
            loaded = _load_local(Path(model).expanduser(), prediction_type, torch_dtype)
    return _place(loaded, torch_device)


def classify_model(model: str | Path) -> str:
    """Classify a model reference as "folder", "file" or "hub"; BoothError for a path that isn't a model."""
    path = Path(model).expanduser()
    text = str(model)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "folder"
        raise BoothError(
            f"{text} is not a diffusers folder (no model_index.json) or a .safetensors/.ckpt file"
        )
    if path.is_file():
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            return "file"
        raise BoothError(
            f"{text} is not a diffusers folder (no model_index.json) or a .safetensors/.ckpt file"
        )
    looks_like_file = path.suffix.lower() in SINGLE_FILE_SUFFIXES
    if isinstance(model, str) and _HUB_ID.match(text) and not looks_like_file and ".." not in text:
        return "hub"
    raise BoothError(f"model path not found: {text}")


def _load_local(path: Path, prediction_type: str | None, dtype: torch.dtype | None) -> LoadedModel:
    if classify_model(path) == "folder":
        try:
            pipe = _from_pretrained(str(path), local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as e:
            raise BoothError(f"cannot load the diffusers folder {path} ({_first_line(e)})") from None
        pipe, source = _override_prediction(pipe, prediction_type)
        return LoadedModel(pipe, detect_family(pipe), path.name, path, None, source)
    from booth.models.single_file import load_single_file

    loaded = load_single_file(path, prediction_type=prediction_type, dtype=dtype)
    return LoadedModel(loaded.pipe, loaded.family, path.stem, path, file_hash(path), loaded.prediction_source)


def _from_pretrained(source: str, local_files_only: bool, dtype: torch.dtype | None) -> Any:
    """`DiffusionPipeline.from_pretrained` for SD / SDXL pipelines, without a safety checker."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(source, local_files_only=local_files_only)
    class_name = index.get("_class_name", "?")
    if "unet" not in index or not str(class_name).startswith("StableDiffusion"):
        raise BoothError(f"{source} is a {class_name}; {SUPPORTED} (UNet) pipelines")
    kwargs: dict[str, Any] = {}
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = DiffusionPipeline.from_pretrained(source, local_files_only=local_files_only, **kwargs)
    check_unet_channels(pipe.unet.config.in_channels, pipe.vae.config.latent_channels, str(source))
    return pipe


def check_unet_channels(channels: int, latent_channels: int, source: str) -> None:
    """A UNet takes the latents (a text-to-image model), the latents and a depth map (a depth model, 4 + 1 = 5
    channels), the latents and a picture's latents (an instruct-pix2pix model, 2 x 4 = 8) or the latents, a mask
    and the masked picture's latents (an inpainting model, 2 x 4 + 1 = 9); anything else is refused."""
    if channels not in (latent_channels, latent_channels + 1, 2 * latent_channels, 2 * latent_channels + 1):
        raise BoothError(
            f"{source}: UNets with {channels} input channels are not supported; text-to-image "
            f"({latent_channels}), depth ({latent_channels + 1}), instruct-pix2pix ({2 * latent_channels}) and "
            f"inpainting ({2 * latent_channels + 1}) models are"
        )


def hub_offline() -> bool:
    """Whether to use the local Hugging Face cache only: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now
    (huggingface_hub reads it once, at import), or the hub's endpoint does not answer (`hub_reachable`).

    Without the probe, an offline machine waits about 30 s on huggingface_hub's retries before the one-line
    error (measured 2026-12-07: `booth generate "a dog" --model runwayml/stable-diffusion-v1-5`, 30.4 s); a
    model already in the cache still loads."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE):
        return True
    return not hub_reachable()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint (HF_ENDPOINT, default huggingface.co) opens within
    `timeout` seconds. Behind a proxy (HTTPS_PROXY, ALL_PROXY) the endpoint is not probed: True."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(
    repo_id: str, prediction_type: str | None, local_files_only: bool | None, dtype: torch.dtype | None
) -> LoadedModel:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline = bool(local_files_only) or hub_offline()
    unreachable = NetworkRequiredError(
        f"model '{repo_id}' is not a local path and the Hugging Face hub cannot be reached (offline); "
        "pass a local diffusers folder or .safetensors/.ckpt file"
    )
    try:
        pipe = _from_pretrained(repo_id, local_files_only=offline, dtype=dtype)
    except (RepositoryNotFoundError, GatedRepoError):
        raise BoothError(
            f"model '{repo_id}' was not found on the Hugging Face hub (or is private/gated)"
        ) from None
    except OSError as e:
        if offline or is_connection_error(e):
            raise unreachable from None
        raise BoothError(
            f"model '{repo_id}' could not be loaded from the Hugging Face hub ({_first_line(e)})"
        ) from None
    pipe, source = _override_prediction(pipe, prediction_type)
    return LoadedModel(pipe, detect_family(pipe), repo_id, None, None, source)


def is_connection_error(error: BaseException) -> bool:
    """Whether `error`, or anything it was raised from, means the hub could not be reached."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kinds: list[type] = [LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError]
    try:
        import requests

        kinds += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    try:
        import httpx

        kinds.append(httpx.TransportError)
    except ImportError:
        pass
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, tuple(kinds)) or "couldn't connect" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def _override_prediction(pipe: Any, prediction_type: str | None) -> tuple[Any, str]:
    """Swap in a scheduler with `prediction_type` (if given); return the pipeline and the decision's source."""
    if prediction_type is None:
        return pipe, "config"
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return pipe, "override"


def _place(loaded: LoadedModel, device: torch.device) -> LoadedModel:
    """Move every component to `device`; eval mode, gradients off."""
    pipe = loaded.pipe
    if device.type != "cpu":
        pipe.to(device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    return loaded


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if resolved is None:
        raise BoothError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    return resolved


def file_hash(path: Path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256."""
    try:
        from booth.models.hashing import model_hash
    except ImportError:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:10]
    return model_hash(path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
