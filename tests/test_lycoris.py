"""LyCORIS networks (LoHa, LoKr, Tucker LoCon, full) at generation: ΔW by each algorithm's formula, both kohya
UNet namings, weights patched with the prompt's multipliers and put back bit for bit, and clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from booth.errors import BoothError
from booth.generate.metadata import parse_infotext
from booth.generate.networks import LoraNetwork, lora_list
from booth.generate.params import GenerationParams
from booth.prompts import ExtraNetworkRegistry
from booth.train.formats.lycoris import delta_weight, module_map

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # a Linear of the tiny UNet
CONV = "down_blocks.0.resnets.0.conv1"  # a 3x3 Conv2d
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"  # kohya's name: transformers 4.x paths


def te_layer(pipe):
    """The text encoder's first q_proj (transformers 5 dropped the `text_model.` level)."""
    try:
        return pipe.text_encoder.get_submodule(TE_Q)
    except AttributeError:
        return pipe.text_encoder.get_submodule(TE_Q.removeprefix("text_model."))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def loha(out, inp, r=2, alpha=1.0, k=None, seed=0):
    size = inp * k * k if k else inp
    return {"hada_w1_a": randn(out, r, seed=seed), "hada_w1_b": randn(r, size, seed=seed + 1),
            "hada_w2_a": randn(out, r, seed=seed + 2), "hada_w2_b": randn(r, size, seed=seed + 3),
            "alpha": torch.tensor(alpha)}  # fmt: skip


def kohya(name: str, component: str = "lora_unet") -> str:
    return f"{component}_{name.replace('.', '_')}"


def save(path, modules: dict[str, dict[str, torch.Tensor]]):
    save_file(
        {f"{m}.{part}": v.contiguous() for m, parts in modules.items() for part, v in parts.items()}, path
    )
    return path


def test_loha_is_the_hadamard_product_of_two_low_rank_products():
    p = loha(6, 5, r=2, alpha=1.0)
    expected = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * (1.0 / 2)
    torch.testing.assert_close(delta_weight(p, torch.Size([6, 5])), expected)
    conv = loha(6, 5, r=2, alpha=2.0, k=3)
    w = (conv["hada_w1_a"] @ conv["hada_w1_b"]) * (conv["hada_w2_a"] @ conv["hada_w2_b"])
    torch.testing.assert_close(delta_weight(conv, torch.Size([6, 5, 3, 3])), w.reshape(6, 5, 3, 3))


def test_lokr_is_a_kronecker_product_scaled_by_its_factor_rank():
    w1, w2a, w2b = randn(2, 3, seed=1), randn(4, 2, seed=2), randn(2, 5, seed=3)
    parts = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)}
    torch.testing.assert_close(delta_weight(parts, torch.Size([8, 15])), torch.kron(w1, w2a @ w2b) * 0.5)
    full = {"lokr_w1": w1, "lokr_w2": randn(4, 5, seed=4), "alpha": torch.tensor(3.0)}  # no rank: scale 1
    torch.testing.assert_close(delta_weight(full, torch.Size([8, 15])), torch.kron(w1, full["lokr_w2"]))
    conv = {"lokr_w1": w1, "lokr_w2": randn(4, 5, 3, 3, seed=5)}
    expected = torch.kron(w1[:, :, None, None], conv["lokr_w2"])
    torch.testing.assert_close(delta_weight(conv, torch.Size([8, 15, 3, 3])), expected)


def test_tucker_locon_contracts_up_mid_and_down():
    up, mid, down = randn(6, 2, 1, 1, seed=1), randn(2, 2, 3, 3, seed=2), randn(2, 5, 1, 1, seed=3)
    parts = {
        "lora_up.weight": up,
        "lora_mid.weight": mid,
        "lora_down.weight": down,
        "alpha": torch.tensor(2.0),
    }
    expected = torch.zeros(6, 5, 3, 3)
    for o in range(6):
        for i in range(5):
            expected[o, i] = sum(
                up[o, a, 0, 0] * mid[a, b] * down[b, i, 0, 0] for a in range(2) for b in range(2)
            )
    torch.testing.assert_close(delta_weight(parts, torch.Size([6, 5, 3, 3])), expected)


