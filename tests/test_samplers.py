"""A1111 sampler / schedule names -> diffusers schedulers (a1111.md §7, §8, §12.5)."""

from __future__ import annotations

import copy
import inspect

import diffusers
import numpy as np
import pytest
import torch

from booth.errors import BoothError
from booth.generate.samplers import (
    SAMPLERS,
    SCHEDULES,
    infotext_fields,
    make_scheduler,
    resolve_sampler,
    sampler_list,
    scheduler_list,
    supported_schedules,
)

# The scheduler config shipped with Stable Diffusion 1.5 (PNDM, scaled-linear betas).
SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "trained_betas": None,
}

# a1111.md §8 (diffusers overview table + "further mappings"); DEIS is booth's extra.
EXPECTED_CLASS = {
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE Heun": "DPMSolverMultistepScheduler",
    "DPM++ 3M SDE": "DPMSolverMultistepScheduler",
    "DPM++ SDE": "DPMSolverSinglestepScheduler",
    "DPM++ 2S a": "DPMSolverSinglestepScheduler",
    "DPM2": "KDPM2DiscreteScheduler",
    "DPM2 a": "KDPM2AncestralDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "PLMS": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "LCM": "LCMScheduler",
    "DEIS": "DEISMultistepScheduler",
}

# a1111.md §7.1 "default options: scheduler"; samplers without one use Uniform (k-diffusion) or the
# DDIM grid (timestep samplers); LCM keeps its own timesteps.
EXPECTED_DEFAULT = {
    "DPM++ 2M": "Karras",
    "DPM++ SDE": "Karras",
    "DPM++ 2M SDE": "Exponential",
    "DPM++ 2M SDE Heun": "Exponential",
    "DPM++ 2S a": "Karras",
    "DPM++ 3M SDE": "Exponential",
    "Euler a": "Uniform",
    "Euler": "Uniform",
    "LMS": "Uniform",
    "Heun": "Uniform",
    "DPM2": "Karras",
    "DPM2 a": "Karras",
    "DDIM": "DDIM",
    "PLMS": "DDIM",
    "UniPC": "DDIM",
    "LCM": "Automatic",
    "DEIS": "Uniform",
}


@pytest.fixture(scope="module")
def sd2_config():
    from booth.models.tiny import tiny_pipeline

    return dict(tiny_pipeline("sd2").scheduler.config)


