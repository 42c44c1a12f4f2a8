"""`booth eval dreambench`: prompt lists, PRES / DIV / CLIPScore by hand, clear errors, and an end-to-end run on
the tiny SD1 model with tiny random DINO / CLIP evaluators and the mini world's example renders."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from booth.cli import main
from booth.errors import BoothError, NetworkRequiredError
from booth.evaluate import metrics
from booth.evaluate.dreambench import (
    LIVE_PROMPTS,
    OBJECT_PROMPTS,
    format_prompt,
    load_personalized,
    load_templates,
    noise_images,
    reference_paths,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# --- prompt lists ------------------------------------------------------------------------------------------


def test_dreambench_lists_have_25_prompts_formatted_with_identifier_and_class():
    assert len(OBJECT_PROMPTS) == len(LIVE_PROMPTS) == 25
    assert len(set(OBJECT_PROMPTS)) == len(set(LIVE_PROMPTS)) == 25
    assert OBJECT_PROMPTS[:10] == LIVE_PROMPTS[:10] and OBJECT_PROMPTS[20:] == LIVE_PROMPTS[20:]
    assert format_prompt(OBJECT_PROMPTS[0], "sks", "backpack") == "a sks backpack in the jungle"
    assert format_prompt(OBJECT_PROMPTS[14], "sks", "can") == "a sks can floating in an ocean of milk"
    assert format_prompt(LIVE_PROMPTS[13], "sks", "dog") == "a sks dog wearing a black top hat and a monocle"
    assert format_prompt(LIVE_PROMPTS[24], "sks", "cat") == "a cube shaped sks cat"
    # the class prompt (PRES, drift, CLIP-T text): identifier removed, no double spaces
    assert format_prompt(LIVE_PROMPTS[20], "", "dog") == "a red dog"
    assert all("{0} {1}" in t for t in OBJECT_PROMPTS + LIVE_PROMPTS)
    name, templates = load_templates("live")
    assert name == "live" and templates[10] == "a {0} {1} wearing a red hat"


def test_prompt_files_and_unknown_lists(tmp_path):
    with pytest.raises(BoothError, match="unknown prompt list 'animals'.*object.*live"):
        load_templates("animals")
    good = tmp_path / "prompts.txt"
    good.write_text("# my prompts\na {0} {1} on the moon\n\nan oil painting of a {0} {1}\n")
    assert load_templates(str(good)) == (str(good), ["a {0} {1} on the moon", "an oil painting of a {0} {1}"])
    bad = tmp_path / "bad.txt"
    bad.write_text("a {0} {1}\na {1} without the subject\n")
    with pytest.raises(BoothError, match="prompt 2 .* has no \\{0\\}"):
        load_templates(str(bad))
    assert load_templates(str(bad), require_identifier=False)[1][1] == "a {1} without the subject"
    broken = tmp_path / "broken.txt"
    broken.write_text("a {0} {2}\n")
    with pytest.raises(BoothError, match="bad prompt template"):
        load_templates(str(broken))


# --- metrics -----------------------------------------------------------------------------------------------


def test_pres_is_the_mean_over_class_image_reference_pairs():
    class_images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    references = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    # cosines: row0: 1, 0; row1: 0, -1; row2: 1/sqrt2, -1/sqrt2 -> sum 0 over 6 pairs
    assert metrics.pres(class_images, references) == pytest.approx(0.0, abs=1e-7)
    assert metrics.pres(references[:1], references[:1] * 5) == pytest.approx(1.0)


def test_div_averages_pairwise_distance_per_prompt_then_over_prompts():
    same = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # distance 0
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # 1 - cos: 1, 2, 1 -> mean 4/3
    single = torch.tensor([[0.0, 1.0]])  # fewer than two images: skipped
    assert metrics.div([same, spread, single]) == pytest.approx((0 + 4 / 3) / 2)
    with pytest.raises(ValueError):
        metrics.div([single])


def test_clip_score_clips_each_sample_at_zero():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [2.0, 0.0]])
    # cos: 1/sqrt2, -1 (clipped to 0), 1
    assert metrics.clip_score(images, texts) == pytest.approx(2.5 * (1 / math.sqrt(2) + 0 + 1) / 3)
    assert metrics.paired_cosine(images, texts) == pytest.approx((1 / math.sqrt(2) - 1 + 1) / 3)


# --- bad input ---------------------------------------------------------------------------------------------


def test_missing_reference_images(tmp_path):
    with pytest.raises(BoothError, match="subject images folder not found"):
        reference_paths(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(BoothError, match="no reference images in"):
        reference_paths(tmp_path)


def test_adapters_for_another_base_model_are_refused(tiny_sd1_dir, tmp_path):
    from peft import LoraConfig

    from booth.models.tiny import tiny_pipeline
    from booth.train.formats.embeddings import save_embedding
    from booth.train.formats.lora import attach_lora_adapter, save_lora

    xl = tiny_pipeline("sdxl")
    attach_lora_adapter(xl.unet, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"]))
    files = save_lora(tmp_path / "xl", xl, name="xl", alpha=4, rank=4)
    with pytest.raises(BoothError, match="trained for SDXL"):
        load_personalized(str(tiny_sd1_dir), lora=[str(files["kohya"])])
    save_embedding(tmp_path / "wide.safetensors", torch.randn(1, 48), token="<wide>")  # tiny SD1 is 32 wide
    with pytest.raises(BoothError, match="another base model: <wide>"):
        load_personalized(str(tiny_sd1_dir), embeddings=[str(tmp_path / "wide.safetensors")])


def test_evaluator_not_downloaded_is_a_network_error(monkeypatch):
    from booth.evaluate.backbones import DinoBackbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkRequiredError, match="must be downloaded first"):
        DinoBackbone("facebook/dino-vits16-not-cached")


def test_backbone_preprocessing_follows_the_reference_code(tmp_path):
    """DINO: shortest edge 256 bicubic, centre crop 224, ImageNet mean/std; CLIP without a preprocessor config:
    shortest edge = crop = image size, bicubic, CLIP mean/std (evaluation.md §2.2)."""
    import numpy as np

    from booth.evaluate.backbones import ClipBackbone, DinoBackbone, _pixels, write_tiny_clip, write_tiny_dino

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    dino = DinoBackbone(write_tiny_dino(tmp_path / "dino", image_size=224))
    resized = image.resize((341, 256), Image.Resampling.BICUBIC)  # 400 * 256 / 300 = 341.3
    left, top = (341 - 224) // 2, (256 - 224) // 2
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32) / 255
    expected = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    got = _pixels([image], dino.pre)[0].numpy().transpose(1, 2, 0)
    assert got.shape == (224, 224, 3) and np.abs(got - expected).max() < 1e-5
    assert dino.image_features([image, image]).shape == (2, 32)

    bare = ClipBackbone(write_tiny_clip(tmp_path / "bare", preprocessor=False))
    full = ClipBackbone(write_tiny_clip(tmp_path / "full"))
    assert "CLIP defaults" in bare.describe()["preprocessing"]
    assert "preprocessor_config.json" in full.describe()["preprocessing"]
    assert torch.allclose(_pixels([image], bare.pre), _pixels([image], full.pre))
    assert bare.pre["image_mean"] == [0.48145466, 0.4578275, 0.40821073]


# --- end to end --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluators(tmp_path_factory):
    from booth.evaluate.backbones import write_tiny_clip, write_tiny_dino

    root = tmp_path_factory.mktemp("evaluators")
    return write_tiny_dino(root / "dino"), write_tiny_clip(root / "clip")


@pytest.fixture(scope="module")
def sd1_lora(tmp_path_factory):
    from peft import LoraConfig

    from booth.models.tiny import tiny_pipeline
    from booth.train.formats.lora import attach_lora_adapter, save_lora

    pipe = tiny_pipeline("sd1")
    attach_lora_adapter(pipe.unet, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    gen = torch.Generator().manual_seed(0)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.5
    return save_lora(tmp_path_factory.mktemp("lora"), pipe, name="subj", alpha=4, rank=4)["kohya"]


@pytest.fixture(scope="module")
def bench_run(tiny_sd1_dir, evaluators, sd1_lora, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "poodle"
    dino, clip = evaluators
    code = main(
        [
            "eval",
            "dreambench",
            "--model",
            str(tiny_sd1_dir),
            "--lora",
            str(sd1_lora),
            "--subject-images",
            str(EXAMPLES / "poodle"),
            "--class-noun",
            "dog",
            "--live",
            "--images-per-prompt",
            "2",
            "--limit-prompts",
            "3",
            "--steps",
            "2",
            "--class-images",
            "--dino",
            str(dino),
            "--clip",
            str(clip),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_record_model_adapter_protocol_backbones_and_convention(bench_run, tiny_sd1_dir, sd1_lora):
    out, r = bench_run
    assert r["protocol"] == "booth dreambench v1"
    assert r["model"]["name"] == Path(tiny_sd1_dir).name
    assert r["adapter"]["kind"] == "lora" and r["adapter"]["path"] == str(sd1_lora)
    assert r["backbones"]["dino"]["class"].startswith("transformers.ViTModel")
    assert r["backbones"]["clip"]["name"].endswith("clip") and r["backbones"]["kid"] == "clip"
    assert {"scale", "averaging", "clip_t_text", "div", "pres", "kid"} <= set(r["score_convention"])
    assert r["prompts"] == {"list": "live", "count": 3, "templates": list(LIVE_PROMPTS[:3])}
    assert r["subject"]["identifier"] == "sks" and len(r["subject"]["references"]) == 5
    prompts = [p["prompt"] for p in r["per_prompt"]]
    assert prompts == ["a sks dog in the jungle", "a sks dog in the snow", "a sks dog on the beach"]
    assert [p["clip_t_text"] for p in r["per_prompt"]][1] == "a dog in the snow"
    assert [p["seeds"] for p in r["per_prompt"]] == [[0, 1], [2, 3], [4, 5]]
    for p in r["per_prompt"]:
        assert all((out / f).is_file() for f in p["images"])


def test_scores_recompute_from_the_saved_images(bench_run, evaluators):
    from booth.evaluate.backbones import ClipBackbone, DinoBackbone

    out, r = bench_run
    s = r["scores"]
    dino, clip = DinoBackbone(evaluators[0]), ClipBackbone(evaluators[1])
    files = [out / f for p in r["per_prompt"] for f in p["images"]]
    images = [Image.open(f).convert("RGB") for f in files]
    refs = [Image.open(p).convert("RGB") for p in sorted((EXAMPLES / "poodle").glob("*.png"))]
    assert s["dino"] == pytest.approx(
        metrics.mean_pairwise_cosine(dino.image_features(images), dino.image_features(refs)), abs=1e-5
    )
    clip_i = metrics.mean_pairwise_cosine(clip.image_features(images), clip.image_features(refs))
    assert s["clip_i"] == pytest.approx(clip_i, abs=1e-5)
    texts = clip.text_features([p["clip_t_text"] for p in r["per_prompt"] for _ in p["images"]])
    assert s["clip_t"] == pytest.approx(metrics.paired_cosine(clip.image_features(images), texts), abs=1e-5)
    # equal images per prompt: the global pair mean equals the mean of per-prompt means
    assert s["dino"] == pytest.approx(sum(p["dino"] for p in r["per_prompt"]) / 3, abs=1e-6)
    assert s["clip_t_x100"] == pytest.approx(100 * s["clip_t"])
    assert s["n_generated"] == 6 and s["n_pairs"] == 30
    assert 0 <= s["div"] <= 2 and -1 <= s["pres"] <= 1 and -1 <= s["pres_base"] <= 1
    # the LoRA changes the class images (drift < 1), KID uses every sample (5 real < subset size)
    assert s["drift"]["clip"] < 0.9999
    assert s["kid"]["mode"] == "full" and s["kid"]["n_real"] == 5 and s["kid"]["n_generated"] == 6
    # ceiling: the real images against each other; floor: one uniform-noise image per prompt
    assert s["ceiling"]["dino"] == pytest.approx(
        metrics.mean_self_cosine(dino.image_features(refs)), abs=1e-5
    )
    noise = noise_images(3, images[0].size, seed=0)
    floor = metrics.mean_pairwise_cosine(clip.image_features(noise), clip.image_features(refs))
    assert s["floor"]["clip_i"] == pytest.approx(floor, abs=1e-5)


def test_mini_world_real_renders_give_the_ceiling_noise_the_floor():
    """With booth-mini's CLIP (the mini world's evaluator), the real renders of each example subject score
    clearly higher against each other (the ceiling) than against random images (the floor) or, on average,
    against the other subjects' renders."""
    from booth.evaluate.backbones import ClipBackbone, mini_clip_dir

    folder = mini_clip_dir(None)
    if folder is None:
        pytest.skip(
            "booth-mini is not installed (no src/booth/mini/weights/clip): nothing to score the mini world with"
        )
    clip = ClipBackbone(folder)
    subjects = sorted(p.name for p in EXAMPLES.iterdir() if (p / "subject.json").is_file())
    feats = {
        n: clip.image_features([Image.open(p) for p in sorted((EXAMPLES / n).glob("*.png"))])
        for n in subjects
    }
    noise = clip.image_features(noise_images(8, (64, 64)))
    for name in subjects:
        ceiling = metrics.mean_self_cosine(feats[name])
        others = [metrics.mean_pairwise_cosine(feats[o], feats[name]) for o in subjects if o != name]
        assert ceiling > metrics.mean_pairwise_cosine(noise, feats[name]) + 0.1, name
        assert ceiling > sum(others) / len(others) + 0.1, name


