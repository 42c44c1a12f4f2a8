"""The models, LoRAs and embeddings a server offers, and the one model loaded at a time.

Clients name models by title (`/sdapi/v1/sd-models`, option `sd_model_checkpoint`) and LoRAs by name
(`<lora:NAME>`); both are looked up in lists built from the configured folders only. No string from a client
is ever joined to a path or opened.

Titles: the default model (`--model`) is listed under its file name (`model.safetensors`), folder name or hub id
("booth-mini" when none is given); models found in `--model-dir` under their path relative to that folder
(`sd15/model.safetensors`, as A1111 does for subfolders); finished DreamBooth trainings of this server
(`<data_dir>/trainings/<job>/<name>/model/`) under their training name. A title also matches without its file
extension, and with an A1111 ` [hash]` suffix.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from booth.errors import BoothError
from booth.models.loading import DEFAULT_MODEL_NAME, SINGLE_FILE_SUFFIXES, classify_model, default_model_path
from booth.server.config import ServerConfig

MAX_SCAN_DEPTH = 4
log = logging.getLogger("booth.server")


@dataclass
class ModelEntry:
    """One servable model. `source` is what `load_pipeline` takes (None: booth-mini); never client input."""

    title: str
    model_name: str
    filename: str
    source: str | None
    hash: str | None = None
    sha256: str | None = None

    def api(self) -> dict[str, Any]:
        """`/sdapi/v1/sd-models` item."""
        return {
            "title": self.title,
            "model_name": self.model_name,
            "hash": self.hash,
            "sha256": self.sha256,
            "filename": self.filename,
            "config": None,
        }


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in SINGLE_FILE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _entry_for_default(model: str | None) -> ModelEntry:
    if model is None:
        return ModelEntry(DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME, str(default_model_path()), None)
    kind = classify_model(model)  # BoothError for a path that is not a model
    if kind == "hub":
        return ModelEntry(model, model, model, model)
    path = Path(model).expanduser().resolve()
    return ModelEntry(path.name, _strip_suffix(path.name), str(path), str(path))


def _scan(folder: Path) -> list[ModelEntry]:
    """Single-file checkpoints and diffusers folders under `folder` (hidden entries skipped)."""
    found: list[ModelEntry] = []
    root = folder.resolve()
    for current, dirs, files in os.walk(root):
        here = Path(current)
        depth = len(here.relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if (here / "model_index.json").is_file() and here != root:
            rel = here.relative_to(root).as_posix()
            found.append(ModelEntry(rel, here.name, str(here), str(here)))
            dirs[:] = []  # a diffusers folder's own weight files are not models
            continue
        if depth >= MAX_SCAN_DEPTH:
            dirs[:] = []
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(SINGLE_FILE_SUFFIXES):
                continue
            path = here / name
            rel = path.relative_to(root).as_posix()
            found.append(ModelEntry(rel, _strip_suffix(rel), str(path), str(path)))
    return found


def _scan_trainings(trainings: Path) -> list[ModelEntry]:
    """The diffusers folders of finished DreamBooth runs (`<job>/<name>/model/`, written atomically at the end)."""
    from booth.train.methods.dreambooth import MODEL_FOLDER

    if not trainings.is_dir():
        return []
    found = []
    for index in sorted(trainings.glob(f"*/*/{MODEL_FOLDER}/model_index.json")):
        folder = index.parent
        name = folder.parent.name
        if not name.startswith("."):
            found.append(ModelEntry(name, name, str(folder.resolve()), str(folder.resolve())))
    return found


class ModelRegistry:
    """The list behind `/sdapi/v1/sd-models`: the default model, every model in `model_dirs`, then the finished
    DreamBooth trainings in `<data_dir>/trainings`."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self._lock = threading.Lock()
        self.default = _entry_for_default(config.model)
        self._entries: list[ModelEntry] | None = None

    def entries(self, refresh: bool = False) -> list[ModelEntry]:
        with self._lock:
            if self._entries is None or refresh:
                entries = [self.default]
                seen = {self.default.title}
                scans = [_scan(folder) for folder in self.config.model_dirs]
                scans.append(_scan_trainings(self.config.trainings_dir))
                for found in scans:
                    for entry in found:
                        if entry.title not in seen and entry.source != self.default.source:
                            seen.add(entry.title)
                            entries.append(entry)
                if self._entries is not None:  # keep hashes learned from loading
                    known = {e.title: e for e in self._entries}
                    for entry in entries:
                        if entry.title in known and known[entry.title].source == entry.source:
                            entry.hash, entry.sha256 = known[entry.title].hash, known[entry.title].sha256
                self._entries = entries
            return list(self._entries)

    def find(self, name: Any) -> ModelEntry:
        """The entry a client's model name means (title, name without extension, `title [hash]`, or hash)."""
        if not isinstance(name, str) or not name.strip():
            raise BoothError("a model title must be a non-empty string")
        text = name.strip()
        base = text.rsplit(" [", 1)[0] if text.endswith("]") and " [" in text else text
        entries = self.entries()
        for candidates in (
            [e for e in entries if text in (e.title, f"{e.title} [{e.hash}]")],
            [e for e in entries if base in (e.title, e.model_name)],
            [e for e in entries if e.hash and (text == e.hash or text == e.sha256)],
        ):
            if candidates:
                return candidates[0]
        titles = ", ".join(e.title for e in entries)
        raise BoothError(f"model {text!r} not found; available: {titles}")


