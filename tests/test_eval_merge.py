"""booth eval merge: two subjects trained separately with Custom Diffusion, merged, rendered together."""

import json

import pytest
from PIL import Image

from booth.errors import BoothError
from booth.evaluate.mini_merge import composed_prompts, halves


def test_halves_split_left_and_right_at_full_size():
    image = Image.new("RGB", (64, 64), "white")
    image.paste((255, 0, 0), (0, 0, 32, 64))
    left, right = halves(image)
    assert left.size == right.size == (64, 64)
    assert left.getpixel((63, 10)) == (255, 0, 0) and right.getpixel((0, 10)) == (255, 255, 255)


def test_composed_prompts_put_each_subject_on_each_side():
    prompts = composed_prompts(["<new1> dog", "<new2> teapot"])
    assert ("a <new1> dog on the left and a <new2> teapot on the right", 0) in prompts
    assert ("a <new2> teapot on the left and a <new1> dog on the right", 1) in prompts
    assert len(prompts) == 4


def test_eval_merge_trains_merges_and_scores_four_models(tmp_path, mini_model_dir, capsys):
    from booth.cli import main

    out = tmp_path / "merge"
    args = ["eval", "merge", "--subjects", "poodle,teapot", "--steps", "2", "--seeds", "1"]
    args += ["--sample-steps", "2", "--model", str(mini_model_dir), "--out", str(out), "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert [m["model"] for m in results["models"]] == ["base model", "poodle alone", "teapot alone", "merged"]
    assert results["words"] == {"A": "<new1> dog", "B": "<new2> teapot"}  # class nouns
    assert results["merge"]["constraint_error"] < 1e-4
    for model in results["models"]:
        assert set(model["composed_fidelity"]) == {"A", "B"}
        assert all(-1 <= v <= 1 for v in model["subject_fidelity"].values())
        assert 0 <= model["both_shown"] <= 1
    assert (out / "merged" / "merged.booth-cd.safetensors").is_file()
    table = (out / "table.md").read_text()
    assert table.count("\n") == 6 and "| merged |" in table
    html = (out / "report" / "index.html").read_text()
    assert 'src="fidelity.png"' in html and 'src="model-3-composed.png"' in html


@pytest.mark.parametrize("subjects", [["poodle"], ["poodle", "poodle"]])
def test_eval_merge_refuses_other_than_two_subjects(tmp_path, subjects):
    from booth.evaluate.mini_bench import BenchSettings
    from booth.evaluate.mini_merge import merge_benchmark

    with pytest.raises(BoothError, match="two"):
        merge_benchmark(subjects, tmp_path / "m", BenchSettings(progress=False))
    assert not (tmp_path / "m").exists()
