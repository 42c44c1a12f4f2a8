"""The training loop shared by every method.

`train(config)` runs: checks -> load the base model -> method set-up -> data (class images, cached latents and
text embeddings) -> optimizer -> resume -> steps -> outputs. One optimizer step (`Trainer.step`) reads as the
numbered steps of the DreamBooth objective (Ruiz et al. 2022, eq. 2):

  1. batch     instance samples (+ class samples, or the class prompt for base-model prior targets)
  2. encode    z_0 from the cached VAE posterior (or the VAE), c from cached text embeddings (or the encoder)
  3. noise     eps (+ offset noise), t ~ U{0..T-1}, z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps
  4. predict   eps_hat = UNet(z_t, t, c)   (the frozen base model's prediction as prior target, if asked)
  5. loss      L = L_inst + lambda L_prior (Min-SNR weights on the instance half)
  6. step      backward, clip, optimizer, LR schedule, EMA

Every random draw of micro-step m comes from generators seeded by (seed, m), and the batch of m is a function
of (seed, m) (`booth.train.samples`), so a run resumed from a checkpoint continues with exactly the losses an
uninterrupted run has. Distributed data parallel comes from `accelerate launch` (through accelerate's
`PartialState`); each process trains on its own micro-batches.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from booth.errors import BoothError
from booth.train import losses
from booth.train.config import TrainConfig, config_differences
from booth.train.optim import FusedBackwardStep, adamw, adamw_8bit, clip_grad_norm
from booth.train.samples import (
    BatchSchedule,
    Sample,
    cache_latents,
    generator,
    load_samples,
    pixels,
    seed_global,
    stream_seed,
)

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
RUN_FILE = "run.json"
PLOT_FILE = "loss.png"
CHECKPOINTS = "checkpoints"
VALIDATION = "validation"
# settings that may change when a run is resumed (they do not change what a step computes)
RESUMABLE_CHANGES = (
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "validation_every",
    "validation_images",
    "validation_prompts",
    "save_single_file",
    "device",
)


@dataclass
class TrainState:
    """Live state of a run, read by progress bars and the server; set `stop_requested` to stop cleanly."""

    step: int = 0
    total: int = 0
    loss: float | None = None
    started_at: float = field(default_factory=time.time)
    seconds_per_step: float | None = None
    stop_requested: bool = False
    phase: str = "starting"

    @property
    def eta_seconds(self) -> float | None:
        if self.seconds_per_step is None:
            return None
        return (self.total - self.step) * self.seconds_per_step


@dataclass
class TrainResult:
    out: Path
    files: dict[str, Path]
    steps: int
    seconds: float
    losses: list[float]
    completed: bool


class TrainingInterrupted(BoothError):
    """Raised after the checkpoint of an interrupted run is written."""

    exit_code = 130


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    state: TrainState | None = None,
    callback=None,
) -> TrainResult:
    """Train `config.method` as configured; see `TrainConfig`. Returns what was written."""
    return Trainer(
        config, resume=resume, overwrite=overwrite, progress=progress, state=state, callback=callback
    ).run()


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        *,
        resume=False,
        overwrite=False,
        progress=True,
        state=None,
        callback=None,
        loaded=None,
    ):
        self.config = config
        self.loaded = loaded  # a LoadedModel to train instead of loading `config.model` (it is modified)
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.state = state or TrainState()
        self.callback = callback
        self.out = Path(config.out).expanduser()

    # ================================================================================================
    # set-up

    def run(self) -> TrainResult:
        return self._loop(self.setup())

    def setup(self) -> int:
        """Everything before the first step (checks, model, data, optimizer, resume); returns the start step."""
        from accelerate import PartialState

        cfg = self.config
        cfg.validate()
        self.dist = PartialState(cpu=resolve_cpu(cfg.device))
        self._check_out()
        self.records = self._scan_data()
        self.dist.wait_for_everyone()  # every process has checked --out before the main one writes to it
        self.device = self._device()
        self.state.phase = "loading"
        self._load_model()
        self._build_samples()
        if cfg.epochs is not None:  # kohya's epochs: whole passes over the instance images
            cfg.steps = max(
                1, math.ceil(cfg.epochs * self.schedule.batches_per_epoch / cfg.optim.gradient_accumulation)
            )
        self.state.total = cfg.steps
        self._build_optimizer()
        start = self._resume_or_start()
        self.state.phase = "training"
        return start

    def _check_out(self) -> None:
        """Refuse to mix runs: an existing run needs --resume or --overwrite; anything else is left alone."""
        out, has_run = self.out, (self.out / CONFIG_FILE).exists()
        if self.resume and self.overwrite:
            raise BoothError("--resume and --overwrite contradict each other; pass one")
        if out.exists() and not out.is_dir():
            raise BoothError(f"--out {out} is a file; pass a folder")
        if self.resume:
            if not has_run:
                raise BoothError(f"nothing to resume: {out} holds no booth training run")
            saved = TrainConfig.load(out / CONFIG_FILE)
            diff = config_differences(saved, self.config, ignore=RESUMABLE_CHANGES)
            if diff:
                raise BoothError(
                    f"cannot resume {out}: settings differ from the saved run ({', '.join(diff[:6])}); "
                    "use the same settings or a new --out"
                )
        elif out.exists() and any(out.iterdir()):
            if not has_run:
                raise BoothError(
                    f"--out {out} exists, is not empty and is not a booth run; choose another folder"
                )
            if not self.overwrite:
                raise BoothError(
                    f"{out} already holds a training run; pass --resume to continue it or --overwrite to replace it"
                )

    def _scan_data(self):
        """Every concept's images (and real class images), all checked before anything is loaded."""
        from booth.train.data import scan_image_folder

        cfg, found = self.config, []
        for concept in cfg.all_concepts():
            records = scan_image_folder(
                concept.images, min_images=cfg.data.min_images, what="instance images"
            )
            if cfg.prior.enabled and concept.class_images is not None:
                scan_image_folder(concept.class_images, min_images=1, what="class images")
            found.append((concept, records))
        return found

    def _device(self) -> torch.device:
        if self.dist.num_processes > 1 or self.config.device is None:
            return self.dist.device
        from booth.devices import resolve_device

        return resolve_device(self.config.device)

    def _load_model(self) -> None:
        from booth.models.loading import load_pipeline
        from booth.train.methods import get_method

        cfg = self.config
        if self.loaded is None:
            self.loaded = load_pipeline(cfg.model, device="cpu")
        from booth.models.families import refuse_refiner

        refuse_refiner(self.loaded.family, "training")
        pipe = self.pipe = self.loaded.pipe
        if cfg.vae is not None:
            from booth.models.vae import swap_vae

            swap_vae(pipe, cfg.vae, self.loaded.name)
        channels, latent = pipe.unet.config.in_channels, pipe.vae.config.latent_channels
        if channels != latent:
            kind, use = {
                latent + 1: ("a depth", "generate"),
                2 * latent: ("an instruct-pix2pix", "edit"),
            }.get(channels, ("an inpainting", "inpaint"))
            raise BoothError(
                f"{self.loaded.name} is {kind} model ({channels}-channel UNet): "
                f"personalize its text-to-image base model, then {use} with that"
            )
        self.method = get_method(cfg)
        torch.manual_seed(stream_seed(cfg.seed, "init", 0))  # adapter initialisation
        self.method.prepare(pipe)
        # precision: frozen weights in the compute dtype, trained weights in float32 (diffusers' rule)
        self.amp_dtype = autocast_dtype(cfg.mixed_precision, self.device)
        weight_dtype = self.amp_dtype or torch.float32
        for name, module in self.method.modules(all_components=True).items():
            trained = name in self.method.components
            module.to(self.device)
            if (not trained or self.method.name == "lora") and weight_dtype != torch.float32:
                module.to(dtype=weight_dtype)
        for p in self.method.trainable_parameters().values():
            p.data = p.data.float()
        if cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            for name in self.method.components:
                if name != "unet":
                    getattr(pipe, name).gradient_checkpointing_enable()
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        sample = pipe.unet.config.sample_size
        native = (sample[0] if isinstance(sample, list | tuple) else sample) * vae_scale
        self.resolution = cfg.data.resolution or int(native)
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.student = {n: self._wrap(getattr(pipe, n)) for n in self.method.components}

    def _wrap(self, module):
        """DistributedDataParallel under `accelerate launch` with several processes, else the module itself."""
        if self.dist.num_processes <= 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    # ------------------------------------------------------------------------------------------------
    # data

    def _build_samples(self) -> None:
        from dataclasses import replace

        from booth.train import prior
        from booth.train.data import ImageRecord

        cfg = self.config
        self.state.phase = "preparing data"
        self.instance: list[Sample] = []
        self.prior: list[Sample] = []
        for concept, records in self.records:
            prompts = [r.caption or concept.instance_prompt for r in records]
            self.instance += load_samples(
                records, prompts, self.resolution, cfg.data.buckets, False, concept.class_prompt
            )
            if not (cfg.prior.enabled and cfg.prior.mode == "class-images"):
                continue
            if concept.class_images is not None:
                images = prior.real_class_images(concept.class_images, concept.class_prompt)
            else:
                settings = replace(cfg.prior, class_prompt=concept.class_prompt)
                with self.dist.main_process_first():  # the main process fills the cache, the others read it
                    images = prior.generated_class_images(
                        self.loaded,
                        settings,
                        self.resolution,
                        progress=self.progress and self.dist.is_main_process,
                    )
            recs = [ImageRecord(i.path, None, 0, 0) for i in images]
            self.prior += load_samples(
                recs,
                [i.prompt for i in images],
                self.resolution,
                cfg.data.buckets,
                True,
                concept.class_prompt,
            )
        if cfg.cache_latents:
            if not self.method.augments:  # augmented views are new images every step
                cache_latents(self.pipe.vae, self.instance, cfg.data.flip)
            cache_latents(self.pipe.vae, self.prior, cfg.data.flip)
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if not self.method.trains_text_encoder:
            texts = {s.prompt for s in self.instance + self.prior}
            if cfg.prior.enabled:
                texts |= {c.class_prompt for c in cfg.all_concepts()}
            with torch.no_grad():
                for text in sorted(texts):
                    embeds, pooled = self._encode_text([text], self._text_encoders())
                    self.text_cache[text] = (embeds[0], None if pooled is None else pooled[0])
        self.schedule = BatchSchedule(
            self.instance,
            self.prior,
            cfg.optim.batch_size,
            cfg.data.repeats,
            cfg.seed,
            rank=self.dist.process_index,
            world=self.dist.num_processes,
        )

    def _text_encoders(self) -> list:
        names = ["text_encoder", "text_encoder_2"] if self.sdxl else ["text_encoder"]
        return [self.student.get(n, getattr(self.pipe, n)) for n in names]

    def _encode_text(self, texts: list[str], encoders: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training-time prompt encoding, as the engine encodes a plain prompt at the run's Clip skip c: SD 1/2
        layer -c after the final norm; SDXL layer -(c + 1) of both encoders, concatenated, and the pooled
        projection (`booth.prompts.encode`).
        """
        skip = self.config.clip_skip
        tokenizers = [self.pipe.tokenizer] + ([self.pipe.tokenizer_2] if self.sdxl else [])
        features, pooled = [], None
        for tok, enc in zip(tokenizers, encoders):
            ids = tok(
                texts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = enc(ids, output_hidden_states=self.sdxl or skip > 1)
            if self.sdxl:
                features.append(out.hidden_states[-(skip + 1)])
                pooled = getattr(out, "text_embeds", None)
                if pooled is None:
                    pooled = out[0]
            elif skip > 1:
                norm = getattr(enc, "text_model", enc).final_layer_norm
                features.append(norm(out.hidden_states[-skip]))
            else:
                features.append(out[0])
        return torch.cat(features, dim=-1), pooled

    def _text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.text_cache:
            missing = [t for t in dict.fromkeys(texts) if t not in self.text_cache]
            fresh = {}
            if missing:  # e.g. a prompt template the method drew: encode once, the encoder is frozen
                with torch.no_grad():
                    embeds, pooled = self._encode_text(missing, self._text_encoders())
                fresh = {t: (embeds[i], None if pooled is None else pooled[i]) for i, t in enumerate(missing)}
                if not self.config.data.augments_captions:  # augmented captions rarely repeat: not kept
                    self.text_cache.update(fresh)
            rows = [self.text_cache[t] if t in self.text_cache else fresh[t] for t in texts]
            embeds = torch.stack([r[0] for r in rows])
            pooled = torch.stack([r[1] for r in rows]) if rows[0][1] is not None else None
            return embeds, pooled
        return self._encode_text(texts, self._text_encoders())

    def _teacher_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.text_cache:
            return self._text(texts)
        names = ["text_encoder", "text_encoder_2"] if self.sdxl else ["text_encoder"]
        return self._encode_text(texts, [getattr(self.pipe, n) for n in names])

    def _latents(
        self, samples: list[Sample], gen: torch.Generator, rng: random.Random
    ) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        """z_0, the prompt and the loss mask of each sample.

        Plain samples: a draw from the cached VAE posterior (or a fresh encoding), with a random flip. Instance
        samples of a method with its own augmentation (`Method.augment`): the method's pixels, prompt and mask,
        encoded every step. The mask (1 = counts in the loss) is returned at latent resolution, or None.
        """
        flips = [self.config.data.flip and rng.random() < 0.5 for _ in samples]
        prompts = self.method.training_prompts(samples, rng)
        views = [self.method.augment(s, rng) if not s.is_prior else None for s in samples]
        data = self.config.data
        if data.augments_captions:  # kohya's caption shuffle / tag dropout / caption dropout, instance rows
            from booth.train.data import augment_caption

            for i, s in enumerate(samples):
                if not s.is_prior and views[i] is None:
                    prompts[i] = augment_caption(
                        prompts[i],
                        rng,
                        data.shuffle_caption,
                        data.keep_tokens,
                        data.tag_dropout,
                        data.caption_dropout,
                    )
        if self.config.cache_latents and not any(views) and all(s.latents for s in samples):
            posts = [s.latents[int(f)] for s, f in zip(samples, flips)]
            masks = None
        else:
            from booth.train.samples import encode_posterior

            batch, masks = [], []
            for i, (s, f) in enumerate(zip(samples, flips)):
                if views[i] is not None:
                    image, mask, prompts[i] = views[i]
                    batch.append(image)
                    masks.append(mask if mask is not None else torch.ones(1, *image.shape[1:]))
                else:
                    batch.append(pixels(s, f, self.config.data.crop, rng))
                    masks.append(torch.ones(1, *batch[-1].shape[1:]))
            mean, std = encode_posterior(self.pipe.vae, torch.stack(batch))
            posts = list(zip(mean, std))
            masks = None if not any(views) else latent_mask(torch.stack(masks), mean.shape[-2:])
        mean = torch.stack([m for m, _ in posts])
        std = torch.stack([s for _, s in posts])
        z_0 = (mean + std * torch.randn(mean.shape, generator=gen)).to(self.device)
        return z_0, prompts, None if masks is None else masks.to(self.device)

    # ------------------------------------------------------------------------------------------------
    # optimizer

    def _build_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        cfg, o = self.config, self.config.optim
        lr = cfg.learning_rate()
        groups = self.method.parameter_groups(lr, o.text_encoder_lr or lr)
        kwargs = dict(betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon, weight_decay=o.weight_decay)
        if o.use_8bit_adam:
            self.optimizer = adamw_8bit(groups, self.device, **kwargs)
        else:
            self.optimizer = adamw(groups, **kwargs)
        self.lr_scheduler = get_scheduler(
            o.scheduler, self.optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=cfg.steps
        )
        use_scaler = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.fused_step = None
        if o.fused_backward_pass:
            if self.scaler:
                raise BoothError(
                    "--fused-backward-pass cannot unscale fp16 gradients; use --mixed-precision bf16 or no"
                )
            if self.dist.num_processes > 1:
                raise BoothError(
                    "--fused-backward-pass updates each weight before the processes have averaged its "
                    "gradient; train on one process"
                )
            self.fused_step = FusedBackwardStep(self.optimizer)
        # the trained parameters are fixed from here on; collecting them walks every module (2.3 ms a step on
        # booth-mini, 2% of its forward + backward), so the step reads this instead
        self.trained = self.method.trainable_parameters()
        self.ema = EMA(self.trained, cfg.ema_decay) if cfg.ema_decay else None

    # ------------------------------------------------------------------------------------------------
    # checkpoints

    def _resume_or_start(self) -> int:
        if self.resume:
            latest = latest_checkpoint(self.out)
            if latest is not None:
                return self._load_checkpoint(latest)
        elif self.dist.is_main_process:
            if self.overwrite and self.out.exists():
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main_process:
            self.config.save(self.out / CONFIG_FILE)
            truncate_log(self.out / LOG_FILE, 0)
        return 0

    def _save_checkpoint(self, step: int) -> None:
        if not self.dist.is_main_process:
            return
        from booth.fsutil import atomic_folder

        state = {
            "step": step,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "rng": rng_states(),
        }
        folder = self.out / CHECKPOINTS / f"step-{step:06d}"
        with atomic_folder(folder) as tmp:
            torch.save(state, tmp / "state.pt")
        old = sorted((self.out / CHECKPOINTS).glob("step-*"))[: -self.config.keep_checkpoints]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)

    def _load_checkpoint(self, folder: Path) -> int:
        try:
            state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError) as error:
            raise BoothError(f"cannot read checkpoint {folder}: {error}") from None
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        set_rng_states(state["rng"])
        step = int(state["step"])
        if self.dist.is_main_process:
            self.config.save(self.out / CONFIG_FILE)
            truncate_log(self.out / LOG_FILE, step)
        return step

    # ================================================================================================
    # the loop

    def _loop(self, start: int) -> TrainResult:
        cfg = self.config
        bar = progress_bar(cfg.steps, start, self.progress and self.dist.is_main_process)
        t0, step = time.monotonic(), start
        losses_seen: list[float] = []
        for module in self.method.modules().values():
            module.train()
        restore_sigint = graceful_sigint(self.state)
        self.state.step = start
        try:
            for step in range(start + 1, cfg.steps + 1):
                record = self.step(step)
                losses_seen.append(record["loss"])
                self.state.step, self.state.loss = step, record["loss"]
                self.state.seconds_per_step = (time.monotonic() - t0) / (step - start)
                if self.dist.is_main_process:
                    append_log(self.out / LOG_FILE, record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    self._save_checkpoint(step)
                    plot_loss(self.out / LOG_FILE, self.out / PLOT_FILE)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    self._save_outputs_at(step)
                if cfg.validation_every and cfg.validation_prompts and step % cfg.validation_every == 0:
                    self.validate(step)
                if self.callback:
                    self.callback(self.state)
                if self.state.stop_requested and step < cfg.steps:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if self.state.step != step:  # a second Ctrl-C inside a step: its weights may be half-updated
                raise TrainingInterrupted(
                    f"interrupted during step {step}; continue from the last checkpoint with --resume"
                ) from None
            self._save_checkpoint(step)
            raise TrainingInterrupted(
                f"stopped after step {step}/{cfg.steps}; checkpoint saved, continue with --resume"
            ) from None
        finally:
            restore_sigint()
            if self.fused_step:
                self.fused_step.remove()
        bar.close()
        return self._finish(step, losses_seen)

    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step (= gradient_accumulation micro-steps); returns its log record."""
        cfg, accum = self.config, self.config.optim.gradient_accumulation
        totals = {"loss": 0.0, "loss_instance": 0.0, "loss_prior": 0.0}
        for k in range(accum):
            m = (step - 1) * accum + k
            sync = k == accum - 1
            with ExitStack() as stack:
                for wrapped in self.student.values():  # DDP: all-reduce gradients on the last micro-step only
                    if hasattr(wrapped, "no_sync") and not sync:
                        stack.enter_context(wrapped.no_sync())
                loss, parts = self.micro_step(m)
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            totals["loss"] += loss.item() / accum
            totals["loss_instance"] += parts[0] / accum
            totals["loss_prior"] += parts[1] / accum
        # 6. Step: clip, optimizer (or, fused into the backward pass, already done), LR schedule, EMA.
        if self.fused_step:
            grad_norm = self.fused_step.finish()
        else:
            params = list(self.trained.values())
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            grad_norm = clip_grad_norm(params, cfg.optim.max_grad_norm)
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with self.fused_step.scheduler_step() if self.fused_step else nullcontext():
            self.lr_scheduler.step()
        self.method.after_step()
        if self.ema:
            self.ema.update(self.trained, step)
        if self.dist.num_processes > 1:  # log the mean over processes
            values = torch.tensor([totals[k] for k in totals], device=self.device)
            torch.distributed.all_reduce(values)
            totals = dict(zip(totals, (values / self.dist.num_processes).tolist()))
        record = {
            "step": step,
            **totals,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "epoch": self.schedule.epoch_of((step - 1) * accum),
        }
        if not cfg.prior.enabled:
            record.pop("loss_prior")
        return record

    def micro_step(self, m: int) -> tuple[torch.Tensor, tuple[float, float]]:
        """Loss of micro-step m (numbered steps as in the module docstring)."""
        cfg = self.config
        gen = generator(cfg.seed, "step", m)
        seed_global(stream_seed(cfg.seed, "modules", m), self.device)  # dropout inside the adapters
        rng = random.Random(stream_seed(cfg.seed, "data", m))  # flips, crops, prompt templates, augmentation

        # 1. Batch: instance samples, then class samples (class-image prior) in the same batch.
        inst = [self.instance[i] for i in self.schedule.instance_batch(m)]
        prior = [self.prior[i] for i in self.schedule.prior_batch(m, len(inst))] if self.prior else []
        samples = inst + prior
        is_prior = torch.tensor([s.is_prior for s in samples], device=self.device)

        # 2. Encode: z_0 (with the method's augmentation and loss mask, if any) and the text conditioning c.
        z_0, prompts, mask = self._latents(samples, gen, rng)
        base_prior = cfg.prior.enabled and cfg.prior.mode == "base-model"
        if base_prior:  # the class prompt on the instance latents, target from the frozen model
            z_0 = torch.cat([z_0, z_0])
            mask = None if mask is None else torch.cat([mask, torch.ones_like(mask)])
            prompts += [s.class_prompt for s in inst]
            is_prior = torch.cat([is_prior, torch.ones(len(inst), dtype=torch.bool, device=self.device)])
        c, pooled = self._text(prompts)

        # 3. Noise: eps (+ offset, pyramid), t ~ U{0..T-1}, z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps.
        n = len(inst)
        eps = self._noise(tuple(z_0[:n].shape), gen, z_0.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=gen).to(
            self.device
        )
        if len(z_0) > n:  # class samples draw their own noise; base-model prior rows reuse the instance draw
            extra = len(z_0) - n
            if base_prior:
                eps, t = torch.cat([eps, eps]), torch.cat([t, t])
            else:
                eps_p = self._noise((extra, *z_0.shape[1:]), gen, z_0.dtype)
                t_p = torch.randint(
                    0, self.noise_scheduler.config.num_train_timesteps, (extra,), generator=gen
                )
                eps, t = torch.cat([eps, eps_p]), torch.cat([t, t_p.to(self.device)])
        noised = (
            eps  # input perturbation (Ning et al. 2023): the input's noise differs, the target's does not
        )
        if cfg.loss.input_perturbation > 0:
            xi = torch.randn(eps.shape, generator=gen).to(eps)
            noised = eps + cfg.loss.input_perturbation * xi
        z_t = self.noise_scheduler.add_noise(z_0, noised, t)
        alpha_bar = self.alphas_cumprod[t]
        target = losses.diffusion_target(self.prediction_type, z_0, eps, alpha_bar)

        # 4. Predict: the student on every row; for base-model prior rows the frozen model gives the target.
        pred = self._unet(self.student.get("unet", self.pipe.unet), z_t, t, c, pooled)
        if base_prior:
            with torch.no_grad(), self.method.base_model():
                c_base, pooled_base = self._teacher_text(prompts[n:])
                pooled_base = pooled_base if pooled is not None else None
                target[n:] = self._unet(self.pipe.unet, z_t[n:], t[n:], c_base, pooled_base).float()

        # 5. Loss: L_inst + lambda * L_prior, Min-SNR weights on the instance half.
        per_sample = losses.per_sample_mse(pred, target, mask)
        weights = None
        if cfg.loss.snr_gamma or cfg.loss.debiased:
            snr_t = losses.snr(self.noise_scheduler.alphas_cumprod, t.cpu()).to(self.device)
            weights = torch.ones_like(snr_t)
            if cfg.loss.snr_gamma:
                weights = weights * losses.min_snr_weights(snr_t, cfg.loss.snr_gamma, self.prediction_type)
            if cfg.loss.debiased:
                weights = weights * losses.debiased_weights(snr_t, self.prediction_type)
        loss, loss_inst, loss_prior = losses.dreambooth_loss(per_sample, is_prior, cfg.prior.weight, weights)
        return loss, (float(loss_inst), float(loss_prior))

    def _noise(self, shape: tuple[int, ...], gen: torch.Generator, dtype) -> torch.Tensor:
        """eps for `shape`: Gaussian, with the offset and the pyramid noise the run asks for."""
        loss = self.config.loss
        eps = losses.offset_noise(shape, loss.noise_offset, gen, self.device, dtype)
        if loss.multires_iterations > 0:
            eps = losses.pyramid_noise(eps, loss.multires_iterations, loss.multires_discount, gen)
        return eps

    def _unet(self, unet, z_t, t, c, pooled) -> torch.Tensor:
        kwargs = {}
        if pooled is not None:  # SDXL micro-conditioning at the training size, no crop
            h, w = z_t.shape[-2] * self._vae_scale, z_t.shape[-1] * self._vae_scale
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device).repeat(len(z_t), 1)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        with self._autocast():
            return unet(z_t, t, encoder_hidden_states=c, **kwargs).sample

    @property
    def _vae_scale(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------------------------------------
    # validation and outputs

    @torch.no_grad()
    def validate(self, step: int, ema: bool = False) -> Path | None:
        """Sample the validation prompts (seeds 0..n-1) into validation/step-NNNNNN.png."""
        if not self.dist.is_main_process:
            return None
        from booth.generate.engine import Engine
        from booth.generate.grid import annotated_grid
        from booth.generate.metadata import atomic_write
        from booth.generate.params import GenerationParams

        cfg = self.config
        modules = self.method.modules().values()
        for module in modules:
            module.eval()
        engine = Engine(self.loaded)
        rows = []
        for prompt in cfg.validation_prompts:
            params = GenerationParams(
                prompt=prompt,
                seed=0,
                clip_skip=cfg.clip_skip,
                batch_size=cfg.validation_images,
                steps=20,
                width=self.resolution,
                height=self.resolution,
            )
            rows.append(engine.generate(params).images)
        for module in modules:
            module.train()
        self.last_validation_image = rows[0][0] if rows and rows[0] else None
        grid = annotated_grid(rows, list(cfg.validation_prompts), [])
        path = self.out / VALIDATION / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: grid.save(f, format="PNG"))
        return path

    def _finish(self, step: int, losses_seen: list[float]) -> TrainResult:
        cfg = self.config
        files: dict[str, Path] = {}
        if self.dist.is_main_process:
            self.state.phase = "saving"
            self._save_checkpoint(
                step
            )  # the raw weights: a later --resume with more --steps continues from them
            if self.ema:
                self.ema.copy_to(self.method.trainable_parameters())
            for module in self.method.modules().values():
                module.eval()
            files = self.method.save(self.out, self.metadata())
            if cfg.validation_prompts:
                files["validation"] = self.validate(step)
            if "kohya" in files:
                files.update(self._write_card(files["kohya"], step))
            plot = plot_loss(self.out / LOG_FILE, self.out / PLOT_FILE)
            if plot:
                files["loss_plot"] = plot
            summary = {
                "completed": True,
                "method": cfg.method,
                "steps": step,
                "seconds": round(time.time() - self.state.started_at, 2),
                "final_loss": losses_seen[-1] if losses_seen else None,
                "files": {k: str(v) for k, v in files.items()},
            }
            from booth.generate.metadata import atomic_write

            text = json.dumps(summary, indent=2) + "\n"
            atomic_write(self.out / RUN_FILE, lambda f: f.write(text.encode()))
        self.state.phase = "done"
        return TrainResult(self.out, files, step, time.time() - self.state.started_at, losses_seen, True)

    def _write_card(self, network: Path, step: int) -> dict[str, Path]:
        """A1111's card for the trained network file: `<name>.json` with the activation text (the instance
        prompts), sd version and a description, keeping every field a user already set; and, after validation,
        `<name>.preview.png` (the first validation picture). A side file that cannot be written only warns."""
        from booth.generate.cards import fill_user_metadata, save_preview, sd_version_of, sidecar
        from booth.train.formats.lora import BASE_MODEL_VERSIONS

        cfg = self.config
        written: dict[str, Path] = {}
        if sidecar(network).name in (CONFIG_FILE, RUN_FILE):
            print(f"booth: no {sidecar(network).name} card for {network.name}: that is the run's own file")
            return written
        prompts = dict.fromkeys(c.instance_prompt.strip() for c in cfg.all_concepts())
        known = {
            "activation text": ", ".join(p for p in prompts if p),
            "sd version": sd_version_of(BASE_MODEL_VERSIONS.get(self.loaded.family.name)),
            "description": f"booth {cfg.method}, {step} steps on {self.loaded.name}",
        }
        try:
            fill_user_metadata(network, known)
            written["card"] = sidecar(network)
            image = getattr(self, "last_validation_image", None)
            if image is not None:
                written["preview"] = save_preview(network, image, suffix=".preview.png")
        except BoothError as exc:
            print(f"booth: warning: {exc}")
        return written

    def _save_outputs_at(self, step: int) -> dict[str, Path]:
        """The method's outputs at this step, in `steps/step-NNNNNN/`, named `<name>-stepNNNNNN`."""
        from dataclasses import replace

        if not self.dist.is_main_process:
            return {}
        final = self.method.config
        self.method.config = replace(final, name=f"{final.run_name}-step{step:06d}")
        try:
            return self.method.save(self.out / "steps" / f"step-{step:06d}", self.metadata())
        finally:
            self.method.config = final

    def metadata(self) -> dict[str, str]:
        """kohya-style `ss_*` training metadata (formats.md §3.2) plus booth's own config, all strings."""
        cfg = self.config
        tag_frequency: dict[str, dict[str, int]] = {}
        dataset_dirs: dict[str, dict[str, int]] = {}
        for concept, records in self.records:
            folder = Path(concept.images).name
            tags = tag_frequency.setdefault(folder, {})
            for record in records:
                for tag in (
                    part.strip().lower() for part in (record.caption or concept.instance_prompt).split(",")
                ):
                    if tag:
                        tags[tag] = tags.get(tag, 0) + 1
            dataset_dirs[folder] = {"n_repeats": cfg.data.repeats, "img_count": len(records)}
        lr = cfg.learning_rate()
        meta = {
            "ss_output_name": cfg.run_name,
            "ss_training_comment": cfg.data.instance_prompt,
            "ss_training_started_at": str(int(self.state.started_at)),
            "ss_training_finished_at": str(int(time.time())),
            "ss_learning_rate": str(lr),
            "ss_unet_lr": str(lr),
            "ss_text_encoder_lr": str(cfg.optim.text_encoder_lr or lr),
            "ss_optimizer": "bitsandbytes.optim.AdamW8bit"
            if cfg.optim.use_8bit_adam
            else "torch.optim.AdamW",
            "ss_lr_scheduler": cfg.optim.scheduler,
            "ss_lr_warmup_steps": str(cfg.optim.warmup_steps),
            "ss_max_train_steps": str(cfg.steps),
            "ss_num_epochs": str(
                cfg.epochs
                if cfg.epochs is not None
                else self.schedule.epoch_of(cfg.steps * cfg.optim.gradient_accumulation - 1) + 1
            ),
            "ss_steps": str(self.state.step),
            "ss_seed": str(cfg.seed),
            "ss_max_grad_norm": str(cfg.optim.max_grad_norm),
            "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
            "ss_gradient_accumulation_steps": str(cfg.optim.gradient_accumulation),
            "ss_mixed_precision": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "no",
            "ss_batch_size_per_device": str(cfg.optim.batch_size),
            "ss_resolution": str((self.resolution, self.resolution)),
            "ss_cache_latents": str(cfg.cache_latents),
            "ss_flip_aug": str(cfg.data.flip),
            "ss_clip_skip": str(cfg.clip_skip),
            "ss_shuffle_caption": str(cfg.data.shuffle_caption),
            "ss_keep_tokens": str(cfg.data.keep_tokens),
            "ss_caption_dropout_rate": str(cfg.data.caption_dropout),
            "ss_caption_tag_dropout_rate": str(cfg.data.tag_dropout),
            "ss_random_crop": str(cfg.data.crop == "random"),
            "ss_enable_bucket": str(cfg.data.buckets),
            "ss_num_train_images": str(len(self.instance) * cfg.data.repeats),
            "ss_num_reg_images": str(len(self.prior)),
            "ss_prior_loss_weight": str(cfg.prior.weight if cfg.prior.enabled else 1.0),
            "ss_min_snr_gamma": str(cfg.loss.snr_gamma),
            "ss_debiased_estimation": str(cfg.loss.debiased),
            "ss_multires_noise_iterations": str(cfg.loss.multires_iterations or None),
            "ss_multires_noise_discount": str(cfg.loss.multires_discount),
            "ss_ip_noise_gamma": str(cfg.loss.input_perturbation or None),
            "ss_noise_offset": str(cfg.loss.noise_offset or None),
            "ss_sd_model_name": self.loaded.name,
            "ss_sd_model_hash": str(self.loaded.hash),
            "ss_tag_frequency": json.dumps(tag_frequency),
            "ss_dataset_dirs": json.dumps(dataset_dirs),
            "booth.train_config": json.dumps(cfg.to_dict(), sort_keys=True),
        }
        return meta


