"""A1111 infotext (formats.md §9) and image metadata import/export (formats.md §9.3, §10)."""

from __future__ import annotations

import json
import struct

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from booth.errors import BoothError
from booth.generate.metadata import (
    build_infotext,
    decode_user_comment,
    exif_with_user_comment,
    parse_infotext,
    png_info_text,
    read_image_metadata,
    save_image,
    save_png,
)

# A real-looking A1111 v1.10 infotext: multi-line prompt and negative prompt, quoted hashes, hires keys.
A1111_TEXT = (
    "masterpiece, best quality,\n"
    "1girl, (red dress:1.2), <lora:my_style:0.8>\n"
    "Negative prompt: lowres, bad anatomy,\n"
    "worst quality\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Clip skip: 2, "
    'Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "my_style: 0123456789ab", '
    'TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every chunk of a PNG file."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def image(color="red", size=(16, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


# ------------------------------------------------------------------------------------------------------
# build


def test_build_matches_the_reference_example_exactly():
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 123,
              "Size": "512x512", "Model hash": "abcdef1234", "Model": "name", "Version": "v1.10.1"}  # fmt: skip
    assert build_infotext("a cat", "ugly", params) == (
        "a cat\nNegative prompt: ugly\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, "
        "Model hash: abcdef1234, Model: name, Version: v1.10.1"
    )


def test_build_orders_keys_drops_none_quotes_and_formats_numbers():
    params = {
        "Version": "booth 0.1.0",
        "Lora hashes": "my_style: abc123def456, other_lora: 0123456789ab",
        "Seed": 1,
        "Eta": 0.5,
        "Steps": 20,
        "Tiling": "Tiling",
        "Clip skip": 2,
        "ENSD": None,
        "Denoising strength": 0.75,
        "CFG scale": 7.5,
        "Size": (768, 512),
        "Hires prompt": 'line one\nsays "hi"',
        "Note": "naïve: ünïcode",
    }
    text = build_infotext("p", "", params)
    assert text == (
        "p\n"
        "Steps: 20, CFG scale: 7.5, Seed: 1, Size: 768x512, Denoising strength: 0.75, Clip skip: 2, Tiling, "
        'Lora hashes: "my_style: abc123def456, other_lora: 0123456789ab", Eta: 0.5, '
        'Hires prompt: "line one\\nsays \\"hi\\"", Note: "naïve: ünïcode", Version: booth 0.1.0'
    )
    assert "Negative prompt" not in text


def test_build_without_parameters_or_prompt():
    assert build_infotext("just a prompt", None, {}) == "just a prompt"
    assert build_infotext("", "bad", {"Steps": 5, "Seed": 1, "Sampler": "Euler"}) == (
        "Negative prompt: bad\nSteps: 5, Sampler: Euler, Seed: 1"
    )


# ------------------------------------------------------------------------------------------------------
# parse


def test_parse_real_a1111_infotext():
    p = parse_infotext(A1111_TEXT)
    assert list(p)[:2] == ["Prompt", "Negative prompt"]
    assert p["Prompt"] == "masterpiece, best quality,\n1girl, (red dress:1.2), <lora:my_style:0.8>"
    assert p["Negative prompt"] == "lowres, bad anatomy,\nworst quality"
    assert p["Steps"] == "28" and p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
    assert p["CFG scale"] == "6.5" and p["Seed"] == "3141592653"
    assert p["Size-1"] == "512" and p["Size-2"] == "768" and "Size" not in p
    assert p["Lora hashes"] == "my_style: 0123456789ab"
    assert p["TI hashes"] == "easynegative: c74b4e810b03"
    assert p["Hires upscaler"] == "Latent" and p["Version"] == "v1.10.1"


def test_last_line_needs_three_pairs_to_be_parameters():
    p = parse_infotext("a photo\nstyle: anime, pose: standing")
    assert p["Prompt"] == "a photo\nstyle: anime, pose: standing"
    assert set(p) == {"Prompt", "Negative prompt"}
    p = parse_infotext("a photo\nstyle: anime, pose: standing, light: soft")
    assert p["Prompt"] == "a photo" and p["light"] == "soft"


def test_parse_params_only_and_crlf():
    p = parse_infotext("Steps: 10, Sampler: Euler a, Seed: 5")
    assert p["Prompt"] == "" and p["Sampler"] == "Euler a"
    p = parse_infotext("cat\r\nNegative prompt: dog\r\nSteps: 10, Sampler: Euler a, Seed: 5")
    assert p["Prompt"] == "cat" and p["Negative prompt"] == "dog" and p["Seed"] == "5"


