"""booth eval merge: two subjects trained separately (Custom Diffusion or LoRA), merged, rendered together."""

import json

import pytest
from PIL import Image

from booth.errors import BoothError
from booth.evaluate.mini_merge import (
    BOTTOM_RIGHT,
    LEFT,
    TOP_LEFT,
    ComposedPrompt,
    ModelScores,
    both_shown,
    composed_prompts,
    crop,
    two_drawn,
)


def test_crop_takes_a_region_at_full_size():
    image = Image.new("RGB", (64, 64), "white")
    image.paste((255, 0, 0), (0, 0, 32, 64))
    image.paste((0, 0, 255), (32, 32, 64, 64))
    left, top_left, bottom_right = (crop(image, r) for r in (LEFT, TOP_LEFT, BOTTOM_RIGHT))
    assert left.size == top_left.size == bottom_right.size == (64, 64)
    assert left.getpixel((63, 10)) == (255, 0, 0)
    assert set(top_left.getdata()) == {(255, 0, 0)}
    assert set(bottom_right.getdata()) == {(0, 0, 255)}


def test_two_drawn_reads_one_object_in_each_asked_region():
    sides = ComposedPrompt(
        "a dog on the left and a teapot on the right", "one prompt", {"A": LEFT, "B": (0.5, 0, 1, 1)}
    )
    corners = ComposedPrompt("a dog AND a teapot", "AND", {"A": TOP_LEFT, "B": BOTTOM_RIGHT})
    empty = Image.new("RGB", (64, 64), "white")
    one = empty.copy()
    one.paste((200, 60, 20), (6, 6, 24, 24))  # top left only
    two = one.copy()
    two.paste((20, 60, 200), (40, 40, 58, 58))  # and bottom right
    assert two_drawn(two, corners) and two_drawn(two, sides)
    assert not two_drawn(one, corners) and not two_drawn(one, sides) and not two_drawn(empty, corners)


def test_both_shown_needs_two_objects_drawn_and_both_regions_above_base():
    base = ModelScores(
        "base", {}, {}, {k: {"A": 0.1, "B": 0.2} for k in ("one prompt", "AND", "Latent Couple")}, {}
    )
    above = {"A": 0.5, "B": 0.5}
    scores = [
        ("AND", above, True),
        ("AND", above, False),
        ("AND", {"A": 0.5, "B": 0.1}, True),
        ("AND", above, True),
    ]
    scores += [("one prompt", above, True), ("Latent Couple", above, False)]
    assert both_shown(scores, base) == {"AND": 0.5, "one prompt": 1.0, "Latent Couple": 0.0}


def test_composed_prompts_put_each_subject_in_each_region_in_both_kinds():
    prompts = composed_prompts(["<new1> dog", "<new2> teapot"])
    texts = {p.text: p for p in prompts}
    side = texts["a <new1> dog on the left and a <new2> teapot on the right"]
    assert side.kind == "one prompt" and side.region == {"A": LEFT, "B": (0.5, 0.0, 1.0, 1.0)}
    swapped = texts["a <new2> teapot on the left and a <new1> dog on the right"]
    assert swapped.region["B"] == LEFT
    corners = [p for p in prompts if p.kind == "AND"]
    assert len(corners) == 4 and all(p.text.count(" AND ") == 1 for p in corners)
    first = next(p for p in corners if p.text.startswith("a small <new1> dog in the top left"))
    assert first.text.endswith("a small <new2> teapot in the bottom right on a white background")
    assert first.region == {"A": TOP_LEFT, "B": BOTTOM_RIGHT}
    regional = [p for p in prompts if p.kind == "Latent Couple"]
    assert len(regional) == 2 and all(p.latent_couple and p.text.count(" AND ") == 1 for p in regional)
    assert all(p.latent_couple is None for p in prompts if p.kind != "Latent Couple")
    assert len(prompts) == 10


@pytest.mark.parametrize("method, prior", [("custom-diffusion", False), ("lora", True)])
def test_eval_merge_trains_merges_and_scores_four_models(tmp_path, mini_model_dir, capsys, method, prior):
    from booth.cli import main

    out = tmp_path / "merge"
    args = [
        "eval",
        "merge",
        "--subjects",
        "poodle,teapot",
        "--steps",
        "2",
        "--seeds",
        "1",
        "--method",
        method,
    ]
    args += ["--sample-steps", "2", "--model", str(mini_model_dir), "--out", str(out), "--no-progress"]
    if prior:
        args += ["--prior", "--num-class-images", "2"]
    assert main(args) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method and results["prior"] is prior
    if prior:  # each subject's run generated its class images and trained with them
        for subject in ("poodle", "teapot"):
            config = json.loads((out / "runs" / subject / "run" / "config.json").read_text())
            assert config["prior"]["enabled"] and config["prior"]["num_class_images"] == 2
    assert [m["model"] for m in results["models"]] == ["base model", "poodle alone", "teapot alone", "merged"]
    if method == "lora":  # one identifier each, both LoRAs' deltas in one file (rank 8 + 8)
        assert results["words"] == {"A": "sks dog", "B": "zwx teapot"}
        assert results["merge"] == {"mode": "concat", "rank": 16}
        assert (out / "merged" / "merged.safetensors").is_file()
        assert "merged by concatenation" in (out / "report" / "index.html").read_text()
    else:
        assert results["words"] == {"A": "<new1> dog", "B": "<new2> teapot"}  # class nouns
        assert results["merge"]["constraint_error"] < 1e-4
        assert (out / "merged" / "merged.booth-cd.safetensors").is_file()
    for model in results["models"]:
        assert set(model["composed_fidelity"]) == {"one prompt", "AND", "Latent Couple"}
        assert all(set(v) == {"A", "B"} for v in model["composed_fidelity"].values())
        assert all(-1 <= v <= 1 for v in model["subject_fidelity"].values())
        assert set(model["both_shown"]) == set(model["two_drawn"]) == {"one prompt", "AND", "Latent Couple"}
        assert all(model["both_shown"][k] <= model["two_drawn"][k] for k in model["two_drawn"])
        assert all(0 <= v <= 1 for v in model["both_shown"].values())
    assert sum(" AND " in c["text"] for c in results["composed_prompts"]) == 6
    table = (out / "table.md").read_text()
    assert table.count("\n") == 6 and "| merged |" in table and "AND: two drawn" in table
    html = (out / "report" / "index.html").read_text()
    assert ("with prior preservation" in html) is prior
    assert 'src="fidelity.png"' in html and 'src="model-3-composed.png"' in html


@pytest.mark.parametrize("subjects", [["poodle"], ["poodle", "poodle"]])
def test_eval_merge_refuses_other_than_two_subjects(tmp_path, subjects):
    from booth.evaluate.mini_bench import BenchSettings
    from booth.evaluate.mini_merge import merge_benchmark

    with pytest.raises(BoothError, match="two"):
        merge_benchmark(subjects, tmp_path / "m", BenchSettings(progress=False))
    assert not (tmp_path / "m").exists()


def test_eval_merge_refuses_a_method_it_cannot_merge(tmp_path):
    from booth.evaluate.mini_bench import BenchSettings
    from booth.evaluate.mini_merge import merge_benchmark

    with pytest.raises(BoothError, match="custom-diffusion or lora"):
        merge_benchmark(["poodle", "teapot"], tmp_path / "m", BenchSettings(progress=False), "dreambooth")
    assert not (tmp_path / "m").exists()
