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
class WeightSchedule:
    """A weight that changes over a pass (the loractl extension's `w@s,w@s,...`): keyframes (s, w), s up to 1 a
    share of the pass's steps, above 1 a step number; linear between keyframes, the first and last weights
    before and after them."""

    points: tuple[tuple[float, float], ...]

    def at(self, step: int, steps: int) -> float:
        """The weight at sampling step `step` (0-based) of a pass of `steps`."""
        keys = sorted((s * steps if s <= 1 else s, w) for s, w in self.points)
        if step <= keys[0][0]:
            return keys[0][1]
        for (x0, w0), (x1, w1) in zip(keys, keys[1:]):
            if step <= x1:
                return w0 + (w1 - w0) * (step - x0) / (x1 - x0) if x1 > x0 else w1
        return keys[-1][1]


def _weight(call: ExtraNetworkCall, text: str) -> float | WeightSchedule:
    """A number, or loractl's keyframes `w@s` separated by commas or semicolons."""
    if "@" not in text:
        return _number(call, text, float)
    points = []
    for item in re.split(r"[,;]", text):
        weight, _, at = item.strip().partition("@")
        points.append((_number(call, at or "0", float), _number(call, weight, float)))
    return WeightSchedule(tuple(points))


@dataclass(frozen=True)
class LoraCall:
    """The meaning of `<lora:NAME:TE:UNET:DYN>` / `<lora:NAME:te=..:unet=..:dyn=..>`.

    A1111 extensions-builtin/Lora/extra_networks_lora.py: `te` defaults to 1.0, `unet` to `te`, `dyn` (DyLoRA
    rank) to None; named values override positional ones. The loractl extension's weight schedules: a weight may
    be keyframes `w@s,...` (`WeightSchedule`); `hr` / `hrunet` give the UNet's weight in hires fix's second pass
    (default: its first-pass schedule over that pass). The text encoders encode once, with the weight at step 0.
    """

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    unet_schedule: WeightSchedule | None = None  # None: `unet` throughout
    hires_unet: float | WeightSchedule | None = None  # None: as in the first pass

    @property
    def scheduled(self) -> bool:
        return self.unet_schedule is not None or self.hires_unet is not None

    def unet_at(self, step: int, steps: int, hires: bool = False) -> float:
        """The UNet's weight at sampling step `step` (0-based) of a pass of `steps` (`hires`: the second)."""
        weight = self.hires_unet if hires and self.hires_unet is not None else self.unet_schedule or self.unet
        return weight.at(step, steps) if isinstance(weight, WeightSchedule) else weight

    @classmethod
    def from_call(cls, call: ExtraNetworkCall) -> LoraCall:
        """Interpret a `lora` tag."""
        pos = call.positional
        if not pos or not pos[0]:
            raise BoothError(f"<{call.kind}:...> needs a LoRA name as its first argument")
        if "hrte" in call.named:
            raise BoothError(f"<{call.kind}:...> hrte: booth encodes the hires prompt with the te weight")
        te = _weight(call, call.named.get("te", pos[1] if len(pos) > 1 else "1.0"))
        unet = _weight(call, call.named["unet"]) if "unet" in call.named else None
        if unet is None:
            unet = _weight(call, pos[2]) if len(pos) > 2 else te
        dyn_text = call.named.get("dyn", pos[3] if len(pos) > 3 else None)
        dyn = _number(call, dyn_text, int) if dyn_text is not None else None
        hires_text = call.named.get("hrunet", call.named.get("hr"))
        hires = _weight(call, hires_text) if hires_text is not None else None
        te_now = te.at(0, 1) if isinstance(te, WeightSchedule) else te
        schedule = unet if isinstance(unet, WeightSchedule) else None
        unet_now = unet.at(0, 1) if schedule is not None else unet
        return cls(pos[0], te_now, unet_now, dyn, schedule, hires)


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

    def step(self, pipeline: Any, step: int, steps: int, hires: bool = False) -> None:
        """Tell the handlers that change over a pass (LoRA weight schedules) which sampling step comes next."""
        for handler in self.handlers.values():
            if hasattr(handler, "step"):
                handler.step(pipeline, step, steps, hires)

    def scheduled(self, calls: list[ExtraNetworkCall]) -> bool:
        """Whether any handler's calls among `calls` change over a pass."""
        return any(
            hasattr(handler, "scheduled") and handler.scheduled([c for c in calls if c.kind == kind])
            for kind, handler in self.handlers.items()
        )

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