def test_both_kohya_unet_namings_find_the_same_layer(sd1_engine):
    names = module_map(sd1_engine.pipe)
    unet = sd1_engine.pipe.unet
    assert names[kohya(Q)][1] is unet.get_submodule(Q)
    assert names["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"][1] is unet.get_submodule(Q)
    assert names["lora_unet_input_blocks_1_0_in_layers_2"][1] is unet.get_submodule(CONV)
    assert names[kohya(TE_Q, "lora_te")] == ("text_encoder", te_layer(sd1_engine.pipe))


@pytest.fixture
def lycoris_dir(sd1_engine, tmp_path):
    unet = sd1_engine.pipe.unet
    q, conv, te_q = unet.get_submodule(Q), unet.get_submodule(CONV), te_layer(sd1_engine.pipe)
    save(tmp_path / "style.safetensors", {
        kohya(Q): loha(q.out_features, q.in_features, seed=1),
        "lora_unet_input_blocks_1_0_in_layers_2": loha(conv.out_channels, conv.in_channels, k=3, seed=5),
        kohya(TE_Q, "lora_te"): {"diff": randn(*te_q.weight.shape, seed=9), "diff_b": randn(te_q.out_features, seed=10)},
    })  # fmt: skip
    return tmp_path


def test_a_lycoris_file_patches_the_weights_with_the_prompts_multipliers_and_comes_off(
    sd1_engine, lycoris_dir
):
    pipe = sd1_engine.pipe
    layers = {n: pipe.unet.get_submodule(n) for n in (Q, CONV)} | {TE_Q: te_layer(pipe)}
    before = {n: (m.weight.clone(), None if m.bias is None else m.bias.clone()) for n, m in layers.items()}
    from booth.train.formats.lycoris import read_lycoris

    parts = read_lycoris(lycoris_dir / "style.safetensors")
    previous = sd1_engine.extra_networks
    sd1_engine.extra_networks = ExtraNetworkRegistry([LoraNetwork([lycoris_dir])])
    params = GenerationParams(prompt="a cat", steps=2, seed=3, sampler_name="Euler")
    try:
        plain = sd1_engine.generate(params)
        seen = {}

        def record(module, args):  # the to_q weight the UNet runs with (returns None: inputs unchanged)
            seen.setdefault("q", layers[Q].weight.clone())

        handle = pipe.unet.register_forward_pre_hook(record)
        try:
            styled = sd1_engine.generate(params.replace(prompt="a cat <lora:style:0.5:0.75>"))
        finally:
            handle.remove()
        again = sd1_engine.generate(params)
    finally:
        sd1_engine.extra_networks = previous
    expected_q = before[Q][0] + 0.75 * delta_weight(parts[kohya(Q)], layers[Q].weight.shape)
    torch.testing.assert_close(seen["q"], expected_q)  # the UNet multiplier on the UNet layer
    assert not np.array_equal(np.asarray(styled.images[0]), np.asarray(plain.images[0]))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(plain.images[0]))
    for name, module in layers.items():  # bit for bit afterwards
        assert torch.equal(module.weight, before[name][0])
        assert module.bias is None or torch.equal(module.bias, before[name][1])
    assert parse_infotext(styled.infotexts[0])["Lora hashes"].startswith("style: ")
    assert [e["name"] for e in lora_list([lycoris_dir])] == ["style"]


def test_the_text_encoder_multiplier_applies_diff_and_diff_b(sd1_engine, lycoris_dir):
    from booth.train.formats.lycoris import apply_lycoris, read_lycoris

    layer = te_layer(sd1_engine.pipe)
    weight, bias = layer.weight.clone(), layer.bias.clone()
    part = read_lycoris(lycoris_dir / "style.safetensors")[kohya(TE_Q, "lora_te")]
    apply_lycoris(sd1_engine.pipe, [(lycoris_dir / "style.safetensors", 0.5, 1.0)])
    try:
        torch.testing.assert_close(layer.weight, weight + 0.5 * part["diff"])
        torch.testing.assert_close(layer.bias, bias + 0.5 * part["diff_b"])
    finally:
        apply_lycoris(sd1_engine.pipe, [])
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)


