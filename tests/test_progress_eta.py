"""ETA from measured step times (a1111.md §16-17: A1111's is elapsed / progress, blind to hires fix's dearer
steps): `GenerationState.eta` per pass, the engine's records, the terminal bar."""

from __future__ import annotations

import io

import pytest

from booth.generate.engine import GenerationState
from booth.generate.params import GenerationParams
from booth.generate.progress import ProgressBar, format_seconds


def test_eta_runs_each_pass_at_its_measured_rate_and_scales_an_unmeasured_one_by_pixels():
    state = GenerationState(job_count=2, sampling_steps=15, pass_steps=[10, 5], pass_pixels=[100, 400])
    assert state.eta() is None  # nothing measured yet
    for _ in range(4):
        state.record_step(1.0)
    # this batch: 6 first-pass steps at 1 s + 5 hires steps at 4 s (pixels x4); then one whole batch (10 + 20)
    assert state.eta() == pytest.approx(6 + 20 + 30)
    state.pass_no, state.pass_step = 1, 0
    for _ in range(2):
        state.record_step(3.0)  # the hires pass measured: 3 s a step, not the 4 the pixels guessed
    assert state.eta() == pytest.approx(3 * 3 + (10 * 1 + 5 * 3))
    state.job_no, state.pass_step = 1, 5
    assert state.eta() == 0


def test_the_engine_records_each_pass_s_steps(sd1_engine):
    seen = []

    def callback(state):
        seen.append((state.job_no, state.pass_no, state.pass_step, state.eta()))

    params = GenerationParams(
        prompt="a cat", steps=3, width=32, height=32, seed=1, n_iter=2, sampler_name="Euler",
        enable_hr=True, hr_scale=2, hr_second_pass_steps=2, denoising_strength=0.5,
    )  # fmt: skip
    sd1_engine.generate(params, callback=callback)
    state = sd1_engine.state
    assert state.pass_steps == [3, 2] and state.pass_pixels == [32 * 32, 64 * 64]
    assert {p: n for p, (_, n) in state.step_seconds.items()} == {0: 6, 1: 4}
    steps = [(job, p, step) for job, p, step, _ in seen]
    assert steps[:5] == [(0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 1), (0, 1, 2)]
    assert all(eta is not None and eta >= 0 for *_, eta in seen)
    assert seen[-1][-1] == 0  # nothing left after the last step of the last batch

    heun = GenerationParams(prompt="a cat", steps=3, width=32, height=32, seed=1, sampler_name="Heun")
    sd1_engine.generate(heun)  # second order: two model calls a step, one record a step
    assert sd1_engine.state.step_seconds[0][1] == 3 and sd1_engine.state.pass_step == 3


def test_the_terminal_bar_shows_the_measured_eta(sd1_engine):
    out = io.StringIO()
    bar = ProgressBar(file=out)
    sd1_engine.generate(
        GenerationParams(
            prompt="a cat", steps=3, width=32, height=32, seed=1, n_iter=2, sampler_name="Euler"
        ),
        callback=bar.update,
    )
    bar.close()
    assert "ETA " in out.getvalue() and "batch 2/2" in out.getvalue()
    assert [format_seconds(s) for s in (4.4, 125, 3723)] == ["4s", "2:05", "1:02:03"]
