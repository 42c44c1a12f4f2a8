"""Training speed and memory of booth's engine, and its overhead over a bare UNet forward + backward.

For each model and method it times `Trainer.step` (data from the cache, noise, UNet, loss, backward, AdamW,
LR schedule) and, in alternating blocks on the same model, batch and trainable parameters, a bare UNet forward +
backward with the same inputs; it prints steps/s, the step's peak memory and the ratio step / bare (goal
<= 1.10).
It also times the optimizer update alone (AdamW on the trainable parameters, gradients given): every trainer
pays it, and for a full fine-tune on a CPU it is a large part of the step (860 M parameters of fp32 AdamW
state to read and write), so "ratio w/o opt" = (step - optimizer) / bare shows what the engine itself adds.
Each (model, method) runs in its own subprocess so its peak memory (RSS on the CPU, allocated memory on CUDA)
is its own.

Models: booth-mini (the bundled default) and an SD-1.5-shaped UNet with random weights (SD 1.5's exact UNet
config; a small 768-wide text encoder and a small x8 VAE, which do not train and whose outputs are cached).

    python benchmarks/train_speed.py                         # CPU: booth-mini 64 px, SD-1.5 UNet at 128 px
    python benchmarks/train_speed.py --sd-resolution 512     # on a GPU: SD-1.5 UNet at 512 px
    python benchmarks/train_speed.py --compare-thp           # also without transparent huge pages (CPU)
    python benchmarks/train_speed.py --models sd15 --methods dreambooth --repeat 3   # median of 3 processes
    python benchmarks/train_speed.py --models sd15 --methods dreambooth --sd-resolution 256 \
        --gradient-checkpointing                             # a larger image in the CPU's memory

With `--gradient-checkpointing` the trainer and the bare forward + backward both recompute activations (one
UNet with checkpointing on), so the ratio still compares like with like.

booth turns on torch's transparent-huge-page allocation for CPU tensors (THP_MEM_ALLOC_ENABLE=1, set when
booth is imported); `--compare-thp` runs every configuration a second time with it off and prints the speedup.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def sd15_shaped(resolution: int):
    """A LoadedModel whose UNet is SD 1.5's (random weights), with cheap frozen text encoder and VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import booth
    from booth.models.families import detect_family
    from booth.models.loading import LoadedModel
    from booth.models.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    config_dir = Path(booth.__file__).parent / "models" / "configs" / "sd1" / "unet"
    torch.manual_seed(0)
    unet_config = UNet2DConditionModel.load_config(config_dir)
    unet_config["sample_size"] = resolution // 8
    pipe.unet = UNet2DConditionModel.from_config(unet_config)
    pipe.text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=pipe.tokenizer.vocab_size,
            hidden_size=768,
            intermediate_size=1024,
            num_hidden_layers=1,
            num_attention_heads=12,
            max_position_embeddings=77,
        )
    )
    pipe.vae = AutoencoderKL(
        block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    return LoadedModel(pipe, detect_family(pipe), "sd15-shaped", None, None)


def subject_folder(folder: Path, resolution: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.new("RGB", (resolution, resolution), (40 * i, 100, 200)).save(folder / f"{i}.png")
    return folder


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's RSS high-water mark (VmHWM,
    reset by writing 5 to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # not Linux: the peak then covers the whole process
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what was measured) since the last `reset_peak_memory`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA allocated"
    try:
        status = Path("/proc/self/status").read_text()
        hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 1024, "peak RSS of the step"
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS of the process"


def measure_one(
    model: str,
    method: str,
    resolution: int,
    batch: int,
    steps: int,
    device: str | None,
    checkpointing: bool,
    fused: bool = False,
) -> dict:
    from booth.train import DataConfig, LoraConfig, OptimConfig, TrainConfig
    from booth.train.loop import Trainer

    work = Path(tempfile.mkdtemp(prefix="booth-train-bench-"))
    loaded = sd15_shaped(resolution) if model == "sd15" else None
    cfg = TrainConfig(
        method=method,
        model=None,
        out=work / "run",
        steps=steps * 4,
        data=DataConfig(
            images=subject_folder(work / "images", resolution),
            instance_prompt="a sks dog",
            resolution=resolution,
        ),
        lora=LoraConfig(rank=4),
        optim=OptimConfig(batch_size=batch, fused_backward_pass=fused),
        device=device,
        checkpoint_every=10**6,
        gradient_checkpointing=checkpointing,
    )
    trainer = Trainer(cfg, progress=False, loaded=loaded)
    trainer.setup()
    unet = trainer.pipe.unet
    latent = resolution // trainer._vae_scale
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, unet.config.in_channels, latent, latent, generator=gen).to(trainer.device)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(trainer.device)
    c = torch.stack([trainer.text_cache["a sks dog"][0]] * batch)
    params = list(trainer.method.trainable_parameters().values())

    def bare():
        if trainer.fused_step:
            trainer.fused_step.enabled = False  # a plain backward: no update inside it
        pred = trainer._unet(unet, x, t, c, None)
        pred.float().pow(2).mean().backward()
        for p in params:
            p.grad = None
        if trainer.fused_step:
            trainer.fused_step.enabled = True

    # made for the optimizer's block only, so they do not count in the step's peak
    grads: list[torch.Tensor] = []

    def optim():
        if not grads:
            grads.extend(torch.randn_like(p) * 1e-3 for p in params)
        for p, g in zip(params, grads):
            p.grad = g
        trainer.optimizer.step()
        for p in params:
            p.grad = None

    def sync():
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()

    step_no = 0

    def step():
        nonlocal step_no
        step_no += 1
        trainer.step(step_no)

    # Blocks, not interleaved calls: what one call leaves in the allocator changes the next one's time (on the
    # CPU a bare pass right after a fused-backward step took 3.5-4.4 s, after another bare pass 2.1 s), so each
    # function runs `steps` times in a row after an untimed call, in two rounds (step, bare, optim; then again).
    # Peak memory is the trainer step's own: reset before each step block, read after it.
    times: dict[str, list[float]] = {"step": [], "bare": [], "optim": []}
    peaks = []
    for _round in range(2):
        for name, fn in (("step", step), ("bare", bare), ("optim", optim)):
            if name == "step":
                reset_peak_memory(trainer.device)
            fn()  # untimed: the allocator settles into this function's pattern
            sync()
            for _ in range(max(1, steps // 2)):
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
            if name == "step":
                peaks.append(peak_memory(trainer.device))
            grads.clear()
    step_s, bare_s, optim_s = (statistics.median(times[k]) for k in ("step", "bare", "optim"))
    mib, what = max(peaks)
    memory = f"{mib:.0f} MiB ({what})"
    trainable = sum(p.numel() for p in params)
    return {
        "model": model,
        "method": method,
        "resolution": resolution,
        "batch": batch,
        "checkpointing": checkpointing,
        "fused": fused,
        "device": str(trainer.device),
        "trainable_params": trainable,
        "step_s": step_s,
        "bare_s": bare_s,
        "steps_per_s": 1 / step_s,
        "optim_s": optim_s,
        "ratio": step_s / bare_s,
        "ratio_without_optim": (step_s - optim_s) / bare_s,
        "memory": memory,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration (default 8)")
    parser.add_argument(
        "--sd-resolution",
        type=int,
        default=None,
        help="SD-1.5 UNet size (default 512 on a GPU, 128 on the CPU)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="batch (default: 4 booth-mini, 1 SD-1.5 shape)"
    )
    parser.add_argument("--models", default="mini,sd15", help="comma-separated: mini, sd15")
    parser.add_argument("--methods", default="lora,dreambooth", help="comma-separated methods")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="train (and time the bare forward + backward) with gradient checkpointing",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each configuration N times (each its own process) and report the median-ratio run",
    )
    parser.add_argument(
        "--fused-backward-pass",
        action="store_true",
        help="train with the optimizer step fused into the backward pass (no clipping), the bare pass as before",
    )
    parser.add_argument(
        "--compare-thp",
        action="store_true",
        help="also run each configuration without transparent huge pages and print the speedup",
    )
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1 or args.steps < 1:
        parser.error("--repeat and --steps must be at least 1")
    gpu = torch.cuda.is_available() and args.device != "cpu"
    sd_res = args.sd_resolution or (512 if gpu else 128)
    if args.one:
        model, method = args.one
        res = 64 if model == "mini" else sd_res
        batch = args.batch or (4 if model == "mini" else (2 if gpu else 1))
        print(
            json.dumps(
                measure_one(
                    model,
                    method,
                    res,
                    batch,
                    args.steps,
                    args.device,
                    args.gradient_checkpointing,
                    args.fused_backward_pass,
                )
            )
        )
        return
    rows = []
    thp_modes = ("1", "0") if args.compare_thp else ("1",)
    for model in args.models.split(","):
        for method in args.methods.split(","):
            runs = {}
            for thp in thp_modes:  # torch reads THP_MEM_ALLOC_ENABLE at start-up: one process per mode
                done = [run_one(args, model, method, sd_res, thp) for _ in range(args.repeat)]
                runs[thp] = median_run([r for r in done if r is not None])
            if runs["1"] is None:
                continue
            row = runs["1"]
            off = runs.get("0")
            row["thp_speedup"] = off["step_s"] / row["step_s"] if off else None
            rows.append(row)
    print(
        f"{'model':<8} {'method':<11} {'px':>4} {'batch':>5} {'trainable':>11} {'step s':>8} {'bare s':>8} "
        f"{'optim s':>8} {'steps/s':>8} {'ratio':>6} {'w/o opt':>7} {'THP x':>6} {'ratios of the runs':>20}  memory"
    )
    for r in rows:
        thp = f"{r['thp_speedup']:>6.2f}" if r["thp_speedup"] else f"{'-':>6}"
        spread = " ".join(f"{x:.3f}" for x in r["ratios"])
        print(
            f"{r['model']:<8} {r['method']:<11} {r['resolution']:>4} {r['batch']:>5} {r['trainable_params']:>11,} "
            f"{r['step_s']:>8.3f} {r['bare_s']:>8.3f} {r['optim_s']:>8.3f} {r['steps_per_s']:>8.2f} {r['ratio']:>6.3f} "
            f"{r['ratio_without_optim']:>7.3f} {thp} {spread:>20}  {r['memory']}"
        )
    print(
        f"device: {rows[0]['device'] if rows else '-'}, threads: {rows[0]['threads'] if rows else '-'}, "
        f"gradient checkpointing: {'on' if args.gradient_checkpointing else 'off'}, "
        f"fused backward pass: {'on (no clipping)' if args.fused_backward_pass else 'off'}; ratio = "
        "trainer step / bare UNet forward+backward (goal <= 1.10); w/o opt = (step - optimizer update) / bare; "
        "THP x = step time without transparent huge pages / with them"
    )


def median_run(done: list[dict]) -> dict | None:
    """Of `--repeat` runs of one configuration (each its own process), the one with the median ratio, and every
    run's ratio beside it (this CPU's noise between processes is larger than within one)."""
    if not done:
        return None
    ranked = sorted(done, key=lambda r: r["ratio"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    row["ratios"] = [r["ratio"] for r in done]
    return row


def run_one(args, model: str, method: str, sd_res: int, thp: str) -> dict | None:
    """One configuration in its own process (its own peak memory, its own THP setting)."""
    cmd = [
        sys.executable,
        __file__,
        "--one",
        model,
        method,
        "--steps",
        str(args.steps),
        "--sd-resolution",
        str(sd_res),
    ]
    cmd += ["--batch", str(args.batch)] if args.batch else []
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    cmd += ["--fused-backward-pass"] if args.fused_backward_pass else []
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        err = done.stderr.strip().splitlines()[-1:]
        print(f"{model}/{method} (THP {thp}): failed: {err}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
