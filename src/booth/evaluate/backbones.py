"""Evaluator backbones for DreamBench metrics: DINO ViT-S/16 and CLIP (evaluation.md §2.2, §8.3).

- `DinoBackbone`: a transformers `ViTModel` in the layout of the hub's ``facebook/dino-vits16`` (the same
  weights as ``torch.hub`` ``dino_vits16``); the feature is the CLS token of the last hidden state after the
  final layer norm (384-d for ViT-S/16), as the hub model returns it. Preprocessing as Custom Diffusion's and
  ImagenHub's DINO code: shortest edge to 256 (bicubic), centre crop 224, ImageNet mean / std. For a model of
  another input size s the resize is round(s * 256 / 224) and the crop s.
- `ClipBackbone`: any transformers `CLIPModel` folder or hub id (default ``openai/clip-vit-base-patch32``, the
  de-facto DreamBench choice). Preprocessing follows the folder's ``preprocessor_config.json``
  (`CLIPImageProcessor`: shortest edge 224 bicubic, centre crop 224, CLIP mean / std) with booth-mini's numpy
  implementation (`booth.mini.check.preprocess`); without that file, those defaults at the model's image size.

Both load from a local folder (never touching the network) or a hub id. A hub id is read from the local cache
only when ``HF_HUB_OFFLINE=1`` (or no network): if it is not there, `NetworkRequiredError` says to download
it first. Features come back float32, not normalised; `normalize` before taking cosines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from booth.errors import BoothError, NetworkRequiredError

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _processor_dict(resize: int, crop: int, mean, std) -> dict[str, Any]:
    """A `CLIPImageProcessor`-style dict for `booth.mini.check.preprocess`."""
    return {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": resize},
        "resample": BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": crop, "width": crop},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
    }


def _pixels(images: Sequence[Image.Image], pre: dict[str, Any]) -> torch.Tensor:
    from booth.mini.check import preprocess

    return torch.from_numpy(np.stack([preprocess(im, pre) for im in images]))


def _is_hub_id(source: str) -> bool:
    from booth.models.loading import _HUB_ID

    return bool(_HUB_ID.match(source)) and ".." not in source


def load_pretrained(cls, source: str | Path, what: str, **kwargs):
    """`cls.from_pretrained(source)`: a local folder offline, a hub id from the cache when offline.

    Raises BoothError for a missing path, NetworkRequiredError for a hub id that is not downloaded while the hub
    cannot be reached."""
    from booth.models.loading import _first_line, hub_offline, is_connection_error

    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BoothError(
                f"{what} folder {path} has no config.json (expected a transformers model folder)"
            )
        try:
            return cls.from_pretrained(str(path), local_files_only=True, **kwargs)
        except (OSError, ValueError) as error:
            raise BoothError(f"cannot load the {what} from {path} ({_first_line(error)})") from None
    if isinstance(source, Path) or not _is_hub_id(text) or path.exists():
        raise BoothError(f"{what} not found: {text} (pass a local model folder or a hub id)")
    offline = hub_offline()
    try:
        return cls.from_pretrained(text, local_files_only=offline, **kwargs)
    except OSError as error:
        if offline or is_connection_error(error):
            raise NetworkRequiredError(
                f"the {what} '{text}' must be downloaded first: it is not in the local Hugging Face cache and "
                f"the hub cannot be reached (offline). On a machine with network run `hf download {text}` "
                f"(or save it with from_pretrained/save_pretrained) and pass the folder"
            ) from None
        raise BoothError(f"cannot load the {what} '{text}' ({_first_line(error)})") from None


class DinoBackbone:
    """DINO ViT (``facebook/dino-vits16`` layout): CLS features of images."""

    kind = "dino"

    def __init__(self, source: str | Path = DEFAULT_DINO, device: str | torch.device = "cpu"):
        from transformers import ViTModel

        self.source = str(source)
        model = load_pretrained(ViTModel, source, "DINO evaluator", add_pooling_layer=False)
        self.model = model.float().eval().to(device)
        self.device = torch.device(device)
        size = self.model.config.image_size
        size = size if isinstance(size, int) else int(size[0])
        self.resize, self.crop = round(size * 256 / 224), size
        self.pre = _processor_dict(self.resize, self.crop, IMAGENET_MEAN, IMAGENET_STD)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image], batch: int = 32) -> torch.Tensor:
        """[N, hidden] CLS tokens (last layer, after the final layer norm)."""
        images = list(images)
        if not images:
            return torch.zeros(0, self.model.config.hidden_size)
        out = [
            self.model(
                pixel_values=_pixels(images[i : i + batch], self.pre).to(self.device)
            ).last_hidden_state[:, 0]
            for i in range(0, len(images), batch)
        ]
        return torch.cat(out).float().cpu()

    def describe(self) -> dict[str, Any]:
        c = self.model.config
        return {
            "name": self.source,
            "class": "transformers.ViTModel (DINO)",
            "feature": "CLS token of the last hidden state (after the final layer norm)",
            "feature_dim": c.hidden_size,
            "patch_size": c.patch_size,
            "preprocessing": f"resize shortest edge {self.resize} bicubic, centre crop {self.crop}, "
            f"ImageNet mean {list(IMAGENET_MEAN)} / std {list(IMAGENET_STD)}",
        }


class ClipBackbone:
    """Any CLIP (`transformers.CLIPModel`): image and text embeddings in the shared space."""

    kind = "clip"

    def __init__(self, source: str | Path = DEFAULT_CLIP, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        self.source = str(source)
        self.model = load_pretrained(CLIPModel, source, "CLIP evaluator").float().eval().to(device)
        self.device = torch.device(device)
        self.tokenizer = load_pretrained(CLIPTokenizer, source, "CLIP evaluator's tokenizer")
        self.pre = self._preprocessor(source)

    def _preprocessor(self, source: str | Path) -> dict[str, Any]:
        size = self.model.config.vision_config.image_size
        default = _processor_dict(size, size, CLIP_MEAN, CLIP_STD)
        path = Path(str(source)).expanduser()
        if path.is_dir():
            file = path / "preprocessor_config.json"
            self.pre_source = "preprocessor_config.json" if file.is_file() else "CLIP defaults"
            return {**default, **json.loads(file.read_text())} if file.is_file() else default
        try:  # the hub model's preprocessor_config.json from the cache (or the hub when online)
            from huggingface_hub import hf_hub_download

            from booth.models.loading import hub_offline

            file = hf_hub_download(str(source), "preprocessor_config.json", local_files_only=hub_offline())
            self.pre_source = "preprocessor_config.json"
            return {**default, **json.loads(Path(file).read_text())}
        except (OSError, ValueError):  # not there: CLIP's standard preprocessing at the model's size
            self.pre_source = "CLIP defaults"
            return default

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image], batch: int = 32) -> torch.Tensor:
        """[N, projection_dim] image embeddings (not normalised)."""
        from booth.mini.architecture import pooled

        images = list(images)
        if not images:
            return torch.zeros(0, self.model.config.projection_dim)
        out = [
            pooled(
                self.model.get_image_features(
                    pixel_values=_pixels(images[i : i + batch], self.pre).to(self.device)
                )
            )
            for i in range(0, len(images), batch)
        ]
        return torch.cat(out).float().cpu()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, projection_dim] text embeddings (not normalised); texts over the context length are truncated."""
        from booth.mini.architecture import pooled

        max_length = self.model.config.text_config.max_position_embeddings
        ids = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length)
        features = self.model.get_text_features(
            input_ids=torch.tensor(ids["input_ids"], device=self.device),
            attention_mask=torch.tensor(ids["attention_mask"], device=self.device),
        )
        return pooled(features).float().cpu()

    def describe(self) -> dict[str, Any]:
        vision = self.model.config.vision_config
        pre = self.pre
        return {
            "name": self.source,
            "class": "transformers.CLIPModel",
            "feature": "image / text embeddings after the projection",
            "feature_dim": self.model.config.projection_dim,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "preprocessing": f"resize shortest edge {pre['size']['shortest_edge']} "
            f"(PIL resample {pre.get('resample', BICUBIC)}), centre crop "
            f"{pre['crop_size']['height']}x{pre['crop_size']['width']}, mean {list(pre['image_mean'])} / "
            f"std {list(pre['image_std'])} (from {self.pre_source})",
        }


