"""The one loop of every stage: sessions, checkpoints, the numbered training step, chunks, `train_all`."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from booth.devices import resolve_device
from booth.errors import BoothError
from booth.fsutil import atomic_folder
from booth.mini.train.autoencoder import VaeTask, folder_init_weights
from booth.mini.train.clip import ClipTask
from booth.mini.train.config import Optim, TrainConfig
from booth.mini.train.data import MiniData, batch_indices, data_position, load_split, step_generator
from booth.mini.train.unet import UNetTask
from booth.mini.train.workdir import (
    CHECKPOINT,
    CONFIG_FILE,
    DATASET_FILE,
    DONE,
    FINAL,
    LOG,
    READOUT,
    REPA,
    TEXT_ENCODER,
    atomic_save,
    atomic_write_text,
    describe_hardware,
    final_dir,
    is_finished,
    resolve_precision,
)


def _trainable_groups(
    model: torch.nn.Module, weight_decay: float, lr: float, lrs: dict[str, float] | None = None
) -> list[dict]:
    """Weight decay on matrices, kernels and embeddings only (not on biases, norm gains, the temperature).

    `lrs` maps a child module's name to its own learning rate (e.g. {"text_encoder": 1e-3}); the rest get `lr`.
    """
    lrs = lrs or {}
    owners = [(name, dict(model.named_children())[name]) for name in lrs]
    owned = {id(p) for _, m in owners for p in m.parameters()}
    sets = [(lr, [p for p in model.parameters() if id(p) not in owned])]
    sets += [(lrs[name], list(m.parameters())) for name, m in owners]
    groups = []
    for rate, params in sets:
        params = [p for p in params if p.requires_grad]
        groups.append(
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "lr": rate}
        )
        groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": rate})
    # without `lrs` always the same two groups (empty or not): older checkpoints' optimizer states fit them
    return [g for g in groups if g["params"]] if lrs else groups


def build_task(
    stage: str,
    config: TrainConfig,
    data: MiniData,
    device: torch.device,
    seed: int,
    work: Path,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = False,
):
    """The model and steps 1-5 of one stage (the decoder and UNet stages load finished stages from `work`)."""
    check_prerequisites(work, stage, config)
    cfg = config.stage(stage)
    if stage == "clip":
        return ClipTask(config, data, device, seed)
    if stage in ("vae", "decoder"):
        return VaeTask(cfg, config.arch.vae, data, device, seed, stage_init(work, stage, cfg))
    return UNetTask(config, data, device, seed, work, dtype=dtype, progress=progress)


def check_prerequisites(work: Path, stage: str, config: TrainConfig) -> None:
    """BoothError unless the stages `stage` builds on are finished in `work`: the UNet trains on the mini-CLIP's
    text tower and the VAE's latents; the decoder stage starts from the vae stage's autoencoder (unless it has
    its own `init`)."""
    needs = {"unet": ("clip", "vae"), "decoder": () if config.stage(stage).init else ("vae",)}.get(stage, ())
    for before in needs:
        if not is_finished(work, before):
            raise BoothError(
                f"the {before} stage is not finished in {work}; train it before the {stage}, or take it from a "
                "pipeline with --reuse booth-mini"
            )


def stage_init(work: Path, stage: str, cfg: Any) -> Path | None:
    """The weights a fresh stage starts from: its `init`; for the decoder stage by default the ``vae``
    stage's autoencoder (which `check_prerequisites` has found finished)."""
    if cfg.init:
        return Path(cfg.init)
    return final_dir(work, "vae") if stage == "decoder" else None


# --- the loop --------------------------------------------------------------------------------------------


@dataclass
class StageReport:
    """What one `train_stage` call did."""

    stage: str
    step: int
    total_steps: int
    ran_steps: int
    seconds: float
    finished: bool
    last_loss: float | None = None


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """Exponential moving average of the weights, decay warmed up as min(decay, (1 + t) / (10 + t)).

    Frozen parameters (a text encoder that only rides along) equal their average already and are skipped.
    """
    rate = 1.0 - min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.lerp_(p, rate)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def pinned_run(work: str | Path) -> tuple[TrainConfig, int] | None:
    """The configuration and seed a work folder was started with (its config.json), None for a new folder."""
    path = Path(work) / CONFIG_FILE
    if not path.is_file():
        return None
    return read_run_config(path)


