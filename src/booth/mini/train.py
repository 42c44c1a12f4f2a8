"""Train booth-mini in resumable stages: mini-CLIP, the autoencoder, its decoder on noisy latents, the UNet.

Stages (`STAGES`), each a plain loop of numbered steps (1 load batch, 2 encode, 3 noise, 4 predict, 5 loss,
6 optimizer step), AdamW with linear warmup + cosine decay, gradient clipping at 1.0:

- ``clip``: `transformers.CLIPModel` trained with CLIP's symmetric InfoNCE (Radford et al. 2021) and its
  learnable temperature (clamped at 100, as CLIP). Identical captions in a batch are all positives (soft
  targets), since the short caption variants collide. Text is padded only to the batch's longest caption:
  the tower is causal and pools at EOS, so trailing padding cannot change the loss (3x cheaper than 77).
- ``vae``: `diffusers.AutoencoderKL` on images in [-1, 1]: L1 + MSE + edge L1 (finite differences, a cheap
  stand-in for a perceptual loss) + a small KL to N(0, I) (weight 1e-6 relative to a per-pixel sum, SD's).
  At the end the latent scaling factor is measured: 1 / std of posterior samples of up to
  `VaeTrainConfig.scale_images` training images (Rombach et al. 2022, sec. 4.3.2), stored in the VAE config.
- ``decoder`` (when the configuration has one, `TrainConfig.decoder`): the ``vae`` stage's autoencoder with
  its decoder alone trained on (posterior + Gaussian noise) latents: a UNet's samples are off the posterior
  by more than the posterior's own spread, and a decoder that never saw such latents draws speckles. Encoder
  and scaling factor stay, so the latents (and the UNet trained on them) are the ``vae`` stage's; Stability AI
  fine-tuned SD's decoder alone the same way. The exported VAE is this stage's.
- ``unet``: `diffusers.UNet2DConditionModel`, epsilon prediction under SD's scaled-linear DDPM betas
  (Ho et al. 2020), with Min-SNR-5 loss weights (Hang et al. 2023), offset noise 0.05 (Guttenberg 2023:
  without it the scaled-linear schedule cannot move an image's mean colour far, and flat backgrounds are
  the mini world's first prompt check), classifier-free-guidance caption dropout (empty caption with
  p = 0.1, Ho & Salimans 2022) and caption-part dropout so short prompts ("a dog", "a dog on a blue
  background") work. The text encoder is the frozen CLIP text tower (captions padded to 77, as at
  inference); latents come from the frozen VAE, encoded once per training image (posterior mean and std
  cached in ``work/unet/latents.pt``) and sampled every step. EMA of the weights (decay 0.999 with the
  usual (1 + t) / (10 + t) warm-up) is what ships.

No horizontal flips, in any stage: captions name left and right, and a flip would need the caption swapped
*and* would teach mirror images of art that the styles never draw (20,000 distinct compositions are data
enough). Data: the ImageFolder tree of `booth.mini.dataset`, loaded once into memory as uint8 tensors.

Resuming: the batch at step s is a function of (seed, s) (a seeded permutation per epoch), and every random
draw of step s comes from its own generator seeded by (seed, stage, s), so a run cut into chunks sees the
same data and noise as one run. A checkpoint (model, EMA, optimizer, LR scheduler, global RNG states, step,
data position, training seconds) is written atomically every `TrainConfig.checkpoint_every` steps and at
the end of each chunk (`minutes` / `steps` budget); the next call continues from it. A finished stage
writes ``work/<stage>/final/`` (a `save_pretrained` folder, fp32) and ``done.json``; `train_all` skips
finished stages. ``work/config.json`` and ``work/dataset.json`` pin the configuration and the data: a
different configuration needs a new work folder. Logs: ``work/<stage>/log.jsonl`` (one record per step:
loss, lr, seconds; and one ``"event": "chunk"`` record per call with the hardware and wall time).

Precision: bf16 autocast where it pays (CUDA with bf16; a CPU with AMX tiles or AVX512-BF16), else fp32;
losses in fp32.

Step times (the training loop with data, frozen encoders and EMA, bf16 autocast, 2 threads, full preset;
2-core AMD EPYC with AVX512-BF16 and no AMX, 2026-12-06): CLIP 1.45 s a step (batch 128), VAE 0.58 s
(batch 16), UNet with its text encoder 0.78-0.87 s (batch 32); encoding the 24,000 latents once 1.6 min. On a
2-core Xeon with AMX the UNet steps were about 1.8x slower (2026-12-02). Whatever runs on the second core
slows every step several times (a CLIP step 0.92 s -> 5.96 s with a busy second core).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from booth.devices import resolve_device
from booth.errors import BoothError
from booth.fsutil import atomic_folder
from booth.mini import architecture as arch_mod
from booth.mini.architecture import ClipConfig, MiniArchitecture, UNetConfig, VaeConfig
from booth.mini.compose import (
    BACKGROUNDS,
    CAPTION_PARTS,
    POSITION_PHRASES,
    POSITIONS_BY_SIZE,
    SIZES,
    Layout,
    article,
    caption,
    pair_caption,
)

STAGES: tuple[str, ...] = ("clip", "vae", "decoder", "unet")
CHECKPOINT = "checkpoint.pt"
FINAL = "final"
DONE = "done.json"
LOG = "log.jsonl"
CONFIG_FILE = "config.json"
DATASET_FILE = "dataset.json"
# unet/final/text_encoder: the fine-tuned encoder, when the UNet stage trains it
TEXT_ENCODER = "text_encoder"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the temperature at 100 (Radford et al. 2021)


# --- configuration ---------------------------------------------------------------------------------------


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
    (a run with `train_text_encoder`); otherwise the encoder is this run's mini-CLIP text tower.
    `pairs`: also train on the dataset's ``pairs`` split (two small objects an image, "a small X on the left
    and a small Y on the right ..."; `booth.mini.dataset`), so the model can draw two things at once, as
    multi-concept prompts ask; the readout term skips those images.
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


# --- data ------------------------------------------------------------------------------------------------


@dataclass
class MiniData:
    """One split in memory: images as a uint8 N x 3 x R x R tensor, metadata records, metadata checksum."""

    images: torch.Tensor
    records: list[dict]
    checksum: str

    def __len__(self) -> int:
        return len(self.records)


def load_split(data_dir: str | Path, split: str = "train") -> MiniData:
    """Read a split of the booth-mini ImageFolder tree into memory."""
    folder = Path(data_dir) / split
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise BoothError(
            f"{folder} is not a booth-mini split (no metadata.jsonl); build it with booth mini dataset"
        )
    text = meta.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not records:
        raise BoothError(f"{meta} lists no images")
    arrays = [np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in records]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return MiniData(images, records, hashlib.sha256(text.encode()).hexdigest())


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def data_position(n: int, batch_size: int, step: int) -> tuple[int, int]:
    """(epoch, batch within the epoch) of a step: epochs of ``n // batch_size`` full batches."""
    return divmod(step, max(1, n // batch_size))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The sample indices of a step: a seeded permutation per epoch, read in order (no replacement)."""
    epoch, k = data_position(n, batch_size, step)
    order = _epoch_order(n, seed, epoch)
    if n < batch_size:
        order = order.repeat(-(-batch_size // n))
    return order[k * batch_size : (k + 1) * batch_size]


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """A CPU generator for every random draw of one step (so chunked and one-go runs draw the same)."""
    digest = hashlib.sha256(f"booth-mini/{seed}/{stage}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def sample_parts(dropout: CaptionDropout, gen: torch.Generator) -> tuple[str, ...] | None:
    """Which caption parts a training caption keeps (None: the empty caption); always 6 draws from `gen`."""
    u = torch.rand(2 + len(CAPTION_PARTS), generator=gen).tolist()
    if u[0] < dropout.empty:
        return None
    keep = () if u[1] < dropout.concept_only else CAPTION_PARTS
    return tuple(p for p, r in zip(keep, u[2:]) if r < dropout.keep_part)


def is_pair(record: dict) -> bool:
    """Whether a metadata record is a two-object image (the ``pairs`` split)."""
    return "concept2" in record


def record_caption(record: dict, parts: tuple[str, ...] | None) -> str:
    """The caption of a metadata record keeping `parts` ("" for None)."""
    if parts is None:
        return ""
    if is_pair(record):
        concepts, positions = (
            (record["concept"], record["concept2"]),
            (record["position"], record["position2"]),
        )
        return pair_caption(concepts, record["style"], record["background"], positions, parts)
    layout = Layout(record["background"], record["position"], record["size"])
    return caption(record["concept"], record["style"], layout, parts)


def sample_caption(record: dict, dropout: CaptionDropout, gen: torch.Generator) -> str:
    """A training caption of a metadata record, shortened as `dropout` says (always 6 draws from `gen`)."""
    return record_caption(record, sample_parts(dropout, gen))


def part_phrases(styles: list[str]) -> dict[str, dict[str, str]]:
    """The phrase of every value of every caption part, as the caption template writes it."""
    return {
        "position": dict(POSITION_PHRASES),
        "size": {size: size for size in SIZES},
        "background": {b: f"on {article(b)} {b} background" for b in BACKGROUNDS},
        "style": {style: f"{style} style" for style in styles},
    }


def names_part(parts: tuple[str, ...] | None, part: str) -> bool:
    """Whether a caption keeping `parts` names `part` (the concept is in every caption but the empty one)."""
    return parts is not None and (part == "concept" or part in parts)


def part_cross_entropy(values, records, parts, logits_of, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy (and accuracy) of every caption part named in a caption, over that part's values.

    `values`: part -> its value names (the classes); `parts`: per sample, the parts its caption kept (None: none);
    `logits_of(part, rows)`: the class logits of those samples. `like`: a tensor of the graph, for a zero loss
    when no caption names a part.
    """
    losses, hits = [], []
    for part, names in values.items():
        rows = [i for i, p in enumerate(parts) if names_part(p, part)]
        if not rows:
            continue
        logits = logits_of(part, rows)
        labels = torch.tensor([names.index(records[i][part]) for i in rows], device=logits.device)
        losses.append(F.cross_entropy(logits, labels, reduction="sum"))
        hits.append((logits.argmax(dim=1) == labels).float())
    if not losses:
        return like.sum() * 0.0, 0.0
    count = sum(len(h) for h in hits)
    return torch.stack(losses).sum() / count, torch.cat(hits).mean().item()


def _other(values: list[str], current: str, gen: torch.Generator) -> str:
    """A value of `values` other than `current`, drawn from `gen` (`current` itself if it is the only one)."""
    choices = [v for v in values if v != current]
    return choices[int(torch.randint(len(choices), (1,), generator=gen))] if choices else current


def hard_negative(
    record: dict, parts: tuple[str, ...], vocab: dict[str, list[str]], gen: torch.Generator
) -> dict:
    """A copy of `record` with one attribute its caption names (or its concept) changed to another valid one.

    `vocab` lists the values of "concept" and "style"; layouts stay valid (a large object only in the centre).
    """
    named = ["concept", *(p for p in parts if p in ("size", "position", "background", "style"))]
    if record["size"] == "large" and "position" in named:  # a large object has no other position
        named.remove("position")
    sizes = [s for s in SIZES if record["position"] in POSITIONS_BY_SIZE[s]]  # sizes allowing this position
    if "size" in named and len(sizes) < 2:
        named.remove("size")
    attribute = named[int(torch.randint(len(named), (1,), generator=gen))]
    out = dict(record)
    if attribute in ("concept", "style"):
        out[attribute] = _other(vocab[attribute], record[attribute], gen)
    elif attribute == "background":
        out["background"] = _other(list(BACKGROUNDS), record["background"], gen)
    elif attribute == "position":
        out["position"] = _other(list(POSITIONS_BY_SIZE[record["size"]]), record["position"], gen)
    else:
        out["size"] = _other(sizes, record["size"], gen)
    return out


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (SD's VAE convention)."""
    return images.float() / 127.5 - 1.0


# --- devices, precision, files ---------------------------------------------------------------------------


def _cpu_has_fast_bf16() -> bool:
    """AMX tiles (Intel) or AVX512-BF16 (AMD Zen 4, Intel Cooper Lake): bf16 matmuls beat fp32 there.

    Measured on a 2-core AMD EPYC with AVX512-BF16 and no AMX: the full-preset UNet forward+backward at
    batch 32 took 3.3 s in fp32 and 2.0 s under bf16 autocast (after a one-off oneDNN warm-up).
    """
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        try:
            if getattr(torch.cpu, probe)():
                return True
        except (AttributeError, RuntimeError):
            continue
    return False


def resolve_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32). "auto": bf16 on CUDA GPUs with bf16 and on CPUs with AMX or AVX512-BF16."""
    if choice == "fp32":
        return None
    if choice == "bf16":
        return torch.bfloat16
    if choice != "auto":
        raise BoothError(f"unknown precision {choice!r}; choose auto, fp32 or bf16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and _cpu_has_fast_bf16() else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def describe_hardware(device: torch.device) -> str:
    """What ran a chunk, e.g. "cpu: Intel(R) Xeon(R) Processor, 2 cores, 2 torch threads"."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def atomic_save(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def final_dir(work_dir: str | Path, stage: str) -> Path:
    """Where a finished stage's model is saved."""
    return Path(work_dir) / check_stage(stage) / FINAL


def is_finished(work_dir: str | Path, stage: str) -> bool:
    """Whether a stage has run all its steps and saved its final model."""
    return (Path(work_dir) / check_stage(stage) / DONE).is_file()


def read_log(work_dir: str | Path, stage: str) -> list[dict]:
    """A stage's log records (per-step records and ``"event": "chunk"`` records)."""
    path = Path(work_dir) / check_stage(stage) / LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the three tasks: steps 1-5 of the loop ----------------------------------------------------------------


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


class ClipTask:
    """mini-CLIP: symmetric InfoNCE over a batch of (image, caption) pairs."""

    def __init__(self, config: TrainConfig, data: MiniData, device: torch.device, seed: int):
        self.cfg, self.data, self.device = config.clip, data, device
        self.model = arch_mod.build_clip(config.arch.clip, seed=seed).to(device).train()
        self.tokenizer = arch_mod.build_tokenizer(config.arch.clip)
        self.mean = torch.tensor(arch_mod.CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(arch_mod.CLIP_STD, device=device).view(1, 3, 1, 1)
        self.arch = config.arch.clip
        self.vocab = {key: sorted({r[key] for r in data.records}) for key in ("concept", "style")}
        self.concept_index = {c: i for i, c in enumerate(self.vocab["concept"])}
        self.concept_ids = self._ids([caption(c, None, None, ()) for c in self.vocab["concept"]])
        self.style_index = {s: i for i, s in enumerate(self.vocab["style"])}
        styles = self.vocab["style"]  # the style prompts of every concept: concepts x styles x tokens
        style_ids = self._ids([caption(c, s, None) for c in self.vocab["concept"] for s in styles])
        self.style_ids = style_ids.view(len(self.vocab["concept"]), len(styles), -1)
        self.phrases = part_phrases(self.vocab["style"])
        self.phrase_ids = self._ids([text for values in self.phrases.values() for text in values.values()])

    def _ids(self, texts: list[str]) -> torch.Tensor:
        """Token ids padded to the longest text (the causal tower pools at EOS: trailing padding is inert)."""
        ids = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.arch.max_length)
        return torch.tensor(ids["input_ids"], device=self.device)

    def loss(self, index: torch.Tensor, gen: torch.Generator, dtype: torch.dtype | None):
        # 1. load batch: images, (shortened) captions, hard negatives, the concept prompts
        records = [self.data.records[i] for i in index.tolist()]
        parts = [sample_parts(self.cfg.captions, gen) for _ in records]
        texts = [record_caption(r, p) for r, p in zip(records, parts)]
        negatives = [
            record_caption(hard_negative(r, p or (), self.vocab, gen), p or ())
            for _ in range(self.cfg.hard_negatives)
            for r, p in zip(records, parts)
        ]
        pixels = (self.data.images[index].to(self.device).float() / 255.0 - self.mean) / self.std
        input_ids = self._ids(texts + negatives)
        # 2. encode both towers; 3-4. (no noise) predict: cosine similarities scaled by the temperature
        with _autocast(self.device, dtype):
            image_emb = self.model.get_image_features(pixel_values=pixels)
            text_emb = self.model.get_text_features(input_ids=input_ids)
            if self.cfg.concept_weight:  # the short concept prompts in their own, shorter batch
                concept_emb = self.model.get_text_features(input_ids=self.concept_ids)
            if self.cfg.phrase_weight:
                phrase_emb = self.model.get_text_features(input_ids=self.phrase_ids)
            if self.cfg.style_weight:  # "a {concept}, {style} style" for every style, per image
                concepts = torch.tensor(
                    [self.concept_index[r["concept"]] for r in records], device=self.device
                )
                style_emb = self.model.get_text_features(input_ids=self.style_ids[concepts].flatten(0, 1))
        image_emb = F.normalize(_pooled(image_emb).float(), dim=-1)
        text_emb = F.normalize(_pooled(text_emb).float(), dim=-1)
        scale = self.model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        b = len(texts)
        logits = scale * image_emb @ text_emb.T  # images x (captions + hard negatives)
        # 5. loss: symmetric cross-entropy, identical captions all count as positives (Radford et al. 2021);
        #    image -> text also against the hard negatives; text -> image over the batch's captions
        first = {}
        codes = torch.tensor([first.setdefault(t, len(first)) for t in texts + negatives], device=self.device)
        same = (codes[:b, None] == codes[None, :]).float()
        loss_i2t = F.cross_entropy(logits, same / same.sum(dim=1, keepdim=True))
        same_t = same[:, :b]
        loss_t2i = F.cross_entropy(logits[:, :b].T, same_t / same_t.sum(dim=1, keepdim=True))
        loss = 0.5 * (loss_i2t + loss_t2i)
        accuracy = (logits.argmax(dim=1) == torch.arange(b, device=self.device)).float().mean()
        stats = {"acc": accuracy.item(), "scale": scale.item()}
        if self.cfg.concept_weight:
            concept_logits = scale * image_emb @ F.normalize(_pooled(concept_emb).float(), dim=-1).T
            labels = torch.tensor([self.concept_index[r["concept"]] for r in records], device=self.device)
            loss = loss + self.cfg.concept_weight * F.cross_entropy(concept_logits, labels)
            stats["concept_acc"] = (concept_logits.argmax(dim=1) == labels).float().mean().item()
        if self.cfg.phrase_weight:
            phrase_loss, phrase_acc = self._phrase_loss(records, parts, text_emb[:b], phrase_emb, scale)
            loss = loss + self.cfg.phrase_weight * phrase_loss
            stats["phrase_acc"] = phrase_acc
        if self.cfg.style_weight:
            style_emb = F.normalize(_pooled(style_emb).float(), dim=-1).view(b, len(self.vocab["style"]), -1)
            style_logits = scale * torch.einsum("bd,bsd->bs", image_emb, style_emb)
            labels = torch.tensor([self.style_index[r["style"]] for r in records], device=self.device)
            loss = loss + self.cfg.style_weight * F.cross_entropy(style_logits, labels)
            stats["style_acc"] = (style_logits.argmax(dim=1) == labels).float().mean().item()
        return loss, stats

    def _phrase_loss(self, records, parts, text_emb, phrase_emb, scale):
        """Cross-entropy of each named part of each caption over that part's phrases (text tower only)."""
        phrase_emb = F.normalize(_pooled(phrase_emb).float(), dim=-1)
        starts, start = {}, 0
        for part, values in self.phrases.items():
            starts[part], start = start, start + len(values)
        return part_cross_entropy(
            {part: list(values) for part, values in self.phrases.items()},
            records,
            parts,
            lambda part, rows: (
                scale * text_emb[rows] @ phrase_emb[starts[part] : starts[part] + len(self.phrases[part])].T
            ),
            text_emb,
        )

    def save_final(self, folder: Path, data_dir: Path) -> dict:
        from booth.models.tokenizer import write_clip_tokenizer_files

        self.model.eval().save_pretrained(folder)
        write_clip_tokenizer_files(folder, self.arch.num_merges, model_max_length=self.arch.max_length)
        return {"logit_scale": self.model.logit_scale.exp().item()}


def _pooled(features: Any) -> torch.Tensor:
    """transformers 5 may return a ModelOutput from get_*_features; older versions a tensor."""
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch dim (Kingma & Welling 2014)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and vertical finite differences of two image batches."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of images in [-1, 1] by `angle` radians (one per image) about the grey axis: a rotation of
    the chroma plane of YIQ (NTSC), which keeps luma and saturation; values clamped back to [-1, 1]."""
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        dtype=x.dtype,
        device=x.device,
    )
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack(
        [
            torch.stack([one, zero, zero], -1),
            torch.stack([zero, cos, -sin], -1),
            torch.stack([zero, sin, cos], -1),
        ],
        -2,
    )  # N x 3 x 3
    matrix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq
    return torch.einsum("nij,njhw->nihw", matrix, x).clamp(-1.0, 1.0)


def object_mask(x: torch.Tensor, threshold: float = 0.08) -> torch.Tensor:
    """1 where an image in [-1, 1] differs from its background colour, else 0 (N x 1 x H x W).

    The mini world's backgrounds are flat and every object keeps a margin from the border, so the top-left
    pixel is the background colour."""
    return ((x - x[..., :1, :1]).abs().amax(dim=1, keepdim=True) > threshold).to(x.dtype)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] from their MSE (peak-to-peak range 2)."""
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


class VaeTask:
    """AutoencoderKL: reconstruction + edge + small KL (the ``vae`` stage, and the ``decoder`` stage with
    `cfg.train_encoder` false, started from `init`)."""

    def __init__(
        self,
        cfg: VaeTrainConfig,
        arch: VaeConfig,
        data: MiniData,
        device: torch.device,
        seed: int,
        init: Path | None = None,
    ):
        self.cfg, self.data, self.device = cfg, data, device
        self.model = arch_mod.build_vae(arch, seed=seed).to(device).train()
        self.kept_factor: float | None = None  # a decoder-only run keeps its init's latent scale
        if not self.cfg.train_encoder:
            if init is None:
                raise BoothError("a decoder-only VAE run (train_encoder false) needs an init VAE to keep")
            self.kept_factor = float(_init_config("vae", init)["scaling_factor"])
            for part in (self.model.encoder, self.model.quant_conv):
                part.requires_grad_(False)

    def loss(self, index: torch.Tensor, gen: torch.Generator, dtype: torch.dtype | None):
        # 1. load batch (a `hue_jitter` share with its hue rotated)
        x = to_unit(self.data.images[index]).to(self.device)
        if self.cfg.hue_jitter:
            jitter = torch.rand(len(x), generator=gen) < self.cfg.hue_jitter
            angle = torch.rand(len(x), generator=gen) * 2 * math.pi * jitter
            x = rotate_hue(x, angle.to(self.device))
        # 2. encode to the posterior N(mean, std^2)
        with _autocast(self.device, dtype), torch.set_grad_enabled(self.cfg.train_encoder):
            moments = self.model.encode(x).latent_dist.parameters
        mean, logvar = moments.float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        # 3. noise: reparameterised sample z = mean + std * eps; with `latent_noise`, + sigma n for the decoder
        eps = torch.randn(mean.shape, generator=gen).to(self.device)
        z = mean + (0.5 * logvar).exp() * eps
        if self.cfg.latent_noise:
            sigma = torch.rand(len(z), 1, 1, 1, generator=gen) * self.cfg.latent_noise
            z = z + (sigma * z.detach().std().cpu() * torch.randn(z.shape, generator=gen)).to(self.device)
        # 4. predict: decode
        with _autocast(self.device, dtype):
            recon = self.model.decode(z).sample.float()
        # 5. loss: object-weighted L1 + MSE, edge L1, KL per pixel value (SD's sum over pixels / 3HW)
        w = 1.0 + self.cfg.object_weight * object_mask(x)
        mse = F.mse_loss(recon, x)
        l1_w, mse_w = ((recon - x).abs() * w).mean(), ((recon - x).pow(2) * w).mean()
        kl = kl_to_standard_normal(mean, logvar).mean() / x[0].numel()
        loss = l1_w + self.cfg.mse_weight * mse_w + self.cfg.edge_weight * edge_l1(recon, x)
        loss = loss + self.cfg.kl_weight * kl
        return loss, {"psnr": psnr(mse.detach()).item(), "kl": kl.item()}

    @torch.no_grad()
    def scaling_factor(self, seed: int) -> float:
        """1 / std of posterior samples of up to `scale_images` training images."""
        count = min(len(self.data), self.cfg.scale_images)
        gen = torch.Generator().manual_seed(seed)
        samples = []
        for start in range(0, count, 256):
            x = to_unit(self.data.images[start : min(count, start + 256)]).to(self.device)
            dist = self.model.encode(x).latent_dist
            samples.append(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(self.device))
        return float(1.0 / torch.cat(samples).float().std())

    @torch.no_grad()
    def test_psnr(self, data_dir: Path) -> float | None:
        """Mean per-image PSNR (dB) of posterior-mean reconstructions of the test split, if there is one."""
        if not (data_dir / "test" / "metadata.jsonl").is_file():
            return None
        images = load_split(data_dir, "test").images
        values = []
        for start in range(0, len(images), 256):
            x = to_unit(images[start : start + 256]).to(self.device)
            recon = self.model.decode(self.model.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            values.append(psnr((recon - x).pow(2).flatten(1).mean(dim=1)))
        return float(torch.cat(values).mean())

    def save_final(self, folder: Path, data_dir: Path) -> dict:
        self.model.eval()
        factor = self.kept_factor or self.scaling_factor(seed=0)
        self.model.register_to_config(scaling_factor=factor)
        self.model.save_pretrained(folder)
        return {"scaling_factor": factor, "test_psnr_db": self.test_psnr(data_dir)}


def _init_config(stage: str, folder: Path) -> dict[str, Any]:
    """The config.json of the saved model folder a CLIP or VAE stage starts from (`init`)."""
    kind = "transformers CLIPModel" if stage == "clip" else "diffusers AutoencoderKL"
    if not (folder / "config.json").is_file():
        raise BoothError(f"{stage} init {folder} is not a {kind} folder (no config.json)")
    return json.loads((folder / "config.json").read_text())


def _folder_init_weights(stage: str, folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of a saved model folder, for the `init` of the CLIP (a `transformers` CLIPModel) or the
    VAE (a diffusers `AutoencoderKL`) stage."""
    if stage == "clip":
        from transformers import CLIPModel as loader
    else:
        from diffusers import AutoencoderKL as loader
    _init_config(stage, folder)
    return loader.from_pretrained(folder).state_dict()


def x0_weight(snr: torch.Tensor, gamma: float, floor: float = 0.0) -> torch.Tensor:
    """Loss weight in x_0 space: min(SNR, gamma) (Min-SNR-gamma, Hang et al. 2023) + floor.

    An epsilon loss weighs x_0 errors by SNR (Hang et al. 2023, eq. 5), so at high noise, where the layout
    of an image is decided, it barely cares where the object goes: SD's scaled-linear schedule ends at
    SNR 0.0047. ``floor = 1`` is the "SNR + 1" weighting of v-prediction (Salimans & Ho 2022), capped.
    Divide by SNR for the weight of an epsilon loss. Measured (2026-11-30, `tools/mini_position_tokens.py`:
    the shipped UNet conditioned on learned attribute tokens instead of text, 16 px latents): position
    right 17% after 400 steps at floor 0 (lr 1e-4), 92% after 1,000 steps at floor 1 (lr 3e-4; background
    94%); the shipped model, floor 0, is at chance (11%).
    """
    return snr.clamp(max=gamma) + floor


class Denoiser(torch.nn.Module):
    """What the UNet stage trains (and checkpoints, and averages): the UNet and the text encoder beside it.

    The text encoder starts as the mini-CLIP text tower; it trains only with
    `UNetTrainConfig.train_text_encoder` (else it is frozen and only rides along).

    With `UNetTrainConfig.readout_weight` it also holds `readout`: one linear head per caption part over the
    text encoder's token-averaged states (not exported). Why: at high noise the UNet's queries carry almost no
    image, cross-attention averages the 77 token states nearly uniformly, and 50-60 of those are padding whose
    (causal) states summarise the caption the way CLIP's pooled embedding does; the mini-CLIP never aligned
    position (zero-shot position at chance), so that average says where the object goes too faintly to learn
    from (2026-12-01: 1,000 steps with a fresh, position-aware text tower trainable at lr 1e-3: position 11%,
    background 100%). The heads make the average carry every part.
    """

    def __init__(
        self, unet: torch.nn.Module, text_encoder: torch.nn.Module, readout: dict[str, int] | None = None
    ):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        if readout:
            width = text_encoder.config.hidden_size
            self.readout = torch.nn.ModuleDict(
                {part: torch.nn.Linear(width, n) for part, n in readout.items()}
            )


def readout_classes(parts: tuple[str, ...], records: list[dict], styles: list[str]) -> dict[str, list[str]]:
    """The classes of each readout part: the caption parts' values, and the training set's concepts."""
    values = {part: list(v) for part, v in part_phrases(styles).items()}
    values["concept"] = sorted({r["concept"] for r in records})
    unknown = set(parts) - set(values)
    if unknown:
        raise BoothError(f"unknown readout parts {sorted(unknown)}: choose from {sorted(values)}")
    return {part: values[part] for part in parts}


class UNetTask:
    """UNet2DConditionModel: epsilon prediction with Min-SNR weights, CFG and caption-part dropout.

    With `train_text_encoder` the diffusion loss also fine-tunes the text encoder (initialised from the
    mini-CLIP text tower; the exported pipeline then holds the fine-tuned encoder and the mini-CLIP
    evaluator keeps its own towers). Contrastive training left the tower nearly blind to position words
    (captions differing only in position: hidden states at mean cosine 0.98, against 0.42-0.53 for
    background colour), so a frozen tower gives the UNet almost nothing to place objects by. Measured
    (2026-11-30): 1,000 steps continuing the shipped UNet with the encoder trainable and `snr_floor` 1
    moved that cosine only to 0.97 and position stayed at 16%; the same UNet conditioned instead on
    learned attribute tokens reached 92% (see `x0_weight`). Off in the "full" preset.
    """

    def __init__(
        self, config: TrainConfig, data: MiniData, device: torch.device, seed: int, work: Path, **cache: Any
    ):
        from diffusers import AutoencoderKL
        from transformers import CLIPModel, CLIPTokenizer

        for stage in ("clip", "vae"):
            if not is_finished(work, stage):
                raise BoothError(f"the {stage} stage is not finished in {work}; train it before the unet")
        self.cfg, self.data, self.device = config.unet, data, device
        clip = CLIPModel.from_pretrained(final_dir(work, "clip"))
        text_encoder = arch_mod.text_encoder_from_clip(clip).requires_grad_(self.cfg.train_text_encoder)
        self.tokenizer = CLIPTokenizer.from_pretrained(final_dir(work, "clip"))
        vae = AutoencoderKL.from_pretrained(final_dir(work, "vae"))
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_mean, self.latent_std = latent_cache(work, vae.to(device), data, **cache)
        self.noise = arch_mod.build_noise_scheduler()
        self.alphas_cumprod = self.noise.alphas_cumprod.to(device)
        unet = arch_mod.build_unet(config.arch.unet, config.arch.clip.text_width, seed=seed)
        styles = sorted({r["style"] for r in data.records})
        self.readout_values = readout_classes(self.cfg.readout_parts, data.records, styles)
        readout = {k: len(v) for k, v in self.readout_values.items()} if self.cfg.readout_weight else None
        if readout and not self.cfg.train_text_encoder:
            raise BoothError("readout_weight trains the text encoder: it needs train_text_encoder")
        self.model = Denoiser(unet, text_encoder, readout).to(device).train()
        self.model.text_encoder.train(self.cfg.train_text_encoder)
        self.max_length = config.arch.clip.max_length

    def encode_text(self, texts: list[str], dtype: torch.dtype | None) -> torch.Tensor:
        """The text encoder's last hidden state, captions padded to 77 tokens as at inference."""
        ids = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length)
        with torch.set_grad_enabled(self.cfg.train_text_encoder), _autocast(self.device, dtype):
            return self.model.text_encoder(torch.tensor(ids["input_ids"], device=self.device))[0]

    def loss(self, index: torch.Tensor, gen: torch.Generator, dtype: torch.dtype | None):
        # 1. load batch: cached posterior of each image, and a shortened caption (or "" for CFG)
        records = [self.data.records[i] for i in index.tolist()]
        parts = [sample_parts(self.cfg.captions, gen) for _ in records]
        texts = [record_caption(r, p) for r, p in zip(records, parts)]
        index = index.to(self.device)
        mean, std = self.latent_mean[index], self.latent_std[index]
        # 2. encode: sample the VAE posterior, scale to unit variance; text through the text encoder
        eps_z = torch.randn(mean.shape, generator=gen).to(self.device)
        latents = (mean + std * eps_z) * self.scaling_factor
        text = self.encode_text(texts, dtype)
        # 3. noise: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps with a per-channel offset (Guttenberg 2023)
        b, c = latents.shape[:2]
        offset = self.cfg.offset_noise * torch.randn(b, c, 1, 1, generator=gen)
        noise = (torch.randn(latents.shape, generator=gen) + offset).to(self.device)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (b,), generator=gen).to(self.device)
        noisy = self.noise.add_noise(latents, noise, t)
        # 4. predict the noise
        with _autocast(self.device, dtype):
            predicted = self.model.unet(noisy, t, encoder_hidden_states=text).sample.float()
        # 5. loss: Min-SNR-gamma weighted MSE, w = (min(SNR, gamma) + floor) / SNR for epsilon
        abar = self.alphas_cumprod[t]
        snr = abar / (1.0 - abar)
        weight = x0_weight(snr, self.cfg.min_snr_gamma, self.cfg.snr_floor) / snr
        per_sample = (predicted - noise).pow(2).flatten(1).mean(dim=1)
        loss, stats = (weight * per_sample).mean(), {"mse": per_sample.mean().item()}
        if self.cfg.readout_weight:
            single = [None if is_pair(r) else p for r, p in zip(records, parts)]  # the heads read one object
            readout, accuracy = self._readout_loss(text.float().mean(dim=1), records, single)
            loss = loss + self.cfg.readout_weight * readout
            stats["readout_acc"] = accuracy
        return loss, stats

    def _readout_loss(self, average: torch.Tensor, records: list[dict], parts) -> tuple[torch.Tensor, float]:
        """Mean cross-entropy of every named caption part read from the token-averaged text states."""
        return part_cross_entropy(
            self.readout_values,
            records,
            parts,
            lambda part, rows: self.model.readout[part](average[rows]),
            average,
        )

    def save_final(self, folder: Path, data_dir: Path) -> dict:
        self.model.eval().unet.save_pretrained(folder)  # the loop has copied the EMA weights in
        if self.cfg.train_text_encoder:
            self.model.text_encoder.save_pretrained(folder / TEXT_ENCODER)
        return {"text_encoder": "fine-tuned" if self.cfg.train_text_encoder else "mini-CLIP text tower"}


def latent_cache(
    work: Path, vae: Any, data: MiniData, dtype: torch.dtype | None = None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image under the frozen VAE (cached in unet/latents.pt).

    Encoded under the training precision (bf16 autocast: 4 ms an image here instead of 11 ms; its rounding,
    about 0.4% of a latent, is far below the smallest diffusion noise, sqrt(1 - abar_0) = 3%).
    """
    path = work / "unet" / "latents.pt"
    key = {
        "data": data.checksum,
        "vae": _sha256_file(final_dir(work, "vae") / "diffusion_pytorch_model.safetensors"),
        "precision": str(dtype),
    }
    device = next(vae.parameters()).device
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            return cached["mean"].to(device), cached["std"].to(device)
    vae.eval()
    means, stds = [], []
    bar = tqdm(range(0, len(data), 256), desc="booth-mini latents", unit="batch", disable=not progress)
    with torch.no_grad(), _autocast(device, dtype):
        for start in bar:
            dist = vae.encode(to_unit(data.images[start : start + 256]).to(device)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"key": key, "mean": mean, "std": std}, path)
    return mean.to(device), std.to(device)


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
    cfg = config.stage(stage)
    if stage == "clip":
        return ClipTask(config, data, device, seed)
    if stage in ("vae", "decoder"):
        return VaeTask(cfg, config.arch.vae, data, device, seed, stage_init(work, stage, cfg))
    return UNetTask(config, data, device, seed, work, dtype=dtype, progress=progress)


def stage_init(work: Path, stage: str, cfg: Any) -> Path | None:
    """The weights a fresh stage starts from: its `init`; for the decoder stage by default the ``vae``
    stage's autoencoder (BoothError while that is not finished)."""
    if cfg.init:
        return Path(cfg.init)
    if stage != "decoder":
        return None
    if not is_finished(work, "vae"):
        raise BoothError(f"the vae stage is not finished in {work}; train it before the decoder")
    return final_dir(work, "vae")


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

    @property
    def n(self) -> int:
        return len(self.task.data)


def _open_session(
    stage: str, data_dir: Path, work: Path, config: TrainConfig, device, seed: int, progress: bool
) -> _Session:
    """Load the data, build the task, optimizer (AdamW), LR schedule and EMA, and resume the checkpoint."""
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
    return session


def unet_checkpoint_weights(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The EMA (else the raw) weights of a UNet-stage checkpoint, per component: "unet", and "text_encoder"
    when the checkpoint is of the `Denoiser` (older checkpoints hold the UNet alone)."""
    weights = state.get("ema") or state["model"]
    if not any(k.startswith("unet.") for k in weights):
        return {"unet": weights}
    return {
        name: {k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(f"{name}.")}
        for name in ("unet", TEXT_ENCODER)
    }


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
            s.task.model.load_state_dict(_folder_init_weights(kind, path))
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
    try:
        for name in names:
            getattr(s.task.model, name).load_state_dict(parts[name])
            getattr(s.ema, name).load_state_dict(parts[name])
    except RuntimeError:  # missing, unexpected or differently shaped weights
        raise BoothError(f"unet init {path} has another architecture than this run's") from None


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
    loss, metrics = s.task.loss(index, step_generator(s.seed, s.stage, s.step), s.dtype)  # steps 1-5
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


def _chunk_record(s: _Session, first: int, started: float) -> dict:
    return {
        "event": "chunk",
        "start_step": first,
        "end_step": s.step,
        "wall_seconds": time.monotonic() - started,
        "device": str(s.device),
        "hardware": describe_hardware(s.device),
        "precision": "bf16 autocast" if s.dtype == torch.bfloat16 else "fp32",
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
) -> StageReport:
    """Train one stage for at most `minutes` (wall clock, setup included) and `steps` steps in this call.

    Continues from ``work_dir/<stage>/checkpoint.pt`` if present; when the stage reaches its configured
    total steps it saves ``final/`` and ``done.json``. A finished stage returns at once. `device` None
    picks CUDA when present.
    """
    started = time.monotonic()
    work = Path(work_dir)
    total = config.stage(stage).optim.steps
    if is_finished(work, stage):
        return StageReport(stage, total, total, 0, 0.0, True)
    s = _open_session(stage, Path(data_dir), work, config, device, seed, progress)
    first, last = s.step, None
    end = total if steps is None else min(total, s.step + max(0, steps))
    deadline = started + 60.0 * minutes if minutes is not None else math.inf
    bar = tqdm(total=total, initial=s.step, desc=f"booth-mini {stage}", unit="step", disable=not progress)
    with open(s.folder / LOG, "a") as log:
        while s.step < end and time.monotonic() < deadline:
            last = _train_step(s)
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
        )
        reports.append(report)
        if not report.finished:
            break
    return reports


def export_pipeline(work_dir: str | Path, out_dir: str | Path) -> Path:
    """Export a finished run as a diffusers folder + CLIP evaluator + model card (`booth.mini.export`)."""
    from booth.mini.export import export_pipeline as _export

    return _export(work_dir, out_dir)
