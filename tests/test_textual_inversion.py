"""Textual Inversion on tiny in-process models: only the new rows train; the files load in diffusers, through
booth's embedding reader (every TI layout) and in `booth generate --embeddings-dir`; resume is exact."""

from __future__ import annotations

import base64
import json
import random
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from booth.errors import BoothError
from booth.train import DataConfig, OptimConfig, TrainConfig, TrainingInterrupted, train
from booth.train.config import TokenConfig
from booth.train.formats.embeddings import (
    load_embedding,
    load_embeddings_dir,
    save_embedding,
    usable_embeddings,
)
from booth.train.loop import Trainer, TrainState, read_log
from booth.train.methods.textual_inversion import OBJECT_TEMPLATES, STYLE_TEMPLATES, TextualInversion

PROMPT = "a photo of <sks>"


def ti_config(out, model, subject, steps=3, tokens=None, **kw) -> TrainConfig:
    kw.setdefault("optim", OptimConfig(lr=5e-2))
    return TrainConfig(
        method="textual-inversion",
        data=kw.pop("data", DataConfig(subject, "a sks dog")),
        out=out,
        model=str(model),
        steps=steps,
        tokens=tokens or TokenConfig(placeholder="<sks>", initializer="dog"),
        **kw,
    )


@pytest.fixture(scope="module")
def sd1_run(tmp_path_factory, tiny_sd1_dir, subject):
    """3 steps on the tiny SD1 model (validation images of the new word); the trainer is kept."""
    out = tmp_path_factory.mktemp("ti") / "run"
    cfg = ti_config(out, tiny_sd1_dir, subject, validation_prompts=[PROMPT], validation_images=1)
    trainer = Trainer(cfg, progress=False)
    return trainer, trainer.run()


def load_sd1(model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)


def te_output(pipe, prompt: str, encoder="text_encoder", tokenizer="tokenizer") -> torch.Tensor:
    tok = getattr(pipe, tokenizer)
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return getattr(pipe, encoder)(ids)[0]


def assert_only_new_rows_differ(trained_te, base_te, new_rows: torch.Tensor) -> None:
    """Every parameter but the token table is bit-identical; so are the table's old rows; new rows = saved."""
    base = {n: p for n, p in base_te.state_dict().items()}
    vocab = base_te.get_input_embeddings().weight.shape[0]
    table = trained_te.get_input_embeddings().weight
    assert torch.equal(table[:vocab], base_te.get_input_embeddings().weight)
    torch.testing.assert_close(table[vocab : vocab + len(new_rows)], new_rows, rtol=0, atol=0)
    for name, value in trained_te.state_dict().items():
        if "token_embedding" not in name:
            assert torch.equal(value, base[name]), name


# --- SD 1.x: training, outputs, loaders ---------------------------------------------------------------------


