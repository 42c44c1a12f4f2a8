"""What a training method is: which parameters train, how the frozen base model is reached for prior
targets, and how the result is written. The training loop (`booth.train.loop`) is the same for every method.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from booth.errors import BoothError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class Method:
    """Base class of a training method (subclasses: one file each in this package).

    A method is set up on a loaded pipeline (`prepare`), after which `components` names the pipeline modules
    that hold trainable parameters ("unet", "text_encoder", ...). The loop optimizes `parameter_groups`, saves
    `state_dict` in checkpoints and calls `save` at the end.
    """

    name: str = ""
    default_lr: float = 1e-4

    @classmethod
    def check_config(cls, config) -> None:
        """Raise a BoothError for settings this method cannot use (called before anything is loaded)."""

    def __init__(self, config):
        self.config = config
        self.pipe: Any = None
        self.components: list[str] = []

    # --- set-up --------------------------------------------------------------------------------------------

    def prepare(self, pipe) -> None:
        """Freeze the pipeline, then make this method's parameters trainable (subclasses extend)."""
        self.pipe = pipe
        for module in self.modules(all_components=True).values():
            module.requires_grad_(False)

    def modules(self, all_components: bool = False) -> dict[str, torch.nn.Module]:
        """The pipeline modules by name: the trained ones, or every UNet/text-encoder/VAE module."""
        names = ("unet", "vae", *TEXT_ENCODERS) if all_components else self.components
        return {n: getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None}

    @property
    def trains_text_encoder(self) -> bool:
        """True when text embeddings change during training (they cannot be cached then)."""
        return any(c in TEXT_ENCODERS for c in self.components)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by "component.parameter name"."""
        return {
            f"{c}.{n}": p
            for c, m in self.modules().items()
            for n, p in m.named_parameters()
            if p.requires_grad
        }

    def parameter_groups(self, lr: float, text_encoder_lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: UNet parameters at `lr`, text-encoder parameters at `text_encoder_lr`."""
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for name, p in self.trainable_parameters().items():
            rate = text_encoder_lr if name.split(".", 1)[0] in TEXT_ENCODERS else lr
            groups.setdefault(rate, []).append(p)
        if not groups:
            raise BoothError(f"method {self.name} found no parameters to train")
        return [{"params": ps, "lr": rate} for rate, ps in groups.items()]

    # --- hooks of the training step (defaults: the plain DreamBooth step) ---------------------------------

    def training_prompts(self, samples, rng) -> list[str]:
        """The prompt of each sample at this step (Textual Inversion draws a template, for example)."""
        return [s.prompt for s in samples]

    @property
    def augments(self) -> bool:
        """True when `augment` returns views (instance latents are then encoded every step, not cached)."""
        return False

    def augment(self, sample, rng):
        """None, or this step's view of an instance sample: (pixels [3, H, W] in [-1, 1], loss mask [1, H, W]
        or None, prompt). A method that augments is encoded by the VAE every step (no latent cache)."""
        return None

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. to re-normalise learned embeddings)."""

    # --- checkpoints ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights (a checkpoint stores this, not the frozen rest of the model)."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_parameters()
        missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
        if missing or unexpected:
            raise BoothError(
                f"checkpoint does not match the {self.name} model: {len(missing)} missing and "
                f"{len(unexpected)} unexpected weights (was it written by another method or model?)"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    # --- the frozen base model (prior targets) -------------------------------------------------------------

    @contextmanager
    def base_model(self) -> Iterator[None]:
        """Within this context the pipeline computes the frozen base model's outputs."""
        raise NotImplementedError

    # --- outputs -------------------------------------------------------------------------------------------

    def save(self, out: Path, metadata: dict[str, str]) -> dict[str, Path]:
        """Write the result into `out`; returns the written files by kind."""
        raise NotImplementedError
