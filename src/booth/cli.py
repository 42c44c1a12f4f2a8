"""The `booth` command line.

Each subcommand parses its flags into a typed object (GenerationParams, ...) and calls the library; nothing
below this file sees argparse. User errors (`BoothError`) print one line and exit 2; there is no traceback
unless something is a bug.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from booth.errors import BoothError
from booth.fsutil import check_folders

GENERATE_EPILOG = """\
prompt syntax (A1111): (word) x1.1, ((word)) x1.21, [word] /1.1, (word:1.3), \\( literal, BREAK starts a new
77-token chunk, [from:to:when] prompt editing (when < 1 with a '.': fraction of steps; else a step),
[a|b] alternation every step, "cat AND dog:0.5" composable prompts, <lora:name:weight> extra networks.

examples:
  booth generate "a photo of a corgi, (sunset:1.2)" --steps 20 --seed 42
  booth generate "a cat" --model ./my-diffusers-folder --sampler "Euler a" --batch-size 4
  booth generate "a house" --model sd15.safetensors --init-image sketch.png --denoising-strength 0.6
  booth generate "a red apple" --init-image photo.png --mask mask.png --only-masked   # inpaint the white
  booth generate "a castle" --enable-hr --hr-scale 2 --hr-upscaler Latent --denoising-strength 0.6
  booth generate "a red|blue|big apple" --prompt-matrix
  booth generate "a dog" --xy "Steps" "10,20,30" --xy-y "CFG Scale" "3-9 (+3)"
  booth generate "a sks dog" --model sd15.safetensors --xy "Checkpoint name" "sd15.safetensors,runs/dog/model" \
      --xy-y VAE "None,vae-ft-mse.safetensors" --xy-z Styles "Oil,Cinematic" --styles-file styles.csv
  booth generate --prompts-file prompts.txt --model sd15.safetensors   # a job a line: a prompt, or --prompt .. --steps ..

Images are written to --out as 00000-<seed>.png (never overwriting) with A1111's `parameters` metadata.
"""


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    from booth.generate.controlnet import (
        CONTROL_MODES,
        PREPROCESSORS,
        RESIZE_MODES,
    )  # no torch: a quick parser
    from booth.generate.params import REFINER_PASSES

    g = p.add_argument_group("generation (names follow the A1111 API fields)")
    g.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="the prompt, in A1111 syntax (see below); none with --prompts-file",
    )
    g.add_argument(
        "--model",
        "-m",
        default=None,
        help="diffusers folder, .safetensors/.ckpt file or hub id (default: the bundled booth-mini)",
    )
    g.add_argument(
        "--vae",
        metavar="PATH",
        default=None,
        help="a VAE file (.safetensors/.pt/.ckpt) or diffusers VAE folder used instead of the model's own; "
        "default: <checkpoint>.vae.* beside a checkpoint if there is one (A1111's Automatic); 'none': the model's",
    )
    g.add_argument("--negative-prompt", "-n", default="", help="negative prompt (same syntax)")
    g.add_argument(
        "--style",
        action="append",
        default=[],
        metavar="NAME",
        help="merge this A1111 style into the prompt and negative prompt (repeatable; needs --styles-file)",
    )
    g.add_argument(
        "--styles-file",
        action="append",
        default=[],
        metavar="CSV",
        help="A1111 styles.csv (name,prompt,negative_prompt); '{prompt}' in a style marks where the prompt goes",
    )
    g.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    g.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    g.add_argument(
        "--sampler",
        default="DPM++ 2M",
        help="A1111 sampler name, e.g. 'Euler a', 'DPM++ 2M', "
        "'DDIM', legacy 'DPM++ 2M Karras' (see `booth samplers`)",
    )
    g.add_argument(
        "--schedule-type",
        default="Automatic",
        help="Automatic, Uniform, Karras, Exponential, SGM Uniform, Simple, Beta ... (see `booth samplers`)",
    )
    g.add_argument("--seed", type=int, default=-1, help="seed; image i uses seed+i; -1 = random (default)")
    g.add_argument("--subseed", type=int, default=-1, help="variation seed")
    g.add_argument("--subseed-strength", type=float, default=0.0, help="variation strength 0..1")
    g.add_argument(
        "--s-churn",
        type=float,
        default=0.0,
        help="Euler: stochastic churn (A1111 'Sigma churn'; default 0: off)",
    )
    g.add_argument("--s-tmin", type=float, default=0.0, help="churn only at sigma >= this (default 0)")
    g.add_argument(
        "--s-tmax", type=float, default=0.0, help="churn only at sigma <= this (default 0: no bound)"
    )
    g.add_argument("--s-noise", type=float, default=1.0, help="scale of the churn noise (default 1)")
    g.add_argument(
        "--s-min-uncond",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="A1111's Negative Guidance minimum sigma: below it every other step leaves the negative prompt "
        "out, half the UNet work (default 0: off)",
    )
    g.add_argument(
        "--s-min-uncond-all", action="store_true", help="... at every step below it, not every other"
    )
    g.add_argument(
        "--extra-noise",
        type=float,
        default=0.0,
        metavar="F",
        help="img2img and the hires pass start with this much more noise, 0-1 (A1111's Extra noise; default 0)",
    )
    g.add_argument(
        "--skip-early-cfg",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="A1111's Skip Early CFG: the first SHARE of each pass's steps without the negative prompt (0: off)",
    )
    g.add_argument(
        "--seed-resize-from",
        metavar="WxH",
        default=None,
        help="draw the noise at this size and centre it (A1111's 'Resize seed from'): keeps a seed's picture "
        "at another size",
    )
    g.add_argument("--width", "-W", type=int, default=None, help="width, a multiple of 8 (default: model's)")
    g.add_argument(
        "--height", "-H", type=int, default=None, help="height, a multiple of 8 (default: model's)"
    )
    g.add_argument("--batch-size", type=int, default=1, help="images per batch (default 1)")
    g.add_argument("--n-iter", type=int, default=1, help="batch count (default 1)")
    g.add_argument("--clip-skip", type=int, default=1, help="CLIP skip, 1 = last layer (default 1)")
    g.add_argument(
        "--emphasis",
        default="Original",
        choices=["Original", "No norm", "Ignore", "None"],
        help="how (x:1.2) weights apply: Original (A1111 mean restore), 'No norm', Ignore, None",
    )
    g.add_argument(
        "--guidance-rescale", type=float, default=0.0, help="phi of Lin et al. 2023, 0..1 (0: off)"
    )
    g.add_argument(
        "--dynamic-threshold",
        type=float,
        default=None,
        metavar="P",
        help="Imagen dynamic thresholding percentile, e.g. 0.995 (off by default)",
    )
    g.add_argument(
        "--dynamic-threshold-max",
        type=float,
        default=1.0,
        metavar="C",
        help="static range below which dynamic thresholding never clips (default 1.0)",
    )
    g.add_argument("--eta", type=float, default=None, help="eta for DDIM / ancestral samplers")
    g.add_argument(
        "--latent-couple",
        default=None,
        metavar="SETTINGS",
        help="a region per AND sub-prompt, as A1111's Latent Couple extension writes it: "
        "'divisions=1:1,1:2,1:2 positions=0:0,0:0,0:1 weights=0.2,0.8,0.8 end at step=20' (missing keys: "
        "these defaults)",
    )
    p.add_argument(
        "--tiling",
        action="store_true",
        help="seamless texture: opposite edges continue each other (A1111 Tiling)",
    )
    i = p.add_argument_group("img2img")
    i.add_argument(
        "--init-image",
        action="append",
        default=[],
        metavar="FILE",
        help="init image (img2img); a folder runs each picture in it (A1111's batch; --mask may be a folder of "
        "masks named as the pictures), writing <picture>-NNNNN-<seed>.png",
    )
    i.add_argument(
        "--denoising-strength", type=float, default=0.75, help="img2img and hires fix: 0..1 (default 0.75)"
    )
    i.add_argument(
        "--resize-mode",
        type=int,
        default=0,
        choices=[0, 1, 2, 3],
        help="0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale)",
    )
    i.add_argument("--img2img-fix-steps", action="store_true", help="run exactly --steps steps")
    i.add_argument(
        "--initial-noise-multiplier",
        metavar="F",
        type=float,
        default=1.0,
        help="scale the start noise (default 1)",
    )
    m = p.add_argument_group("inpainting (img2img with a mask: white is redrawn, black kept)")
    m.add_argument("--mask", metavar="FILE", help="the mask (L, RGB, or RGBA whose alpha is the mask)")
    m.add_argument(
        "--mask-blur",
        metavar="PX",
        type=int,
        default=None,
        help="Gaussian blur of the mask's edge in px (default 4)",
    )
    m.add_argument(
        "--inpainting-fill",
        default=None,
        metavar="MODE",
        help="what the masked area starts from: original (default), fill, 'latent noise', 'latent nothing' "
        "(or A1111's 0-3)",
    )
    m.add_argument(
        "--inpaint-full-res",
        "--only-masked",
        action="store_true",
        default=None,
        help="redraw only the mask's box, at the full size, and paste it back",
    )
    m.add_argument(
        "--inpaint-full-res-padding",
        metavar="PX",
        type=int,
        default=None,
        help="px around the mask's box (default 32)",
    )
    m.add_argument(
        "--inpainting-mask-invert", action="store_true", default=None, help="redraw what is not masked"
    )
    m.add_argument(
        "--image-cfg-scale",
        metavar="S",
        type=float,
        default=1.5,
        help="instruct-pix2pix models (8-channel UNets): how closely to keep to the picture (default 1.5)",
    )
    m.add_argument(
        "--depth-map",
        metavar="FILE",
        default=None,
        help="depth models (5-channel UNets, SD 2 depth): the depth map, white = near (default: estimated from "
        "the init image by the model folder's depth estimator)",
    )
    m.add_argument(
        "--inpainting-mask-weight",
        metavar="W",
        type=float,
        default=1.0,
        help="inpainting models (9-channel UNets): how much of the masked area their picture input hides, 0..1 "
        "(default 1)",
    )
    h = p.add_argument_group("hires fix (txt2img: generate, upscale, then img2img at the larger size)")
    h.add_argument("--enable-hr", "--hires-fix", action="store_true", help="run the hires pass")
    h.add_argument("--hr-scale", metavar="X", type=float, default=None, help="upscale factor (default 2)")
    h.add_argument(
        "--hr-upscaler",
        metavar="NAME",
        default=None,
        help="Latent (default), 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic antialiased)', "
        "'Latent (nearest)', 'Latent (nearest-exact)', a pixel resize: None, Lanczos, Nearest, or an ESRGAN-type "
        "model of --upscaler-dir by name ('R-ESRGAN 4x+', '4x-UltraSharp', ...)",
    )
    h.add_argument(
        "--upscaler-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of ESRGAN / Real-ESRGAN model files for --hr-upscaler (A1111's models/ESRGAN)",
    )
    h.add_argument(
        "--hr-second-pass-steps",
        "--hires-steps",
        metavar="N",
        type=int,
        default=None,
        help="steps of the pass (0: --steps)",
    )
    h.add_argument(
        "--hr-resize-x",
        metavar="PX",
        type=int,
        default=None,
        help="resize to this width instead of --hr-scale",
    )
    h.add_argument(
        "--hr-resize-y",
        metavar="PX",
        type=int,
        default=None,
        help="resize to this height instead of --hr-scale",
    )
    h.add_argument(
        "--hr-sampler", metavar="NAME", default=None, help="sampler of the pass (default: --sampler)"
    )
    h.add_argument(
        "--hr-schedule-type",
        metavar="NAME",
        default=None,
        help="schedule type of the pass (default: --schedule-type)",
    )
    h.add_argument(
        "--hr-prompt", metavar="TEXT", default=None, help="prompt of the pass (default: the prompt)"
    )
    h.add_argument(
        "--hr-negative-prompt",
        metavar="TEXT",
        default=None,
        help="negative prompt of the pass (default: the same)",
    )
    h.add_argument(
        "--hr-checkpoint",
        metavar="MODEL",
        default=None,
        help="another model of the same family for the hires pass (A1111's Hires checkpoint)",
    )
    h.add_argument(
        "--firstpass-image",
        metavar="FILE",
        default=None,
        help="a picture that stands for the first pass: hires fix upscales and redraws it (A1111's "
        "firstpass_image; its size is the first pass's unless --width / --height are given)",
    )
    c = p.add_argument_group(
        "ControlNet (a control picture guides the composition, A1111's ControlNet extension)"
    )
    c.add_argument(
        "--controlnet",
        metavar="MODEL",
        default=None,
        help="a ControlNet: a name in --controlnet-dir or a path",
    )
    c.add_argument(
        "--control-image", metavar="FILE", default=None, help="the control picture (edges, depth, pose ...)"
    )
    c.add_argument(
        "--control-module",
        default=None,
        choices=list(PREPROCESSORS),
        help="preprocessor of the control picture (default none: the picture is the map)",
    )
    c.add_argument("--control-weight", type=float, default=None, metavar="W", help="0-2 (default 1)")
    c.add_argument(
        "--control-start", type=float, default=None, metavar="F", help="share of the steps it starts at (0)"
    )
    c.add_argument(
        "--control-end", type=float, default=None, metavar="F", help="share of the steps it ends at (1)"
    )
    c.add_argument("--control-mode", default=None, choices=CONTROL_MODES, help="default Balanced")
    c.add_argument(
        "--control-resize-mode", default=None, choices=RESIZE_MODES, help="default Crop and Resize"
    )
    c.add_argument(
        "--controlnet-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of ControlNet models (A1111's models/ControlNet): files and diffusers folders",
    )
    r = p.add_argument_group("refiner (another model takes over the sampling part-way, A1111's Refiner)")
    r.add_argument(
        "--refiner", metavar="MODEL", default=None, help="the model of the same family that takes over"
    )
    r.add_argument(
        "--refiner-switch-at",
        type=float,
        metavar="F",
        default=None,
        help="the share of the sampling done when it takes over, 0-1 (default 0.8; by timestep reached)",
    )
    r.add_argument(
        "--refiner-switch-by-steps",
        action="store_true",
        default=None,
        help="count the share in sampling steps instead (A1111's option refiner_switch_by_sample_steps)",
    )
    r.add_argument(
        "--hires-refiner-pass",
        choices=REFINER_PASSES,
        default=None,
        help="with --enable-hr, the pass(es) the refiner takes part in (default: second pass)",
    )
    n = p.add_argument_group("LoRA (extra networks)")
    n.add_argument(
        "--lora-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder searched for <lora:NAME:w> (kohya .safetensors files, diffusers LoRA folders, booth runs)",
    )
    n.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="apply this LoRA file or folder with a weight (default 1); same as <lora:stem:WEIGHT> in the prompt",
    )
    n.add_argument(
        "--composable-lora",
        action="store_true",
        help="a <lora:...> tag acts only on the AND sub-prompt it is in, each sub-prompt guided against the "
        "negative prompt under its own LoRAs (A1111's Composable LoRA); with --latent-couple, each subject's "
        "LoRA in its own region",
    )
    n.add_argument(
        "--embeddings-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of textual-inversion embeddings (.safetensors/.pt/.bin, booth runs); an embedding is used "
        "where its trigger word (file name, or a diffusers file's token) appears in the prompt",
    )
    n.add_argument(
        "--custom-diffusion",
        action="append",
        default=[],
        metavar="PATH",
        help="apply a Custom Diffusion model (booth run or merge folder, .booth-cd.safetensors, diffusers folder); "
        "its modifier tokens (<new1>, ...) then work in the prompt",
    )
    s = p.add_argument_group("scripts")
    s.add_argument("--prompt-matrix", action="store_true", help="prompt matrix over the '|' parts")
    s.add_argument("--xy", nargs=2, metavar=("AXIS", "VALUES"), help="X axis, e.g. Steps '10,20,30'")
    s.add_argument("--xy-y", nargs=2, metavar=("AXIS", "VALUES"), help="Y axis for --xy")
    s.add_argument("--xy-z", nargs=2, metavar=("AXIS", "VALUES"), help="Z axis: an X/Y grid for each value")
    s.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="A1111's prompts from file: one job a line, a prompt or options (--prompt, --negative_prompt, "
        "--steps, --seed, --sd_model, --styles ...); '-' reads standard input",
    )
    s.add_argument(
        "--iterate-seed", action="store_true", help="with --prompts-file: the seed grows every line"
    )
    s.add_argument(
        "--same-seed", action="store_true", help="with --prompts-file: one random seed for all lines"
    )
    s.add_argument(
        "--prompts-position",
        choices=("start", "end"),
        default=None,
        help="with --prompts-file and a prompt: a line's prompt goes before it (start, default) or after it",
    )
    o = p.add_argument_group("output and runtime")
    o.add_argument("--out", "-o", default="outputs", help="output folder (default ./outputs)")
    o.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if present)")
    o.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="weights dtype (default float32 on CPU, float16 on CUDA)",
    )
    o.add_argument(
        "--vae-tiling",
        default="auto",
        choices=["auto", "on", "off"],
        help="decode / encode in tiles: auto (a picture that runs out of memory is done again in tiles, as "
        "ComfyUI does), on (always: large pictures in little memory), off",
    )
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="booth", description="Subject-driven text-to-image generation.")
    parser.add_argument("--version", action="version", version=f"booth {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="text-to-image / image-to-image like A1111",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=GENERATE_EPILOG,
        description="Generate images with A1111 prompt syntax, samplers, seeds and metadata.",
    )
    _add_generation_flags(gen)
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser(
        "png-info", help="show the generation parameters stored in an image (booth, A1111, ComfyUI, InvokeAI)"
    )
    info.add_argument("files", nargs="+", help="PNG/JPEG/WEBP files")
    info.add_argument("--json", action="store_true", help="print parsed parameters as JSON")
    info.add_argument(
        "--lora-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="rename the prompt's <lora:NAME:...> to your files with the same hash (A1111's paste)",
    )
    info.set_defaults(func=cmd_png_info)

    samplers = sub.add_parser("samplers", help="list sampler names and schedule types")
    samplers.set_defaults(func=cmd_samplers)

    from booth.generate.cards_cli import add_loras_command
    from booth.generate.upscale_cli import add_upscale_command

    add_loras_command(sub)
    add_upscale_command(sub)

    from booth.models.extract import add_extract_command
    from booth.models.merge import add_merge_checkpoints_command

    add_merge_checkpoints_command(sub)
    add_extract_command(sub)

    from booth.demo import add_demo_command
    from booth.evaluate.augment import add_augment_command
    from booth.evaluate.mini_bench import add_eval_commands
    from booth.server.cli import add_serve_command
    from booth.train.cli import add_train_command
    from booth.train.merge import add_merge_commands

    add_demo_command(sub)
    add_train_command(sub)
    add_merge_commands(sub)
    add_eval_commands(sub)
    add_augment_command(sub)
    add_serve_command(sub)

    from booth.mini.check import add_check_command
    from booth.mini.cli import add_data_commands
    from booth.mini.train_cli import add_train_commands

    mini = sub.add_parser("mini", help="booth-mini, the tiny default model: its data and training")
    mini_sub = mini.add_subparsers(dest="mini_command", metavar="COMMAND")
    add_data_commands(mini_sub)
    add_train_commands(mini_sub)
    add_check_command(mini_sub)
    mini.set_defaults(func=lambda args: mini.print_help() or 0)
    return parser


def _version() -> str:
    from booth import __version__

    return __version__


def _params_from_args(args) -> GenerationParams:  # noqa: F821 - imported lazily
    from booth.generate.params import GenerationParams

    if args.prompt is None and not args.prompts_file:
        raise BoothError("give a prompt (or --prompts-file FILE)")
    if args.prompts_file and (args.prompt_matrix or args.xy):
        raise BoothError("--prompts-file runs its own jobs: leave out --prompt-matrix and --xy")
    if (args.iterate_seed or args.same_seed or args.prompts_position) and not args.prompts_file:
        raise BoothError("--iterate-seed, --same-seed and --prompts-position go with --prompts-file")

    hires_flags = {  # GenerationParams field: the argparse dest of the flag that sets it
        "hr_scale": "hr_scale",
        "hr_upscaler": "hr_upscaler",
        "hr_second_pass_steps": "hr_second_pass_steps",
        "hr_resize_x": "hr_resize_x",
        "hr_resize_y": "hr_resize_y",
        "hr_sampler_name": "hr_sampler",
        "hr_scheduler": "hr_schedule_type",
        "hr_prompt": "hr_prompt",
        "hr_negative_prompt": "hr_negative_prompt",
        "hr_checkpoint_name": "hr_checkpoint",
        "firstpass_image": "firstpass_image",
    }
    hires = _gated_flags(args, hires_flags, args.enable_hr, "sets up the hires pass: add --enable-hr")
    if "firstpass_image" in hires:
        hires["firstpass_image"] = _open_image(hires["firstpass_image"], "first-pass image")
    refiner_flags = {
        "refiner_switch_at": "refiner_switch_at",
        "refiner_switch_by_sample_steps": "refiner_switch_by_steps",
        "hires_fix_refiner_pass": "hires_refiner_pass",
    }
    refiner = _gated_flags(
        args, refiner_flags, args.refiner is not None, "sets up the refiner: add --refiner"
    )
    if args.hires_refiner_pass is not None and not args.enable_hr:
        raise BoothError("--hires-refiner-pass picks a pass of hires fix: add --enable-hr")
    inpainting = _inpainting_from_args(args)
    control = _control_from_args(args)
    seed_resize = parse_wxh(args.seed_resize_from, "--seed-resize-from")
    init_images = [_open_image(path) for path in args.init_image]
    return GenerationParams(
        prompt=args.prompt or "",
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        sampler_name=args.sampler,
        scheduler=args.schedule_type,
        seed=args.seed,
        subseed=args.subseed,
        subseed_strength=args.subseed_strength,
        s_churn=args.s_churn,
        s_tmin=args.s_tmin,
        s_tmax=args.s_tmax,
        s_noise=args.s_noise,
        s_min_uncond=args.s_min_uncond,
        img2img_extra_noise=args.extra_noise,
        s_min_uncond_all=args.s_min_uncond_all,
        skip_early_cond=args.skip_early_cfg,
        seed_resize_from_w=seed_resize[0],
        seed_resize_from_h=seed_resize[1],
        width=args.width,
        height=args.height,
        batch_size=args.batch_size,
        n_iter=args.n_iter,
        eta=args.eta,
        clip_skip=args.clip_skip,
        emphasis=args.emphasis,
        guidance_rescale=args.guidance_rescale,
        dynamic_threshold=args.dynamic_threshold,
        dynamic_threshold_max=args.dynamic_threshold_max,
        latent_couple=args.latent_couple,
        composable_lora=args.composable_lora,
        tiling=args.tiling,
        init_images=init_images,
        denoising_strength=args.denoising_strength,
        resize_mode=args.resize_mode,
        img2img_fix_steps=args.img2img_fix_steps,
        initial_noise_multiplier=args.initial_noise_multiplier,
        inpainting_mask_weight=args.inpainting_mask_weight,
        image_cfg_scale=args.image_cfg_scale,
        depth_map=_open_image(args.depth_map, "depth map") if args.depth_map else None,
        enable_hr=args.enable_hr,
        **hires,
        refiner_checkpoint=args.refiner,
        **refiner,
        **inpainting,
        controlnet_units=control,
    ).validate()


def _gated_flags(args, flags: dict[str, str], enabled: bool, needs: str) -> dict:
    """The fields a group of flags sets (`flags`: field -> argparse dest), only the flags given; one of them
    given without the flag that enables the group is refused: "--<flag> <needs>"."""
    given = {field: getattr(args, dest) for field, dest in flags.items() if getattr(args, dest) is not None}
    if given and not enabled:
        raise BoothError(f"--{flags[next(iter(given))].replace('_', '-')} {needs}")
    return given


def _control_from_args(args) -> list:
    """The ControlNet unit the flags describe ([] without --controlnet, or --control-module reference_only, which
    needs no model); a unit flag alone is refused."""
    flags = {
        "image": "control_image",
        "module": "control_module",
        "weight": "control_weight",
        "guidance_start": "control_start",
        "guidance_end": "control_end",
        "control_mode": "control_mode",
        "resize_mode": "control_resize_mode",
    }
    from booth.generate.controlnet import REFERENCE_MODULES, ControlUnit

    reference = args.control_module in REFERENCE_MODULES  # runs on the UNet alone: no --controlnet
    enabled = args.controlnet is not None or reference
    given = _gated_flags(args, flags, enabled, "sets up a ControlNet unit: add --controlnet")
    if not enabled:
        return []
    if "image" not in given:
        raise BoothError("a ControlNet unit needs its control picture: add --control-image FILE")
    given["image"] = _open_image(given["image"], "control image")
    return [ControlUnit(args.controlnet or "None", **given)]


def _inpainting_from_args(args) -> dict:
    """The inpainting fields the flags set; a flag of them without --mask is refused."""
    from booth.generate.inpaint import FILL_MODES

    names = (
        "mask_blur",
        "inpainting_fill",
        "inpaint_full_res",
        "inpaint_full_res_padding",
        "inpainting_mask_invert",
    )
    flags = {name: name for name in names}
    given = _gated_flags(args, flags, args.mask is not None, "is an inpainting setting: add --mask FILE")
    if args.mask is None:
        return {}
    fields = {"mask": _open_image(args.mask, "mask", mode="RGBA")}
    if "mask_blur" in given:
        fields["mask_blur_x"] = fields["mask_blur_y"] = given.pop("mask_blur")
    if "inpainting_fill" in given:
        text = given.pop("inpainting_fill").strip().lower()
        by_name = {name: number for number, name in FILL_MODES.items()}
        if text not in by_name and text not in {str(k) for k in FILL_MODES}:
            raise BoothError(f"unknown inpainting fill {text!r}; valid: {', '.join(by_name)} (or 0-3)")
        fields["inpainting_fill"] = by_name[text] if text in by_name else int(text)
    return {**fields, **given}


def _open_image(path: str, what: str = "init image", mode: str = "RGB"):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except FileNotFoundError:
        raise BoothError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise BoothError(f"cannot read {what} {path}: {exc}") from None


def cmd_generate(args) -> int:
    from booth.generate.engine import Engine
    from booth.generate.output import ensure_writable_dir
    from booth.generate.progress import ProgressBar

    batch = _img2img_batch(args)
    styles = _styles(args)
    registry, tags = _lora_registry(args)

    def finish(job):
        """A job with the flags' styles and --lora tags merged in."""
        job = styles(job)
        return job.replace(prompt=job.prompt + "".join(tags)) if tags else job

    params = _params_from_args(_with_inputs(args, *batch[0]) if batch else args)
    if not args.prompts_file:
        params = finish(params)  # a prompts file's lines each get them when they run (`_run_script`)
    # Validate everything cheap before loading a model: sampler names, output folder.
    from booth.generate.samplers import resolve_sampler

    resolve_sampler(params.sampler_name, params.scheduler)
    from booth.devices import resolve_device, resolve_dtype

    device = str(resolve_device(args.device))
    dtype = resolve_dtype(args.dtype, device)
    upscalers = _upscalers(args, device, dtype)
    check_folders("--controlnet-dir", args.controlnet_dir)
    from booth.models.controlnet import ControlNets

    controlnets = ControlNets(args.controlnet_dir)
    if params.enable_hr:
        from booth.generate.hires import check_upscaler

        check_upscaler(params.hr_upscaler, upscalers)
    out = Path(args.out)
    ensure_writable_dir(out)
    embeddings = _embeddings(args)

    def load_engine(model: str | None) -> Engine:
        """`model` with everything the flags add: VAE, Custom Diffusion, embeddings, LoRAs, upscalers."""
        engine = Engine.from_model(
            model,
            device=device,
            dtype=dtype,
            extra_networks=registry,
            upscalers=upscalers,
            controlnets=controlnets,
        )
        engine.vae_tiling = args.vae_tiling
        vae = _vae_path(args, model)
        if vae is not None:
            engine.set_vae(vae)
        for path in args.custom_diffusion:
            from booth.train.formats.custom_diffusion import load_custom_diffusion

            load_custom_diffusion(engine.pipe, path)
        if embeddings:
            from booth.train.formats.embeddings import usable_embeddings

            engine.embeddings = usable_embeddings(embeddings, engine.pipe)  # A1111 skips another width's
        return engine

    engine = load_engine(args.model)
    side = _side_models(load_engine)
    _attach_side_models(side, engine, params, args.model)  # checked to be of the model's family at generate
    progress = None if args.no_progress else ProgressBar()
    if batch:
        saved = []
        for init, mask in batch:  # A1111's img2img batch: one job a picture, outputs named after it
            item = styles(_params_from_args(_with_inputs(args, init, mask))).replace(prompt=params.prompt)
            result = engine.generate(item, callback=progress.update if progress else None)
            saved += _save_result(result, out, prefix=f"{Path(init).stem}-")
        if progress:
            progress.close()
    elif args.prompt_matrix or args.xy or args.prompts_file:
        saved = _run_script(
            _CellEngines(engine, load_engine, args, side), params, args, out, progress, finish
        )
    else:
        result = engine.generate(params, callback=progress.update if progress else None)
        if progress:
            progress.close()
        saved = _save_result(result, out)
    for path in saved:
        print(path)
    return 0


def _lora_registry(args):
    """The extra-network registry with a LoRA handler over --lora-dir, and prompt tags for each --lora."""
    from booth.generate.networks import LoraNetwork
    from booth.prompts import ExtraNetworkRegistry

    files, tags = {}, []
    for spec in args.lora:
        path, _, weight = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
        if not Path(path).exists():
            raise BoothError(f"LoRA not found: {path}")
        try:
            weight = float(weight) if weight else 1.0
        except ValueError:
            raise BoothError(f"--lora {spec}: the weight after ':' must be a number") from None
        plain = Path(path).is_file() and Path(path).name != "pytorch_lora_weights.safetensors"
        name = (
            Path(path).stem
            if plain
            else Path(path).resolve().parent.name
            if Path(path).is_file()
            else Path(path).name
        )
        files[name] = Path(path)
        tags.append(f" <lora:{name}:{weight:g}>")
    check_folders("--lora-dir", args.lora_dir)
    return ExtraNetworkRegistry([LoraNetwork(args.lora_dir, files)]), tags


def _styles(args):
    """A function merging every --style (from the --styles-file CSVs, A1111's styles.csv) into params."""
    from booth.prompts.styles import apply_to_params, read_styles, select_styles

    if not args.style:
        if args.styles_file:
            read_styles(args.styles_file)  # a bad file fails even when no style is picked
        return lambda params: params
    chosen = select_styles(read_styles(args.styles_file), args.style)
    return lambda params: apply_to_params(params, chosen)


def parse_wxh(text: str | None, flag: str) -> tuple[int, int]:
    """WIDTHxHEIGHT as two ints; (-1, -1) for None."""
    if text is None:
        return -1, -1
    import re

    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if m is None:
        raise BoothError(f"{flag} {text!r}: expected WIDTHxHEIGHT, e.g. 512x768")
    return int(m.group(1)), int(m.group(2))


def _vae_path(args, model: str | None, vae: str | None = None) -> Path | None:
    """The VAE `model` runs with: `vae` (an X/Y cell's), else --vae: a file, "None" (the model's own) or
    "Automatic"; without either A1111's Automatic (a VAE named after the checkpoint, beside it)."""
    vae = vae if vae is not None else args.vae
    if vae is not None and vae.lower() != "automatic":
        return None if vae.lower() == "none" else Path(vae)
    from booth.models.vae import automatic_vae

    return automatic_vae(Path(model)) if model and Path(model).is_file() else None


def _side_models(load) -> SideModels:  # noqa: F821 - imported lazily
    """The hires checkpoints and refiners of `booth generate`'s jobs, keyed by path (`booth.generate.side_models`)."""
    from booth.generate.side_models import SideModels
    from booth.models.loading import DEFAULT_MODEL_NAME

    return SideModels(lambda role, key: load(None if key == DEFAULT_MODEL_NAME else key))


def _attach_side_models(side, engine, job, model: str | None) -> None:
    """Set `engine.hires_engine` and `engine.refiner_engine` for `job` run on `model` (None: booth-mini)."""
    from booth.generate.side_models import side_model_names
    from booth.models.loading import DEFAULT_MODEL_NAME

    engines = side.engines_for(side_model_names(job), model or DEFAULT_MODEL_NAME, engine)
    engine.hires_engine, engine.refiner_engine = engines["hires_engine"], engines["refiner_engine"]


class _CellEngines:
    """The engine each X/Y cell runs on: the --model engine, or (a "Checkpoint name" axis) another model,
    one loaded at a time, each with the cell's VAE (a "VAE" axis) or the flags' one, and the cell's hires
    checkpoint and refiner (`_SideModels`)."""

    def __init__(self, base, load, args, side):
        self.base, self.load, self.args, self.side = base, load, args, side
        self.other = None  # (model, Engine) of the last other checkpoint

    def check(self, job) -> None:
        """Refuse a cell's checkpoint, hires checkpoint, refiner or VAE that is not there, before anything is
        generated."""
        from booth.models.loading import DEFAULT_MODEL_NAME, classify_model

        settings = job.override_settings
        for model in (settings.get("sd_model_checkpoint"), job.hires_checkpoint(), job.refiner()):
            if model not in (None, "", DEFAULT_MODEL_NAME):
                classify_model(model)
        vae = settings.get("sd_vae")
        if vae and vae.lower() not in ("none", "automatic") and not Path(vae).exists():
            raise BoothError(f"VAE axis: {vae} not found")

    def engine_for(self, job):
        """The engine for `job`'s checkpoint ("booth-mini": the default model), its VAE set; the job without
        its override settings."""
        import gc

        from booth.models.loading import DEFAULT_MODEL_NAME

        settings = dict(job.override_settings)
        model = settings.pop("sd_model_checkpoint", None) or self.args.model
        model = None if model == DEFAULT_MODEL_NAME else model
        for engine in (self.base, self.other and self.other[1]):  # no stale hold on a side model
            if engine is not None:
                engine.hires_engine = engine.refiner_engine = None
        if model == self.args.model:
            engine = self.base
        else:
            if self.other is None or self.other[0] != model:
                self.other = None
                gc.collect()  # the previous other checkpoint goes before the next one loads
                self.other = (model, self.load(model))
            engine = self.other[1]
        engine.set_vae(_vae_path(self.args, model, settings.pop("sd_vae", None)))
        _attach_side_models(self.side, engine, job, model)
        return engine, job.replace(override_settings=settings)


def _upscalers(args, device, dtype):
    """The pixel upscalers hires fix may name: the built-ins and the models in every --upscaler-dir."""
    from booth.generate.upscale import Upscalers

    check_folders("--upscaler-dir", args.upscaler_dir)
    return Upscalers(args.upscaler_dir, device=device, dtype=dtype)


def _embeddings(args) -> dict:
    """Textual-inversion embeddings from every --embeddings-dir, by trigger word (A1111's embeddings folder)."""
    if not args.embeddings_dir:
        return {}
    from booth.train.formats.embeddings import load_embedding_dirs

    return load_embedding_dirs(args.embeddings_dir)


def _img2img_batch(args) -> list[tuple[str, str | None]] | None:
    """A1111's img2img batch: `--init-image FOLDER` (and `--mask` a folder of masks named as the pictures, or
    one mask for all) as (picture, mask) pairs in name order; None when no folder is given."""
    from booth.train.data import IMAGE_EXTENSIONS

    folders = [path for path in args.init_image if Path(path).is_dir()]
    if not folders:
        if args.mask and Path(args.mask).is_dir():
            raise BoothError(f"--mask {args.mask} is a folder: that needs --init-image FOLDER too")
        return None
    if len(args.init_image) > 1:
        raise BoothError("--init-image FOLDER (a batch) cannot be combined with other --init-image paths")
    if args.prompt_matrix or args.xy:
        raise BoothError("--init-image FOLDER (a batch) cannot be combined with --prompt-matrix or --xy")
    folder = Path(folders[0])
    pictures = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not pictures:
        raise BoothError(f"no pictures in {folder} (supported: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if not args.mask or not Path(args.mask).is_dir():
        return [(str(p), args.mask) for p in pictures]
    masks = {p.stem: p for p in sorted(Path(args.mask).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    missing = [p.name for p in pictures if p.stem not in masks]
    if missing:
        raise BoothError(
            f"no mask in {args.mask} for {len(missing)} picture(s), e.g. {missing[0]} (masks are named as the pictures)"
        )
    return [(str(p), str(masks[p.stem])) for p in pictures]


def _with_inputs(args, init: str, mask: str | None):
    """`args` with one picture (and its mask) in place of the batch's folders."""
    return argparse.Namespace(**{**vars(args), "init_image": [init], "mask": mask})


def _save_result(result, out: Path, prefix: str = "") -> list[Path]:
    from booth.generate.output import save_generated

    paths = []
    for image, seed, infotext in zip(result.images, result.seeds, result.infotexts):
        extra = {
            "params": result.params.to_dict(),
            "seed": seed,
            "model": result.model_name,
            "model_hash": result.model_hash,
        }
        paths.append(save_generated(image, out, seed, infotext, extra, prefix=prefix))
    return paths


def _run_script(engines: _CellEngines, params, args, out: Path, progress, finish) -> list[Path]:
    """Run --prompts-file, --prompt-matrix or the X/Y/Z plot; its pictures saved in job order, then its grid."""
    from booth.generate.noise import resolve_seed
    from booth.generate.output import save_generated
    from booth.generate.scripts import run_prompt_matrix, run_prompts_from_file, run_xy_grid

    results = {}  # id of the job a script handed over -> its result (jobs may run grouped by model)

    def generate(job):
        engine, run = engines.engine_for(finish(job) if args.prompts_file else job)
        result = engine.generate(run, callback=progress.update if progress else None)
        results[id(job)] = result
        return result.images

    styles = None
    if args.styles_file:
        from booth.prompts.styles import read_styles

        styles = read_styles(args.styles_file)
    if args.prompts_file:
        text = _read_prompts_file(args.prompts_file)
        script = run_prompts_from_file(
            text,
            params,
            generate,
            iterate_seed=args.iterate_seed,
            same_seed=args.same_seed,
            styles=styles,
            check=engines.check,
            prompt_position=args.prompts_position or "start",
        )
        label = f"Prompts from file: {args.prompts_file}"
        params = script.jobs[0]
    elif args.prompt_matrix:
        params = params.replace(seed=resolve_seed(params.seed))
        script = run_prompt_matrix(params, generate)
        label = f"Prompt matrix: {params.prompt}"
    else:
        params = params.replace(seed=resolve_seed(params.seed))
        (x_axis, x_values), (y_axis, y_values) = args.xy, (args.xy_y or (None, None))
        z_axis, z_values = args.xy_z or (None, None)
        if args.xy_z and not args.xy_y:
            raise BoothError("--xy-z needs --xy-y too")
        script = run_xy_grid(
            params,
            generate,
            x_axis,
            x_values,
            y_axis,
            y_values,
            z_axis=z_axis,
            z_values=z_values,
            styles=styles,
            check=engines.check,
        )
        label = f"X/Y/Z plot: {x_axis} x {y_axis or '-'}" + (f" x {z_axis}" if z_axis else "")
    if progress:
        progress.close()
    ordered = [results[id(job)] for job in script.jobs if id(job) in results]
    paths = [p for result in ordered for p in _save_result(result, out)]
    infotext = ordered[0].infotexts[0] if ordered and ordered[0].infotexts else ""
    grid_path = save_generated(script.grid, out, params.seed, infotext, {"script": label}, prefix="grid-")
    return [grid_path, *paths]


def _read_prompts_file(path: str) -> str:
    """The text of --prompts-file (standard input for '-')."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BoothError(f"--prompts-file {path}: no such file") from None
    except UnicodeDecodeError:
        raise BoothError(f"--prompts-file {path}: not UTF-8 text") from None


def cmd_png_info(args) -> int:
    import json

    from booth.generate.metadata import png_info_text, read_image_metadata
    from booth.generate.networks import LoraNetwork, remap_pasted_loras

    check_folders("--lora-dir", args.lora_dir)
    network = LoraNetwork(args.lora_dir) if args.lora_dir else None
    for path in args.files:
        meta = read_image_metadata(path)
        prompt = meta.parameters.get("Prompt") if isinstance(meta.parameters, dict) else None
        remapped = prompt
        if network is not None and isinstance(prompt, str):
            remapped = remap_pasted_loras(prompt, meta.parameters.get("Lora hashes"), network)
        if args.json:
            parameters = (
                dict(meta.parameters) if remapped == prompt else {**meta.parameters, "Prompt": remapped}
            )
            print(
                json.dumps(
                    {"file": path, "source": meta.source, "parameters": parameters},
                    ensure_ascii=False,
                    indent=2,
                )
            )
        else:
            if len(args.files) > 1:
                print(f"== {path}")
            print(png_info_text(path))
            if remapped != prompt:
                print(f"Prompt with your LoRAs: {remapped}")
    return 0


def cmd_samplers(args) -> int:
    from booth.generate.samplers import sampler_list, scheduler_list

    print("samplers:")
    for s in sampler_list():
        aliases = ", ".join(s.get("aliases", []))
        print(f"  {s['name']:<20} {aliases}")
    print("schedule types:")
    for s in scheduler_list():
        print(f"  {s['label']:<20} {s['name']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    _quiet_libraries()
    warnings.simplefilter("always", UserWarning)  # e.g. malformed prompt syntax; deduplicated when shown
    # huggingface_hub's notes on arguments diffusers still passes it are not the user's to act on
    warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
    _SHOWN_WARNINGS.clear()
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except BoothError as exc:
        print(f"booth: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # a file or folder the command could not read or write (permissions, a full disk, ...)
        print(f"booth: error: {_os_error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("booth: interrupted", file=sys.stderr)
        return 130


def _os_error_text(exc: OSError) -> str:
    """The error as one line, e.g. "No space left on device: runs/x/checkpoint.pt"."""
    if exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


_SHOWN_WARNINGS: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One line per distinct warning (a prompt is parsed at several places)."""
    text = str(message)
    if text not in _SHOWN_WARNINGS:
        _SHOWN_WARNINGS.add(text)
        print(f"booth: warning: {text}", file=sys.stderr)


def _quiet_libraries() -> None:
    """Library chatter (progress bars, deprecation notes) is not for booth's users."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for module in ("diffusers", "transformers", "huggingface_hub"):
        try:
            __import__(f"{module}.utils", fromlist=["logging"])
            utils = sys.modules[f"{module}.utils"]
            if hasattr(utils, "disable_progress_bars"):
                utils.disable_progress_bars()
            elif hasattr(utils, "logging") and hasattr(utils.logging, "disable_progress_bar"):
                utils.logging.disable_progress_bar()
        except ImportError:
            pass


if __name__ == "__main__":
    sys.exit(main())
