"""ControlNet's "reference_only" preprocessor (sd-webui-controlnet; no ControlNet model): a reference picture steers
the generation through the UNet's self-attention, without training.

At each model call the reference latents, noised to the call's timestep, go through the UNet first ("write"):
every self-attention layer keeps its input. The call itself then runs ("read"): each self-attention layer
attends over its own tokens and the reference's (keys and values from both), so the picture borrows the
reference's appearance. The layers taking part are the widest first, a share `weight` of them (the extension's
`attention_auto_machine_weight`). Style fidelity (threshold A, default 0.5) mixes, on the negative prompt's rows,
plain self-attention into the referenced one: s * plain + (1 - s) * referenced, so guidance pushes towards the
reference by that much.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


class _ReferenceProcessor:
    """Wraps a UNet self-attention processor; `state` says whether it records, reads or passes through."""

    def __init__(self, inner: Any, share: float, state: dict[str, Any]):
        self.inner, self.share, self.state = inner, share, state
        self.bank: list[torch.Tensor] = []

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        state = self.state
        taking_part = self.share < state["weight"]
        if state["mode"] == "write" and taking_part:
            self.bank.append(hidden_states.detach())
        if state["mode"] != "read" or not taking_part or not self.bank:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        context = torch.cat([hidden_states, *self.bank], dim=1)  # its own tokens and the reference's
        self.bank = []
        referenced = self.inner(attn, hidden_states, context, attention_mask, temb, **kwargs)
        uncond, fidelity = state["uncond_rows"], state["style_fidelity"]
        if uncond and fidelity > 1e-5:
            plain = self.inner(attn, hidden_states[:uncond], None, attention_mask, temb, **kwargs)
            mixed = fidelity * plain + (1.0 - fidelity) * referenced[:uncond]
            referenced = torch.cat([mixed, referenced[uncond:]])
        return referenced


@contextlib.contextmanager
def reference_attention(unet):
    """Install reference processors on every self-attention of `unet` for the block; yields the shared state
    (`mode`: "off" | "write" | "read", `weight`, `style_fidelity`, `uncond_rows`). The original processors
    come back at the end."""
    saved = dict(unet.attn_processors)
    state: dict[str, Any] = {"mode": "off", "weight": 1.0, "style_fidelity": 0.5, "uncond_rows": 0}
    selfs = [name for name in saved if name.endswith("attn1.processor")]
    width = {name: unet.get_submodule(name.removesuffix(".processor")).to_q.in_features for name in selfs}
    order = sorted(selfs, key=lambda name: -width[name])  # widest first, as the extension ranks its blocks
    share = {name: i / len(order) for i, name in enumerate(order)}
    processors = {
        name: _ReferenceProcessor(proc, share[name], state) if name in share else proc
        for name, proc in saved.items()
    }
    unet.set_attn_processor(processors)
    try:
        yield state
    finally:
        unet.set_attn_processor(saved)


__all__ = ["reference_attention"]
