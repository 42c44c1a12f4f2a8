"""What leaving the negative prompt out saves: A1111's Negative Guidance minimum sigma (NGMS, `s_min_uncond`) and
Skip Early CFG against full classifier-free guidance, side by side.

Loads the model once (default: the bundled booth-mini), then times the settings in alternating rounds (so the
machine's drift falls on all of them alike) and prints for each the median seconds a batch, its ratio to full
guidance, the share of UNet rows it ran (counted by a hook) and the mean pixel difference to the full-guidance
pictures (0-255; what it changes).

    python benchmarks/ngms.py                              # booth-mini, 4 pictures, 20 steps, DPM++ 2M
    python benchmarks/ngms.py --model DIR --size 512 --batch 1 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SETTINGS = {
    "full CFG": {},
    "NGMS 1.0": {"s_min_uncond": 1.0},
    "NGMS 1.0, all steps": {"s_min_uncond": 1.0, "s_min_uncond_all": True},
    "NGMS 4.0": {"s_min_uncond": 4.0},
    "Skip Early CFG 0.2": {"skip_early_cond": 0.2},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder or checkpoint (default: booth-mini)")
    parser.add_argument("--size", type=int, default=None, help="picture side (default: the model's own)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from booth.generate.engine import Engine
    from booth.generate.params import GenerationParams

    engine = Engine.from_model(args.model)
    base = GenerationParams(
        prompt="a small red apple in the top left on a blue background, openmoji style",
        negative_prompt="blurry",
        steps=args.steps,
        seed=0,
        batch_size=args.batch,
        sampler_name="DPM++ 2M",
        width=args.size,
        height=args.size,
    )
    rows: list[int] = []
    engine.pipe.unet.register_forward_pre_hook(lambda module, inputs: rows.append(inputs[0].shape[0]))
    engine.generate(base.replace(batch_size=1))  # warm-up
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    pictures, counted = {}, {}
    for _ in range(args.rounds):
        for name, changes in SETTINGS.items():
            rows.clear()
            start = time.perf_counter()
            result = engine.generate(base.replace(**changes))
            times[name].append(time.perf_counter() - start)
            counted[name] = sum(rows)
            pictures[name] = np.stack([np.asarray(im, dtype=np.float32) for im in result.images])
    full = statistics.median(times["full CFG"])
    print(
        f"{engine.model.name}, {args.batch} x {result.width}x{result.height}, {args.steps} steps, {args.rounds} rounds"
    )
    for name in SETTINGS:
        median = statistics.median(times[name])
        diff = float(np.abs(pictures[name] - pictures["full CFG"]).mean())
        print(
            f"{name:>22}: {median:6.3f} s a batch, time / full CFG {median / full:.2f}, "
            f"UNet rows {counted[name] / counted['full CFG']:.2f}, pixel difference {diff:5.2f}"
        )


if __name__ == "__main__":
    main()
