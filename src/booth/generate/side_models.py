"""The other models a call's passes run on beside its own: a hires checkpoint and a refiner
(`Engine.generate(..., hires_engine=, refiner_engine=)`), loaded by whoever runs the jobs (`booth generate`,
the server) and kept across the jobs that name them."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

ROLES = ("hires_engine", "refiner_engine")


def side_model_names(params) -> dict[str, str | None]:
    """The models `params` names for each role (None: none, or A1111's "Use same checkpoint" / "None")."""
    return {"hires_engine": params.hires_checkpoint(), "refiner_engine": params.refiner()}


class SideModels:
    """Side models by key (a path, a hub id or a server title), each loaded once (`load(role, key)`); those a
    job does not name are let go when another has to load, so at most the models of one job stay beside it."""

    def __init__(self, load: Callable[[str, str], Any]):
        self.load = load
        self.loaded: dict[str, Any] = {}

    def engines_for(self, names: dict[str, str | None], own: str, engine) -> dict[str, Any]:
        """`Engine.generate`'s keyword arguments for a job on `engine` (the model `own`) whose roles name the
        models `names`: a role naming `own` gets `engine` itself (nothing to load or switch to)."""
        wanted = {role: key for role, key in names.items() if key is not None and key != own}
        if set(wanted.values()) - set(self.loaded):  # the ones not wanted go before another loads
            for key in set(self.loaded) - set(wanted.values()):
                del self.loaded[key]
            gc.collect()
        for role, key in wanted.items():
            if key not in self.loaded:
                self.loaded[key] = self.load(role, key)
        return {
            role: engine if names.get(role) == own else self.loaded.get(wanted.get(role)) for role in ROLES
        }


__all__ = ["ROLES", "SideModels", "side_model_names"]
