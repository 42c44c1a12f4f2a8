"""kohya's caption augmentation: tag shuffle with kept leading tags, tag dropout, caption dropout; drawn from
the step's data stream, so a resumed run trains on the same captions."""

from __future__ import annotations

import random
import shutil

import pytest

from booth.train import DataConfig, LoraConfig, OptimConfig, TrainConfig, train
from booth.train.data import augment_caption
from booth.train.loop import TrainingInterrupted, TrainState, read_log

CAPTION = "sks dog, sitting, grass, sunny, red collar, park"


def test_keep_tokens_stay_and_the_rest_is_shuffled():
    rng = random.Random(0)
    seen = {augment_caption(CAPTION, rng, shuffle=True, keep_tokens=2) for _ in range(50)}
    assert len(seen) > 10
    for caption in seen:
        tags = caption.split(", ")
        assert tags[:2] == ["sks dog", "sitting"] and sorted(tags[2:]) == sorted(CAPTION.split(", ")[2:])


def test_tag_and_caption_dropout_rates():
    rng = random.Random(1)
    draws = [augment_caption(CAPTION, rng, False, keep_tokens=1, tag_dropout=0.5) for _ in range(2000)]
    kept = sum(len(d.split(", ")) - 1 for d in draws) / (2000 * 5)
    assert abs(kept - 0.5) < 0.03 and all(d.startswith("sks dog") for d in draws)
    order = CAPTION.split(", ")
    for d in draws[:50]:  # without shuffle the kept tags keep their order
        positions = [order.index(t) for t in d.split(", ")]
        assert positions == sorted(positions)
    empty = sum(augment_caption(CAPTION, rng, False, caption_dropout=0.2) == "" for _ in range(2000)) / 2000
    assert abs(empty - 0.2) < 0.03
    assert augment_caption(CAPTION, random.Random(5), False) == CAPTION  # nothing asked: untouched
    same = [augment_caption(CAPTION, random.Random(7), True, tag_dropout=0.3) for _ in range(2)]
    assert same[0] == same[1]  # the same stream, the same caption


def test_augmented_captions_resume_exactly_and_are_recorded(tmp_path, tiny_sd1_dir, subject):
    images = tmp_path / "captioned"
    shutil.copytree(subject, images)
    for path in images.glob("*.png"):
        path.with_suffix(".txt").write_text(CAPTION)
    data = DataConfig(
        images, "a sks dog", shuffle_caption=True, keep_tokens=1, tag_dropout=0.2, caption_dropout=0.1
    )

    def config(out):
        return TrainConfig(method="lora", model=str(tiny_sd1_dir), out=tmp_path / out, steps=4, data=data,
                           lora=LoraConfig(), checkpoint_every=10)  # fmt: skip

    full = train(config("a"), progress=False)
    state = TrainState()

    def stop(s):
        if s.step == 2:
            s.stop_requested = True

    with pytest.raises(TrainingInterrupted):
        train(config("b"), progress=False, state=state, callback=stop)
    resumed = train(config("b"), resume=True, progress=False)
    assert resumed.losses == full.losses[2:]
    assert [r["loss"] for r in read_log(tmp_path / "a" / "log.jsonl")] == [
        r["loss"] for r in read_log(tmp_path / "b" / "log.jsonl")
    ]
    from safetensors import safe_open

    with safe_open(str(full.files["kohya"]), framework="pt") as f:
        meta = f.metadata()
    assert (meta["ss_shuffle_caption"], meta["ss_keep_tokens"], meta["ss_caption_tag_dropout_rate"]) == (
        "True",
        "1",
        "0.2",
    )


def test_bad_caption_settings_are_refused():
    from booth.errors import BoothError

    with pytest.raises(BoothError, match="--tag-dropout must be in"):
        TrainConfig(method="lora", out="x", data=DataConfig("x", "a sks dog", tag_dropout=1.5)).validate()


def test_the_text_encoder_sees_the_augmented_captions(tmp_path, tiny_sd1_dir, subject):
    from booth.train.loop import Trainer

    images = tmp_path / "captioned"
    shutil.copytree(subject, images)
    for path in images.glob("*.png"):
        path.with_suffix(".txt").write_text(CAPTION)
    data = DataConfig(images, "a sks dog", shuffle_caption=True, keep_tokens=1)
    config = TrainConfig(method="lora", model=str(tiny_sd1_dir), out=tmp_path / "r", steps=4, data=data)
    trainer = Trainer(config, progress=False)
    seen: list[str] = []
    encode = trainer._text

    def record(texts):
        seen.extend(texts)
        return encode(texts)

    trainer._text = record
    trainer.run()
    assert len(set(seen)) > 1 and all(t.startswith("sks dog, ") for t in seen)
    assert sorted(seen[0].split(", ")) == sorted(CAPTION.split(", "))
    assert not (set(seen) - {CAPTION}) & set(trainer.text_cache)  # shuffled captions are not kept