def test_a_network_for_another_model_or_of_an_unsupported_kind_is_refused(sd1_engine, tmp_path):
    from booth.train.formats.lycoris import apply_lycoris

    q = sd1_engine.pipe.unet.get_submodule(Q)
    weight = q.weight.clone()
    bad = save(tmp_path / "other.safetensors", {
        kohya(Q): loha(q.out_features, q.in_features),
        "lora_unet_output_blocks_99_1_proj_in": loha(4, 4),
    })  # fmt: skip
    with pytest.raises(
        BoothError, match="does not fit this model: no layer lora_unet_output_blocks_99_1_proj_in"
    ):
        apply_lycoris(sd1_engine.pipe, [(bad, 1.0, 1.0)], label="other")
    assert torch.equal(q.weight, weight)  # nothing half-patched
    oft = save(
        tmp_path / "oft.safetensors", {kohya(Q): {"oft_blocks": randn(4, 2, 2), "alpha": torch.tensor(1.0)}}
    )
    with pytest.raises(BoothError, match="OFT networks"):
        apply_lycoris(sd1_engine.pipe, [(oft, 1.0, 1.0)])


def test_a_lycoris_file_given_by_path_on_the_command_line(tiny_sd1_dir, lycoris_dir, tmp_path):
    from booth.cli import main
    from booth.generate.metadata import read_image_metadata

    base = ["generate", "a cat", "--model", str(tiny_sd1_dir), "--steps", "2", "--seed", "3", "--no-progress"]
    assert (
        main([*base, "--lora", f"{lycoris_dir / 'style.safetensors'}:0.8", "--out", str(tmp_path / "o")]) == 0
    )
    (png,) = (tmp_path / "o").glob("*.png")
    meta = read_image_metadata(png)
    assert "<lora:style:0.8>" in meta.parameters["Prompt"] and "Lora hashes" in meta.parameters


