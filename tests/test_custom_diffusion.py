"""Custom Diffusion training on the tiny SD1 pipeline: only cross-attention K/V and the modifier token's row train;
the files load through diffusers' own loaders and booth's, and change the outputs; the paper's augmentation;
prior preservation; one-line errors."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from booth.errors import BoothError
from booth.train import DataConfig, OptimConfig, PriorConfig, TrainConfig
from booth.train.config import CustomDiffusionConfig, TokenConfig
from booth.train.formats.custom_diffusion import (
    DIFFUSERS_CD_FILE,
    base_fingerprint,
    diffusers_key,
    load_custom_diffusion,
    read_custom_diffusion,
)
from booth.train.loop import Trainer, latent_mask, read_log
from booth.train.methods.custom_diffusion import LARGE_WORDS, SMALL_WORDS, augment_view, target_string


def config(out, model_dir, subject, **kw) -> TrainConfig:
    kw.setdefault("steps", 3)
    kw.setdefault("optim", OptimConfig(lr=1e-2))
    kw.setdefault("data", DataConfig(images=subject, instance_prompt="a <new1> dog"))
    kw.setdefault("tokens", TokenConfig(placeholder="<new1>"))
    return TrainConfig(method="custom-diffusion", out=out, model=str(model_dir), **kw)


def load(model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)


def unet_output(pipe, prompt="a <new1> dog") -> torch.Tensor:
    ids = pipe.tokenizer(
        [prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c = pipe.text_encoder(ids)[0]
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=c).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd1_dir, subject):
    """One 3-step run, kept with its Trainer (the trained pipeline in memory)."""
    out = tmp_path_factory.mktemp("cd") / "run"
    trainer = Trainer(config(out, tiny_sd1_dir, subject), progress=False)
    result = trainer.run()
    return trainer, result, sorted(trainer.method.trainable_parameters())


def test_only_cross_attention_kv_and_the_modifier_row_train(trained, tiny_sd1_dir):
    trainer, result, names = trained
    assert result.completed and len(result.losses) == 3
    unet_names = [n for n in names if n.startswith("unet.")]
    assert len(unet_names) == 8  # the tiny UNet's 4 cross-attention layers x (k, v)
    assert all(".attn2.processor.to_" in n and "_custom_diffusion.weight" in n for n in unet_names)
    assert {n.split(".processor.")[1] for n in unet_names} == {
        "to_k_custom_diffusion.weight",
        "to_v_custom_diffusion.weight",
    }
    (row,) = [n for n in names if n.startswith("text_encoder.")]
    assert row.endswith("modifier_rows")
    rows = trainer.method._rows()
    assert tuple(rows.shape) == (1, 32)
    # the frozen weights did not move: UNet Linear layers and every old embedding row
    base = load(tiny_sd1_dir)
    pipe = trainer.pipe
    base_unet = dict(base.unet.named_parameters())
    for name, p in pipe.unet.named_parameters():
        if ".processor." not in name:
            torch.testing.assert_close(p.detach(), base_unet[name], rtol=0, atol=0)
    new_table = pipe.text_encoder.get_input_embeddings().weight.detach()
    old_table = base.text_encoder.get_input_embeddings().weight.detach()
    torch.testing.assert_close(new_table[: len(old_table)], old_table, rtol=0, atol=0)
    token_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    assert token_id == len(old_table)
    torch.testing.assert_close(new_table[token_id], rows[0].detach())
    start = old_table[pipe.tokenizer("ktn", add_special_tokens=False).input_ids].mean(0)
    assert (rows[0].detach() - start).abs().max() > 1e-4  # the row trained from the initializer's mean
    # every trained K/V copy moved away from the pretrained weights it started from
    deltas = read_custom_diffusion(result.files["custom_diffusion"]).layers
    assert len(deltas) == 8 and all(float(d.abs().max()) > 1e-5 for d in deltas.values())


def test_files_load_in_diffusers_and_booth_and_change_the_unet(trained, tiny_sd1_dir):
    from safetensors import safe_open

    _, result, _ = trained
    out = result.out
    with safe_open(str(out / DIFFUSERS_CD_FILE), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "pt"
    trained_keys = {k for k in keys if "custom_diffusion" in k}
    assert (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight" in keys
    )
    assert len(trained_keys) == 8 and all(
        k.endswith(("to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight")) for k in trained_keys
    )
    assert all(
        k.endswith(".attn1.processor") for k in keys - trained_keys
    )  # diffusers' empty processor entries
    with safe_open(str(out / "<new1>.safetensors"), "pt") as f:
        assert list(f.keys()) == ["<new1>"] and tuple(f.get_tensor("<new1>").shape) == (32,)

    diffusers_pipe = load(tiny_sd1_dir)
    before = unet_output(diffusers_pipe, "a dog")
    # diffusers 0.42 installs the processors only with `_pipeline` (huggingface/diffusers#9320)
    diffusers_pipe.unet.load_attn_procs(out, weight_name=DIFFUSERS_CD_FILE, _pipeline=diffusers_pipe)
    diffusers_pipe.load_textual_inversion(out, weight_name="<new1>.safetensors")
    assert (unet_output(diffusers_pipe, "a dog") - before).abs().max() > 1e-4
    booth_pipe = load(tiny_sd1_dir)
    info = load_custom_diffusion(booth_pipe, out)
    assert info.targets == ["<new1> dog"] and list(info.tokens) == ["<new1>"]
    for prompt in ("a <new1> dog", "a dog"):
        torch.testing.assert_close(
            unet_output(booth_pipe, prompt), unet_output(diffusers_pipe, prompt), atol=1e-5, rtol=1e-4
        )
    # the trained pipeline itself gives the same prediction
    trainer = trained[0]
    torch.testing.assert_close(unet_output(trainer.pipe), unet_output(booth_pipe), atol=1e-5, rtol=1e-4)
    with pytest.raises(BoothError, match="already in the tokenizer"):
        load_custom_diffusion(booth_pipe, out)  # the token is there now


def test_engine_generates_with_the_modifier_token(trained, tiny_sd1_dir):
    from booth.generate.engine import Engine
    from booth.generate.params import GenerationParams
    from booth.models.loading import load_pipeline

    _, result, _ = trained
    params = GenerationParams(prompt="a <new1> dog", seed=1, steps=2, width=32, height=32)
    plain = Engine(load_pipeline(str(tiny_sd1_dir))).generate(params).images[0]
    loaded = load_pipeline(str(tiny_sd1_dir))
    load_custom_diffusion(loaded.pipe, result.files["custom_diffusion"])
    assert "<new1>" in loaded.pipe.tokenizer.get_vocab()
    image = Engine(loaded).generate(params).images[0]
    diff = torch.tensor(list(image.tobytes())).float() - torch.tensor(list(plain.tobytes())).float()
    assert diff.abs().max() > 0


def test_cli_generate_with_custom_diffusion(trained, tiny_sd1_dir, tmp_path, capsys):
    from booth.cli import main

    _, result, _ = trained
    args = ["generate", "a <new1> dog", "--model", str(tiny_sd1_dir), "--steps", "2", "-W", "32", "-H", "32"]
    args += ["--seed", "1", "--no-progress", "--out", str(tmp_path / "images")]
    assert main([*args, "--custom-diffusion", str(result.out)]) == 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 1
    assert main([*args, "--custom-diffusion", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_file_refuses_another_base_model(trained):
    from booth.models.tiny import tiny_pipeline

    _, result, _ = trained
    other = tiny_pipeline("sd1", seed=3)
    assert read_custom_diffusion(result.out).fingerprint != base_fingerprint(other.unet)
    with pytest.raises(BoothError, match="another base model"):
        load_custom_diffusion(other, result.out)


def test_augmentation_masks_and_size_words():
    image = Image.new("RGB", (64, 64), (250, 0, 0))
    factor, size = 8, 64
    seen = {"small": 0, "large": 0, "plain": 0}
    for seed in range(200):
        pixels, mask, prompt = augment_view(image, "a <new1> dog", factor, random.Random(seed))
        assert pixels.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        latent = latent_mask(mask[None], (size // factor, size // factor))[0, 0]
        red = (pixels[0] > 0.9) & (pixels[1] < -0.9)  # the pasted image; the canvas is 0 (mid-grey)
        if prompt.startswith(LARGE_WORDS):
            seen["large"] += 1
            assert mask.min() == 1 and bool(red.all())  # zoomed in: a crop, everything counts
            continue
        rows, cols = torch.nonzero(red, as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        scale = int(rows.max()) - top + 1
        assert not (pixels[:, ~red] != 0).any()
        # diffusers: mask[top // f + 1 : (top + scale) // f - 1, left // f + 1 : (left + scale) // f - 1] = 1
        want = torch.zeros(size // factor, size // factor)
        want[
            top // factor + 1 : (top + scale) // factor - 1, left // factor + 1 : (left + scale) // factor - 1
        ] = 1
        if not want.any():  # diffusers' mask would be empty (a 0/0 loss): booth keeps the pasted region
            inside = torch.zeros(size, size)
            inside[top : top + scale, left : left + scale] = 1
            want = latent_mask(inside[None, None], (size // factor, size // factor))[0, 0]
            assert want.any()
        torch.testing.assert_close(latent, want)
        if prompt.startswith(SMALL_WORDS):
            seen["small"] += 1
            assert scale < 0.6 * size and prompt.endswith(" a <new1> dog")  # prepended, as diffusers does
        else:
            seen["plain"] += 1
            assert prompt == "a <new1> dog" and 0.6 * size <= scale <= size
    assert all(v > 10 for v in seen.values()), seen
    assert target_string("a photo of a <new1> dog", "<new1>") == "<new1> dog"


def test_augment_hook_off_and_on(trained):
    from booth.train.samples import Sample

    trainer, _, _ = trained
    method = trainer.method
    sample = Sample(Image.new("RGB", (40, 48), (1, 2, 3)), "a <new1> dog", (32, 32))
    pixels, mask, prompt = method.augment(sample, random.Random(0))
    assert pixels.shape == (3, 32, 32) and mask.shape == (1, 32, 32) and "<new1>" in prompt
    method.config.custom_diffusion.augment = False
    try:
        assert method.augment(sample, random.Random(0)) is None
    finally:
        method.config.custom_diffusion.augment = True


def test_prior_preservation_real_images_and_base_model(tmp_path, tiny_sd1_dir, subject):
    from booth.train import train

    real = tmp_path / "real"
    real.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (10, 200, 10 * i)).save(real / f"{i}.png")
    (real / "0.txt").write_text("a green dog in a park")  # real captions, as Custom Diffusion's retrieval
    prior = PriorConfig(enabled=True, class_prompt="a dog", class_images=real)
    cfg = config(tmp_path / "a", tiny_sd1_dir, subject, prior=prior, steps=2)
    result = train(cfg, progress=False)
    assert all(r["loss_prior"] > 0 for r in read_log(result.out / "log.jsonl"))
    teacher = PriorConfig(enabled=True, class_prompt="a dog", mode="base-model")
    cd = CustomDiffusionConfig(augment=False, modifier_token=False)
    cfg = config(tmp_path / "b", tiny_sd1_dir, subject, prior=teacher, custom_diffusion=cd, steps=3)
    cfg.data.instance_prompt = "a sks dog"
    result = train(cfg, progress=False)
    log = read_log(result.out / "log.jsonl")
    assert log[0]["loss_prior"] < 1e-9  # the copies start as the pretrained weights: student == teacher
    assert log[-1]["loss_prior"] > log[0]["loss_prior"]
    weights = read_custom_diffusion(result.out)
    assert weights.tokens == {} and weights.targets == ["sks dog"]
    assert (result.out / DIFFUSERS_CD_FILE).exists() and not list(result.out.glob("<*>.safetensors"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--instance-prompt", "a sks dog"], "--instance-prompt must contain <new1>, e.g. 'a <new1> dog'"),
        (
            ["--instance-prompt", "a photo dog", "--placeholder-token", "photo"],
            "photo is already in the tokenizer",
        ),
        (["--instance-prompt", "a <new1> dog", "--train-text-encoder"], "--train-text-encoder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_sd1_dir, subject, capsys, flags, message):
    from booth.cli import main

    out = tmp_path / "out"
    code = main(
        ["train", "--method", "custom-diffusion", "--images", str(subject), "--model", str(tiny_sd1_dir)]
        + ["--out", str(out), "--steps", "1", "--no-progress", *flags]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (out / "config.json").exists()


def test_key_names():
    assert (
        diffusers_key("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight")
        == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_v_custom_diffusion.weight"
    )
    assert diffusers_key("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight").endswith(
        "attn2.processor.to_out_custom_diffusion.0.weight"
    )


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_sd1_dir, subject):
    """Stop after step 2 of 4 and resume: same losses, same weights and token (checkpoints hold both)."""
    from booth.train import TrainingInterrupted, train
    from booth.train.loop import TrainState

    full = train(config(tmp_path / "one", tiny_sd1_dir, subject, steps=4), progress=False)

    def stop(state):
        if state.step == 2:
            state.stop_requested = True

    two = config(tmp_path / "two", tiny_sd1_dir, subject, steps=4)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(two, progress=False, state=TrainState(), callback=stop)
    resumed = train(two, resume=True, progress=False)
    assert resumed.losses == full.losses[2:]
    a, b = read_custom_diffusion(full.out), read_custom_diffusion(resumed.out)
    for name in a.layers:
        torch.testing.assert_close(a.layers[name], b.layers[name], rtol=0, atol=0)
    torch.testing.assert_close(a.tokens["<new1>"], b.tokens["<new1>"], rtol=0, atol=0)


def test_train_q_out_keys_load_in_diffusers_and_cannot_be_merged(tmp_path, tiny_sd1_dir, subject):
    from safetensors import safe_open

    from booth.train import train
    from booth.train.merge import merge_custom_diffusion

    cd = CustomDiffusionConfig(train_q_out=True, augment=False)
    result = train(
        config(tmp_path / "q", tiny_sd1_dir, subject, custom_diffusion=cd, steps=2), progress=False
    )
    with safe_open(str(result.out / DIFFUSERS_CD_FILE), "pt") as f:
        keys = {k.split(".processor.")[1] for k in f.keys() if "custom_diffusion" in k}  # noqa: SIM118
    assert keys == {
        "to_k_custom_diffusion.weight",
        "to_v_custom_diffusion.weight",
        "to_q_custom_diffusion.weight",
        "to_out_custom_diffusion.0.weight",
        "to_out_custom_diffusion.0.bias",
    }
    ours, theirs = load(tiny_sd1_dir), load(tiny_sd1_dir)
    load_custom_diffusion(ours, result.out)
    theirs.unet.load_attn_procs(result.out, weight_name=DIFFUSERS_CD_FILE, _pipeline=theirs)
    theirs.load_textual_inversion(result.out, weight_name="<new1>.safetensors")
    torch.testing.assert_close(unet_output(ours), unet_output(theirs), atol=1e-5, rtol=1e-4)
    assert (unet_output(ours) - unet_output(load(tiny_sd1_dir))).abs().max() > 1e-4
    with pytest.raises(BoothError, match="--train-q-out"):
        merge_custom_diffusion([result.out, result.out], ["a dog"], load(tiny_sd1_dir), tmp_path / "m")
