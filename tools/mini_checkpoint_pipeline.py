"""Write a diffusers pipeline folder from a booth-mini run's UNet-stage checkpoint, to check it mid-run.

    python tools/mini_checkpoint_pipeline.py runs/mini11 runs/mini11-at-1000
    booth mini check --model runs/mini11-at-1000 --samples 100 --psnr-images 50 --speed-runs 1

The folder is the bundled booth-mini (tokenizer, scheduler, mini-CLIP evaluator) with the run's VAE
(``<work>/vae/final``) and the checkpoint's EMA UNet and text encoder (the encoder only when the run trains
it; else the run's mini-CLIP text tower stays, as in the bundled model). `booth mini export` does this for a
finished run; this tool is for the checkpoints in between.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

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
    from transformers import CLIPTextModel

    state = torch.load(args.work / "unet" / "checkpoint.pt", map_location="cpu", weights_only=True)
    ema = state["ema"]
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(default_model_path(), tmp)
    unet = UNet2DConditionModel.from_pretrained(tmp / "unet")
    unet.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})
    unet.to(torch.float16).save_pretrained(tmp / "unet")
    encoder = {k[13:]: v for k, v in ema.items() if k.startswith("text_encoder.")}
    if encoder:
        text = CLIPTextModel.from_pretrained(tmp / "text_encoder")
        text.load_state_dict(encoder)
        text.to(torch.float16).save_pretrained(tmp / "text_encoder")
    vae = AutoencoderKL.from_pretrained(args.work / "vae" / "final")
    vae.to(torch.float16).save_pretrained(tmp / "vae")
    tmp.rename(args.out)
    print(f"wrote {args.out} (step {state['step']}, text encoder: {'checkpoint' if encoder else 'bundled'})")


if __name__ == "__main__":
    main()
