"""Training methods, one file each; `get_method(config)` picks the class for `config.method`."""

from __future__ import annotations

from booth.errors import BoothError
from booth.train.methods.base import Method
from booth.train.methods.dreambooth import DreamBooth
from booth.train.methods.lora import Lora

METHOD_CLASSES: dict[str, type[Method]] = {cls.name: cls for cls in (DreamBooth, Lora)}


def get_method(config) -> Method:
    """An instance of the method `config.method` names."""
    try:
        return METHOD_CLASSES[config.method](config)
    except KeyError:
        raise BoothError(
            f"unknown method {config.method!r}; choose one of {', '.join(METHOD_CLASSES)}"
        ) from None


__all__ = ["METHOD_CLASSES", "Method", "get_method"]
