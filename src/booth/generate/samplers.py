"""A1111 sampler names and schedule types, mapped onto diffusers schedulers.

Labels, aliases, default schedules and legacy combined names follow A1111 (`a1111.md` §7); the diffusers
classes and options follow the diffusers mapping table (`a1111.md` §8). A combination diffusers cannot express
raises `BoothError` instead of silently dropping the option.

Discretisation choices (documented once here, applied by `make_scheduler`):

* Every schedule type sets the scheduler options it needs explicitly, so options in the model's own scheduler
  config (`use_karras_sigmas`, `algorithm_type`, `timestep_spacing` ...) never leak into another choice.
* `Uniform` / `Normal` -> `timestep_spacing="linspace"`: A1111's k-diffusion samplers take sigmas at
  t = linspace(999, 0, n), which is diffusers' "linspace" for the k-style schedulers.
* `SGM Uniform` / `Simple` -> `timestep_spacing="trailing"` (diffusers scheduler overview, `a1111.md` §8).
* `DDIM` (schedule type) -> `timestep_spacing="leading"`, `steps_offset=1`: t = 1, 1 + 1000//n, ... — the grid
  A1111's timestep samplers (DDIM, PLMS, UniPC) always use, hence their "Automatic". (The multistep
  DPM-Solver / UniPC / DEIS schedulers' own "leading" grid divides by n + 1 instead of n.)
* `Karras` / `Exponential` / `Beta` -> `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas` plus
  `timestep_spacing="linspace"`: the k-style diffusers schedulers take sigma_min/sigma_max from the spaced
  grid, and only "linspace" spans A1111's full range [sigma(t=0), sigma(t=999)].
* `Polyexponential` uses A1111's default rho = 1, where it equals `Exponential` exactly.
* DPM-Solver samplers use `final_sigmas_type="zero"` (k-diffusion appends sigma = 0) with
  `lower_order_final=True`, which makes the last step first order like k-diffusion's DPM++ 2M.
* DDIM and PLMS set `clip_sample=False`, `set_alpha_to_one=False` (A1111's timestep samplers: no x_0 clipping,
  the last step lands on alphas_cumprod[0]) whatever the model's scheduler config says or omits.
* Ancestral and SDE samplers run with eta = 1 in diffusers; DDIM's eta (A1111 default 0) is bound
  to the scheduler's `step`.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from booth.errors import BoothError

if TYPE_CHECKING:
    from diffusers import SchedulerMixin


@dataclass(frozen=True)
class ScheduleSpec:
    """One A1111 schedule type (`modules/sd_schedulers.py`, `a1111.md` §7.2)."""

    name: str  # A1111 internal name, e.g. "sgm_uniform"
    label: str  # A1111 UI / infotext label, e.g. "SGM Uniform"
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False
    spacing: str | None = None  # diffusers `timestep_spacing`, None: keep the scheduler's
    sigmas: str | None = None  # diffusers flag: "karras" | "exponential" | "beta"
    steps_offset: int | None = None


@dataclass(frozen=True)
class SamplerSpec:
    """One A1111 sampler (`a1111.md` §7.1) and its diffusers scheduler (`a1111.md` §8)."""

    label: str  # A1111 label, written to infotext as `Sampler`
    aliases: tuple[str, ...]
    scheduler_class: str  # diffusers class name
    default_schedule: str  # schedule name "Automatic" resolves to
    options: dict[str, Any] = field(default_factory=dict)  # A1111 sampler options (for /sdapi/v1/samplers)
    overrides: dict[str, Any] = field(default_factory=dict)  # diffusers config set for this sampler
    eta: str | None = None  # "ddim": eta is a step argument; "fixed": stochastic with eta 1 in diffusers
    note: str = ""  # how close the diffusers mapping is

    def __hash__(self) -> int:
        return hash(self.label)


AUTOMATIC = ScheduleSpec("automatic", "Automatic")

# A1111 order (`sd_schedulers.schedulers`), restricted to the types diffusers can express.
SCHEDULES: tuple[ScheduleSpec, ...] = (
    AUTOMATIC,
    ScheduleSpec("uniform", "Uniform", need_inner_model=True, spacing="linspace"),
    ScheduleSpec("karras", "Karras", default_rho=7.0, spacing="linspace", sigmas="karras"),
    ScheduleSpec("exponential", "Exponential", spacing="linspace", sigmas="exponential"),
    ScheduleSpec(
        "polyexponential", "Polyexponential", default_rho=1.0, spacing="linspace", sigmas="exponential"
    ),
    ScheduleSpec(
        "sgm_uniform", "SGM Uniform", aliases=("SGMUniform",), need_inner_model=True, spacing="trailing"
    ),
    ScheduleSpec("simple", "Simple", need_inner_model=True, spacing="trailing"),
    ScheduleSpec("normal", "Normal", need_inner_model=True, spacing="linspace"),
    ScheduleSpec("ddim", "DDIM", need_inner_model=True, spacing="leading", steps_offset=1),
    ScheduleSpec("beta", "Beta", need_inner_model=True, spacing="linspace", sigmas="beta"),
)
UNSUPPORTED_SCHEDULES = ("KL Optimal", "Align Your Steps")  # need custom sigma tables diffusers lacks

_DPM_MULTI = {
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
}
_DPM_SINGLE = {
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "use_flow_sigmas": False,
}

# A1111 order: k-diffusion samplers, then timestep samplers, then LCM; DEIS is a booth extra.
# A1111's DDIM and PLMS (`sd_samplers_timesteps_impl.py`) never clip the predicted x_0 and step last to
# alphas_cumprod[0]; diffusers' own defaults (clip_sample / set_alpha_to_one True) would apply whenever the model's
# scheduler config does not name them (SD 1.5's does; booth-mini's DPM-Solver config did not), and clipping
# unit-variance latents to [-1, 1] at every step wrecks the image.
_TIMESTEP_SAMPLER: dict[str, Any] = {"clip_sample": False, "set_alpha_to_one": False}

SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec(
        "DPM++ 2M",
        ("k_dpmpp_2m",),
        "DPMSolverMultistepScheduler",
        "karras",
        {"scheduler": "karras"},
        {**_DPM_MULTI, "algorithm_type": "dpmsolver++"},
    ),
    SamplerSpec(
        "DPM++ SDE",
        ("k_dpmpp_sde",),
        "DPMSolverSinglestepScheduler",
        "karras",
        {"scheduler": "karras", "second_order": True, "brownian_noise": True},
        {**_DPM_SINGLE, "algorithm_type": "sde-dpmsolver++"},
        eta="fixed",
        note="stochastic single-step DPM-Solver++ (order 2); noise is not a Brownian tree",
    ),
    SamplerSpec(
        "DPM++ 2M SDE",
        ("k_dpmpp_2m_sde",),
        "DPMSolverMultistepScheduler",
        "exponential",
        {"scheduler": "exponential", "brownian_noise": True},
        {**_DPM_MULTI, "algorithm_type": "sde-dpmsolver++"},
        eta="fixed",
    ),
    SamplerSpec(
        "DPM++ 2M SDE Heun",
        ("k_dpmpp_2m_sde_heun",),
        "DPMSolverMultistepScheduler",
        "exponential",
        {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"},
        {**_DPM_MULTI, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
        eta="fixed",
    ),
    SamplerSpec(
        "DPM++ 2S a",
        ("k_dpmpp_2s_a",),
        "DPMSolverSinglestepScheduler",
        "karras",
        {"scheduler": "karras", "uses_ensd": True, "second_order": True},
        {**_DPM_SINGLE, "algorithm_type": "sde-dpmsolver++"},
        eta="fixed",
        note="approximation: stochastic single-step DPM-Solver++ (diffusers has no 2S ancestral); "
        "same diffusers config as DPM++ SDE",
    ),
    SamplerSpec(
        "DPM++ 3M SDE",
        ("k_dpmpp_3m_sde",),
        "DPMSolverMultistepScheduler",
        "exponential",
        {"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True},
        {**_DPM_MULTI, "solver_order": 3, "algorithm_type": "sde-dpmsolver++"},
        eta="fixed",
        note="third-order SDE DPM-Solver++; the next-to-last sigma is not discarded",
    ),
    SamplerSpec(
        "Euler a",
        ("k_euler_a", "k_euler_ancestral"),
        "EulerAncestralDiscreteScheduler",
        "uniform",
        {"uses_ensd": True},
        eta="fixed",
    ),
    SamplerSpec(
        "Euler", ("k_euler",), "EulerDiscreteScheduler", "uniform", {}, {"final_sigmas_type": "zero"}
    ),
    SamplerSpec("LMS", ("k_lms",), "LMSDiscreteScheduler", "uniform", {}),
    SamplerSpec("Heun", ("k_heun",), "HeunDiscreteScheduler", "uniform", {"second_order": True}),
    SamplerSpec(
        "DPM2",
        ("k_dpm_2",),
        "KDPM2DiscreteScheduler",
        "karras",
        {"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True},
        note="the next-to-last sigma is not discarded",
    ),
    SamplerSpec(
        "DPM2 a",
        ("k_dpm_2_a",),
        "KDPM2AncestralDiscreteScheduler",
        "karras",
        {"scheduler": "karras", "discard_next_to_last_sigma": True, "uses_ensd": True, "second_order": True},
        eta="fixed",
        note="the next-to-last sigma is not discarded",
    ),
    SamplerSpec("DDIM", ("ddim",), "DDIMScheduler", "ddim", {}, _TIMESTEP_SAMPLER, eta="ddim"),
    SamplerSpec(
        "PLMS", ("plms",), "PNDMScheduler", "ddim", {}, {**_TIMESTEP_SAMPLER, "skip_prk_steps": True}
    ),
    SamplerSpec(
        "UniPC",
        ("unipc",),
        "UniPCMultistepScheduler",
        "ddim",
        {},
        {"final_sigmas_type": "zero", "use_flow_sigmas": False},
    ),
    SamplerSpec("LCM", ("k_lcm",), "LCMScheduler", "automatic", {}),
    SamplerSpec(
        "DEIS",
        ("deis",),
        "DEISMultistepScheduler",
        "uniform",
        {},
        {"use_flow_sigmas": False},
        note="booth extra (not in A1111)",
    ),
)
UNSUPPORTED_SAMPLERS = ("DPM fast", "DPM adaptive", "Restart", "DDIM CFG++")  # no diffusers equivalent

_SIGMA_FLAGS = {
    "karras": "use_karras_sigmas",
    "exponential": "use_exponential_sigmas",
    "beta": "use_beta_sigmas",
}
# DPMSolverSinglestepScheduler has no `timestep_spacing`; its fixed grid t_i = 999 (1 - i/n) is SGM Uniform's.
_FIXED_SPACING = {"DPMSolverSinglestepScheduler": "trailing"}


def _key(name: str) -> str:
    return " ".join(name.strip().lower().split())


_SAMPLER_BY_KEY = {_key(n): s for s in SAMPLERS for n in (s.label, *s.aliases)}
_SCHEDULE_BY_KEY = {_key(n): s for s in SCHEDULES for n in (s.label, s.name, *s.aliases)}
_SCHEDULE_BY_NAME = {s.name: s for s in SCHEDULES}


def _scheduler_class(sampler: SamplerSpec) -> type:
    import diffusers

    return getattr(diffusers, sampler.scheduler_class)


@functools.cache
def _init_params(class_name: str) -> frozenset[str]:
    import diffusers

    return frozenset(inspect.signature(getattr(diffusers, class_name).__init__).parameters)


def _schedule_problem(sampler: SamplerSpec, schedule: ScheduleSpec) -> str | None:
    """Why `schedule` cannot be expressed for `sampler` in the installed diffusers, or None."""
    accepted = _init_params(sampler.scheduler_class)
    if schedule.name == "automatic":
        return None if sampler.default_schedule == "automatic" else "internal: unresolved Automatic"
    if sampler.default_schedule == "automatic":  # LCM: its own timestep selection only
        return f"{sampler.label} uses its own timesteps"
    if schedule.sigmas and _SIGMA_FLAGS[schedule.sigmas] not in accepted:
        return f"{sampler.scheduler_class} has no {_SIGMA_FLAGS[schedule.sigmas]}"
    if schedule.sigmas is None and "timestep_spacing" not in accepted:
        fixed = _FIXED_SPACING.get(sampler.scheduler_class)
        if fixed != schedule.spacing:
            return f"{sampler.scheduler_class} has a fixed timestep grid"
    return None


def supported_schedules(sampler: SamplerSpec) -> list[ScheduleSpec]:
    """Schedule types usable with `sampler` ("Automatic" first)."""
    if sampler.default_schedule == "automatic":
        return [AUTOMATIC]
    return [AUTOMATIC] + [s for s in SCHEDULES[1:] if _schedule_problem(sampler, s) is None]


def _labels(items) -> str:
    return ", ".join(item.label for item in items)


def find_schedule(name: str | None) -> ScheduleSpec:
    """A schedule type by label, name or alias (case-insensitive); None or "" mean Automatic."""
    if name is None or not str(name).strip():
        return AUTOMATIC
    found = _SCHEDULE_BY_KEY.get(_key(str(name)))
    if found is None:
        known = " (no diffusers equivalent)" if _key(name) in {_key(u) for u in UNSUPPORTED_SCHEDULES} else ""
        raise BoothError(f"unknown schedule type {name!r}{known}; valid schedule types: {_labels(SCHEDULES)}")
    return found


def _find_sampler(name: str) -> SamplerSpec | None:
    return _SAMPLER_BY_KEY.get(_key(name))


def resolve_sampler(
    sampler_name: str, scheduler: str | None = "Automatic"
) -> tuple[SamplerSpec, ScheduleSpec]:
    """Resolve an A1111 sampler name (+ schedule type) to concrete specs.

    Accepts labels, aliases (`k_euler_a`), any case, and legacy combined names ("DPM++ 2M Karras" -> DPM++ 2M +
    Karras, A1111 `get_sampler_and_scheduler`, `a1111.md` §7.1). "Automatic" resolves to the sampler's default
    schedule, so the returned schedule is the one actually used. Raises `BoothError` for unknown names,
    contradicting schedules and combinations diffusers cannot express.
    """
    name = str(sampler_name or "").strip()
    if not name:
        raise BoothError(f"no sampler given; valid samplers: {_labels(SAMPLERS)}")
    schedule = find_schedule(scheduler)
    sampler = _find_sampler(name)
    if sampler is None:
        # Legacy combined name: strip a trailing " " + schedule label / name / alias.
        for candidate in SCHEDULES[1:]:
            for option in (candidate.label, candidate.name, *candidate.aliases):
                if _key(name).endswith(" " + _key(option)):
                    base = _find_sampler(name[: -len(option) - 1])
                    if base is None:
                        continue
                    if schedule.name not in ("automatic", candidate.name):
                        raise BoothError(
                            f"sampler {name!r} names schedule {candidate.label!r} but schedule type "
                            f"{schedule.label!r} was also given; use sampler {base.label!r} with one schedule type"
                        )
                    sampler, schedule = base, candidate
                    break
            if sampler is not None:
                break
    if sampler is None:
        known = (
            " has no diffusers equivalent" if _key(name) in {_key(u) for u in UNSUPPORTED_SAMPLERS} else ""
        )
        prefix = f"A1111 sampler {name!r}{known}" if known else f"unknown sampler {name!r}"
        raise BoothError(f"{prefix}; valid samplers: {_labels(SAMPLERS)}")
    if schedule.name == "automatic":
        schedule = _SCHEDULE_BY_NAME[sampler.default_schedule]
    problem = _schedule_problem(sampler, schedule)
    if problem:
        raise BoothError(
            f"schedule type {schedule.label!r} is not available for sampler {sampler.label!r} ({problem}); "
            f"supported: {_labels(supported_schedules(sampler))}"
        )
    return sampler, schedule


def scheduler_overrides(sampler: SamplerSpec, schedule: ScheduleSpec) -> dict[str, Any]:
    """The diffusers config entries `make_scheduler` sets on top of the model's scheduler config."""
    if schedule.name == "automatic" and sampler.default_schedule != "automatic":
        schedule = _SCHEDULE_BY_NAME[sampler.default_schedule]
    problem = _schedule_problem(sampler, schedule)
    if problem:
        raise BoothError(
            f"schedule type {schedule.label!r} is not available for sampler {sampler.label!r} ({problem}); "
            f"supported: {_labels(supported_schedules(sampler))}"
        )
    accepted = _init_params(sampler.scheduler_class)
    out: dict[str, Any] = dict(sampler.overrides)
    for kind, flag in _SIGMA_FLAGS.items():
        if flag in accepted:
            out[flag] = schedule.sigmas == kind
    if schedule.spacing and "timestep_spacing" in accepted:
        out["timestep_spacing"] = schedule.spacing
    if schedule.steps_offset is not None and "steps_offset" in accepted:
        out["steps_offset"] = schedule.steps_offset
    return {k: v for k, v in out.items() if k in accepted}