def read_run_config(path: str | Path) -> tuple[TrainConfig, int]:
    """A training recipe from a JSON file: a work folder's config.json ({"config": ..., "seed": ...}) or a
    bare `TrainConfig.to_json` (seed 0)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise BoothError(f"cannot read booth-mini config {path}: {error}") from None
    run = data if isinstance(data, dict) and "config" in data else {"config": data, "seed": 0}
    if not isinstance(run["config"], dict) or not isinstance(run.get("seed", 0), int):
        raise BoothError(f"{path} is not a booth-mini training config")
    return TrainConfig.from_json(run["config"]), run.get("seed", 0)


def _pin_run(work: Path, config: TrainConfig, data: MiniData, data_dir: Path, seed: int) -> None:
    """Write work/config.json and work/dataset.json once; BoothError if a later call differs."""
    work.mkdir(parents=True, exist_ok=True)
    run = {"config": config.to_json(), "seed": seed}
    path = work / CONFIG_FILE
    if path.is_file():
        if read_run_config(path) != (config, seed):  # parsed: a folder from before a new setting still fits
            raise BoothError(
                f"{work} holds a run with another configuration or seed; use a new --work folder to change them"
            )
    else:
        atomic_write_text(path, json.dumps(run, indent=2) + "\n")
    manifest_path = data_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    attribution = data_dir / "ATTRIBUTION.md"
    dataset = {
        "path": str(data_dir.resolve()),
        "train_checksum": data.checksum,
        "manifest": manifest,
        "attribution": attribution.read_text() if attribution.is_file() else "",
    }
    path = work / DATASET_FILE
    if path.is_file():
        if json.loads(path.read_text())["train_checksum"] != data.checksum:
            raise BoothError(
                f"{work} was trained on another dataset than {data_dir}; use a new --work folder"
            )
    else:
        atomic_write_text(path, json.dumps(dataset, indent=2) + "\n")


def _with_pairs(work: Path, data: MiniData, data_dir: Path) -> MiniData:
    """The training split followed by the ``pairs`` split; the pairs' checksum is pinned in dataset.json."""
    try:
        pairs = load_split(data_dir, "pairs")
    except BoothError:
        raise BoothError(
            f"{data_dir} has no pairs split (two-object images): rebuild it with booth mini dataset --n-pairs N"
        ) from None
    path = work / DATASET_FILE
    dataset = json.loads(path.read_text())
    if "pairs_checksum" not in dataset:  # the first UNet session pins them
        dataset["pairs_checksum"] = pairs.checksum
        atomic_write_text(path, json.dumps(dataset, indent=2) + "\n")
    elif dataset["pairs_checksum"] != pairs.checksum:
        raise BoothError(
            f"{work} was trained on other two-object images than {data_dir}; use a new --work folder"
        )
    checksum = hashlib.sha256(f"{data.checksum}+{pairs.checksum}".encode()).hexdigest()
    return MiniData(torch.cat([data.images, pairs.images]), data.records + pairs.records, checksum)


@dataclass
class _Session:
    """One `train_stage` call: the task, its optimizer state and where it logs."""

    stage: str
    folder: Path
    data_dir: Path
    task: Any
    optim: Optim
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: torch.nn.Module | None
    device: torch.device
    dtype: torch.dtype | None
    seed: int
    step: int = 0
    train_seconds: float = 0.0
    compiled: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return len(self.task.data)


