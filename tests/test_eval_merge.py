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
    RegionScore,
    both_shown,
    ceiling,
    composed_prompts,
    crop,
    pasted_pair,
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


def test_two_objects_touching_across_the_middle_fill_both_halves_but_are_not_two_drawn():
    from booth.mini.checks import check_pair, pair_checks, regions_filled

    touching = Image.new("RGB", (64, 64), "white")
    touching.paste((30, 30, 160), (10, 20, 32, 44))
    touching.paste((230, 40, 90), (32, 22, 54, 42))
    assert regions_filled(touching, ("left", "right")) and not check_pair(touching, ("left", "right"))
    left_only = Image.new("RGB", (64, 64), "white")
    left_only.paste((30, 30, 160), (10, 20, 28, 44))
    assert not regions_filled(left_only, ("left", "right"))
    assert pair_checks(touching, ("left", "right")) == (True, False)  # both from one mask, as apart
    assert pair_checks(left_only, ("left", "right")) == (False, False)


def test_told_apart_needs_both_regions_drawn_and_each_closer_to_its_own_subject():
    own, other = {"A": 0.5, "B": 0.4}, {"A": 0.2, "B": 0.1}
    assert RegionScore("AND", own, other, True, True).told_apart
    assert RegionScore("AND", own, other, False, True).told_apart  # two subjects touching across the middle
    assert not RegionScore("AND", own, other, False, False).told_apart  # nothing drawn in one region
    # the model drew subject A in both regions: B's region looks more like A than like B
    assert not RegionScore("AND", own, {"A": 0.2, "B": 0.6}, True, True).told_apart


def test_both_shown_needs_both_subjects_told_apart_and_above_base():
    base = ModelScores(
        "base", {}, {}, {k: {"A": 0.1, "B": 0.2} for k in ("one prompt", "AND", "Latent Couple")}, {}
    )
    above, below = {"A": 0.5, "B": 0.5}, {"A": 0.0, "B": 0.0}
    scores = [
        RegionScore("AND", above, below, True),
        RegionScore("AND", above, below, False, False),  # nothing drawn in one region
        RegionScore("AND", {"A": 0.5, "B": 0.1}, below, True),  # B's region under the base model's mean
        RegionScore("AND", above, below, True),
        RegionScore("AND", above, {"A": 0.0, "B": 0.7}, True),  # B's region more like A: A drawn twice
    ]
    scores += [
        RegionScore("one prompt", above, below, True),
        RegionScore("Latent Couple", above, below, False, False),
    ]
    assert both_shown(scores, base) == {"AND": 0.4, "one prompt": 1.0, "Latent Couple": 0.0}


def _subject(colour, background):
    image = Image.new("RGB", (64, 64), background)
    image.paste(colour, (16, 16, 48, 48))
    return [image]


class _ColourEvaluator:
    """Stands in for the mini-CLIP: how close the mean colour of an image's non-white pixels is to the
    references' object colour (the centre pixel)."""

    def subject_fidelity(self, images, references):
        pixels = [p for p in images[0].getdata() if p != (255, 255, 255)] or [(255, 255, 255)]
        mean = [sum(c) / len(pixels) for c in zip(*pixels)]
        target = references[0].getpixel((32, 32))
        return -sum(abs(m - t) for m, t in zip(mean, target)) / 765


def test_pasted_pair_cuts_each_subject_from_its_background_into_its_region():
    red, blue = _subject((220, 20, 20), (255, 140, 0)), _subject((20, 20, 220), (0, 0, 0))
    corners = ComposedPrompt("a dog AND a teapot", "AND", {"A": TOP_LEFT, "B": BOTTOM_RIGHT})
    image = pasted_pair([red, blue], corners, 0, 64)
    colours = set(image.getdata())
    assert (255, 140, 0) not in colours and (0, 0, 0) not in colours  # backgrounds cut away
    assert image.getpixel((16, 16)) == (220, 20, 20) and image.getpixel((48, 48)) == (20, 20, 220)
    assert image.getpixel((48, 16)) == image.getpixel((16, 48)) == (255, 255, 255)
    assert two_drawn(image, corners)


def test_ceiling_tells_two_subjects_apart_only_if_the_evaluator_can():
    red, blue = _subject((220, 20, 20), (255, 140, 0)), _subject((20, 20, 220), (0, 0, 0))
    apart = ceiling([red, blue], _ColourEvaluator(), seeds=2, size=64)
    assert apart == {k: {"two_drawn": 1.0, "told_apart": 1.0} for k in ("one prompt", "AND", "Latent Couple")}
    twins = ceiling([red, _subject((220, 20, 20), (0, 0, 0))], _ColourEvaluator(), seeds=2, size=64)
    assert all(v == {"two_drawn": 1.0, "told_apart": 0.0} for v in twins.values())


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
    labels = ["base model", "poodle alone", "teapot alone", "merged"]
    labels += ["both, composable"] if method == "lora" else []  # the two LoRAs unmerged, one per sub-prompt
    assert [m["model"] for m in results["models"]] == labels
    if method == "lora":  # alone, composable is each subject's own LoRA: the same images as that LoRA alone
        fidelity = [m["subject_fidelity"] for m in results["models"]]
        assert fidelity[4]["A"] == pytest.approx(fidelity[1]["A"], abs=1e-4)
        assert fidelity[4]["B"] == pytest.approx(fidelity[2]["B"], abs=1e-4)
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
        kinds = {"one prompt", "AND", "Latent Couple"}
        assert set(model["both_shown"]) == set(model["told_apart"]) == set(model["two_drawn"]) == kinds
        assert all(model["both_shown"][k] <= model["told_apart"][k] for k in kinds)
        assert all(0 <= v <= 1 for v in model["both_shown"].values())
    assert sum(" AND " in c["text"] for c in results["composed_prompts"]) == 6
    table = (out / "table.md").read_text()
    assert "| merged |" in table and "AND: two drawn" in table and "AND: told apart" in table
    assert table.count("\n| ") == len(labels) and "(the ceiling), two drawn / told apart: one prompt" in table
    assert set(results["ceiling"]) == {"one prompt", "AND", "Latent Couple"}
    assert "(the ceiling)" in (out / "report" / "index.html").read_text()
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
