"""Upscalers: ESRGAN / Real-ESRGAN model files in their key layouts, tiles, A1111's upscale arithmetic, the
Extras postprocess, hires fix with a model upscaler, and `booth upscale`."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from booth.cli import main
from booth.errors import BoothError
from booth.generate.metadata import parse_infotext, read_image_metadata
from booth.generate.params import GenerationParams
from booth.generate.upscale import ExtrasParams, Upscalers, postprocess, postprocess_infotext
from booth.models.upscalers import RRDBNet, SRVGGNetCompact, UpscalerModel, build_upscaler, load_upscaler


def seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights drawn from a seed, small enough that the residual paths stay in range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def tiny_rrdb(n_up: int = 2, unshuffle: int = 1, seed: int = 0) -> RRDBNet:
    return seeded(RRDBNet(3, 3, nf=8, nb=2, gc=4, n_up=n_up, unshuffle=unshuffle), seed)


def tiny_compact(upscale: int = 4, seed: int = 0) -> SRVGGNetCompact:
    return seeded(SRVGGNetCompact(3, 3, nf=8, num_conv=2, upscale=upscale), seed)


def original_esrgan_keys(net: RRDBNet) -> dict[str, torch.Tensor]:
    """The same weights under the original ESRGAN repository's names (written out here, not derived from
    booth's converter): model.0, model.1.sub.I.RDBk.convc.0, model.1.sub.NB, model.3/6 (ups), 8 (HR), 10."""
    out = {}
    for key, value in net.state_dict().items():
        part, _, kind = key.rpartition(".")
        if part == "conv_first":
            name = "model.0"
        elif part.startswith("body."):
            _, block, rdb, conv = part.split(".")
            name = f"model.1.sub.{block}.RDB{rdb[-1]}.{conv}.0"
        elif part == "conv_body":
            name = f"model.1.sub.{len(net.body)}"
        elif part.startswith("conv_up"):
            name = f"model.{3 * int(part[-1])}"
        else:
            name = {"conv_hr": f"model.{3 * net.n_up + 2}", "conv_last": f"model.{3 * net.n_up + 4}"}[part]
        out[f"{name}.{kind}"] = value
    return out


def picture(width: int = 24, height: int = 20, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# ------------------------------------------------------------------------------------------------------
# model files


@pytest.mark.parametrize("layout", ["basicsr", "original"])
def test_an_esrgan_file_in_either_key_layout_rebuilds_the_network(tmp_path, layout):
    net = tiny_rrdb()
    state = net.state_dict() if layout == "basicsr" else original_esrgan_keys(net)
    path = tmp_path / "4x-Test.pth"
    torch.save({"params_ema": state} if layout == "basicsr" else state, path)  # Real-ESRGAN wraps its dict
    model = load_upscaler(path)
    assert (model.scale, model.arch) == (4, "ESRGAN (BasicSR)" if layout == "basicsr" else "ESRGAN")
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        assert torch.allclose(model.net(x), net(x), atol=1e-6)
    assert model.upscale(x, tile=0).shape == (1, 3, 48, 40)


def test_a_real_esrgan_x2_model_unshuffles_its_input_and_takes_odd_sizes(tmp_path):
    net = tiny_rrdb(unshuffle=2)  # RealESRGAN_x2plus: 12 input channels, two 2x upsamples
    save_file(net.state_dict(), tmp_path / "RealESRGAN_x2plus.safetensors")
    model = load_upscaler(tmp_path / "RealESRGAN_x2plus.safetensors")
    assert model.scale == 2 and model.net.conv_first.in_channels == 12
    out = model.upscale(torch.rand(1, 3, 11, 9), tile=0)
    assert out.shape == (1, 3, 22, 18) and out.min() >= 0 and out.max() <= 1


def test_a_compact_model_is_read_with_its_depth_and_factor(tmp_path):
    net = tiny_compact(upscale=2)
    torch.save({"params": net.state_dict()}, tmp_path / "realesr-animevideov3.pth")
    model = load_upscaler(tmp_path / "realesr-animevideov3.pth")
    assert (model.scale, model.arch, len(model.net.body)) == (2, "Real-ESRGAN compact", 7)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.net(x), net(x), atol=1e-6)


