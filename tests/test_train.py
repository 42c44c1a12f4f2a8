"""The training engine on tiny in-process models: every method trains, saves, reloads through diffusers'
own loaders and changes the images; resume is exact; bad input is refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from booth.train import (
    DataConfig,
    LoraConfig,
    OptimConfig,
    PriorConfig,
    TrainConfig,
    TrainingInterrupted,
    train,
)
from booth.train.loop import TrainState, read_log


def config(tmp_path, model_dir, subject, method="lora", **kw) -> TrainConfig:
    kw.setdefault("steps", 3)
    kw.setdefault("optim", OptimConfig(lr=1e-2 if method == "lora" else 1e-3))
    kw.setdefault("data", DataConfig(images=subject, instance_prompt="a sks dog"))
    return TrainConfig(
        method=method,
        out=tmp_path / "run",
        model=str(model_dir),
        **kw,
    )


def unet_output(pipe, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    size = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, size, size, generator=gen)
    ids = pipe.tokenizer(
        ["a sks dog"], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        c = pipe.text_encoder(ids)[0]
        return unet(x, torch.tensor([500]), encoder_hidden_states=c).sample


def load(model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)


def test_lora_trains_and_loads_in_diffusers(tmp_path, tiny_sd1_dir, subject):
    result = train(config(tmp_path, tiny_sd1_dir, subject), progress=False)
    assert result.completed and len(result.losses) == 3
    files = result.files
    from safetensors import safe_open

    with safe_open(files["diffusers"], "pt") as f:
        keys = list(f.keys())
    assert any("attn2.to_k" in k for k in keys) and all(k.startswith("unet.") for k in keys)
    base = load(tiny_sd1_dir)
    before = unet_output(base)
    base.load_lora_weights(files["diffusers"].parent, weight_name=files["diffusers"].name)
    after = unet_output(base)
    assert (after - before).abs().max() > 1e-4
    kohya = load(tiny_sd1_dir)
    kohya.load_lora_weights(files["kohya"].parent, weight_name=files["kohya"].name)
    torch.testing.assert_close(unet_output(kohya), after, atol=1e-5, rtol=1e-4)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method"] == "lora" and saved["data"]["instance_prompt"] == "a sks dog"
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert len(read_log(tmp_path / "run" / "log.jsonl")) == 3


def test_lora_text_encoder_and_alpha(tmp_path, tiny_sd1_dir, subject):
    cfg = config(tmp_path, tiny_sd1_dir, subject, lora=LoraConfig(rank=2, alpha=1.0, text_encoder=True))
    result = train(cfg, progress=False)
    from booth.train.formats.lora import read_lora_info

    info = read_lora_info(result.files["kohya"])
    assert info.rank == 2 and info.alpha == 1.0 and "text_encoder" in info.components
    pipe = load(tiny_sd1_dir)
    ids = pipe.tokenizer(["a sks dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(result.out)
        after = pipe.text_encoder(ids)[0]
    assert (after - before).abs().max() > 1e-5


def test_dreambooth_full_writes_a_diffusers_folder(tmp_path, tiny_sd1_dir, subject):
    cfg = config(tmp_path, tiny_sd1_dir, subject, method="dreambooth", save_single_file=True)
    result = train(cfg, progress=False)
    tuned = load(result.files["diffusers"])
    base = load(tiny_sd1_dir)
    assert (unet_output(tuned) - unet_output(base)).abs().max() > 1e-4
    te_tuned = dict(tuned.text_encoder.named_parameters())
    for name, p in base.text_encoder.named_parameters():  # the text encoder was frozen
        torch.testing.assert_close(te_tuned[name], p)
    from booth.models.loading import load_pipeline

    single = load_pipeline(result.files["single_file"]).pipe
    torch.testing.assert_close(unet_output(single), unet_output(tuned), atol=1e-5, rtol=1e-4)


def test_dreambooth_trains_the_text_encoder_when_asked(tmp_path, tiny_sd1_dir, subject):
    cfg = config(tmp_path, tiny_sd1_dir, subject, method="dreambooth", train_text_encoder=True)
    result = train(cfg, progress=False)
    tuned, base = load(result.files["diffusers"]), load(tiny_sd1_dir)
    diffs = [
        (a - b).abs().max().item()
        for a, b in zip(tuned.text_encoder.parameters(), base.text_encoder.parameters())
    ]
    assert max(diffs) > 1e-5


def run_with_stop(cfg, stop_at):
    state = TrainState()

    def callback(s):
        if s.step == stop_at:
            s.stop_requested = True

    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(cfg, progress=False, state=state, callback=callback)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"lora": LoraConfig(algo="loha", dropout=0.1)},
        {"method": "dreambooth", "ema_decay": 0.9},
        {"method": "dreambooth", "optim": OptimConfig(lr=1e-3, max_grad_norm=0.0, fused_backward_pass=True)},
    ],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_sd1_dir, subject, extra):
    """Stop after step 2 of 5, resume: the same losses and the same weights as one run of 5 steps."""
    extra = dict(extra)
    method = extra.pop("method", "lora")
    common = dict(steps=5, checkpoint_every=10, data=DataConfig(subject, "a sks dog", flip=True), **extra)
    if method == "lora":
        common.setdefault("lora", LoraConfig(dropout=0.1))
    one = config(tmp_path / "a", tiny_sd1_dir, subject, method=method, **common)
    full = train(one, progress=False)
    two = config(tmp_path / "b", tiny_sd1_dir, subject, method=method, **common)
    run_with_stop(two, 2)
    assert len(read_log(two.out / "log.jsonl")) == 2
    resumed = train(two, resume=True, progress=False)
    log_a = [r["loss"] for r in read_log(one.out / "log.jsonl")]
    log_b = [r["loss"] for r in read_log(two.out / "log.jsonl")]
    assert log_a == log_b and len(log_a) == 5
    assert resumed.losses == full.losses[2:]


def test_seed_global_seeds_the_cpu_stream_as_torch_manual_seed_does():
    """The per-step seed of modules' own draws (adapter dropout): the same CPU stream as torch.manual_seed, and
    a different seed gives a different stream."""
    from booth.train.samples import seed_global

    seed_global(7, torch.device("cpu"))
    a = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(a, torch.rand(4))
    seed_global(8, torch.device("cpu"))
    assert not torch.equal(a, torch.rand(4))


def test_prior_class_images_are_generated_once_and_reused(tmp_path, tiny_sd1_dir, subject):
    cache = tmp_path / "cache"
    prior = PriorConfig(
        enabled=True, class_prompt="a dog", num_class_images=2, cache_dir=cache, sample_steps=2
    )
    train(config(tmp_path / "a", tiny_sd1_dir, subject, prior=prior), progress=False)
    (folder,) = cache.iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["prompt"] == "a dog" and manifest["steps"] == 2 and len(manifest["files"]) == 2
    stamps = {f: (folder / f).stat().st_mtime_ns for f in manifest["files"]}
    prior.num_class_images = 3
    result = train(config(tmp_path / "b", tiny_sd1_dir, subject, prior=prior), progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["files"]) == 3
    assert all((folder / f).stat().st_mtime_ns == t for f, t in stamps.items())  # reused, not regenerated
    log = read_log(result.out / "log.jsonl")
    assert all(r["loss_prior"] > 0 for r in log)
    assert all(abs(r["loss"] - r["loss_instance"] - r["loss_prior"]) < 1e-5 for r in log)


def test_real_class_images_and_base_model_prior(tmp_path, tiny_sd1_dir, subject):
    real = tmp_path / "real"
    real.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (10, 200, 10 * i)).save(real / f"{i}.png")
    (real / "0.txt").write_text("a green dog")
    prior = PriorConfig(enabled=True, class_prompt="a dog", class_images=real, weight=0.5)
    result = train(config(tmp_path / "a", tiny_sd1_dir, subject, prior=prior), progress=False)
    log = read_log(result.out / "log.jsonl")
    assert all(abs(r["loss"] - r["loss_instance"] - 0.5 * r["loss_prior"]) < 1e-5 for r in log)
    teacher = PriorConfig(enabled=True, class_prompt="a dog", mode="base-model")
    result = train(config(tmp_path / "b", tiny_sd1_dir, subject, prior=teacher, steps=4), progress=False)
    log = read_log(result.out / "log.jsonl")
    assert log[0]["loss_prior"] < 1e-9  # the adapter starts as the identity: student == teacher
    assert log[-1]["loss_prior"] > log[0]["loss_prior"]


def test_buckets_validation_and_snr(tmp_path, tiny_sd1_dir, subject):
    from booth.train import LossConfig

    cfg = config(
        tmp_path,
        tiny_sd1_dir,
        subject,
        data=DataConfig(subject, "a sks dog", buckets=True, resolution=32),
        loss=LossConfig(snr_gamma=5.0, noise_offset=0.05),
        validation_prompts=["a sks dog", "a dog"],
        validation_every=2,
        steps=2,
    )
    result = train(cfg, progress=False)
    grid = Image.open(result.files["validation"])
    assert grid.height >= 2 * 32 and grid.width >= 2 * 32  # 2 prompts x 2 images
    assert (result.out / "validation" / "step-000002.png").exists()


def test_sdxl_lora(tmp_path, subject):
    from diffusers import StableDiffusionXLPipeline

    from booth.models.tiny import tiny_pipeline

    model = tmp_path / "sdxl"
    tiny_pipeline("sdxl").save_pretrained(model)
    result = train(config(tmp_path, model, subject, lora=LoraConfig(text_encoder=True)), progress=False)
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.load_lora_weights(result.out)
    assert {"unet", "text_encoder", "text_encoder_2"} <= set(pipe.get_list_adapters())


# --- bad input: one clear line, exit 2, nothing written or lost ---------------------------------------------


def cli(*args: str) -> int:
    from booth.cli import main

    return main(["train", *args])


@pytest.mark.parametrize(
    "setup, flags, message",
    [
        ("empty", [], "no instance images"),
        ("one", [], "at least 2"),
        ("text", [], "no instance images"),
        ("corrupt", [], "bad.png"),
        (None, ["--prior-preservation"], "--class-prompt"),
        (None, ["--rank", "0"], "--rank"),
        (None, ["--steps", "0"], "--steps"),
        (None, ["--method", "lora", "--lora-targets", "nope"], "nope"),
        (None, ["--resume"], "nothing to resume"),
        (None, ["--max-grad-norm", "-1"], "--max-grad-norm"),
        (None, ["--lr", "nan"], "--lr must be a finite number"),
        (None, ["--noise-offset", "inf"], "--noise-offset must be a finite number"),
        (None, ["--prior-weight", "nan"], "--prior-weight must be a finite number"),
        (None, ["--fused-backward-pass", "--max-grad-norm", "1"], "--max-grad-norm 0"),
        (None, ["--fused-backward-pass", "--gradient-accumulation", "2"], "accumulate"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_sd1_dir, subject, capsys, setup, flags, message):
    images = subject
    if setup:
        images = tmp_path / setup
        images.mkdir()
        if setup == "one":
            Image.new("RGB", (32, 32)).save(images / "a.png")
        if setup == "text":
            (images / "notes.pdf").write_text("not an image")
        if setup == "corrupt":
            for i in range(2):
                Image.new("RGB", (32, 32)).save(images / f"{i}.png")
            (images / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code = cli(
        "--images",
        str(images),
        "--instance-prompt",
        "a sks dog",
        "--model",
        str(tiny_sd1_dir),
        "--out",
        str(out),
        "--steps",
        "2",
        "--no-progress",
        *flags,
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (out / "config.json").exists()


def test_existing_runs_and_other_folders_are_never_overwritten(tmp_path, tiny_sd1_dir, subject, capsys):
    out = tmp_path / "run"
    args = [
        "--images",
        str(subject),
        "--instance-prompt",
        "a sks dog",
        "--model",
        str(tiny_sd1_dir),
        "--out",
        str(out),
        "--steps",
        "1",
        "--no-progress",
    ]
    assert cli(*args) == 0
    before = (out / "pytorch_lora_weights.safetensors").read_bytes()
    assert cli(*args) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == before
    assert cli(*args, "--resume", "--rank", "8") == 2  # different settings cannot resume
    assert "rank" in capsys.readouterr().err
    assert cli(*args, "--overwrite", "--steps", "2") == 0
    assert len(read_log(out / "log.jsonl")) == 2
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    args[args.index(str(out))] = str(other)
    assert cli(*args, "--overwrite") == 2
    assert (other / "holiday.jpg").read_bytes() == b"precious"


def test_generate_applies_a_trained_lora_by_path_or_name(tmp_path, tiny_sd1_dir, subject):
    from booth.generate.metadata import read_image_metadata

    result = train(config(tmp_path, tiny_sd1_dir, subject), progress=False)
    common = [
        "generate",
        "a sks dog",
        "--model",
        str(tiny_sd1_dir),
        "--steps",
        "2",
        "--seed",
        "3",
        "--no-progress",
    ]
    from booth.cli import main

    assert main([*common, "--out", str(tmp_path / "base")]) == 0
    assert main([*common, "--out", str(tmp_path / "file"), "--lora", f"{result.files['kohya']}:1"]) == 0
    assert main([*common, "--out", str(tmp_path / "dir"), "--lora-dir", str(result.out)]) == 0
    name = result.files["kohya"].stem
    prompt_tag = ["generate", f"a sks dog <lora:{name}:1>", *common[2:]]
    assert main([*prompt_tag, "--out", str(tmp_path / "tag"), "--lora-dir", str(result.out)]) == 0
    pixels = {
        k: Image.open(next((tmp_path / k).glob("*.png"))).tobytes() for k in ("base", "file", "dir", "tag")
    }
    assert pixels["file"] != pixels["base"] and pixels["tag"] == pixels["file"]
    assert pixels["dir"] == pixels["base"]  # a folder alone applies nothing; the prompt must ask for it
    meta = read_image_metadata(next((tmp_path / "tag").glob("*.png")))
    assert "Lora hashes" in meta.parameters


def test_accelerate_launch_two_processes(tmp_path, tiny_sd1_dir, subject):
    """`accelerate launch` works unchanged: two CPU processes (gloo), DDP, prior class images generated once
    (16 s on the 2-core CPU, so in the default suite)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "booth",
        "train",
        "--images",
        str(subject),
        "--instance-prompt",
        "a sks dog",
        "--model",
        str(tiny_sd1_dir),
        "--out",
        str(out),
        "--steps",
        "3",
        "--no-progress",
        "--prior-preservation",
        "--class-prompt",
        "a dog",
        "--num-class-images",
        "2",
        "--class-cache",
        str(tmp_path / "cache"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(read_log(out / "log.jsonl")) == 3
    assert (out / "pytorch_lora_weights.safetensors").exists()
    (cache,) = (tmp_path / "cache").iterdir()
    assert len(json.loads((cache / "manifest.json").read_text())["files"]) == 2


def test_bf16_gradient_checkpointing_and_8bit_adam_on_cpu(tmp_path, tiny_sd1_dir, subject):
    cfg = config(
        tmp_path,
        tiny_sd1_dir,
        subject,
        mixed_precision="bf16",
        gradient_checkpointing=True,
        lora=LoraConfig(text_encoder=True),
    )
    result = train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(result.files["diffusers"]).values())
    cfg = config(tmp_path / "b", tiny_sd1_dir, subject)
    cfg.optim.use_8bit_adam = True
    with pytest.raises(Exception, match="8-bit AdamW|CUDA"):
        train(cfg, progress=False)