def _open_session(
    stage: str,
    data_dir: Path,
    work: Path,
    config: TrainConfig,
    device,
    seed: int,
    progress: bool,
    compile_models: bool = False,
) -> _Session:
    """Load the data, build the task, optimizer (AdamW), LR schedule and EMA, resume the checkpoint, and
    (`compile_models`) compile the task's `compile_targets` in place (their weights and names unchanged)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    dev = resolve_device(device)
    dtype = resolve_precision(config.precision, dev)
    data = load_split(data_dir, "train")
    if data.images.shape[-1] != config.arch.resolution:
        raise BoothError(
            f"{data_dir} holds {data.images.shape[-1]} px images; the model is {config.arch.resolution} px"
        )
    _pin_run(work, config, data, data_dir, seed)
    if stage == "unet" and config.unet.pairs:
        data = _with_pairs(work, data, data_dir)
    folder = work / stage
    folder.mkdir(parents=True, exist_ok=True)
    task = build_task(stage, config, data, dev, seed, work, dtype=dtype, progress=progress)
    optim = config.stage(stage).optim
    cfg = config.stage(stage)
    lrs = {}
    if stage == "unet" and cfg.train_text_encoder and cfg.text_encoder_lr is not None:
        lrs[TEXT_ENCODER] = cfg.text_encoder_lr
    optimizer = torch.optim.AdamW(
        _trainable_groups(task.model, optim.weight_decay, optim.lr, lrs), lr=optim.lr
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, optim.warmup_steps, optim.steps)
    ema = copy.deepcopy(task.model).requires_grad_(False) if stage == "unet" else None
    session = _Session(
        stage=stage,
        folder=folder,
        data_dir=data_dir,
        task=task,
        optim=optim,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        device=dev,
        dtype=dtype,
        seed=seed,
    )
    init = stage_init(work, stage, cfg)
    if not (folder / CHECKPOINT).is_file() and init:  # a fresh stage started from earlier weights
        _warm_start(session, init)
    _load_checkpoint(session)
    _trim_log(folder / LOG, session.step)
    if compile_models:
        targets = task.compile_targets()
        for module in targets.values():
            module.compile()
        session.compiled = tuple(targets)
    return session


def unet_checkpoint_weights(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The EMA (else the raw) weights of a UNet-stage checkpoint, per component: "unet", and "text_encoder"
    (and "readout", "repa" when it has those heads) when the checkpoint is of the `Denoiser` (older
    checkpoints hold the UNet alone)."""
    weights = state.get("ema") or state["model"]
    if not any(k.startswith("unet.") for k in weights):
        return {"unet": weights}
    parts = {
        name: {k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(f"{name}.")}
        for name in ("unet", TEXT_ENCODER, READOUT, REPA)
    }
    return {name: part for name, part in parts.items() if part or name not in (READOUT, REPA)}


def _pipeline_weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The "unet" and (if present) "text_encoder" weights of a diffusers pipeline folder, as float32."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    parts = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet").float().state_dict()}
    if (folder / TEXT_ENCODER / "config.json").is_file():
        parts[TEXT_ENCODER] = CLIPTextModel.from_pretrained(folder / TEXT_ENCODER).float().state_dict()
    return parts


def _warm_start(s: _Session, path: Path) -> None:
    """Start a fresh stage from earlier weights: the CLIP, VAE or decoder from a saved model folder; the UNet
    (model and EMA) from the UNet EMA weights of another run's UNet-stage checkpoint, or from a pipeline
    folder's UNet.

    The text encoder starts as this run's mini-CLIP text tower (how a UNet trained on an earlier CLIP is
    carried over to a new one) unless `init_text_encoder` asks for the checkpoint's encoder too."""
    if s.stage != "unet":
        kind = "clip" if s.stage == "clip" else "vae"
        try:
            s.task.model.load_state_dict(folder_init_weights(kind, path))
        except RuntimeError:  # missing, unexpected or differently shaped weights
            raise BoothError(f"{s.stage} init {path} has another architecture than this run's") from None
        return
    if (path / "unet" / "config.json").is_file():  # a diffusers pipeline folder
        parts = _pipeline_weights(path)
    elif path.is_file():
        parts = unet_checkpoint_weights(torch.load(path, map_location="cpu", weights_only=True))
    else:
        raise BoothError(
            f"unet init {path} not found (a UNet-stage checkpoint.pt of an earlier run, or a pipeline folder)"
        )
    names = ["unet"]
    if s.task.cfg.init_text_encoder:
        if not parts.get(TEXT_ENCODER):
            raise BoothError(f"unet init {path} holds no text encoder (its run did not train one)")
        names.append(TEXT_ENCODER)
        # the readout heads go on from the checkpoint's when it reads the same parts: fresh heads would pull the
        # carried encoder at their first steps (2026-12-07: from a pipeline folder, which has none, with the
        # encoder at lr 1e-3, background right 99 -> 51% in 600 steps)
        if hasattr(s.task.model, READOUT) and _same_shapes(s.task.model.readout, parts.get(READOUT)):
            names.append(READOUT)
    if hasattr(s.task.model, REPA) and _same_shapes(s.task.model.repa, parts.get(REPA)):
        names.append(REPA)  # the REPA projector goes on too: a fresh one would pull the carried UNet's layer
    try:
        for name in names:
            getattr(s.task.model, name).load_state_dict(parts[name])
            getattr(s.ema, name).load_state_dict(parts[name])
    except RuntimeError:  # missing, unexpected or differently shaped weights
        raise BoothError(f"unet init {path} has another architecture than this run's") from None