@pytest.mark.parametrize("net", [tiny_compact(), tiny_rrdb(unshuffle=2)], ids=["compact", "x2-unshuffle"])
def test_tiles_with_a_context_margin_join_into_the_whole_picture(net):
    model = UpscalerModel(net, net.scale, "test")
    x = torch.rand(1, 3, 37, 29, generator=torch.Generator().manual_seed(3))
    calls = []
    whole = model.upscale(x, tile=0)
    tiled = model.upscale(x, tile=12, pad=16, progress=lambda done, total: calls.append((done, total)))
    assert torch.allclose(whole, tiled, atol=1e-5)
    assert calls[-1] == (len(calls), len(calls)) and len(calls) > 4
    # without a margin the tiles see zero padding at their edges and differ there
    assert not torch.allclose(whole, model.upscale(x, tile=12, pad=0), atol=1e-3)


def test_unreadable_or_unknown_files_fail_with_one_line(tmp_path):
    (tmp_path / "text.pth").write_text("not a pickle")
    save_file({"layers.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "swinir.safetensors")
    wrong = original_esrgan_keys(tiny_rrdb())
    wrong["model.0.weight"] = torch.zeros(8, 3, 5, 5)  # a 5x5 first conv
    torch.save(wrong, tmp_path / "wrong.pth")
    cases = [
        (tmp_path / "text.pth", "is not a readable checkpoint"),
        (tmp_path / "swinir.safetensors", "unknown upscaler architecture"),
        (tmp_path / "wrong.pth", "ESRGAN weights do not fit the network they describe"),
        (tmp_path / "missing.pth", "does not exist"),
        (tmp_path / "model.onnx", "an upscaler model is a .pth / .pt / .safetensors file"),
    ]
    for path, message in cases:
        with pytest.raises(BoothError, match=message) as info:
            load_upscaler(path)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------------
# names and A1111's arithmetic


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    torch.save({"params_ema": tiny_rrdb().state_dict()}, folder / "RealESRGAN_x4plus.pth")
    save_file(tiny_rrdb(n_up=1, seed=1).state_dict(), folder / "2x-Test.safetensors")
    (folder / "notes.txt").write_text("not a model")
    return folder


def test_model_files_are_named_as_a1111_names_them(model_dir, tmp_path):
    other = tmp_path / "more"
    other.mkdir()
    torch.save(tiny_compact().state_dict(), other / "2x-Test.pth")  # the first folder's file wins
    upscalers = Upscalers([model_dir, other])
    assert upscalers.names() == ["None", "Lanczos", "Nearest", "2x-Test", "R-ESRGAN 4x+"]
    assert upscalers.get("2x-Test").path == model_dir / "2x-Test.safetensors"
    with pytest.raises(
        BoothError, match=r"unknown upscaler 'R-ESRGAN 2x\+'; valid: None, Lanczos, Nearest, 2x"
    ):
        upscalers.get("R-ESRGAN 2x+")
    torch.save(tiny_compact().state_dict(), model_dir / "4x-New.pth")
    assert "4x-New" not in upscalers.names()
    upscalers.refresh()
    assert "4x-New" in upscalers.names()


def count_calls(upscalers: Upscalers, name: str) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    model = upscalers.model(upscalers.get(name))
    model.net.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


def test_a_model_runs_until_the_picture_covers_the_target_then_lanczos_fits_it(model_dir):
    upscalers = Upscalers([model_dir], tile=0)
    shapes = count_calls(upscalers, "2x-Test")
    image = picture(20, 12)
    out = upscalers.upscale(image, 6.0, "2x-Test")  # 2x, 2x, 2x = 8x covers 6x; then down to 120x72
    assert out.size == (120, 72) and len(shapes) == 3
    shapes.clear()
    assert upscalers.upscale(image, 1.5, "2x-Test").size == (24, 16)  # 30x18 rounded down to multiples of 8
    assert len(shapes) == 1
    shapes = count_calls(upscalers, "R-ESRGAN 4x+")
    assert upscalers.upscale(image, 2.0, "R-ESRGAN 4x+").size == (40, 24) and len(shapes) == 1


def test_builtin_upscalers_resize_like_a1111(model_dir):
    upscalers = Upscalers()
    image = picture(20, 12)
    assert np.array_equal(
        np.asarray(upscalers.upscale(image, 2.0, "Nearest")),
        np.asarray(image.resize((40, 24), Image.NEAREST)),
    )
    assert np.array_equal(
        np.asarray(upscalers.upscale(image, 2.0, "None")), np.asarray(image.resize((40, 24), Image.LANCZOS))
    )
    # hires fix: "None" is a plain Lanczos resize to the exact size, a downscale never runs a model
    assert upscalers.resize(image, 30, 30, "None").size == (30, 30)
    assert Upscalers([model_dir]).resize(image, 10, 6, "R-ESRGAN 4x+").size == (10, 6)


def test_models_get_bgr_pixels_as_in_a1111(tmp_path):
    net = SRVGGNetCompact(3, 3, nf=4, num_conv=1, upscale=2)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.body[-1].bias[:4] = 0.5  # the first input channel's 2x2 outputs: +0.5
    torch.save(net.state_dict(), tmp_path / "2x-FirstChannel.pth")
    upscalers = Upscalers([tmp_path])
    out = np.asarray(upscalers.upscale(Image.new("RGB", (8, 8), (10, 20, 30)), 2.0, "2x-FirstChannel"))
    assert tuple(out[0, 0]) == (10, 20, 158)  # blue (BGR's first channel) raised by 0.5 x 255


def test_a_changed_model_file_is_loaded_again(model_dir):
    upscalers = Upscalers([model_dir])
    entry = upscalers.get("2x-Test")
    first = upscalers.model(entry)
    assert upscalers.model(entry) is first
    stamp = entry.path.stat().st_mtime_ns + 10**9
    save_file(tiny_rrdb(n_up=1, seed=7).state_dict(), entry.path)
    os.utime(entry.path, ns=(stamp, stamp))  # a later edit, however coarse the clock
    assert upscalers.model(entry) is not first


# ------------------------------------------------------------------------------------------------------
# Extras


def test_extras_scale_to_with_crop_blend_and_infotext(model_dir):
    upscalers = Upscalers([model_dir], tile=0)
    image = picture(20, 12)
    params = ExtrasParams(
        resize_mode=1,
        upscaling_resize_w=64,
        upscaling_resize_h=64,
        upscaler_1="2x-Test",
        upscaler_2="Nearest",
    )
    alone, info = postprocess(image, params, upscalers)
    assert alone.size == (64, 64)
    assert list(info) == ["Postprocess upscale to", "Postprocess crop to", "Postprocess upscaler"]
    params.extras_upscaler_2_visibility = 0.4
    blended, info = postprocess(image, params, upscalers)
    second, _ = postprocess(image, ExtrasParams(**{**params.__dict__, "upscaler_1": "Nearest"}), upscalers)
    expected = np.asarray(Image.blend(alone, second, 0.4), dtype=np.int16)
    assert np.abs(np.asarray(blended, dtype=np.int16) - expected).max() == 0
    assert postprocess_infotext(info) == (
        "Postprocess upscale to: 64x64, Postprocess crop to: 64x64, Postprocess upscaler: 2x-Test, "
        "Postprocess upscaler 2: Nearest"
    )
    uncropped, _ = postprocess(image, ExtrasParams(**{**params.__dict__, "upscaling_crop": False}), upscalers)
    assert uncropped.size == params.__class__(**{**params.__dict__, "upscaling_crop": False}).output_size(
        20, 12
    )
    assert uncropped.size == (104, 64)  # 20 x 64/12 = 106.7 -> 104 (a multiple of 8)


def test_extras_with_upscaler_none_returns_the_picture_and_bad_settings_fail(model_dir):
    upscalers = Upscalers([model_dir])
    image = picture()
    same, info = postprocess(image, ExtrasParams(upscaler_1="None"), upscalers)
    assert np.array_equal(np.asarray(same), np.asarray(image)) and info == {}
    for params, message in [
        (ExtrasParams(resize_mode=2), "unknown extras resize mode 2"),
        (ExtrasParams(upscaling_resize=0), "upscaling_resize must be in"),
        (ExtrasParams(upscaler_1="ESRGAN_4x"), "unknown upscaler 'ESRGAN_4x'"),
        (ExtrasParams(extras_upscaler_2_visibility=2), "visibility must be in"),
        (ExtrasParams(resize_mode=1, upscaling_resize_w=0), "the scale-to size must be positive"),
    ]:
        with pytest.raises(BoothError, match=message):
            postprocess(image, params, upscalers)


# ------------------------------------------------------------------------------------------------------
# hires fix and the command line


def test_hires_fix_runs_a_model_upscaler_on_the_decoded_first_pass(sd1_engine, model_dir):
    base = dict(prompt="a red apple", steps=2, width=64, height=64, seed=12, sampler_name="Euler")
    hires = dict(enable_hr=True, denoising_strength=0.0, hr_scale=2.0)
    previous = sd1_engine.upscalers
    sd1_engine.upscalers = Upscalers([model_dir])
    try:
        shapes = count_calls(sd1_engine.upscalers, "2x-Test")
        result = sd1_engine.generate(GenerationParams(**base, **hires, hr_upscaler="2x-Test"))
        first = sd1_engine.generate(GenerationParams(**base)).images[0]
        expected = sd1_engine._decode(
            sd1_engine._encode_pixels([sd1_engine.upscalers.upscale(first, 2.0, "2x-Test")])
        )
        lanczos = sd1_engine.generate(GenerationParams(**base, **hires, hr_upscaler="Lanczos"))
    finally:
        sd1_engine.upscalers = previous
    assert shapes and shapes[0] == (1, 3, 64, 64)
    assert result.images[0].size == (128, 128)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected[0]))
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(lanczos.images[0]))
    assert parse_infotext(result.infotexts[0])["Hires upscaler"] == "2x-Test"
    with pytest.raises(BoothError, match="model upscalers such as ESRGAN come from --upscaler-dir"):
        sd1_engine.generate(GenerationParams(**base, **hires, hr_upscaler="2x-Test"))


