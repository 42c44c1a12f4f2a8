"""booth-mini training recipes: typed configs of the four stages, and the presets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from booth.errors import BoothError
from booth.mini.architecture import ClipConfig, MiniArchitecture, UNetConfig, VaeConfig
from booth.mini.compose import CAPTION_PARTS

STAGES: tuple[str, ...] = ("clip", "vae", "decoder", "unet")


@dataclass(frozen=True)
class Optim:
    """AdamW with linear warmup then cosine decay to 0; decay only on weight matrices."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.01
    grad_clip: float = 1.0


@dataclass(frozen=True)
class CaptionDropout:
    """How a training caption is shortened.

    With probability `empty` the caption is "" (the unconditional branch of classifier-free guidance);
    otherwise with probability `concept_only` it is just "a {concept}"; otherwise each template part (size,
    position, background, style) is kept independently with probability `keep_part`.
    """

    empty: float = 0.0
    concept_only: float = 0.1
    keep_part: float = 0.75


@dataclass(frozen=True)
class ClipTrainConfig:
    """The mini-CLIP stage. The "full" preset uses one hard negative and the concept term, not the phrase term.

    `hard_negatives`: per image, that many extra negative captions, each its own caption with one of the
    named parts changed (another position, colour, size, style or concept; NegCLIP, Yuksekgonul et al.
    2023): in-batch negatives almost never differ in position alone.
    `concept_weight`: weight of a zero-shot concept term, the cross-entropy of each image over
    "a {concept}" for every concept of the world (the prompts of the concept metric), so every step sees
    all 200 concepts as negatives instead of the few in its batch.
    `phrase_weight`: weight of a text-only term: each caption that names a part (position, size, background,
    style) must be closer to that part's own phrase ("in the top left", "small", "on a blue background",
    "noto style", embedded by the same tower) than to the part's other phrases (25 short texts a step, no
    new parameters).
    Measured (2026-11-30, continuing the shipped 1,000-step CLIP; zero-shot on the 300 test renders): 800
    steps with hard_negatives=1 and concept_weight=1 raised concept top-1 from 11.7% to 17.7% and style
    from 57% to 59%; position stayed at chance (13% -> 14%), and 500 more steps with phrase_weight=1 did
    not make the text tower's states for captions that differ only in position any less alike (mean
    cosine 0.98, against 0.42-0.53 for background colour).
    `init`: warm start from a `transformers` CLIPModel folder of the same architecture (e.g. a shipped
    pipeline's ``clip/`` or another run's ``clip/final``), recorded in the config like the VAE's.
    `style_weight`: weight of a zero-shot style term, the cross-entropy of each image over "a {concept},
    {style} style" for every style (the prompts of the style metric, with the image's own concept). Measured
    (2026-12-06, continuing the shipped mini-CLIP 300 steps with it, lr 3e-4; `tools/mini_evaluators.py`):
    zero-shot style on the 300 test renders 58.3% -> 78.0%, concept 32.0% -> 37.7%, but v5's generated
    images read the same (style 49.0% -> 49.0%, concept 5.5% -> 3.0%): their style is not drawn, so a
    sharper evaluator does not move the style gate. Off in the presets (3 more texts per image each step).
    """

    optim: Optim
    captions: CaptionDropout = field(default_factory=lambda: CaptionDropout(concept_only=0.2, keep_part=0.5))
    hard_negatives: int = 0
    concept_weight: float = 0.0
    phrase_weight: float = 0.0
    init: str | None = None
    style_weight: float = 0.0


@dataclass(frozen=True)
class VaeTrainConfig:
    """The autoencoder stage: loss weights (L1 has weight 1) and the scaling-factor sample.

    `object_weight`: extra weight of the object's pixels in the reconstruction terms, w = 1 + object_weight on
    pixels that differ from the flat background (`object_mask`). In the mini world the object covers 5-30% of
    an image, so an unweighted loss is mostly background: the shipped VAE reconstructs renders at 24.7 dB but
    their objects at 15.4 dB, and decodes pink objects as orange (measured 2026-12-01).
    `init`: warm start from a diffusers `AutoencoderKL` folder (e.g. a shipped pipeline's ``vae/``) with the
    same architecture; recorded in the config like the UNet's.
    `hue_jitter`: share of each batch whose hue is rotated by a random angle (`rotate_hue`). The emoji sets
    draw most objects yellow, orange or brown, so without it the VAE never sees, say, a pink teapot, and
    a personal subject in such a colour cannot be drawn.
    `latent_noise`: the decoder also learns to decode z + sigma * n, sigma ~ U(0, latent_noise) latent standard
    deviations (the batch's). A UNet's sampled latents are off by about that much, and a decoder that only ever
    saw the posterior (std about 0.01 of the latents' spread) turns such errors into coloured speckles
    (measured 2026-12-06: v4's decoder on real latents + 0.2-0.3 std noise draws the speckles of its samples).
    `train_encoder`: False trains the decoder only (encoder and quant_conv frozen, the `init`'s scaling factor
    kept), so the latent space stays that of `init` and a UNet trained on it still fits, as Stability AI
    fine-tuned SD's decoder alone (sd-vae-ft-mse).
    """

    optim: Optim
    mse_weight: float = 1.0
    edge_weight: float = 0.5
    kl_weight: float = 1e-6
    scale_images: int = 2048
    object_weight: float = 0.0
    init: str | None = None
    hue_jitter: float = 0.0
    latent_noise: float = 0.0
    train_encoder: bool = True


