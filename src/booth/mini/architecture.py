"""booth-mini's three models as typed configs and builders: real Hugging Face / diffusers classes, just small.

- mini-CLIP (`transformers.CLIPModel`): a text transformer over a truncated CLIP BPE and a ViT on 64x64
  images (patch 8 -> 64 patches + CLS), trained image-text contrastively. Its text tower is copied into a
  `CLIPTextModel` that becomes the pipeline's text encoder, as Stable Diffusion conditions on CLIP; the whole
  CLIPModel ships as the mini world's evaluator (CLIP-I / CLIP-T scores, zero-shot concept and style).
- `diffusers.AutoencoderKL`: 64x64 RGB -> 16x16x4 latents (3 levels: downsampling factor 4).
- `diffusers.UNet2DConditionModel` on 16x16x4 latents, cross-attending to the text encoder's last hidden
  state (``cross_attention_dim`` = text width), with SD's DDPM scaled-linear betas (0.00085 -> 0.012, 1000
  steps) and epsilon prediction (SD 1.x's parameterisation, so every booth trainer and sampler exercised on
  booth-mini is the SD 1.5 code path).

Tokenizer: CLIP's BPE truncated to the first `ClipConfig.num_merges` = 4,000 merges (vocabulary 4,514).
Measured on the 200 concept names: 2.67 tokens a name on average (2,000 merges: 3.25; 6,000: 2.46; 8,000:
2.25); every colour, position and size word is 1-2 tokens, a full caption 25 tokens with BOS and EOS. 4,000 keeps the
embedding table (4,514 x 256 = 1.16 M parameters, stored twice: text encoder and CLIP) small enough that
the UNet gets the budget, while any prompt still tokenizes (BPE falls back to shorter pieces).

Sizes of the `full` configs (`parameter_counts`, fp16 = 2 bytes a parameter, MB = 10**6 bytes):

| model | config | parameters | fp16 |
|---|---|---|---|
| text encoder | width 256, 4 layers, 4 heads, MLP 1024, 77 tokens | 4.33 M | 8.7 MB |
| VAE | block_out_channels (32, 64, 128), 1 layer a block, 4 latent channels | 2.70 M | 5.4 MB |
| UNet | block_out_channels (64, 128, 128), 1 layer a block, heads (2, 4, 4) | 6.11 M | 12.2 MB |
| pipeline | | 13.14 M | 26.3 MB (budget 35) |
| mini-CLIP | the text tower above + ViT width 192, 4 layers, patch 8 + projections 256 | 6.28 M | 12.6 MB |
| all | | 19.42 M | 38.8 MB (budget 40) |

An exported folder of the full architecture measured 39.14 MB with tokenizers, configs and model card; it
generates a 64x64 image with 20 DPM-Solver++ steps and CFG in 0.56 s on 2 CPU threads here.

The 40 MB total is the binding limit: a UNet with a 256-channel lowest level (12.8 M) or (64, 128, 192)
(9.0 M) does not fit. Compute is dominated by the 16x16 level (64 channels, self-attention over 256
tokens), so the lower levels' width costs size, not time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# OpenAI CLIP's image normalisation (the CLIPImageProcessor defaults)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> the mini-CLIP's input: [0, 1] normalised by CLIP's mean and std."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def clip_processor_config(image_size: int) -> dict:
    """The `CLIPImageProcessor` config of the mini-CLIP (preprocessor_config.json): resize, crop, CLIP's
    mean and std."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
    }


SD_BETA_START, SD_BETA_END = 0.00085, 0.012  # Stable Diffusion's scaled-linear DDPM schedule
TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class ClipConfig:
    """mini-CLIP: text tower (becomes the text encoder) + ViT vision tower + projections.

    ``text_width`` is also the UNet's ``cross_attention_dim``. The learnable temperature starts at
    ``logit_scale_init`` = ln(1 / 0.07), as in CLIP (Radford et al. 2021).

    ``vision_position_scale``: the ViT's (still learnable) patch position embeddings start as 2-D sin-cos
    embeddings (MAE, He et al. 2022) times this factor (0: transformers' default N(0, 0.02)). With the default
    init the shipped mini-CLIP's pooled image features carried no position at all (a linear probe read the
    object's position at 10.6%, chance 11%, 2026-12-01): position embeddings at a tenth of the patch
    embeddings' norm never grew, the ViT became a bag of patches, and the text tower learned to ignore
    position words. 0.5 puts them at about the patch embeddings' norm.
    """

    num_merges: int = 4000
    max_length: int = 77
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_mlp: int = 1024
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 768
    projection_dim: int = 256
    logit_scale_init: float = 2.6592
    vision_position_scale: float = 0.5


@dataclass(frozen=True)
class VaeConfig:
    """`AutoencoderKL`: ``len(block_out_channels) - 1`` downsamplings (3 levels -> factor 4).

    `mid_attention`: the self-attention layer in the middle block of encoder and decoder (diffusers'
    ``mid_block_add_attention``; SD's VAE has it). At a 32x32 latent it attends over 1,024 positions and
    dominates the autoencoder's cost (measured: a training step of (32, 64) at batch 16, 1.26 s with it,
    0.72 s without).
    """

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    sample_size: int = 64
    mid_attention: bool = True


@dataclass(frozen=True)
class UNetConfig:
    """`UNet2DConditionModel` on the VAE's latents (``sample_size``: the latent side, which a pipeline's default
    image size is computed from).

    ``attention_heads`` is per level (diffusers' ``attention_head_dim`` argument, which SD configs use as the
    number of heads); (2, 4, 4) makes heads 32 wide. The lowest level (4x4) has no attention.
    """

    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    attention_heads: tuple[int, ...] = (2, 4, 4)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    norm_num_groups: int = 32
    sample_size: int = 16
    latent_channels: int = 4


