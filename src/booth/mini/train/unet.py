"""The ``unet`` stage: epsilon prediction with Min-SNR weights and the text encoder beside it (steps 1-5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from booth.errors import BoothError
from booth.mini import architecture as arch_mod
from booth.mini.train.autoencoder import object_mask
from booth.mini.train.config import TrainConfig
from booth.mini.train.data import (
    MiniData,
    is_pair,
    part_cross_entropy,
    part_phrases,
    record_caption,
    sample_parts,
    to_unit,
)
from booth.mini.train.workdir import TEXT_ENCODER, atomic_save, autocast, final_dir, sha256_file


def x0_weight(snr: torch.Tensor, gamma: float, floor: float = 0.0) -> torch.Tensor:
    """Loss weight in x_0 space: min(SNR, gamma) (Min-SNR-gamma, Hang et al. 2023) + floor.

    An epsilon loss weighs x_0 errors by SNR (Hang et al. 2023, eq. 5), so at high noise, where the layout
    of an image is decided, it barely cares where the object goes: SD's scaled-linear schedule ends at
    SNR 0.0047. ``floor = 1`` is the "SNR + 1" weighting of v-prediction (Salimans & Ho 2022), capped.
    Divide by SNR for the weight of an epsilon loss. Measured (2026-11-30, `tools/mini_position_tokens.py`:
    the shipped UNet conditioned on learned attribute tokens instead of text, 16 px latents): position
    right 17% after 400 steps at floor 0 (lr 1e-4), 92% after 1,000 steps at floor 1 (lr 3e-4; background
    94%); the shipped model, floor 0, is at chance (11%).
    """
    return snr.clamp(max=gamma) + floor


def repa_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_REPA = -E[1/N sum_n sim(y^[n], h_phi(h_t^[n]))] (Yu et al. 2024, "Representation Alignment for
    Generation", eq. 8): `h` the projected denoiser states, `y` the encoder's patch states, both (B, N, D)."""
    return -torch.nn.functional.cosine_similarity(h, y, dim=-1).mean()


def patch_grid(states: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) feature maps as (B, size * size, C) patches, average-pooled to a size x size grid."""
    return torch.nn.functional.adaptive_avg_pool2d(states, size).flatten(2).transpose(1, 2)


class Denoiser(torch.nn.Module):
    """What the UNet stage trains (and checkpoints, and averages): the UNet and the text encoder beside it.

    The text encoder starts as the mini-CLIP text tower; it trains only with
    `UNetTrainConfig.train_text_encoder` (else it is frozen and only rides along).

    With `UNetTrainConfig.readout_weight` it also holds `readout`: one linear head per caption part over the
    text encoder's token-averaged states (not exported). Why: at high noise the UNet's queries carry almost no
    image, cross-attention averages the 77 token states nearly uniformly, and 50-60 of those are padding whose
    (causal) states summarise the caption the way CLIP's pooled embedding does; the mini-CLIP never aligned
    position (zero-shot position at chance), so that average says where the object goes too faintly to learn
    from (2026-12-01: 1,000 steps with a fresh, position-aware text tower trainable at lr 1e-3: position 11%,
    background 100%). The heads make the average carry every part.

    With `UNetTrainConfig.repa_weight` it also holds `repa`: REPA's projector h_phi, a 3-layer MLP from the
    aligned UNet layer's channels to the mini-CLIP vision width (not exported).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        readout: dict[str, int] | None = None,
        repa: tuple[int, int] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        with arch_mod.seeded(seed):  # the heads start the same in every run of a recipe
            self._build_heads(readout, repa)

    def _build_heads(self, readout: dict[str, int] | None, repa: tuple[int, int] | None) -> None:
        if readout:
            width = self.text_encoder.config.hidden_size
            self.readout = torch.nn.ModuleDict(
                {part: torch.nn.Linear(width, n) for part, n in readout.items()}
            )
        if repa:
            channels, width = repa
            hidden = 4 * max(channels, width)
            self.repa = torch.nn.Sequential(
                torch.nn.Linear(channels, hidden),
                torch.nn.SiLU(),
                torch.nn.Linear(hidden, hidden),
                torch.nn.SiLU(),
                torch.nn.Linear(hidden, width),
            )