def test_an_sdxl_lycoris_file_in_the_original_naming_reaches_both_text_encoders(tmp_path):
    from booth.models.tiny import tiny_pipeline
    from booth.train.formats.lycoris import apply_lycoris, read_lycoris

    pipe = tiny_pipeline("sdxl")
    q = pipe.unet.get_submodule(Q)
    te2 = pipe.text_encoder_2.get_submodule(TE_Q)  # CLIPTextModelWithProjection keeps `text_model.`
    path = save(tmp_path / "xl.safetensors", {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": loha(q.out_features, q.in_features, seed=2),
        kohya(TE_Q, "lora_te2"): {"lokr_w1": randn(2, 2, seed=3), "lokr_w2": randn(te2.out_features // 2, te2.in_features // 2, seed=4)},
    })  # fmt: skip
    parts = read_lycoris(path)
    q_before, te2_before = q.weight.clone(), te2.weight.clone()
    apply_lycoris(pipe, [(path, 0.5, 2.0)])
    torch.testing.assert_close(
        q.weight,
        q_before
        + 2.0
        * delta_weight(parts["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"], q.weight.shape),
    )
    torch.testing.assert_close(
        te2.weight, te2_before + 0.5 * delta_weight(parts[kohya(TE_Q, "lora_te2")], te2.weight.shape)
    )
    apply_lycoris(pipe, [])
    assert torch.equal(q.weight, q_before) and torch.equal(te2.weight, te2_before)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_a_trained_loha_or_lokr_is_written_as_lycoris_and_reproduces_the_trained_model(
    tiny_sd1_dir, subject, tmp_path, algo
):
    from safetensors import safe_open

    from booth.models.loading import load_pipeline
    from booth.train import DataConfig, LoraConfig, OptimConfig, TrainConfig
    from booth.train.formats.lycoris import apply_lycoris
    from booth.train.loop import Trainer

    lora = LoraConfig(rank=2, alpha=1.0, algo=algo, text_encoder=True, unet_targets=["to_q", "to_v", "conv1"])
    config = TrainConfig(method="lora", model=str(tiny_sd1_dir), out=tmp_path / "run", steps=3, lora=lora,
                         optim=OptimConfig(lr=5e-2), data=DataConfig(images=subject, instance_prompt="a sks dog"))  # fmt: skip
    trainer = Trainer(config, progress=False)
    result = trainer.run()
    assert set(result.files) >= {"kohya"} and "diffusers" not in result.files
    path = result.files["kohya"]
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "lycoris.kohya" and algo in meta["ss_network_args"]
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert any(".hada_w1_a" in k or ".lokr_w1" in k for k in keys)

    def unet_out(pipe):
        g = torch.Generator().manual_seed(0)
        x, emb = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
        with torch.no_grad():
            return pipe.unet(x, 500, encoder_hidden_states=emb).sample

    trained = unet_out(trainer.pipe)  # the PEFT adapters as trained
    fresh = load_pipeline(str(tiny_sd1_dir)).pipe
    base = unet_out(fresh)
    apply_lycoris(fresh, [(path, 1.0, 1.0)])
    assert (trained - base).abs().max() > 1e-4  # it learnt something
    torch.testing.assert_close(unet_out(fresh), trained, atol=1e-4, rtol=1e-4)


def test_a_lycoris_run_folder_is_a_lora_by_path(lycoris_dir):
    from booth.train.formats.lora import lora_file

    assert lora_file(lycoris_dir) == lycoris_dir / "style.safetensors"
    (lycoris_dir / "other.safetensors").write_bytes((lycoris_dir / "style.safetensors").read_bytes())
    with pytest.raises(BoothError, match="with 2 .safetensors files: name one"):
        lora_file(lycoris_dir)


@pytest.mark.parametrize("per", ["output", "input"])
def test_a_dora_magnitude_decomposes_the_weight_as_lycoris_does(sd1_engine, tmp_path, per):
    from booth.train.formats.lycoris import apply_lycoris

    q = sd1_engine.pipe.unet.get_submodule(Q)
    w = q.weight.detach().clone()
    up, down = randn(q.out_features, 2, seed=1), randn(2, q.in_features, seed=2)
    m = (randn(q.out_features, 1, seed=3) if per == "output" else randn(1, q.in_features, seed=3)).abs() + 1
    path = save(tmp_path / "dora.safetensors", {
        kohya(Q): {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0), "dora_scale": m},
    })  # fmt: skip
    merged = w + (up @ down) * 0.5  # alpha / rank
    norm = merged.norm(dim=1, keepdim=True) if per == "output" else merged.norm(dim=0, keepdim=True)
    expected = w + 0.6 * (merged * m / norm - w)
    apply_lycoris(sd1_engine.pipe, [(path, 1.0, 0.6)])
    try:
        torch.testing.assert_close(q.weight, expected, atol=1e-5, rtol=1e-5)
    finally:
        apply_lycoris(sd1_engine.pipe, [])
    assert torch.equal(q.weight, w)


def test_a_kohya_lora_with_a_dora_magnitude_is_patched_not_loaded_without_it(sd1_engine, tmp_path):
    q = sd1_engine.pipe.unet.get_submodule(Q)
    w = q.weight.detach().clone()
    up, down, m = (
        randn(q.out_features, 2, seed=1),
        randn(2, q.in_features, seed=2),
        randn(q.out_features, 1).abs() + 1,
    )
    save(
        tmp_path / "dora.safetensors",
        {kohya(Q): {"lora_up.weight": up, "lora_down.weight": down, "dora_scale": m}},
    )
    previous, seen = sd1_engine.extra_networks, {}
    sd1_engine.extra_networks = ExtraNetworkRegistry([LoraNetwork([tmp_path])])

    def record(module, args):
        seen.setdefault("q", q.weight.detach().clone())

    handle = sd1_engine.pipe.unet.register_forward_pre_hook(record)
    try:
        sd1_engine.generate(
            GenerationParams(prompt="a cat <lora:dora:1>", steps=1, seed=1, sampler_name="Euler")
        )
    finally:
        handle.remove()
        sd1_engine.extra_networks = previous
    merged = w + up @ down  # no alpha: scale 1
    torch.testing.assert_close(seen["q"], merged * m / merged.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-5)
    assert torch.equal(q.weight, w)