@dataclass(frozen=True)
class UNetTrainConfig:
    """The UNet stage.

    `text_encoder_lr`: the text encoder's peak learning rate when it trains (None: the UNet's).
    `readout_weight`: weight of an auxiliary term on the trainable text encoder: linear heads read each named
    caption part of `readout_parts` from the encoder's states averaged over all 77 tokens, cross-entropy (see
    `Denoiser`). `readout_parts` may also hold "concept" (every caption but the empty one names it): without it
    the term pulls the average towards the layout parts only, and the trainable encoder loses the concept
    (2026-12-01, the shipped encoder: states of captions differing only in the concept at cosine 0.91-0.99,
    the mini-CLIP text tower it started from 0.20-0.91).
    `init`: warm start from another UNet-stage ``checkpoint.pt`` (its UNet EMA weights start both the model and
    the EMA; not its optimizer state): a UNet carried over from an earlier run, recorded in the config.
    `init` may also be a diffusers pipeline folder (e.g. the shipped booth-mini): its ``unet/`` (and, with
    `init_text_encoder`, its ``text_encoder/``).
    `init_text_encoder`: also start the text encoder from that checkpoint's (EMA) encoder, which it must hold
    (a run with `train_text_encoder`); otherwise the encoder is this run's mini-CLIP text tower. The readout
    heads go on from the checkpoint's when they read the same parts; a pipeline folder has none, and fresh
    heads at the encoder's learning rate rewrite the carried encoder in the first steps (2026-12-07: v5
    continued 600 steps so, background right 99 -> 51%): continue a pipeline folder with the encoder frozen
    or `readout_weight` 0. A REPA projector (`repa_weight`) goes on from the checkpoint's likewise.
    `pairs`: also train on the dataset's ``pairs`` split (two small objects an image, "a small X on the left
    and a small Y on the right ..."; `booth.mini.dataset`), so the model can draw two things at once, as
    multi-concept prompts ask; the readout term skips those images.
    `snr_floor_end`: the x0-weight floor at the stage's last step, reached linearly from `snr_floor` (None:
    the floor stays `snr_floor`). The floor teaches layout at high noise; at floor 0 the loss leans towards
    low noise, where outlines and shading are drawn (2026-12-06, 400 prompts: 1,000 steps at floor 0 after a
    floor-1 stage, style 47.3 -> 54.3%, position kept; a 3,000-step stage from floor 1 to 0, style 52.3% and
    size 77.3 -> 72.5%; docs/mini-model.md, "After v5" and "part 3"). Off in the presets.
    `timesteps`, `timesteps_share`: a [first, last) range of training timesteps and the share of each batch
    drawn from it (uniformly); the rest of the batch is drawn from the whole schedule. None: the whole
    schedule. A range of low noise trains the part of the denoiser that draws the details (the denoiser
    experts of eDiff-I, Balaji et al. 2022, here one UNet). Measured (2026-12-07, docs/mini-model.md, "After
    v5, part 4"): v5's UNet continued 600 steps with half of each batch at t < 400, encoder frozen: style 49
    -> 52%, concept and layout as before. Off in the presets.
    `repa_weight`, `repa_layer`: representation alignment (REPA, Yu et al. 2024): an MLP head reads the output
    of the UNet module `repa_layer` (a dotted submodule name) on the noisy latents and is pulled, by negative
    cosine similarity per patch, towards the frozen mini-CLIP vision tower's patch states of the clean image.
    Why: the concept's shapes need far more views than a CPU gives (docs/mini-model.md, "After v5, part 5");
    REPA reports diffusion transformers reaching the same FID in 17.5x fewer steps when an early layer is
    taught a pretrained encoder's features, so the UNet need not find the shapes' representation alone.
    `repa_encoder`: a CLIP folder whose vision tower gives the targets instead of this run's mini-CLIP (REPA
    finds better encoders give better alignment; the text encoder is unchanged). Measured (2026-12-07,
    docs/mini-model.md, "After v5, part 8"): 10 concepts from scratch, 3,000 steps, top-1 over 200 / among the
    10 at 29.3 / 66.0% with REPA (the 2,000-step mini-CLIP, weight 1) against 24.7 / 71.0% without: the
    mini-CLIP's patch states do not stand in for views. Off (0) in the presets.
    `resolution`: train on the images resized (box filter) to this many pixels a side before the VAE encodes
    them (None: the dataset's own size); a multiple of 16, so the UNet's levels halve evenly. A UNet is
    convolutional, so a stage at 32 px (8 x 8 latents, 2.6x cheaper a step here) can start a stage at the
    full size through `init`, as Stable Diffusion was pretrained at 256 px before 512 px. Measured
    (2026-12-07, docs/mini-model.md, "After v5, part 9"): 10 concepts, 3,000 steps at 32 px then 1,000 at 64
    px (30 min): top-1 over 200 / among the 10 at 17.3 / 62.7%, against 20.0 / 62.0% for the same minutes at
    64 px: worth what it costs, no more. Off in the presets.
    `object_weight`: weigh the squared error of each latent pixel by 1 + `object_weight` x the share of its
    pixels that show the object (`object_mask`, box-filtered to the latent grid), normalised per image so
    each image keeps its timestep weight: the flat backgrounds, most of each latent, then weigh less against
    the object's outline, as the autoencoder stages weigh objects. 0: plain MSE. Measured (2026-12-07,
    docs/mini-model.md, "After v5, part 9"): 10 concepts from scratch, 3,000 steps, weight 4: top-1 over 200 /
    among the 10 at 18.7 / 67.0% against 24.7 / 71.0% unweighted, the same rough shapes. Off in the presets.
    """

    optim: Optim
    captions: CaptionDropout = field(default_factory=lambda: CaptionDropout(empty=0.1, concept_only=0.1))
    ema_decay: float = 0.999
    offset_noise: float = 0.05
    min_snr_gamma: float = 5.0
    train_text_encoder: bool = False
    snr_floor: float = 0.0
    text_encoder_lr: float | None = None
    init: str | None = None
    readout_weight: float = 0.0
    init_text_encoder: bool = False
    readout_parts: tuple[str, ...] = CAPTION_PARTS
    pairs: bool = False
    snr_floor_end: float | None = None
    timesteps: tuple[int, int] | None = None
    timesteps_share: float = 1.0
    repa_weight: float = 0.0
    repa_layer: str = "down_blocks.1.attentions.0"
    repa_encoder: str | None = None
    resolution: int | None = None
    object_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.object_weight < 0:
            raise ValueError(f"object_weight cannot be negative, not {self.object_weight}")
        if self.resolution is not None and (self.resolution < 16 or self.resolution % 16):
            raise ValueError(f"resolution is a multiple of 16 pixels, not {self.resolution}")
        if self.repa_weight < 0:
            raise ValueError(f"repa_weight cannot be negative, not {self.repa_weight}")
        if self.snr_floor < 0 or (self.snr_floor_end or 0.0) < 0:
            raise ValueError("the x0-weight floor (snr_floor, snr_floor_end) cannot be negative")
        if not 0.0 <= self.timesteps_share <= 1.0:
            raise ValueError(
                f"timesteps_share is a fraction of the batch in [0, 1], not {self.timesteps_share}"
            )
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(self.timesteps))  # a JSON list reads back as a tuple
            first, last = self.timesteps
            if not 0 <= first < last:
                raise ValueError(
                    f"timesteps must be a range [first, last) with 0 <= first < last, not {self.timesteps}"
                )

    def floor_at(self, step: int) -> float:
        """The x0-weight floor at `step` (0-based) of the stage."""
        if self.snr_floor_end is None:
            return self.snr_floor
        done = min(step / max(self.optim.steps - 1, 1), 1.0)
        return self.snr_floor + (self.snr_floor_end - self.snr_floor) * done


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; `PRESETS` holds "tiny" (tests) and "full" (the shipped model).

    `decoder`: the optional decoder stage (None: none; a `VaeTrainConfig` with `train_encoder` false, started
    from the ``vae`` stage's autoencoder unless its `init` names another). `dataset_*` size the dataset that
    the CLI builds when ``--data`` is missing. `precision` is "auto", "fp32" or "bf16" (autocast).
    """

    name: str
    arch: MiniArchitecture
    clip: ClipTrainConfig
    vae: VaeTrainConfig
    unet: UNetTrainConfig
    decoder: VaeTrainConfig | None = None
    checkpoint_every: int = 250
    precision: str = "auto"
    dataset_images: int = 20000
    dataset_test: int = 300
    dataset_novel: int = 100
    dataset_pairs: int = 0

    def __post_init__(self) -> None:
        if self.decoder is not None and self.decoder.train_encoder:
            raise ValueError("the decoder stage trains the decoder alone: set its train_encoder to false")

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this configuration trains, in order (`STAGES` without "decoder" when it has none)."""
        return tuple(s for s in STAGES if s != "decoder" or self.decoder is not None)

    @property
    def vae_stage(self) -> str:
        """The stage whose autoencoder ships: "decoder" when the configuration has one, else "vae"."""
        return "decoder" if self.decoder is not None else "vae"

    def stage(self, stage: str) -> ClipTrainConfig | VaeTrainConfig | UNetTrainConfig:
        """The training config of one stage (BoothError for a stage this configuration does not have)."""
        if check_stage(stage) not in self.stages:
            raise BoothError(f"the {self.name!r} configuration has no {stage} stage")
        return {"clip": self.clip, "vae": self.vae, "decoder": self.decoder, "unet": self.unet}[stage]

    def to_json(self) -> dict:
        """A JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        """The config `to_json` wrote (BoothError if it is not one)."""
        from booth.train.config import build_dataclass

        try:
            return build_dataclass(cls, data)
        except (TypeError, ValueError, AttributeError) as error:
            raise BoothError(f"not a booth-mini training config: {error}") from None


def _tiny() -> TrainConfig:
    """A smoke configuration for tests: every stage in about 5 s on one CPU thread (64 images)."""
    arch = MiniArchitecture(
        clip=ClipConfig(
            num_merges=1000,
            text_width=32,
            text_layers=2,
            text_heads=2,
            text_mlp=64,
            vision_width=32,
            vision_layers=2,
            vision_heads=2,
            vision_mlp=64,
            projection_dim=32,
        ),
        vae=VaeConfig(block_out_channels=(8, 16, 16), norm_num_groups=4),
        unet=UNetConfig(block_out_channels=(16, 32, 32), attention_heads=(1, 2, 2), norm_num_groups=8),
    )
    return TrainConfig(
        name="tiny",
        arch=arch,
        clip=ClipTrainConfig(
            Optim(steps=6, batch_size=8, lr=1e-3, warmup_steps=2),
            hard_negatives=1,
            concept_weight=1.0,
            phrase_weight=1.0,
        ),
        vae=VaeTrainConfig(Optim(steps=6, batch_size=4, lr=1e-3, warmup_steps=2), scale_images=16),
        unet=UNetTrainConfig(Optim(steps=6, batch_size=8, lr=1e-3, warmup_steps=2), train_text_encoder=True),
        decoder=VaeTrainConfig(
            Optim(steps=6, batch_size=4, lr=1e-3, warmup_steps=2), latent_noise=0.3, train_encoder=False
        ),
        checkpoint_every=4,
        dataset_images=64,
        dataset_test=16,
        dataset_novel=8,
    )


def _full() -> TrainConfig:
    """The shipped model's recipe (v5, docs/mini-model.md) from scratch: about 2 h 10 min on a 2-core CPU.

    Times measured on a 2-core AMD EPYC (AVX512-BF16, no AMX), 2 threads, bf16 autocast, 2026-12-06: CLIP
    1,500 x 128 with one hard negative per image and the zero-shot concept term, 1.45 s a step, 36 min; VAE
    3,200 x 16 with the object weight and hue jitter, 0.54 s a step, 30 min; decoder 1,200 x 16 on latents
    with noise of U(0, 0.3) latent stds (encoder and scaling factor kept), 9.7 min; UNet 3,600 x 32 from
    scratch with the text encoder training (lr 1e-3), the x0-weight floor, the readout term over the concept
    and the layout parts and the two-object images, 0.86-0.89 s a step, 54 min with caching the latents;
    129.6 min in all. (v5 ran as v4, this recipe without the decoder stage, plus that fine-tune as a VAE
    stage started from v4's autoencoder: the same steps, other random draws.)

    Why each part (measured on warm starts of the earlier weights, 2026-11-30 .. 12-06): the hard negative
    and the concept term (with the ViT's sin-cos position start, `ClipConfig`) took the mini-CLIP's zero-shot
    concept accuracy on real renders from 12% to 32%; the readout term (with the trainable encoder) moved
    position from 11% to 98%; "concept" among the readout parts keeps the encoder's captions apart by concept
    (cosine 0.30-0.57 instead of 0.91-0.99); the object weight and hue jitter keep purple, blue and green
    objects apart (`VaeTrainConfig`); the VAE's 3,200 steps (v3 had 1,600) give object colours back (flat hues
    off by 5.5 of 255 instead of 36.5, `booth.mini.check.colour_error`), which coloured subjects need to be
    personalized; the two-object images drew two objects where asked in 100% of `booth mini check`'s pair
    prompts (0% without); the decoder stage takes the speckles off the samples (its decoder reconstructs
    latents with 0.3 stds of noise at 24.88 dB, the VAE stage's at 21.41; `tools/mini_vae_colours.py`).
    """
    return TrainConfig(
        name="full",
        arch=MiniArchitecture(),
        clip=ClipTrainConfig(
            Optim(steps=1500, batch_size=128, lr=5e-4, warmup_steps=80, weight_decay=0.1),
            hard_negatives=1,
            concept_weight=1.0,
        ),
        vae=VaeTrainConfig(
            Optim(steps=3200, batch_size=16, lr=6e-4, warmup_steps=120), object_weight=4.0, hue_jitter=0.5
        ),
        unet=UNetTrainConfig(
            Optim(steps=3600, batch_size=32, lr=3e-4, warmup_steps=120),
            train_text_encoder=True,
            text_encoder_lr=1e-3,
            snr_floor=1.0,
            readout_weight=0.1,
            readout_parts=("concept", *CAPTION_PARTS),
            pairs=True,
        ),
        decoder=VaeTrainConfig(
            Optim(steps=1200, batch_size=16, lr=2e-4, warmup_steps=50),
            object_weight=4.0,
            hue_jitter=0.5,
            latent_noise=0.3,
            train_encoder=False,
        ),
        dataset_pairs=4000,
    )


def _factor2() -> TrainConfig:
    """An experiment, not shipped: 64x64 images on 32x32x4 latents (a 2-level VAE) instead of 16x16x4.

    Why: the factor-4 autoencoder caps the concept and style gates (the mini-CLIP recognises the concept in
    32% of real renders, in 9% of the v2 VAE's reconstructions of them). This VAE, with v3's 1,600 VAE
    steps (13 min), reconstructs held-out renders at 29.6 dB (objects 21.1 dB; v2 24.7 /
    15.4) and keeps the concept in 24% of them (`tools/mini_vae_colours.py`). The UNet keeps its first level
    (32x32) cheap: 32 channels, no attention. UNet from scratch, 3,400 x 32 in 72 min (2-core AMD EPYC), with
    the text encoder training (lr 1e-3), the readout term over concept and the layout parts, the x0-weight
    floor and the two-object images; the CLIP stage was the v2 mini-CLIP (1,500 x 128, 38 min).
    `booth mini check` (2026-12-02): concept 7.5% (v2 3.0%), background 53% (v2 99%), position 99%,
    size 82%, style 41% (44%), two objects 90%, 1.19 s an image (v2 0.88 s on the same machine). Not
    shipped: backgrounds come out in the wrong shade (neon green for green, light blue for white), and the
    concepts are still blobs. See docs/mini-model.md. Give it its own ``--work`` and ``--export``
    folders: a finished run otherwise exports over the bundled weights.
    """
    arch = MiniArchitecture(
        vae=VaeConfig(block_out_channels=(32, 64), mid_attention=False),
        unet=UNetConfig(
            block_out_channels=(32, 64, 128, 128),
            attention_heads=(1, 2, 4, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            sample_size=32,
        ),
    )
    full = _full()
    return replace(
        full,
        name="factor2",
        arch=arch,
        vae=replace(full.vae, optim=replace(full.vae.optim, steps=1600)),
        unet=replace(full.unet, optim=replace(full.unet.optim, steps=3400)),
        decoder=None,
    )


PRESETS: dict[str, TrainConfig] = {"tiny": _tiny(), "full": _full(), "factor2": _factor2()}


def preset(name: str) -> TrainConfig:
    """The named preset ("tiny", "full" or the experiment "factor2")."""
    try:
        return PRESETS[name]
    except KeyError:
        raise BoothError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def check_stage(stage: str) -> str:
    """`stage` if it is one of `STAGES`, else a BoothError."""
    if stage not in STAGES:
        raise BoothError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)} or all")
    return stage
