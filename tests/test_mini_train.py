"""booth-mini training: architecture budget, the stages, resuming, export to a plain diffusers folder."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from booth.devices import resolve_device
from booth.errors import BoothError
from booth.mini import architecture as A
from booth.mini.architecture import pooled
from booth.mini.render import BASE_STYLES, installed_styles
from booth.mini.train import (
    DONE,
    PRESETS,
    STAGES,
    CaptionDropout,
    TrainConfig,
    batch_indices,
    build_task,
    final_dir,
    hard_negative,
    is_finished,
    load_split,
    names_part,
    object_mask,
    part_phrases,
    read_log,
    record_caption,
    rotate_hue,
    sample_caption,
    train_all,
    train_stage,
    x0_weight,
)
from booth.mini.train.unet import latent_cache, object_weighted_mse, patch_grid, repa_loss

torch.set_num_threads(1)
TINY = PRESETS["tiny"]
FULL = PRESETS["full"]
needs_data = pytest.mark.skipif(
    not set(BASE_STYLES) <= set(installed_styles()),
    reason="emoji sources not installed (tools/install-data.sh)",
)
RECORD = {"concept": "dog", "style": "noto", "background": "blue", "position": "top left", "size": "small"}
PAIR = {**RECORD, "concept2": "cat", "position2": "bottom right", "size2": "small"}


def _tiny_train(data: Path, work: Path, *more: str) -> list[str]:
    """The arguments of ``booth mini train --preset tiny --data D --work W ...``."""
    return ["mini", "train", "--preset", "tiny", "--data", str(data), "--work", str(work), *more]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from booth.mini.dataset import build_dataset

    path = tmp_path_factory.mktemp("mini") / "data"
    build_dataset(path, n_images=64, seed=0, n_test=16, n_novel=8, n_pairs=8, progress=False)
    return path


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A work folder with every tiny stage finished."""
    work = tmp_path_factory.mktemp("work")
    reports = train_all(data_dir, work, TINY, progress=False)
    assert [r.stage for r in reports] == list(STAGES) and all(r.finished for r in reports)
    return work


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from booth.mini.export import export_pipeline

    return export_pipeline(trained, tmp_path_factory.mktemp("export") / "booth-mini")


# --- architecture and budget (no data) ---


def test_full_preset_fits_the_fp16_budget():
    counts = A.parameter_counts(FULL.arch)
    sizes = A.fp16_megabytes(counts)
    assert sizes["pipeline"] <= 35.0, sizes
    # pipeline + the mini-CLIP evaluator (MB = 10**6 bytes); tokenizers, configs and the card add 0.3 MB
    # (an export of the full architecture measured 39.14 MB in all)
    assert sizes["total"] + 0.5 <= 40.0, sizes
    assert FULL.arch.latent_size == 16 and FULL.arch.resolution == 64


def test_the_factor2_experiment_fits_the_budget_on_32px_latents():
    arch = PRESETS["factor2"].arch
    assert arch.latent_size == arch.unet.sample_size == 32 and arch.resolution == 64
    sizes = A.fp16_megabytes(A.parameter_counts(arch))
    assert sizes["total"] + 0.5 <= 40.0, sizes


def test_an_architecture_whose_unet_does_not_fit_its_vae_is_refused():
    with pytest.raises(ValueError, match="latent size 32"):
        A.MiniArchitecture(vae=A.VaeConfig(block_out_channels=(32, 64)))
    with pytest.raises(ValueError, match="4 levels"):
        A.MiniArchitecture(unet=A.UNetConfig(block_out_channels=(32, 64, 128, 128)))


def test_full_text_encoder_is_the_clip_text_tower_and_feeds_the_unet():
    with torch.device("meta"):
        clip = A.build_clip(FULL.arch.clip)
        unet = A.build_unet(FULL.arch.unet, FULL.arch.clip.text_width)
    assert unet.config.cross_attention_dim == clip.config.text_config.hidden_size
    assert A.parameter_counts(FULL.arch)["text_encoder"] == A.count_parameters(clip.text_model)


def test_vit_position_embeddings_start_as_scaled_2d_sincos():
    """Row r, column c of the patch raster: channel 0 = sin(r), channel dim/2 = sin(c); the class slot is 0."""
    table = A.sincos_2d(8, 192)
    assert table.shape == (64, 192)
    r, c = 3, 5
    assert table[r * 8 + c, 0].item() == pytest.approx(torch.tensor(3.0).sin().item(), abs=1e-6)
    assert table[r * 8 + c, 96].item() == pytest.approx(torch.tensor(5.0).sin().item(), abs=1e-6)
    assert len({tuple(row.tolist()) for row in table}) == 64  # every patch position distinct
    config = A.ClipConfig(
        vision_width=32, vision_heads=2, vision_layers=1, text_layers=1, text_width=32, text_heads=2
    )
    weight = A.build_clip(config).vision_model.embeddings.position_embedding.weight
    assert torch.allclose(weight[1:], 0.5 * A.sincos_2d(8, 32)) and not weight[0].any()
    default = A.build_clip(replace(config, vision_position_scale=0.0))
    assert default.vision_model.embeddings.position_embedding.weight[1:].norm(dim=1).mean() < 0.5
    with pytest.raises(ValueError, match="divisible by 4"):
        A.sincos_2d(8, 30)


def test_vae_mid_attention_can_be_left_out_and_the_folder_still_loads_in_diffusers(tmp_path):
    from diffusers import AutoencoderKL

    config = A.VaeConfig(block_out_channels=(8, 16), norm_num_groups=4, sample_size=16)
    with_attention = A.build_vae(config)
    without = A.build_vae(replace(config, mid_attention=False))
    assert with_attention.encoder.mid_block.attentions[0] is not None
    assert without.encoder.mid_block.attentions[0] is None and without.decoder.mid_block.attentions[0] is None
    assert A.count_parameters(without) < A.count_parameters(with_attention)
    without.save_pretrained(tmp_path)
    loaded = AutoencoderKL.from_pretrained(tmp_path).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = loaded.encode(x).latent_dist.mean
        expected = without.eval().encode(x).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)  # two levels: factor 2
    assert torch.allclose(latents, expected)


def test_concept_names_tokenize_short_with_the_truncated_bpe():
    from booth.mini.concepts import BASE_CONCEPTS

    tokenizer = A.build_tokenizer(FULL.arch.clip)
    assert len(tokenizer) == A.vocab_size(FULL.arch.clip)
    lengths = [len(tokenizer(c.name).input_ids) - 2 for c in BASE_CONCEPTS]
    assert sum(lengths) / len(lengths) < 3.0
    full = "a medium cocktail glass in the bottom right on a purple background, openmoji style"
    assert len(tokenizer(full).input_ids) <= 30