def readout_classes(parts: tuple[str, ...], records: list[dict], styles: list[str]) -> dict[str, list[str]]:
    """The classes of each readout part: the caption parts' values, and the training set's concepts."""
    values = {part: list(v) for part, v in part_phrases(styles).items()}
    values["concept"] = sorted({r["concept"] for r in records})
    unknown = set(parts) - set(values)
    if unknown:
        raise BoothError(f"unknown readout parts {sorted(unknown)}: choose from {sorted(values)}")
    return {part: values[part] for part in parts}


class UNetTask:
    """UNet2DConditionModel: epsilon prediction with Min-SNR weights, CFG and caption-part dropout.

    With `train_text_encoder` the diffusion loss also fine-tunes the text encoder (initialised from the
    mini-CLIP text tower; the exported pipeline then holds the fine-tuned encoder and the mini-CLIP
    evaluator keeps its own towers). Contrastive training left the tower nearly blind to position words
    (captions differing only in position: hidden states at mean cosine 0.98, against 0.42-0.53 for
    background colour), so a frozen tower gives the UNet almost nothing to place objects by. Measured
    (2026-11-30): 1,000 steps continuing the shipped UNet with the encoder trainable and `snr_floor` 1
    moved that cosine only to 0.97 and position stayed at 16%; the same UNet conditioned instead on
    learned attribute tokens reached 92% (see `x0_weight`). The `full` preset trains the encoder with the
    readout term (`Denoiser`), which took position to 98%.
    """

    def __init__(
        self, config: TrainConfig, data: MiniData, device: torch.device, seed: int, work: Path, **cache: Any
    ):
        from diffusers import AutoencoderKL
        from transformers import CLIPModel, CLIPTokenizer

        self.cfg, self.data, self.device = config.unet, data, device
        clip = CLIPModel.from_pretrained(final_dir(work, "clip"))
        text_encoder = arch_mod.text_encoder_from_clip(clip).requires_grad_(self.cfg.train_text_encoder)
        self.tokenizer = CLIPTokenizer.from_pretrained(final_dir(work, "clip"))
        vae = AutoencoderKL.from_pretrained(final_dir(work, "vae"))
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_mean, self.latent_std = latent_cache(
            work, vae.to(device), data, size=self.cfg.resolution, **cache
        )
        self.object_share = None
        if self.cfg.object_weight:
            side = self.latent_mean.shape[-1]
            self.object_share = torch.cat(
                [latent_object_share(data.images[i : i + 1024], side) for i in range(0, len(data), 1024)]
            ).to(device)
        self.noise = arch_mod.build_noise_scheduler()
        self.alphas_cumprod = self.noise.alphas_cumprod.to(device)
        self.timesteps = self.cfg.timesteps or (0, self.noise.config.num_train_timesteps)
        if self.timesteps[1] > self.noise.config.num_train_timesteps:
            raise BoothError(
                f"unet.timesteps {list(self.timesteps)} ends past the schedule's "
                f"{self.noise.config.num_train_timesteps} timesteps"
            )
        unet = arch_mod.build_unet(config.arch.unet, config.arch.clip.text_width, seed=seed)
        styles = sorted({r["style"] for r in data.records})
        self.readout_values = readout_classes(self.cfg.readout_parts, data.records, styles)
        readout = {k: len(v) for k, v in self.readout_values.items()} if self.cfg.readout_weight else None
        if readout and not self.cfg.train_text_encoder:
            raise BoothError("readout_weight trains the text encoder: it needs train_text_encoder")
        repa = self._repa_setup(unet, clip, device) if self.cfg.repa_weight else None
        self.model = Denoiser(unet, text_encoder, readout, repa, seed=seed).to(device).train()
        self.model.text_encoder.train(self.cfg.train_text_encoder)
        self.max_length = config.arch.clip.max_length

    def _repa_setup(self, unet: torch.nn.Module, clip: Any, device: torch.device) -> tuple[int, int]:
        """Hook `repa_layer` of `unet` (its output kept in `self.repa_states`) and keep the frozen mini-CLIP
        vision tower; the projector's (input, output) widths."""
        try:
            layer = unet.get_submodule(self.cfg.repa_layer)
        except AttributeError:
            raise BoothError(
                f"unet.repa_layer {self.cfg.repa_layer!r} is not a module of the UNet "
                "(e.g. down_blocks.1.attentions.0)"
            ) from None
        self.repa_states: dict[str, torch.Tensor] = {}
        layer.register_forward_hook(lambda module, args, output: self.repa_states.update(h=_states(output)))
        if self.cfg.repa_encoder:
            from transformers import CLIPModel

            if not (Path(self.cfg.repa_encoder) / "config.json").is_file():
                raise BoothError(
                    f"unet.repa_encoder {self.cfg.repa_encoder} is not a CLIP folder (no config.json)"
                )
            clip = CLIPModel.from_pretrained(self.cfg.repa_encoder)
        self.vision = clip.vision_model.requires_grad_(False).eval().to(device)
        size, width = unet.config.sample_size, unet.config.cross_attention_dim
        with torch.no_grad():  # one dry pass tells the layer's width
            unet(torch.zeros(1, unet.config.in_channels, size, size), 0, torch.zeros(1, 1, width))
        return self.repa_states["h"].shape[1], clip.config.vision_config.hidden_size

    def clip_patches(self, index: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        """The frozen mini-CLIP vision tower's last patch states of the clean images (B, N, D), class token
        dropped: REPA's target y."""
        pixels = arch_mod.clip_pixels(self.data.images[index].to(self.device))
        with torch.no_grad(), autocast(self.device, dtype):
            return self.vision(pixel_values=pixels).last_hidden_state[:, 1:].float()

    def compile_targets(self) -> dict[str, torch.nn.Module]:
        """What `--compile` compiles: the UNet and the text encoder (on a 2-core CPU 1.04x a step, the UNet
        alone 1.05x: `benchmarks/mini_train_compile.py`; both, for a GPU, where a model this small waits on
        Python and kernel launches, not on arithmetic)."""
        return {"unet": self.model.unet, "text_encoder": self.model.text_encoder}

    def encode_text(self, texts: list[str], dtype: torch.dtype | None) -> torch.Tensor:
        """The text encoder's last hidden state, captions padded to 77 tokens as at inference."""
        ids = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length)
        with torch.set_grad_enabled(self.cfg.train_text_encoder), autocast(self.device, dtype):
            return self.model.text_encoder(torch.tensor(ids["input_ids"], device=self.device))[0]

    def loss(self, index: torch.Tensor, gen: torch.Generator, dtype: torch.dtype | None, step: int = 0):
        # 1. load batch: cached posterior of each image, and a shortened caption (or "" for CFG)
        records = [self.data.records[i] for i in index.tolist()]
        parts = [sample_parts(self.cfg.captions, gen) for _ in records]
        texts = [record_caption(r, p) for r, p in zip(records, parts)]
        index = index.to(self.device)
        mean, std = self.latent_mean[index], self.latent_std[index]
        # 2. encode: sample the VAE posterior, scale to unit variance; text through the text encoder
        eps_z = torch.randn(mean.shape, generator=gen).to(self.device)
        latents = (mean + std * eps_z) * self.scaling_factor
        text = self.encode_text(texts, dtype)
        # 3. noise: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps with a per-channel offset (Guttenberg 2023)
        b, c = latents.shape[:2]
        offset = self.cfg.offset_noise * torch.randn(b, c, 1, 1, generator=gen)
        noise = (torch.randn(latents.shape, generator=gen) + offset).to(self.device)
        t = self.draw_timesteps(b, gen)
        noisy = self.noise.add_noise(latents, noise, t)
        # 4. predict the noise
        with autocast(self.device, dtype):
            predicted = self.model.unet(noisy, t, encoder_hidden_states=text).sample.float()
        # 5. loss: Min-SNR-gamma weighted MSE, w = (min(SNR, gamma) + floor) / SNR for epsilon (pixels
        #    weighed towards the object with `object_weight`)
        abar = self.alphas_cumprod[t]
        snr = abar / (1.0 - abar)
        weight = x0_weight(snr, self.cfg.min_snr_gamma, self.cfg.floor_at(step)) / snr
        error = (predicted - noise).pow(2)
        per_sample = error.flatten(1).mean(dim=1)
        stats = {"mse": per_sample.mean().item()}
        if self.object_share is not None:  # the same error, its latent pixels weighed towards the object
            per_sample = object_weighted_mse(error, self.object_share[index], self.cfg.object_weight)
        loss = (weight * per_sample).mean()
        if self.cfg.readout_weight:
            single = [None if is_pair(r) else p for r, p in zip(records, parts)]  # the heads read one object
            readout, accuracy = self._readout_loss(text.float().mean(dim=1), records, single)
            loss = loss + self.cfg.readout_weight * readout
            stats["readout_acc"] = accuracy
        if self.cfg.repa_weight:
            # 6. REPA: the aligned layer's states, projected by h_phi, towards the clean image's patch states
            states, y = self.repa_states.pop("h").float(), self.clip_patches(index, dtype)
            side = round(y.shape[1] ** 0.5)  # both on the coarser of the two grids
            grid = min(side, states.shape[-1])
            y = patch_grid(y.transpose(1, 2).reshape(b, -1, side, side), grid)
            h = self.model.repa(patch_grid(states, grid))
            align = repa_loss(h, y)
            loss = loss + self.cfg.repa_weight * align
            stats["repa_cos"] = -align.item()
        return loss, stats

    def draw_timesteps(self, b: int, gen: torch.Generator) -> torch.Tensor:
        """`b` training timesteps: the first `timesteps_share` of them uniform over `UNetTrainConfig.timesteps`,
        the rest over the whole schedule (all of them by default)."""
        first, last = self.timesteps
        ranged = round(b * self.cfg.timesteps_share) if self.cfg.timesteps else b
        t = torch.randint(first, last, (ranged,), generator=gen)
        if ranged < b:
            t = torch.cat(
                [t, torch.randint(0, self.noise.config.num_train_timesteps, (b - ranged,), generator=gen)]
            )
        return t.to(self.device)

    def _readout_loss(self, average: torch.Tensor, records: list[dict], parts) -> tuple[torch.Tensor, float]:
        """Mean cross-entropy of every named caption part read from the token-averaged text states."""
        return part_cross_entropy(
            self.readout_values,
            records,
            parts,
            lambda part, rows: self.model.readout[part](average[rows]),
            average,
        )

    def save_final(self, folder: Path, data_dir: Path) -> dict:
        self.model.eval().unet.save_pretrained(folder)  # the loop has copied the EMA weights in
        if self.cfg.train_text_encoder:
            self.model.text_encoder.save_pretrained(folder / TEXT_ENCODER)
        return {"text_encoder": "fine-tuned" if self.cfg.train_text_encoder else "mini-CLIP text tower"}


