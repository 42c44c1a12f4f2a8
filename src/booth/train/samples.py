"""Training samples in memory, their cached latents and text embeddings, and the seeded batch schedule.

The batch of micro-step m is a pure function of (seed, m): instance batches come from a seeded permutation
per epoch (or per-bucket batches with aspect-ratio buckets), prior samples from a seeded permutation of the
class set. A resumed run therefore sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import torch
from PIL import Image

from booth.train.data import (
    assign_bucket,
    batches_by_bucket,
    load_rgb,
    make_buckets,
    resize_and_crop,
    to_tensor,
)


def stream_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for draw `index` of a named random stream (independent of every other stream)."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(seed: int, stream: str, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, stream, index))


def seed_global(seed: int, device: torch.device) -> None:
    """Seed torch's global generators of the CPU and `device` (what modules' own draws, e.g. dropout, use).
    torch.manual_seed also queues a lazy seed for every accelerator backend torch was built with, formatting
    the Python stack each time (88 us a call on a CPU-only machine: once per training step here)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


@dataclass
class Sample:
    """One training image at its training size, with its prompt and (once encoded) its latent posterior.

    `latents` holds (mean, std) of the VAE posterior for the unflipped and, with flips on, the flipped
    image; a latent is sampled from them every step (z = mean + std * n), as encoding every step would.
    """

    image: Image.Image  # RGB at its original size
    prompt: str
    size: tuple[int, int]  # (width, height) trained at
    is_prior: bool = False
    class_prompt: str | None = None  # the concept's class ("a dog"): target prompt of the base-model prior
    latents: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def training_size(width: int, height: int, resolution: int, buckets: bool) -> tuple[int, int]:
    if not buckets:
        return (resolution, resolution)
    step = 64 if resolution % 64 == 0 and resolution >= 256 else 8
    return assign_bucket(width, height, make_buckets(resolution, step=step))


def load_samples(
    records,
    prompts: list[str],
    resolution: int,
    buckets: bool,
    is_prior: bool,
    class_prompt: str | None = None,
) -> list[Sample]:
    samples = []
    for record, prompt in zip(records, prompts):
        image = load_rgb(record.path)
        size = training_size(image.width, image.height, resolution, buckets)
        samples.append(Sample(image, prompt, size, is_prior, class_prompt))
    return samples


def pixels(
    sample: Sample, flip: bool, crop: str = "center", rng: random.Random | None = None
) -> torch.Tensor:
    """[3, H, W] in [-1, 1] at the sample's training size."""
    w, h = sample.size
    return to_tensor(resize_and_crop(sample.image, w, h, crop=crop, flip=flip, rng=rng))


@torch.no_grad()
def encode_posterior(vae, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) in the UNet's latent scale: z = (x - shift) * scaling_factor."""
    dist = vae.encode(batch.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((dist.mean - shift) * scale).float().cpu(), (dist.std * scale).float().cpu()


def cache_latents(vae, samples: list[Sample], flip: bool, batch_size: int = 8) -> None:
    """Encode every sample (and its mirror image when `flip`) once with the frozen VAE."""
    jobs = [(s, f) for s in samples for f in ((False, True) if flip else (False,))]
    by_size: dict[tuple[int, int], list] = {}
    for job in jobs:
        by_size.setdefault(job[0].size, []).append(job)
    for group in by_size.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            mean, std = encode_posterior(vae, torch.stack([pixels(s, f) for s, f in chunk]))
            for (s, _), m, sd in zip(chunk, mean, std):
                s.latents.append((m, sd))


class BatchSchedule:
    """Which instance and prior samples micro-step m trains on (see the module docstring)."""

    def __init__(
        self,
        instance: list[Sample],
        prior: list[Sample],
        batch_size: int,
        repeats: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ):
        self.instance, self.prior = instance, prior
        self.batch_size, self.repeats, self.seed = batch_size, repeats, seed
        self.rank, self.world = rank, world
        self.keys = [s.size for s in instance] * repeats
        self.batches_per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(stream_seed(self.seed, "epoch", epoch))
        return batches_by_bucket(self.keys, self.batch_size, rng)

    def instance_batch(self, m: int) -> list[int]:
        """Instance indices of micro-step m of this process."""
        g = m * self.world + self.rank
        batch = self._epoch(g // self.batches_per_epoch)[g % self.batches_per_epoch]
        return [i % len(self.instance) for i in batch]

    def prior_batch(self, m: int, count: int) -> list[int]:
        """`count` class-image indices for micro-step m: a seeded permutation of the class set per pass."""
        n, out = len(self.prior), []
        g = m * self.world + self.rank
        for k in range(count):
            c = g * count + k
            perm = torch.randperm(n, generator=generator(self.seed, "prior", c // n))
            out.append(int(perm[c % n]))
        return out

    def epoch_of(self, m: int) -> int:
        return (m * self.world + self.rank) // self.batches_per_epoch
