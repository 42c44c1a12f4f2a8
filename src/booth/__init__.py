"""booth: subject-driven text-to-image generation.

Personalize a diffusion model from a few photos, generate with AUTOMATIC1111-grade prompts and samplers,
evaluate with the DreamBench protocol, and serve an A1111-compatible API.
"""

import os

__version__ = "0.1.0"

# Transparent huge pages for CPU tensors of 2 MB and more. torch reads this once, before its first allocation,
# so it must be set before torch is imported. A backward pass allocates every gradient afresh each step; with
# 4 KB pages the page faults cost half of the backward of a full SD-1.5 fine-tune on the CPU (see
# docs/training.md, measured by benchmarks/train_speed.py --compare-thp). THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from booth.errors import BoothError  # noqa: E402

__all__ = ["BoothError", "__version__"]
