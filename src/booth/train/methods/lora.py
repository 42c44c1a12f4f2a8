"""DreamBooth-LoRA (Ruiz et al. 2022 with Hu et al. 2021 adapters): the base model stays frozen; a rank-r
update (alpha / r) B A trains on the chosen UNet (and optionally text-encoder) projections, through PEFT.

Output: ``pytorch_lora_weights.safetensors`` (diffusers `load_lora_weights`) and ``<name>.safetensors`` in
kohya/A1111 format (`lora_unet_...`, `.alpha`, `ss_*` metadata), which A1111, ComfyUI and diffusers' converter
load; `<lora:name:w>` in booth prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from booth.errors import BoothError
from booth.train.methods.base import TEXT_ENCODERS, Method


class Lora(Method):
    name = "lora"
    default_lr = 1e-4  # diffusers DreamBooth-LoRA README

    def prepare(self, pipe) -> None:
        from peft import LoraConfig

        from booth.train.formats.lora import attach_lora_adapter

        super().prepare(pipe)
        cfg = self.config.lora
        alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
        plan = [("unet", cfg.unet_targets)]
        if cfg.text_encoder:
            plan += [
                (n, cfg.text_encoder_targets) for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None
            ]
        self.components = []
        for component, targets in plan:
            module = getattr(pipe, component)
            adapter = LoraConfig(
                r=cfg.rank,
                lora_alpha=alpha,
                lora_dropout=cfg.dropout,
                init_lora_weights="gaussian",
                target_modules=list(targets),
            )
            try:
                attach_lora_adapter(module, adapter)
            except ValueError as error:  # PEFT: "Target modules {...} not found in the base model"
                raise BoothError(
                    f"LoRA targets {', '.join(targets)} do not fit the {component}: {error}"
                ) from None
            for name, p in module.named_parameters():  # only the adapter trains, kept in float32
                p.requires_grad_("lora_" in name)
                if "lora_" in name:
                    p.data = p.data.float()
            self.components.append(component)

    @contextmanager
    def base_model(self) -> Iterator[None]:
        from booth.train.formats.lora import set_lora_layers_enabled

        modules = self.modules().values()
        for m in modules:
            set_lora_layers_enabled(m, False)
        try:
            yield
        finally:
            for m in modules:
                set_lora_layers_enabled(m, True)

    def save(self, out: Path, metadata: dict[str, str]) -> dict[str, Path]:
        from booth.train.formats.lora import save_lora

        cfg = self.config.lora
        alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
        return save_lora(
            out, self.pipe, name=self.config.run_name, alpha=alpha, rank=cfg.rank, metadata=metadata
        )
