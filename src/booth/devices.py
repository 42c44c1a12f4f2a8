"""Device selection shared by generation, training and the CLI."""

from __future__ import annotations

import torch

from booth.errors import BoothError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None -> "cuda" when a GPU is present, else "cpu"; a BoothError for unknown or unavailable devices."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise BoothError(f"unknown device {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BoothError(f"device {device!r} is not available (no CUDA GPU)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise BoothError(f"device {device!r} is not available")
    return resolved


def resolve_dtype(name: str | None, device: str | torch.device) -> torch.dtype:
    """A torch dtype by name ("float16", "bfloat16", "float32"); None -> float16 on CUDA, else float32."""
    if name:
        if name not in ("float16", "bfloat16", "float32"):
            raise BoothError(f"unknown dtype {name!r}; choose float16, bfloat16 or float32")
        return getattr(torch, name)
    return torch.float16 if str(device).startswith("cuda") else torch.float32
