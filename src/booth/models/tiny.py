"""Tiny, randomly initialised Stable Diffusion pipelines built in-process, for tests and benchmarks.

Same classes and code paths as the real models (CLIP text encoder, KL autoencoder, conditional UNet,
DDPM-family scheduler), a few hundred thousand parameters, seeded, no network. Families: "sd1"
(epsilon, SD 1.x layout), "sd2" (v-prediction, OpenCLIP-style padding), "sdxl" (two text encoders).
"""

from __future__ import annotations

import torch

from booth.models.tokenizer import build_clip_tokenizer

TINY_MERGES = 1000  # a truncated CLIP BPE: 1,514 tokens, still tokenizes any prompt


def _text_encoder(tokenizer, hidden: int, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()


def _unet(cross_attention_dim: int, seed: int = 0, in_channels: int = 4, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
        **extra,
    ).eval()


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import PNDMScheduler

    # SD 1.x/2.x ship PNDM with the scaled-linear betas; the engine swaps in the requested sampler.
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_pipeline(
    family: str = "sd1", seed: int = 0, inpainting: bool = False, edit: bool = False, depth: bool = False
):
    """A tiny random diffusers pipeline of the given family ("sd1", "sd2", "sdxl" or "sdxl-refiner": SDXL's
    refiner, the second text encoder alone and an aesthetic score in its micro-conditioning); with `inpainting`, an
    inpainting model's (a 9-channel UNet: latents, mask, masked-image latents) in its inpainting pipeline class;
    with `edit` (SD 1.x / 2.x), an instruct-pix2pix model's (an 8-channel UNet: latents, picture latents); with
    `depth` (SD 1.x / 2.x), a depth model's (a 5-channel UNet: latents, depth map) with a tiny DPT estimator."""
    from diffusers import (
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    channels = 9 if inpainting else 8 if edit else 4
    if depth:
        return _depth_pipeline(family, seed)
    if family in ("sd1", "sd2"):
        tokenizer = build_clip_tokenizer(TINY_MERGES, pad_token="<|endoftext|>" if family == "sd1" else "!")
        prediction = "epsilon" if family == "sd1" else "v_prediction"
        from diffusers import StableDiffusionInstructPix2PixPipeline

        cls = (
            StableDiffusionInpaintPipeline
            if inpainting
            else StableDiffusionInstructPix2PixPipeline
            if edit
            else StableDiffusionPipeline
        )
        return cls(
            vae=_vae(seed),
            text_encoder=_text_encoder(tokenizer, 32, seed=seed),
            tokenizer=tokenizer,
            unet=_unet(32, seed=seed, in_channels=channels),
            scheduler=_scheduler(prediction),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl-refiner":
        from diffusers import StableDiffusionXLImg2ImgPipeline

        tok2 = build_clip_tokenizer(TINY_MERGES, pad_token="!")
        unet = _unet(
            32,
            seed=seed,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 5 * 8,  # pooled + original size, crop, aesthetic score
            transformer_layers_per_block=1,
        )
        return StableDiffusionXLImg2ImgPipeline(
            vae=_vae(seed),
            text_encoder=None,
            text_encoder_2=_text_encoder(tok2, 32, projection=True, seed=seed + 1),
            tokenizer=None,
            tokenizer_2=tok2,
            unet=unet,
            scheduler=_sdxl_scheduler(),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
    if family == "sdxl":
        tok1 = build_clip_tokenizer(TINY_MERGES)
        tok2 = build_clip_tokenizer(TINY_MERGES, pad_token="!")
        te1 = _text_encoder(tok1, 32, seed=seed)
        te2 = _text_encoder(tok2, 32, projection=True, seed=seed + 1)
        unet = _unet(
            64,
            seed=seed,
            in_channels=channels,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            transformer_layers_per_block=1,
        )
        scheduler = _sdxl_scheduler()
        cls = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline
        return cls(
            vae=_vae(seed),
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tok1,
            tokenizer_2=tok2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    raise ValueError(f"unknown tiny family {family!r}; choose sd1, sd2, sdxl or sdxl-refiner")


def _depth_pipeline(family: str, seed: int):
    """SD 2 depth's layout (StableDiffusionDepth2ImgPipeline) in miniature: its components plus a DPT depth
    estimator and its image processor."""
    from diffusers import StableDiffusionDepth2ImgPipeline
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    plain = tiny_pipeline(family, seed)
    torch.manual_seed(seed)
    config = DPTConfig(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        neck_hidden_sizes=[8, 8, 8, 8],
        fusion_hidden_size=8,
        backbone_out_indices=[0, 1, 2, 3],
    )
    processor = DPTImageProcessor(
        size={"height": 32, "width": 32}, keep_aspect_ratio=False, ensure_multiple_of=8
    )
    return StableDiffusionDepth2ImgPipeline(
        vae=plain.vae,
        text_encoder=plain.text_encoder,
        tokenizer=plain.tokenizer,
        unet=_unet(plain.unet.config.cross_attention_dim, seed=seed, in_channels=5),
        scheduler=plain.scheduler,
        depth_estimator=DPTForDepthEstimation(config).eval(),
        feature_extractor=processor,
    )


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
