"""Textual Inversion (Gal et al. 2022, arXiv 2208.01618): learn the embedding of a new word, S_*, from a few
images; the UNet, VAE and the text encoder (its existing vocabulary included) stay frozen.

* New tokens: ``<sks>``, then ``<sks>_1 ... <sks>_{n-1}`` for ``num_vectors = n`` (diffusers' naming), added to
  the tokenizer (both for SDXL). A token that is already in the vocabulary - as itself or as a whole word
  (CLIP's ``word</w>``) - is refused: the new vectors would silently replace an existing word.
* Initialisation: every new vector starts as the **mean** of the initializer's token embeddings (the paper
  starts from a one-word coarse descriptor; diffusers requires the initializer to be one token and copies it;
  a word that CLIP splits, e.g. "sculpture" in a small vocabulary, is averaged instead of refused).
* Only the new rows train: the text encoder's token-embedding module is replaced by `LearnedTokenEmbedding`,
  which holds the frozen (resized) table and a trainable ``[n, D]`` parameter for the new ids. The optimizer
  sees only that parameter, so the existing vocabulary cannot drift (diffusers gives AdamW the whole table
  and restores the old rows after every step instead).
* Prompts: always the paper's templates, drawn per sample and step - 27 "object" templates ("a photo of a
  {}", ...) or 19 "style" templates ("a painting in the style of {}", ...) - with all ``n`` tokens, joined by
  spaces, in place of ``{}``. The instance prompt and per-image captions are not used (as diffusers' and
  kohya's trainers); the instance prompt is still recorded in the metadata.
* Prior preservation does not apply (a class prompt never contains the new word, so its loss has no gradient)
  and is refused, as are ``train_text_encoder`` and several concepts (one word per run).

Output: ``learned_embeds.safetensors`` (diffusers: ``{"<sks>": [n, D]}``, loads with
``pipe.load_textual_inversion(path)``; SDXL: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``, diffusers'
advanced-script layout, one ``load_textual_inversion`` call per encoder) and ``<name>.safetensors``
(``{"emb_params": [n, D]}``, or the SDXL pair) for A1111, kohya and ComfyUI, where the file name is the trigger
word: ``name`` if set, else the placeholder without ``<>`` ("<sks>" -> ``sks.safetensors``). booth loads both
with ``booth generate --embeddings-dir RUN``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from booth.errors import BoothError
from booth.train.methods.base import Method

# (text encoder, tokenizer, key of its vectors in an SDXL embedding file)
ENCODERS = (("text_encoder", "tokenizer", "clip_l"), ("text_encoder_2", "tokenizer_2", "clip_g"))

# The paper's 27 training templates for an object (CLIP's ImageNet prompt style, as in rinongal/textual_inversion
# and diffusers' `imagenet_templates_small`), and the 19 for a style. Repeated entries are kept: they weight the
# uniform draw as in the original lists.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


class LearnedTokenEmbedding(torch.nn.Embedding):
    """A token-embedding table whose rows for `token_ids` come from a small trainable parameter.

    ``forward(ids) = weight[ids]``, except that id ``token_ids[k]`` gives ``rows[k]``. `weight` (the resized base
    table, shared, frozen) never receives a gradient; `sync` copies `rows` into it so code that reads
    ``get_input_embeddings().weight`` sees the learned vectors. `enabled = False` gives the plain table lookup.
    """

    def __init__(self, table: torch.nn.Embedding, token_ids: list[int], init: torch.Tensor):
        super().__init__(
            table.num_embeddings,
            table.embedding_dim,
            padding_idx=table.padding_idx,
            _weight=table.weight.detach(),
            _freeze=True,
        )
        self.token_ids = list(token_ids)
        self.rows = torch.nn.Parameter(init.detach().to(torch.float32).clone())
        self.enabled = True
        self.sync()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        if not self.enabled:
            return out
        rows = self.rows.to(out.dtype)
        for k, token_id in enumerate(self.token_ids):
            out = torch.where((input_ids == token_id).unsqueeze(-1), rows[k], out)
        return out

    @torch.no_grad()
    def sync(self) -> None:
        self.weight[self.token_ids] = self.rows.detach().to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, learned ids={self.token_ids}"


class TextualInversion(Method):
    name = "textual-inversion"
    # rinongal/textual_inversion `v1-finetune.yaml` base_learning_rate (the paper's 0.005), here not multiplied
    # by GPUs x batch size. diffusers' README run is 5e-4 x 4 (--scale_lr, accumulation 4) = 2e-3 effective.
    default_lr = 5e-3

    @classmethod
    def check_config(cls, config) -> None:
        if not (config.tokens.initializer or "").strip():
            raise BoothError(
                "textual inversion needs --initializer-token: a word the new embedding starts from, "
                "close to the subject (e.g. its class noun: dog)"
            )
        if config.prior.enabled:
            raise BoothError(
                "--prior-preservation does not apply to textual inversion: only the new word trains and a "
                "class prompt never contains it; drop the flag"
            )
        if getattr(config, "concepts", None):
            raise BoothError(
                "textual inversion learns one new word per run; train each concept in its own run "
                "(--concepts is for DreamBooth, LoRA and Custom Diffusion)"
            )
        if config.train_text_encoder:
            raise BoothError(
                "--train-text-encoder is a DreamBooth option; textual inversion trains only the new word"
            )
        cls.check_trigger_word(config)

    @staticmethod
    def trigger_word(config) -> str:
        """The A1111 file's stem, its trigger word there: `name`, else the placeholder without ``<>``, else the
        run name; ``-a1111`` added if that would clash with diffusers' file name."""
        from booth.train.formats.embeddings import DIFFUSERS_EMBEDDING_FILE, safe_file_stem

        stem = config.name or safe_file_stem(config.tokens.placeholder) or config.run_name
        return stem + "-a1111" if f"{stem}.safetensors" == DIFFUSERS_EMBEDDING_FILE else stem

    @classmethod
    def check_trigger_word(cls, config) -> None:
        """Refuse an A1111 trigger word that is one of the initializer's words: it would hijack that word."""
        trigger = cls.trigger_word(config)
        words = {w.lower() for w in (config.tokens.initializer or "").split()}
        if trigger.lower() in words:
            raise BoothError(
                f"the A1111 embedding would be {trigger}.safetensors, and its file name is its trigger word: "
                f"every prompt with {trigger!r} (the initializer word) would get the learned vectors instead; "
                "choose another --name"
            )

    def __init__(self, config):
        super().__init__(config)
        t = config.tokens
        self.tokens = [t.placeholder] + [f"{t.placeholder}_{i}" for i in range(1, t.num_vectors)]
        self.placeholder_text = " ".join(self.tokens)  # what the templates put in place of {}
        self._base_tokenizers: dict[str, object] = {}
        self._keys: dict[str, str] = {}  # text encoder -> clip_l / clip_g

    # --- set-up --------------------------------------------------------------------------------------------

    def prepare(self, pipe) -> None:
        super().prepare(pipe)
        initializer = self.config.tokens.initializer.strip()
        pairs = [
            (te, tok, key)
            for te, tok, key in ENCODERS
            if getattr(pipe, te, None) is not None and getattr(pipe, tok, None) is not None
        ]
        if not pairs:
            raise BoothError(f"{type(pipe).__name__} has no text encoder and tokenizer to add a word to")
        # check everything before the pipeline is changed
        init_ids = {}
        for te, tok_name, _ in pairs:
            tokenizer = getattr(pipe, tok_name)
            vocab = tokenizer.get_vocab()
            for token in self.tokens:
                if token in vocab or f"{token}</w>" in vocab:
                    raise BoothError(
                        f"the placeholder token {token!r} is already in the {tok_name}'s vocabulary; choose "
                        "a new word with --placeholder-token (e.g. '<my-subject>')"
                    )
            ids = tokenizer(initializer, add_special_tokens=False).input_ids
            if not ids:
                raise BoothError(
                    f"--initializer-token {initializer!r} encodes to no tokens; use a word such as the "
                    "subject's class noun (e.g. dog)"
                )
            init_ids[te] = ids
        n = len(self.tokens)
        self.components = []
        for te_name, tok_name, key in pairs:
            tokenizer, encoder = getattr(pipe, tok_name), getattr(pipe, te_name)
            self._base_tokenizers[tok_name] = copy.deepcopy(tokenizer)  # for `base_model`
            table = encoder.get_input_embeddings()
            init = table.weight.detach()[init_ids[te_name]].float().mean(0)
            tokenizer.add_tokens(self.tokens)
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            encoded = tokenizer(self.placeholder_text, add_special_tokens=False).input_ids
            if encoded != ids:
                raise BoothError(
                    f"the placeholder {self.config.tokens.placeholder!r} does not tokenize as a new word "
                    f"(the tokenizer changes it, e.g. to lower case); use a lower-case token such as '<sks>'"
                )
            size = max(table.num_embeddings, max(ids) + 1)
            if size > table.num_embeddings:
                encoder.resize_token_embeddings(size, mean_resizing=False)
            module = LearnedTokenEmbedding(encoder.get_input_embeddings(), ids, init.expand(n, -1))
            encoder.set_input_embeddings(module)
            self.components.append(te_name)
            self._keys[te_name] = key

    def embedding_modules(self) -> dict[str, LearnedTokenEmbedding]:
        """The learned-token module of each text encoder that trains."""
        return {c: getattr(self.pipe, c).get_input_embeddings() for c in self.components}

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {f"{c}.token_embedding.rows": m.rows for c, m in self.embedding_modules().items()}

    # --- the training step ---------------------------------------------------------------------------------

    def training_prompts(self, samples, rng) -> list[str]:
        templates = STYLE_TEMPLATES if self.config.tokens.learnable_property == "style" else OBJECT_TEMPLATES
        return [
            s.prompt if s.is_prior else rng.choice(templates).format(self.placeholder_text) for s in samples
        ]

    def after_step(self) -> None:
        for module in self.embedding_modules().values():
            module.sync()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.after_step()

    # --- the frozen base model -----------------------------------------------------------------------------

    @contextmanager
    def base_model(self) -> Iterator[None]:
        """The base tokenizers (without the new words) and plain table lookups."""
        trained = {n: getattr(self.pipe, n) for n in self._base_tokenizers}
        modules = list(self.embedding_modules().values())
        for n, tok in self._base_tokenizers.items():
            setattr(self.pipe, n, tok)
        for m in modules:
            m.enabled = False
        try:
            yield
        finally:
            for n, tok in trained.items():
                setattr(self.pipe, n, tok)
            for m in modules:
                m.enabled = True

    # --- outputs -------------------------------------------------------------------------------------------

    def learned_vectors(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """`[n, D]` (one text encoder) or ``{"clip_l": ..., "clip_g": ...}`` (SDXL), float32 on the CPU."""
        vectors = {
            self._keys[c]: m.rows.detach().to("cpu", torch.float32).clone()
            for c, m in self.embedding_modules().items()
        }
        return vectors if len(vectors) > 1 else next(iter(vectors.values()))

    def file_stem(self) -> str:
        """The A1111 file's name (= its trigger word there); see `trigger_word`."""
        return self.trigger_word(self.config)

    def save(self, out: Path, metadata: dict[str, str]) -> dict[str, Path]:
        from booth.train.formats.embeddings import DIFFUSERS_EMBEDDING_FILE, save_embedding

        self.after_step()
        t = self.config.tokens
        vectors = self.learned_vectors()
        meta = {
            **metadata,
            "booth.method": self.name,
            "booth.placeholder": t.placeholder,
            "booth.tokens": " ".join(self.tokens),
            "booth.initializer": t.initializer or "",
            "booth.learnable_property": t.learnable_property,
        }
        out.mkdir(parents=True, exist_ok=True)
        token = None if isinstance(vectors, dict) else t.placeholder
        return {
            "diffusers": save_embedding(out / DIFFUSERS_EMBEDDING_FILE, vectors, token=token, metadata=meta),
            "embedding": save_embedding(out / f"{self.file_stem()}.safetensors", vectors, metadata=meta),
        }
