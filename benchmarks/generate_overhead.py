"""Generation overhead of booth's engine over the diffusers pipeline it wraps.

Runs booth `Engine.generate` and diffusers `StableDiffusionPipeline.__call__` side by side on the same model,
sampler (Euler), steps, size and batch, interleaved, and prints the median time of each and their ratio
(goal: booth / diffusers <= 1.05).

    python benchmarks/generate_overhead.py                 # tiny + small random models, CPU
    python benchmarks/generate_overhead.py --model DIR     # any diffusers folder / single file
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def small_pipeline():
    """A random SD-1.x-shaped pipeline, smaller than SD 1.5 (channels 128/256/512, 2 layers) for CPU timing.

    Its VAE downsamples by 8 like SD's, so 256 px images are 32x32 latents.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from booth.models.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    torch.manual_seed(0)
    pipe.vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
    ).eval()
    pipe.vae_scale_factor = 8
    pipe.image_processor.config.vae_scale_factor = 8
    pipe.unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(128, 256, 512),
        layers_per_block=2,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    ).eval()
    return pipe


def measure(name, pipe, steps, size, batch, repeats):
    from diffusers import EulerDiscreteScheduler

    from booth.generate.engine import Engine
    from booth.generate.params import GenerationParams
    from booth.models.families import detect_family
    from booth.models.loading import LoadedModel

    engine = Engine(LoadedModel(pipe=pipe, family=detect_family(pipe), name=name, path=None, hash=None))
    params = GenerationParams(
        prompt="a photo of a red apple on a table",
        negative_prompt="blurry",
        steps=steps,
        cfg_scale=7.0,
        sampler_name="Euler",
        scheduler="Automatic",
        seed=1,
        width=size,
        height=size,
        batch_size=batch,
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run_booth():
        engine.generate(params)

    def run_diffusers():
        gens = [torch.Generator().manual_seed(1 + i) for i in range(batch)]
        pipe(
            params.prompt,
            negative_prompt=params.negative_prompt,
            num_inference_steps=steps,
            guidance_scale=7.0,
            height=size,
            width=size,
            num_images_per_prompt=batch,
            generator=gens,
        )

    run_booth(), run_diffusers()  # warm-up
    times = {"booth": [], "diffusers": []}
    for _ in range(repeats):
        for label, fn in (("booth", run_booth), ("diffusers", run_diffusers)):
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    b, d = statistics.median(times["booth"]), statistics.median(times["diffusers"])
    print(
        f"{name:<8} steps={steps} size={size} batch={batch}  booth {b:.3f}s  diffusers {d:.3f}s  "
        f"ratio booth/diffusers = {b / d:.3f}"
    )
    return b / d


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="diffusers folder / single file (default: random models)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--only", choices=["tiny", "small"], default=None, help="run one of the random models"
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.model:
        from booth.models.loading import load_pipeline

        loaded = load_pipeline(args.model)
        measure(loaded.name, loaded.pipe, args.steps, loaded.family.default_size, args.batch, args.repeats)
        return
    from booth.models.tiny import tiny_pipeline

    if args.only in (None, "tiny"):
        measure("tiny", tiny_pipeline("sd1"), args.steps, 64, args.batch, args.repeats)
    if args.only in (None, "small"):
        measure("small", small_pipeline(), args.steps, 256, args.batch, args.repeats)


if __name__ == "__main__":
    main()
