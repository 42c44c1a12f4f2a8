"""``booth train``: flags -> `TrainConfig` -> `booth.train.train`. Nothing below this file sees argparse."""

from __future__ import annotations

import argparse
from pathlib import Path

TRAIN_EPILOG = """\
examples:
  booth train --method lora --images examples/poodle --instance-prompt "a sks poodle" --steps 300 --out runs/poodle
  booth train --method lora --images photos/ --instance-prompt "a sks dog" --class-prompt "a dog" \\
      --prior-preservation --num-class-images 100 --steps 800 --out runs/dog --model sd15.safetensors
  booth train --method dreambooth --images photos/ --instance-prompt "a sks dog" --steps 400 --out runs/db
  booth train ... --out runs/dog --resume          # continue an interrupted run exactly where it stopped
  accelerate launch -m booth train ...             # several GPUs (data parallel)

Outputs in --out: config.json (every setting), log.jsonl, loss.png, checkpoints/, validation/ and the weights:
LoRA: pytorch_lora_weights.safetensors (diffusers) + <name>.safetensors (kohya/A1111/ComfyUI);
DreamBooth: model/ (diffusers folder) [+ <name>.safetensors with --save-single-file].
Textual inversion: learned_embeds.safetensors (diffusers) + <placeholder>.safetensors (A1111/kohya):
  booth generate "a photo of sks" --embeddings-dir runs/ti
Custom diffusion: pytorch_custom_diffusion_weights.safetensors + <new1>.safetensors (diffusers loaders).
Use a LoRA with: booth generate "a sks dog on the beach <lora:NAME:0.8>" --lora-dir runs/dog
"""


