"""DreamBooth, full fine-tune (Ruiz et al. 2022): every UNet weight trains (optionally the text encoder too).

Output: a diffusers pipeline folder ``model/`` (loads with `DiffusionPipeline.from_pretrained`) and, with
`save_single_file`, ``<name>.safetensors`` in the original Stable Diffusion layout (A1111, ComfyUI).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from booth.train.methods.base import TEXT_ENCODERS, Method

MODEL_FOLDER = "model"


class DreamBooth(Method):
    name = "dreambooth"
    default_lr = 5e-6  # Ruiz et al. 2022 sec. 4 (Stable Diffusion)

    def prepare(self, pipe) -> None:
        super().prepare(pipe)
        self.components = ["unet"]
        if self.config.train_text_encoder:
            self.components += [n for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None]
        self._frozen = {}
        if self.config.prior.enabled and self.config.prior.mode == "base-model":
            # the teacher: a frozen copy of every module that trains (costs one more copy of those weights)
            self._frozen = {
                n: copy.deepcopy(m).requires_grad_(False).eval() for n, m in self.modules().items()
            }
        for module in self.modules().values():
            module.requires_grad_(True)

    @contextmanager
    def base_model(self) -> Iterator[None]:
        trained = {n: getattr(self.pipe, n) for n in self._frozen}
        for n, m in self._frozen.items():
            setattr(self.pipe, n, m)
        try:
            yield
        finally:
            for n, m in trained.items():
                setattr(self.pipe, n, m)

    def save(self, out: Path, metadata: dict[str, str]) -> dict[str, Path]:
        from booth.fsutil import atomic_folder

        files = {}
        with atomic_folder(out / MODEL_FOLDER) as tmp:
            self.pipe.save_pretrained(tmp, safe_serialization=True)
        files["diffusers"] = out / MODEL_FOLDER
        if self.config.save_single_file:
            from booth.models.single_file import save_single_file

            path = out / f"{self.config.run_name}.safetensors"
            save_single_file(self.pipe, path, metadata=metadata)
            files["single_file"] = path
        return files
