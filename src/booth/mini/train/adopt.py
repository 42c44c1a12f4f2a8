"""Start a run from a booth-mini pipeline's mini-CLIP and autoencoder, to train its UNet alone.

`adopt_stages(work, pipeline, config)` finishes the ``clip``, ``vae`` and (when the configuration has one)
``decoder`` stages of a work folder with copies of the pipeline's ``clip/`` and ``vae/`` folders, so that
``booth mini train --reuse booth-mini --stage unet`` retrains the UNet on the shipped text tower and latents
(about 50 minutes on two CPU cores, or minutes on a GPU) instead of the whole two-hour recipe. An exported
VAE holds the vae stage's encoder and scaling factor and the decoder stage's decoder, so it stands for both:
the UNet trains on the latents the pipeline's own UNet trained on, and an export draws with its decoder.

The copies keep the pipeline's fp16 tensors (they load into the fp32 models as they are). Each adopted
stage's ``done.json`` records where it came from and the SHA-256 of its weights; the model card lists such a
stage as taken, not trained. Refused, with the work folder left as it was: a folder that is not a booth-mini
pipeline, a pipeline whose shapes differ from the recipe's architecture, and a stage that this run trained
(or started to) or took from other weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open

from booth.errors import BoothError
from booth.fsutil import atomic_folder
from booth.mini import architecture as arch_mod
from booth.mini.train.config import TrainConfig
from booth.mini.train.workdir import (
    CHECKPOINT,
    DONE,
    FINAL,
    atomic_write_text,
    is_finished,
    read_done,
    sha256_file,
)

SOURCE_FOLDER = {"clip": "clip", "vae": "vae", "decoder": "vae"}  # stage -> the pipeline's folder


def _weights(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise BoothError(f"{folder} should hold one .safetensors file, not {len(files)}")
    return files[0]


def _check_shapes(folder: Path, model, what: str) -> None:
    """BoothError unless the weights in `folder` have the parameters of `model`, shape for shape."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    with safe_open(str(_weights(folder)), "pt") as handle:
        found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    wrong = sorted(n for n in expected if found.get(n) != expected[n])
    if wrong:
        sample = ", ".join(f"{n} {found.get(n, 'missing')} (recipe {expected[n]})" for n in wrong[:2])
        raise BoothError(f"{folder} is not the recipe's {what} ({len(wrong)} tensors differ: {sample})")


def _check_architecture(pipeline: Path, arch: arch_mod.MiniArchitecture, stages: list[str]) -> None:
    if "clip" in stages:
        _check_shapes(pipeline / "clip", arch_mod.build_clip(arch.clip), "mini-CLIP")
    if {"vae", "decoder"} & set(stages):
        _check_shapes(pipeline / "vae", arch_mod.build_vae(arch.vae), "autoencoder")


def adopt_stages(work: str | Path, pipeline: str | Path, config: TrainConfig) -> list[str]:
    """Finish the clip, vae and decoder stages of `work` from `pipeline`; return the stages copied now.

    Stages already adopted from the same weights are left as they are (a resumed command passes the same
    flag again). See the module docstring for what is refused.
    """
    work, pipeline = Path(work), Path(pipeline)
    if not (pipeline / "model_index.json").is_file():
        raise BoothError(f"{pipeline} is not a diffusers pipeline folder (no model_index.json)")
    if not (pipeline / "clip" / "config.json").is_file():
        raise BoothError(f"{pipeline} has no clip/ folder: only a booth-mini pipeline carries its mini-CLIP")
    stages = [stage for stage in SOURCE_FOLDER if stage in config.stages]
    digests = {
        folder: sha256_file(_weights(pipeline / folder)) for folder in {SOURCE_FOLDER[s] for s in stages}
    }
    todo = []
    for stage in stages:
        digest = digests[SOURCE_FOLDER[stage]]
        if is_finished(work, stage):
            done = read_done(work, stage)
            if not isinstance(done, dict) or done.get("weights_sha256") != digest:
                how = (
                    "taken from other weights"
                    if isinstance(done, dict) and "adopted_from" in done
                    else "trained by this run"
                )
                raise BoothError(f"the {stage} stage of {work} is {how}; --reuse needs a new work folder")
            continue
        if (work / stage / CHECKPOINT).is_file():
            raise BoothError(
                f"the {stage} stage of {work} has its own checkpoint; --reuse needs a new work folder"
            )
        todo.append((stage, digest))
    _check_architecture(pipeline, config.arch, [stage for stage, _ in todo])
    for stage, digest in todo:
        source = pipeline / SOURCE_FOLDER[stage]
        (work / stage).mkdir(parents=True, exist_ok=True)
        with atomic_folder(work / stage / FINAL) as tmp:
            for path in source.iterdir():
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
        done = {"stage": stage, "adopted_from": str(pipeline.resolve()), "weights_sha256": digest}
        if stage != "clip":
            done["scaling_factor"] = json.loads((source / "config.json").read_text())["scaling_factor"]
        atomic_write_text(work / stage / DONE, json.dumps(done, indent=2) + "\n")
    return [stage for stage, _ in todo]