def add_train_command(sub) -> None:
    p = sub.add_parser(
        "train",
        help="personalize a model on a subject's images (DreamBooth, LoRA)",
        description="Personalize a model on 3-20 images of a subject, with optional prior preservation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRAIN_EPILOG,
    )
    p.add_argument(
        "--method",
        choices=["dreambooth", "lora", "textual-inversion", "custom-diffusion"],
        default="lora",
        help="training method (default lora)",
    )
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="base model: diffusers folder, single file or hub id (default: booth-mini)",
    )
    p.add_argument(
        "--clip-skip",
        type=int,
        default=1,
        help="A1111's Clip skip for the captions (kohya --clip_skip; 2 for NovelAI-style anime models)",
    )
    p.add_argument(
        "--vae",
        metavar="PATH",
        default=None,
        help="a VAE file or folder instead of the base model's own (e.g. vae-ft-mse-840000-ema-pruned)",
    )
    p.add_argument("--out", "-o", required=True, help="output folder for this run")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--name", default=None, help="output name (LoRA file, <lora:NAME>); default: --out's name")

    d = p.add_argument_group("data")
    d.add_argument("--images", default=None, help="folder of subject images (+ optional <stem>.txt captions)")
    d.add_argument("--instance-prompt", default=None, help='identifier + class noun, e.g. "a sks dog"')
    d.add_argument(
        "--concepts",
        default=None,
        metavar="FILE.json",
        help="several concepts at once: a JSON list of {images, instance_prompt, class_prompt, class_images}",
    )
    d.add_argument("--resolution", type=int, default=None, help="training size (default: the model's native)")
    d.add_argument("--crop", choices=["center", "random"], default="center", help="crop (default center)")
    d.add_argument("--flip", action="store_true", help="random horizontal flips")
    d.add_argument("--buckets", action="store_true", help="aspect-ratio buckets instead of square crops")
    d.add_argument("--repeats", type=int, default=1, help="repeats of each image per epoch (default 1)")
    d.add_argument(
        "--shuffle-caption", action="store_true", help="shuffle each caption's tags every step (kohya)"
    )
    d.add_argument(
        "--keep-tokens", type=int, default=0, help="leading caption tags kept in place (default 0)"
    )
    d.add_argument(
        "--tag-dropout", type=float, default=0.0, help="drop each caption tag with this p (default 0)"
    )
    d.add_argument(
        "--caption-dropout", type=float, default=0.0, help="train with an empty caption with this p"
    )

    r = p.add_argument_group("prior preservation")
    r.add_argument(
        "--prior-preservation", action="store_true", help="add the class prior loss (needs --class-prompt)"
    )
    r.add_argument("--class-prompt", default=None, help='the class, e.g. "a dog"')
    r.add_argument(
        "--class-images", default=None, help="folder of real class images (default: generate them)"
    )
    r.add_argument("--num-class-images", type=int, default=100, help="generated class images (default 100)")
    r.add_argument("--prior-weight", type=float, default=1.0, help="lambda of the prior loss (default 1)")
    r.add_argument(
        "--prior-mode",
        choices=["class-images", "base-model"],
        default="class-images",
        help="class images in the batch (DreamBooth) or the frozen model's prediction as target",
    )
    r.add_argument(
        "--class-cache",
        default=None,
        help="cache of generated class images (default ~/.cache/booth/class-images)",
    )

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--rank", type=int, default=4, help="LoRA rank r (default 4)")
    lo.add_argument(
        "--alpha", type=float, default=None, help="LoRA alpha; scale = alpha / rank (default: rank)"
    )
    lo.add_argument("--lora-targets", default="to_k,to_q,to_v,to_out.0", help="UNet modules, comma-separated")
    lo.add_argument("--lora-text-encoder", action="store_true", help="also train a text-encoder LoRA")
    lo.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    lo.add_argument(
        "--init-lora",
        metavar="FILE",
        default=None,
        help="continue from this LoRA (kohya --network_weights; same --rank)",
    )
    lo.add_argument(
        "--lora-algo",
        choices=["lora", "loha", "lokr"],
        default="lora",
        help="lora (default), or LyCORIS loha / lokr (kohya's --network_args algo=...), saved as a LyCORIS file",
    )

    tk = p.add_argument_group("new tokens (textual inversion, custom diffusion)")
    tk.add_argument("--placeholder-token", default=None, help='new word, e.g. "<sks>" (TI) or "<new1>" (CD)')
    tk.add_argument("--initializer-token", default=None, help="word the new embedding starts from (e.g. dog)")
    tk.add_argument("--num-vectors", type=int, default=1, help="TI: vectors per placeholder (default 1)")
    tk.add_argument(
        "--learnable-property",
        choices=["object", "style"],
        default="object",
        help="TI: prompt templates for an object or a style (default object)",
    )
    tk.add_argument("--train-q-out", action="store_true", help="CD: also train cross-attention q and out")
    tk.add_argument("--no-augment", action="store_true", help="CD: no rescale/mask/size-word augmentation")
    tk.add_argument("--no-modifier-token", action="store_true", help="CD: do not learn a modifier token")

    o = p.add_argument_group("optimization")
    o.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    o.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the images instead of --steps (kohya --max_train_epochs)",
    )
    o.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: DreamBooth 5e-6, LoRA 1e-4, textual inversion 5e-3, custom diffusion 1e-5)",
    )
    o.add_argument(
        "--text-encoder-lr", type=float, default=None, help="text-encoder learning rate (default --lr)"
    )
    o.add_argument(
        "--lr-scheduler", default="constant", help="constant, linear, cosine, ... (default constant)"
    )
    o.add_argument("--warmup-steps", type=int, default=0, help="LR warm-up steps (default 0)")
    o.add_argument("--batch-size", type=int, default=1, help="instance images per step (default 1)")
    o.add_argument("--gradient-accumulation", type=int, default=1, help="micro-batches per step (default 1)")
    o.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default 1e-2)")
    o.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip gradients to this global norm; 0 = off (default 1, off with --fused-backward-pass)",
    )
    o.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes 8-bit AdamW (CUDA)")
    o.add_argument(
        "--fused-backward-pass",
        action="store_true",
        help="update each weight inside the backward pass as its gradient is ready: no whole-model gradients "
        "in memory (4 bytes per trained parameter less); no clipping or gradient accumulation",
    )
    o.add_argument(
        "--train-text-encoder", action="store_true", help="DreamBooth: fine-tune the text encoder too"
    )
    o.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR-gamma weighting (recommended 5)")
    o.add_argument("--noise-offset", type=float, default=0.0, help="offset-noise strength (e.g. 0.05)")
    o.add_argument(
        "--multires-noise-iterations",
        type=int,
        default=0,
        help="kohya's pyramid noise: iterations (e.g. 6; 0 off)",
    )
    o.add_argument("--multires-noise-discount", type=float, default=0.3, help="its discount (default 0.3)")
    o.add_argument(
        "--input-perturbation",
        "--ip-noise-gamma",
        type=float,
        default=0.0,
        help="input perturbation p (e.g. 0.1)",
    )
    o.add_argument("--debiased-estimation", action="store_true", help="loss weight 1/sqrt(SNR) (kohya)")
    o.add_argument("--ema-decay", type=float, default=None, help="save an EMA of the weights (e.g. 0.999)")
    o.add_argument("--seed", type=int, default=0, help="seed (default 0)")

    rt = p.add_argument_group("runtime")
    rt.add_argument(
        "--mixed-precision",
        choices=["auto", "no", "fp16", "bf16"],
        default="auto",
        help="auto: bf16/fp16 on GPU, fp32 on CPU",
    )
    rt.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    rt.add_argument("--no-cache-latents", action="store_true", help="encode images every step")
    rt.add_argument(
        "--checkpoint-every", type=int, default=100, help="checkpoint interval in steps (default 100)"
    )
    rt.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="also write the LoRA / model every N steps into steps/step-NNNNNN/ (kohya --save_every_n_steps)",
    )
    rt.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default 2)")
    rt.add_argument("--validation-prompt", action="append", default=[], help="sampled every --validate-every")
    rt.add_argument(
        "--validate-every", type=int, default=0, help="steps between validation grids (0: at the end)"
    )
    rt.add_argument(
        "--validation-images", type=int, default=2, help="images per validation prompt (default 2)"
    )
    rt.add_argument("--save-single-file", action="store_true", help="DreamBooth: also write one .safetensors")
    rt.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    rt.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_train)


