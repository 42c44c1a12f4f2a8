"""booth-mini generation speed: one 64x64 image, 20 steps (DPM++ 2M), on the CPU; goal under 1 second.

Loads the model once, generates one warm-up image, then times `--runs` single-image generations and prints
the median time per image and its ratio to the 1 s target (ratio < 1 meets it).

    python benchmarks/mini_speed.py                      # the bundled booth-mini, all CPU threads
    python benchmarks/mini_speed.py --model DIR --threads 1 --runs 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TARGET_SECONDS = 1.0


def time_images(model: str | None, steps: int, runs: int, device: str) -> list[float]:
    """Seconds for each of `runs` single-image generations (after one untimed warm-up)."""
    from booth.generate.engine import Engine
    from booth.generate.params import GenerationParams

    engine = Engine.from_model(model, device=device)
    params = GenerationParams(
        prompt="a small dog in the top left on a blue background, noto style",
        steps=steps,
        seed=0,
        batch_size=1,
        sampler_name="DPM++ 2M",
    )
    engine.generate(params)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.generate(params)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    """Parse flags, time, print the median and the ratio to the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="pipeline folder (default: the bundled booth-mini)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    times = time_images(args.model, args.steps, args.runs, args.device)
    median = statistics.median(times)
    print(f"device {args.device}, {torch.get_num_threads()} thread(s), {args.steps} steps, {args.runs} runs")
    print(f"median {median:.3f} s per image (min {min(times):.3f}, max {max(times):.3f})")
    print(
        f"ratio to the {TARGET_SECONDS:g} s target: {median / TARGET_SECONDS:.2f} "
        f"({'meets' if median < TARGET_SECONDS else 'misses'} it)"
    )


if __name__ == "__main__":
    main()