def mini_clip_dir(model: str | Path | None) -> Path | None:
    """booth-mini's CLIP evaluator for `model` (None = booth-mini, or a model folder holding ``clip/``)."""
    from booth.models.loading import default_model_path

    root = default_model_path() if model is None else Path(str(model)).expanduser()
    clip = root / "clip"
    return clip if root.is_dir() and (clip / "config.json").is_file() else None


def default_backbones(model: str | Path | None) -> tuple[str | None, str]:
    """(DINO, CLIP) sources for `model`: in the mini world booth-mini's CLIP and no DINO (there is none), else
    ``facebook/dino-vits16`` and ``openai/clip-vit-base-patch32``."""
    mini = mini_clip_dir(model)
    if mini is not None:
        return None, str(mini)
    return DEFAULT_DINO, DEFAULT_CLIP


# ------------------------------------------------------------------------------------------------
# tiny random backbones (tests, demos): same classes and files as the real ones, a few thousand parameters


def write_tiny_dino(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A randomly initialised DINO-layout `ViTModel` (patch 16, width 32) saved as a model folder."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=16,
        qkv_bias=True,
    )
    torch.manual_seed(seed)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return Path(folder)


def write_tiny_clip(
    folder: str | Path, seed: int = 0, image_size: int = 32, preprocessor: bool = True
) -> Path:
    """A randomly initialised `CLIPModel` with a truncated CLIP BPE tokenizer (and, by default, a
    preprocessor_config.json) saved as a model folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from booth.models.tiny import TINY_MERGES
    from booth.models.tokenizer import write_clip_tokenizer_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer_files(folder, TINY_MERGES)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 8,
    }
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    if preprocessor:
        processor = {
            "image_processor_type": "CLIPImageProcessor",
            **_processor_dict(image_size, image_size, CLIP_MEAN, CLIP_STD),
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return folder


__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_DINO",
    "ClipBackbone",
    "DinoBackbone",
    "default_backbones",
    "load_pretrained",
    "mini_clip_dir",
    "normalize",
    "write_tiny_clip",
    "write_tiny_dino",
]