def test_only_the_new_rows_train_and_diffusers_loads_the_file(sd1_run, tiny_sd1_dir):
    trainer, result = sd1_run
    assert result.completed and len(result.losses) == 3 and result.files["validation"].exists()
    files = result.files
    assert (
        files["diffusers"].name == "learned_embeds.safetensors"
        and files["embedding"].name == "sks.safetensors"
    )
    saved = load_file(files["diffusers"])
    assert list(saved) == ["<sks>"] and saved["<sks>"].shape == (1, 32)
    with safe_open(files["diffusers"], "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["booth.initializer"] == "dog" and "ss_sd_model_hash" in meta
    # only the new row is given to the optimizer, and it moved away from its start (mean of "dog"'s tokens)
    assert list(trainer.method.trainable_parameters()) == ["text_encoder.token_embedding.rows"]
    base = load_sd1(tiny_sd1_dir)
    dog = base.tokenizer("dog", add_special_tokens=False).input_ids
    assert len(dog) == 2  # a multi-token initializer in the tiny vocabulary
    start = base.text_encoder.get_input_embeddings().weight[dog].mean(0)
    assert (saved["<sks>"][0] - start).abs().max() > 1e-3
    assert_only_new_rows_differ(trainer.pipe.text_encoder, base.text_encoder, saved["<sks>"])
    # a fresh pipeline + diffusers' own loader: the same table, and "<sks>" now changes the text features
    fresh = load_sd1(tiny_sd1_dir)
    fresh.load_textual_inversion(files["diffusers"])
    assert_only_new_rows_differ(fresh.text_encoder, base.text_encoder, saved["<sks>"])
    torch.testing.assert_close(te_output(fresh, PROMPT), te_output(trainer.pipe, PROMPT))
    assert (te_output(fresh, PROMPT) - te_output(base, PROMPT)).abs().max() > 1e-4
    torch.testing.assert_close(te_output(fresh, "a photo of a cat"), te_output(base, "a photo of a cat"))


def test_a1111_file_loads_and_the_engine_uses_it_only_for_its_trigger(sd1_run, sd1_engine):
    from booth.generate.engine import Engine
    from booth.generate.params import GenerationParams

    _, result = sd1_run
    name, vectors = load_embedding(result.files["embedding"])
    assert name == "sks"
    assert torch.equal(vectors, load_file(result.files["diffusers"])["<sks>"])
    assert load_file(result.files["embedding"]).keys() == {"emb_params"}
    with_ti = Engine(sd1_engine.model, embeddings={name: vectors})

    def image(engine, prompt):
        params = GenerationParams(prompt=prompt, steps=2, width=32, height=32, seed=5, sampler_name="Euler")
        return engine.generate(params).images[0].tobytes()

    assert image(with_ti, "a photo of sks") != image(sd1_engine, "a photo of sks")
    assert image(with_ti, "a photo of a cat") == image(sd1_engine, "a photo of a cat")


def test_generate_cli_embeddings_dir(sd1_run, tiny_sd1_dir, tmp_path):
    from booth.cli import main

    _, result = sd1_run
    common = [
        "--model",
        str(tiny_sd1_dir),
        "--steps",
        "2",
        "--seed",
        "3",
        "-W",
        "32",
        "-H",
        "32",
        "--no-progress",
    ]
    emb = ["--embeddings-dir", str(result.out)]  # a run folder: checkpoints, loss.png etc. are skipped
    runs = {
        "base": ["generate", PROMPT, *common],
        "ti": ["generate", PROMPT, *common, *emb],
        "cat": ["generate", "a cat", *common],
        "cat_ti": ["generate", "a cat", *common, *emb],
    }
    for key, args in runs.items():
        assert main([*args, "--out", str(tmp_path / key)]) == 0
    px = {k: Image.open(next((tmp_path / k).glob("*.png"))).tobytes() for k in runs}
    assert px["ti"] != px["base"] and px["cat_ti"] == px["cat"]
    assert main(["generate", "x", *common, "--embeddings-dir", str(tmp_path / "nope")]) == 2


# --- resume, several vectors, style templates -------------------------------------------------------------


def run_with_stop(cfg, stop_at):
    def callback(state):
        if state.step == stop_at:
            state.stop_requested = True

    with pytest.raises(TrainingInterrupted):
        train(cfg, progress=False, state=TrainState(), callback=callback)


def test_resume_with_two_vectors_reproduces_the_uninterrupted_run(tmp_path, tiny_sd1_dir, subject):
    tokens = TokenConfig(placeholder="<sks>", initializer="toy", num_vectors=2, learnable_property="style")
    common = dict(
        steps=5, tokens=tokens, checkpoint_every=10, data=DataConfig(subject, "a sks dog", flip=True)
    )
    full = train(ti_config(tmp_path / "a", tiny_sd1_dir, subject, **common), progress=False)
    two = ti_config(tmp_path / "b", tiny_sd1_dir, subject, **common)
    run_with_stop(two, 2)
    resumed = train(two, resume=True, progress=False)
    losses = [[r["loss"] for r in read_log(out / "log.jsonl")] for out in (full.out, resumed.out)]
    assert losses[0] == losses[1] and len(losses[0]) == 5
    a, b = (load_file(r.files["diffusers"])["<sks>"] for r in (full, resumed))
    assert a.shape == (2, 32) and torch.equal(a, b)
    # two vectors expand to "<sks> <sks>_1" in diffusers
    pipe = load_sd1(tiny_sd1_dir)
    pipe.load_textual_inversion(full.files["diffusers"])
    assert pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer) == "a photo of <sks> <sks>_1"


# --- SDXL: both encoders ------------------------------------------------------------------------------------