def test_report_and_compare(bench_run, tmp_path):
    out, r = bench_run
    html = (out / "report" / "index.html").read_text()
    assert html.count("<img") >= 3 + 3 + 1 + 3  # per-prompt grids, class grids, references, charts
    assert "scatter.png" in html and "subject_fidelity.png" in html
    second = tmp_path / "second"
    shutil.copytree(out, second)
    data = json.loads((second / "results.json").read_text())
    data["scores"]["dino"], data["scores"]["n_pairs"] = 1.0, 90
    (second / "results.json").write_text(json.dumps(data))
    assert (
        main(
            [
                "eval",
                "compare",
                str(out / "results.json"),
                str(second),
                "--out",
                str(tmp_path / "cmp"),
                "--group",
                "method",
            ]
        )
        == 0
    )
    table = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    (row,) = table["rows"]
    assert row["files"] == 2
    assert row["mean"]["dino"] == pytest.approx((r["scores"]["dino"] + 1.0) / 2)
    assert row["global"]["dino"] == pytest.approx((30 * r["scores"]["dino"] + 90 * 1.0) / 120)
    assert "| DINO |" in (tmp_path / "cmp" / "comparison.md").read_text().replace(
        "label | files | DINO", "| DINO"
    )
    assert (tmp_path / "cmp" / "index.html").is_file()