def _same_shapes(module: torch.nn.Module, weights: dict[str, torch.Tensor] | None) -> bool:
    own = module.state_dict()
    return (
        bool(weights) and own.keys() == weights.keys() and all(own[k].shape == weights[k].shape for k in own)
    )


def _save_checkpoint(s: _Session) -> None:
    epoch, position = data_position(s.n, s.optim.batch_size, s.step)
    atomic_save(
        {
            "step": s.step,
            "model": s.task.model.state_dict(),
            "ema": s.ema.state_dict() if s.ema is not None else None,
            "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict(),
            "rng": _rng_state(),
            "data_position": {"epoch": epoch, "batch": position, "batch_size": s.optim.batch_size},
            "train_seconds": s.train_seconds,
        },
        s.folder / CHECKPOINT,
    )


def _load_checkpoint(s: _Session) -> None:
    path = s.folder / CHECKPOINT
    if not path.is_file():
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    if s.stage == "unet" and not any(k.startswith("unet.") for k in state["model"]):
        _load_unet_only_checkpoint(s, state)  # written before the text encoder joined the UNet stage
    else:
        s.task.model.load_state_dict(state["model"])
        if s.ema is not None:
            s.ema.load_state_dict(state["ema"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    s.step, s.train_seconds = int(state["step"]), float(state["train_seconds"])


def _load_unet_only_checkpoint(s: _Session, state: dict) -> None:
    """Load a UNet stage checkpoint that holds only the UNet (runs from before `Denoiser`).

    Its optimizer state fits only when the text encoder is frozen (the same trainable parameters).
    """
    if s.task.cfg.train_text_encoder:
        raise BoothError(
            f"{s.folder / CHECKPOINT} was written with a frozen text encoder; this configuration trains it, so "
            "the optimizer state does not fit: use a new --work folder"
        )
    s.task.model.unet.load_state_dict(state["model"])
    s.ema.unet.load_state_dict(state["ema"])


def _trim_log(path: Path, step: int) -> None:
    """Drop step records past the checkpoint (a chunk killed between checkpoints logged them)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _train_step(s: _Session) -> dict:
    """One optimizer step; returns its log record."""
    tick = time.perf_counter()
    index = batch_indices(s.n, s.optim.batch_size, s.seed, s.step)
    loss, metrics = s.task.loss(index, step_generator(s.seed, s.stage, s.step), s.dtype, s.step)  # 1-5
    # 6. optimizer step (+ EMA)
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s.task.model.parameters(), s.optim.grad_clip)
    s.optimizer.step()
    s.scheduler.step()
    if s.ema is not None:
        update_ema(s.ema, s.task.model, s.task.cfg.ema_decay, s.step)
    s.step += 1
    value = float(loss.detach())
    if not math.isfinite(value):
        raise BoothError(f"the {s.stage} loss is not finite at step {s.step}; lower the learning rate")
    seconds = time.perf_counter() - tick
    s.train_seconds += seconds
    return {"step": s.step, "loss": value, "lr": s.scheduler.get_last_lr()[0], "seconds": seconds, **metrics}


def _compiled_step(s: _Session) -> dict:
    """The first step of a compiled chunk, where torch.compile builds its kernels: its failure (no C++
    compiler, an unsupported device) as a one-line BoothError."""
    import torch._dynamo

    try:
        return _train_step(s)
    except torch._dynamo.exc.TorchDynamoException as error:
        message = str(error).strip()
        first_line = message.splitlines()[0] if message else type(error).__name__
        raise BoothError(
            f"torch.compile failed on this machine ({first_line}); train without --compile"
        ) from None


def _chunk_record(s: _Session, first: int, started: float) -> dict:
    return {
        "event": "chunk",
        "start_step": first,
        "end_step": s.step,
        "wall_seconds": time.monotonic() - started,
        "device": str(s.device),
        "hardware": describe_hardware(s.device),
        "precision": "bf16 autocast" if s.dtype == torch.bfloat16 else "fp32",
        "compiled": list(s.compiled),
        "torch": torch.__version__,
    }


def _finish(s: _Session) -> None:
    """Save ``final/`` (EMA weights for the UNet) and ``done.json``."""
    if s.ema is not None:
        s.task.model.load_state_dict(s.ema.state_dict())
    summary = {
        "stage": s.stage,
        "steps": s.step,
        "batch_size": s.optim.batch_size,
        "train_seconds": s.train_seconds,
    }
    with atomic_folder(s.folder / FINAL) as tmp:
        summary.update(s.task.save_final(tmp, s.data_dir))
    atomic_write_text(s.folder / DONE, json.dumps(summary, indent=2) + "\n")


def train_stage(
    stage: str,
    data_dir: str | Path,
    work_dir: str | Path,
    config: TrainConfig,
    *,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    compile_models: bool = False,
) -> StageReport:
    """Train one stage for at most `minutes` (wall clock, setup included) and `steps` steps in this call.

    Continues from ``work_dir/<stage>/checkpoint.pt`` if present; when the stage reaches its configured
    total steps it saves ``final/`` and ``done.json``. A finished stage returns at once. `device` None
    picks CUDA when present. `compile_models`: torch.compile the stage's `compile_targets` (a runtime choice,
    not part of the recipe: a chunk may compile and the next not; each chunk's log record names them).
    """
    started = time.monotonic()
    work = Path(work_dir)
    total = config.stage(stage).optim.steps
    if is_finished(work, stage):
        return StageReport(stage, total, total, 0, 0.0, True)
    check_prerequisites(work, stage, config)
    s = _open_session(stage, Path(data_dir), work, config, device, seed, progress, compile_models)
    first, last = s.step, None
    end = total if steps is None else min(total, s.step + max(0, steps))
    deadline = started + 60.0 * minutes if minutes is not None else math.inf
    bar = tqdm(total=total, initial=s.step, desc=f"booth-mini {stage}", unit="step", disable=not progress)
    with open(s.folder / LOG, "a") as log:
        while s.step < end and time.monotonic() < deadline:
            last = _compiled_step(s) if s.compiled and s.step == first else _train_step(s)
            log.write(json.dumps(last) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            if s.step % config.checkpoint_every == 0 and s.step < end:
                _save_checkpoint(s)
        bar.close()
        _save_checkpoint(s)
        log.write(json.dumps(_chunk_record(s, first, started)) + "\n")
    if s.step >= total:
        _finish(s)
    loss = last["loss"] if last else None
    return StageReport(
        stage, s.step, total, s.step - first, time.monotonic() - started, s.step >= total, loss
    )


def train_all(
    data_dir: str | Path,
    work_dir: str | Path,
    config: TrainConfig,
    *,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    compile_models: bool = False,
) -> list[StageReport]:
    """Run the configuration's stages in order, skipping finished ones; `minutes` and `steps` budget the
    whole call."""
    started = time.monotonic()
    reports = []
    for stage in config.stages:
        left_minutes = None if minutes is None else minutes - (time.monotonic() - started) / 60.0
        left_steps = None if steps is None else steps - sum(r.ran_steps for r in reports)
        if (left_minutes is not None and left_minutes <= 0) or (left_steps is not None and left_steps <= 0):
            break
        report = train_stage(
            stage,
            data_dir,
            work_dir,
            config,
            minutes=left_minutes,
            steps=left_steps,
            device=device,
            seed=seed,
            progress=progress,
            compile_models=compile_models,
        )
        reports.append(report)
        if not report.finished:
            break
    return reports


def export_pipeline(work_dir: str | Path, out_dir: str | Path) -> Path:
    """Export a finished run as a diffusers folder + CLIP evaluator + model card (`booth.mini.export`)."""
    from booth.mini.export import export_pipeline as _export

    return _export(work_dir, out_dir)
