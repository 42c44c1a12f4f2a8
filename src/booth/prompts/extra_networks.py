"""Extra-network tags `<kind:arg1:arg2:key=value>` and the hook that adapters plug into.

A1111 modules/extra_networks.py: tags are cut out of the prompt before encoding; each registered handler (LoRA,
hypernetwork, ...) is activated with the calls of its kind, and with an empty list when the prompt has none, so
that it can undo what an earlier prompt applied. Unknown kinds are skipped with a warning.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from booth.errors import BoothError

_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkCall:
    """One tag: `<lora:name:0.8:unet=0.5>` -> kind "lora", positional ("name", "0.8"), named {"unet": "0.5"}."""

    kind: str
    positional: tuple[str, ...] = ()
    named: dict[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def from_args(cls, kind: str, args: str) -> ExtraNetworkCall:
        """Split the text after `kind:` on ":"; an item with exactly one "=" is `key=value`."""
        positional, named = [], {}
        for item in args.split(":"):
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        return cls(kind, tuple(positional), named)


def parse_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkCall]]:
    """Remove every `<kind:args>` tag from the prompt and return the text and the calls, in order.

    >>> parse_extra_networks("a cat <lora:ink:0.7>")
    ('a cat ', [ExtraNetworkCall(kind='lora', positional=('ink', '0.7'), named={})])
    """
    calls: list[ExtraNetworkCall] = []

    def cut(match: re.Match) -> str:
        calls.append(ExtraNetworkCall.from_args(match.group(1), match.group(2)))
        return ""

    return _TAG.sub(cut, prompt), calls


def _number(call: ExtraNetworkCall, text: str, kind: type) -> Any:
    """`float(text)` or `int(text)` with a one-line user error naming the tag."""
    try:
        return kind(text)
    except ValueError:
        raise BoothError(f"<{call.kind}:...> expects a number, got {text!r}") from None


@dataclass(frozen=True)
class LoraCall:
    """The meaning of `<lora:NAME:TE:UNET:DYN>` / `<lora:NAME:te=..:unet=..:dyn=..>`.

    A1111 extensions-builtin/Lora/extra_networks_lora.py: `te` defaults to 1.0, `unet` to `te`, `dyn` (DyLoRA
    rank) to None; named values override positional ones.
    """

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None

    @classmethod
    def from_call(cls, call: ExtraNetworkCall) -> LoraCall:
        """Interpret a `lora` tag."""
        pos = call.positional
        if not pos or not pos[0]:
            raise BoothError(f"<{call.kind}:...> needs a LoRA name as its first argument")
        te = _number(call, call.named.get("te", pos[1] if len(pos) > 1 else "1.0"), float)
        unet = _number(call, call.named["unet"], float) if "unet" in call.named else None
        if unet is None:
            unet = _number(call, pos[2], float) if len(pos) > 2 else te
        dyn_text = call.named.get("dyn", pos[3] if len(pos) > 3 else None)
        dyn = _number(call, dyn_text, int) if dyn_text is not None else None
        return cls(pos[0], te, unet, dyn)


@runtime_checkable
class ExtraNetworkHandler(Protocol):
    """An adapter for one tag kind (e.g. "lora"). A1111 modules/extra_networks.py, class ExtraNetwork."""

    kind: str

    def activate(self, pipeline: Any, calls: list[ExtraNetworkCall]) -> None:
        """Apply `calls` (possibly none: then undo anything applied before) to the pipeline."""

    def deactivate(self, pipeline: Any) -> None:
        """Called after generation; may keep weights loaded for the next prompt."""

    def infotext_params(self) -> dict[str, str]:
        """Infotext keys for what the activations since the last `deactivate` applied (one generation), e.g.
        {"Lora hashes": "name: hash"}."""


class ExtraNetworkRegistry:
    """The handlers of one engine, by kind."""

    def __init__(self, handlers: list[ExtraNetworkHandler] | None = None):
        self.handlers: dict[str, ExtraNetworkHandler] = {}
        for handler in handlers or []:
            self.register(handler)

    def register(self, handler: ExtraNetworkHandler) -> None:
        """Add a handler; one per kind."""
        if handler.kind in self.handlers:
            raise BoothError(f"an extra-network handler for {handler.kind!r} is already registered")
        self.handlers[handler.kind] = handler

    def activate_all(self, pipeline: Any, calls: list[ExtraNetworkCall]) -> None:
        """Activate every handler with its calls (an empty list if none); warn about and skip unknown kinds."""
        by_kind: dict[str, list[ExtraNetworkCall]] = {kind: [] for kind in self.handlers}
        for call in calls:
            if call.kind in by_kind:
                by_kind[call.kind].append(call)
            else:
                warnings.warn(f"skipping unknown extra network: <{call.kind}:...>", UserWarning, stacklevel=2)
        for kind, handler in self.handlers.items():
            handler.activate(pipeline, by_kind[kind])

    def deactivate_all(self, pipeline: Any) -> None:
        """Deactivate every registered handler."""
        for handler in self.handlers.values():
            handler.deactivate(pipeline)

    def infotext_params(self) -> dict[str, str]:
        """The infotext keys of all handlers, merged in registration order."""
        params: dict[str, str] = {}
        for handler in self.handlers.values():
            params.update(handler.infotext_params())
        return params
