"""Custom Diffusion (Kumari et al. 2023, arXiv 2212.04488; methods.md §5): only the UNet's cross-attention key and
value projections train (optionally query and output too), plus the embedding of one new modifier token.

Mechanism (as diffusers' `train_custom_diffusion.py`): every cross-attention layer gets diffusers'
`CustomDiffusionAttnProcessor2_0` whose `to_k_custom_diffusion` / `to_v_custom_diffusion` copies of the pretrained
weights are the trained parameters. The processor also stops gradients through the first (BOS) token's keys and
values, as in diffusers. The pretrained Linear layers are untouched, so the frozen base model (prior targets) is the
same UNet with its original processors, and W0 is always at hand for the saved deltas.

The modifier token ("<new1>", `tokens.placeholder`) is added to the tokenizer and its embedding row starts from
`tokens.initializer` (default: the CLIP vocabulary entry "ktn", id 42170, the row the paper initialises from; a
word that is not one token, e.g. on booth's truncated test tokenizers, starts from the mean of its tokens' rows).
Only that row trains: it is a [1, D] parameter spliced into the embedding output, so the optimizer neither holds
state for nor decays the other 49,407 rows (diffusers optimises the whole matrix and zeroes the other gradient rows).

Augmentation (methods.md §5.4, diffusers `CustomDiffusionDataset`): with probability 0.66 the image is shrunk to a
random side in [size // 3, size] and pasted at a random place on a mid-grey canvas (zeros in [-1, 1], as diffusers),
with a loss mask of 1 inside the pasted region shrunk by one latent pixel per side; otherwise it is enlarged to
[1.2 size, 1.4 size) and randomly cropped (mask all ones). The prompt gets "a far away " / "very small " (side
< 0.6 size) or "zoomed in " / "close up " (side > size) *prepended*, exactly as diffusers does, so "a <new1> dog"
becomes e.g. "very small a <new1> dog" (ungrammatical, but it is the distribution the published models saw).
The image is first cropped to the (square) training size, where diffusers resizes it to a square whatever its
aspect. Class images (prior preservation) are not augmented; the engine gives them mask 1.

Output: ``pytorch_custom_diffusion_weights.safetensors`` + ``<new1>.safetensors`` (diffusers) and
``<name>.booth-cd.safetensors`` (deltas + base fingerprint, read by `booth merge` / `booth compress`); see
`booth.train.formats.custom_diffusion`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from booth.errors import BoothError
from booth.train.methods.base import Method

SMALL_WORDS = ("a far away ", "very small ")
LARGE_WORDS = ("zoomed in ", "close up ")
ROWS_PARAMETER = "modifier_rows"


def target_string(prompt: str, token: str | None) -> str:
    """The concept's string for the merge constraint: the prompt from the modifier token on ("a <new1> dog" ->
    "<new1> dog"; the paper's "<new1> {category}"), or the prompt without a leading article."""
    if token and token in prompt:
        return prompt[prompt.index(token) :].strip()
    words = prompt.strip().split()
    if len(words) > 1 and words[0].lower() in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


