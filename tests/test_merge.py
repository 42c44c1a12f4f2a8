"""`booth merge` / `booth compress`: the closed-form Custom Diffusion merge satisfies its constraint and stays closer
to the base model on generic text than averaging; its errors; SVD compression; LoRA sum and concatenation."""

from __future__ import annotations

import json

import pytest
import torch

from booth.errors import BoothError
from booth.train.formats.custom_diffusion import (
    CustomDiffusionWeights,
    base_fingerprint,
    load_custom_diffusion,
    pretrained_weights,
    read_custom_diffusion,
    write_custom_diffusion,
)
from booth.train.merge import (
    PHOTO_PREFIX,
    _with_tokens,
    compress_custom_diffusion,
    kept_rank,
    merge_custom_diffusion,
    merge_lora,
    regularization_prompts,
    token_features,
)

WIDE = 128  # text width of the merge model (see `wide_sd1_dir`)


def load(model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)


@pytest.fixture(scope="module")
def wide_sd1_dir(tmp_path_factory):
    """The tiny SD1 pipeline with a 128-wide text encoder / cross-attention instead of 32.

    The merge's comparison with naive averaging needs room: in a 32-wide text space the 12 target rows of two
    concepts span 3/8 of the space, so meeting them moves the regularisation outputs too, and the merge changed
    those less than the average in only 1 of 6 measured runs (3 seeds x 2 learning rates); at 128 wide (12 rows
    in 128, nearer SD's 12 in 768) it did in all 6, by 1.3-5x.
    """
    from diffusers import StableDiffusionPipeline

    from booth.models import tiny
    from booth.models.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(tiny.TINY_MERGES)
    pipe = StableDiffusionPipeline(
        vae=tiny._vae(0),
        text_encoder=tiny._text_encoder(tokenizer, WIDE),
        tokenizer=tokenizer,
        unet=tiny._unet(WIDE),
        scheduler=tiny._scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = tmp_path_factory.mktemp("wide-sd1")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, wide_sd1_dir):
    """Two Custom Diffusion runs on the wide model: "<new1> house" and "<new2> ball" (one-token nouns)."""
    from PIL import Image, ImageDraw

    from booth.train import DataConfig, OptimConfig, TrainConfig, train
    from booth.train.config import TokenConfig

    root = tmp_path_factory.mktemp("cd-merge")
    runs = []
    for i, (token, noun, colour) in enumerate(
        [("<new1>", "house", (200, 30, 30)), ("<new2>", "ball", (30, 200, 30))]
    ):
        images = root / f"images{i}"
        images.mkdir()
        for j in range(2):
            image = Image.new("RGB", (32, 32), colour)
            ImageDraw.Draw(image).rectangle((4 + 4 * j, 4, 20, 24), fill=(20, 20, 220 - 100 * i))
            image.save(images / f"{j}.png")
        cfg = TrainConfig(
            method="custom-diffusion",
            out=root / f"run{i}",
            model=str(wide_sd1_dir),
            steps=3,
            seed=i,
            optim=OptimConfig(lr=1e-2),
            data=DataConfig(images=images, instance_prompt=f"a {token} {noun}"),
            tokens=TokenConfig(placeholder=token),
        )
        runs.append(train(cfg, progress=False).out)
    return runs


