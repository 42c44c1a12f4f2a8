"""Export a finished booth-mini training run as a standard diffusers `StableDiffusionPipeline` folder.

`export_pipeline(work_dir, out_dir)` writes, atomically (built beside `out_dir`, then renamed)::

    out_dir/
      model_index.json                StableDiffusionPipeline, safety_checker None, requires_safety_checker False
      text_encoder/                   CLIPTextModel: a copy of mini-CLIP's text tower
      tokenizer/                      CLIPTokenizer files (vocab.json, merges.txt, ...): the truncated CLIP BPE
      unet/ vae/                      UNet2DConditionModel (EMA weights), AutoencoderKL (measured scaling_factor;
                                      the decoder stage's when the run has one)
      scheduler/                      DPMSolverMultistepScheduler (DPM-Solver++ 2M) on SD's scaled-linear betas
      clip/                           the mini-CLIP evaluator: CLIPModel + tokenizer + CLIPImageProcessor config
      README.md                       model card: data, sizes, training time and hardware (from the logs)
      training.json                   the run's configuration and seed (work/config.json) and its dataset's
                                      manifest and checksums: what `booth.mini.train.TrainConfig` trained
      ATTRIBUTION.md                  licences and attribution of the training art

Weights are fp16 safetensors. The transformers configs say ``"dtype": "float32"``: transformers 5 loads a
model in its config's dtype by default, and a plain ``StableDiffusionPipeline.from_pretrained(path)`` must
get the fp32 text encoder that its fp32 UNet expects on a CPU (pass ``torch_dtype=torch.float16`` for
fp16). The text encoder's tensors are named ``text_model.*`` as in SD 1.x, which transformers 4 and 5 load.
`clip/` is not in model_index.json, so diffusers ignores it; load it with ``CLIPModel.from_pretrained``.

`export_checkpoint(work_dir, out_dir)` writes the same folder from the UNet stage's latest checkpoint of a run
still training (its EMA weights), to look at or check a run mid-way; its README says which step it holds.
An existing `out_dir` is replaced only when it is a pipeline folder (it has a model_index.json).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from booth import fsutil
from booth.errors import BoothError
from booth.fsutil import atomic_folder
from booth.mini import architecture as arch_mod
from booth.mini.train import (
    CHECKPOINT,
    CONFIG_FILE,
    DATASET_FILE,
    DONE,
    PRESETS,
    TEXT_ENCODER,
    TrainConfig,
    final_dir,
    is_finished,
    read_done,
    read_log,
    unet_checkpoint_weights,
)
from booth.models.tokenizer import write_clip_tokenizer_files

COMPONENTS = ("text_encoder", "vae", "unet")
SPLIT_ORDER = ("train", "test", "novel", "pairs")


def export_pipeline(work_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the trained pipeline + CLIP evaluator + model card from `work_dir` into `out_dir` (replaced)."""
    work, out = Path(work_dir), Path(out_dir)
    missing = [stage for stage in run_config(work).stages if not is_finished(work, stage)]
    if missing:
        raise BoothError(
            f"cannot export {work}: stage(s) {', '.join(missing)} not finished (booth mini train)"
        )
    check_replaceable(out)
    with atomic_folder(out) as tmp:
        _write_pipeline(work, tmp, load_trained_pipeline(work))
        (tmp / "README.md").write_text(model_card(work, tmp))
    return out.resolve()


