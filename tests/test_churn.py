"""Euler's stochastic churn (Karras et al. 2022, Algorithm 2): A1111's s_churn / s_tmin / s_tmax / s_noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from booth.errors import BoothError
from booth.generate.metadata import parse_infotext
from booth.generate.params import GenerationParams
from booth.generate.samplers import churn_kwargs, resolve_sampler

BASE = dict(prompt="a red apple", steps=4, seed=21, sampler_name="Euler", width=32, height=32)


def test_churn_reaches_eulers_step_and_is_refused_elsewhere():
    euler, _ = resolve_sampler("Euler", "Automatic")
    assert churn_kwargs(euler, 0.0, 0.0, 0.0, 1.0) == {}
    assert churn_kwargs(euler, 5.0, 0.1, 0.0, 1.003) == {
        "s_churn": 5.0,
        "s_tmin": 0.1,
        "s_tmax": math.inf,
        "s_noise": 1.003,
    }
    heun, _ = resolve_sampler("Heun", "Automatic")
    with pytest.raises(BoothError, match="works with the Euler sampler in booth, not 'Heun'"):
        churn_kwargs(heun, 1.0, 0.0, 0.0, 1.0)


def test_churn_changes_the_picture_reproducibly_and_is_written_as_a1111_does(sd1_engine):
    plain = sd1_engine.generate(GenerationParams(**BASE))
    churned = sd1_engine.generate(GenerationParams(**BASE, s_churn=20.0, s_noise=1.01))
    again = sd1_engine.generate(GenerationParams(**BASE, s_churn=20.0, s_noise=1.01))
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(churned.images[0]))
    assert np.array_equal(np.asarray(churned.images[0]), np.asarray(again.images[0]))
    info = parse_infotext(churned.infotexts[0])
    assert (info["Sigma churn"], info["Sigma noise"]) == ("20", "1.01") and "Sigma tmin" not in info
    assert "Sigma churn" not in parse_infotext(plain.infotexts[0])
    # a window that excludes every sigma leaves the sampling deterministic Euler
    shut = sd1_engine.generate(GenerationParams(**BASE, s_churn=20.0, s_tmin=1e6))
    assert np.array_equal(np.asarray(shut.images[0]), np.asarray(plain.images[0]))
    with pytest.raises(BoothError, match="s_noise above 0"):
        sd1_engine.generate(GenerationParams(**BASE, s_noise=0.0))


def test_the_api_fields_and_a_pasted_infotext_set_it():
    pytest.importorskip("fastapi")
    from booth.server.api_a1111 import Txt2ImgRequest
    from booth.server.config import Limits
    from booth.server.generation import apply_infotext, build_params

    request = Txt2ImgRequest(prompt="x", sampler_name="Euler", s_churn=3.0, s_tmax=10.0).model_dump()
    params = build_params("txt2img", request, {}, Limits())
    assert (params.s_churn, params.s_tmin, params.s_tmax, params.s_noise) == (3.0, 0.0, 10.0, 1.0)
    pasted = apply_infotext(
        {"infotext": "x\nSteps: 20, Seed: 3, Sigma churn: 2, Sigma noise: 1.003"}, {"infotext"}
    )
    assert (pasted["s_churn"], pasted["s_noise"]) == (2.0, 1.003)
