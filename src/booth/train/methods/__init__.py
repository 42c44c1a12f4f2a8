"""Training methods, one file each; `get_method(config)` builds the one `config.method` names."""

from __future__ import annotations

from importlib import import_module

from booth.errors import BoothError
from booth.train.methods.base import Method

# name -> "module:Class" (imported when used)
METHOD_CLASSES: dict[str, str] = {
    "dreambooth": "booth.train.methods.dreambooth:DreamBooth",
    "lora": "booth.train.methods.lora:Lora",
    "textual-inversion": "booth.train.methods.textual_inversion:TextualInversion",
    "custom-diffusion": "booth.train.methods.custom_diffusion:CustomDiffusion",
}


def method_class(name: str) -> type[Method]:
    """The class of the method called `name`."""
    try:
        module, cls = METHOD_CLASSES[name].split(":")
    except KeyError:
        raise BoothError(f"unknown method {name!r}; choose one of {', '.join(METHOD_CLASSES)}") from None
    return getattr(import_module(module), cls)


def get_method(config) -> Method:
    """An instance of the method `config.method` names."""
    return method_class(config.method)(config)


__all__ = ["METHOD_CLASSES", "Method", "get_method", "method_class"]
