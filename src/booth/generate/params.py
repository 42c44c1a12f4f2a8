"""Typed generation parameters, named after the A1111 API fields (`/sdapi/v1/txt2img`, `img2img`).

One dataclass serves the CLI, the Python API, scripts (X/Y grid axes set its fields by name) and the server.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

from booth.errors import BoothError

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
# A1111 option `hires_fix_refiner_pass`: with hires fix, the pass(es) the refiner takes part in
REFINER_PASSES = ("first pass", "second pass", "both passes")
SEED_RANGE = 4294967294  # A1111 draws random seeds from [0, 4294967294)


def resolve_seed(seed: int | None, rng: random.Random | None = None) -> int:
    """-1 (or None) becomes a random seed, anything else is kept (A1111 `get_fixed_seed`)."""
    if seed is None or seed == -1:
        return (rng or random).randrange(SEED_RANGE)
    return int(seed)


@dataclass
class GenerationParams:
    """Everything that determines a generated image (besides the model and its adapters).

    Field names follow A1111's API so requests map one to one. `width`/`height` of None mean the model
    family's native size.
    """

    prompt: str = ""
    negative_prompt: str = ""
    styles: tuple[str, ...] = ()  # names of the A1111 styles already merged into the prompts (a record)
    steps: int = 20
    cfg_scale: float = 7.0
    image_cfg_scale: float = 1.5  # instruct-pix2pix models: how closely to follow the picture (A1111 default)
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"  # A1111 "Schedule type"
    seed: int = -1  # -1: random
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = -1  # A1111 "Resize seed from": noise drawn at this size (<= 0: off)
    seed_resize_from_h: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1  # batch count
    eta: float | None = None  # ancestral / DDIM eta; None: the sampler's default
    s_churn: float = 0.0  # Euler's stochastic churn (Karras et al. 2022 Alg. 2), A1111 "Sigma churn"; 0: off
    s_tmin: float = 0.0  # churn only at sigma >= s_tmin
    s_tmax: float = 0.0  # ... and <= s_tmax (0: no bound)
    s_noise: float = 1.0  # scale of the churn noise
    # leaving the negative prompt's UNet rows out (`guidance.skipped_uncond`): A1111's Negative Guidance minimum
    # sigma (every other model call below it; 0: off), its option to do so at every call, and the option
    # `skip_early_cond` (the calls up to this share of each pass; 0: off)
    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    skip_early_cond: float = 0.0
    clip_skip: int = 1
    emphasis: str = "Original"  # Original | No norm | Ignore | None (see a1111 emphasis modes)
    guidance_rescale: float = 0.0  # phi of Lin et al. 2023; 0 disables
    dynamic_threshold: float | None = None  # Imagen percentile p (e.g. 0.995); None disables
    dynamic_threshold_max: float = 1.0  # the static range the percentile threshold never goes below
    # a region per AND sub-prompt, in the PNG-info form of A1111's Latent Couple extension
    # ("divisions=1:1,1:2,1:2 positions=0:0,0:0,0:1 weights=0.2,0.8,0.8 end at step=20"); None: off
    latent_couple: str | None = None
    # the LoRAs named in an AND sub-prompt act on that sub-prompt's guidance term only, text encoder and UNet,
    # as with A1111's Composable LoRA extension; unlike its default (negative term without LoRAs, so the CFG
    # scale multiplies each LoRA's whole change), each term is guided against the negative prompt under its own
    # LoRAs, so one sub-prompt gives exactly the plain LoRA image
    composable_lora: bool = False
    # seamless textures: every convolution of the UNet and the VAE pads circularly (A1111 "Tiling")
    tiling: bool = False
    # img2img
    init_images: list[Any] = field(default_factory=list)  # PIL images
    denoising_strength: float = 0.75
    resize_mode: int = 0  # 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale
    img2img_fix_steps: bool = False  # A1111 option: run exactly `steps` steps
    initial_noise_multiplier: float = 1.0  # img2img: the start noise scaled by this
    # A1111 option "Extra noise": img2img and the hires pass start from x + (sigma + this) x noise (0: off)
    img2img_extra_noise: float = 0.0
    # inpainting (img2img with a mask: white is redrawn; `booth.generate.inpaint`); defaults of A1111's UI
    mask: Any | None = None  # PIL image (L, RGB, or RGBA whose alpha is the mask)
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = 1  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = False  # "Only masked": redraw the mask's box at the full processing size
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False  # redraw what is not masked
    latent_mask: Any | None = None  # PIL image: a separate mask for the latent blending
    # depth models (5-channel UNets): the depth map (PIL, white = near), else estimated from the init image by the
    # model's own depth estimator (a diffusers depth folder has one)
    depth_map: Any | None = None
    # inpainting models (9-channel UNets): how much of the init image their masked-image input hides (A1111
    # option `inpainting_mask_weight`; 1: all of the masked area, 0: none of it)
    inpainting_mask_weight: float = 1.0
    # hires fix (txt2img): upscale the first pass, then an img2img pass at `denoising_strength` (`a1111.md` §9)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"  # a latent mode (`hires.LATENT_UPSCALERS`) or a pixel upscaler's name
    hr_second_pass_steps: int = 0  # 0: `steps`
    hr_resize_x: int = 0  # a size instead of `hr_scale` (0: from the other side's aspect)
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None  # None: `sampler_name`
    hr_scheduler: str | None = None  # None: `scheduler`
    hr_prompt: str = ""  # "": `prompt`
    hr_negative_prompt: str = ""  # "": `negative_prompt`
    # A1111's "Hires checkpoint": another model of the same family for the second pass (None / "" / "Use same
    # checkpoint": this one); the caller loads it and hands it to `Engine.generate(..., hires_engine=)`
    hr_checkpoint_name: str | None = None
    # A1111's `firstpass_image` (PIL): a picture that stands for the first pass, so hires fix upscales and
    # redraws it (its size is the first pass's unless width / height are given)
    firstpass_image: Any | None = None
    # A1111's refiner (`a1111.md` §9): another model of the same family takes over the sampling once
    # `refiner_switch_at` of it is done (None: from the first step, as A1111 reads a request without it); the
    # caller loads it and hands it to `Engine.generate(..., refiner_engine=)`
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = 0.8
    # A1111 options: "done" counted in sampling steps instead of by the timestep reached; with hires fix, the
    # pass(es) the refiner takes part in
    refiner_switch_by_sample_steps: bool = False
    hires_fix_refiner_pass: str = "second pass"
    # A1111 options: the aesthetic score SDXL's refiner is conditioned on, for the negative prompt and the prompt
    sdxl_refiner_low_aesthetic_score: float = 2.5
    sdxl_refiner_high_aesthetic_score: float = 6.0
    # ControlNet units (`booth.generate.controlnet.ControlUnit`: model, control picture, weight, ...)
    controlnet_units: list[Any] = field(default_factory=list)
    # extra networks
    disable_extra_networks: bool = False
    # A1111 options for this job alone, as its `p.override_settings`: `sd_model_checkpoint` (a model path or
    # hub id) and `sd_vae` ("None", "Automatic" or a VAE file), set by the X/Y plot's "Checkpoint name" and
    # "VAE" axes; the runner of the job applies them (`Engine.generate` refuses a job that still has any)
    override_settings: dict[str, str] = field(default_factory=dict)

    def hires_checkpoint(self) -> str | None:
        """The model the hires pass runs on when it is another one: `hr_checkpoint_name` with hires fix on,
        None for the model itself (none named, or A1111's "Use same checkpoint")."""
        name = self.hr_checkpoint_name if self.enable_hr else None
        return None if name in (None, "", "Use same checkpoint") else name

    def refiner(self) -> str | None:
        """The model the refiner switch hands the sampling to: `refiner_checkpoint`, None for none ("" or
        A1111's "None")."""
        name = self.refiner_checkpoint
        return None if name is None or name.strip() in ("", "None", "none") else name

    def validate(self) -> GenerationParams:
        """Raise BoothError with a one-line message for any invalid field; return self."""
        # nan passes `cfg_scale < 0` and the like: refuse it (and inf) first
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise BoothError(f"{f.name.replace('_', ' ')} must be a finite number, got {value}")
        if self.steps < 1:
            raise BoothError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1 or self.n_iter < 1:
            raise BoothError("batch size and batch count (n_iter) must be at least 1")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise BoothError(f"{name} must be a positive multiple of 8, got {value}")
            if value is not None and value > 8192:
                raise BoothError(f"{name} must be at most 8192, got {value}")
        if self.cfg_scale < 0:
            raise BoothError(f"cfg scale must be non-negative, got {self.cfg_scale}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise BoothError(f"guidance rescale must be in [0, 1], got {self.guidance_rescale}")
        if self.dynamic_threshold is not None and not 0.0 < self.dynamic_threshold <= 1.0:
            raise BoothError(f"dynamic threshold percentile must be in (0, 1], got {self.dynamic_threshold}")
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise BoothError(f"denoising strength must be in [0, 1], got {self.denoising_strength}")
        if self.emphasis not in EMPHASIS_MODES:
            raise BoothError(f"unknown emphasis mode {self.emphasis!r}; valid: {', '.join(EMPHASIS_MODES)}")
        if self.clip_skip < 1:
            raise BoothError(f"clip skip must be at least 1, got {self.clip_skip}")
        if (self.seed_resize_from_w > 0) != (self.seed_resize_from_h > 0):
            raise BoothError("seed resize needs both a width and a height (or neither)")
        if self.s_churn < 0 or self.s_tmin < 0 or self.s_tmax < 0 or self.s_noise <= 0:
            raise BoothError("s_churn, s_tmin and s_tmax must be at least 0 and s_noise above 0")
        if self.s_min_uncond < 0:
            raise BoothError(
                f"s_min_uncond (Negative Guidance minimum sigma) must be at least 0, got {self.s_min_uncond}"
            )
        if not 0.0 <= self.img2img_extra_noise <= 1.0:
            raise BoothError(f"extra noise must be in [0, 1], got {self.img2img_extra_noise}")
        if not 0.0 <= self.skip_early_cond <= 1.0:
            raise BoothError(f"skip early CFG must be in [0, 1], got {self.skip_early_cond}")
        if self.image_cfg_scale < 0:
            raise BoothError(f"image CFG scale must be at least 0, got {self.image_cfg_scale}")
        if not 0.0 <= self.inpainting_mask_weight <= 1.0:
            raise BoothError(f"inpainting mask weight must be in [0, 1], got {self.inpainting_mask_weight}")
        if self.resize_mode not in (0, 1, 2, 3):
            raise BoothError(
                f"resize mode must be 0 (just resize), 1 (crop and resize), 2 (resize and fill) or 3 (just resize, "
                f"latent upscale), got {self.resize_mode}"
            )
        if self.refiner_switch_at is not None and not 0.0 <= self.refiner_switch_at <= 1.0:
            raise BoothError(f"refiner switch at must be in [0, 1], got {self.refiner_switch_at}")
        if self.hires_fix_refiner_pass not in REFINER_PASSES:
            raise BoothError(
                f"hires fix refiner pass {self.hires_fix_refiner_pass!r}: choose one of {', '.join(REFINER_PASSES)}"
            )
        if self.mask is not None:
            from booth.generate.inpaint import check_inpaint

            check_inpaint(self)
        if self.firstpass_image is not None and not self.enable_hr:
            raise BoothError(
                "a first-pass image is the first pass of hires fix: turn hires fix on (enable_hr)"
            )
        if self.enable_hr:
            from booth.generate.hires import check_hires

            check_hires(self)
        for unit in self.controlnet_units:
            unit.validate()
        if self.latent_couple:
            from booth.generate.regions import LatentCouple

            LatentCouple.parse(self.latent_couple)
            if self.cfg_scale == 1.0:
                raise BoothError("Latent Couple works on the guidance terms: use a cfg scale other than 1")
        return self

    def replace(self, **changes) -> GenerationParams:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (images are left out)."""
        images = ("init_images", "mask", "latent_mask", "firstpass_image", "controlnet_units", "depth_map")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in images}