def test_sdxl_trains_both_encoders(tmp_path, subject):
    from diffusers import StableDiffusionXLPipeline

    from booth.generate.engine import Engine
    from booth.generate.params import GenerationParams
    from booth.models.loading import load_pipeline
    from booth.models.tiny import tiny_pipeline

    model = tmp_path / "sdxl"
    tiny_pipeline("sdxl").save_pretrained(model)
    trainer = Trainer(ti_config(tmp_path / "run", model, subject, steps=2), progress=False)
    result = trainer.run()
    saved = load_file(result.files["diffusers"])
    assert saved.keys() == {"clip_l", "clip_g"} and saved["clip_l"].shape == saved["clip_g"].shape == (1, 32)
    base = StableDiffusionXLPipeline.from_pretrained(model)
    assert_only_new_rows_differ(trainer.pipe.text_encoder, base.text_encoder, saved["clip_l"])
    assert_only_new_rows_differ(trainer.pipe.text_encoder_2, base.text_encoder_2, saved["clip_g"])
    fresh = StableDiffusionXLPipeline.from_pretrained(model)  # diffusers: one call per encoder
    fresh.load_textual_inversion(
        saved["clip_l"], token="<sks>", text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer
    )
    fresh.load_textual_inversion(
        saved["clip_g"], token="<sks>", text_encoder=fresh.text_encoder_2, tokenizer=fresh.tokenizer_2
    )
    assert_only_new_rows_differ(fresh.text_encoder_2, base.text_encoder_2, saved["clip_g"])
    assert (
        te_output(fresh, PROMPT, "text_encoder_2", "tokenizer_2")
        - te_output(base, PROMPT, "text_encoder_2", "tokenizer_2")
    ).abs().max() > 1e-4
    name, vectors = load_embedding(result.files["embedding"])
    assert name == "sks" and vectors.keys() == {"clip_l", "clip_g"}
    loaded = load_pipeline(str(model))
    params = GenerationParams(
        prompt="a photo of sks", steps=2, width=32, height=32, seed=1, sampler_name="Euler"
    )
    with_ti = Engine(loaded, embeddings=usable_embeddings({name: vectors}, loaded.pipe))
    assert with_ti.generate(params).images[0].tobytes() != Engine(loaded).generate(params).images[0].tobytes()
    assert usable_embeddings({"sd1": torch.zeros(1, 32)}, loaded.pipe, warn=False) == {}


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--placeholder-token", "photo", "--initializer-token", "dog"],
            "already in the tokenizer's vocabulary",
        ),
        (["--placeholder-token", "<|endoftext|>", "--initializer-token", "dog"], "already in"),
        ([], "--initializer-token"),
        (["--initializer-token", "  "], "--initializer-token"),
        (["--initializer-token", "dog", "--prior-preservation", "--class-prompt", "a dog"], "prior"),
        (["--initializer-token", "dog", "--name", "dog"], "would get the learned vectors"),  # trigger = "dog"
        (["--initializer-token", "toy dog", "--name", "Dog"], "would get the learned vectors"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_sd1_dir, subject, capsys, flags, message):
    from booth.cli import main

    out = tmp_path / "out"
    args = [
        "train",
        "--method",
        "textual-inversion",
        "--images",
        str(subject),
        "--instance-prompt",
        "a sks dog",
    ]
    args += ["--model", str(tiny_sd1_dir), "--out", str(out), "--steps", "1", "--no-progress", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (out / "config.json").exists()


def test_prepare_initializers_prompts_and_base_model(tmp_path, subject):
    from booth.models.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    base_ids = pipe.tokenizer(PROMPT).input_ids
    before = te_output(pipe, PROMPT)
    cfg = ti_config(tmp_path, "x", subject, tokens=TokenConfig(initializer="a sculpture", num_vectors=3))
    method = TextualInversion(cfg)
    words = pipe.tokenizer("a sculpture", add_special_tokens=False).input_ids
    start = pipe.text_encoder.get_input_embeddings().weight[words].mean(0)
    method.prepare(pipe)
    rows = method.embedding_modules()["text_encoder"].rows
    assert len(words) > 2 and rows.shape == (3, 32) and torch.equal(rows[2], start)  # mean of every token
    assert method.tokens == ["<sks>", "<sks>_1", "<sks>_2"]
    assert [p.requires_grad for p in pipe.text_encoder.parameters()].count(True) == 1
    prompts = method.training_prompts(
        [type("S", (), {"is_prior": False, "prompt": "x"})()] * 40, random.Random(0)
    )
    assert all(p in [t.format("<sks> <sks>_1 <sks>_2") for t in OBJECT_TEMPLATES] for p in prompts)
    assert len(set(prompts)) > 10
    with method.base_model():  # the base tokenizer and table: as before prepare
        assert pipe.tokenizer(PROMPT).input_ids == base_ids
        torch.testing.assert_close(te_output(pipe, PROMPT), before, rtol=0, atol=0)
    assert pipe.tokenizer(PROMPT).input_ids != base_ids
    style = TextualInversion(
        ti_config(tmp_path, "x", subject, tokens=TokenConfig(learnable_property="style"))
    )
    assert style.training_prompts([type("S", (), {"is_prior": False})()], random.Random(1))[0] in [
        t.format("<sks>") for t in STYLE_TEMPLATES
    ]
    from booth.train.config import ConceptConfig

    several = ti_config(tmp_path, "x", subject, concepts=[ConceptConfig(subject, "a zwx cat")])
    with pytest.raises(BoothError, match="one new word per run"):
        several.validate()
    # check_config refuses a blank initializer; prepare also refuses one that the tokenizer reduces to nothing
    nothing = TextualInversion(ti_config(tmp_path, "x", subject, tokens=TokenConfig(initializer="\t")))
    with pytest.raises(BoothError, match="encodes to no tokens"):
        nothing.prepare(tiny_pipeline("sd1"))


# --- embedding files ----------------------------------------------------------------------------------------


def test_every_embedding_layout_loads(tmp_path):
    v = torch.randn(2, 8)
    torch.save({"string_to_param": {"*": v}, "name": "ignored", "step": 10}, tmp_path / "a1111.pt")
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(v.clone())})  # rinongal/textual_inversion files
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "orig.pt")
    save_file({"emb_params": v}, tmp_path / "kohya.safetensors")
    torch.save({"emb_params": v}, tmp_path / "kohya_pt.pt")
    torch.save({"<cat-toy>": v[0]}, tmp_path / "learned_embeds.bin")  # diffusers: 1-D, key = token
    save_file({"clip_l": v, "clip_g": torch.randn(2, 12)}, tmp_path / "xl.safetensors")
    torch.save(v, tmp_path / "bare.pt")
    payload = json.dumps({"name": "from-image", "string_to_param": {"*": {"TORCHTENSOR": v.tolist()}}})
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(payload.encode()).decode())
    Image.new("RGB", (8, 8)).save(tmp_path / "card.png", pnginfo=info)

    expect = {
        "a1111.pt": "a1111",
        "orig.pt": "orig",
        "kohya.safetensors": "kohya",
        "kohya_pt.pt": "kohya_pt",
        "learned_embeds.bin": "<cat-toy>",
        "bare.pt": "bare",
        "card.png": "from-image",
    }
    for file, name in expect.items():
        got_name, got = load_embedding(tmp_path / file)
        assert got_name == name and got.dtype == torch.float32
        torch.testing.assert_close(got, v[:1] if file == "learned_embeds.bin" else v)
    name, xl = load_embedding(tmp_path / "xl.safetensors")
    assert name == "xl" and xl["clip_g"].shape == (2, 12)
    # the writer's files read back
    assert load_embedding(save_embedding(tmp_path / "w.safetensors", v, token="<w>"))[0] == "<w>"
    assert load_embedding(save_embedding(tmp_path / "w2.safetensors", v))[0] == "w2"
    # a folder: previews, plain pictures and checkpoints skipped; broken files warned about, not fatal
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.preview.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "checkpoints" / "step-000001").mkdir(parents=True)
    torch.save({"rng": random.getstate()}, tmp_path / "checkpoints" / "step-000001" / "state.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"nope")
    with pytest.warns(UserWarning, match="broken.safetensors"):
        found = load_embeddings_dir(tmp_path)
    assert set(found) == {*expect.values(), "xl", "<w>", "w2"}


def test_bad_embedding_files_are_clear_errors(tmp_path):
    import numpy as np

    torch.save({"v": np.zeros(3)}, tmp_path / "code.pt")
    with pytest.raises(BoothError, match="needs code"):
        load_embedding(tmp_path / "code.pt")
    save_file({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, tmp_path / "two.safetensors")
    with pytest.raises(BoothError, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "two.safetensors")
    save_file({"clip_l": torch.zeros(1, 4), "clip_g": torch.zeros(2, 4)}, tmp_path / "xl.safetensors")
    with pytest.raises(BoothError, match="different numbers"):
        load_embedding(tmp_path / "xl.safetensors")
    torch.save({"t": torch.zeros(2, 2, 2)}, tmp_path / "cube.pt")
    with pytest.raises(BoothError, match="shape"):
        load_embedding(tmp_path / "cube.pt")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(BoothError, match="not an embedding file"):
        load_embedding(tmp_path / "x.txt")
    with pytest.raises(BoothError, match="not found"):
        load_embedding(tmp_path / "missing.pt")
    shutil.copy(tmp_path / "x.txt", tmp_path / "junk.safetensors")
    with pytest.raises(BoothError, match="cannot read"):
        load_embedding(tmp_path / "junk.safetensors")