def run_steps(scheduler, steps: int = 20) -> torch.Tensor:
    """set_timesteps + a full loop with a fake model output; returns the final sample."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen) * scheduler.init_noise_sigma
    kwargs = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(0.1 * x_in, t, x, **kwargs).prev_sample
    return x


def test_every_required_a1111_sampler_is_listed():
    labels = [s.label for s in SAMPLERS]
    for name in ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ SDE", "DPM++ 2S a",
                 "DPM2", "DPM2 a", "Heun", "LMS", "DDIM", "PLMS", "UniPC", "LCM"]:  # fmt: skip
        assert name in labels
    assert set(labels) == set(EXPECTED_CLASS)


@pytest.mark.parametrize("label", list(EXPECTED_CLASS))
def test_each_sampler_with_its_default_schedule_builds_the_mapped_scheduler(label):
    sampler, schedule = resolve_sampler(label)  # "Automatic"
    assert sampler.label == label
    assert schedule.label == EXPECTED_DEFAULT[label]
    scheduler = make_scheduler(sampler, schedule, SD15_CONFIG)
    assert type(scheduler) is getattr(diffusers, EXPECTED_CLASS[label])
    x = run_steps(scheduler, 20)
    assert len(scheduler.timesteps) >= 20
    assert torch.isfinite(x).all()
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012


@pytest.mark.parametrize("label", list(EXPECTED_CLASS))
def test_v_prediction_config_is_kept(label, sd2_config):
    assert sd2_config["prediction_type"] == "v_prediction"
    scheduler = make_scheduler(*resolve_sampler(label), sd2_config)
    assert scheduler.config.prediction_type == "v_prediction"
    scheduler.set_timesteps(20)
    forced = make_scheduler(*resolve_sampler(label), sd2_config, prediction_type="epsilon")
    assert forced.config.prediction_type == "epsilon"


def test_every_supported_combination_runs_and_unsupported_ones_raise():
    for sampler in SAMPLERS:
        supported = {s.label for s in supported_schedules(sampler)}
        for schedule in SCHEDULES:
            if schedule.label in supported:
                scheduler = make_scheduler(sampler.label, schedule.label, SD15_CONFIG)
                scheduler.set_timesteps(8)
                assert len(scheduler.timesteps) >= 8, (sampler.label, schedule.label)
            else:
                with pytest.raises(BoothError, match="not available for sampler") as err:
                    resolve_sampler(sampler.label, schedule.label)
                assert "supported: Automatic" in str(err.value)


@pytest.mark.parametrize(
    ("sampler", "schedule"),
    [
        ("Euler a", "Karras"),
        ("DDIM", "Exponential"),
        ("PLMS", "Beta"),
        ("LCM", "Karras"),
        ("DPM++ SDE", "Uniform"),
    ],
)
def test_combinations_diffusers_cannot_express_are_rejected(sampler, schedule):
    with pytest.raises(BoothError) as err:
        resolve_sampler(sampler, schedule)
    message = str(err.value)
    assert "\n" not in message and sampler in message and schedule in message


def test_dpm_solver_options_follow_the_mapping_table():
    c = make_scheduler(*resolve_sampler("DPM++ 2M", "Karras"), SD15_CONFIG).config
    assert c.use_karras_sigmas and c.algorithm_type == "dpmsolver++" and c.solver_order == 2
    assert c.final_sigmas_type == "zero" and c.lower_order_final
    c = make_scheduler(*resolve_sampler("DPM++ 2M SDE"), SD15_CONFIG).config
    assert c.algorithm_type == "sde-dpmsolver++" and c.use_exponential_sigmas and not c.use_karras_sigmas
    assert c.timestep_spacing == "linspace"
    c = make_scheduler(*resolve_sampler("DPM++ 2M SDE Heun", "Karras"), SD15_CONFIG).config
    assert c.algorithm_type == "sde-dpmsolver++" and c.solver_type == "heun" and c.use_karras_sigmas
    c = make_scheduler(*resolve_sampler("DPM++ 3M SDE"), SD15_CONFIG).config
    assert c.solver_order == 3 and c.algorithm_type == "sde-dpmsolver++"
    c = make_scheduler(*resolve_sampler("PLMS"), SD15_CONFIG).config
    assert c.skip_prk_steps and c.timestep_spacing == "leading" and c.steps_offset == 1
    c = make_scheduler(*resolve_sampler("Euler", "SGM Uniform"), SD15_CONFIG).config
    assert c.timestep_spacing == "trailing"
    c = make_scheduler(*resolve_sampler("Euler", "Simple"), SD15_CONFIG).config
    assert c.timestep_spacing == "trailing"
    c = make_scheduler(*resolve_sampler("Heun", "Beta"), SD15_CONFIG).config
    assert c.use_beta_sigmas and c.timestep_spacing == "linspace"


def sd15_sigmas() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def test_karras_schedule_spans_the_full_a1111_sigma_range():
    # a1111.md §7.2: sigma_i = (max^(1/7) + i/(n-1) (min^(1/7) - max^(1/7)))^7, then 0; min/max = sigma(0), sigma(999)
    n, rho = 10, 7.0
    full = sd15_sigmas()
    lo, hi = full[0], full[-1]
    ramp = np.arange(n) / (n - 1)
    expected = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    scheduler = make_scheduler(*resolve_sampler("Euler", "Karras"), SD15_CONFIG)
    scheduler.set_timesteps(n)
    sigmas = scheduler.sigmas.numpy().astype(np.float64)
    np.testing.assert_allclose(sigmas[:-1], expected, rtol=2e-4)
    assert sigmas[-1] == 0.0


def test_uniform_takes_sigmas_at_linspace_999_to_0():
    scheduler = make_scheduler(*resolve_sampler("Euler"), SD15_CONFIG)
    scheduler.set_timesteps(5)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), np.linspace(999, 0, 5), atol=1e-3)
    ddim = make_scheduler(*resolve_sampler("DDIM"), SD15_CONFIG)  # A1111 timestep samplers: 1, 1+1000//n, ...
    ddim.set_timesteps(5)
    assert ddim.timesteps.tolist() == [801, 601, 401, 201, 1]


def test_polyexponential_at_rho_1_equals_exponential():
    a = make_scheduler(*resolve_sampler("Euler", "Polyexponential"), SD15_CONFIG)
    b = make_scheduler(*resolve_sampler("Euler", "Exponential"), SD15_CONFIG)
    a.set_timesteps(12)
    b.set_timesteps(12)
    assert torch.equal(a.sigmas, b.sigmas)
    full = sd15_sigmas()
    expected = np.exp(np.linspace(np.log(full[-1]), np.log(full[0]), 12))
    np.testing.assert_allclose(b.sigmas.numpy()[:-1], expected, rtol=2e-4)


def test_timestep_samplers_follow_a1111_whatever_the_model_config_omits():
    # booth-mini's config (DPM-Solver++) names neither clip_sample nor set_alpha_to_one; diffusers' defaults for
    # both are True, which clipped booth-mini's unit-variance latents to [-1, 1] at every DDIM step.
    config = {
        k: v for k, v in SD15_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one", "skip_prk_steps")
    }
    config["_class_name"] = "DPMSolverMultistepScheduler"
    scheduler = make_scheduler(*resolve_sampler("DDIM"), config)
    scheduler.set_timesteps(5)
    abar = scheduler.alphas_cumprod.double()
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    timesteps = scheduler.timesteps.tolist()
    for t, t_prev in zip(timesteps, [*timesteps[1:], 0]):  # A1111 pads alphas_prev with alphas_cumprod[0]
        eps = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()  # eta 0: no clipping of x_0
        expected = abar[t_prev].sqrt() * x0 + (1 - abar[t_prev]).sqrt() * eps
        x = scheduler.step(eps, t, x).prev_sample
        # clipping x_0 to [-1, 1] would be off by ~1; the step may round through float32 (3e-7 seen, diffusers 0.42.1)
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    plms = make_scheduler(*resolve_sampler("PLMS"), config)
    assert plms.config.skip_prk_steps and plms.final_alpha_cumprod == plms.alphas_cumprod[0]


def test_model_config_options_do_not_leak_into_other_choices():
    dpm_config = {**SD15_CONFIG, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True,
                  "algorithm_type": "sde-dpmsolver++", "timestep_spacing": "trailing", "solver_order": 3}  # fmt: skip
    before = copy.deepcopy(dpm_config)
    c = make_scheduler(*resolve_sampler("DPM++ 2M", "Uniform"), dpm_config).config
    assert not c.use_karras_sigmas and c.algorithm_type == "dpmsolver++" and c.solver_order == 2
    assert c.timestep_spacing == "linspace"
    assert dpm_config == before  # the base config is never modified


def test_each_call_returns_a_fresh_scheduler():
    sampler, schedule = resolve_sampler("DPM++ 2M")
    a = make_scheduler(sampler, schedule, SD15_CONFIG)
    b = make_scheduler(sampler, schedule, SD15_CONFIG)
    assert a is not b
    a.set_timesteps(5)
    b.set_timesteps(30)
    assert len(a.timesteps) == 5 and len(b.timesteps) == 30


@pytest.mark.parametrize(
    ("name", "sampler", "schedule"),
    [
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
        ("DPM++ SDE Karras", "DPM++ SDE", "Karras"),
        ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
        ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "Karras"),
        ("DPM++ 2M SDE Heun Karras", "DPM++ 2M SDE Heun", "Karras"),
        ("DPM++ 3M SDE Exponential", "DPM++ 3M SDE", "Exponential"),
        ("LMS Karras", "LMS", "Karras"),
        ("DPM2 Karras", "DPM2", "Karras"),
        ("DPM2 a Karras", "DPM2 a", "Karras"),
        ("DPM++ 2S a Karras", "DPM++ 2S a", "Karras"),
        ("dpm++ 2m karras", "DPM++ 2M", "Karras"),
        ("Euler sgm_uniform", "Euler", "SGM Uniform"),
        ("Euler SGMUniform", "Euler", "SGM Uniform"),
    ],
)
def test_legacy_combined_names(name, sampler, schedule):
    s, sch = resolve_sampler(name)
    assert (s.label, sch.label) == (sampler, schedule)
    assert infotext_fields(s, sch) == {"Sampler": sampler, "Schedule type": schedule}


def test_legacy_name_conflicting_with_an_explicit_schedule_is_an_error():
    assert resolve_sampler("DPM++ 2M Karras", "Karras")[1].label == "Karras"
    with pytest.raises(BoothError, match="Exponential"):
        resolve_sampler("DPM++ 2M Karras", "Exponential")


@pytest.mark.parametrize(
    ("alias", "label"),
    [("k_euler_a", "Euler a"), ("k_euler_ancestral", "Euler a"), ("K_LMS", "LMS"), ("k_dpmpp_2m", "DPM++ 2M"),
     ("k_dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun"), ("k_dpm_2_a", "DPM2 a"), ("ddim", "DDIM"), ("plms", "PLMS"),
     ("unipc", "UniPC"), ("k_lcm", "LCM"), ("  euler  A ", "Euler a")],
)  # fmt: skip
def test_aliases_and_case(alias, label):
    assert resolve_sampler(alias)[0].label == label


def test_schedule_names_labels_and_aliases():
    assert resolve_sampler("Euler", "karras")[1].label == "Karras"
    assert resolve_sampler("Euler", "sgm_uniform")[1].label == "SGM Uniform"
    assert resolve_sampler("Euler", None)[1].label == "Uniform"
    assert resolve_sampler("Euler", "")[1].label == "Uniform"


def test_unknown_sampler_message_lists_valid_labels():
    with pytest.raises(BoothError) as err:
        resolve_sampler("Eulerr")
    message = str(err.value)
    assert "\n" not in message and "'Eulerr'" in message
    for label in ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC", "LCM"]:
        assert label in message
    with pytest.raises(BoothError, match="no diffusers equivalent"):
        resolve_sampler("DPM fast")


def test_unknown_or_unsupported_schedule_type():
    with pytest.raises(BoothError, match="no diffusers equivalent") as err:
        resolve_sampler("Euler", "Align Your Steps")
    assert "Karras" in str(err.value) and "SGM Uniform" in str(err.value)
    with pytest.raises(BoothError, match="unknown schedule type 'Fancy'"):
        resolve_sampler("Euler", "Fancy")


def test_ddim_eta_is_bound_to_step_and_ancestral_eta_is_fixed():
    sampler, schedule = resolve_sampler("DDIM")
    plain = make_scheduler(sampler, schedule, SD15_CONFIG)
    with_eta = make_scheduler(sampler, schedule, SD15_CONFIG, eta=0.5)
    for s in (plain, with_eta):
        s.set_timesteps(4)
    x = torch.ones(1, 4, 8, 8)
    t = plain.timesteps[0]
    out_plain = plain.step(0.3 * x, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    out_eta = with_eta.step(0.3 * x, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    manual = make_scheduler(sampler, schedule, SD15_CONFIG)
    manual.set_timesteps(4)
    expected = manual.step(0.3 * x, t, x, eta=0.5, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.equal(out_eta, expected) and not torch.equal(out_eta, out_plain)
    with pytest.raises(BoothError, match="eta 1"):
        make_scheduler(*resolve_sampler("Euler a"), SD15_CONFIG, eta=0.5)
    make_scheduler(*resolve_sampler("Euler a"), SD15_CONFIG, eta=1.0)
    make_scheduler(*resolve_sampler("Euler"), SD15_CONFIG, eta=0.3)  # no eta in Euler: ignored, as in A1111


def test_infotext_fields_write_the_concrete_schedule():
    assert infotext_fields(*resolve_sampler("DPM++ 2M")) == {"Sampler": "DPM++ 2M", "Schedule type": "Karras"}
    assert infotext_fields(*resolve_sampler("k_euler_a")) == {
        "Sampler": "Euler a",
        "Schedule type": "Uniform",
    }
    assert infotext_fields(*resolve_sampler("LCM")) == {"Sampler": "LCM", "Schedule type": "Automatic"}
    assert infotext_fields(*resolve_sampler("DDIM"), eta=0.3)["Eta DDIM"] == 0.3
    assert "Eta DDIM" not in infotext_fields(*resolve_sampler("DDIM"), eta=0.0)


def test_sampler_list_has_the_a1111_api_shape():
    items = sampler_list()
    assert [i["name"] for i in items] == [s.label for s in SAMPLERS]
    for item in items:
        assert set(item) == {"name", "aliases", "options"}
        assert isinstance(item["aliases"], list) and all(isinstance(a, str) for a in item["aliases"])
        assert all(isinstance(v, str) for v in item["options"].values())
    by_name = {i["name"]: i for i in items}
    assert by_name["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    assert by_name["Euler a"]["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    assert by_name["DPM++ 2M SDE Heun"]["options"]["solver_type"] == "heun"


def test_scheduler_list_has_the_a1111_api_shape():
    items = scheduler_list()
    for item in items:
        assert set(item) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    by_label = {i["label"]: i for i in items}
    for label in ["Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform", "Simple", "Beta"]:
        assert label in by_label
    assert by_label["Karras"]["name"] == "karras" and by_label["Karras"]["default_rho"] == 7.0
    assert by_label["SGM Uniform"]["aliases"] == ["SGMUniform"] and by_label["Automatic"]["aliases"] is None
    assert "Align Your Steps" not in by_label  # only what booth can run is advertised