class ModelManager:
    """Loads the engine for a model title, one model at a time. Used from the queue's worker thread only."""

    def __init__(self, config: ServerConfig, registry: ModelRegistry):
        self.config = config
        self.registry = registry
        self.engine = None  # the loaded booth Engine (read by /progress from other threads)
        self.entry: ModelEntry | None = None
        self._embeddings: dict[str, Any] | None = None
        self._embeddings_lock = threading.Lock()
        self._lora = None
        from booth.devices import resolve_device, resolve_dtype
        from booth.generate.upscale import Upscalers

        device = resolve_device(config.device)
        # the pixel upscalers (built-ins + `upscaler_dirs`), shared by hires fix and the extras routes
        self.upscalers = Upscalers(
            config.upscaler_dirs, device=device, dtype=resolve_dtype(config.dtype, device)
        )
        from booth.models.controlnet import ControlNets

        self.controlnets = ControlNets(config.controlnet_dirs)  # each model loaded once per base model

    def set_upscaler_tiles(self, options: dict[str, Any]) -> None:
        """A1111's `ESRGAN_tile` / `ESRGAN_tile_overlap` options onto the model upscalers."""
        self.upscalers.tile = int(options["ESRGAN_tile"])  # `current_options` always holds both
        self.upscalers.tile_pad = int(options["ESRGAN_tile_overlap"])

    # VAEs ------------------------------------------------------------------------------------------

    def vae_files(self) -> dict[str, Path]:
        """`/sdapi/v1/sd-vae`: every VAE file of `vae_dirs` by name (read on each call)."""
        from booth.models.vae import vae_files

        return vae_files(self.config.vae_dirs)

    def resolve_vae(self, value: str, title: str, missing_ok: bool = False) -> Path | None:
        """The VAE the option `sd_vae` = `value` means for the model `title`: "Automatic" (a VAE named after
        the checkpoint, else the model's own), "None" (the model's own) or a listed file name. A name not in
        the VAE folders is a BoothError, or with `missing_ok` (a stored option whose file has gone since) the
        model's own VAE and a logged warning, as A1111 goes on ("Couldn't find VAE named ...; using None")."""
        from booth.models.vae import automatic_vae

        if value == "None":
            return None
        if value == "Automatic":
            source = self.registry.find(title).source
            local = Path(source) if source is not None and Path(source).exists() else None
            return automatic_vae(local, self.config.vae_dirs)
        files = self.vae_files()
        if value not in files and missing_ok:
            log.warning(
                "VAE %r (option sd_vae) is not in the VAE folders any more; using the model's own", value
            )
            return None
        if value not in files:
            raise BoothError(
                f"VAE {value!r} not found; available: {', '.join(['Automatic', 'None', *files])}"
            )
        return files[value]

    def lora_network(self):
        from booth.generate.networks import LoraNetwork

        if self._lora is None:
            self._lora = LoraNetwork(self.config.lora_dirs)
        return self._lora

    def get(self, title: str):
        """The engine for `title`, loading it (and unloading the previous model) when needed."""
        entry = self.registry.find(title)
        if self.engine is not None and self.entry is not None and self.entry.source == entry.source:
            return self.engine
        self.unload()
        self.engine, self.entry = self._load(entry), entry
        return self.engine

    def load_beside(self, title: str):
        """An engine for `title` loaded beside the current one (a hires checkpoint or a refiner, for one job);
        the caller drops it when done."""
        return self._load(self.registry.find(title))

    def _load(self, entry: ModelEntry):
        from booth.devices import resolve_device, resolve_dtype
        from booth.generate.engine import Engine
        from booth.models.loading import load_pipeline
        from booth.prompts import ExtraNetworkRegistry

        device = str(resolve_device(self.config.device))
        model = load_pipeline(entry.source, device=device, dtype=resolve_dtype(self.config.dtype, device))
        if model.hash and not entry.hash:
            entry.hash = model.hash
        networks = ExtraNetworkRegistry([self.lora_network()])
        engine = Engine(
            model, extra_networks=networks, upscalers=self.upscalers, controlnets=self.controlnets
        )
        engine.vae_tiling = self.config.vae_tiling
        engine.embeddings = self.usable_embeddings(engine)
        return engine

    def unload(self) -> None:
        if self.engine is None:
            return
        self.engine, self.entry = None, None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    # embeddings ------------------------------------------------------------------------------------

    def embeddings(self, refresh: bool = False) -> dict[str, Any]:
        """Every embedding in `embeddings_dirs` by trigger word (read once, again on refresh)."""
        with self._embeddings_lock:
            if self._embeddings is None or refresh:
                import warnings

                from booth.train.formats.embeddings import load_embedding_dirs

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # unreadable files are skipped
                    self._embeddings = load_embedding_dirs(self.config.embeddings_dirs)
            return self._embeddings

    def usable_embeddings(self, engine) -> dict[str, Any]:
        from booth.train.formats.embeddings import usable_embeddings

        return usable_embeddings(self.embeddings(), engine.pipe, warn=False)

    def embeddings_api(self) -> dict[str, Any]:
        """`/sdapi/v1/embeddings`: `{"loaded": {name: item}, "skipped": {name: item}}` for the loaded model."""
        from booth.train.formats.embeddings import embedding_widths

        everything = self.embeddings()
        engine = self.engine
        usable = self.usable_embeddings(engine) if engine is not None else everything
        out: dict[str, dict[str, Any]] = {"loaded": {}, "skipped": {}}
        for name, vectors in everything.items():
            widths = embedding_widths(vectors)
            first = next(iter(vectors.values())) if isinstance(vectors, dict) else vectors
            item = {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": max(widths.values()),
                "vectors": int(first.shape[0]) if first.dim() > 1 else 1,
            }
            out["loaded" if name in usable else "skipped"][name] = item
        return out


__all__ = ["ModelEntry", "ModelManager", "ModelRegistry"]