class CustomDiffusion(Method):
    name = "custom-diffusion"
    # diffusers examples/custom_diffusion: `--learning_rate` default and README recipes (1e-5, batch 2, 250 steps);
    # the original repository's CompVis config: base_learning_rate 1e-5 (scaled by GPUs x batch there).
    default_lr = 1e-5

    @classmethod
    def check_config(cls, config) -> None:
        token = config.tokens.placeholder
        if config.custom_diffusion.modifier_token and token not in config.data.instance_prompt:
            raise BoothError(
                f"custom diffusion: --instance-prompt must contain {token}, e.g. 'a {token} dog' "
                "(or pass --no-modifier-token)"
            )
        if config.train_text_encoder:
            raise BoothError(
                "custom diffusion trains cross-attention and the modifier token only; drop --train-text-encoder"
            )
        if config.tokens.num_vectors != 1:
            raise BoothError("custom diffusion learns one vector per modifier token; drop --num-vectors")

    def __init__(self, config):
        super().__init__(config)
        self._base_processors: dict = {}
        self._trained_processors: dict = {}
        self._token_id: int | None = None

    # --- set-up ----------------------------------------------------------------------------------------------

    def prepare(self, pipe) -> None:
        from booth.train.formats.custom_diffusion import (
            QOUT_KINDS,
            cross_attention_layers,
            custom_processors,
            pretrained_weights,
        )

        super().prepare(pipe)
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise BoothError("custom diffusion supports SD 1.x/2.x models (one text encoder), not SDXL")
        cfg = self.config.custom_diffusion
        unet = pipe.unet
        kinds = ("to_k", "to_v", *(QOUT_KINDS if cfg.train_q_out else ()))
        if cfg.train_q_out:
            for path, attn in cross_attention_layers(unet).items():
                if attn.to_q.bias is not None or attn.to_q.in_features != attn.to_k.out_features:
                    raise BoothError(
                        f"--train-q-out: layer {path} has a query projection diffusers' processor cannot hold"
                    )
        self._base_processors = dict(unet.attn_processors)
        # the trained copies start as the pretrained weights (diffusers: to_k_custom_diffusion <- to_k, ...)
        self._trained_processors = custom_processors(unet, pretrained_weights(unet, kinds))
        self._set_trained(True)
        for proc in self._trained_processors.values():
            proc.float().requires_grad_(True)
        self.components = ["unet"]
        if cfg.modifier_token:
            self._add_modifier_token(pipe)
            self.components.append("text_encoder")

    def _add_modifier_token(self, pipe) -> None:
        from booth.train.formats.custom_diffusion import DEFAULT_INITIALIZER, add_tokens

        token = self.config.tokens.placeholder
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        table = encoder.get_input_embeddings().weight.detach()
        word = self.config.tokens.initializer
        vocab = tokenizer.get_vocab()
        if word is None and DEFAULT_INITIALIZER in vocab and vocab[DEFAULT_INITIALIZER] < table.shape[0]:
            ids = [vocab[DEFAULT_INITIALIZER]]  # the paper's row (CLIP id 42170)
        else:
            ids = tokenizer(word or DEFAULT_INITIALIZER, add_special_tokens=False).input_ids
            if not ids:
                raise BoothError(f"--initializer-token {word!r} has no tokens")
        start = table[ids].float().mean(0)  # a multi-token word starts from the mean of its tokens
        self._token_id = add_tokens(tokenizer, encoder, {token: start})[token]
        encoder.requires_grad_(False)  # the resized matrix is a new, trainable Parameter: freeze it again
        embedding = encoder.get_input_embeddings()
        rows = torch.nn.Parameter(start[None].clone().float())
        embedding.register_parameter(ROWS_PARAMETER, rows)
        first = self._token_id

        def splice(module, args, output):
            """The trained row in place of the modifier token's (frozen) row; gradients reach only that row."""
            ids = args[0]
            selected = ids >= first
            if not bool(selected.any()):
                return output
            trained = getattr(module, ROWS_PARAMETER).to(output.dtype)
            index = (ids - first).clamp(0, trained.shape[0] - 1)
            return torch.where(selected.unsqueeze(-1), trained[index], output)

        embedding.register_forward_hook(splice)

    def _set_trained(self, on: bool) -> None:
        from booth.train.formats.custom_diffusion import set_processors

        set_processors(self.pipe.unet, dict(self._trained_processors if on else self._base_processors))

    def _rows(self) -> torch.Tensor | None:
        if self._token_id is None:
            return None
        return getattr(self.pipe.text_encoder.get_input_embeddings(), ROWS_PARAMETER)

    def after_step(self) -> None:
        """Keep the embedding matrix's modifier row equal to the trained row (what `save` and loaders read)."""
        rows = self._rows()
        if rows is not None:
            weight = self.pipe.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[self._token_id : self._token_id + rows.shape[0]] = rows.to(weight.dtype)

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.after_step()

    # --- the training step -----------------------------------------------------------------------------------

    @property
    def augments(self) -> bool:
        return self.config.custom_diffusion.augment

    def augment(self, sample, rng):
        """The paper's rescale augmentation with size words and a loss mask; None when augmentation is off."""
        if not self.config.custom_diffusion.augment:
            return None
        from booth.train.data import resize_and_crop

        factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        width, height = sample.size
        image = resize_and_crop(sample.image, width, height, crop=self.config.data.crop, rng=rng)
        if self.config.data.flip and rng.random() < 0.5:
            from PIL import Image

            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels, mask, prompt = augment_view(image, sample.prompt, factor, rng)
        return pixels, mask, prompt

    @contextmanager
    def base_model(self) -> Iterator[None]:
        """The pretrained cross-attention (the modifier token appears only in instance prompts)."""
        self._set_trained(False)
        try:
            yield
        finally:
            self._set_trained(True)

    # --- outputs ---------------------------------------------------------------------------------------------

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """{"<path>.to_k.weight": W, ...}: the fine-tuned cross-attention weights (float32, CPU)."""
        from booth.train.formats.custom_diffusion import booth_name

        out = {}
        for key, proc in self._trained_processors.items():
            for name, param in proc.named_parameters():
                booth = booth_name(f"{key}.{name}")
                if booth is not None:
                    out[booth] = param.detach().to("cpu", torch.float32).clone()
        return out

    def save(self, out: Path, metadata: dict[str, str]) -> dict[str, Path]:
        from booth.models.families import detect_family
        from booth.train.formats.custom_diffusion import (
            CustomDiffusionWeights,
            base_fingerprint,
            kinds_of,
            pretrained_weights,
            write_custom_diffusion,
        )

        self.after_step()
        cfg = self.config
        unet = self.pipe.unet
        trained = self.trained_weights()
        base = pretrained_weights(unet, kinds_of(trained))
        deltas = {n: w - base[n].detach().to("cpu", torch.float32) for n, w in trained.items()}
        tokens = {}
        rows = self._rows()
        token = cfg.tokens.placeholder if rows is not None else None
        if rows is not None:
            tokens[token] = rows.detach().to("cpu", torch.float32)[0].clone()
        meta = dict(metadata)
        meta.update(
            {
                "booth.method": self.name,
                "booth.base_fingerprint": base_fingerprint(unet),
                "booth.base_model": metadata.get("ss_sd_model_name", ""),
                "booth.base_model_source": str(cfg.model or ""),
                "booth.architecture": detect_family(self.pipe).architecture,
                "booth.instance_prompt": cfg.data.instance_prompt,
                "booth.targets": json.dumps([target_string(cfg.data.instance_prompt, token)]),
                "booth.train_q_out": str(cfg.custom_diffusion.train_q_out),
            }
        )
        weights = CustomDiffusionWeights(deltas, tokens, meta)
        return write_custom_diffusion(out, cfg.run_name, weights, unet)


