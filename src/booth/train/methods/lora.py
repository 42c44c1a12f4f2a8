"""DreamBooth-LoRA (Ruiz et al. 2022 with Hu et al. 2021 adapters): the base model stays frozen; a rank-r
update (alpha / r) B A trains on the chosen UNet (and optionally text-encoder) projections, through PEFT; or a
LyCORIS update (LoHa, LoKr; `LoraConfig.algo`), written as a LyCORIS file only.

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
            adapter = _adapter_config(cfg, alpha, list(targets))
            try:
                attach_lora_adapter(module, adapter)
            except ValueError as error:  # PEFT: "Target modules {...} not found in the base model"
                raise BoothError(
                    f"LoRA targets {', '.join(targets)} do not fit the {component}: {error}"
                ) from None
            for name, p in module.named_parameters():  # only the adapter trains, kept in float32
                trained = any(part in name for part in ADAPTER_PARTS)
                p.requires_grad_(trained)
                if trained:
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
        if cfg.algo != "lora":
            from booth.train.formats.lycoris import save_lycoris

            name = self.config.run_name
            return save_lycoris(
                out, self.pipe, name=name, algo=cfg.algo, alpha=alpha, rank=cfg.rank, metadata=metadata
            )
        return save_lora(
            out, self.pipe, name=self.config.run_name, alpha=alpha, rank=cfg.rank, metadata=metadata
        )


ADAPTER_PARTS = ("lora_", "hada_", "lokr_")  # parameter names of PEFT's LoRA, LoHa and LoKr layers


def _adapter_config(cfg, alpha: float, targets: list[str]):
    """PEFT's config for `cfg.algo`: LoRA (B zero-initialised, A Gaussian), LoHa or LoKr (PEFT's defaults,
    which also start at ΔW = 0)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if cfg.algo == "loha":
        return LoHaConfig(r=cfg.rank, alpha=alpha, module_dropout=cfg.dropout, target_modules=targets)
    if cfg.algo == "lokr":
        return LoKrConfig(r=cfg.rank, alpha=alpha, module_dropout=cfg.dropout, target_modules=targets)
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=alpha,
        lora_dropout=cfg.dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