def test_two_concepts_in_one_run(tmp_path, tiny_sd1_dir, subject, capsys):
    """--concepts: both folders train, each with its own prompt and class images."""
    other = tmp_path / "cat"
    other.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (250, 250, 10 * i)).save(other / f"{i}.png")
    (tmp_path / "concepts.json").write_text(
        json.dumps(
            [
                {"images": str(subject), "instance_prompt": "a sks dog", "class_prompt": "a dog"},
                {"images": "cat", "instance_prompt": "a zwx cat", "class_prompt": "a cat"},
            ]
        )
    )
    out = tmp_path / "run"
    code = cli(
        "--concepts",
        str(tmp_path / "concepts.json"),
        "--model",
        str(tiny_sd1_dir),
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--no-progress",
        "--prior-preservation",
        "--num-class-images",
        "1",
        "--class-cache",
        str(tmp_path / "cache"),
    )
    assert code == 0, capsys.readouterr().err
    saved = TrainConfig.load(out / "config.json")
    assert [c.instance_prompt for c in saved.all_concepts()] == ["a sks dog", "a zwx cat"]
    caches = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir())
    assert caches == ["a-cat", "a-dog"]
    from booth.train.formats.lora import read_lora_info

    meta = read_lora_info(out / "run.safetensors").metadata
    assert set(json.loads(meta["ss_dataset_dirs"])) == {subject.name, "cat"}
    (tmp_path / "bad.json").write_text(json.dumps([{"images": "cat"}]))
    assert cli("--concepts", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")) == 2
    assert "instance_prompt" in capsys.readouterr().err


def test_a_finished_run_continues_with_more_steps(tmp_path, tiny_sd1_dir, subject):
    """--resume with a larger --steps continues from the raw (not EMA) weights: 3 then 5 == 5 at once."""
    common = dict(ema_decay=0.9, checkpoint_every=100)
    straight = train(config(tmp_path / "a", tiny_sd1_dir, subject, steps=5, **common), progress=False)
    first = config(tmp_path / "b", tiny_sd1_dir, subject, steps=3, **common)
    train(first, progress=False)
    first.steps = 5
    more = train(first, resume=True, progress=False)
    assert more.losses == straight.losses[3:]
    from safetensors.torch import load_file

    a, b = load_file(straight.files["diffusers"]), load_file(more.files["diffusers"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_grad_norm_defaults_to_off_with_the_fused_backward_pass_only():
    """One default for the CLI, the server and Python: clip at 1, except with the fused step (which cannot clip by
    the global norm); a value given is kept, and the saved config records the resolved value."""
    assert OptimConfig().max_grad_norm == 1.0
    assert OptimConfig(fused_backward_pass=True).max_grad_norm == 0.0
    assert OptimConfig(max_grad_norm=0.5).max_grad_norm == 0.5
    # an explicit value is kept (and refused later by TrainConfig.validate)
    assert OptimConfig(fused_backward_pass=True, max_grad_norm=2.0).max_grad_norm == 2.0


def test_clip_grad_norm_matches_torch_and_leaves_small_gradients_alone():
    from booth.train.optim import clip_grad_norm

    gen = torch.Generator().manual_seed(0)
    for scale, clipped in ((10.0, True), (1e-3, False)):
        ours = [torch.nn.Parameter(torch.zeros(5, 3)) for _ in range(3)]
        theirs = [torch.nn.Parameter(torch.zeros(5, 3)) for _ in range(3)]
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(5, 3, generator=gen) * scale
            b.grad = a.grad.clone()
        before = [a.grad.clone() for a in ours]
        total = clip_grad_norm(ours + [torch.nn.Parameter(torch.zeros(2))], 1.0)  # one without a gradient
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        assert torch.allclose(total, expected)
        assert all(torch.allclose(a.grad, b.grad, atol=1e-7) for a, b in zip(ours, theirs))
        changed = any(not torch.equal(a.grad, g) for a, g in zip(ours, before))
        assert changed is clipped
        if clipped:
            assert torch.nn.utils.get_total_norm([a.grad for a in ours]) == pytest.approx(1.0, rel=1e-5)
    big = torch.nn.Parameter(torch.zeros(3))
    big.grad = torch.full((3,), 100.0)
    assert clip_grad_norm([big], 0.0) > 100 and torch.equal(big.grad, torch.full((3,), 100.0))  # 0 = off


@pytest.mark.parametrize("method", ["dreambooth", "lora", "textual-inversion", "custom-diffusion"])
def test_fused_backward_pass_matches_the_ordinary_step_without_holding_all_gradients(
    tmp_path, tiny_sd1_dir, subject, method, monkeypatch
):
    """Each weight updated inside the backward pass: the same losses, gradient norms and weights as the
    ordinary AdamW step (under a warm-up LR schedule), while at most one trained gradient exists at a time."""
    from safetensors.torch import load_file

    from booth.train.optim import FusedBackwardStep

    held = []
    step = FusedBackwardStep._step

    def counting(self, p):
        held.append(sum(q.grad is not None for g in self.optimizer.param_groups for q in g["params"]))
        step(self, p)

    monkeypatch.setattr(FusedBackwardStep, "_step", counting)
    from booth.train.config import TokenConfig

    lr = {"lora": 1e-2, "textual-inversion": 5e-3}.get(method, 1e-3)
    extra = {}
    if method in ("textual-inversion", "custom-diffusion"):  # a new word; its other rows must stay put
        extra = dict(
            tokens=TokenConfig(placeholder="<sks>", initializer="dog"),
            data=DataConfig(images=subject, instance_prompt="a <sks> dog"),
        )
    runs = {}
    for fused in (False, True):
        optim = OptimConfig(
            lr=lr, max_grad_norm=0.0, fused_backward_pass=fused, scheduler="linear", warmup_steps=2
        )
        cfg = config(
            tmp_path / str(fused), tiny_sd1_dir, subject, method=method, steps=4, optim=optim, **extra
        )
        runs[fused] = train(cfg, progress=False)
    plain, fused = (read_log(runs[k].out / "log.jsonl") for k in (False, True))
    assert [r["loss"] for r in plain] == pytest.approx([r["loss"] for r in fused], rel=1e-5, abs=1e-7)
    assert [r["grad_norm"] for r in plain] == pytest.approx([r["grad_norm"] for r in fused], rel=1e-4)
    assert (
        len(set(r["lr"] for r in fused)) > 1
    )  # the LR changed during the run and the fused steps followed it
    assert held and max(held) == 1
    files = [
        sorted(f for f in runs[k].files.values() if str(f).endswith(".safetensors")) for k in (False, True)
    ]
    if method == "dreambooth":
        files = [
            [runs[k].files["diffusers"] / "unet" / "diffusion_pytorch_model.safetensors"] for k in (0, 1)
        ]
    assert files[0] and len(files[0]) == len(files[1])
    for one, other in zip(*files):
        a, b = load_file(one), load_file(other)
        assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_fused_backward_pass_takes_its_hooks_off_the_model_after_the_run(tmp_path, tiny_sd1_dir, subject):
    """A model trained with --fused-backward-pass in this process (the server keeps models loaded) must not go
    on updating its weights in later backward passes."""
    from booth.models.loading import load_pipeline
    from booth.train.loop import Trainer

    loaded = load_pipeline(str(tiny_sd1_dir), device="cpu")
    optim = OptimConfig(lr=1e-3, max_grad_norm=0.0, fused_backward_pass=True)
    cfg = config(tmp_path, tiny_sd1_dir, subject, method="dreambooth", steps=2, optim=optim)
    Trainer(cfg, progress=False, loaded=loaded).run()
    unet = loaded.pipe.unet
    weight = unet.conv_in.weight
    assert weight.requires_grad  # still marked trainable after the run, so a backward reaches it
    before = weight.detach().clone()
    size = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, size, size)
    c = torch.zeros(1, 77, unet.config.cross_attention_dim)
    unet(x, torch.tensor([10]), encoder_hidden_states=c).sample.pow(2).mean().backward()
    assert weight.grad is not None and torch.equal(weight.detach(), before)  # no hook stepped and freed it


THP_PROBE = """
import os, booth, torch
x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
rollup = open('/proc/self/smaps_rollup').read()
huge = [int(line.split()[1]) for line in rollup.splitlines() if line.startswith('AnonHugePages:')][0]
print(os.environ['THP_MEM_ALLOC_ENABLE'], huge)
"""


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_importing_booth_turns_on_huge_pages_for_large_cpu_tensors(preset, expected):
    """booth sets THP_MEM_ALLOC_ENABLE=1 before torch's first allocation (a full fine-tune's backward was twice
    as fast with it on this CPU); a user's own setting wins. Where the kernel honours madvise, a 64 MB tensor
    then lies in huge pages, and not when it is off."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    done = subprocess.run(
        [sys.executable, "-c", THP_PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    value, huge_kb = done.stdout.split()
    assert value == expected
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if mode.exists() and "[madvise]" in mode.read_text():
        assert (int(huge_kb) >= 32 * 1024) is (expected == "1")
