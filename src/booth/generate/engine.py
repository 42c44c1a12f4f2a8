"""The generation engine: A1111-grade txt2img and img2img on diffusers model classes.

The engine owns its denoising loop (diffusers' pipelines cannot do A1111's scheduled conditioning, composable
`AND` prompts or per-image CPU noise), but uses the diffusers components unchanged: the UNet, the VAE, the text
encoders and a fresh diffusers scheduler per call. The loop in `_denoise` reads as numbered steps.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

import booth
from booth.errors import BoothError
from booth.generate import guidance, hires, inpaint
from booth.generate.controlnet import REFERENCE_MODULES
from booth.generate.imageops import resize_image
from booth.generate.noise import batch_noise, resolve_seed, step_generators
from booth.generate.params import GenerationParams
from booth.generate.regions import LatentCouple
from booth.models.families import same_latent_space


@dataclass
class GenerationState:
    """Live state of a running generation, read by progress bars, the API's /progress and the web UI.

    Set `interrupted` to stop after the current step (images so far are returned), `skipped` to abandon the
    current batch and move on to the next.
    """

    job_no: int = 0
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False
    started_at: float = field(default_factory=time.time)
    latents: torch.Tensor | None = None
    # for `eta`: each pass of a batch (the first, hires fix's) by its steps and the pixels it works on, which
    # pass is running and how far, and the measured seconds of its steps {pass: [seconds, steps]}
    pass_steps: list[int] = field(default_factory=lambda: [0])
    pass_pixels: list[int] = field(default_factory=lambda: [1])
    pass_no: int = 0
    pass_step: int = 0
    step_seconds: dict[int, list[float]] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        """Fraction done over all batches (A1111 /progress formula without its 0.01 offset)."""
        if not self.job_count:
            return 0.0
        step = self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0
        return min(1.0, (self.job_no + step) / self.job_count)

    def record_step(self, seconds: float) -> None:
        """One sampling step of the running pass took `seconds`."""
        self.pass_step += 1
        total = self.step_seconds.setdefault(self.pass_no, [0.0, 0])
        total[0] += seconds
        total[1] += 1

    def eta(self) -> float | None:
        """Seconds of sampling left: every pass's steps still to run, each at its pass's measured seconds a
        step, a pass not measured yet at a measured one's rate scaled by its pixels (hires fix's pass costs
        its upscale factor squared, and more); second-order samplers are in the measured rate. None before
        any step was measured."""
        rates = {p: total / n for p, (total, n) in self.step_seconds.items() if n}
        if not rates:
            return None
        known = min(rates)

        def rate(p: int) -> float:
            return rates.get(p, rates[known] * self.pass_pixels[p] / self.pass_pixels[known])

        passes = range(len(self.pass_steps))
        batch = sum(self.pass_steps[p] * rate(p) for p in passes)
        now = max(0, self.pass_steps[self.pass_no] - self.pass_step) * rate(self.pass_no)
        later = sum(self.pass_steps[p] * rate(p) for p in passes if p > self.pass_no)
        return now + later + max(0, self.job_count - self.job_no - 1) * batch


@dataclass
class GenerationResult:
    """Images with everything needed to reproduce them (A1111 `Processed`)."""

    images: list[Image.Image]
    params: GenerationParams
    seeds: list[int]
    subseeds: list[int]
    infotexts: list[str]
    prompts: list[str]
    negative_prompts: list[str]
    width: int
    height: int
    model_name: str
    model_hash: str | None
    extra_generation_params: dict[str, Any]
    interrupted: bool = False
    inpainting_conditioning: bool = False  # the model is an inpainting model (9-channel UNet)
    vae_name: str | None = None  # a VAE used instead of the model's own (A1111 `sd_vae`)
    vae_hash: str | None = None
    grids: int = 0  # a script's result: its grids come first (A1111 `index_of_first_image`)

    def info(self) -> dict[str, Any]:
        """The A1111 `Processed.js()` dictionary (the API's `info` field, before JSON encoding)."""
        p = self.params
        return {
            "prompt": p.prompt,
            "all_prompts": self.prompts,
            "negative_prompt": p.negative_prompt,
            "all_negative_prompts": self.negative_prompts,
            "seed": self.seeds[0] if self.seeds else p.seed,
            "all_seeds": self.seeds,
            "subseed": self.subseeds[0] if self.subseeds else p.subseed,
            "all_subseeds": self.subseeds,
            "subseed_strength": p.subseed_strength,
            "width": self.width,
            "height": self.height,
            "sampler_name": p.sampler_name,
            "cfg_scale": p.cfg_scale,
            "steps": p.steps,
            "batch_size": p.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": self.model_name,
            "sd_model_hash": self.model_hash,
            "sd_vae_name": self.vae_name,
            "sd_vae_hash": self.vae_hash,
            "seed_resize_from_w": p.seed_resize_from_w,
            "seed_resize_from_h": p.seed_resize_from_h,
            "denoising_strength": p.denoising_strength if p.init_images or p.enable_hr else None,
            "extra_generation_params": self.extra_generation_params,
            "index_of_first_image": self.grids,
            "infotexts": self.infotexts,
            "styles": list(p.styles),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": p.clip_skip,
            "is_using_inpainting_conditioning": self.inpainting_conditioning,
            "version": f"booth {booth.__version__}",
        }


@dataclass
class _Guide:
    """Conditioning for one call: per sub-prompt schedules, their AND weights, and the negative schedules."""

    conds: list[list[tuple[int, torch.Tensor, torch.Tensor | None]]]
    weights: list[float]
    # the negative prompt's schedule; with composable LoRA one per sub-prompt, encoded under its LoRAs
    negatives: list[list[tuple[int, torch.Tensor, torch.Tensor | None]]]
    couple: LatentCouple | None = None  # a region per sub-prompt (`booth.generate.regions`)
    part_calls: list[list] | None = None  # composable LoRA: each sub-prompt's extra networks

    def weights_at(self, step: int, latents: torch.Tensor) -> list[float] | list[torch.Tensor]:
        """The AND weights of sampling step `step`: per-pixel with Latent Couple, else the plain ones."""
        if self.couple is None:
            return self.weights
        h, w = latents.shape[-2:]
        return self.couple.weights(self.weights, step, h, w, latents.device, latents.dtype)


@dataclass
class _Text:
    """What a pass's conditioning is encoded from: prompts with the extra networks stripped, their calls."""

    prompt: str
    negative: str
    calls: list  # the extra networks active over the whole pass ([] with composable LoRA)
    part_calls: list[list] | None = None  # composable LoRA: each AND sub-prompt's
    plan: hires.HiresPlan | None = None  # the hires pass's (prompt editing counts on from the first pass)


@dataclass
class _Pass:
    """What one sampling pass of a call runs with: the first pass, or hires fix's second."""

    sampler: Any
    schedule: Any
    width: int
    height: int
    guide: _Guide | None = None
    steps_rule: tuple[int, int] | None = None  # img2img: (steps of the full schedule, t_enc); None: txt2img
    progress: tuple[int, int] = (0, 0)  # (steps before, steps after) this pass in the job, for `state`
    inpainting: inpaint.InpaintJob | None = None  # kept area: x_0 = the init image's (A1111's CFG denoiser)
    # an inpainting UNet's mask + masked picture, an instruct-pix2pix UNet's picture (one, or one a picture)
    image_cond: torch.Tensor | None = None
    # the refiner (`booth.generate.refiner`): the model that takes over once `refiner_switch_at` of this pass is
    # done (never the call's own model: `_check_refiner`), its conditioning (encoded at the first switch)
    refiner: Engine | None = None
    text: _Text | None = None
    refiner_guide: _Guide | None = None
    refiner_used: set[str] = field(default_factory=set)  # embeddings its prompts used
    switched: bool = False  # the refiner took over in some batch
    notes: dict[str, Any] = field(default_factory=dict)  # infotext keys of what happened while sampling
    control: list | None = None  # (ControlUnit, ControlNetModel, its control picture at this pass's size)
    reference: dict[str, Any] | None = None  # reference_only's processor state on the pass's UNet
    finisher: Engine | None = None  # the model of the batch's last step (None: no step run)


@dataclass
class _HiresRun:
    """The hires pass of one call: its plan, prompts (extra networks stripped) and how it samples."""

    plan: hires.HiresPlan
    run: _Pass
    prompt: str = ""
    negative: str = ""
    calls: list = field(default_factory=list)
    part_calls: list[list] | None = None
    steps_run: int = 0


StepCallback = Callable[[GenerationState], None]


class Engine:
    """Generates images from a loaded model with A1111 semantics.

    Args:
        model: a `booth.models.loading.LoadedModel` (see `Engine.from_model` to load by path).
        embeddings: textual-inversion embeddings by trigger word, used when the word appears in a prompt.
        extra_networks: the registry of `<kind:...>` prompt-tag handlers (LoRA etc.).
        upscalers: the pixel upscalers hires fix may name (`booth.generate.upscale.Upscalers`; default: the
            built-in Lanczos / Nearest only).
        controlnets: the ControlNet models `params.controlnet_units` may name by name (`booth.models.controlnet.
            ControlNets`; default: paths only).
    """

    def __init__(
        self,
        model,
        *,
        embeddings: dict[str, Any] | None = None,
        extra_networks=None,
        upscalers=None,
        controlnets=None,
    ):
        from booth.generate.upscale import Upscalers
        from booth.prompts import ExtraNetworkRegistry

        self.model = model
        self.pipe = model.pipe
        self.family = model.family
        self.embeddings = dict(embeddings or {})
        self.extra_networks = extra_networks if extra_networks is not None else ExtraNetworkRegistry()
        self.upscalers = upscalers if upscalers is not None else Upscalers(device=self.pipe.unet.device)
        self.vae = None  # a `booth.models.vae.VaeInfo` while a standalone VAE replaces the model's own
        self.hires_engine: Engine | None = None  # the model of `hr_checkpoint_name` when `generate` gets none
        self.refiner_engine: Engine | None = None  # the model of `refiner_checkpoint`, likewise
        self.controlnets = controlnets  # `booth.models.controlnet.ControlNets`: the models units may name
        # `booth.generate.vae_decode`: "auto" (tiles when a picture does not fit), "on" or "off"
        self.vae_tiling = "auto"
        self.state = GenerationState()

    @classmethod
    def from_model(cls, model: str | None = None, *, device: str = "cpu", dtype=None, **kwargs) -> Engine:
        """Load `model` (diffusers folder, single file, hub id, or None for booth-mini) and wrap it."""
        from booth.models.loading import load_pipeline

        return cls(load_pipeline(model, device=device, dtype=dtype), **kwargs)

    def set_vae(self, path: str | os.PathLike | None) -> None:
        """Decode and encode with the VAE file or folder at `path` instead of the model's own (A1111's
        `sd_vae`); None puts the model's own back. Unchanged files are not read again."""
        from booth.models.vae import swap_vae

        self.vae = swap_vae(self.pipe, path, self.model.name)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    # ------------------------------------------------------------------------------------------------
    # public API

    def generate(
        self,
        params: GenerationParams,
        callback: StepCallback | None = None,
        hires_engine: Engine | None = None,
        refiner_engine: Engine | None = None,
    ) -> GenerationResult:
        """txt2img, or img2img when `params.init_images` is set. Returns batch_size * n_iter images.

        `hires_engine`: the model `params.hr_checkpoint_name` names (A1111's Hires checkpoint), loaded by the
        caller; it encodes the hires prompts, runs the second pass and decodes, with its own VAE and LoRAs.
        `refiner_engine`: the model `params.refiner_checkpoint` names, loaded by the caller; it takes over the
        sampling part-way (`booth.generate.refiner`), with its own text encoders, LoRAs and VAE."""
        params.validate()
        if params.override_settings:
            raise BoothError(
                f"this job sets {', '.join(sorted(params.override_settings))}, which an engine cannot "
                "change itself: load that model / VAE and run the job without them"
            )
        hr_engine = self._check_hires_engine(params, hires_engine or self.hires_engine)
        refiner = self._check_refiner(params, refiner_engine or self.refiner_engine)
        from booth.generate.refiner import refiner_passes
        from booth.generate.samplers import resolve_sampler

        sampler, schedule = resolve_sampler(params.sampler_name, params.scheduler)
        width, height = self._size(params)
        seed = resolve_seed(params.seed)
        subseed = resolve_seed(params.subseed) if params.subseed_strength > 0 else -1
        total = params.batch_size * params.n_iter
        seeds = [seed + i for i in range(total)]
        subseeds = [subseed + i for i in range(total)] if subseed != -1 else [-1] * total

        prompt, calls = self._strip_extra_networks(params.prompt, params.disable_extra_networks)
        part_calls = self._part_calls(params.prompt) if params.composable_lora and calls else None
        if part_calls and self.extra_networks.scheduled(calls):
            raise BoothError(
                "LoRA weight schedules (w@s) and composable LoRA do not combine: use one of them"
            )
        negative, _ = self._strip_extra_networks(params.negative_prompt, True)
        if self.edit_model:
            self._check_edit(params, part_calls)
        steps_run = self._img2img_steps(params)[0] if params.init_images else params.steps
        firstpass = params.firstpass_image is not None and params.enable_hr  # a picture stands for pass 1
        steps_run = 0 if firstpass else steps_run
        hr = self._hires_run(params, width, height, firstpass) if params.enable_hr else None

        first_steps = steps_run
        steps_run += hr.steps_run if hr else 0
        self.state = state = GenerationState(job_count=params.n_iter, sampling_steps=steps_run)
        state.pass_steps, state.pass_pixels = [first_steps], [width * height]
        if firstpass:
            state.pass_steps, state.pass_pixels = [], []
        if hr is not None:
            state.pass_steps.append(hr.steps_run)
            state.pass_pixels.append(hr.plan.width * hr.plan.height)
        images: list[Image.Image] = []
        kept: list[int] = []  # index into seeds of each returned image (skipped batches leave gaps)
        first_networks = [] if part_calls else calls
        self.extra_networks.activate_all(self.pipe, first_networks)
        restore = contextlib.ExitStack()  # what the call changes on the model, undone at its end
        try:
            if params.tiling:
                restore.enter_context(self._tiling())
                for other in {hr_engine, refiner} - {self, None}:
                    restore.enter_context(other._tiling())
            first = _Pass(sampler, schedule, width, height, progress=(0, hr.steps_run if hr else 0))
            first.text = _Text(prompt, negative, first_networks, part_calls)
            control = self._load_control(params, part_calls)
            self._attach_control(control, first, hr, hr_engine, restore)
            on_first, on_hires = refiner_passes(params)
            first.refiner = refiner if on_first else None
            if hr is not None and on_hires and refiner is not hr_engine:
                hr.run.refiner = refiner
            first.guide, used = self._build_guide(prompt, negative, params, part_calls)
            if hr is not None:  # the hires prompt's text is encoded under its own extra networks
                with self._networks_for(hr, first_networks, hr_engine):
                    hr.run.guide, hr_used = hr_engine._build_guide(
                        hr.prompt, hr.negative, params, hr.part_calls, hr.plan
                    )
                used |= hr_used
            job = first.inpainting = (
                inpaint.prepare(params, width, height) if params.mask is not None else None
            )
            init_latents, pictures = self._picture_inputs(params, first, hr, job, firstpass)
            for batch_no in range(params.n_iter):
                state.job_no, state.skipped = batch_no, False
                if state.interrupted:
                    break
                batch_seeds = seeds[batch_no * params.batch_size : (batch_no + 1) * params.batch_size]
                batch_subseeds = subseeds[batch_no * params.batch_size : (batch_no + 1) * params.batch_size]
                if firstpass:
                    latents = None if init_latents is None else init_latents.repeat(len(batch_seeds), 1, 1, 1)
                else:
                    latents = self._denoise(
                        params, first, batch_seeds, batch_subseeds, init_latents, state, callback
                    )
                    self._leave_refiner(first)
                    if latents is None:  # skipped
                        continue
                if hr is not None and not state.interrupted:
                    with self._networks_for(hr, first_networks, hr_engine):
                        latents = self._hires_pass(
                            latents, params, hr, batch_seeds, batch_subseeds, state, callback, hr_engine,
                            decoder=first.finisher, pictures=pictures and pictures * len(batch_seeds),
                        )  # fmt: skip
                    self._leave_refiner(hr.run)
                    if latents is None:
                        continue
                last = hr.run if hr is not None else first
                decoded = (last.finisher or (hr_engine if hr is not None else self))._decode(latents)
                if job is not None:  # the original's pixels outside the mask; an "Only masked" crop back
                    overlays = [job.overlays[i % len(job.overlays)] for i in range(len(decoded))]
                    decoded = [inpaint.apply_overlay(im, job.paste_to, o) for im, o in zip(decoded, overlays)]
                images += decoded
                kept += range(batch_no * params.batch_size, batch_no * params.batch_size + len(batch_seeds))
                if callback:
                    callback(state)
        finally:
            restore.close()
            self.extra_networks.deactivate_all(self.pipe)
            if refiner is not None:
                refiner.extra_networks.deactivate_all(refiner.pipe)

        state.job_no = params.n_iter
        runs = [first] + ([hr.run] if hr is not None else [])
        used |= {name for run in runs for name in run.refiner_used}
        extra = self._extra_params(
            params, prompt, used, first.guide.couple, hr, job.extra if job else None, hr_engine
        )
        extra.update(self._sampling_fields(params, runs, control, refiner))
        kept = kept[: len(images)]
        infotexts = [
            self._infotext(params, sampler, schedule, width, height, seeds[i], subseeds[i], extra)
            for i in kept
        ]
        complete = len(kept) == total
        return GenerationResult(
            images=images,
            params=params,
            seeds=seeds if complete else [seeds[i] for i in kept],
            subseeds=subseeds if complete else [subseeds[i] for i in kept],
            infotexts=infotexts,
            prompts=[params.prompt] * total,
            negative_prompts=[params.negative_prompt] * total,
            width=width,
            height=height,
            model_name=self.model.name,
            model_hash=self.model.hash,
            extra_generation_params=extra,
            interrupted=state.interrupted,
            inpainting_conditioning=self.inpainting_model,
            vae_name=self.vae.name if self.vae else None,
            vae_hash=self.vae.hash if self.vae else None,
        )

    txt2img = generate

    @staticmethod
    def _sampling_fields(
        params: GenerationParams, runs: list[_Pass], control: list, refiner
    ) -> dict[str, Any]:
        """PNG-info keys of what the passes did: ControlNet units, NGMS / Skip Early CFG / Extra noise where
        they acted, the refiner once it took over."""
        fields: dict[str, Any] = {}
        for i, (unit, title, _) in enumerate(control):
            fields[f"ControlNet {i}"] = unit.infotext(title)
        for run in runs:
            fields.update(run.notes)
            if "NGMS" in run.notes and params.s_min_uncond_all:
                fields["NGMS all steps"] = True
        if any(run.switched for run in runs):
            from booth.generate.refiner import infotext_fields

            fields.update(infotext_fields(params, refiner.model.short_title))
        return fields

    def _hires_run(self, params: GenerationParams, width: int, height: int, firstpass: bool) -> _HiresRun:
        """The hires pass of a call: its plan (size, steps, sampler), prompts and how it samples."""
        from booth.generate.samplers import resolve_sampler

        hires.check_upscaler(params.hr_upscaler, self.upscalers)
        plan = hires.plan_hires(params, width, height, self.vae_scale)
        hr_sampler, hr_schedule = resolve_sampler(plan.sampler_name, plan.scheduler)
        hr = _HiresRun(plan, _Pass(hr_sampler, hr_schedule, plan.width, plan.height))
        hr.prompt, hr.calls = self._strip_extra_networks(plan.prompt, params.disable_extra_networks)
        hr.part_calls = self._part_calls(plan.prompt) if params.composable_lora and hr.calls else None
        hr.negative, _ = self._strip_extra_networks(plan.negative_prompt, True)
        hr.steps_run = plan.steps if params.denoising_strength > 0 else 0
        hr.run.progress = (0 if firstpass else params.steps, 0)  # with a first-pass image, the only pass
        hr.run.text = _Text(hr.prompt, hr.negative, [] if hr.part_calls else hr.calls, hr.part_calls, plan)
        if hr.steps_run:  # denoising strength 0: the upscale alone, no second pass to schedule
            hr.run.steps_rule = plan.schedule(params.denoising_strength)
        return hr

    def _attach_control(self, control: list, first: _Pass, hr, hr_engine: Engine, restore) -> None:
        """ControlNet units onto the passes, their pictures at each pass's size; reference_only's recording
        self-attention on each pass's UNet for the call (`restore` puts the processors back)."""
        first_only, hires_only = ("Low res only", "High res only") if hr is not None else ("", "")
        first.control = self._control_at(control, first.width, first.height, skip=hires_only)
        if hr is not None:
            hr.run.control = self._control_at(control, hr.plan.width, hr.plan.height, skip=first_only)
        if not any(net is None for _, _, net in control):
            return
        from booth.generate.reference import reference_attention

        first.reference = restore.enter_context(reference_attention(self.pipe.unet))
        if hr is not None:
            same = hr_engine is self
            hr.run.reference = (
                first.reference if same else restore.enter_context(reference_attention(hr_engine.pipe.unet))
            )

    def _picture_inputs(self, params: GenerationParams, first: _Pass, hr, job, firstpass: bool):
        """(init latents, first-pass pictures) of a call, and each pass's extra UNet input: the init picture
        (instruct-pix2pix), the depth map (depth models), the mask and masked picture (inpainting models)."""
        width, height = first.width, first.height
        init_latents = pictures = None
        if firstpass:  # A1111: the picture goes to a pixel upscaler as it is, to a latent one encoded
            pictures = [resize_image(params.firstpass_image.convert("RGB"), width, height, 0)]
            init_latents = self._encode_pixels(pictures) if hr.plan.latent else None
        if params.init_images:
            init_latents = self._encode_init_images(params, width, height, job)
            first.steps_rule = self._img2img_steps(params)
        if self.edit_model:
            first.image_cond = self._edit_conditioning(params, width, height, job)
        elif self.depth_model:
            first.image_cond = self._depth_conditioning(params, width, height)
            if hr is not None:
                hr.run.image_cond = self._depth_conditioning(params, hr.plan.width, hr.plan.height)
        elif self.inpainting_model:
            first.image_cond = self._image_conditioning(params, width, height, job)
            if hr is not None:
                hr.run.image_cond = self._image_conditioning(params, hr.plan.width, hr.plan.height)
        return init_latents, pictures

    def img2img(self, params: GenerationParams, callback: StepCallback | None = None) -> GenerationResult:
        if not params.init_images:
            raise BoothError("img2img needs at least one init image")
        return self.generate(params, callback)

    # ------------------------------------------------------------------------------------------------
    # the denoising loop

    @torch.no_grad()
    def _denoise(self, params, run: _Pass, seeds, subseeds, init_latents, state, callback):
        """Sample one batch of one pass (`run`) from noise, or from `init_latents` (img2img, the hires pass);
        returns the final latents, or None when the batch was skipped."""
        from booth.generate.refiner import refiner_due
        from booth.generate.samplers import churn_kwargs, make_scheduler, step_kwargs
        from booth.prompts import cond_at_step

        sampler, schedule, guide, width, height = run.sampler, run.schedule, run.guide, run.width, run.height
        inpainting, image_cond, progress = run.inpainting, run.image_cond, run.progress
        unet, n = self.pipe.unet, len(seeds)
        model = run.finisher = self  # the refiner once it takes over
        # diffusers' `.device` / `.dtype` walk every module (0.87 ms a read on booth-mini): once per batch
        device, dtype = self.device, self.dtype
        # 1. A fresh scheduler for this batch, with the A1111 step rule for img2img.
        scheduler = make_scheduler(sampler, schedule, dict(self.pipe.scheduler.config), eta=params.eta)
        if init_latents is None:
            scheduler.set_timesteps(params.steps, device=device)
            timesteps = scheduler.timesteps
        else:
            total_steps, t_enc = run.steps_rule
            scheduler.set_timesteps(total_steps, device=device)
            start = (total_steps - t_enc - 1) * scheduler.order
            timesteps = scheduler.timesteps[start:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)

        # 2. Initial latents: per-image CPU noise (seed + i), scaled, or the noised init image.
        shape = (self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        sub = [s if s != -1 else None for s in subseeds]
        resize_from = None
        if params.seed_resize_from_w > 0 and params.seed_resize_from_h > 0:
            resize_from = (
                max(1, params.seed_resize_from_h // self.vae_scale),
                max(1, params.seed_resize_from_w // self.vae_scale),
            )
        noise = batch_noise(shape, seeds, sub, params.subseed_strength, resize_from).to(device, dtype)
        keep = redraw = None
        if init_latents is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            init = init_latents[[i % len(init_latents) for i in range(n)]]
            if inpainting is not None:  # the masked area starts from latent noise or zeros with fill 2 / 3
                keep, redraw = inpainting.latent_masks(init.shape[1:], device, dtype)
                if inpainting.fill == 2:
                    init = init * keep + batch_noise(init.shape[1:], seeds).to(device, dtype) * redraw
                elif inpainting.fill == 3:
                    init = init * keep
            start_noise = noise * params.initial_noise_multiplier
            latents = scheduler.add_noise(init, start_noise, timesteps[:1].repeat(n))
            if params.img2img_extra_noise > 0:  # A1111: x + noise * (sigma + extra) in k-diffusion's units
                latents = latents + start_noise * params.img2img_extra_noise * self._k_scale(
                    scheduler, timesteps[0]
                )
                run.notes["Extra noise"] = params.img2img_extra_noise
        step_extra = step_kwargs(sampler, params.eta)
        step_extra.update(churn_kwargs(sampler, params.s_churn, params.s_tmin, params.s_tmax, params.s_noise))
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_extra["generator"] = step_generators(seeds)  # ancestral / SDE noise, per image
        prediction = scheduler.config.prediction_type
        edit = self.edit_model  # instruct-pix2pix: a third term without the picture (Brooks et al. eq. 3)
        do_cfg = params.cfg_scale != 1.0 or edit
        state.sampling_steps = progress[0] + math.ceil(len(timesteps) / scheduler.order) + progress[1]
        state.pass_no, state.pass_step = (1 if progress[0] else 0), 0
        pass_steps = state.pass_steps[state.pass_no] = math.ceil(len(timesteps) / scheduler.order)

        rows_before: list = []  # the conditioning rows of the last step, and what was built from them
        clock = time.perf_counter()
        for i, t in enumerate(timesteps):
            if state.interrupted or state.skipped:
                return None if state.skipped else latents
            step = i // scheduler.order + 1
            # 3. The refiner takes over once `refiner_switch_at` of the pass is done (A1111 `apply_refiner`).
            if run.refiner is not None and model is self and refiner_due(params, t, step - 1, pass_steps):
                model = run.finisher = run.refiner
                guide, unet, rows_before = self._refiner_guide(params, run), model.pipe.unet, []
            # LoRA weight schedules (loractl): the UNet's LoRA weights of this step
            model.extra_networks.step(
                model.pipe, step - 1, pass_steps, hires=run.text is not None and run.text.plan is not None
            )
            # 4. Conditioning for this step (prompt editing / alternation), uncond first, one row per AND part;
            #    no uncond rows where NGMS or Skip Early CFG leave them out.
            skip = do_cfg and not edit and self._skips_uncond(params, scheduler, t, i, len(timesteps))
            if skip:
                run.notes[skip] = params.s_min_uncond if skip == "NGMS" else params.skip_early_cond
            with_uncond = do_cfg and not skip
            negatives = len(guide.negatives) * n if with_uncond else 0  # rows of the negative prompt first
            rows = [cond_at_step(s, step) for s in (guide.negatives if with_uncond else []) + guide.conds]
            if not _same_tensors(rows, rows_before):  # built again only when prompt editing switches
                embeds, pooled = model._stack_conditioning(rows, n, device, dtype)
                kwargs = (
                    model._added_cond_kwargs(pooled, width, height, device, dtype, negatives, params)
                    if pooled is not None
                    else {}
                )
                rows_before = rows
            # 5. One UNet call over [uncond | cond_1 .. cond_K] x batch (composable LoRA: one call per term,
            #    over [uncond_k | cond_k] with that term's LoRAs).
            x_in = scheduler.scale_model_input(latents, t)
            if image_cond is not None:  # inpainting: mask + masked picture; instruct-pix2pix: the picture
                picture = image_cond[[i % len(image_cond) for i in range(n)]]
                x_none = torch.cat([x_in, torch.zeros_like(picture)], dim=1) if edit else None
                x_in = torch.cat([x_in, picture], dim=1)
            if edit:  # [rows with the picture | the negative prompt without it] in one call
                x_all = torch.cat([x_in.repeat(len(rows), 1, 1, 1), x_none])
                pred = unet(
                    x_all, t, encoder_hidden_states=_with_first_rows(embeds, n), **_extend(kwargs, n)
                ).sample
                pred, e_none = pred[: len(rows) * n], pred[len(rows) * n :]
            elif guide.part_calls is None:
                x_rows = x_in.repeat(len(rows), 1, 1, 1)
                read = model is self and self._write_reference(
                    run, scheduler, t, len(rows), embeds, kwargs, step - 1, pass_steps, negatives, seeds
                )
                control = (  # ControlNet residuals for the skip connections (none once a refiner took over)
                    self._control_residuals(
                        run.control, x_rows, t, embeds, kwargs, step - 1, pass_steps, negatives
                    )
                    if run.control and model is self
                    else {}
                )
                pred = unet(x_rows, t, encoder_hidden_states=embeds, **kwargs, **control).sample
                if read:
                    run.reference["mode"] = "off"
            else:
                pred = model._unet_per_term(x_in, t, embeds, kwargs, guide.part_calls, with_uncond)
            # 6. Guidance: composable CFG, then guidance rescale and dynamic thresholding.
            parts = list(pred.chunk(len(rows)))
            if do_cfg:
                unconds, conds = parts[: len(rows) - len(guide.conds)], parts[len(rows) - len(guide.conds) :]
                # skipped: the first prompt's prediction stands in for the negative's (A1111's fake uncond)
                uncond = conds[0] if skip else unconds[0] if len(unconds) == 1 else unconds
                weights = guide.weights_at(step, latents)
                out = guidance.composable_cfg(uncond, conds, weights, params.cfg_scale)
                if edit:
                    out = guidance.image_guidance(out, uncond, e_none, params.image_cfg_scale)
                if params.guidance_rescale > 0:
                    positive = guidance.composable_cfg(uncond, conds, weights, 1.0)
                    out = guidance.rescale_noise_cfg(out, positive, params.guidance_rescale)
            else:
                out = guidance.composable_cfg(parts[0] * 0, parts, guide.weights, 1.0)
            if params.dynamic_threshold is not None:
                out = self._threshold(scheduler, latents, t, out, prediction, params)
            if keep is not None:  # inpainting: x_0 = init where kept
                out = self._in_x0(
                    scheduler, latents, t, out, prediction, lambda x0: init * keep + x0 * redraw
                )
            # 7. Scheduler step (with per-image generators for the sampler's own noise).
            latents = scheduler.step(out, t, latents, **step_extra).prev_sample
            if (i + 1) % scheduler.order == 0 or i + 1 == len(timesteps):  # a whole (second-order) step done
                now = time.perf_counter()
                state.record_step(now - clock)
                clock = now
            state.sampling_step = progress[0] + step
            state.latents = latents
            if callback:
                callback(state)
        return latents if keep is None else latents * redraw + init * keep

    def _hires_pass(
        self,
        latents,
        params,
        hr: _HiresRun,
        seeds,
        subseeds,
        state,
        callback,
        hr_engine=None,
        decoder=None,
        pictures=None,
    ):
        """Hires fix on one batch's first-pass latents (A1111 `sample_hr_pass`), the second pass on `hr_engine`
        (a hires checkpoint; default this model); None when skipped. `decoder`: the model that finished the
        first pass (a refiner's VAE decodes for a pixel upscaler); `pictures`: the first pass as pictures (a
        first-pass image), upscaled as they are by a pixel upscaler."""
        hr_engine, decoder = hr_engine or self, decoder or self
        plan = hr.plan
        # 1. Upscale: interpolate the latents, or decode, upscale the pixels and encode again (with the VAE
        #    of the model that runs the pass).
        if plan.latent:
            latents = hires.upscale_latents(latents, plan, self.vae_scale)
        else:
            first = pictures if pictures is not None else decoder._decode(latents)
            images = [self.upscalers.resize(im, *plan.upscale_to, plan.upscaler) for im in first]
            latents = hr_engine._encode_pixels(images)
        # 2. Crop to hr_resize_x x hr_resize_y (when both are given).
        latents = hires.crop_latents(latents, plan)
        if not hr.steps_run:  # denoising strength 0: the upscale alone
            return latents
        # 3. img2img at the new size: fresh noise from the same seeds, exactly `plan.steps` steps.
        return hr_engine._denoise(params, hr.run, seeds, subseeds, latents, state, callback)

    def _check_hires_engine(self, params: GenerationParams, hires_engine: Engine | None) -> Engine:
        """The engine of the hires pass: `hires_engine` when the params name a hires checkpoint (`_side_model`),
        else this one."""
        name = params.hires_checkpoint()
        return (
            self._side_model(name, hires_engine, "hires checkpoint", "hr_checkpoint_name", "hires_engine")
            or self
        )

    def _check_refiner(self, params: GenerationParams, refiner: Engine | None) -> Engine | None:
        """The engine of the refiner switch (`_side_model`); None for none, or this model itself (A1111: nothing
        to switch to)."""
        return self._side_model(params.refiner(), refiner, "refiner", "refiner_checkpoint", "refiner_engine")

    def _side_model(self, name: str | None, other: Engine | None, what: str, field: str, argument: str):
        """`other`, the model the field `field` names (`name`) for `what`, checked: loaded by the caller, in this
        model's latent space (the latents go across as they are), neither side an inpainting or instruct-pix2pix
        UNet; None when nothing is named, or this model itself."""
        if name is None:
            return None
        if other is None:
            raise BoothError(f"{field} {name!r}: load that model and pass it as {argument}")
        if other is self:
            return None
        latents = (other.latent_channels, other.vae_scale) != (self.latent_channels, self.vae_scale)
        if not same_latent_space(other.family, self.family) or latents:
            raise BoothError(
                f"the {what} {other.model.name} is a {other.family.name} model and {self.model.name} a "
                f"{self.family.name} one: the {what} must be a model of the same family"
            )
        for engine in (self, other):
            if engine.inpainting_model or engine.edit_model or engine.depth_model:
                raise BoothError(f"{engine.model.name} takes no {what} of another model")
        return other

    def _refiner_guide(self, params: GenerationParams, run: _Pass) -> _Guide:
        """The pass's conditioning on its refiner, with the pass's extra networks active on it (on at every
        switch: another pass may have changed them); encoded at the first switch, as A1111's `setup_conds`."""
        refiner, text = run.refiner, run.text
        refiner.extra_networks.activate_all(refiner.pipe, text.calls)
        if run.refiner_guide is None:
            run.refiner_guide, run.refiner_used = refiner._build_guide(
                text.prompt, text.negative, params, text.part_calls, text.plan
            )
        run.switched = True
        return run.refiner_guide

    @staticmethod
    def _leave_refiner(run: _Pass) -> None:
        """After a batch of a pass the refiner took over: its extra networks as the rest of the call expects."""
        if run.refiner is not None and run.finisher is run.refiner:
            run.refiner.extra_networks.activate_all(
                run.refiner.pipe, []
            )  # its own weights till it is next due

    @contextlib.contextmanager
    def _tiling(self):
        """Seamless tiling (A1111 `apply_circular`): every Conv2d of the UNet and the VAE pads circularly, so
        the image's opposite edges continue each other; padding modes restored on exit."""
        convs = [
            m
            for component in (self.pipe.unet, self.pipe.vae)
            for m in component.modules()
            if isinstance(m, torch.nn.Conv2d)
        ]
        before = [m.padding_mode for m in convs]
        for m in convs:
            m.padding_mode = "circular"
        try:
            yield
        finally:
            for m, mode in zip(convs, before, strict=True):
                m.padding_mode = mode

    @contextlib.contextmanager
    def _networks_for(self, hr: _HiresRun, first: list, hr_engine: Engine | None = None):
        """The hires prompt's extra networks while in the block, when they differ from the first pass's; on a
        hires checkpoint's model (`hr_engine`), always, and off again after the block."""
        mine = [] if hr.part_calls else hr.calls
        if hr_engine is not None and hr_engine is not self:
            hr_engine.extra_networks.activate_all(hr_engine.pipe, mine)
            try:
                yield
            finally:
                hr_engine.extra_networks.deactivate_all(hr_engine.pipe)
            return
        if mine == first:
            yield
            return
        self.extra_networks.activate_all(self.pipe, mine)
        try:
            yield
        finally:
            self.extra_networks.activate_all(self.pipe, first)

    # ------------------------------------------------------------------------------------------------
    # helpers

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    @property
    def inpainting_model(self) -> bool:
        """Whether the UNet is an inpainting model's: latents + mask + masked-image latents (9 channels)."""
        return self.pipe.unet.config.in_channels == 2 * self.latent_channels + 1

    @property
    def depth_model(self) -> bool:
        """Whether the UNet is a depth model's (SD 2 depth): latents + a depth map (5 channels)."""
        return self.pipe.unet.config.in_channels == self.latent_channels + 1

    @torch.no_grad()
    def _depth_conditioning(self, params, width: int, height: int) -> torch.Tensor:
        """A depth model's extra input (A1111 `depth2img_image_conditioning`, diffusers' `prepare_depth_map`):
        the depth map (white = near) at the latents' size, bicubic, scaled to [-1, 1] by its own min and max.
        From `params.depth_map`, else the model's depth estimator on the first init image."""
        size = (height // self.vae_scale, width // self.vae_scale)
        if params.depth_map is not None:
            depth = torch.from_numpy(np.asarray(params.depth_map.convert("L"), dtype=np.float32))[None]
        else:
            estimator = getattr(self.pipe, "depth_estimator", None)
            processor = getattr(self.pipe, "feature_extractor", None)
            if not params.init_images or estimator is None or processor is None:
                raise BoothError(
                    f"{self.model.name} is a depth model: give a depth map (--depth-map), or a picture (img2img) "
                    "with a model folder that has its depth estimator"
                )
            source = self._init_images(params, width, height)[0]
            pixels = processor(images=source, return_tensors="pt").pixel_values
            depth = estimator(pixels.to(estimator.device, estimator.dtype)).predicted_depth.float().cpu()
        depth = torch.nn.functional.interpolate(
            depth[:, None], size=size, mode="bicubic", align_corners=False
        )
        low, high = depth.min(), depth.max()
        depth = 2.0 * (depth - low) / (high - low) - 1.0 if high > low else torch.zeros_like(depth)  # flat: 0
        return depth.to(self.device, self.dtype)

    @property
    def edit_model(self) -> bool:
        """Whether the UNet is an instruct-pix2pix model's: latents + the picture's latents (8 channels)."""
        return self.pipe.unet.config.in_channels == 2 * self.latent_channels

    def _check_edit(self, params, part_calls) -> None:
        if not params.init_images:
            raise BoothError(
                f"{self.model.name} is an instruct-pix2pix model: it edits a picture; give an init image (img2img)"
            )
        if params.enable_hr or part_calls:
            raise BoothError("instruct-pix2pix models take neither hires fix nor composable LoRA")

    @torch.no_grad()
    def _edit_conditioning(self, params, width: int, height: int, job: inpaint.InpaintJob | None = None):
        """An instruct-pix2pix UNet's extra input: the picture's latents, the VAE posterior's mode without the
        scaling factor (as the model was trained; A1111 `edit_image_conditioning`, diffusers' pipeline)."""
        from booth.generate import vae_decode

        vae = self.pipe.vae
        pixels = self._pixels(self._init_images(params, width, height, job)).to(self.device, vae.dtype)
        return vae_decode.encode(vae, pixels, self.vae_tiling, sample="mode").to(self.device, self.dtype)

    @torch.no_grad()
    def _image_conditioning(self, params, width: int, height: int, job: inpaint.InpaintJob | None = None):
        """An inpainting UNet's extra input (A1111 `inpainting_image_conditioning`): the mask (1: redraw) on the
        latent grid and the latents of the image with the masked area hidden (`inpainting_mask_weight` of it).
        txt2img and the hires pass: a grey picture, all of it masked; img2img without a mask: all masked too."""
        images = self._init_images(params, width, height, job) if params.init_images else None
        pixels = self._pixels(images) if images else torch.zeros(1, 3, height, width)
        mask = torch.ones(1, 1, height, width)
        if job is not None:
            mask = torch.from_numpy(np.asarray(job.mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
            mask = mask.round() if job.round else mask
        hidden = torch.lerp(pixels, pixels * (1.0 - mask), params.inpainting_mask_weight)
        latents = self._encode_tensor(hidden).float()
        mask = torch.nn.functional.interpolate(mask, size=latents.shape[-2:]).expand(len(latents), -1, -1, -1)
        return torch.cat([mask.to(latents), latents], dim=1).to(self.device, self.dtype)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def _size(self, params: GenerationParams) -> tuple[int, int]:
        given = params.init_images[0] if params.init_images else params.firstpass_image
        if given is not None and (params.width is None or params.height is None):
            w, h = given.size
            return params.width or max(8, w // 8 * 8), params.height or max(8, h // 8 * 8)
        default = self.native_size
        return params.width or default, params.height or default

    @property
    def native_size(self) -> int:
        """The UNet's training resolution in pixels (diffusers' rule: sample_size x VAE scale)."""
        sample = self.pipe.unet.config.sample_size
        size = sample[0] if isinstance(sample, list | tuple) else sample
        return int(size) * self.vae_scale if size else self.family.default_size

    @staticmethod
    def _img2img_steps(params: GenerationParams) -> tuple[int, int]:
        """A1111 `setup_img2img_steps`: (steps of the full schedule, t_enc); t_enc + 1 steps are run. With
        `img2img_fix_steps` the schedule is `steps / strength` long and exactly `steps` of it are run."""
        strength = min(params.denoising_strength, 0.999)
        if params.img2img_fix_steps and strength > 0:
            return int(params.steps / strength), params.steps - 1
        return params.steps, int(strength * params.steps)

    def _strip_extra_networks(self, text: str, disable: bool):
        from booth.prompts import parse_extra_networks

        cleaned, calls = parse_extra_networks(text)
        return cleaned, ([] if disable else calls)

    def _encoder(self, params: GenerationParams):
        from booth.prompts import PromptEncoder

        return PromptEncoder.from_pipeline(
            self.pipe, clip_skip=params.clip_skip, emphasis=params.emphasis, embeddings=self.embeddings
        )

    def _part_calls(self, prompt: str) -> list[list]:
        """Each AND sub-prompt's extra-network calls (composable LoRA)."""
        from booth.prompts import split_and

        return [self._strip_extra_networks(text, False)[1] for text, _ in split_and(prompt)]

    def _unet_per_term(self, x_in, t, embeds, kwargs, part_calls: list[list], do_cfg: bool) -> torch.Tensor:
        """Composable LoRA: for each sub-prompt k, one UNet call over its rows (`embeds` is [uncond_1 ..
        uncond_K |] cond_1 .. cond_K, len(x_in) images each) with its extra networks active; the predictions
        come back in the rows' order."""
        n, k = len(x_in), len(part_calls)
        out: list[torch.Tensor | None] = [None] * (len(embeds) // n)
        for term, calls in enumerate(part_calls):
            self.extra_networks.activate_all(self.pipe, calls)
            row_ids = [term, k + term] if do_cfg else [term]
            index = torch.cat([torch.arange(r * n, (r + 1) * n) for r in row_ids])
            added = {key: v[index] for key, v in kwargs["added_cond_kwargs"].items()} if kwargs else None
            extra = {"added_cond_kwargs": added} if added else {}
            x = x_in.repeat(len(row_ids), 1, 1, 1)
            pred = self.pipe.unet(x, t, encoder_hidden_states=embeds[index], **extra).sample
            for r, chunk in zip(row_ids, pred.chunk(len(row_ids))):
                out[r] = chunk
        return torch.cat(out)

    def _build_guide(
        self,
        prompt: str,
        negative: str,
        params: GenerationParams,
        part_calls: list[list] | None = None,
        plan: hires.HiresPlan | None = None,
    ) -> tuple[_Guide, set[str]]:
        """The conditioning of one pass; with `plan`, the hires pass's (prompt editing counts on from the first
        pass: `[a:b:1.5]` switches half-way through the hires steps)."""
        from booth.prompts import encode_prompt_schedule, split_and

        hires_steps = plan.steps if plan is not None else None

        encoder = self._encoder(params)
        parts = split_and(prompt)
        if part_calls is not None and len(part_calls) != len(parts):
            raise BoothError(
                "composable LoRA: an extra-network tag spans an AND; keep each tag in one sub-prompt"
            )
        zero_negative = self.family.uses_pooled_text and not negative.strip() and self._zero_empty_negative

        def encode_negative():
            schedule = encode_prompt_schedule(encoder, negative, params.steps, hires_steps=hires_steps)
            if zero_negative:
                schedule = [(end, torch.zeros_like(e), torch.zeros_like(p)) for end, e, p in schedule]
            return schedule

        conds, negatives = [], []
        for i, (text, _) in enumerate(parts):
            if part_calls is not None:  # this sub-prompt's LoRAs act on its text encodings too
                self.extra_networks.activate_all(self.pipe, part_calls[i])
                negatives.append(encode_negative())
            conds.append(encode_prompt_schedule(encoder, text, params.steps, hires_steps=hires_steps))
        if part_calls is None:
            negatives.append(encode_negative())
        used = set(getattr(encoder, "used_embeddings", set()))
        weights = [w for _, w in parts]
        couple = LatentCouple.parse(params.latent_couple).check(len(parts)) if params.latent_couple else None
        return _Guide(conds, weights, negatives, couple, part_calls), used

    @property
    def _zero_empty_negative(self) -> bool:
        return bool(getattr(self.pipe.config, "force_zeros_for_empty_prompt", False))

    def _stack_conditioning(self, rows, n: int, device: torch.device, dtype: torch.dtype):
        """Pad each row's token axis to a common multiple of 77 and repeat each row for the n images."""
        length = max(e.shape[1] for e, _ in rows)
        embeds = []
        for e, _ in rows:
            if e.shape[1] < length:
                filler = self._empty_chunk(e)
                e = torch.cat([e] + [filler] * ((length - e.shape[1]) // filler.shape[1]), dim=1)
            embeds.append(e.expand(n, -1, -1))
        pooled = None
        if rows[0][1] is not None:
            pooled = torch.cat([p.expand(n, -1) for _, p in rows])
        return torch.cat(embeds).to(device, dtype), pooled

    def _empty_chunk(self, like: torch.Tensor) -> torch.Tensor:
        cache = getattr(self, "_empty_cache", None)
        if cache is None or cache.shape[-1] != like.shape[-1]:
            from booth.prompts import PromptEncoder

            encoder = PromptEncoder.from_pipeline(self.pipe)
            self._empty_cache = cache = encoder.encode([""]).embeds[:, :77].to(like)
        return cache

    def _added_cond_kwargs(
        self,
        pooled: torch.Tensor,
        width: int,
        height: int,
        device: torch.device,
        dtype: torch.dtype,
        negatives: int = 0,
        params: GenerationParams | None = None,
    ) -> dict[str, Any]:
        """SDXL micro-conditioning: original size, crop top-left, target size (Podell et al. 2023 §2.2); the
        refiner's: original size, crop top-left, aesthetic score (§2.5), A1111's low score for the first
        `negatives` rows (the negative prompt's) and its high score for the others."""
        n = len(pooled)
        if self.family.name == "sdxl-refiner":
            params = params or GenerationParams()
            scores = torch.full((n, 1), float(params.sdxl_refiner_high_aesthetic_score))
            scores[:negatives] = params.sdxl_refiner_low_aesthetic_score
            time_ids = torch.cat([torch.tensor([[height, width, 0, 0]]).expand(n, -1), scores], dim=1)
        else:
            time_ids = torch.tensor([[height, width, 0, 0, height, width]]).repeat(n, 1)
        added = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}
        return {"added_cond_kwargs": added}

    def _load_control(self, params: GenerationParams, part_calls) -> list:
        """(unit, model title, ControlNetModel) of each ControlNet unit of `params`, its model loaded for this
        model's UNet."""
        if not params.controlnet_units:
            return []
        if self.inpainting_model or self.edit_model or self.depth_model or part_calls:
            raise BoothError("ControlNet units work with text-to-image UNets without composable LoRA")
        from booth.models.controlnet import ControlNets

        controlnets = self.controlnets if self.controlnets is not None else ControlNets()
        loaded = []
        for unit in params.controlnet_units:
            if unit.module in REFERENCE_MODULES:  # no model: the UNet itself reads the reference
                loaded.append((unit, "None", None))
                continue
            entry, net = controlnets.load(unit.model, self.pipe.unet)
            loaded.append((unit, entry.title, net))
        return loaded

    def _control_at(self, control: list, width: int, height: int, skip: str = "") -> list | None:
        """The units with their control pictures at a pass's size: the latents' size times the ControlNet's own
        downsampling (8: the pixel size, for SD's autoencoders); units whose `hr_option` is `skip` left out."""
        from booth.generate.controlnet import control_hint

        out = []
        for unit, _, net in control:
            if unit.hr_option == skip:
                continue
            if net is None:  # reference_only: the reference's latents at the pass's size
                out.append((unit, None, self._encode_tensor(control_hint(unit, width, height) * 2 - 1)))
                continue
            factor = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
            size = (width // self.vae_scale * factor, height // self.vae_scale * factor)
            out.append((unit, net, control_hint(unit, *size)))
        return out or None

    def _control_residuals(self, control, x_rows, t, embeds, kwargs, step: int, steps: int, negatives: int):
        """The UNet's `down_block_additional_residuals` / `mid_block_additional_residual` at sampling step `step`
        (0-based) of `steps`: every active unit's ControlNet outputs, times its weight and its control mode's
        scales, summed (Zhang et al. 2023 eq. 2; the extension's modes, `booth.generate.controlnet`)."""
        from booth.generate import controlnet

        total = None
        for unit, net, hint in control:
            if net is None or unit.weight == 0 or not controlnet.active(unit, step, steps):
                continue
            cond = hint.to(x_rows.device, x_rows.dtype).expand(len(x_rows), -1, -1, -1)
            added = kwargs.get("added_cond_kwargs")
            down, mid = net(
                x_rows,
                t,
                encoder_hidden_states=embeds,
                controlnet_cond=cond,
                added_cond_kwargs=added,
                return_dict=False,
            )
            scales = controlnet.soft_scales(len(down) + 1, unit.control_mode)
            outs = [r * (unit.weight * s) for r, s in zip([*down, mid], scales, strict=True)]
            if unit.control_mode == controlnet.CONTROL_MODES[2] and negatives:  # the prompt's rows alone
                outs = [torch.cat([torch.zeros_like(r[:negatives]), r[negatives:]]) for r in outs]
            total = outs if total is None else [a + b for a, b in zip(total, outs, strict=True)]
        if total is None:
            return {}
        return {
            "down_block_additional_residuals": tuple(total[:-1]),
            "mid_block_additional_residual": total[-1],
        }

    def _write_reference(self, run, scheduler, t, rows: int, embeds, kwargs, step, steps, negatives, seeds):
        """reference_only (`booth.generate.reference`): the first active reference unit's latents, noised to
        `t` (with the noise of seed + 1), through the UNet with the layers recording; the next UNet call reads
        them. False when no reference unit guides this step."""
        if run.reference is None:  # the pass has no reference unit: nothing to look at on this step
            return False
        from booth.generate.controlnet import active

        refs = [
            (u, x0)
            for u, net, x0 in run.control or ()
            if net is None and u.weight > 0 and active(u, step, steps)
        ]
        if not refs:
            return False
        unit, x0 = refs[0]
        state = run.reference
        state.update(weight=unit.weight, style_fidelity=float(unit.threshold_a), uncond_rows=negatives)
        noise = batch_noise(x0.shape[1:], [(seed + 1) % 2**32 for seed in seeds]).to(x0)
        noisy = scheduler.add_noise(x0.expand(len(seeds), -1, -1, -1), noise, t.reshape(1).expand(len(seeds)))
        reference = scheduler.scale_model_input(noisy, t).repeat(rows, 1, 1, 1)
        state["mode"] = "write"
        self.pipe.unet(reference, t, encoder_hidden_states=embeds, **kwargs)
        state["mode"] = "read"
        return True

    def _k_scale(self, scheduler, t) -> float:
        """What a unit of k-diffusion's x + sigma * noise is in the scheduler's latents: 1 for the sigma-space
        schedulers (Euler, Heun, LMS, DPM2 ...: their first latents are scaled by sigma_max), sqrt(alpha_bar_t)
        for the variance-preserving ones (DDIM, UniPC, DPM++ 2M ...)."""
        if float(scheduler.init_noise_sigma) > 1:
            return 1.0
        return float(self._alpha_bar(scheduler, t)) ** 0.5

    def _skips_uncond(self, params, scheduler, t, call: int, calls: int) -> str | None:
        """`guidance.skipped_uncond` at this model call, with the sigma of its timestep."""
        if params.s_min_uncond <= 0 and params.skip_early_cond <= 0:
            return None
        alpha_bar = float(self._alpha_bar(scheduler, t))
        return guidance.skipped_uncond(params, call, calls, ((1 - alpha_bar) / alpha_bar) ** 0.5)

    def _threshold(self, scheduler, latents, t, out, prediction, params):
        """Dynamic thresholding on x0 at variance-preserving x_t, then back to the model's parameterisation."""
        clamp = params.dynamic_threshold, params.dynamic_threshold_max
        return self._in_x0(
            scheduler, latents, t, out, prediction, lambda x0: guidance.dynamic_threshold(x0, *clamp)
        )

    def _in_x0(self, scheduler, latents, t, out, prediction, change: Callable[[torch.Tensor], torch.Tensor]):
        """`change` applied to the x_0 the model output implies at variance-preserving x_t, then back to the
        model's parameterisation."""
        x_t = scheduler.scale_model_input(latents, t)
        alpha_bar = self._alpha_bar(scheduler, t).to(out)
        x0 = change(guidance.prediction_to_x0(out, x_t, alpha_bar, prediction))
        return guidance.x0_to_prediction(x0, x_t, alpha_bar, prediction)

    @staticmethod
    def _alpha_bar(scheduler, t) -> torch.Tensor:
        sigmas, index = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
        if sigmas is not None and index is not None:
            return 1.0 / (1.0 + sigmas[index].float() ** 2)
        return scheduler.alphas_cumprod[int(round(float(t)))].float()

    @torch.no_grad()
    def _encode_init_images(
        self, params: GenerationParams, width: int, height: int, job: inpaint.InpaintJob | None = None
    ) -> torch.Tensor:
        """The init images as the sampler starts from them, encoded with the VAE (distribution mean). Resize
        mode 3 ("Just resize (latent upscale)"): each picture encoded at its own size, its latents resized
        bilinearly to the processing size (A1111)."""
        if params.resize_mode == 3 and job is None:
            size = (height // self.vae_scale, width // self.vae_scale)
            encoded = [self._encode_pixels([im.convert("RGB")]).float() for im in params.init_images]
            resized = [torch.nn.functional.interpolate(x, size=size, mode="bilinear") for x in encoded]
            return torch.cat(resized).to(self.dtype)
        return self._encode_pixels(self._init_images(params, width, height, job))

    @staticmethod
    def _init_images(
        params, width: int, height: int, job: inpaint.InpaintJob | None = None
    ) -> list[Image.Image]:
        """An inpainting job's prepared init images, else the init images resized per `resize_mode` (mode 3
        resizes latents, not pixels: here, for an inpainting UNet's picture input, a plain resize)."""
        if job is not None:
            return job.images
        mode = 0 if params.resize_mode == 3 else params.resize_mode
        return [resize_image(im.convert("RGB"), width, height, mode) for im in params.init_images]

    @torch.no_grad()
    def _encode_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images of one size as scaled latents (the VAE posterior's mean)."""
        return self._encode_tensor(self._pixels(images))

    @staticmethod
    def _pixels(images: list[Image.Image]) -> torch.Tensor:
        """RGB images of one size as a (B, 3, H, W) tensor in [-1, 1]."""
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def _encode_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] as scaled latents (the VAE posterior's mean)."""
        from booth.generate import vae_decode

        vae = self.pipe.vae
        batch = pixels.to(self.device, vae.dtype)
        latents = vae_decode.encode(vae, batch, self.vae_tiling)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Scaled latents -> pictures, one at a time, in tiles as `vae_tiling` says (`vae_decode`)."""
        from booth.generate import vae_decode

        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        pixels = vae_decode.decode(
            vae, latents.to(vae.dtype) / vae.config.scaling_factor + shift, self.vae_tiling
        )
        array = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]

    def _extra_params(
        self,
        params: GenerationParams,
        prompt: str,
        used_embeddings: set[str],
        couple: LatentCouple | None,
        hr: _HiresRun | None = None,
        inpainting: dict[str, Any] | None = None,
        hr_engine: Engine | None = None,
    ) -> dict[str, Any]:
        from booth.prompts import schedule_differs_with_old_timelines

        extra: dict[str, Any] = hires.infotext_fields(params, hr.plan) if hr is not None else {}
        if hr is not None and hr_engine is not None and hr_engine is not self:
            extra["Hires checkpoint"] = hr_engine.model.short_title
        extra.update(inpainting or {})
        if params.init_images and params.initial_noise_multiplier != 1:
            extra["Noise multiplier"] = params.initial_noise_multiplier
        if params.guidance_rescale > 0:
            extra["Guidance rescale"] = params.guidance_rescale
        if params.dynamic_threshold is not None:
            extra["Dynamic threshold"] = params.dynamic_threshold
            extra["Dynamic threshold max"] = params.dynamic_threshold_max
        if params.emphasis != "Original":
            extra["Emphasis"] = params.emphasis
        if couple is not None:
            extra["Latent Couple"] = couple.infotext()
        if params.composable_lora:
            extra["Composable LoRA"] = True
        if used_embeddings:
            extra["TI hashes"] = ", ".join(sorted(used_embeddings))
        if schedule_differs_with_old_timelines(prompt, params.steps):
            extra["Old prompt editing timelines"] = True
        extra.update(self.extra_networks.infotext_params())
        return extra

    def _infotext(self, params, sampler, schedule, width, height, seed, subseed, extra) -> str:
        from booth.generate.metadata import build_infotext
        from booth.generate.samplers import churn_infotext, infotext_fields

        fields: dict[str, Any] = {"Steps": params.steps, **infotext_fields(sampler, schedule, params.eta)}
        fields.update(churn_infotext(params.s_churn, params.s_tmin, params.s_tmax, params.s_noise))
        fields.update({"CFG scale": params.cfg_scale, "Seed": seed, "Size": f"{width}x{height}"})
        fields.update({"Model hash": self.model.hash, "Model": self.model.name})
        if self.vae is not None:
            fields.update({"VAE hash": self.vae.hash, "VAE": self.vae.name})
        if params.subseed_strength > 0:
            fields.update({"Variation seed": subseed, "Variation seed strength": params.subseed_strength})
        if params.seed_resize_from_w > 0 and params.seed_resize_from_h > 0:
            fields["Seed resize from"] = f"{params.seed_resize_from_w}x{params.seed_resize_from_h}"
        if params.init_images or params.enable_hr:
            fields["Denoising strength"] = params.denoising_strength
        if self.inpainting_model:
            fields["Conditional mask weight"] = params.inpainting_mask_weight
        if self.edit_model:
            fields["Image CFG scale"] = params.image_cfg_scale
        if params.clip_skip > 1:
            fields["Clip skip"] = params.clip_skip
        fields["RNG"] = "CPU"
        if params.tiling:
            fields["Tiling"] = True
        fields.update(extra)
        fields["Version"] = f"booth {booth.__version__}"
        return build_infotext(params.prompt, params.negative_prompt, fields)


__all__ = ["Engine", "GenerationParams", "GenerationResult", "GenerationState"]


def _with_first_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """`x` with its first `n` rows (the negative prompt's, for a batch of n) appended once more."""
    return torch.cat([x, x[:n]])


def _extend(kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    """UNet keyword arguments (SDXL's added conditioning) for `_with_first_rows` inputs."""
    if not kwargs:
        return kwargs
    added = kwargs["added_cond_kwargs"]
    return {"added_cond_kwargs": {k: _with_first_rows(v, n) for k, v in added.items()}}


def _same_tensors(rows: list, before: list) -> bool:
    """Whether two lists of (embeds, pooled) rows hold the very same tensors (identity, not values)."""
    return len(rows) == len(before) and all(
        a is c and b is d for (a, b), (c, d) in zip(rows, before, strict=True)
    )
