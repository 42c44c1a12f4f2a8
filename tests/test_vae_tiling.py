"""The VAE within memory (`booth.generate.vae_decode`): a batch decoded picture by picture gives the batch's
pixels; "on" decodes in diffusers' tiles; "auto" redoes a picture that ran out of memory in tiles; "off" turns
running out of memory into a one-line error; the engine, `booth generate` and `booth serve` take the mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from booth.errors import BoothError
from booth.generate import vae_decode
from booth.generate.params import GenerationParams
from booth.models.tiny import tiny_pipeline


@pytest.fixture
def vae():
    return tiny_pipeline("sd1").vae.eval()  # sample_size 32: pictures above 32 px are tiled


def latents(n: int, side: int, factor: int = 2) -> torch.Tensor:
    """Latents of `side`-pixel pictures for the tiny VAE (2 blocks: x2)."""
    return torch.randn(n, 4, side // factor, side // factor, generator=torch.Generator().manual_seed(0))


def fail_untiled(vae, monkeypatch, method="decode", error=None):
    """Make `vae.<method>` run out of memory unless the VAE works in tiles (how a large picture fails)."""
    original = getattr(vae, method)
    calls = []

    def guarded(*args, **kwargs):
        calls.append(vae.use_tiling)
        if not vae.use_tiling:
            raise error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(vae, method, guarded)
    return calls


@torch.no_grad()
def test_a_batch_decoded_picture_by_picture_gives_the_batch_s_pixels(vae):
    z = latents(3, 64)
    torch.testing.assert_close(vae_decode.decode(vae, z, "off"), vae.decode(z).sample, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_on_decodes_in_diffusers_tiles(vae):
    z = latents(1, 64)
    vae.enable_tiling()
    expected = vae.tiled_decode(z).sample
    vae.disable_tiling()
    whole = vae.decode(z).sample
    tiled = vae_decode.decode(vae, z, "on")
    torch.testing.assert_close(tiled, expected)
    assert (tiled - whole).abs().max() > 1e-3  # the tiles are really used
    assert vae.use_tiling is False  # the VAE's own setting is put back
    small = latents(1, 32)  # one tile: done whole
    torch.testing.assert_close(vae_decode.decode(vae, small, "on"), vae.decode(small).sample)


@torch.no_grad()
def test_auto_redoes_a_picture_that_ran_out_of_memory_in_tiles(vae, monkeypatch):
    z = latents(2, 64)
    expected = vae_decode.decode(vae, z, "on")
    calls = fail_untiled(vae, monkeypatch)
    with pytest.warns(
        UserWarning, match="out of memory decoding a 64x64 picture with the VAE whole; doing it in tiles"
    ):
        out = vae_decode.decode(vae, z, "auto")
    torch.testing.assert_close(out, expected)
    assert calls == [False, True, False, True] and vae.use_tiling is False

    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tiled_mean = vae_decode.encode(vae, pixels, "on")
    fail_untiled(vae, monkeypatch, "encode")
    with pytest.warns(UserWarning, match="encoding a 64x64 picture"):
        torch.testing.assert_close(vae_decode.encode(vae, pixels, "auto"), tiled_mean)


@torch.no_grad()
def test_off_makes_running_out_of_memory_a_one_line_error_and_other_errors_pass(vae, monkeypatch):
    fail_untiled(vae, monkeypatch)
    with pytest.raises(
        BoothError, match=r"out of memory decoding a 64x64 picture with the VAE whole: use VAE tiling"
    ):
        vae_decode.decode(vae, latents(1, 64), "off")
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: can't allocate memory: 1 GB")
    assert vae_decode.is_out_of_memory(cpu) and not vae_decode.is_out_of_memory(
        RuntimeError("shape mismatch")
    )
    monkeypatch.undo()
    fail_untiled(vae, monkeypatch, error=RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        vae_decode.decode(vae, latents(1, 64), "auto")  # not memory: not retried, not hidden
    with pytest.raises(BoothError, match="VAE tiling must be one of auto, on, off"):
        vae_decode.check_mode("sometimes")


def test_the_engine_and_the_commands_take_the_mode(sd1_engine, tiny_sd1_dir, tmp_path, monkeypatch, capsys):
    from booth.cli import main
    from booth.server.config import ServerConfig

    params = GenerationParams(prompt="a cat", steps=1, width=64, height=64, seed=1, sampler_name="Euler")
    fail_untiled(sd1_engine.pipe.vae, monkeypatch)
    sd1_engine.vae_tiling = "on"
    try:
        tiled = np.asarray(sd1_engine.generate(params).images[0])
        sd1_engine.vae_tiling = "auto"
        with pytest.warns(UserWarning, match="doing it in tiles"):
            assert np.array_equal(np.asarray(sd1_engine.generate(params).images[0]), tiled)
        sd1_engine.vae_tiling = "off"
        with pytest.raises(BoothError, match="out of memory decoding"):
            sd1_engine.generate(params)
    finally:
        sd1_engine.vae_tiling = "auto"
    monkeypatch.undo()

    argv = [
        "generate",
        "a cat",
        "--model",
        str(tiny_sd1_dir),
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "64",
    ]
    argv += ["--no-progress", "--out", str(tmp_path)]
    assert main([*argv, "--vae-tiling", "on"]) == 0 and len(list(tmp_path.glob("*.png"))) == 1
    with pytest.raises(SystemExit):
        main([*argv, "--vae-tiling", "sometimes"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(BoothError, match="VAE tiling must be one of"):
        ServerConfig(model=str(tiny_sd1_dir), data_dir=tmp_path / "d", vae_tiling="sometimes").validate()