def test_merge_satisfies_the_constraint_and_beats_averaging(adapters, wide_sd1_dir, tmp_path):
    pipe = load(wide_sd1_dir)
    vocab = len(pipe.tokenizer)
    prompts = regularization_prompts()
    assert 150 <= len(prompts) <= 250 and len(set(prompts)) == len(prompts)
    result = merge_custom_diffusion(adapters, prompts, pipe, tmp_path / "merged")
    assert len(pipe.tokenizer) == vocab  # the caller's pipeline is left as it was
    assert result.targets == ["<new1> house", "<new2> ball"]
    assert result.target_rows == 12  # (<newN>, noun, EOS) x [t, "photo of a " + t] x 2 concepts
    assert result.constraint_error < 1e-4 and len(result.layers) == 8
    assert result.reg_change < result.average_reg_change, (result.reg_change, result.average_reg_change)

    # recompute both sides from the written files, independently of the merge's own bookkeeping
    merged = read_custom_diffusion(result.files["custom_diffusion"])
    assert set(merged.tokens) == {"<new1>", "<new2>"}
    models = [read_custom_diffusion(a) for a in adapters]
    base = pretrained_weights(pipe.unet)
    with _with_tokens(pipe, merged.tokens) as (tokenizer, encoder):
        skip = len(tokenizer("photo of a", add_special_tokens=False).input_ids)
        c_reg = token_features(tokenizer, encoder, prompts, [0] * len(prompts))
        targets = [
            token_features(tokenizer, encoder, [t, PHOTO_PREFIX + t], [0, skip]) for t in result.targets
        ]
    merged_change = average_change = reference = 0.0
    for name in merged.layers:
        w0 = base[name].double()
        w_hat = merged.weight(name, base).double()
        own = [m.weight(name, base).double() for m in models]
        for w_n, c_n in zip(own, targets):  # Ŵ reproduces each concept's own outputs on its target tokens
            torch.testing.assert_close(w_hat @ c_n.T, w_n @ c_n.T, rtol=1e-4, atol=1e-5)
        merged_change += float(((w_hat - w0) @ c_reg.T).norm()) ** 2
        average_change += float(((sum(own) / 2 - w0) @ c_reg.T).norm()) ** 2
        reference += float((w0 @ c_reg.T).norm()) ** 2
        # Ŵ is the least change on C_reg among weights meeting the constraint: e.g. the average projected onto it
        c = torch.cat(targets)
        v = torch.cat([own[0] @ targets[0].T, own[1] @ targets[1].T], dim=1)
        avg = sum(own) / 2
        projected = avg + (v - avg @ c.T) @ torch.linalg.solve(c @ c.T, c)
        assert ((w_hat - w0) @ c_reg.T).norm() <= ((projected - w0) @ c_reg.T).norm() * (1 + 1e-6)
    assert merged_change < average_change
    assert abs((merged_change / reference) ** 0.5 - result.reg_change) < 1e-3

    # the merged model generates with both tokens, through booth's loader and diffusers' files
    fresh = load(wide_sd1_dir)
    load_custom_diffusion(fresh, tmp_path / "merged")
    assert {"<new1>", "<new2>"} <= set(fresh.tokenizer.get_vocab())
    assert (tmp_path / "merged" / "<new2>.safetensors").exists()


def fake_adapter(folder, pipe, token, target, seed, fingerprint=None, source=""):
    """A Custom Diffusion file with random K/V deltas (for the checks that need no training)."""
    gen = torch.Generator().manual_seed(seed)
    layers = {n: torch.randn(w.shape, generator=gen) * 0.05 for n, w in pretrained_weights(pipe.unet).items()}
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    meta = {
        "booth.base_fingerprint": fingerprint or base_fingerprint(pipe.unet),
        "booth.base_model": "tiny",
        "booth.base_model_source": source,
        "booth.targets": json.dumps([target]),
    }
    tokens = {token: torch.randn(width, generator=gen)} if token else {}
    write_custom_diffusion(folder, "adapter", CustomDiffusionWeights(layers, tokens, meta), pipe.unet)
    return folder