def make_scheduler(
    sampler: SamplerSpec | str,
    schedule: ScheduleSpec | str | None = None,
    base_config: dict[str, Any] | None = None,
    prediction_type: str | None = None,
    eta: float | None = None,
) -> SchedulerMixin:
    """A fresh diffusers scheduler for `sampler` + `schedule`, built from the model's scheduler config.

    Args:
        sampler: a `SamplerSpec` or a sampler name (resolved with `resolve_sampler`).
        schedule: a `ScheduleSpec`, a schedule-type name, or None for Automatic.
        base_config: the model's own scheduler config (`pipe.scheduler.config`): betas, prediction type,
            steps offset. Never modified.
        prediction_type: overrides the config's prediction type ("epsilon", "v_prediction", "sample").
        eta: DDIM eta (A1111 default 0), bound to the scheduler's `step`; for ancestral and SDE samplers only 1
            is possible in diffusers; ignored by samplers without eta, as in A1111.
    Returns:
        A new scheduler instance (`a1111.md` §8 mapping); every call returns a separate object.
    """
    if isinstance(sampler, str) or not isinstance(schedule, ScheduleSpec):
        sampler, schedule = resolve_sampler(
            sampler if isinstance(sampler, str) else sampler.label,
            schedule.label if isinstance(schedule, ScheduleSpec) else schedule,
        )
    if schedule.sigmas == "beta" and importlib.util.find_spec("scipy") is None:
        raise BoothError("schedule type 'Beta' needs scipy; install it with `pip install scipy`")
    overrides = scheduler_overrides(sampler, schedule)
    if prediction_type is not None:
        overrides["prediction_type"] = prediction_type
    # Keep only what this class takes: a PNDM config's `skip_prk_steps` means nothing to LCM.
    accepted = _init_params(sampler.scheduler_class)
    config = {k: v for k, v in dict(base_config or {}).items() if k in accepted}
    config.update(overrides)
    scheduler = _scheduler_class(sampler).from_config(config)
    eta_kwargs = step_kwargs(sampler, eta)
    if eta_kwargs:
        scheduler.step = functools.partial(scheduler.step, **eta_kwargs)
    return scheduler


