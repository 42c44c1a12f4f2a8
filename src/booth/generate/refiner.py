"""The refiner: another model of the same family takes over the sampling part-way (A1111 `apply_refiner` in
`sd_samplers_common.py`, `a1111.md` §9; the SDXL paper's ensemble of expert denoisers, Podell et al. 2023 §2.5).

The sampler and its state run on unchanged; from the first model call at which `refiner_switch_at` of the
sampling is done, the refiner's UNet denoises, on the prompts encoded again by its own text encoder(s) with
the prompt's extra networks, and its VAE decodes. "Done" is read off the timestep the sampler has reached
(A1111's default): completed = (999 - t) / 1000, so 0.8 hands over the last fifth of the noise levels, not
of the steps; the option `refiner_switch_by_sample_steps` counts sampling steps instead. With hires fix the
option `hires_fix_refiner_pass` picks the pass(es) the refiner takes part in, the second by default.
"""

from __future__ import annotations

from booth.generate.params import GenerationParams


def completed_ratio(params: GenerationParams, t: float, step: int, steps: int) -> float:
    """How much of the pass is done at timestep `t`, sampling step `step` (0-based) of `steps`: A1111's
    (999 - timestep) / 1000 with the nearest whole timestep (its argmin over the sigma table), or step / steps
    with `refiner_switch_by_sample_steps`."""
    if params.refiner_switch_by_sample_steps:
        return step / steps
    return (999 - round(float(t))) / 1000


def refiner_due(params: GenerationParams, t: float, step: int, steps: int) -> bool:
    """Whether the refiner takes over at this model call (`refiner_switch_at` None: from the first)."""
    switch_at = params.refiner_switch_at
    return switch_at is None or completed_ratio(params, t, step, steps) >= switch_at


def refiner_passes(params: GenerationParams) -> tuple[bool, bool]:
    """(first pass, hires pass): where the refiner may take over. Without hires fix, the only pass."""
    if not params.enable_hr:
        return True, False
    mode = params.hires_fix_refiner_pass
    return mode in ("first pass", "both passes"), mode in ("second pass", "both passes")


def infotext_fields(params: GenerationParams, title: str) -> dict[str, object]:
    """A1111's keys once the refiner took over: `Refiner` (its short title), `Refiner switch at` (left out
    when None, as A1111's infotext leaves out None values), `Hires refiner` (a pass other than the second)
    and `Refiner switch by sampling steps`."""
    fields: dict[str, object] = {"Refiner": title}
    if params.refiner_switch_at is not None:
        fields["Refiner switch at"] = params.refiner_switch_at
    if params.enable_hr and params.hires_fix_refiner_pass != "second pass":
        fields["Hires refiner"] = params.hires_fix_refiner_pass
    if params.refiner_switch_by_sample_steps:
        fields["Refiner switch by sampling steps"] = True
    return fields