@dataclass(frozen=True)
class MiniArchitecture:
    """The three model configs together (the text width ties CLIP to the UNet's cross-attention)."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)

    def __post_init__(self) -> None:
        unet = self.unet
        levels = len(unet.block_out_channels)
        if not levels == len(unet.down_block_types) == len(unet.up_block_types) == len(unet.attention_heads):
            raise ValueError(
                f"the UNet has {levels} levels: give as many down/up block types and attention heads"
            )
        if unet.sample_size != self.latent_size:
            raise ValueError(
                f"UNet sample_size {unet.sample_size} != the VAE's latent size {self.latent_size}"
            )

    @property
    def resolution(self) -> int:
        """Image side in pixels: the VAE's sample size."""
        return self.vae.sample_size

    @property
    def latent_size(self) -> int:
        """Latent side: resolution / 2 ** (levels - 1)."""
        return self.vae.sample_size // 2 ** (len(self.vae.block_out_channels) - 1)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator for weight initialisation; its state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tokenizer(config: ClipConfig):
    """The truncated CLIP BPE tokenizer (pads with EOS, as SD 1.x)."""
    from booth.models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(config.num_merges, model_max_length=config.max_length)


def vocab_size(config: ClipConfig) -> int:
    """Tokens of the truncated BPE: 256 bytes x 2 (plain and end-of-word) + merges + BOS/EOS."""
    return 512 + config.num_merges + 2


def text_config(config: ClipConfig):
    """The `CLIPTextConfig` shared by the CLIP text tower and the pipeline's `CLIPTextModel`."""
    from transformers import CLIPTextConfig

    vocab = vocab_size(config)
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=config.text_width,
        intermediate_size=config.text_mlp,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length,
        projection_dim=config.projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )


def pooled(features) -> torch.Tensor:
    """The embedding of a CLIP `get_image_features` / `get_text_features` call: transformers 5 may return a
    ModelOutput (its ``pooler_output``), older versions the tensor itself."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def build_clip(config: ClipConfig, seed: int = 0):
    """A freshly initialised mini-CLIP (`transformers.CLIPModel`)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=config.vision_width,
        intermediate_size=config.vision_mlp,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.projection_dim,
        hidden_act="quick_gelu",
    )
    full = CLIPConfig(
        text_config=text_config(config).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init,
    )
    with seeded(seed):
        model = CLIPModel(full)
    if config.vision_position_scale:
        grid = config.image_size // config.patch_size
        table = model.vision_model.embeddings.position_embedding.weight
        with torch.no_grad():
            table[0].zero_()  # the class token's slot
            table[1:] = config.vision_position_scale * sincos_2d(grid, config.vision_width)
    return model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """2-D sin-cos position embeddings of a grid x grid patch raster, row-major: [grid², dim] (MAE, He et al.
    2022): half the channels encode the row, half the column, each as sin / cos at dim / 4 frequencies."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def text_encoder_from_clip(clip):
    """A `CLIPTextModel` holding a copy of `clip`'s text tower (same config, same weights)."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())  # transformers 5: CLIPModel.text_model is one
    return encoder.eval()


def build_vae(config: VaeConfig, seed: int = 0):
    """A freshly initialised `AutoencoderKL` (scaling_factor 1.0 until training measures it)."""
    from diffusers import AutoencoderKL

    levels = len(config.block_out_channels)
    with seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            latent_channels=config.latent_channels,
            norm_num_groups=config.norm_num_groups,
            sample_size=config.sample_size,
            scaling_factor=1.0,
            mid_block_add_attention=config.mid_attention,
        )


def build_unet(config: UNetConfig, cross_attention_dim: int, seed: int = 0):
    """A freshly initialised `UNet2DConditionModel`."""
    from diffusers import UNet2DConditionModel

    with seeded(seed):
        return UNet2DConditionModel(
            sample_size=config.sample_size,
            in_channels=config.latent_channels,
            out_channels=config.latent_channels,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            down_block_types=config.down_block_types,
            up_block_types=config.up_block_types,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=config.attention_heads,
            norm_num_groups=config.norm_num_groups,
        )


def build_noise_scheduler():
    """The training noise schedule: SD's DDPM with scaled-linear betas, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_start=SD_BETA_START,
        beta_end=SD_BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
    )


def build_inference_scheduler():
    """The shipped scheduler: DPM-Solver++ 2M (Lu et al. 2022) on the same betas, good at 20 steps."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_start=SD_BETA_START,
        beta_end=SD_BETA_END,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        steps_offset=1,  # SD's convention; diffusers warns and patches a config without it
    )


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def parameter_counts(arch: MiniArchitecture) -> dict[str, int]:
    """Parameters of each model, built on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        clip = build_clip(arch.clip)
        return {
            "text_encoder": count_parameters(clip.text_model),
            "vae": count_parameters(build_vae(arch.vae)),
            "unet": count_parameters(build_unet(arch.unet, arch.clip.text_width)),
            "clip": count_parameters(clip),
        }


def fp16_megabytes(counts: dict[str, int]) -> dict[str, float]:
    """fp16 weight size (MB = 10**6 bytes) per model plus "pipeline" and "total" (pipeline + CLIP)."""
    sizes = {name: 2 * n / 1e6 for name, n in counts.items()}
    sizes["pipeline"] = sizes["text_encoder"] + sizes["vae"] + sizes["unet"]
    sizes["total"] = sizes["pipeline"] + sizes["clip"]
    return sizes