def config_from_args(args: argparse.Namespace):
    from booth.train.config import (
        CustomDiffusionConfig,
        DataConfig,
        LoraConfig,
        LossConfig,
        OptimConfig,
        PriorConfig,
        TokenConfig,
        TrainConfig,
    )

    concepts = _concepts(args)
    tokens = TokenConfig(
        initializer=args.initializer_token,
        num_vectors=args.num_vectors,
        learnable_property=args.learnable_property,
    )
    if args.placeholder_token:
        tokens.placeholder = args.placeholder_token
    elif args.method == "custom-diffusion":
        tokens.placeholder = "<new1>"

    return TrainConfig(
        method=args.method,
        model=args.model,
        vae=args.vae,
        clip_skip=args.clip_skip,
        out=Path(args.out),
        name=args.name,
        steps=args.steps,
        epochs=args.epochs,
        seed=args.seed,
        concepts=concepts[1:],
        data=DataConfig(
            images=concepts[0].images,
            instance_prompt=concepts[0].instance_prompt,
            resolution=args.resolution,
            crop=args.crop,
            flip=args.flip,
            buckets=args.buckets,
            repeats=args.repeats,
            shuffle_caption=args.shuffle_caption,
            keep_tokens=args.keep_tokens,
            tag_dropout=args.tag_dropout,
            caption_dropout=args.caption_dropout,
        ),
        prior=PriorConfig(
            enabled=args.prior_preservation,
            mode=args.prior_mode,
            class_prompt=concepts[0].class_prompt,
            class_images=concepts[0].class_images,
            num_class_images=args.num_class_images,
            weight=args.prior_weight,
            cache_dir=Path(args.class_cache) if args.class_cache else None,
        ),
        lora=LoraConfig(
            rank=args.rank,
            alpha=args.alpha,
            unet_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
            text_encoder=args.lora_text_encoder,
            dropout=args.lora_dropout,
            algo=args.lora_algo,
            init=args.init_lora,
        ),
        optim=OptimConfig(
            lr=args.lr,
            text_encoder_lr=args.text_encoder_lr,
            scheduler=args.lr_scheduler,
            warmup_steps=args.warmup_steps,
            batch_size=args.batch_size,
            gradient_accumulation=args.gradient_accumulation,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            use_8bit_adam=args.use_8bit_adam,
            fused_backward_pass=args.fused_backward_pass,
        ),
        tokens=tokens,
        custom_diffusion=CustomDiffusionConfig(
            train_q_out=args.train_q_out,
            augment=not args.no_augment,
            modifier_token=not args.no_modifier_token,
        ),
        loss=LossConfig(
            snr_gamma=args.snr_gamma,
            noise_offset=args.noise_offset,
            multires_iterations=args.multires_noise_iterations,
            multires_discount=args.multires_noise_discount,
            input_perturbation=args.input_perturbation,
            debiased=args.debiased_estimation,
        ),
        train_text_encoder=args.train_text_encoder,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        cache_latents=not args.no_cache_latents,
        ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        validation_prompts=list(args.validation_prompt),
        validation_every=args.validate_every,
        validation_images=args.validation_images,
        save_single_file=args.save_single_file,
        device=args.device,
    )


def _concepts(args: argparse.Namespace):
    """The concepts of the run: --images/--instance-prompt/--class-prompt/--class-images, or --concepts."""
    import json

    from booth.errors import BoothError
    from booth.train.config import ConceptConfig

    if args.concepts is None:
        if not args.images or not args.instance_prompt:
            raise BoothError("pass --images and --instance-prompt (or --concepts FILE.json)")
        class_images = Path(args.class_images) if args.class_images else None
        return [ConceptConfig(Path(args.images), args.instance_prompt, args.class_prompt, class_images)]
    if args.images or args.instance_prompt:
        raise BoothError("--concepts replaces --images and --instance-prompt; pass one or the other")
    try:
        items = json.loads(Path(args.concepts).read_text())
    except OSError as error:
        raise BoothError(f"cannot read --concepts {args.concepts}: {error.strerror or error}") from None
    except ValueError as error:
        raise BoothError(f"--concepts {args.concepts} is not valid JSON: {error}") from None
    if not isinstance(items, list) or not items:
        raise BoothError(f"--concepts {args.concepts} must hold a non-empty JSON list of concepts")
    concepts, base = [], Path(args.concepts).parent
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "images" not in item or "instance_prompt" not in item:
            raise BoothError(f"--concepts entry {i + 1} needs at least 'images' and 'instance_prompt'")
        unknown = set(item) - {"images", "instance_prompt", "class_prompt", "class_images"}
        if unknown:
            raise BoothError(f"--concepts entry {i + 1} has unknown keys: {', '.join(sorted(unknown))}")
        images = base / item["images"]  # relative to the JSON file
        class_images = base / item["class_images"] if item.get("class_images") else None
        class_prompt = item.get("class_prompt") or args.class_prompt
        concepts.append(ConceptConfig(images, item["instance_prompt"], class_prompt, class_images))
    return concepts


def cmd_train(args: argparse.Namespace) -> int:
    from booth.train.loop import train

    config = config_from_args(args)
    result = train(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 0