def test_round_trip_recovers_every_field_as_strings():
    prompt = "a (sks:1.1) dog, on the beach\nBREAK sunset: golden"
    negative = 'blurry, "bad" hands\nlowres'
    params = {
        "Steps": 30, "Sampler": "DPM++ 2M SDE", "Schedule type": "Exponential", "CFG scale": 4.5, "Seed": 42,
        "Size": "640x448", "Model hash": "0123456789", "Model": "my model, v2", "Variation seed": 7,
        "Variation seed strength": 0.25, "RNG": "CPU", "Lora hashes": 'x: 1, y: 2', "Emphasis": "No norm",
        "Path": "C:\\models\\x.safetensors", "Unicode": "日本語, ok", "Version": "booth 0.1.0",
    }  # fmt: skip
    parsed = parse_infotext(build_infotext(prompt, negative, params))
    assert parsed["Prompt"] == prompt and parsed["Negative prompt"] == negative
    for key, value in params.items():
        if key == "Size":
            assert (parsed["Size-1"], parsed["Size-2"]) == ("640", "448")
        elif key == "CFG scale":
            assert parsed[key] == "4.5"
        else:
            assert parsed[key] == str(value), key


# ------------------------------------------------------------------------------------------------------
# PNG


def test_save_png_writes_parameters_and_booth_chunks(tmp_path):
    infotext = build_infotext("a cat", "ugly", {"Steps": 20, "Sampler": "Euler", "Seed": 9, "Size": "16x16"})
    path = save_png(image(), tmp_path / "x.png", infotext, {"seed": 9, "params": {"steps": 20}})
    chunks = png_chunks(path.read_bytes())
    text = [body for kind, body in chunks if kind == b"tEXt"]
    assert b"parameters\x00" + infotext.encode("latin-1") in text  # A1111: tEXt keyword "parameters"
    meta = read_image_metadata(path)
    assert meta.source == "booth" and meta.infotext == infotext
    assert meta.parameters["Sampler"] == "Euler" and meta.parameters["Size-1"] == "16"
    assert meta.booth["seed"] == 9 and meta.booth["params"] == {"steps": 20}
    assert "diffusers" in meta.booth["versions"] and meta.booth["infotext"] == infotext
    assert "booth" in meta.items and "parameters" not in meta.items
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind


def test_non_latin1_infotext_goes_to_itxt(tmp_path):
    infotext = build_infotext("猫, 桜の木の下で", "", {"Steps": 20, "Sampler": "Euler", "Seed": 1})
    path = save_png(image(), tmp_path / "u.png", infotext, None)
    kinds = [(kind, body.split(b"\x00", 1)[0]) for kind, body in png_chunks(path.read_bytes())]
    assert (b"iTXt", b"parameters") in kinds
    assert read_image_metadata(path).parameters["Prompt"] == "猫, 桜の木の下で"


def test_save_png_keeps_existing_text_chunks_and_replaces_files_atomically(tmp_path):
    src = image()
    src.info["sd-ti-embedding"] = "payload"
    target = tmp_path / "y.png"
    target.write_bytes(b"old contents")
    save_png(src, target, "p\nSteps: 1, Sampler: Euler, Seed: 2", {})
    meta = read_image_metadata(target)
    assert meta.items["sd-ti-embedding"] == "payload"
    assert meta.parameters["Seed"] == "2"