def step_kwargs(sampler: SamplerSpec, eta: float | None) -> dict[str, Any]:
    """Extra `scheduler.step` arguments for `eta` (A1111 `eta_ddim` / `eta_ancestral`, `a1111.md` §7.3)."""
    if eta is None:
        return {}
    if sampler.eta == "ddim":
        if not 0.0 <= eta <= 1.0:
            raise BoothError(f"DDIM eta must be in [0, 1], got {eta}")
        return {"eta": float(eta)}
    if sampler.eta == "fixed" and eta != 1.0:
        raise BoothError(
            f"sampler {sampler.label!r} runs with eta 1 in diffusers; got eta {eta} (use 1 or omit it)"
        )
    return {}


def churn_kwargs(
    sampler: SamplerSpec, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float
) -> dict[str, Any]:
    """Stochastic churn, Algorithm 2 of Karras et al. 2022 (EDM): A1111's Sigma churn / tmin / tmax / noise
    (`s_tmax` 0 = no upper bound), as extra `scheduler.step` arguments. diffusers has it for Euler only."""
    if s_churn == 0:
        return {}
    if sampler.scheduler_class != "EulerDiscreteScheduler":
        raise BoothError(
            f"sigma churn (s_churn) works with the Euler sampler in booth, not {sampler.label!r}"
        )
    return {"s_churn": float(s_churn), "s_tmin": float(s_tmin), "s_tmax": float(s_tmax) or math.inf,
            "s_noise": float(s_noise)}  # fmt: skip


