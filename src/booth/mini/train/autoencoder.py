"""The ``vae`` and ``decoder`` stages: the KL autoencoder and its decoder on noisy latents (steps 1-5)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from booth.errors import BoothError
from booth.mini import architecture as arch_mod
from booth.mini.architecture import VaeConfig
from booth.mini.train.config import VaeTrainConfig
from booth.mini.train.data import MiniData, load_split, to_unit
from booth.mini.train.workdir import autocast


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch dim (Kingma & Welling 2014)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and vertical finite differences of two image batches."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of images in [-1, 1] by `angle` radians (one per image) about the grey axis: a rotation of
    the chroma plane of YIQ (NTSC), which keeps luma and saturation; values clamped back to [-1, 1]."""
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        dtype=x.dtype,
        device=x.device,
    )
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack(
        [
            torch.stack([one, zero, zero], -1),
            torch.stack([zero, cos, -sin], -1),
            torch.stack([zero, sin, cos], -1),
        ],
        -2,
    )  # N x 3 x 3
    matrix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq
    return torch.einsum("nij,njhw->nihw", matrix, x).clamp(-1.0, 1.0)


def object_mask(x: torch.Tensor, threshold: float = 0.08) -> torch.Tensor:
    """1 where an image in [-1, 1] differs from its background colour, else 0 (N x 1 x H x W).

    The mini world's backgrounds are flat and every object keeps a margin from the border, so the top-left
    pixel is the background colour."""
    return ((x - x[..., :1, :1]).abs().amax(dim=1, keepdim=True) > threshold).to(x.dtype)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] from their MSE (peak-to-peak range 2)."""
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


class VaeTask:
    """AutoencoderKL: reconstruction + edge + small KL (the ``vae`` stage, and the ``decoder`` stage with
    `cfg.train_encoder` false, started from `init`)."""

    def __init__(
        self,
        cfg: VaeTrainConfig,
        arch: VaeConfig,
        data: MiniData,
        device: torch.device,
        seed: int,
        init: Path | None = None,
    ):
        self.cfg, self.data, self.device = cfg, data, device
        self.model = arch_mod.build_vae(arch, seed=seed).to(device).train()
        self.kept_factor: float | None = None  # a decoder-only run keeps its init's latent scale
        if not self.cfg.train_encoder:
            if init is None:
                raise BoothError("a decoder-only VAE run (train_encoder false) needs an init VAE to keep")
            self.kept_factor = float(_init_config("vae", init)["scaling_factor"])
            for part in (self.model.encoder, self.model.quant_conv):
                part.requires_grad_(False)

    def compile_targets(self) -> dict[str, torch.nn.Module]:
        """Nothing: compiling the encoder and decoder gave nothing on a 2-core CPU (1.03x a step,
        `benchmarks/mini_train_compile.py --candidates`), for a minute of compiling at a chunk's start."""
        return {}

    def loss(self, index: torch.Tensor, gen: torch.Generator, dtype: torch.dtype | None, step: int = 0):
        # 1. load batch (a `hue_jitter` share with its hue rotated)
        x = to_unit(self.data.images[index]).to(self.device)
        if self.cfg.hue_jitter:
            jitter = torch.rand(len(x), generator=gen) < self.cfg.hue_jitter
            angle = torch.rand(len(x), generator=gen) * 2 * math.pi * jitter
            x = rotate_hue(x, angle.to(self.device))
        # 2. encode to the posterior N(mean, std^2)
        with autocast(self.device, dtype), torch.set_grad_enabled(self.cfg.train_encoder):
            moments = self.model.encode(x).latent_dist.parameters
        mean, logvar = moments.float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        # 3. noise: reparameterised sample z = mean + std * eps; with `latent_noise`, + sigma n for the decoder
        eps = torch.randn(mean.shape, generator=gen).to(self.device)
        z = mean + (0.5 * logvar).exp() * eps
        if self.cfg.latent_noise:
            sigma = torch.rand(len(z), 1, 1, 1, generator=gen) * self.cfg.latent_noise
            z = z + (sigma * z.detach().std().cpu() * torch.randn(z.shape, generator=gen)).to(self.device)
        # 4. predict: decode
        with autocast(self.device, dtype):
            recon = self.model.decode(z).sample.float()
        # 5. loss: object-weighted L1 + MSE, edge L1, KL per pixel value (SD's sum over pixels / 3HW)
        w = 1.0 + self.cfg.object_weight * object_mask(x)
        mse = F.mse_loss(recon, x)
        l1_w, mse_w = ((recon - x).abs() * w).mean(), ((recon - x).pow(2) * w).mean()
        kl = kl_to_standard_normal(mean, logvar).mean() / x[0].numel()
        loss = l1_w + self.cfg.mse_weight * mse_w + self.cfg.edge_weight * edge_l1(recon, x)
        loss = loss + self.cfg.kl_weight * kl
        return loss, {"psnr": psnr(mse.detach()).item(), "kl": kl.item()}

    @torch.no_grad()
    def scaling_factor(self, seed: int) -> float:
        """1 / std of posterior samples of up to `scale_images` training images."""
        count = min(len(self.data), self.cfg.scale_images)
        gen = torch.Generator().manual_seed(seed)
        samples = []
        for start in range(0, count, 256):
            x = to_unit(self.data.images[start : min(count, start + 256)]).to(self.device)
            dist = self.model.encode(x).latent_dist
            samples.append(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(self.device))
        return float(1.0 / torch.cat(samples).float().std())

    @torch.no_grad()
    def test_psnr(self, data_dir: Path) -> float | None:
        """Mean per-image PSNR (dB) of posterior-mean reconstructions of the test split, if there is one."""
        if not (data_dir / "test" / "metadata.jsonl").is_file():
            return None
        images = load_split(data_dir, "test").images
        values = []
        for start in range(0, len(images), 256):
            x = to_unit(images[start : start + 256]).to(self.device)
            recon = self.model.decode(self.model.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            values.append(psnr((recon - x).pow(2).flatten(1).mean(dim=1)))
        return float(torch.cat(values).mean())

    def save_final(self, folder: Path, data_dir: Path) -> dict:
        self.model.eval()
        factor = self.kept_factor or self.scaling_factor(seed=0)
        self.model.register_to_config(scaling_factor=factor)
        self.model.save_pretrained(folder)
        return {"scaling_factor": factor, "test_psnr_db": self.test_psnr(data_dir)}


def _init_config(stage: str, folder: Path) -> dict[str, Any]:
    """The config.json of the saved model folder a CLIP or VAE stage starts from (`init`)."""
    kind = "transformers CLIPModel" if stage == "clip" else "diffusers AutoencoderKL"
    if not (folder / "config.json").is_file():
        raise BoothError(f"{stage} init {folder} is not a {kind} folder (no config.json)")
    return json.loads((folder / "config.json").read_text())


def folder_init_weights(stage: str, folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of a saved model folder, for the `init` of the CLIP (a `transformers` CLIPModel) or the
    VAE (a diffusers `AutoencoderKL`) stage."""
    if stage == "clip":
        from transformers import CLIPModel as loader
    else:
        from diffusers import AutoencoderKL as loader
    _init_config(stage, folder)
    return loader.from_pretrained(folder).state_dict()