def test_batches_walk_each_epoch_without_replacement():
    seen = torch.cat([batch_indices(20, 4, seed=3, step=s) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(20))
    assert not torch.equal(batch_indices(20, 4, 3, 5), batch_indices(20, 4, 3, 0))  # next epoch reshuffles
    assert torch.equal(batch_indices(20, 4, 3, 7), batch_indices(20, 4, 3, 7))
    assert len(batch_indices(3, 8, 0, 0)) == 8  # fewer images than a batch: repeated


def test_caption_dropout():
    gen = torch.Generator().manual_seed(0)
    assert sample_caption(RECORD, CaptionDropout(empty=1.0), gen) == ""
    assert sample_caption(RECORD, CaptionDropout(concept_only=1.0), gen) == "a dog"
    full = sample_caption(RECORD, CaptionDropout(concept_only=0.0, keep_part=1.0), gen)
    assert full == "a small dog in the top left on a blue background, noto style"
    texts = {sample_caption(RECORD, CaptionDropout(empty=0.1, concept_only=0.1), gen) for _ in range(200)}
    assert {"", "a dog", full} <= texts and len(texts) > 8


def test_hard_negatives_change_one_named_attribute_and_stay_valid():
    from booth.mini.compose import Layout

    vocab = {"concept": ["cat", "dog", "fox"], "style": list(BASE_STYLES)}
    gen = torch.Generator().manual_seed(0)
    changed = set()
    for record in (RECORD, {**RECORD, "size": "large", "position": "centre"}):
        for parts in ((), ("position",), ("size", "position", "background", "style")):
            for _ in range(60):
                negative = hard_negative(record, parts, vocab, gen)
                diff = [k for k in record if negative[k] != record[k]]
                assert len(diff) == 1 and diff[0] in ("concept", *parts), (record, parts, negative)
                Layout(negative["background"], negative["position"], negative["size"])  # valid layout
                assert record_caption(negative, parts) != record_caption(record, parts)
                changed.add(diff[0])
    assert changed == {"concept", "size", "position", "background", "style"}


@needs_data
def test_clip_stage_scores_every_concept_prompt(data_dir):
    """With concept_weight the CLIP loss adds a cross-entropy over "a {concept}" for all concepts."""
    data = load_split(data_dir)
    task = build_task("clip", TINY, data, torch.device("cpu"), 0, None)
    assert TINY.clip.concept_weight > 0 and TINY.clip.hard_negatives > 0
    concepts = sorted({r["concept"] for r in data.records})
    assert task.vocab["concept"] == concepts and task.concept_ids.shape[0] == len(concepts)
    loss, stats = task.loss(torch.arange(8), torch.Generator().manual_seed(0), None)
    plain = build_task(
        "clip",
        replace(TINY, clip=replace(TINY.clip, concept_weight=0.0, phrase_weight=0.0)),
        data,
        torch.device("cpu"),
        0,
        None,
    )
    plain.model.load_state_dict(task.model.state_dict())
    loss_plain, stats_plain = plain.loss(torch.arange(8), torch.Generator().manual_seed(0), None)
    assert {"concept_acc", "phrase_acc"} <= set(stats) and not {"concept_acc", "phrase_acc"} & set(
        stats_plain
    )
    assert loss.item() > loss_plain.item()  # the concept and phrase terms add positive cross-entropies


@needs_data
def test_clip_style_term_is_the_style_gates_zero_shot_cross_entropy(data_dir):
    """style_weight adds the cross-entropy of each image over "a {concept}, {style} style" for every style."""
    from booth.mini.compose import caption

    data = load_split(data_dir)
    plain_cfg = replace(TINY, clip=replace(TINY.clip, concept_weight=0.0, phrase_weight=0.0))
    task = build_task(
        "clip",
        replace(plain_cfg, clip=replace(plain_cfg.clip, style_weight=0.5)),
        data,
        torch.device("cpu"),
        0,
        None,
    )
    plain = build_task("clip", plain_cfg, data, torch.device("cpu"), 0, None)
    plain.model.load_state_dict(task.model.state_dict())
    index = torch.arange(8)
    loss, stats = task.loss(index, torch.Generator().manual_seed(0), None)
    loss_plain, stats_plain = plain.loss(index, torch.Generator().manual_seed(0), None)
    assert "style_acc" in stats and "style_acc" not in stats_plain
    records = [data.records[i] for i in index.tolist()]
    styles = task.vocab["style"]
    with torch.no_grad():
        pixels = A.clip_pixels(data.images[index])
        image = torch.nn.functional.normalize(
            pooled(task.model.get_image_features(pixel_values=pixels)), dim=-1
        )
        texts = [caption(r["concept"], s, None) for r in records for s in styles]
        text = task.model.get_text_features(input_ids=task._ids(texts))
        text = torch.nn.functional.normalize(pooled(text), dim=-1).view(len(records), len(styles), -1)
        logits = task.model.logit_scale.exp() * torch.einsum("bd,bsd->bs", image, text)
        labels = torch.tensor([styles.index(r["style"]) for r in records])
        expected = torch.nn.functional.cross_entropy(logits, labels)
    assert (loss - loss_plain).item() == pytest.approx(0.5 * expected.item(), rel=1e-4)
    assert stats["style_acc"] == pytest.approx((logits.argmax(dim=1) == labels).float().mean().item())


def test_part_phrases_are_the_caption_template_words():
    from booth.mini.compose import LAYOUTS

    phrases = part_phrases(list(BASE_STYLES))
    assert [len(phrases[k]) for k in ("position", "size", "background", "style")] == [
        9,
        3,
        10,
        len(BASE_STYLES),
    ]
    for layout in LAYOUTS[:40]:
        full = record_caption({**RECORD, **vars(layout)}, ("size", "position", "background", "style"))
        for part in ("position", "size", "background"):
            assert phrases[part][getattr(layout, part)] in full, (part, full)
    assert (
        phrases["style"]["noto"] == "noto style"
        and phrases["background"]["orange"] == "on an orange background"
    )


def test_x0_weight_is_min_snr_plus_a_floor():
    snr = torch.tensor([0.0047, 1.0, 10.0])
    assert torch.allclose(x0_weight(snr, 5.0), torch.tensor([0.0047, 1.0, 5.0]))
    assert torch.allclose(x0_weight(snr, 5.0, 1.0), torch.tensor([1.0047, 2.0, 6.0]))
    eps_weight = x0_weight(snr, 5.0) / snr  # Min-SNR-5 for an epsilon loss: 1 up to SNR 5, then 5 / SNR
    assert torch.allclose(eps_weight, torch.tensor([1.0, 1.0, 0.5]))


def test_the_x0_weight_floor_can_decay_over_the_unet_stage():
    steady = replace(TINY.unet, snr_floor=1.0)
    decaying = replace(steady, snr_floor_end=0.0)
    last = TINY.unet.optim.steps - 1
    assert [steady.floor_at(s) for s in (0, last)] == [1.0, 1.0]
    assert [decaying.floor_at(s) for s in (0, last, last + 10)] == [1.0, 0.0, 0.0]
    assert decaying.floor_at(last // 2) == pytest.approx(1.0 - (last // 2) / last)
    with pytest.raises(ValueError, match="negative"):
        replace(steady, snr_floor_end=-0.5)


@needs_data
def test_the_unet_loss_weighs_by_the_floor_of_its_step(data_dir, trained):
    """The step decides the floor: at the first step the decaying loss is the floor-1 loss, at the last the floor-0."""
    data, cpu, last = load_split(data_dir), torch.device("cpu"), TINY.unet.optim.steps - 1

    def loss(floor, end, step):
        config = replace(TINY, unet=replace(TINY.unet, snr_floor=floor, snr_floor_end=end))
        task = build_task("unet", config, data, cpu, 0, trained)
        with torch.no_grad():
            return task.loss(torch.arange(8), torch.Generator().manual_seed(0), None, step)[0].item()

    first, final = loss(1.0, 0.0, 0), loss(1.0, 0.0, last)
    assert first == pytest.approx(loss(1.0, None, 0)) and final == pytest.approx(loss(0.0, None, 0))
    assert first > final  # the floor adds weight to every sample


def test_the_unet_timestep_range_is_checked_and_read_back():
    low = replace(TINY.unet, timesteps=[0, 400])  # JSON gives a list
    assert low.timesteps == (0, 400)
    config = replace(TINY, unet=low)
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    for bad in ((400, 400), (-1, 10), (500, 100)):
        with pytest.raises(ValueError, match="timesteps"):
            replace(TINY.unet, timesteps=bad)
    for share in (-0.1, 1.5):
        with pytest.raises(ValueError, match="timesteps_share"):
            replace(TINY.unet, timesteps_share=share)


def test_the_unet_stage_draws_timesteps_from_its_range(data_dir, trained):
    data, cpu = load_split(data_dir), torch.device("cpu")

    def draws(timesteps, share=1.0):
        config = replace(TINY, unet=replace(TINY.unet, timesteps=timesteps, timesteps_share=share))
        return build_task("unet", config, data, cpu, 0, trained).draw_timesteps(
            4096, torch.Generator().manual_seed(0)
        )

    every, low = draws(None), draws((100, 300))
    assert every.min() < 10 and every.max() > 990  # the whole schedule by default
    assert low.min() >= 100 and low.max() < 300 and len(low.unique()) == 200
    mixed = draws((100, 300), share=0.25)  # a quarter of the batch from the range, the rest from everywhere
    assert mixed[:1024].min() >= 100 and mixed[:1024].max() < 300
    assert mixed[1024:].min() < 10 and mixed[1024:].max() > 990
    with pytest.raises(BoothError, match="timesteps"):
        draws((0, 1001))  # the schedule has 1,000


def test_the_unet_resolution_is_checked_and_read_back():
    low = replace(TINY.unet, resolution=32)
    config = replace(TINY, unet=low)
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    for bad in (8, 24, 0):
        with pytest.raises(ValueError, match="resolution"):
            replace(TINY.unet, resolution=bad)


@needs_data
def test_a_unet_stage_at_a_lower_resolution_trains_on_its_latents_and_starts_the_full_size(
    data_dir, trained, tmp_path
):
    """`resolution` 32: the VAE encodes the box-filtered 32 px images (8 x 8 latents, cached under their own
    key); the stage's checkpoint then starts a full-size stage through `init`."""
    from diffusers import AutoencoderKL

    from booth.mini.train.data import to_unit

    low = replace(TINY, unet=replace(TINY.unet, resolution=32))
    work = _work_with_prerequisites(trained, tmp_path / "low", "unet")
    _pin(work, low)
    report = train_stage("unet", data_dir, work, low, progress=False)
    assert report.finished and report.ran_steps == TINY.unet.optim.steps
    cache = torch.load(work / "unet" / "latents.pt", weights_only=True)
    assert cache["key"]["size"] == 32 and cache["mean"].shape[-2:] == (8, 8)
    vae = AutoencoderKL.from_pretrained(final_dir(work, "vae")).eval()
    images = torch.nn.functional.interpolate(
        to_unit(load_split(data_dir).images[:4]), size=(32, 32), mode="area"
    )
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mean
    assert torch.allclose(cache["mean"][:4], expected, atol=0.05)  # bf16 autocast may encode them
    assert all(math.isfinite(r["loss"]) for r in read_log(work, "unet") if "loss" in r)

    source = torch.load(work / "unet" / "checkpoint.pt", weights_only=True)
    full = replace(TINY, unet=replace(TINY.unet, init=str(work / "unet" / "checkpoint.pt")))
    work2 = _work_with_prerequisites(trained, tmp_path / "full", "unet")
    _pin(work2, full)
    assert train_stage("unet", data_dir, work2, full, steps=0, progress=False).step == 0
    state = torch.load(work2 / "unet" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(state["model"][k], v) for k, v in source["ema"].items() if k.startswith("unet."))
    assert torch.load(work2 / "unet" / "latents.pt", weights_only=True)["mean"].shape[-2:] == (16, 16)
    cached = work2 / "unet" / "latents.pt"
    latent_cache(work2, vae, load_split(data_dir))
    before = cached.stat().st_mtime_ns
    latent_cache(work2, vae, load_split(data_dir), size=64)  # the dataset's own size: the plain cache
    assert cached.stat().st_mtime_ns == before


def test_object_weighted_mse_redistributes_the_error_towards_the_object():
    share = torch.zeros(2, 1, 4, 4)
    share[:, :, 1:3, 1:3] = 1.0  # 4 of 16 latent pixels show the object
    share[1, :, 0, 0] = 0.5
    flat = torch.full((2, 4, 4, 4), 0.3)
    assert torch.allclose(object_weighted_mse(flat, share, 4.0), torch.full((2,), 0.3))  # weights mean 1
    on_object = share.expand(2, 4, 4, 4) == 1.0
    error = on_object.float()  # error only on the object: 4 of 16 plainly, (5 x 4) / (12 + 5 x 4) weighed
    assert torch.allclose(object_weighted_mse(error, share, 0.0), torch.full((2,), 0.25))
    weighed = object_weighted_mse(error, share, 4.0)
    assert weighed[0].item() == pytest.approx(20 / 32)
    assert weighed[1].item() == pytest.approx(20 / 34)  # a half-covered pixel weighs 1 + 4 x 0.5


@needs_data
def test_the_unet_stage_weighs_its_loss_by_the_object_share_of_each_latent_pixel(data_dir, trained):
    data, cpu = load_split(data_dir), torch.device("cpu")
    config = replace(TINY, unet=replace(TINY.unet, object_weight=4.0))
    task = build_task("unet", config, data, cpu, 0, trained)
    share = task.object_share
    assert share.shape == (len(data), 1, 16, 16) and share.min() >= 0.0 and share.max() <= 1.0
    first = data.images[:1]
    background = (first == first[..., :1, :1]).all(dim=1)  # 64 x 64: pixels of the corner's colour
    corners = background[0].reshape(16, 4, 16, 4).all(dim=(1, 3))  # latent pixels of background alone
    assert corners.any() and (~corners).any()
    assert (share[0, 0][corners] == 0).all() and (share[0, 0][~corners] > 0).any()
    plain = build_task("unet", TINY, data, cpu, 0, trained)
    assert plain.object_share is None
    index = torch.arange(4)
    weighed, _ = task.loss(index, torch.Generator().manual_seed(3), None)
    unweighed, _ = plain.loss(index, torch.Generator().manual_seed(3), None)
    assert torch.isfinite(weighed) and not torch.isclose(weighed, unweighed)
    with pytest.raises(ValueError, match="object_weight"):
        replace(TINY.unet, object_weight=-1.0)


def test_unknown_names_are_user_errors(tmp_path):
    with pytest.raises(BoothError):
        train_stage("lora", tmp_path, tmp_path, TINY)
    with pytest.raises(BoothError):
        load_split(tmp_path)
    with pytest.raises(BoothError):
        resolve_device("nonsense")


# --- the stages ---


@needs_data
@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_overfits_a_fixed_batch(stage, data_dir, trained):
    data = load_split(data_dir)
    task = build_task(stage, TINY, data, torch.device("cpu"), 0, trained)
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=2e-3)
    index, losses = torch.arange(8), []
    for _ in range(20):
        loss, _ = task.loss(index, torch.Generator().manual_seed(0), None)  # same images, captions, noise
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def _work_with_prerequisites(trained, tmp_path, stage):
    """A fresh work folder holding the finished stages before `stage` (and the pinned run)."""
    work = tmp_path / "work"
    work.mkdir(parents=True)
    for name in ("config.json", "dataset.json"):
        shutil.copy(trained / name, work / name)
    for before in STAGES[: STAGES.index(stage)]:
        shutil.copytree(trained / before, work / before)
    return work


def _pin(work, config) -> None:
    """Re-pin a work folder's run to `config` (a test changing settings between calls on purpose)."""
    run = json.loads((work / "config.json").read_text())
    run["config"] = config.to_json()
    (work / "config.json").write_text(json.dumps(run))


@needs_data
@pytest.mark.parametrize("stage", ["clip", "unet"])
def test_resumed_chunks_match_one_run(stage, data_dir, trained, tmp_path):
    one = _work_with_prerequisites(trained, tmp_path / "one", stage)
    two = _work_with_prerequisites(trained, tmp_path / "two", stage)
    assert train_stage(stage, data_dir, one, TINY, progress=False).ran_steps == 6
    first = train_stage(stage, data_dir, two, TINY, steps=3, progress=False)
    assert (first.step, first.finished) == (3, False)
    checkpoint = torch.load(two / stage / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3 and checkpoint["data_position"]["batch"] == 3
    second = train_stage(stage, data_dir, two, TINY, steps=3, progress=False)
    assert (second.step, second.ran_steps, second.finished) == (6, 3, True)

    def losses(work):
        return [r["loss"] for r in read_log(work, stage) if "loss" in r]

    assert losses(one) == losses(two) and len(losses(one)) == 6
    name = "model.safetensors" if stage == "clip" else "diffusion_pytorch_model.safetensors"
    a, b = load_file(final_dir(one, stage) / name), load_file(final_dir(two, stage) / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    chunks = [r for r in read_log(two, stage) if r.get("event") == "chunk"]
    assert [(c["start_step"], c["end_step"]) for c in chunks] == [(0, 3), (3, 6)]


@pytest.mark.slow  # torch.compile builds its C++ kernels: about 2 minutes on 2 cores with an empty cache
@needs_data
def test_a_compiled_chunk_goes_on_from_an_eager_one_with_the_same_weights_and_names(
    data_dir, trained, tmp_path
):
    from torch._dynamo.utils import counters

    one = _work_with_prerequisites(trained, tmp_path / "one", "unet")
    two = _work_with_prerequisites(trained, tmp_path / "two", "unet")
    train_stage("unet", data_dir, one, TINY, progress=False)
    train_stage("unet", data_dir, two, TINY, steps=3, progress=False)
    counters.clear()
    report = train_stage("unet", data_dir, two, TINY, progress=False, compile_models=True)
    assert (report.ran_steps, report.finished) == (3, True)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo traced the models
    chunks = [r for r in read_log(two, "unet") if r.get("event") == "chunk"]
    assert [c["compiled"] for c in chunks] == [[], ["unet", "text_encoder"]]

    def losses(work):
        return torch.tensor([r["loss"] for r in read_log(work, "unet") if "loss" in r])

    # the compiled kernels round differently under bf16 autocast, not more than that
    assert torch.allclose(losses(one), losses(two), rtol=0.05), (losses(one), losses(two))
    name = "diffusion_pytorch_model.safetensors"
    a, b = load_file(final_dir(one, "unet") / name), load_file(final_dir(two, "unet") / name)
    assert a.keys() == b.keys()  # compiled in place: no "_orig_mod." in the saved names
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 0.05


@needs_data
@pytest.mark.parametrize("stage", ["clip", "unet"])
def test_a_compile_that_fails_is_one_line_and_names_the_way_out(
    stage, data_dir, trained, tmp_path, monkeypatch
):
    compiled = []
    _failing_compile(monkeypatch, compiled)
    work = _work_with_prerequisites(trained, tmp_path, stage)
    with pytest.raises(BoothError, match=r"torch.compile failed on this machine .*train without --compile"):
        train_stage(stage, data_dir, work, TINY, progress=False, compile_models=True)
    expected = {
        "clip": ["CLIPVisionModel", "CLIPTextModel"],
        "unet": ["UNet2DConditionModel", "CLIPTextModel"],
    }
    assert compiled == expected[stage]
    assert not (work / stage / "checkpoint.pt").exists()  # nothing half-written


@needs_data
def test_unet_only_checkpoints_from_before_the_text_encoder_joined_still_resume(data_dir, trained, tmp_path):
    """A UNet checkpoint without ``unet.`` keys (older runs, frozen encoder) resumes; with training, a clear error."""
    frozen = replace(TINY, unet=replace(TINY.unet, train_text_encoder=False))
    work = _work_with_prerequisites(trained, tmp_path, "unet")
    _pin(work, frozen)
    train_stage("unet", data_dir, work, frozen, steps=3, progress=False)
    path = work / "unet" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for key in ("model", "ema"):
        state[key] = {k[5:]: v for k, v in state[key].items() if k.startswith("unet.")}
    torch.save(state, path)
    report = train_stage("unet", data_dir, work, frozen, steps=3, progress=False)
    assert (report.step, report.ran_steps, report.finished) == (6, 3, True)
    assert (final_dir(work, "unet") / "diffusion_pytorch_model.safetensors").is_file()

    (work / "unet" / "done.json").unlink()
    torch.save(state, path)
    _pin(work, TINY)
    with pytest.raises(BoothError, match="frozen text encoder"):
        train_stage("unet", data_dir, work, TINY, steps=1, progress=False)


@needs_data
def test_unet_warm_start_takes_the_ema_of_another_run_and_its_own_text_encoder_lr(
    data_dir, trained, tmp_path
):
    """`init` starts the UNet (model and EMA) from another run's checkpoint EMA, the encoder from this run's CLIP;
    `text_encoder_lr` is the encoder's peak LR."""
    from transformers import CLIPModel

    source = torch.load(trained / "unet" / "checkpoint.pt", weights_only=True)
    fine = replace(
        TINY,
        unet=replace(
            TINY.unet, init=str(trained / "unet" / "checkpoint.pt"), text_encoder_lr=5e-3, snr_floor=1.0
        ),
    )
    work = _work_with_prerequisites(trained, tmp_path, "unet")
    _pin(work, fine)
    report = train_stage("unet", data_dir, work, fine, steps=0, progress=False)
    state = torch.load(work / "unet" / "checkpoint.pt", weights_only=True)
    assert report.step == 0
    clip_tower = A.text_encoder_from_clip(CLIPModel.from_pretrained(work / "clip" / "final")).state_dict()
    for key in ("model", "ema"):
        assert all(torch.equal(state[key][k], v) for k, v in source["ema"].items() if k.startswith("unet."))
        assert all(torch.equal(state[key][f"text_encoder.{k}"], v) for k, v in clip_tower.items())
    groups = state["optimizer"]["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == [TINY.unet.optim.lr, 5e-3]
    in_fast = sum(len(g["params"]) for g in groups if g["initial_lr"] == 5e-3)
    assert in_fast == len(clip_tower)  # exactly the text encoder's tensors

    missing = replace(fine, unet=replace(fine.unet, init=str(tmp_path / "none.pt")))
    _pin(work, missing)
    (work / "unet" / "checkpoint.pt").unlink()
    with pytest.raises(BoothError, match="not found"):
        train_stage("unet", data_dir, work, missing, steps=1, progress=False)


@needs_data
def test_unet_warm_start_can_carry_the_fine_tuned_text_encoder(data_dir, trained, tmp_path):
    """`init_text_encoder` starts the encoder from the checkpoint's EMA encoder; a UNet-only checkpoint refuses."""
    source = torch.load(trained / "unet" / "checkpoint.pt", weights_only=True)
    fine = replace(
        TINY, unet=replace(TINY.unet, init=str(trained / "unet" / "checkpoint.pt"), init_text_encoder=True)
    )
    work = _work_with_prerequisites(trained, tmp_path, "unet")
    _pin(work, fine)
    train_stage("unet", data_dir, work, fine, steps=0, progress=False)
    state = torch.load(work / "unet" / "checkpoint.pt", weights_only=True)
    encoder = {k: v for k, v in source["ema"].items() if k.startswith("text_encoder.")}
    assert encoder and all(
        torch.equal(state[key][k], v) for key in ("model", "ema") for k, v in encoder.items()
    )

    unet_only = {k: v for k, v in source.items()}
    unet_only["ema"] = {k[5:]: v for k, v in source["ema"].items() if k.startswith("unet.")}
    torch.save(unet_only, tmp_path / "unet-only.pt")
    no_encoder = replace(fine, unet=replace(fine.unet, init=str(tmp_path / "unet-only.pt")))
    _pin(work, no_encoder)
    (work / "unet" / "checkpoint.pt").unlink()
    with pytest.raises(BoothError, match="holds no text encoder"):
        train_stage("unet", data_dir, work, no_encoder, steps=1, progress=False)


@needs_data
def test_unet_warm_start_carries_the_readout_heads_it_can(data_dir, trained, tmp_path):
    """A continuation of a run that trained the readout heads starts from its heads (fresh ones would pull the
    carried encoder at their first steps); heads reading other parts start fresh."""
    reading = replace(TINY, unet=replace(TINY.unet, readout_weight=1.0))
    first = _work_with_prerequisites(trained, tmp_path / "first", "unet")
    _pin(first, reading)
    train_stage("unet", data_dir, first, reading, steps=2, progress=False)
    source = first / "unet" / "checkpoint.pt"
    heads = {
        k: v for k, v in torch.load(source, weights_only=True)["ema"].items() if k.startswith("readout.")
    }
    assert heads

    def started(parts):
        config = replace(
            reading, unet=replace(reading.unet, init=str(source), init_text_encoder=True, readout_parts=parts)
        )
        work = _work_with_prerequisites(trained, tmp_path / "-".join(parts), "unet")
        _pin(work, config)
        train_stage("unet", data_dir, work, config, steps=0, progress=False)
        return torch.load(work / "unet" / "checkpoint.pt", weights_only=True)

    carried = started(reading.unet.readout_parts)
    assert all(torch.equal(carried[key][k], v) for key in ("model", "ema") for k, v in heads.items())
    other = started(("size",))  # another head set: its own fresh heads, no error
    assert set(k for k in other["model"] if k.startswith("readout.")) == {
        "readout.size.weight",
        "readout.size.bias",
    }
    assert not torch.equal(other["model"]["readout.size.weight"], heads["readout.size.weight"])


def test_two_object_records_caption_both_objects():
    full = "a small dog in the top left and a small cat in the bottom right on a blue background, noto style"
    assert record_caption(PAIR, ("size", "position", "background", "style")) == full
    assert record_caption(PAIR, ()) == "a dog and a cat"
    assert record_caption(PAIR, None) == ""


@needs_data
def test_unet_stage_can_also_train_on_the_pairs_split(data_dir, trained, tmp_path):
    """`pairs` appends the two-object images (latents cached, checksum pinned); a dataset without them refuses."""
    paired = replace(TINY, unet=replace(TINY.unet, pairs=True, readout_weight=1.0))
    work = _work_with_prerequisites(trained, tmp_path, "unet")
    _pin(work, paired)
    report = train_stage("unet", data_dir, work, paired, steps=2, progress=False)
    assert report.step == 2 and report.last_loss is not None and report.last_loss == report.last_loss
    pairs = load_split(data_dir, "pairs")
    assert json.loads((work / "dataset.json").read_text())["pairs_checksum"] == pairs.checksum
    latents = torch.load(work / "unet" / "latents.pt", weights_only=True)
    assert latents["mean"].shape[0] == len(load_split(data_dir, "train")) + len(pairs) == 72

    no_pairs = tmp_path / "no-pairs"
    shutil.copytree(data_dir, no_pairs, ignore=shutil.ignore_patterns("pairs"))
    with pytest.raises(BoothError, match="no pairs split"):
        train_stage("unet", no_pairs, work, paired, steps=1, progress=False)

    pinned = json.loads((work / "dataset.json").read_text())
    (work / "dataset.json").write_text(json.dumps({**pinned, "pairs_checksum": "0" * 64}))
    with pytest.raises(BoothError, match="other two-object images"):
        train_stage("unet", data_dir, work, paired, steps=1, progress=False)


def test_repa_loss_is_the_mean_negative_cosine_and_patches_pool_to_the_grid():
    y = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    assert repa_loss(3.0 * y, y).item() == pytest.approx(-1.0)  # aligned, whatever the scale
    assert repa_loss(-y, y).item() == pytest.approx(1.0)
    half = torch.cat([y[:, :2], -y[:, 2:]], dim=1)  # half the patches aligned, half opposed
    assert repa_loss(half, y).item() == pytest.approx(0.0, abs=1e-6)
    maps = torch.arange(32.0).view(1, 2, 4, 4)  # two channels of a 4 x 4 map
    patches = patch_grid(maps, 2)
    assert patches.shape == (1, 4, 2)  # (B, N, C), row-major over the 2 x 2 grid
    assert patches[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert torch.equal(patch_grid(maps, 4), maps.flatten(2).transpose(1, 2))


@needs_data
def test_repa_trains_a_projector_beside_the_unet_and_exports_none(data_dir, trained, tmp_path):
    """`repa_weight`: the UNet layer's states, projected, are pulled towards the frozen mini-CLIP's patch
    states; the projector is checkpointed (resumable) but the exported UNet is plain diffusers."""
    from diffusers import UNet2DConditionModel

    aligned = replace(TINY, unet=replace(TINY.unet, repa_weight=1.0))
    one = _work_with_prerequisites(trained, tmp_path / "one", "unet")
    two = _work_with_prerequisites(trained, tmp_path / "two", "unet")
    for work in (one, two):
        _pin(work, aligned)
    train_stage("unet", data_dir, one, aligned, progress=False)
    train_stage("unet", data_dir, two, aligned, steps=4, progress=False)
    checkpoint = torch.load(two / "unet" / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("repa.") for k in checkpoint["model"]) and any(
        k.startswith("repa.") for k in checkpoint["ema"]
    )
    train_stage("unet", data_dir, two, aligned, progress=False)
    records = [[r for r in read_log(work, "unet") if "loss" in r] for work in (one, two)]
    assert [r["repa_cos"] for r in records[0]] == [r["repa_cos"] for r in records[1]]  # resumes exactly
    cosines = [r["repa_cos"] for r in records[0]]
    assert len(cosines) == aligned.unet.optim.steps and all(-1.0 <= c <= 1.0 for c in cosines)
    assert cosines[-1] > cosines[0] + 0.2  # the projector learns to align (-0.06 -> 0.38 here)
    unet = UNet2DConditionModel.from_pretrained(final_dir(one, "unet"))
    plain = _work_with_prerequisites(trained, tmp_path / "plain", "unet")
    train_stage("unet", data_dir, plain, TINY, progress=False)
    weights = load_file(final_dir(plain, "unet") / "diffusion_pytorch_model.safetensors")
    assert unet.state_dict().keys() == weights.keys()  # no projector in the export
    ahead = "down_blocks.0.resnets.0.conv1.weight"  # before the aligned layer: the term trains it too
    assert not torch.equal(unet.state_dict()[ahead], weights[ahead])

    # a continuation of the run starts from its projector (model and EMA), as from its UNet
    carried = replace(aligned, unet=replace(aligned.unet, init=str(one / "unet" / "checkpoint.pt")))
    went_on = _work_with_prerequisites(trained, tmp_path / "went-on", "unet")
    _pin(went_on, carried)
    train_stage("unet", data_dir, went_on, carried, steps=0, progress=False)
    source = torch.load(one / "unet" / "checkpoint.pt", weights_only=True)["ema"]
    started = torch.load(went_on / "unet" / "checkpoint.pt", weights_only=True)
    projector = {k: v for k, v in source.items() if k.startswith("repa.")}
    assert projector and all(
        torch.equal(started[key][k], v) for key in ("model", "ema") for k, v in projector.items()
    )

    def first_cosine(name, **settings):
        config = replace(TINY, unet=replace(TINY.unet, repa_weight=1.0, **settings))
        work = _work_with_prerequisites(trained, tmp_path / name, "unet")
        _pin(work, config)
        train_stage("unet", data_dir, work, config, steps=1, progress=False)
        return next(r["repa_cos"] for r in read_log(work, "unet") if "loss" in r)

    # `repa_encoder`: another CLIP's vision tower gives the targets (the same first step, other patch states)
    assert first_cosine("own", repa_encoder=str(final_dir(trained, "clip"))) == cosines[0]
    assert first_cosine("other", repa_encoder=str(_other_clip(tmp_path / "other-clip"))) != cosines[0]
    with pytest.raises(BoothError, match="repa_encoder .* is not a CLIP folder"):
        first_cosine("missing", repa_encoder=str(tmp_path / "nowhere"))
    with pytest.raises(BoothError, match="repa_layer 'down_blocks.7' is not a module of the UNet"):
        first_cosine("bad", repa_layer="down_blocks.7")


@needs_data
def test_unet_warm_start_from_a_pipeline_folder(data_dir, trained, exported, tmp_path):
    """`init` may name a diffusers pipeline folder (e.g. the shipped booth-mini): its UNet and text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    fine = replace(TINY, unet=replace(TINY.unet, init=str(exported), init_text_encoder=True))
    work = _work_with_prerequisites(trained, tmp_path, "unet")
    _pin(work, fine)
    train_stage("unet", data_dir, work, fine, steps=0, progress=False)
    state = torch.load(work / "unet" / "checkpoint.pt", weights_only=True)
    unet = UNet2DConditionModel.from_pretrained(exported / "unet").state_dict()
    encoder = CLIPTextModel.from_pretrained(exported / "text_encoder").state_dict()
    for key in ("model", "ema"):
        assert all(torch.equal(state[key][f"unet.{k}"], v.float()) for k, v in unet.items())
        assert all(torch.equal(state[key][f"text_encoder.{k}"], v.float()) for k, v in encoder.items())

    wide = replace(TINY.arch, unet=replace(TINY.arch.unet, block_out_channels=(16, 32, 64)))
    other = replace(fine, arch=wide)
    _pin(work, other)
    (work / "unet" / "checkpoint.pt").unlink()
    with pytest.raises(BoothError, match="another architecture"):
        train_stage("unet", data_dir, work, other, steps=1, progress=False)


def test_reuse_takes_a_pipelines_clip_and_autoencoder_and_trains_the_unet_alone(
    data_dir, trained, exported, tmp_path, capsys
):
    """`--reuse PIPELINE`: the clip, vae and decoder stages are the pipeline's files, the UNet trains on its
    latents, the export draws with its decoder and its card says where they came from; a rerun resumes."""
    from booth.cli import main

    work, out = tmp_path / "work", tmp_path / "out"
    args = _tiny_train(data_dir, work, "--no-progress")
    reuse = [*args, "--reuse", str(exported), "--stage", "unet", "--export", str(out)]
    assert main([*reuse, "--steps", "2"]) == 0
    assert f"clip, vae, decoder: taken from {exported}" in capsys.readouterr().out
    assert not is_finished(work, "unet") and not out.exists()
    for stage, folder in (("clip", "clip"), ("vae", "vae"), ("decoder", "vae")):
        done = json.loads((work / stage / DONE).read_text())
        assert done["adopted_from"] == str(exported.resolve())
        for path in (exported / folder).iterdir():
            assert (final_dir(work, stage) / path.name).read_bytes() == path.read_bytes(), (stage, path.name)
    assert main(reuse) == 0  # the same command again: resumes the UNet, takes nothing twice
    printed = capsys.readouterr().out
    assert "taken from" not in printed and "unet: step 6/6" in printed
    for folder, name in (("vae", "diffusion_pytorch_model"), ("clip", "model")):  # the pipeline's own weights
        ours = load_file(out / folder / f"{name}.safetensors")
        theirs = load_file(exported / folder / f"{name}.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), folder
    card = (out / "README.md").read_text()
    assert f"| clip | taken from `{exported.resolve()}` (`--reuse`), not trained in this run |" in card
    assert (
        "| unet | 6 x 8 |" in card and "- decoder: the vae stage's autoencoder" not in card
    )  # not trained here


def test_reuse_refuses_what_it_cannot_take_and_leaves_the_work_folder_alone(trained, exported, tmp_path):
    """Stages this run trained, a folder that is not a booth-mini pipeline, and other shapes are refused."""
    from booth.mini.train import adopt_stages

    before = sorted(p.relative_to(trained) for p in trained.rglob("*"))
    with pytest.raises(BoothError, match="trained by this run; --reuse needs a new work folder"):
        adopt_stages(trained, exported, TINY)
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before
    plain = tmp_path / "plain"  # a diffusers pipeline without the mini-CLIP (an SD 1.5 folder, say)
    shutil.copytree(exported, plain, ignore=shutil.ignore_patterns("clip"))
    with pytest.raises(BoothError, match="has no clip/ folder"):
        adopt_stages(tmp_path / "a", plain, TINY)
    with pytest.raises(BoothError, match="not a diffusers pipeline folder"):
        adopt_stages(tmp_path / "a", tmp_path, TINY)
    wide = replace(TINY, arch=replace(TINY.arch, clip=replace(TINY.arch.clip, text_width=48)))
    with pytest.raises(BoothError, match="is not the recipe's mini-CLIP"):
        adopt_stages(tmp_path / "a", exported, wide)
    assert not (tmp_path / "a").exists()
    other = replace(TINY, arch=replace(TINY.arch, vae=replace(TINY.arch.vae, latent_channels=8)))
    with pytest.raises(BoothError, match="is not the recipe's autoencoder"):
        adopt_stages(tmp_path / "a", exported, other)
    assert adopt_stages(tmp_path / "b", exported, TINY) == ["clip", "vae", "decoder"]
    (tmp_path / "b" / "unet").mkdir()
    assert adopt_stages(tmp_path / "b", exported, TINY) == []


def test_object_mask_marks_what_differs_from_the_background():
    x = torch.full((2, 3, 8, 8), -1.0)
    x[0, :, 2:5, 3:6] = torch.tensor([0.9, -0.5, 0.7])[:, None, None]  # a pink square on black
    x[1] = 0.4  # a flat image: no object
    mask = object_mask(x)
    assert mask.shape == (2, 1, 8, 8)
    assert mask[0, 0, 2:5, 3:6].eq(1).all() and mask[0].sum() == 9 and mask[1].sum() == 0


def test_rotate_hue_keeps_grey_and_luma_and_turns_colours():
    import math

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 4, 4, generator=gen) * 0.6 - 0.3  # stays inside [-1, 1] (no clamping) when turned
    assert torch.allclose(rotate_hue(x, torch.zeros(3)), x, atol=1e-5)
    assert torch.allclose(rotate_hue(x, torch.full((3,), 2 * math.pi)), x, atol=1e-5)
    grey = torch.full((1, 3, 2, 2), 0.3)
    assert torch.allclose(rotate_hue(grey, torch.tensor([1.0])), grey, atol=1e-6)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    turned = rotate_hue(x, torch.tensor([0.5, 2.0, 4.0]))
    assert torch.allclose((turned * luma).sum(1), (x * luma).sum(1), atol=1e-5)
    assert (turned - x).abs().amax() > 0.1
    red = torch.tensor([0.8, -0.6, -0.6]).view(1, 3, 1, 1)
    third = torch.tensor([2 * math.pi / 3])
    channels = {int(rotate_hue(red, turn).flatten().argmax()) for turn in (third, -third)}
    assert channels == {1, 2}  # a third of a turn either way takes red to green and to blue


@needs_data
def test_vae_warm_start_and_object_weight(data_dir, trained, tmp_path):
    """`init` starts a fresh VAE stage from a diffusers VAE folder; `object_weight` raises the loss by weighting the
    object's pixels; `hue_jitter` feeds other colours."""
    from diffusers import AutoencoderKL

    folder = final_dir(trained, "vae")
    warm = replace(TINY, vae=replace(TINY.vae, init=str(folder)))
    work = _work_with_prerequisites(trained, tmp_path, "vae")
    _pin(work, warm)
    train_stage("vae", data_dir, work, warm, steps=0, progress=False)
    model = torch.load(work / "vae" / "checkpoint.pt", weights_only=True)["model"]
    shipped = AutoencoderKL.from_pretrained(folder).state_dict()
    assert all(torch.equal(model[k], v.float()) for k, v in shipped.items())

    data = load_split(data_dir)
    results = {}
    for name, vae_cfg in {
        "plain": TINY.vae,
        "object": replace(TINY.vae, object_weight=4.0),
        "hue": replace(TINY.vae, hue_jitter=1.0),
    }.items():
        task = build_task("vae", replace(TINY, vae=vae_cfg), data, torch.device("cpu"), seed=1, work=tmp_path)
        loss, stats = task.loss(torch.arange(4), torch.Generator().manual_seed(0), None)
        results[name] = (loss.item(), stats["psnr"])
    assert results["object"][0] > results["plain"][0] * 1.05  # same batch and noise: only the weights differ
    assert results["object"][1] == pytest.approx(results["plain"][1])  # the reported PSNR is unweighted
    assert results["hue"][1] != pytest.approx(
        results["plain"][1]
    )  # other colours in, other reconstructions out

    missing = replace(TINY, vae=replace(TINY.vae, init=str(tmp_path / "missing")))
    (work / "vae" / "checkpoint.pt").unlink()
    _pin(work, missing)
    with pytest.raises(BoothError, match="not a diffusers AutoencoderKL folder"):
        train_stage("vae", data_dir, work, missing, steps=1, progress=False)


@needs_data
def test_a_decoder_only_vae_run_keeps_the_latent_space_and_decodes_noisy_latents(data_dir, trained, tmp_path):
    """`train_encoder` false trains the decoder alone from `init` (its encoder and scaling factor kept, so a UNet
    trained on those latents still fits); `latent_noise` feeds the decoder perturbed latents."""
    from diffusers import AutoencoderKL

    folder = final_dir(trained, "vae")
    vae_cfg = replace(TINY.vae, init=str(folder), train_encoder=False, latent_noise=0.5)
    config = replace(TINY, vae=vae_cfg, decoder=None)  # how v5 was made, before the decoder stage
    work = _work_with_prerequisites(trained, tmp_path, "vae")
    _pin(work, config)
    assert train_stage("vae", data_dir, work, config, progress=False).ran_steps == 6
    before, after = (
        AutoencoderKL.from_pretrained(folder),
        AutoencoderKL.from_pretrained(final_dir(work, "vae")),
    )
    b, a = before.state_dict(), after.state_dict()
    kept = [k for k in b if k.startswith(("encoder.", "quant_conv."))]
    assert kept and all(torch.equal(a[k], b[k]) for k in kept)
    assert any(not torch.equal(a[k], b[k]) for k in b if k.startswith("decoder."))
    assert after.config.scaling_factor == before.config.scaling_factor
    from booth.mini.export import export_pipeline

    shutil.copytree(trained / "unet", work / "unet")  # same latents, so the finished UNet still fits
    card = (export_pipeline(work, tmp_path / "export") / "README.md").read_text()
    assert f"- vae: started from `{folder}` (decoder only" in card
    assert (
        "--preset tiny" not in card and "Configuration 'tiny'" in card
    )  # a modified preset is not the preset

    data = load_split(data_dir)
    psnrs = {}
    for noise in (0.0, 0.5):
        cfg = replace(TINY, vae=replace(vae_cfg, latent_noise=noise))
        task = build_task("vae", cfg, data, torch.device("cpu"), seed=1, work=tmp_path)
        psnrs[noise] = task.loss(torch.arange(4), torch.Generator().manual_seed(0), None)[1]["psnr"]
    assert psnrs[0.5] < psnrs[0.0]  # same batch, same decoder: the perturbed latents decode worse

    alone = replace(TINY, vae=replace(TINY.vae, train_encoder=False))
    with pytest.raises(BoothError, match="needs an init VAE"):
        build_task("vae", alone, data, torch.device("cpu"), seed=1, work=tmp_path)


@needs_data
def test_the_decoder_stage_fine_tunes_the_vae_stages_decoder_and_ships(data_dir, trained, exported):
    """The decoder stage starts from the vae stage's autoencoder: encoder, quant_conv and scaling factor stay
    (the UNet's latents are the vae stage's), the decoder trains; the export ships this stage's VAE and the
    card has its row and says what it is."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(final_dir(trained, "vae")).state_dict()
    tuned = AutoencoderKL.from_pretrained(final_dir(trained, "decoder"))
    t = tuned.state_dict()
    kept = [k for k in vae if k.startswith(("encoder.", "quant_conv."))]
    assert kept and all(torch.equal(t[k], vae[k]) for k in kept)
    assert any(not torch.equal(t[k], vae[k]) for k in vae if k.startswith("decoder."))
    done = json.loads((trained / "vae" / DONE).read_text())
    assert tuned.config.scaling_factor == done["scaling_factor"]
    shipped = load_file(exported / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(shipped[k], t[k].half()) for k in t)
    card = (exported / "README.md").read_text()
    assert "| decoder | 6 x 4 |" in card and "- decoder: the vae stage's autoencoder" in card


@needs_data
def test_export_refuses_a_stage_whose_done_json_is_not_one_it_wrote(trained, tmp_path):
    """A finished stage copied by hand (a done.json without the run's facts) is a one-line error, no card."""
    from booth.mini.export import export_pipeline

    work = tmp_path / "work"
    shutil.copytree(trained, work)
    (work / "clip" / DONE).write_text(json.dumps({"note": "copied from another run"}))
    with pytest.raises(BoothError, match="no steps, batch_size"):
        export_pipeline(work, tmp_path / "export")
    (work / "clip" / DONE).write_text("{not json")
    with pytest.raises(BoothError, match="cannot read"):
        export_pipeline(work, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_a_stage_that_cannot_start_is_refused_before_the_dataset_is_built(tmp_path, capsys):
    """`booth mini train --stage unet` on a work folder without the clip and vae stages: one line at once, no
    dataset built into --data, nothing pinned in --work."""
    from booth.cli import main

    data, work = tmp_path / "data", tmp_path / "work"
    for stage, missing in (("unet", "clip"), ("decoder", "vae")):
        args = _tiny_train(data, work, "--stage", stage)
        assert main([*args, "--no-progress"]) == 2
        assert capsys.readouterr().err == (
            f"booth: error: the {missing} stage is not finished in {work}; train it before the {stage}, or "
            "take it from a pipeline with --reuse booth-mini\n"
        )
    assert not data.exists() and not work.exists()


def test_train_refuses_an_export_folder_it_would_wipe_before_training(tmp_path, capsys):
    """`booth mini train --export DIR` replaces DIR whole when the run ends: a folder of other files is refused
    at once (not after hours of training), with the files and no dataset or run left behind."""
    from booth.cli import main

    data, work, mine = tmp_path / "data", tmp_path / "work", tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.png").write_bytes(b"not a pipeline")
    args = _tiny_train(data, work, "--export", str(mine))
    assert main([*args, "--no-progress"]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["photo.png"] and not data.exists() and not work.exists()


@needs_data
def test_the_decoder_stage_needs_the_vae_stage_and_a_frozen_encoder(data_dir, tmp_path):
    with pytest.raises(BoothError, match="vae stage is not finished"):
        train_stage("decoder", data_dir, tmp_path, TINY, progress=False)
    with pytest.raises(ValueError, match="decoder alone"):
        replace(TINY, decoder=replace(TINY.decoder, train_encoder=True))
    without = replace(TINY, decoder=None)
    assert without.stages == ("clip", "vae", "unet")
    with pytest.raises(BoothError, match="no decoder stage"):
        train_stage("decoder", data_dir, tmp_path, without, progress=False)


@needs_data
def test_a_run_pinned_before_the_decoder_stage_resumes_and_ships_its_vae(data_dir, trained, tmp_path):
    """A work folder whose config.json predates `TrainConfig.decoder` (no such key) is still the same run: it
    resumes without "another configuration" and exports the vae stage's autoencoder."""
    from booth.mini.export import export_pipeline

    work = tmp_path / "work"
    shutil.copytree(trained, work)
    shutil.rmtree(work / "decoder")
    shutil.rmtree(work / "unet")  # a stage still to train: the call checks the pinned run
    run = json.loads((work / "config.json").read_text())
    del run["config"]["decoder"]
    (work / "config.json").write_text(json.dumps(run))
    old = replace(TINY, decoder=None)
    reports = train_all(data_dir, work, old, progress=False)
    assert [(r.stage, r.ran_steps) for r in reports] == [("clip", 0), ("vae", 0), ("unet", 6)]
    out = export_pipeline(work, tmp_path / "export")
    shipped = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    vae = load_file(final_dir(work, "vae") / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(shipped[k], v.half()) for k, v in vae.items())
    assert "| decoder |" not in (out / "README.md").read_text()


@needs_data
def test_clip_warm_start_from_a_clip_folder(data_dir, trained, tmp_path):
    """`init` starts a fresh CLIP stage from a CLIPModel folder (a longer second run of a finished CLIP);
    a folder of another architecture or no folder: one-line errors."""
    from transformers import CLIPModel

    folder = final_dir(trained, "clip")
    warm = replace(TINY, clip=replace(TINY.clip, init=str(folder)))
    work = _work_with_prerequisites(trained, tmp_path, "clip")
    _pin(work, warm)
    train_stage("clip", data_dir, work, warm, steps=0, progress=False)
    model = torch.load(work / "clip" / "checkpoint.pt", weights_only=True)["model"]
    finished = CLIPModel.from_pretrained(folder).state_dict()
    assert all(torch.equal(model[k], v.float()) for k, v in finished.items())
    fresh = build_task("clip", TINY, load_split(data_dir), torch.device("cpu"), seed=0, work=tmp_path)
    assert not torch.equal(fresh.model.logit_scale, model["logit_scale"])  # the init did something

    (work / "clip" / "checkpoint.pt").unlink()
    other = replace(TINY.arch, clip=replace(TINY.arch.clip, text_layers=TINY.arch.clip.text_layers + 1))
    wider = replace(warm, arch=other)
    _pin(work, wider)
    with pytest.raises(BoothError, match="another architecture"):
        train_stage("clip", data_dir, work, wider, steps=0, progress=False)
    missing = replace(TINY, clip=replace(TINY.clip, init=str(tmp_path / "missing")))
    _pin(work, missing)
    with pytest.raises(BoothError, match="not a transformers CLIPModel folder"):
        train_stage("clip", data_dir, work, missing, steps=0, progress=False)


@needs_data
def test_readout_term_teaches_the_token_average_every_caption_part(data_dir, trained):
    """The readout heads read position/size/background/style from the averaged text states; the term trains the
    text encoder (not the UNet) and is refused without a trainable encoder."""
    aux = replace(TINY, unet=replace(TINY.unet, readout_weight=1.0))
    task = build_task("unet", aux, load_split(data_dir), torch.device("cpu"), 0, trained)
    assert set(task.model.readout) == {"position", "size", "background", "style"}
    assert task.model.readout["position"].out_features == 9
    plain = build_task("unet", TINY, load_split(data_dir), torch.device("cpu"), 0, trained)
    torch.manual_seed(0)
    index = torch.arange(16)
    with_term, stats = task.loss(index, torch.Generator().manual_seed(0), None)
    without, _ = plain.loss(index, torch.Generator().manual_seed(0), None)
    assert 0 <= stats["readout_acc"] <= 1 and with_term.item() > without.item()  # same draws, plus the term
    with_term.backward()
    assert task.model.readout["position"].weight.grad.abs().sum() > 0
    assert task.model.text_encoder.get_input_embeddings().weight.grad.abs().sum() > 0
    frozen = replace(aux, unet=replace(aux.unet, train_text_encoder=False))
    with pytest.raises(BoothError, match="needs train_text_encoder"):
        build_task("unet", frozen, load_split(data_dir), torch.device("cpu"), 0, trained)


@needs_data
def test_readout_can_read_the_concept_too(data_dir, trained):
    """With "concept" in readout_parts a head over the training set's concepts joins, fed by every non-empty
    caption (a concept-only caption names no layout part but names its concept); unknown parts are refused."""
    data = load_split(data_dir)
    parts = ("concept", "position")
    aux = replace(TINY, unet=replace(TINY.unet, readout_weight=1.0, readout_parts=parts))
    task = build_task("unet", aux, data, torch.device("cpu"), 0, trained)
    assert set(task.model.readout) == set(parts)
    assert task.model.readout["concept"].out_features == len({r["concept"] for r in data.records}) > 1
    assert names_part((), "concept") and not names_part((), "position") and not names_part(None, "concept")
    records = data.records[:4]
    average = torch.randn(4, task.model.text_encoder.config.hidden_size, requires_grad=True)
    loss, _ = task._readout_loss(average, records, [(), (), None, None])  # concept-only captions only
    loss.backward()
    assert loss.item() > 0 and task.model.readout["concept"].weight.grad.abs().sum() > 0
    assert task.model.readout["position"].weight.grad is None  # no caption named a position
    bad = replace(aux, unet=replace(aux.unet, readout_parts=("colour",)))
    with pytest.raises(BoothError, match="unknown readout parts"):
        build_task("unet", bad, data, torch.device("cpu"), 0, trained)


@needs_data
def test_finished_stages_are_skipped_and_the_run_is_pinned(data_dir, trained, tmp_path):
    assert all(r.ran_steps == 0 and r.finished for r in train_all(data_dir, trained, TINY, progress=False))
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(trained / "config.json", work / "config.json")
    other = replace(TINY, unet=replace(TINY.unet, ema_decay=0.9))
    with pytest.raises(BoothError, match="another configuration"):
        train_stage("clip", data_dir, work, other, progress=False)


@needs_data
def test_a_spent_minutes_budget_checkpoints_without_steps(data_dir, tmp_path):
    report = train_stage("clip", data_dir, tmp_path, TINY, minutes=0, progress=False)
    assert (report.ran_steps, report.finished) == (0, False)
    assert torch.load(tmp_path / "clip" / "checkpoint.pt", weights_only=True)["step"] == 0
    assert train_stage("clip", data_dir, tmp_path, TINY, progress=False).ran_steps == 6


@needs_data
def test_unet_needs_the_earlier_stages(data_dir, tmp_path):
    with pytest.raises(BoothError, match="clip stage is not finished"):
        train_stage("unet", data_dir, tmp_path, TINY, progress=False)


# --- export ---


@needs_data
def test_export_loads_with_plain_diffusers_and_generates(exported):
    script = (
        "import sys, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        "pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "assert not any(m.startswith('booth') for m in sys.modules)\n"
        "from diffusers import DDIMScheduler\n"
        "assert not DDIMScheduler.from_config(pipe.scheduler.config).config.clip_sample\n"
        "image = pipe('a dog on a blue background', num_inference_steps=2,"
        " generator=torch.Generator().manual_seed(0)).images[0]\n"
        "print(image.size, pipe.text_encoder.dtype, pipe.unet.dtype, type(pipe.scheduler).__name__)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(exported)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(64, 64) torch.float32 torch.float32 DPMSolverMultistepScheduler" in done.stdout


@needs_data
def test_the_denoise_depth_tool_reads_a_pipeline_at_each_strength(exported, data_dir, tmp_path):
    """tools/mini_denoise_depth.py: the round trip (strength 0) and image-to-image, read by the model's CLIP."""
    tool = Path(__file__).parents[1] / "tools" / "mini_denoise_depth.py"
    out = tmp_path / "depth.json"
    args = [sys.executable, str(tool), str(exported), "--data", str(data_dir), "--n", "6"]
    done = subprocess.run(
        [*args, "--strengths", "0,0.5", "--json", str(out), "--out", str(tmp_path / "depth.png")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads(out.read_text())
    scores = table["models"][str(exported)]
    assert table["renders"] == 6 and set(scores) == {"0.0", "0.5"}
    assert all(0.0 <= v <= 1.0 for pair in scores.values() for v in pair)
    assert (tmp_path / "depth.png").is_file() and "| 0.5 |" in done.stdout
    bad = subprocess.run([*args, "--strengths", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "strengths lie in [0, 1]" in bad.stderr


def _gpu_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_unet", Path(__file__).parents[1] / "tools" / "gpu_unet.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_recipe_scales_the_unet_stage_to_its_batch():
    tool = _gpu_tool()
    recipe = tool.gpu_recipe("full", 128, 5000)
    unet = recipe.unet
    assert (unet.optim.batch_size, unet.optim.steps, unet.optim.warmup_steps) == (128, 5000, 30)
    assert unet.optim.lr == pytest.approx(FULL.unet.optim.lr * 4)  # linear in the batch
    assert unet.ema_decay == pytest.approx(1 - (1 - FULL.unet.ema_decay) * 4)  # the same horizon in images
    assert unet.text_encoder_lr == FULL.unet.text_encoder_lr and recipe.arch == FULL.arch
    assert replace(recipe, name="full", unet=FULL.unet) == FULL  # nothing else changed
    big = tool.gpu_recipe("full", 512, 100).unet
    assert (
        big.optim.lr == pytest.approx(FULL.unet.optim.lr * tool.LR_SCALE_LIMIT)
        and big.optim.warmup_steps == 8
    )


def _failing_compile(monkeypatch, seen: list[str] | None = None) -> None:
    """torch.compile as on a machine where it cannot build kernels: the first compiled call fails. The names
    of the modules compiled go into `seen`."""

    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler")

    original = torch.nn.Module.compile

    def compile_failing(module, *args, **kwargs):
        (seen if seen is not None else []).append(type(module).__name__)
        original(module, backend=failing_backend)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_failing)


@needs_data
def test_the_gpu_tool_times_trains_and_brings_back_a_pipeline(
    data_dir, exported, tmp_path, monkeypatch, capsys
):
    """tools/gpu_unet.py run (probe, then the steps that fit the minutes; three files) and assemble. With
    --compile it probes compiled too; where torch.compile fails it trains eagerly."""
    from diffusers import StableDiffusionPipeline

    from booth.mini.render import data_home

    monkeypatch.setenv("BOOTH_DATA_HOME", str(data_home()))
    _failing_compile(monkeypatch)
    tool, files, pipe_dir = _gpu_tool(), tmp_path / "files", tmp_path / "pipe"
    monkeypatch.setattr(tool, "CARRY", tmp_path / "carry")  # no carried CLIP: the reused pipeline's
    common = ["--preset", "tiny", "--reuse", str(exported), "--data", str(data_dir), "--out", str(files)]
    tool.main(
        ["run", *common, "--batch", "16", "--probe", "4", "--minutes", "0.02", "--scratch", str(tmp_path)]
        + ["--compile"]
    )
    printed = capsys.readouterr().out
    assert "probe, compiled: torch.compile failed on this machine" in printed and "steps, eager" in printed
    assert not (tmp_path / "probe-compiled" / "unet" / "checkpoint.pt").exists()
    assert [r["compiled"] for r in read_log(tmp_path / "run", "unet") if r.get("event") == "chunk"] == [[]]
    assert sorted(p.name for p in files.iterdir()) == [
        "meta.tar",
        "text_encoder.safetensors",
        "unet.safetensors",
    ]
    with tarfile.open(files / "meta.tar") as tar:
        assert not {Path(n).parts[0] for n in tar.getnames()} & {"clip", "vae"}
    log = read_log(tmp_path / "run", "unet")
    steps = [r for r in log if "loss" in r]
    assert (
        steps
        and len(steps)
        == json.loads((tmp_path / "run" / "config.json").read_text())["config"]["unet"]["optim"]["steps"]
    )
    tool.main(["assemble", str(files), "--base", str(exported), "--out", str(pipe_dir)])
    assert (
        load_file(pipe_dir / "unet" / "diffusion_pytorch_model.safetensors").keys()
        == load_file(files / "unet.safetensors").keys()
    )
    assert (pipe_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        files / "unet.safetensors"
    ).read_bytes()
    assert (pipe_dir / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        exported / "vae" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    training = json.loads((pipe_dir / "training.json").read_text())
    assert (
        training["config"]["unet"]["optim"]["batch_size"] == 16 and training["config"]["name"] == "tiny-gpu"
    )
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    image = pipe("a dog", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    with pytest.raises(SystemExit, match="not the output of"):
        tool.main(["assemble", str(tmp_path), "--out", str(tmp_path / "other")])


def _other_clip(folder: Path) -> Path:
    """A tiny mini-CLIP unlike the trained one (another seed's initialisation), saved in fp32 as a clip
    stage's final/ folder."""
    A.build_clip(TINY.arch.clip, seed=1).save_pretrained(folder, safe_serialization=True)
    return folder


def test_the_gpu_tool_carries_a_clip_in_fp16(tmp_path, monkeypatch):
    """prepare --clip: the CLIP written as an export writes clip/ (fp16, tokenizer, image processor) into
    the carry; a carry past the device's limit stops, saying what is too big."""
    from transformers import CLIPModel, CLIPTokenizer

    tool, source = _gpu_tool(), _other_clip(tmp_path / "final")
    folder = tool.carry_clip(source, tmp_path / "carry" / "clip")
    stored = load_file(folder / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    fp32 = load_file(source / "model.safetensors")
    assert stored.keys() == fp32.keys() and all(torch.equal(stored[k], fp32[k].half()) for k in fp32)
    loaded = CLIPModel.from_pretrained(folder)
    assert loaded.config.text_config.vocab_size == A.vocab_size(TINY.arch.clip)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert tokenizer.vocab_size == A.vocab_size(TINY.arch.clip)
    assert json.loads((folder / "preprocessor_config.json").read_text())["crop_size"]["height"] == (
        TINY.arch.clip.image_size
    )
    tool.check_carry(tmp_path / "carry")  # fits
    monkeypatch.setattr(tool, "CARRY_LIMIT", 1)
    with pytest.raises(SystemExit, match=r"too big to carry: .*clip/ 0\.\d MiB.*repository's files"):
        tool.check_carry(tmp_path / "carry")


@needs_data
def test_the_gpu_tool_trains_on_a_carried_clip_and_brings_it_back(data_dir, exported, tmp_path, monkeypatch):
    """A CLIP in .carry/clip: run adopts it (the UNet stage's text encoder starts from its text tower),
    meta.tar brings its clip/ back and assemble puts it in the pipeline."""
    import hashlib

    from transformers import CLIPModel

    from booth.mini.render import data_home

    monkeypatch.setenv("BOOTH_DATA_HOME", str(data_home()))
    tool, files, pipe_dir = _gpu_tool(), tmp_path / "files", tmp_path / "pipe"
    monkeypatch.setattr(tool, "CARRY", tmp_path / "carry")
    carried = tool.carry_clip(_other_clip(tmp_path / "final"), tmp_path / "carry" / "clip")
    common = ["--preset", "tiny", "--reuse", str(exported), "--data", str(data_dir), "--out", str(files)]
    tool.main(["run", *common, "--batch", "8", "--steps", "2", "--scratch", str(tmp_path / "scratch")])
    work = tmp_path / "scratch" / "run"
    done = json.loads((work / "clip" / DONE).read_text())
    new = carried / "model.safetensors"
    assert done["weights_sha256"] == hashlib.sha256(new.read_bytes()).hexdigest()
    tower = {k: v for k, v in load_file(new).items() if k.startswith("text_model.")}
    old = load_file(exported / "clip" / "model.safetensors")
    encoder = load_file(files / "text_encoder.safetensors")

    def distance(weights: dict) -> float:
        return sum((encoder[k].float() - weights[k].float()).norm() ** 2 for k in tower) ** 0.5

    assert distance(tower) < distance(old) / 5  # trained 2 steps from the carried tower, not the bundled one
    with tarfile.open(files / "meta.tar") as tar:
        names = set(tar.getnames())
    assert "clip/model.safetensors" in names and not any(n.startswith("vae/") for n in names)
    base = Path(shutil.copytree(exported, tmp_path / "base"))
    (base / "clip" / "stale.bin").write_bytes(b"the base's")  # a file the run's clip/ does not have
    tool.main(["assemble", str(files), "--base", str(base), "--out", str(pipe_dir)])
    assert sorted(f"clip/{p.name}" for p in (pipe_dir / "clip").iterdir()) == sorted(
        n for n in names if n.startswith("clip/")
    )
    assembled, carried_weights = load_file(pipe_dir / "clip" / "model.safetensors"), load_file(new)
    assert assembled.keys() == carried_weights.keys() == old.keys()
    assert all(torch.equal(assembled[k], v) for k, v in carried_weights.items())
    assert not all(torch.equal(assembled[k], old[k]) for k in old)  # not the base's
    assert CLIPModel.from_pretrained(pipe_dir / "clip").config.projection_dim == TINY.arch.clip.projection_dim


@needs_data
def test_export_layout_fp16_and_card(exported, trained):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    for path in exported.rglob("*.safetensors"):
        assert {t.dtype for t in load_file(path).values()} == {torch.float16}, path
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (exported / "tokenizer").iterdir()}
    vae = json.loads((exported / "vae" / "config.json").read_text())
    done = json.loads((trained / "vae" / "done.json").read_text())
    assert vae["scaling_factor"] == pytest.approx(done["scaling_factor"]) and vae["scaling_factor"] != 1.0
    card = (exported / "README.md").read_text()
    assert "## Training" in card and "cpu:" in card and "6 x 8" in card and "not measured yet" in card
    assert "OpenMoji" in (exported / "ATTRIBUTION.md").read_text()
    assert (
        "--preset tiny" in card and "pairs 8 images" in card and "Every stage trained on `train` only" in card
    )
    training = json.loads((exported / "training.json").read_text())
    assert training["config"] == TINY.to_json() and training["seed"] == 0
    assert training["dataset"]["train_checksum"] == load_split(training["dataset"]["path"]).checksum
    assert not list(exported.parent.glob(".booth-mini.tmp-*"))


@needs_data
def test_exported_text_encoder_is_the_one_the_unet_stage_fine_tuned(exported, trained):
    """TINY trains the text encoder with the UNet: the pipeline ships that encoder, the evaluator keeps CLIP's."""
    from transformers import CLIPModel, CLIPTextModel

    assert TINY.unet.train_text_encoder
    tuned = CLIPTextModel.from_pretrained(final_dir(trained, "unet") / "text_encoder")
    expected = {
        (k if k.startswith("text_model.") else f"text_model.{k}"): v.half()
        for k, v in tuned.state_dict().items()
    }
    stored = load_file(exported / "text_encoder" / "model.safetensors")
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    loaded = CLIPTextModel.from_pretrained(exported / "text_encoder")
    assert loaded.dtype == torch.float32
    trained_clip = CLIPModel.from_pretrained(final_dir(trained, "clip"))
    evaluator = CLIPModel.from_pretrained(exported / "clip")
    tower = {f"text_model.{k}": v.half() for k, v in trained_clip.text_model.state_dict().items()}
    assert all(torch.equal(evaluator.text_model.state_dict()[k[11:]].half(), v) for k, v in tower.items())
    assert any(not torch.equal(stored[k], tower[k]) for k in tower)  # the UNet stage moved the encoder


@needs_data
def test_export_checkpoint_writes_the_run_s_own_architecture_mid_run(trained, tmp_path, capsys):
    """`booth mini export --checkpoint`: a pipeline of the UNet stage's checkpoint in the run's own shapes (TINY's
    UNet and text encoder are not the bundled model's; the tool it replaces copied the bundled folder and
    failed on them), loadable with plain diffusers; --out is required."""
    from diffusers import StableDiffusionPipeline

    from booth.cli import main
    from booth.mini.train import unet_checkpoint_weights

    out = tmp_path / "at-checkpoint"
    assert main(["mini", "export", "--checkpoint", "--work", str(trained)]) == 2
    assert "--checkpoint needs --out" in capsys.readouterr().err
    assert main(["mini", "export", "--checkpoint", "--work", str(trained), "--out", str(out)]) == 0
    state = torch.load(trained / "unet" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert f"at step {state['step']} to" in capsys.readouterr().out
    parts = unet_checkpoint_weights(state)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert tuple(pipe.unet.config.block_out_channels) == TINY.arch.unet.block_out_channels
    unet = pipe.unet.state_dict()
    assert all(torch.equal(unet[k], v.half().float()) for k, v in parts["unet"].items())
    encoder = pipe.text_encoder.state_dict()
    assert all(torch.equal(encoder[k], v.half().float()) for k, v in parts["text_encoder"].items())
    assert json.loads((out / "training.json").read_text())["checkpoint_step"] == state["step"]
    assert f"step {state['step']} of {TINY.unet.optim.steps}" in (out / "README.md").read_text()
    assert (out / "clip" / "config.json").is_file()
    image = pipe("a dog", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


@needs_data
def test_exports_refuse_a_folder_that_is_not_a_pipeline_and_a_bad_checkpoint(trained, tmp_path):
    """An export replaces its --out whole, so a folder of the user's other files is refused and kept; a
    truncated checkpoint is a one-line error."""
    from booth.mini.export import export_checkpoint, export_pipeline

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for export in (export_pipeline, export_checkpoint):
        with pytest.raises(BoothError, match="refusing to replace .*not a diffusers pipeline folder"):
            export(trained, mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    work = tmp_path / "work"
    work.mkdir()
    for name in ("config.json", "dataset.json"):
        shutil.copy(trained / name, work / name)
    for stage in ("clip", "vae"):
        shutil.copytree(trained / stage, work / stage)
    with pytest.raises(BoothError, match="has no UNet checkpoint"):
        export_checkpoint(work, tmp_path / "out")
    (work / "unet").mkdir()
    (work / "unet" / "checkpoint.pt").write_bytes((trained / "unet" / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(BoothError, match="cannot read .* as a UNet-stage checkpoint"):
        export_checkpoint(work, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_data
def test_frozen_text_encoder_rides_along_unchanged(data_dir, trained):
    """Without train_text_encoder the encoder gets no gradient and the export would copy CLIP's tower."""
    frozen = replace(TINY, unet=replace(TINY.unet, train_text_encoder=False))
    task = build_task("unet", frozen, load_split(data_dir), torch.device("cpu"), 0, trained)
    before = {k: v.clone() for k, v in task.model.text_encoder.state_dict().items()}
    loss, _ = task.loss(torch.arange(4), torch.Generator().manual_seed(0), None)
    loss.backward()
    assert all(p.grad is None for p in task.model.text_encoder.parameters())
    assert any(p.grad is not None for p in task.model.unet.parameters())
    assert all(torch.equal(before[k], v) for k, v in task.model.text_encoder.state_dict().items())


@needs_data
def test_clip_evaluator_scores_images(exported, data_dir):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(exported / "clip")
    processor = CLIPProcessor.from_pretrained(exported / "clip")
    image = Image.open(data_dir / "test" / "000000.png")
    inputs = processor(text=["a dog", "a cat"], images=[image], return_tensors="pt", padding=True)
    assert model(**inputs).logits_per_image.shape == (1, 2)


@needs_data
def test_cli_builds_data_trains_in_chunks_and_exports(tmp_path):
    from booth.mini.train_cli import add_train_commands

    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers(dest="command"))
    base = ["train", "--preset", "tiny", "--no-progress", "--data", str(tmp_path / "data")]
    base += ["--work", str(tmp_path / "work"), "--export", str(tmp_path / "out")]
    args = parser.parse_args([*base, "--steps", "8"])
    assert args.func(args) == 0 and not (tmp_path / "out").exists()  # clip done, vae at 2/6
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["splits"]["train"] == 64
    args = parser.parse_args(base)
    assert args.func(args) == 0
    assert (tmp_path / "out" / "model_index.json").is_file()


@needs_data
def test_a_single_stage_call_exports_only_when_asked(data_dir, trained, tmp_path, monkeypatch, capsys):
    """`--stage vae` on a folder whose other stages are done must not replace the bundled weights (the new VAE
    need not fit the old UNet); with --export it writes there."""
    from booth.mini import train_cli

    bundled = tmp_path / "bundled"
    monkeypatch.setattr(train_cli, "_default_export", lambda: bundled)
    work = tmp_path / "work"
    shutil.copytree(trained, work)
    parser = argparse.ArgumentParser()
    train_cli.add_train_commands(parser.add_subparsers(dest="command"))
    base = ["train", "--stage", "vae", "--no-progress", "--data", str(data_dir), "--work", str(work)]
    args = parser.parse_args(base)
    assert args.func(args) == 0 and not bundled.exists()
    assert "booth mini export --work" in capsys.readouterr().out
    args = parser.parse_args([*base, "--export", str(tmp_path / "out")])
    assert args.func(args) == 0 and (tmp_path / "out" / "model_index.json").is_file()
    args = parser.parse_args(base[:1] + base[3:])  # all stages (the default): the bundled folder, as before
    assert args.func(args) == 0 and (bundled / "model_index.json").is_file()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_its_json(name):
    config = PRESETS[name]
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_a_recipe_file_that_is_not_a_config_is_a_user_error(tmp_path):
    from booth.mini.train import read_run_config

    bad = tmp_path / "bad.json"
    for text, message in (
        ("{", "cannot read"),
        ("[1, 2]", "not a booth-mini training config"),
        ('{"config": {"name": "x"}}', "not a booth-mini training config"),
        (json.dumps({"config": TINY.to_json(), "seed": "one"}), "not a booth-mini training config"),
    ):
        bad.write_text(text)
        with pytest.raises(BoothError, match=message):
            read_run_config(bad)
    recipe = TINY.to_json()
    recipe["vae"]["colour"] = 1  # an unknown setting is refused, not dropped
    bad.write_text(json.dumps(recipe))
    with pytest.raises(BoothError, match="colour"):
        read_run_config(bad)


@needs_data
def test_cli_trains_a_recipe_file_and_resumes_with_the_work_folders_own(data_dir, tmp_path):
    from booth.mini.train_cli import add_train_commands

    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers(dest="command"))
    recipe = TINY.to_json()
    recipe["clip"]["optim"]["steps"] = 3  # not a preset
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    work = tmp_path / "work"
    base = ["train", "--stage", "clip", "--no-progress", "--data", str(data_dir), "--work", str(work)]
    args = parser.parse_args(
        [*base, "--config", str(tmp_path / "recipe.json"), "--steps", "2", "--seed", "3"]
    )
    assert args.func(args) == 0 and not is_finished(work, "clip")
    assert json.loads((work / "config.json").read_text()) == {"config": recipe, "seed": 3}
    args = parser.parse_args(base)  # no --preset, --config or --seed: the folder's own recipe and seed
    assert args.func(args) == 0 and is_finished(work, "clip")
    assert json.loads((work / "clip" / DONE).read_text())["steps"] == 3
    args = parser.parse_args([*base[:2], "vae", *base[3:], "--preset", "tiny"])  # not the folder's: refused
    with pytest.raises(BoothError, match="another configuration"):
        args.func(args)