def _states(output: Any) -> torch.Tensor:
    """A UNet module's output as one (B, C, H, W) tensor: a block's (states, skips) tuple, a transformer's
    ``sample``, or the tensor itself."""
    output = getattr(output, "sample", output)
    return output[0] if isinstance(output, tuple) else output


def object_weighted_mse(error: torch.Tensor, share: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Per-image mean of the squared `error` (B, C, H, W), each latent pixel weighed by 1 + `object_weight` x
    its object `share` (B, 1, H, W) and the weights normalised to mean 1 per image."""
    w = (1.0 + object_weight * share).expand_as(error).flatten(1)
    return (w * error.flatten(1)).sum(dim=1) / w.sum(dim=1)


def latent_object_share(images: torch.Tensor, side: int) -> torch.Tensor:
    """The share of each latent pixel's image pixels that show the object (N x 1 x side x side), from uint8
    images: `object_mask` box-filtered to the latent grid."""
    mask = object_mask(to_unit(images))
    return torch.nn.functional.interpolate(mask, size=(side, side), mode="area")


def latent_cache(
    work: Path,
    vae: Any,
    data: MiniData,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image under the frozen VAE (cached in unet/latents.pt),
    the images first resized to `size` pixels a side by a box filter when given.

    Encoded under the training precision (bf16 autocast: 4 ms an image here instead of 11 ms; its rounding,
    about 0.4% of a latent, is far below the smallest diffusion noise, sqrt(1 - abar_0) = 3%).
    """
    path = work / "unet" / "latents.pt"
    if size == data.images.shape[-1]:  # the dataset's own size: the plain cache, no resize
        size = None
    key = {
        "data": data.checksum,
        "vae": sha256_file(final_dir(work, "vae") / "diffusion_pytorch_model.safetensors"),
        "precision": str(dtype),
    }
    if size is not None:
        key["size"] = size
    device = next(vae.parameters()).device
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            return cached["mean"].to(device), cached["std"].to(device)
    vae.eval()
    means, stds = [], []
    bar = tqdm(range(0, len(data), 256), desc="booth-mini latents", unit="batch", disable=not progress)
    with torch.no_grad(), autocast(device, dtype):
        for start in bar:
            images = to_unit(data.images[start : start + 256])
            if size is not None:
                images = torch.nn.functional.interpolate(images, size=(size, size), mode="area")
            dist = vae.encode(images.to(device)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"key": key, "mean": mean, "std": std}, path)
    return mean.to(device), std.to(device)
