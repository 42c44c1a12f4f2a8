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
  background") work. The text encoder starts as the mini-CLIP text tower (captions padded to 77, as at
  inference) and, in the `full` preset, trains beside the UNet with a readout term; latents come from the
  frozen VAE, encoded once per training image (posterior mean and std cached in ``work/unet/latents.pt``)
  and sampled every step. EMA of the weights (decay 0.999 with the usual (1 + t) / (10 + t) warm-up) is what
  ships.

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
losses in fp32. ``--compile`` (`train_stage(..., compile_models=True)`) compiles each stage's
`compile_targets` in place with torch.compile (names and weights unchanged; a runtime choice, recorded in
each chunk's log record): 1.04x a step on the 2-core CPU for about a minute of compiling at a stage's start
(`benchmarks/mini_train_compile.py`, 2026-12-07), so it is off by default; it is there for GPUs.

Step times (the training loop with data, frozen encoders and EMA, bf16 autocast, 2 threads, full preset;
2-core AMD EPYC with AVX512-BF16 and no AMX, 2026-12-06): CLIP 1.45 s a step (batch 128), VAE 0.58 s
(batch 16), UNet with its text encoder 0.78-0.87 s (batch 32); encoding the 24,000 latents once 1.6 min. On a
2-core Xeon with AMX the UNet steps were about 1.8x slower (2026-12-02). Whatever runs on the second core
slows every step several times (a CLIP step 0.92 s -> 5.96 s with a busy second core).

Modules: `config` (the typed recipe and the presets), `data` (splits, batch order, captions), `workdir`
(devices, precision, a work folder's files), one module per model trained (`clip`, `autoencoder` for the vae
and decoder stages, `unet`: steps 1-5 of a stage), `loop` (step 6, checkpoints, chunks, `train_all`) and
`adopt` (a run's first stages taken from a booth-mini pipeline, to train its UNet alone: ``--reuse``).
"""

from booth.mini.train.adopt import adopt_stages
from booth.mini.train.autoencoder import object_mask, rotate_hue
from booth.mini.train.config import (
    PRESETS,
    STAGES,
    CaptionDropout,
    ClipTrainConfig,
    Optim,
    TrainConfig,
    UNetTrainConfig,
    VaeTrainConfig,
    check_stage,
    preset,
)
from booth.mini.train.data import (
    MiniData,
    batch_indices,
    hard_negative,
    load_split,
    names_part,
    part_phrases,
    record_caption,
    sample_caption,
)
from booth.mini.train.loop import (
    StageReport,
    build_task,
    check_prerequisites,
    export_pipeline,
    pinned_run,
    read_run_config,
    train_all,
    train_stage,
    unet_checkpoint_weights,
)
from booth.mini.train.unet import x0_weight
from booth.mini.train.workdir import (
    CHECKPOINT,
    CONFIG_FILE,
    DATASET_FILE,
    DONE,
    FINAL,
    LOG,
    TEXT_ENCODER,
    final_dir,
    is_finished,
    read_done,
    read_log,
    resolve_precision,
)

__all__ = [
    "CHECKPOINT",
    "CONFIG_FILE",
    "DATASET_FILE",
    "DONE",
    "FINAL",
    "LOG",
    "PRESETS",
    "STAGES",
    "TEXT_ENCODER",
    "CaptionDropout",
    "ClipTrainConfig",
    "MiniData",
    "Optim",
    "StageReport",
    "TrainConfig",
    "UNetTrainConfig",
    "VaeTrainConfig",
    "adopt_stages",
    "batch_indices",
    "build_task",
    "check_prerequisites",
    "check_stage",
    "export_pipeline",
    "final_dir",
    "hard_negative",
    "is_finished",
    "load_split",
    "names_part",
    "object_mask",
    "part_phrases",
    "pinned_run",
    "preset",
    "read_done",
    "read_log",
    "read_run_config",
    "record_caption",
    "resolve_precision",
    "rotate_hue",
    "sample_caption",
    "train_all",
    "train_stage",
    "unet_checkpoint_weights",
    "x0_weight",
]