def churn_infotext(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> dict[str, Any]:
    """A1111's keys for the churn settings that differ from their defaults (when churn is on)."""
    if s_churn == 0:
        return {}
    fields: dict[str, Any] = {"Sigma churn": s_churn}
    if s_tmin != 0:
        fields["Sigma tmin"] = s_tmin
    if s_tmax != 0:
        fields["Sigma tmax"] = s_tmax
    if s_noise != 1.0:
        fields["Sigma noise"] = s_noise
    return fields


def infotext_fields(sampler: SamplerSpec, schedule: ScheduleSpec, eta: float | None = None) -> dict[str, Any]:
    """`Sampler` and `Schedule type` as written to infotext (`formats.md` §9.1–§9.2).

    The schedule is written as the concrete label actually used (e.g. "Karras" for DPM++ 2M on Automatic), so
    the image reproduces in tools whose "Automatic" differs; "Automatic" appears only for LCM, whose diffusers
    scheduler has no A1111 schedule type. With `eta`, adds A1111's `Eta DDIM` (DDIM, default 0) or `Eta`
    (ancestral, default 1) when it differs from the default.
    """
    if schedule.name == "automatic" and sampler.default_schedule != "automatic":
        schedule = _SCHEDULE_BY_NAME[sampler.default_schedule]
    fields: dict[str, Any] = {"Sampler": sampler.label, "Schedule type": schedule.label}
    if eta is not None and sampler.eta == "ddim" and eta != 0.0:
        fields["Eta DDIM"] = eta
    elif eta is not None and sampler.eta == "fixed" and eta != 1.0:
        fields["Eta"] = eta
    return fields


def sampler_list() -> list[dict[str, Any]]:
    """`GET /sdapi/v1/samplers` items: `{"name", "aliases", "options"}` (`a1111.md` §12.5).

    Option values are strings, as A1111's `SamplerItem.options: dict[str, str]` serialises them.
    """
    return [
        {"name": s.label, "aliases": list(s.aliases), "options": {k: str(v) for k, v in s.options.items()}}
        for s in SAMPLERS
    ]


def scheduler_list() -> list[dict[str, Any]]:
    """`GET /sdapi/v1/schedulers` items: `{"name", "label", "aliases", "default_rho", "need_inner_model"}`."""
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": list(s.aliases) or None,
            "default_rho": s.default_rho,
            "need_inner_model": s.need_inner_model,
        }
        for s in SCHEDULES
    ]


def mapping_table() -> list[dict[str, Any]]:
    """Every sampler with its diffusers class, default schedule, supported schedule types and caveat."""
    return [
        {
            "sampler": s.label,
            "diffusers": s.scheduler_class,
            "default_schedule": _SCHEDULE_BY_NAME[s.default_schedule].label,
            "schedules": [x.label for x in supported_schedules(s)],
            "note": s.note,
        }
        for s in SAMPLERS
    ]


__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "SamplerSpec",
    "ScheduleSpec",
    "find_schedule",
    "infotext_fields",
    "make_scheduler",
    "mapping_table",
    "resolve_sampler",
    "sampler_list",
    "scheduler_list",
    "scheduler_overrides",
    "step_kwargs",
    "supported_schedules",
]