def test_the_upscale_command_keeps_parameters_and_adds_postprocessing(model_dir, tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    image = picture(16, 16)
    from booth.generate.metadata import save_png

    save_png(image, source / "a.png", "a red apple\nSteps: 20, Seed: 5")
    image.save(source / "b.jpg")
    out = tmp_path / "out"
    args = ["upscale", str(source), "--upscaler", "R-ESRGAN 4x+", "--upscaler-dir", str(model_dir)]
    assert main([*args, "--scale", "2", "--out", str(out), "--no-progress"]) == 0
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in written] == ["00000-a.png", "00001-b.png"]
    meta = read_image_metadata(out / "00000-a.png")
    assert meta.infotext == "a red apple\nSteps: 20, Seed: 5"
    assert meta.items["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: R-ESRGAN 4x+"
    with Image.open(out / "00001-b.png") as b:
        assert b.size == (32, 32) and "parameters" not in b.info
    assert main(["upscale", str(source / "a.png"), "--upscaler", "4x-Missing", "--out", str(out)]) == 2
    assert "unknown upscaler '4x-Missing'" in capsys.readouterr().err
    assert main(["upscale", str(tmp_path / "none.png"), "--out", str(out)]) == 2
    assert "no such picture or folder" in capsys.readouterr().err
    assert main(["upscale", "x.png", "--list", "--upscaler-dir", str(model_dir)]) == 0
    assert "R-ESRGAN 4x+" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["00000-a.png", "00001-b.png"]


def test_build_upscaler_refuses_a_state_dict_of_something_else():
    with pytest.raises(BoothError, match="unknown upscaler architecture"):
        build_upscaler({"encoder.weight": torch.zeros(2, 2)})


def test_the_upscale_command_shows_progress_over_the_model_tiles(model_dir, tmp_path, capsys):
    picture(32, 32).save(tmp_path / "a.png")
    args = ["upscale", str(tmp_path / "a.png"), "--upscaler", "2x-Test", "--upscaler-dir", str(model_dir)]
    assert main([*args, "--tile", "16", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "tiles:" in err and "/4 " in err and "upscaling" in err  # 2x of 32 px in 16 px tiles: 4