def test_cli_errors_are_one_line(tiny_sd1_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = [
        "eval",
        "dreambench",
        "--model",
        str(tiny_sd1_dir),
        "--class-noun",
        "dog",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*base, "--subject-images", str(empty)]) == 2
    assert "no reference images in" in capsys.readouterr().err
    assert main([*base, "--subject-images", str(EXAMPLES / "poodle"), "--prompts", "animals"]) == 2
    assert "unknown prompt list 'animals'" in capsys.readouterr().err
    assert main([*base, "--subject-images", str(EXAMPLES / "poodle"), "--live", "--prompts", "object"]) == 2
    assert "--live" in capsys.readouterr().err
    # an evaluator that is not downloaded (the hub away): one error line that says how to get it
    assert (
        main([*base, "--subject-images", str(EXAMPLES / "poodle"), "--clip", "booth-test/no-such-clip"]) == 2
    )
    assert capsys.readouterr().err.splitlines() == [
        "booth: error: the CLIP evaluator 'booth-test/no-such-clip' must be downloaded first: it is not in the "
        "local Hugging Face cache and the hub cannot be reached (offline). On a machine with network run "
        "`hf download booth-test/no-such-clip` (or save it with from_pretrained/save_pretrained) and pass the folder"
    ]


def test_bar_charts_keep_negative_scores_in_view(tmp_path):
    """A cosine below the chart's bottom moves the bottom down (the merge report cut off -0.25 at 0)."""
    from booth.evaluate.report import bar_chart, bar_ylim

    assert bar_ylim((0, 1.05), {"a": [0.3, 0.5], "b": [0.9]}) == (0, 1.05)
    assert bar_ylim((0, 1.05), {"a": [0.3, -0.25]}) == pytest.approx((-0.35, 1.05))
    assert bar_ylim((-0.1, 1.05), {"a": [-0.05]}) == (-0.1, 1.05)
    path = bar_chart(tmp_path / "c.png", ["x", "y"], {"a": [0.3, -0.25]}, "t", ylim=(0, 1.05))
    assert path.is_file() and path.stat().st_size > 1000