def augment_view(image, prompt: str, factor: int, rng) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One augmented view of a training-size image: (pixels [3, H, W] in [-1, 1], mask [1, H, W], prompt).

    diffusers `CustomDiffusionDataset.__getitem__` / `preprocess` on a square of side `size`, generalised to
    width x height with one scale ratio: side s ~ U{size // 3 .. size} with probability 0.66, else
    U{int(1.2 size) .. int(1.4 size) - 1}. s < size: the image shrunk to s and pasted at a random offset on a zero
    (mid-grey) canvas, mask 1 on the pasted region without its outer latent pixel (`factor` pixels per side, the
    VAE's downscale), so the engine's latent mask equals diffusers' `mask[top // f + 1 : (top + s) // f - 1, ...]`;
    s > size: enlarged and randomly cropped, mask all ones. Size words are prepended to the prompt.
    """
    from PIL import Image

    from booth.train.data import to_tensor

    width, height = image.size
    size = min(width, height)
    if rng.random() < 0.66:
        scale = rng.randint(size // 3, size)
    else:
        scale = rng.randint(int(1.2 * size), max(int(1.2 * size), int(1.4 * size) - 1))
    inner_w = max(1, round(width * scale / size))
    inner_h = max(1, round(height * scale / size))
    resized = to_tensor(image.resize((inner_w, inner_h), Image.Resampling.BICUBIC))
    if scale > size:
        top, left = rng.randint(0, inner_h - height), rng.randint(0, inner_w - width)
        pixels = resized[:, top : top + height, left : left + width].contiguous()
        mask = torch.ones(1, height, width)
    else:
        top, left = rng.randint(0, height - inner_h), rng.randint(0, width - inner_w)
        pixels = torch.zeros(3, height, width)
        pixels[:, top : top + inner_h, left : left + inner_w] = resized
        mask = torch.zeros(1, height, width)
        y0, y1 = (top // factor + 1) * factor, ((top + inner_h) // factor - 1) * factor
        x0, x1 = (left // factor + 1) * factor, ((left + inner_w) // factor - 1) * factor
        if y1 > y0 and x1 > x0:
            mask[:, y0:y1, x0:x1] = 1.0
        else:  # too small to shrink (tiny training sizes): the pasted region itself
            mask[:, top : top + inner_h, left : left + inner_w] = 1.0
    if scale < 0.6 * size:
        prompt = rng.choice(SMALL_WORDS) + prompt
    elif scale > size:
        prompt = rng.choice(LARGE_WORDS) + prompt
    return pixels, mask, prompt