def export_checkpoint(work_dir: str | Path, out_dir: str | Path) -> tuple[Path, int]:
    """Write a pipeline folder from the UNet stage's latest checkpoint of `work_dir` (a run still training):
    its EMA UNet and text encoder (a UNet-only checkpoint: the run's mini-CLIP text tower), the run's
    autoencoder (the decoder stage's once that is done), the CLIP evaluator and training.json. Returns the
    folder and the checkpoint's step."""
    work, out = Path(work_dir), Path(out_dir)
    path = work / "unet" / CHECKPOINT
    if not path.is_file():
        raise BoothError(f"{work} has no UNet checkpoint ({path}); train the unet stage first")
    missing = [stage for stage in ("clip", "vae") if not is_finished(work, stage)]
    if missing:
        raise BoothError(
            f"cannot export {work}: stage(s) {', '.join(missing)} not finished (booth mini train)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        parts = unet_checkpoint_weights(state)
    except Exception as error:  # a truncated or foreign file: pickle, zip and key errors alike
        raise BoothError(f"cannot read {path} as a UNet-stage checkpoint: {error}") from None
    check_replaceable(out)
    config = run_config(work)
    vae_stage = config.vae_stage if is_finished(work, config.vae_stage) else "vae"
    pipe = _assemble_pipeline(work, vae_stage)
    pipe.unet.load_state_dict(parts["unet"])
    if TEXT_ENCODER in parts:
        pipe.text_encoder.load_state_dict(parts[TEXT_ENCODER])
    step, total = state["step"], config.unet.optim.steps
    encoder = "the checkpoint's" if TEXT_ENCODER in parts else "the run's mini-CLIP text tower"
    with atomic_folder(out) as tmp:
        _write_pipeline(work, tmp, pipe, checkpoint_step=step)
        (tmp / "README.md").write_text(
            f"# booth-mini checkpoint: step {step} of {total}\n\n"
            f"The UNet stage's checkpoint of the run in `{work}` at step {step} of {total} (EMA weights; text "
            f"encoder: {encoder}; autoencoder: the {vae_stage} stage's), written by `booth mini export "
            "--checkpoint` to look at a run mid-way. Not a finished run: `booth mini export` writes that, with "
            "its model card.\n"
        )
    return out.resolve(), step


def check_replaceable(out: Path) -> None:
    """An export replaces `out` whole: refuse a folder that holds anything but a pipeline."""
    fsutil.check_replaceable(out, "model_index.json", "a diffusers pipeline folder")


def _write_pipeline(work: Path, tmp: Path, pipe: Any, checkpoint_step: int | None = None) -> None:
    """The pipeline's components (fp16), tokenizer, scheduler defaults, CLIP evaluator, training.json and
    ATTRIBUTION.md into `tmp`: everything an export writes but its README."""
    run = json.loads((work / CONFIG_FILE).read_text())
    num_merges = run["config"]["arch"]["clip"]["num_merges"]
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    write_scheduler_defaults(tmp / "scheduler")
    write_text_encoder(pipe.text_encoder, tmp / "text_encoder")
    _write_tokenizer(tmp / "tokenizer", num_merges)
    write_clip(final_dir(work, "clip"), tmp / "clip", num_merges)
    dataset = json.loads((work / DATASET_FILE).read_text())
    (tmp / "ATTRIBUTION.md").write_text(dataset.get("attribution", ""))
    training = {**run, "dataset": {k: v for k, v in dataset.items() if k != "attribution"}}
    if checkpoint_step is not None:
        training["checkpoint_step"] = checkpoint_step
    (tmp / "training.json").write_text(json.dumps(training, indent=2) + "\n")


# Stable Diffusion's own scheduler config names these (SD 1.5: PNDM with clip_sample / set_alpha_to_one false,
# skip_prk_steps true). DPM-Solver ignores them, but a user who swaps in `DDIMScheduler.from_config(...)` or
# `PNDMScheduler.from_config(...)` otherwise gets diffusers' defaults, which clip x_0 to [-1, 1] (latents are
# unit-variance) and run PRK warm-up steps.
SCHEDULER_DEFAULTS = {"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}


def write_scheduler_defaults(folder: Path) -> None:
    """Add `SCHEDULER_DEFAULTS` to the scheduler config in `folder` (the values other schedulers read)."""
    _update_json(folder / "scheduler_config.json", SCHEDULER_DEFAULTS)


def _update_json(path: Path, values: dict[str, Any]) -> None:
    """Set `values` in the JSON object stored at `path` (keys sorted, as diffusers writes configs)."""
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def run_config(work: Path) -> TrainConfig:
    """The configuration of the run a work folder pins (its config.json)."""
    return TrainConfig.from_json(json.loads((work / CONFIG_FILE).read_text())["config"])


def load_trained_pipeline(work_dir: str | Path):
    """The fp32 `StableDiffusionPipeline` of a finished run.

    The text encoder is the one the UNet stage fine-tuned (``unet/final/text_encoder``) when it trained one,
    else a copy of the mini-CLIP text tower; the autoencoder is the run's `TrainConfig.vae_stage`'s.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    work = Path(work_dir)
    tuned = final_dir(work, "unet") / TEXT_ENCODER
    return _assemble_pipeline(
        work,
        run_config(work).vae_stage,
        unet=UNet2DConditionModel.from_pretrained(final_dir(work, "unet")),
        text_encoder=CLIPTextModel.from_pretrained(tuned).eval() if tuned.is_dir() else None,
    )


def _assemble_pipeline(work: Path, vae_stage: str, unet: Any = None, text_encoder: Any = None):
    """A fp32 pipeline of the run's tokenizer, `vae_stage`'s autoencoder and DPM-Solver++; the UNet and text
    encoder given, or (None) a fresh UNet of the run's architecture and the mini-CLIP's text tower."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTokenizer

    arch = run_config(work).arch
    if text_encoder is None:
        text_encoder = arch_mod.text_encoder_from_clip(CLIPModel.from_pretrained(final_dir(work, "clip")))
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(final_dir(work, vae_stage)),
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(final_dir(work, "clip")),
        unet=unet if unet is not None else arch_mod.build_unet(arch.unet, arch.clip.text_width),
        scheduler=arch_mod.build_inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _config_dtype_float32(folder: Path) -> None:
    _update_json(folder / "config.json", {"dtype": "float32"})


def write_text_encoder(encoder: Any, folder: Path) -> None:
    """fp16 weights named ``text_model.*`` (SD 1.x layout) + config with dtype float32."""
    from safetensors.torch import save_file

    for old in folder.glob("*.safetensors*"):
        old.unlink()
    state = {
        (k if k.startswith("text_model.") else f"text_model.{k}"): v.detach().to(torch.float16).contiguous()
        for k, v in encoder.state_dict().items()
    }
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    _config_dtype_float32(folder)


def _write_tokenizer(folder: Path, num_merges: int) -> None:
    """The slow-tokenizer files SD 1.x ships (vocab.json, merges.txt, ...), which every transformers reads."""
    for old in folder.iterdir():
        old.unlink()
    write_clip_tokenizer_files(folder, num_merges)


def write_clip(source: Path, folder: Path, num_merges: int | None = None) -> None:
    """The mini-CLIP evaluator from the CLIP folder `source` (a clip stage's final/, or a pipeline's clip/):
    CLIPModel (fp16) + tokenizer + image processor config, into `folder`. `num_merges` (the tokenizer's BPE
    merges) defaults to the one the CLIP's vocabulary size implies."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(source)
    if num_merges is None:  # vocab_size: 256 bytes x 2 + merges + BOS/EOS
        num_merges = clip.config.text_config.vocab_size - 514
    clip.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    _config_dtype_float32(folder)
    write_clip_tokenizer_files(folder, num_merges)
    processor = arch_mod.clip_processor_config(clip.config.vision_config.image_size)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


# --- model card ------------------------------------------------------------------------------------------


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    """Total size of the files under `folder` matching `pattern` (recursive)."""
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def stage_training(work: Path, stage: str) -> dict:
    """Measured facts about a stage from its log and done.json: steps, wall time, hardware, final loss."""
    records = read_log(work, stage)
    chunks = [r for r in records if r.get("event") == "chunk"]
    losses = [r["loss"] for r in records if "loss" in r]
    path = work / stage / DONE
    done = read_done(work, stage)
    if isinstance(done, dict) and "adopted_from" in done:  # `booth mini train --reuse`: not trained here
        return {**done, "chunks": 0, "wall_seconds": 0.0, "hardware": [], "final_loss": None}
    missing = [key for key in ("steps", "batch_size") if key not in (done if isinstance(done, dict) else {})]
    if missing:
        raise BoothError(
            f"{path} has no {', '.join(missing)}: not a finished stage `booth mini train` wrote (a stage copied "
            "from another run needs that run's done.json and log.jsonl); `booth mini export --checkpoint` "
            "exports a UNet checkpoint without a model card"
        )
    return {
        **done,
        "chunks": len(chunks),
        "wall_seconds": sum(c["wall_seconds"] for c in chunks),
        "hardware": sorted({f"{c['hardware']} ({c['precision']})" for c in chunks}),
        "final_loss": statistics.fmean(losses[-50:]) if losses else None,
    }


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _sources_lines(manifest: dict) -> list[str]:
    lines = []
    for style, src in sorted(manifest.get("sources", {}).items()):
        role = "held out (novel subjects only)" if src.get("held_out") else "training"
        lines.append(f"| {style} | {src['title']} | {src['package']} | {src['licence']} | {role} |")
    return lines


def _data_section(dataset: dict) -> list[str]:
    manifest = dataset.get("manifest", {})
    splits = manifest.get("splits", {})
    lines = [
        "## Data",
        "",
        f"booth's mini world (`booth mini dataset`, seed {manifest.get('seed')}, "
        f"{manifest.get('resolution')}x{manifest.get('resolution')} px): "
        f"{len(manifest.get('concepts', []))} emoji concepts x {len(manifest.get('styles', []))} styles "
        f"({', '.join(manifest.get('styles', []))}) x {len(manifest.get('backgrounds', {}))} background colours "
        "x position x size, with exact captions "
        f'("{manifest.get("caption_template", "")}").',
        "",
        f"Splits: {', '.join(f'{k} {splits[k]}' for k in SPLIT_ORDER if k in splits)} images. "
        + (
            "The CLIP and VAE stages trained on `train`, the UNet also on `pairs` (two small objects an image, "
            '"a small X on the left and a small Y on the right ...")'
            if "pairs_checksum" in dataset
            else "Every stage trained on `train` only"
        )
        + "; `novel` holds Fluent Emoji subjects that no stage saw (for personalization).",
        "",
        "| style | source | package | licence | use |",
        "|---|---|---|---|---|",
        *_sources_lines(manifest),
        "",
        "See ATTRIBUTION.md.",
        "",
    ]
    return lines


def _sizes_section(out: Path, run: dict) -> list[str]:
    arch = run["config"]["arch"]
    counts = arch_mod.parameter_counts(_arch_from_json(arch))
    rows = [
        ("text_encoder", "CLIPTextModel", counts["text_encoder"], out / "text_encoder"),
        ("vae", "AutoencoderKL", counts["vae"], out / "vae"),
        ("unet", "UNet2DConditionModel", counts["unet"], out / "unet"),
        ("clip", "CLIPModel (evaluator)", counts["clip"], out / "clip"),
    ]
    lines = [
        "## Architecture and sizes",
        "",
        "| component | class | parameters | fp16 weights |",
        "|---|---|---|---|",
    ]
    for name, cls, n, folder in rows:
        lines.append(
            f"| {name} | {cls} | {n / 1e6:.2f} M | {folder_bytes(folder, '*.safetensors') / 1e6:.1f} MB |"
        )
    clip, vae, unet = arch["clip"], arch["vae"], arch["unet"]
    lines += [
        "",
        f"- Text: width {clip['text_width']}, {clip['text_layers']} layers, {clip['text_heads']} heads, "
        f"{clip['max_length']} tokens, CLIP BPE truncated to {clip['num_merges']} merges "
        f"({arch_mod.vocab_size(arch_mod.ClipConfig(**clip))} tokens), padded with EOS (SD 1.x).",
        f"- CLIP vision: ViT, {clip['image_size']} px, patch {clip['patch_size']}, width {clip['vision_width']}, "
        f"{clip['vision_layers']} layers; projection {clip['projection_dim']}.",
        f"- VAE: block_out_channels {tuple(vae['block_out_channels'])}, {vae['latent_channels']} latent channels, "
        f"{vae['sample_size']} px -> {vae['sample_size'] // 2 ** (len(vae['block_out_channels']) - 1)} px latents.",
        f"- UNet: block_out_channels {tuple(unet['block_out_channels'])}, {unet['layers_per_block']} layer(s) per "
        f"block, heads {tuple(unet['attention_heads'])}, cross-attention width {clip['text_width']}; epsilon "
        "prediction, DDPM scaled-linear betas 0.00085-0.012 (SD's); ships with DPM-Solver++ 2M.",
        f"- Folder total: {folder_bytes(out) / 1e6:.1f} MB (pipeline weights "
        f"{sum(folder_bytes(out / c, '*.safetensors') for c in COMPONENTS) / 1e6:.1f} MB).",
        "",
    ]
    return lines


def _arch_from_json(arch: dict) -> arch_mod.MiniArchitecture:
    def tuples(d: dict) -> dict:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

    return arch_mod.MiniArchitecture(
        clip=arch_mod.ClipConfig(**tuples(arch["clip"])),
        vae=arch_mod.VaeConfig(**tuples(arch["vae"])),
        unet=arch_mod.UNetConfig(**tuples(arch["unet"])),
    )


def _training_section(work: Path, run: dict) -> list[str]:
    config = run["config"]
    lines = [
        "## Training",
        "",
        (
            f"`booth mini train --preset {config['name']}`"
            if config["name"] in PRESETS and PRESETS[config["name"]].to_json() == config
            else f"Configuration {config['name']!r} (in `training.json`; `booth mini train --config FILE` runs it)"
        )
        + f" (seed {run['seed']}), stages in order, each resumable.",
        "",
        "| stage | steps x batch | lr | wall time | chunks | final loss | hardware |",
        "|---|---|---|---|---|---|---|",
    ]
    total = 0.0
    parsed = TrainConfig.from_json(config)
    stages = parsed.stages
    facts = {stage: stage_training(work, stage) for stage in stages}
    for stage, fact in facts.items():
        if "adopted_from" in fact:
            lines.append(
                f"| {stage} | taken from {_adopted_from(fact)} (`--reuse`), not trained in this run |"
            )
            continue
        optim = config[stage]["optim"]
        total += fact["wall_seconds"]
        loss = f"{fact['final_loss']:.4f}" if fact["final_loss"] is not None else "-"
        lines.append(
            f"| {stage} | {fact['steps']} x {optim['batch_size']} | {optim['lr']:g} | "
            f"{_duration(fact['wall_seconds'])} | {fact['chunks']} | {loss} | {'; '.join(fact['hardware'])} |"
        )
    vae = facts[parsed.vae_stage]
    psnr = vae.get("test_psnr_db")
    warm = [s for s in stages if s != "decoder" and config[s].get("init")]
    lines += [""] + [_warm_start_line(stage, config[stage]) for stage in warm]
    lines += [_decoder_line(config["decoder"])] if "decoder" in stages and "adopted_from" not in vae else []
    lines += [
        "",
        f"Total wall time {_duration(total)} (setup, latent caching and checkpoints included). "
        f"Final loss: mean of the last 50 logged steps. VAE scaling factor {vae['scaling_factor']:.5f} "
        "(1 / std of latents over training images)"
        + (f"; test-split reconstruction PSNR at the end of training {psnr:.2f} dB." if psnr else "."),
        "",
    ]
    return lines


def _adopted_from(fact: dict) -> str:
    """Where an adopted stage came from: the bundled booth-mini, or the folder's path."""
    from booth.models.loading import default_model_path

    path = Path(fact["adopted_from"])
    return "the bundled booth-mini" if path == default_model_path().resolve() else f"`{path}`"


def _warm_start_line(stage: str, config: dict) -> str:
    """A card line for a stage that started from earlier weights (its row counts this run's steps only)."""
    what = " (decoder only: encoder and scaling factor kept)" if config.get("train_encoder") is False else ""
    return (
        f"- {stage}: started from `{config['init']}`{what}; its row counts this run's steps and time only, "
        "not those of the weights it started from."
    )


def _decoder_line(config: dict) -> str:
    """The card's line on the decoder stage."""
    start = f"`{config['init']}`" if config.get("init") else "the vae stage's autoencoder"
    return (
        f"- decoder: {start} with its decoder alone trained on latents plus Gaussian noise of up to "
        f"{config['latent_noise']:g} latent stds (encoder and scaling factor kept, so the UNet's latents are "
        "the vae stage's); the exported VAE is this one."
    )


def _quality_section() -> list[str]:
    return [
        "## Quality",
        "",
        "Measured by `booth mini check` (fixed prompt sets, programmatic checks and the mini-CLIP above):",
        "",
        "| metric | goal | measured |",
        "|---|---|---|",
        '| concept: mini-CLIP zero-shot top-1 of generated "a {concept}" | >= 40% | not measured yet |',
        "| background colour right | >= 80% | not measured yet |",
        "| position right | >= 70% | not measured yet |",
        "| style right (mini-CLIP) | >= 60% | not measured yet |",
        "| VAE reconstruction PSNR (held-out renders) | >= 24 dB | not measured yet |",
        "| one 64x64 image, 20 steps, CPU | < 1 s | not measured yet |",
        "",
    ]


def model_card(work_dir: str | Path, out_dir: str | Path) -> str:
    """The README.md of an exported folder: measured data, sizes and training facts; quality left to check."""
    work, out = Path(work_dir), Path(out_dir)
    run = json.loads((work / CONFIG_FILE).read_text())
    dataset = json.loads((work / DATASET_FILE).read_text())
    header = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "license: other",
        "tags: [stable-diffusion, text-to-image, booth, booth-mini]",
        "---",
        "",
        "# booth-mini",
        "",
        "A miniature Stable Diffusion (CLIP text encoder, KL autoencoder, conditional UNet, DDPM-family",
        "scheduler) trained from scratch by booth on renders of open emoji art, 64x64 px. It is booth's default",
        "model, so everything runs on a CPU without downloads. Load it with plain diffusers:",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        "pipe = StableDiffusionPipeline.from_pretrained(path)",
        "image = pipe(",
        '    "a small red apple in the top left on a blue background, openmoji style", num_inference_steps=20',
        ").images[0]",
        "```",
        "",
        "The mini-CLIP in `clip/` (`transformers.CLIPModel`) is the evaluator of the mini world.",
        "",
    ]
    body = (
        _data_section(dataset) + _sizes_section(out, run) + _training_section(work, run) + _quality_section()
    )
    return "\n".join(header + body)
