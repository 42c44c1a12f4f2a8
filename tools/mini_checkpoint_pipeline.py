"""Write a diffusers pipeline folder from a booth-mini run's UNet-stage checkpoint, to check it mid-run.

    python tools/mini_checkpoint_pipeline.py runs/mini11 runs/mini11-at-1000
    booth mini check --model runs/mini11-at-1000 --samples 100 --psnr-images 50 --speed-runs 1

The folder is the bundled booth-mini (tokenizer, scheduler, mini-CLIP evaluator) with the run's VAE
(``<work>/decoder/final`` once the decoder stage is done, else ``<work>/vae/final``), the checkpoint's EMA
UNet and its text encoder (an older, UNet-only checkpoint: the run's mini-CLIP text tower, as `booth mini
export` does). `booth mini export` writes a finished run; this tool is for the checkpoints in between.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from booth.mini.architecture import text_encoder_from_clip
from booth.mini.export import write_text_encoder
from booth.mini.train import final_dir, is_finished, unet_checkpoint_weights
from booth.models.loading import default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "work", type=Path, help="booth-mini run folder (with vae/final and unet/checkpoint.pt)"
    )
    parser.add_argument("out", type=Path, help="new pipeline folder")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    state = torch.load(args.work / "unet" / "checkpoint.pt", map_location="cpu", weights_only=True)
    parts = unet_checkpoint_weights(state)
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(default_model_path(), tmp)
    unet = UNet2DConditionModel.from_pretrained(tmp / "unet")
    unet.load_state_dict(parts["unet"])
    unet.to(torch.float16).save_pretrained(tmp / "unet")
    encoder = parts.get("text_encoder")
    if encoder:
        text = CLIPTextModel.from_pretrained(tmp / "text_encoder")
        text.load_state_dict(encoder)
    else:
        text = text_encoder_from_clip(CLIPModel.from_pretrained(final_dir(args.work, "clip")))
    write_text_encoder(text, tmp / "text_encoder")  # fp16 weights, a float32 config as the export writes
    vae_stage = "decoder" if is_finished(args.work, "decoder") else "vae"
    vae = AutoencoderKL.from_pretrained(final_dir(args.work, vae_stage))
    vae.to(torch.float16).save_pretrained(tmp / "vae")
    tmp.rename(args.out)
    print(
        f"wrote {args.out} (step {state['step']}, text encoder: {'checkpoint' if encoder else 'the run CLIP'}, "
        f"VAE: the {vae_stage} stage's)"
    )


if __name__ == "__main__":
    main()