def test_training_encodes_captions_at_the_runs_clip_skip_as_generation_does(tmp_path, tiny_sd1_dir, subject):
    """The conditioning a run trains on equals the generator's for the same prompt and Clip skip."""
    import torch
    from safetensors import safe_open

    from booth.prompts.encode import PromptEncoder
    from booth.train.loop import Trainer

    config = TrainConfig(method="lora", model=str(tiny_sd1_dir), out=tmp_path / "r", steps=1, clip_skip=2,
                         data=DataConfig(subject, "a sks dog"), name="skip2")  # fmt: skip
    trainer = Trainer(config, progress=False)
    result = trainer.run()
    with torch.no_grad():
        trained, _ = trainer._encode_text(["a sks dog"], trainer._text_encoders())
        skip2 = PromptEncoder.from_pipeline(trainer.pipe, clip_skip=2).encode(["a sks dog"]).embeds
        skip1 = PromptEncoder.from_pipeline(trainer.pipe, clip_skip=1).encode(["a sks dog"]).embeds
    torch.testing.assert_close(trained, skip2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(trained, skip1, atol=1e-3)
    with safe_open(str(result.files["kohya"]), framework="pt") as f:
        assert f.metadata()["ss_clip_skip"] == "2"


def test_save_every_writes_loadable_outputs_named_by_step(tmp_path, tiny_sd1_dir, subject):
    from booth.generate.networks import LoraNetwork

    config = TrainConfig(method="lora", model=str(tiny_sd1_dir), out=tmp_path / "dog", steps=4, save_every=2,
                         data=DataConfig(subject, "a sks dog"), optim=OptimConfig(lr=1e-2))  # fmt: skip
    result = train(config, progress=False)
    step2 = tmp_path / "dog" / "steps" / "step-000002"
    assert (step2 / "dog-step000002.safetensors").is_file() and (
        step2 / "pytorch_lora_weights.safetensors"
    ).is_file()
    assert not (tmp_path / "dog" / "steps" / "step-000004").exists()  # the end is the run's own output
    names = LoraNetwork([tmp_path / "dog"]).available()
    assert {"dog", "dog-step000002"} <= set(names)
    from safetensors.torch import load_file

    early, final = load_file(str(step2 / "dog-step000002.safetensors")), load_file(str(result.files["kohya"]))
    assert early.keys() == final.keys() and any(not (early[k] == final[k]).all() for k in early)
    from safetensors import safe_open

    with safe_open(str(step2 / "dog-step000002.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_steps"] == "2" and f.metadata()["ss_output_name"] == "dog-step000002"


def test_init_lora_starts_from_the_file_and_keeps_its_function_at_another_alpha(
    tmp_path, tiny_sd1_dir, subject
):
    import torch

    from booth.errors import BoothError
    from booth.generate.networks import LoraNetwork
    from booth.models.loading import load_pipeline
    from booth.prompts import ExtraNetworkCall

    def run(out, lr, **lora):
        cfg = TrainConfig(method="lora", model=str(tiny_sd1_dir), out=tmp_path / out, steps=2, optim=OptimConfig(lr=lr),
                          data=DataConfig(subject, "a sks dog"), lora=LoraConfig(rank=4, text_encoder=True, **lora))  # fmt: skip
        return train(cfg, progress=False)

    def unet_out(name):  # the base model with that run's LoRA, by name
        pipe = load_pipeline(str(tiny_sd1_dir)).pipe
        LoraNetwork([tmp_path / name]).activate(pipe, [ExtraNetworkCall("lora", [name, "1"])])
        g = torch.Generator().manual_seed(0)
        x, emb = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
        with torch.no_grad():
            return pipe.unet(x, 500, encoder_hidden_states=emb).sample

    first = run("a", 5e-2, alpha=4)
    kept = run("b", 1e-12, alpha=1, init=str(first.files["kohya"]))  # no learning: the start, at alpha 1
    torch.testing.assert_close(unet_out("b"), unet_out("a"), atol=1e-5, rtol=1e-4)
    moved = run("c", 5e-2, alpha=4, init=str(first.files["kohya"]))  # and it trains on from there
    assert (unet_out("c") - unet_out("a")).abs().max() > 1e-4
    assert moved.losses[0] == pytest.approx(kept.losses[0], rel=1e-4)  # step 1 starts from the same model
    with pytest.raises(BoothError, match="has rank 4 at .*set --rank to match"):
        train(TrainConfig(method="lora", model=str(tiny_sd1_dir), out=tmp_path / "d", steps=1,
                          data=DataConfig(subject, "a sks dog"),
                          lora=LoraConfig(rank=2, text_encoder=True, init=str(first.files["kohya"]))), progress=False)  # fmt: skip


def test_epochs_set_the_steps_from_the_images_repeats_and_batch(tmp_path, tiny_sd1_dir, subject):
    import json

    data = DataConfig(subject, "a sks dog", repeats=2)  # 3 images x 2 = 6 a pass, 3 batches of 2
    cfg = TrainConfig(method="lora", model=str(tiny_sd1_dir), out=tmp_path / "e", steps=400, epochs=2, data=data,
                      optim=OptimConfig(batch_size=2))  # fmt: skip
    result = train(cfg, progress=False)
    assert result.steps == 6 and len(result.losses) == 6
    assert json.loads((tmp_path / "e" / "config.json").read_text())["steps"] == 6
    from safetensors import safe_open

    with safe_open(str(result.files["kohya"]), framework="pt") as f:
        assert f.metadata()["ss_num_epochs"] == "2"


def test_kohya_caption_files_are_read_and_txt_wins(tmp_path, subject):
    from booth.train.data import scan_image_folder

    images = tmp_path / "imgs"
    shutil.copytree(subject, images)
    stems = sorted(p.stem for p in images.glob("*.png"))
    (images / f"{stems[0]}.caption").write_text("from kohya")
    (images / f"{stems[1]}.caption").write_text("not this")
    (images / f"{stems[1]}.txt").write_text("this one")
    captions = {r.path.stem: r.caption for r in scan_image_folder(images)}
    assert (captions[stems[0]], captions[stems[1]], captions[stems[2]]) == ("from kohya", "this one", None)
