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
        if cfg.init is not None:
            _start_from(pipe, cfg.init, self.components)

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


def _start_from(pipe, path: str, components: list[str]) -> None:
    """Copy a LoRA file's matrices into the "default" adapter being trained (kohya `--network_weights`): the file
    loads as a second adapter through booth's loader (any naming), each of its layers' A and B go into the
    trained adapter's, B rescaled by the ratio of the two adapters' scales so the start is the file's LoRA."""
    import torch
    from peft.tuners.lora import LoraLayer

    from booth.generate.networks import LoraNetwork
    from booth.train.formats.lora import COMPONENTS, lora_file, read_lora_info

    path = lora_file(path)
    name = "booth_init"
    read_lora_info(path)  # a plain LoRA file, or a one-line error
    network = LoraNetwork()
    loaded = network.load(pipe, name, path)
    copied = missing = 0
    with torch.no_grad():
        for component in COMPONENTS:
            model = getattr(pipe, component, None)
            if model is None:
                continue
            for module_name, layer in model.named_modules():
                if not isinstance(layer, LoraLayer) or loaded not in layer.lora_A:
                    continue
                if "default" not in layer.lora_A:
                    missing += 1
                    continue
                a, b = layer.lora_A[loaded].weight, layer.lora_B[loaded].weight
                if a.shape != layer.lora_A["default"].weight.shape:
                    raise BoothError(
                        f"--init-lora {path.name} has rank {a.shape[0]} at {component}.{module_name}; the run trains "
                        f"rank {layer.lora_A['default'].weight.shape[0]} (set --rank to match)"
                    )
                ratio = layer.scaling[loaded] / layer.scaling["default"]
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b * ratio)
                copied += 1
    network.unload(pipe, path)
    # the trained adapter active and trainable again (loading the file switched to its adapter)
    for component in components:
        for layer in getattr(pipe, component).modules():
            if isinstance(layer, LoraLayer):
                layer.set_adapter("default")
    if missing:
        raise BoothError(
            f"--init-lora {path.name} adapts {missing} layer(s) this run does not train (--lora-targets, "
            "--lora-text-encoder): continuing it would lose them"
        )
    if not copied:
        raise BoothError(f"--init-lora {path.name} has no layer this run trains")


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