# ====================================================================================================
# small pieces


class EMA:
    """Exponential moving average of the trained weights, with the (1 + t) / (10 + t) warm-up."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - d)

    @torch.no_grad()
    def copy_to(self, params: dict[str, torch.nn.Parameter]) -> None:
        for n, p in params.items():
            p.copy_(self.shadow[n])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.shadow = state["decay"], state["shadow"]


def latent_mask(masks: torch.Tensor, size) -> torch.Tensor:
    """[B, 1, H, W] pixel masks -> latent resolution: a latent pixel counts only if its whole patch does."""
    return -torch.nn.functional.adaptive_max_pool2d(-masks.float(), tuple(size))


def graceful_sigint(state: TrainState):
    """First Ctrl-C: finish the current step, checkpoint, stop. Second: stop at once. Returns the undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if state.stop_requested:
            raise KeyboardInterrupt
        state.stop_requested = True
        print("\nbooth: stopping after this step (Ctrl-C again to stop at once)", flush=True)

    signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous)


def resolve_cpu(device: str | None) -> bool:
    if device is not None:
        return str(device).startswith("cpu")
    return not torch.cuda.is_available()


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for "auto" / "no" / "fp16" / "bf16" on this device (None: float32 throughout)."""
    if mode == "no":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise BoothError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    return torch.float16 if mode == "fp16" else torch.bfloat16


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("step-*"))
    found = [f for f in found if (f / "state.pt").exists()]
    return found[-1] if found else None


def append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, step: int) -> None:
    """Keep the log records of steps <= `step` (a resumed run rewrites what came after its checkpoint)."""
    from booth.generate.metadata import atomic_write

    kept = [r for r in read_log(path) if r.get("step", 0) <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    atomic_write(path, lambda f: f.write(text.encode()))


def plot_loss(log: Path, out: Path) -> Path | None:
    """Loss per step and its moving average (matplotlib, written atomically)."""
    records = read_log(log)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from booth.generate.metadata import atomic_write

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for key, label in (("loss", "loss"), ("loss_prior", "prior loss")):
        values = [r[key] for r in records if key in r]
        if not values:
            continue
        ax.plot(steps[: len(values)], values, alpha=0.3, lw=0.8)
        window = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 : len(values)], smooth, lw=1.8, label=f"{label} (mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return out


def progress_bar(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=start, desc="training", unit="step", disable=not enabled, dynamic_ncols=True
    )