def test_failed_write_leaves_no_temp_file(tmp_path):
    class Broken:
        info: dict = {}

        def save(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

    with pytest.raises(BoothError, match="No space left on device"):
        save_png(Broken(), tmp_path / "z.png", "x", None)
    assert list(tmp_path.iterdir()) == []


def test_a1111_png_without_booth_chunk(tmp_path):
    info = PngInfo()
    info.add_text("parameters", A1111_TEXT)
    info.add_text("Software", "other")
    path = tmp_path / "a1111.png"
    image().save(path, pnginfo=info)
    meta = read_image_metadata(path)
    assert meta.source == "a1111" and meta.infotext == A1111_TEXT and meta.booth is None
    assert meta.items == {"Software": "other"}
    assert meta.png_info_response() == {"info": A1111_TEXT, "items": {"Software": "other"},
                                        "parameters": parse_infotext(A1111_TEXT)}  # fmt: skip
    assert read_image_metadata(path.read_bytes()).infotext == A1111_TEXT  # bytes input (API base64 payloads)
    with Image.open(path) as opened:
        assert read_image_metadata(opened).source == "a1111"  # PIL input


# ------------------------------------------------------------------------------------------------------
# JPEG / WEBP EXIF UserComment


def test_exif_user_comment_byte_layout():
    exif = exif_with_user_comment("a, b")
    payload = b"UNICODE\x00" + "a, b".encode("utf-16-be")
    assert exif.startswith(b"Exif\x00\x00MM\x00\x2a")
    assert exif.endswith(payload)
    # UserComment entry: tag 0x9286, type 7 (UNDEFINED), count = payload length
    assert struct.pack(">HHI", 0x9286, 7, len(payload)) in exif
    assert decode_user_comment(payload) == "a, b"
    assert decode_user_comment(b"UNICODE\x00" + "a, b".encode("utf-16-le")) == "a, b"  # other writers' order
    assert decode_user_comment(b"ASCII\x00\x00\x00plain") == "plain"


@pytest.mark.parametrize("ext", [".jpg", ".jpeg", ".webp"])
def test_jpeg_and_webp_carry_infotext_in_exif(tmp_path, ext):
    infotext = build_infotext("ünïcode, 日本\nline 2", "bad", {"Steps": 20, "Sampler": "Euler a", "Seed": 3})
    path = save_image(image(), tmp_path / f"x{ext}", infotext, {"ignored": True})
    raw = path.read_bytes()
    assert b"UNICODE\x00" + infotext.encode("utf-16-be") in raw
    meta = read_image_metadata(path)
    assert meta.source == "a1111" and meta.infotext == infotext
    assert meta.parameters["Prompt"] == "ünïcode, 日本\nline 2" and meta.parameters["Seed"] == "3"


def test_jpeg_from_rgba_and_unsupported_extension(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (1, 2, 3, 128))
    assert read_image_metadata(save_image(rgba, tmp_path / "a.jpg", "p", None)).infotext == "p"
    with pytest.raises(BoothError, match="unsupported image extension"):
        save_image(image(), tmp_path / "a.gif", "p", None)
    with pytest.raises(BoothError, match="too long for JPEG"):
        save_image(image(), tmp_path / "b.jpg", "x" * 40000, None)


# ------------------------------------------------------------------------------------------------------
# ComfyUI and InvokeAI


COMFY_GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 42, "steps": 25, "cfg": 6.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0,
        "model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15/dreamshaper_8.safetensors"}},
    "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "sks.safetensors",
                                                  "strength_model": 1.0, "strength_clip": 1.0}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog, on the beach", "clip": ["10", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, lowres", "clip": ["10", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
}  # fmt: skip


def save_with_chunks(path, chunks: dict[str, str]):
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    image().save(path, pnginfo=info)
    return path


def test_comfyui_api_graph_is_read_and_synthesised(tmp_path):
    path = save_with_chunks(tmp_path / "c.png", {"prompt": json.dumps(COMFY_GRAPH), "workflow": "{}"})
    meta = read_image_metadata(path)
    assert meta.source == "comfyui"
    p = meta.parameters
    assert p["Prompt"] == "a photo of sks dog, on the beach" and p["Negative prompt"] == "blurry, lowres"
    assert (p["Steps"], p["Sampler"], p["Schedule type"], p["CFG scale"], p["Seed"]) == (
        "25",
        "DPM++ 2M",
        "Karras",
        "6.5",
        "42",
    )
    assert (p["Size-1"], p["Size-2"], p["Model"]) == ("512", "768", "dreamshaper_8")
    assert "Denoising strength" not in p
    assert set(meta.items) == {"prompt", "workflow"}
    assert meta.infotext.startswith(
        "a photo of sks dog, on the beach\nNegative prompt: blurry, lowres\nSteps: 25"
    )


