"""`booth demo` end to end on a tiny booth-mini (2 training steps, 2 sampling steps): files, scores, report."""

from __future__ import annotations

import json

import pytest
import torch

from booth.demo import DemoConfig, run_demo
from booth.evaluate.mini_bench import find_subject, prepare_instance_folder

torch.set_num_threads(1)


def test_instance_captions_name_the_identifier(tmp_path):
    prompt, noun = prepare_instance_folder(find_subject("poodle"), tmp_path)
    assert (prompt, noun) == ("a sks dog", "dog")
    captions = sorted(p.read_text().strip() for p in tmp_path.glob("*.txt"))
    assert len(captions) == 5 and all(" sks dog " in c for c in captions)
    assert "a large sks dog in the centre on a white background" in captions


def test_demo_writes_a_report_with_scores(tmp_path, mini_model_dir):
    cfg = DemoConfig(
        out=tmp_path / "demo",
        model=str(mini_model_dir),
        steps=2,
        num_class_images=2,
        seeds=1,
        sample_steps=2,
        progress=False,
    )
    index = run_demo(cfg)
    html = index.read_text()
    for name in ("subject.png", "contexts.png", "scores.png", "drift.png", "loss.png"):
        assert f'src="{name}"' in html and (index.parent / name).stat().st_size > 100
    summary = json.loads((tmp_path / "demo" / "scores.json").read_text())
    scores = summary["scores"]
    assert -1 <= scores["ceiling_subject_fidelity"] < 1.0
    assert {"background", "position", "style", "all"} <= set(scores["prompt_fidelity"])
    assert -1 <= scores["drift_similarity"] <= 1
    assert (tmp_path / "demo" / "run" / "pytorch_lora_weights.safetensors").exists()
    with pytest.raises(Exception, match="--overwrite"):
        run_demo(cfg)


def test_eval_mini_compares_methods_with_and_without_prior(tmp_path, mini_model_dir, capsys):
    from booth.cli import main

    out = tmp_path / "bench"
    code = main(
        [
            "eval",
            "mini",
            "--methods",
            "lora,dreambooth,textual-inversion,custom-diffusion",
            "--subjects",
            "poodle",
            "--prior",
            "both",
            "--steps",
            "2",
            "--seeds",
            "1",
            "--sample-steps",
            "2",
            "--num-class-images",
            "1",
            "--model",
            str(mini_model_dir),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["prior"]) for r in results["table"]] == [
        ("lora", False),
        ("lora", True),
        ("dreambooth", False),
        ("dreambooth", True),
        ("textual-inversion", False),  # textual inversion has no prior preservation: skipped, not failed
        ("custom-diffusion", False),
        ("custom-diffusion", True),
    ]
    assert all(r["file_mb"]["mean"] > 0 for r in results["table"])
    table = (out / "table.md").read_text()
    assert table.count("\n") == 9 and "| lora | yes |" in table and "| custom-diffusion | yes |" in table
    html = (out / "report" / "index.html").read_text()
    assert 'src="fidelity.png"' in html and 'src="scatter.png"' in html
