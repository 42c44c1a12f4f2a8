"""booth: subject-driven text-to-image generation.

Personalize a diffusion model from a few photos, generate with AUTOMATIC1111-grade prompts and samplers,
evaluate with the DreamBench protocol, and serve an A1111-compatible API.
"""

__version__ = "0.1.0"

from booth.errors import BoothError  # noqa: E402

__all__ = ["BoothError", "__version__"]