def test_comfyui_hires_graph_reports_the_first_pass(tmp_path):
    graph = json.loads(json.dumps(COMFY_GRAPH))
    graph["11"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                                                             "width": 1024, "height": 1536, "crop": "disabled"}}  # fmt: skip
    # The second pass has the lower id, a linked seed and negative through a ConditioningCombine.
    graph["2"] = {"class_type": "KSampler", "inputs": {
        "seed": ["12", 0], "steps": 10, "cfg": 5, "sampler_name": "euler_ancestral", "scheduler": "normal",
        "denoise": 0.5, "model": ["10", 0], "positive": ["6", 0], "negative": ["13", 0],
        "latent_image": ["11", 0]}}  # fmt: skip
    graph["12"] = {"class_type": "PrimitiveInt", "inputs": {"value": 7}}
    graph["13"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["7", 0],
                                                                   "conditioning_2": ["7", 0]}}  # fmt: skip
    p = read_image_metadata(save_with_chunks(tmp_path / "h.png", {"prompt": json.dumps(graph)})).parameters
    assert (p["Steps"], p["Seed"], p["Size-1"]) == ("25", "42", "512")
    # and the second pass alone resolves links through primitives and conditioning nodes
    del graph["3"]["class_type"]
    p = read_image_metadata(save_with_chunks(tmp_path / "h2.png", {"prompt": json.dumps(graph)})).parameters
    assert (p["Steps"], p["Seed"], p["Sampler"], p["Schedule type"]) == ("10", "7", "Euler a", "Normal")
    assert p["Negative prompt"] == "blurry, lowres" and p["Denoising strength"] == "0.5"


def test_comfyui_workflow_only(tmp_path):
    workflow = {
        "nodes": [
            {"id": 3, "type": "KSampler", "widgets_values": [99, "fixed", 12, 8, "euler", "simple", 1],
             "inputs": [{"name": "positive", "link": 4}, {"name": "negative", "link": 6}]},
            {"id": 6, "type": "CLIPTextEncode", "widgets_values": ["castle on a hill"]},
            {"id": 7, "type": "CLIPTextEncode", "widgets_values": ["fog"]},
        ],
        "links": [[4, 6, 0, 3, 1, "CONDITIONING"], [6, 7, 0, 3, 2, "CONDITIONING"]],
    }  # fmt: skip
    p = read_image_metadata(
        save_with_chunks(tmp_path / "w.png", {"workflow": json.dumps(workflow)})
    ).parameters
    assert (p["Prompt"], p["Negative prompt"], p["Steps"], p["Sampler"], p["Schedule type"], p["Seed"]) == (
        "castle on a hill",
        "fog",
        "12",
        "Euler",
        "Simple",
        "99",
    )


def test_invokeai_metadata(tmp_path):
    data = {"positive_prompt": "a red fox", "negative_prompt": "cartoon", "seed": 1234, "steps": 30,
            "cfg_scale": 7.5, "scheduler": "dpmpp_2m_k", "width": 768, "height": 512,
            "model": {"name": "Juggernaut XL", "base": "sdxl", "hash": "blake3:abc"}, "app_version": "4.2.0"}  # fmt: skip
    meta = read_image_metadata(save_with_chunks(tmp_path / "i.png", {"invokeai_metadata": json.dumps(data)}))
    assert meta.source == "invokeai"
    p = meta.parameters
    assert (p["Prompt"], p["Negative prompt"], p["Seed"], p["Steps"], p["CFG scale"]) == (
        "a red fox",
        "cartoon",
        "1234",
        "30",
        "7.5",
    )
    assert (p["Sampler"], p["Schedule type"], p["Model"], p["Size-1"], p["Size-2"]) == (
        "DPM++ 2M",
        "Karras",
        "Juggernaut XL",
        "768",
        "512",
    )


def test_image_without_metadata(tmp_path):
    path = tmp_path / "plain.png"
    image().save(path)
    meta = read_image_metadata(path)
    assert meta.source is None and meta.infotext is None and meta.parameters == {} and meta.items == {}
    assert "no generation metadata" in png_info_text(path)


# ------------------------------------------------------------------------------------------------------
# errors and report


def test_corrupt_and_non_image_files_raise_one_line_booth_errors(tmp_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image\nat all")
    good = save_png(image(size=(64, 64)), tmp_path / "good.png", "p\nSteps: 1, Seed: 1, Sampler: Euler", None)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    for bad in (text_file, truncated, tmp_path / "missing.png", b"\x89PNG garbage"):
        with pytest.raises(BoothError) as err:
            read_image_metadata(bad)
        assert "\n" not in str(err.value) and "cannot read image metadata" in str(err.value)


def test_png_info_text_report(tmp_path):
    path = save_png(image(), tmp_path / "r.png", A1111_TEXT, {"seed": 3141592653})
    report = png_info_text(path)
    assert "source: booth" in report and "image: PNG 16x16" in report
    assert "Sampler:" in report and "DPM++ 2M" in report
    assert "Negative prompt:" in report and "lowres, bad anatomy,\\nworst quality" in report