def test_merge_errors(tmp_path, tiny_sd1_dir):
    from booth.models.tiny import tiny_pipeline

    pipe = load(tiny_sd1_dir)
    prompts = regularization_prompts()
    a = fake_adapter(tmp_path / "a", pipe, "<new1>", "<new1> house", 1)
    b = fake_adapter(tmp_path / "b", pipe, "<new1>", "<new1> ball", 2)
    with pytest.raises(
        BoothError, match=r"both adapters use <new1> .*retrain one with --placeholder-token <new2>$"
    ):
        merge_custom_diffusion([a, b], prompts, pipe, tmp_path / "out")
    other = tiny_pipeline("sd1", seed=5)
    c = fake_adapter(
        tmp_path / "c", pipe, "<new2>", "<new2> ball", 3, fingerprint=base_fingerprint(other.unet)
    )
    with pytest.raises(BoothError, match="different base models"):
        merge_custom_diffusion([a, c], prompts, pipe, tmp_path / "out")
    with pytest.raises(BoothError, match="not on the loaded model"):
        merge_custom_diffusion([a, b], prompts, other, tmp_path / "out")
    with pytest.raises(BoothError, match="at least two"):
        merge_custom_diffusion([a], prompts, pipe, tmp_path / "out")
    d = fake_adapter(tmp_path / "d", pipe, "<new2>", "<new2> ball", 4)
    with pytest.raises(BoothError, match="cannot constrain"):  # 4 feature rows for a 32-wide text space
        merge_custom_diffusion([a, d], ["a", "b"], pipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compression_error_falls_with_energy(adapters, wide_sd1_dir, tmp_path):
    assert kept_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.6) == 2  # shares .4 .7 .9 1: the first above 0.6
    assert kept_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.39) == 1
    assert kept_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 1.0) == 4
    results = {
        e: compress_custom_diffusion(adapters[0], tmp_path / f"e{e}.booth-cd.safetensors", e)
        for e in (0.3, 0.6, 0.9, 1.0)
    }
    errors = [results[e].error for e in (0.3, 0.6, 0.9)]
    assert errors[0] > errors[1] > errors[2] > 0 and results[1.0].error < 1e-6
    r = results[0.6]
    assert r.size_out < r.size_in and len(r.layers) == 8
    for k, full, err in r.layers.values():
        assert 1 <= k < full and 0 < err < 1
    # a compressed file loads like the full one, up to its reconstruction error
    full, small, exact = load(wide_sd1_dir), load(wide_sd1_dir), load(wide_sd1_dir)
    load_custom_diffusion(full, adapters[0])
    load_custom_diffusion(small, r.path)
    load_custom_diffusion(exact, results[1.0].path)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def predict(pipe):
        ids = pipe.tokenizer(
            ["a <new1> house"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample

    torch.testing.assert_close(predict(exact), predict(full), atol=1e-5, rtol=1e-4)
    assert (predict(small) - predict(full)).abs().max() > 0
    with pytest.raises(BoothError, match="--energy"):
        compress_custom_diffusion(adapters[0], tmp_path / "x.booth-cd.safetensors", 0)


def test_cli_merge_and_compress(adapters, tmp_path, capsys):
    from booth.cli import main

    out = tmp_path / "merged"
    assert main(["merge", str(adapters[0]), str(adapters[1]), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "constraint error" in text and (out / "merged.booth-cd.safetensors").exists()
    assert (
        main(["compress", str(out), "--out", str(tmp_path / "small.booth-cd.safetensors"), "--energy", "0.5"])
        == 0
    )
    assert "relative error" in capsys.readouterr().out
    assert main(["merge", str(adapters[0]), "--out", str(tmp_path / "x")]) == 2
    assert (
        main(["merge", str(adapters[0]), str(adapters[1]), "--weights", "1,1", "--out", str(tmp_path / "x")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "at least two" in err[0] and "--weights" in err[1]


# --- LoRA -------------------------------------------------------------------------------------------------------


def lora_files(folder, rank, alpha, seed):
    """A tiny SD1 pipeline with a random UNet + text-encoder LoRA, saved by booth (diffusers + kohya files)."""
    from peft import LoraConfig

    from booth.models.tiny import tiny_pipeline
    from booth.train.formats.lora import attach_lora_adapter, save_lora

    pipe = tiny_pipeline("sd1")
    for component, targets in (
        ("unet", ["to_q", "to_k", "to_v", "to_out.0"]),
        ("text_encoder", ["q_proj", "v_proj"]),
    ):
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
        attach_lora_adapter(getattr(pipe, component), config)
    gen = torch.Generator().manual_seed(seed)
    for component in ("unet", "text_encoder"):
        for name, param in getattr(pipe, component).named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=gen) * 0.2
    return save_lora(folder, pipe, name=f"l{seed}", alpha=alpha, rank=rank)


def kohya_deltas(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(path))
    out = {}
    for key in state:
        if key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            down, up = state[key].double(), state[f"{stem}.lora_up.weight"].double()
            out[stem] = float(state[f"{stem}.alpha"]) / down.shape[0] * (up @ down)
    return out


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return lora_files(root / "a", 4, 2.0, 1), lora_files(root / "b", 2, 1.0, 2)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_lora_concat_is_exactly_the_weighted_sum(loras, tmp_path, tiny_sd1_dir):
    a, b = loras
    result = merge_lora([a["kohya"], b["diffusers"]], [0.7, -0.5], tmp_path / "cat", "concat")
    assert result.rank == 6 and set(result.files) == {"kohya", "diffusers"}
    want_a, want_b = kohya_deltas(a["kohya"]), kohya_deltas(b["kohya"])
    got = kohya_deltas(result.files["kohya"])
    assert set(got) == set(want_a)
    for name in got:
        torch.testing.assert_close(got[name], 0.7 * want_a[name] + -0.5 * want_b[name], atol=1e-6, rtol=1e-5)
    # diffusers loads the merged diffusers file with the same effect as both adapters at those weights
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(1))

    def predict(pipe):
        with torch.no_grad():
            return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample

    merged, both = load(tiny_sd1_dir), load(tiny_sd1_dir)
    merged.load_lora_weights(
        str(result.files["diffusers"].parent), weight_name=result.files["diffusers"].name
    )
    both.load_lora_weights(str(a["kohya"].parent), weight_name=a["kohya"].name, adapter_name="a")
    both.load_lora_weights(str(b["diffusers"].parent), weight_name=b["diffusers"].name, adapter_name="b")
    both.set_adapters(["a", "b"], adapter_weights=[0.7, -0.5])
    torch.testing.assert_close(predict(merged), predict(both), atol=1e-5, rtol=1e-4)


def test_lora_sum_refactors_by_svd(loras, tmp_path):
    a, b = loras
    same = merge_lora([a["kohya"], a["diffusers"]], [0.5, 0.5], tmp_path / "same", "sum")
    assert same.rank == 4 and same.max_error < 1e-5  # one adapter with itself: rank 4 is exact
    want = kohya_deltas(a["kohya"])
    for name, delta in kohya_deltas(same.files["kohya"]).items():
        torch.testing.assert_close(delta, want[name], atol=1e-6, rtol=1e-5)
    lossy = merge_lora([a["kohya"], b["kohya"]], None, tmp_path / "lossy", "sum")
    assert lossy.rank == 4 and lossy.max_error > 1e-3  # rank 4 + 2 -> 4: the best rank-4 approximation
    exact = merge_lora([a["kohya"], b["kohya"]], None, tmp_path / "exact", "sum", rank=6)
    assert exact.max_error < 1e-5
    concat = kohya_deltas(
        merge_lora([a["kohya"], b["kohya"]], None, tmp_path / "cat", "concat").files["kohya"]
    )
    for name, delta in kohya_deltas(exact.files["kohya"]).items():
        torch.testing.assert_close(delta, concat[name], atol=1e-6, rtol=1e-5)
    with pytest.raises(BoothError, match="weights"):
        merge_lora([a["kohya"], b["kohya"]], [1.0], tmp_path / "bad", "sum")


# --- Custom Diffusion as A1111 files -----------------------------------------------------------------------------


def test_custom_diffusion_exports_as_kohya_lora_and_embedding_that_diffusers_loads(
    adapters, wide_sd1_dir, tmp_path
):
    """Booth's Custom Diffusion loader and diffusers' own LoRA + textual-inversion loaders give the same UNet output
    on "<new1> house" written the A1111 way; a lossy export differs; bad input is refused."""
    from booth.train.merge import export_custom_diffusion_a1111

    result = export_custom_diffusion_a1111(adapters[0], tmp_path / "a1111", "house")
    assert result.error < 1e-6 and result.words == {"<new1>": "house-new1"}
    assert (
        result.lora.name == "house.safetensors"
        and result.embeddings["<new1>"].name == "house-new1.safetensors"
    )
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def predict(pipe, prompt):
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample

    booth_pipe, diffusers_pipe = load(wide_sd1_dir), load(wide_sd1_dir)
    load_custom_diffusion(booth_pipe, adapters[0])
    diffusers_pipe.load_lora_weights(str(result.lora.parent), weight_name=result.lora.name)
    diffusers_pipe.load_textual_inversion(str(result.embeddings["<new1>"]), token="house-new1")
    want = predict(booth_pipe, "a <new1> house")
    torch.testing.assert_close(predict(diffusers_pipe, "a house-new1 house"), want, atol=1e-4, rtol=1e-3)
    assert (predict(load(wide_sd1_dir), "a house") - want).abs().max() > 1e-3  # the adapter matters

    lossy = export_custom_diffusion_a1111(adapters[0], tmp_path / "lossy", "house", energy=0.3)
    assert 0 < lossy.error < 1 and lossy.max_rank < result.max_rank
    with pytest.raises(BoothError, match="--name"):
        export_custom_diffusion_a1111(adapters[0], tmp_path / "bad", "../house")
    with pytest.raises(BoothError, match="--energy"):
        export_custom_diffusion_a1111(adapters[0], tmp_path / "bad", "house", energy=0)
