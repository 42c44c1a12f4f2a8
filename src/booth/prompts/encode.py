"""Weighted, unlimited-length prompt encoding for diffusers CLIP text encoders (A1111 modules/sd_hijack_clip.py).

A prompt is split into `(fragment, weight)` pairs (`parse_prompt_attention`), tokenized without BOS/EOS and
packed into chunks of 75 tokens; each chunk becomes BOS + 75 + EOS = 77 tokens, is encoded on its own, and the
chunk outputs are concatenated along the token axis. Each token's hidden state is then multiplied by its weight
(A1111 modules/sd_emphasis.py). Textual-inversion vectors are spliced into the token embeddings in place of
their trigger word.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from booth.errors import BoothError
from booth.prompts.attention import BREAK_MARKER, parse_prompt_attention

CHUNK_LENGTH = 75  # tokens per chunk between BOS and EOS
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
_PLACEHOLDER_ID = 0  # token id under a textual-inversion vector (A1111 uses 0 too); never EOS


@dataclass
class Conditioning:
    """Encoded prompts.

    Attributes:
        embeds: `[B, 77 * n_chunks, D]`, every text padded to the same number of chunks (D = sum of widths).
        pooled: `[B, D2]` pooled projection of the last encoder (SDXL's `text_embeds`), else None.
        used_embeddings: names of the textual-inversion embeddings found in the texts (for `TI hashes`).
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    used_embeddings: set[str] = field(default_factory=set)


@dataclass
class _Chunk:
    """75 token ids between BOS and EOS, their weights and the TI vectors placed at token offsets."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, str]] = field(default_factory=list)  # (offset into tokens, embedding name)


class _ChunkPacker:
    """Packs weighted tokens into chunks: BREAK, comma backtrack, TI vectors never split. A1111 sd_hijack_clip.py."""

    def __init__(self, backtrack: int, comma_id: int | None):
        self.backtrack, self.comma_id = backtrack, comma_id
        self.chunks: list[_Chunk] = []
        self.current = _Chunk()
        self.last_comma = -1
        self.token_count = 0

    def close(self, is_last: bool = False) -> None:
        """End the current chunk (a non-final chunk counts as 75 tokens for the token counter)."""
        self.token_count += len(self.current.tokens) if is_last else CHUNK_LENGTH
        self.chunks.append(self.current)
        self.current = _Chunk()
        self.last_comma = -1

    def before_token(self, token: int) -> None:
        """Note commas; at a full chunk move the text after a recent comma to the next chunk, then close."""
        chunk = self.current
        if token == self.comma_id:
            self.last_comma = len(chunk.tokens)
        elif (
            self.backtrack
            and len(chunk.tokens) == CHUNK_LENGTH
            and self.last_comma != -1
            and len(chunk.tokens) - self.last_comma <= self.backtrack
        ):
            self._move_after_comma()
        if len(self.current.tokens) == CHUNK_LENGTH:
            self.close()

    def _move_after_comma(self) -> None:
        """Split the full chunk after its last comma; the tail (and its TI vectors) starts the next chunk."""
        chunk, cut = self.current, self.last_comma + 1
        tail = _Chunk(
            chunk.tokens[cut:], chunk.weights[cut:], [(o - cut, n) for o, n in chunk.fixes if o >= cut]
        )
        chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
        chunk.fixes = [(o, n) for o, n in chunk.fixes if o < cut]
        self.close()
        self.current = tail

    def add_token(self, token: int, weight: float) -> None:
        self.current.tokens.append(token)
        self.current.weights.append(weight)

    def add_embedding(self, name: str, n_vectors: int, weight: float) -> None:
        """Place `n_vectors` TI vectors, in the next chunk if they do not fit in this one."""
        if len(self.current.tokens) + n_vectors > CHUNK_LENGTH:
            self.close()
        self.current.fixes.append((len(self.current.tokens), name))
        self.current.tokens += [_PLACEHOLDER_ID] * n_vectors
        self.current.weights += [weight] * n_vectors

    def finish(self) -> tuple[list[_Chunk], int]:
        """All chunks (at least one) and the token count."""
        if self.current.tokens or not self.chunks:
            self.close(is_last=True)
        return self.chunks, self.token_count


def _as_vectors(value: torch.Tensor, name: str, width: int) -> torch.Tensor:
    """An embedding as `[n, width]`; a 1-D tensor is one vector."""
    vectors = value.detach().reshape(1, -1) if value.dim() == 1 else value.detach()
    if vectors.dim() != 2 or vectors.shape[1] != width:
        raise BoothError(
            f"embedding {name!r} has shape {tuple(value.shape)}, the text encoder needs [n, {width}]"
        )
    if not 1 <= vectors.shape[0] <= CHUNK_LENGTH:
        raise BoothError(
            f"embedding {name!r} has {vectors.shape[0]} vectors, at most {CHUNK_LENGTH} fit a chunk"
        )
    return vectors


class _Branch:
    """One tokenizer + CLIP text encoder pair (SDXL has two: "clip_l" and "clip_g")."""

    def __init__(self, tokenizer, text_encoder, key: str, embeddings: dict):
        self.tokenizer, self.text_encoder, self.key = tokenizer, text_encoder, key
        self.id_start, self.id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.id_pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.id_end
        comma = tokenizer.convert_tokens_to_ids(",</w>")
        self.comma_id = comma if comma != tokenizer.unk_token_id else None
        self.width = text_encoder.config.hidden_size
        self.vectors = {name: self._vectors_of(name, value) for name, value in embeddings.items()}
        self.lookup = self._build_lookup()

    def _vectors_of(self, name: str, value) -> torch.Tensor:
        """This encoder's vectors of an embedding (a tensor, or a dict by encoder key for SDXL)."""
        if isinstance(value, dict):
            if self.key not in value:
                raise BoothError(f"embedding {name!r} has no {self.key!r} vectors (keys: {sorted(value)})")
            value = value[self.key]
        return _as_vectors(value, name, self.width)

    def _build_lookup(self) -> dict[int, list[tuple[tuple[int, ...], str]]]:
        """first token id -> [(trigger token ids, name)], longest first. A1111 textual_inversion.py."""
        lookup: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in self.vectors:
            ids = tuple(self.tokenize([name])[0])
            if not ids:
                raise BoothError(f"embedding name {name!r} has no tokens")
            lookup.setdefault(ids[0], []).append((ids, name))
        for entries in lookup.values():
            entries.sort(key=lambda entry: -len(entry[0]))
        return lookup

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids without BOS/EOS, any length."""
        return self.tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]

    def embedding_at(self, ids: list[int], pos: int) -> tuple[str, int] | None:
        """(name, trigger length) of the longest embedding trigger starting at `pos`."""
        for trigger, name in self.lookup.get(ids[pos], []):
            if tuple(ids[pos : pos + len(trigger)]) == trigger:
                return name, len(trigger)
        return None

    def pack(self, fragments: list[tuple[str, float]], backtrack: int) -> tuple[list[_Chunk], int]:
        """Weighted fragments -> chunks of at most 75 tokens, and the token count."""
        packer = _ChunkPacker(backtrack, self.comma_id)
        texts = [text for text, _ in fragments]
        for (text, weight), ids in zip(fragments, self.tokenize(texts)):
            if (text, weight) == BREAK_MARKER:
                packer.close()
                continue
            pos = 0
            while pos < len(ids):
                packer.before_token(ids[pos])
                found = self.embedding_at(ids, pos)
                if found is None:
                    packer.add_token(ids[pos], weight)
                    pos += 1
                else:
                    name, length = found
                    packer.add_embedding(name, self.vectors[name].shape[0], weight)
                    pos += length
        return packer.finish()

    def token_ids(self, chunks: list[_Chunk]) -> torch.Tensor:
        """`[N, 77]` ids: BOS, tokens, EOS, then the pad id (SD1: EOS again; SD2/OpenCLIP: "!", id 0)."""
        rows = [
            [self.id_start, *chunk.tokens, self.id_end, *[self.id_pad] * (CHUNK_LENGTH - len(chunk.tokens))]
            for chunk in chunks
        ]
        return torch.tensor(rows, dtype=torch.long, device=self.text_encoder.device)

    def input_embeds(self, ids: torch.Tensor, chunks: list[_Chunk]) -> torch.Tensor | None:
        """Token embeddings with TI vectors spliced in, or None when no chunk has any."""
        if not any(chunk.fixes for chunk in chunks):
            return None
        embeds = self.text_encoder.get_input_embeddings()(ids).clone()
        for row, chunk in enumerate(chunks):
            for offset, name in chunk.fixes:
                vectors = self.vectors[name].to(embeds.device, embeds.dtype)
                embeds[row, 1 + offset : 1 + offset + vectors.shape[0]] = vectors
        return embeds

    def run(self, chunks: list[_Chunk]):
        """The text encoder's output (with all hidden states) for the chunks."""
        ids = self.token_ids(chunks)
        embeds = self.input_embeds(ids, chunks)
        with contextlib.ExitStack() as stack:
            if embeds is not None:
                # transformers' CLIP text models take only input_ids: replace the token-embedding output instead.
                hook = self.text_encoder.get_input_embeddings().register_forward_hook(lambda *_: embeds)
                stack.callback(hook.remove)
            return self.text_encoder(input_ids=ids, output_hidden_states=True)

    def final_layer_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        model = getattr(self.text_encoder, "text_model", self.text_encoder)
        return model.final_layer_norm(hidden)


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    """Weight each token's hidden state; "Original" restores each chunk's mean. A1111 modules/sd_emphasis.py.

    Args:
        z: `[N, 77, D]` hidden states of N chunks.
        weights: `[N, 77]` per-token multipliers.
        mode: one of `EMPHASIS_MODES`; "Ignore" and "None" return `z` unchanged.
    """
    if mode not in ("Original", "No norm"):
        return z
    z32 = z.float()
    weighted = z32 * weights.to(z32)[..., None]
    if mode == "Original":
        # z'' = z' * mean(z) / mean(z'), per chunk; a chunk whose weighted mean is exactly 0 is left unscaled
        old_mean, new_mean = z32.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
        ratio = torch.where(new_mean == 0, torch.ones_like(new_mean), old_mean / new_mean)
        weighted = weighted * ratio
    return weighted.to(z.dtype)


class PromptEncoder:
    """A1111 prompt text -> conditioning tensors for one or two CLIP text encoders.

    Args:
        tokenizers: one tokenizer per text encoder.
        text_encoders: `CLIPTextModel` / `CLIPTextModelWithProjection`, same order.
        keys: per encoder, the key of its vectors in dict-valued embeddings (default "clip_l", "clip_g").
        penultimate: SDXL convention: features from `hidden_states[-(clip_skip + 1)]` without final norm, and a
            pooled output from the last encoder's projection. Otherwise (SD 1.x/2.x) `final_layer_norm`
            of `hidden_states[-clip_skip]`.
        clip_skip: A1111 "Clip skip" (1 = last layer).
        emphasis: "Original", "No norm", "Ignore" or "None".
        embeddings: textual-inversion vectors by trigger word: `[n, D]` tensors or, for SDXL,
            `{"clip_l": [n, 768], "clip_g": [n, 1280]}`.
        comma_padding_backtrack: A1111 `comma_padding_backtrack` (0 disables).

    Attributes:
        used_embeddings: names of the embeddings used by all `encode` calls so far (infotext `TI hashes`).
    """

    def __init__(
        self,
        tokenizers: Sequence,
        text_encoders: Sequence,
        *,
        keys: Sequence[str] | None = None,
        penultimate: bool = False,
        clip_skip: int = 1,
        emphasis: str = "Original",
        embeddings: dict[str, torch.Tensor | dict[str, torch.Tensor]] | None = None,
        comma_padding_backtrack: int = 20,
    ):
        if not text_encoders or len(tokenizers) != len(text_encoders):
            raise BoothError("PromptEncoder needs one tokenizer per text encoder")
        if emphasis not in EMPHASIS_MODES:
            raise BoothError(f"unknown emphasis mode {emphasis!r}; choose one of {', '.join(EMPHASIS_MODES)}")
        layers = min(te.config.num_hidden_layers for te in text_encoders)
        if not 1 <= clip_skip <= layers:
            raise BoothError(f"clip_skip must be in [1, {layers}], got {clip_skip}")
        if comma_padding_backtrack < 0:
            raise BoothError(f"comma_padding_backtrack must be >= 0, got {comma_padding_backtrack}")
        keys = list(keys) if keys is not None else ["clip_l", "clip_g"][: len(text_encoders)]
        self.branches = [
            _Branch(tok, te, key, embeddings or {}) for tok, te, key in zip(tokenizers, text_encoders, keys)
        ]
        self.penultimate = penultimate
        self.clip_skip = clip_skip
        self.emphasis = emphasis
        self.comma_padding_backtrack = comma_padding_backtrack
        self.used_embeddings: set[str] = set()  # every embedding any `encode` call of this encoder used

    @classmethod
    def from_pipeline(
        cls,
        pipe,
        clip_skip: int = 1,
        emphasis: str = "Original",
        embeddings: dict[str, torch.Tensor | dict[str, torch.Tensor]] | None = None,
        comma_padding_backtrack: int = 20,
    ) -> PromptEncoder:
        """An encoder for a diffusers SD 1.x/2.x pipeline (`text_encoder`) or SDXL (`text_encoder`, `_2`)."""
        pairs = [
            (getattr(pipe, tok, None), getattr(pipe, te, None), key)
            for tok, te, key in (
                ("tokenizer", "text_encoder", "clip_l"),
                ("tokenizer_2", "text_encoder_2", "clip_g"),
            )
        ]
        pairs = [pair for pair in pairs if pair[0] is not None and pair[1] is not None]
        if not pairs:
            raise BoothError(
                f"{type(pipe).__name__} has no tokenizer and text encoder to encode prompts with"
            )
        return cls(
            [tok for tok, _, _ in pairs],
            [te for _, te, _ in pairs],
            keys=[key for _, _, key in pairs],
            penultimate=getattr(pipe, "text_encoder_2", None) is not None,
            clip_skip=clip_skip,
            emphasis=emphasis,
            embeddings=embeddings,
            comma_padding_backtrack=comma_padding_backtrack,
        )

    def fragments(self, text: str) -> list[tuple[str, float]]:
        """The weighted fragments of one text under the emphasis mode ("None": the literal text)."""
        return [(text, 1.0)] if self.emphasis == "None" else parse_prompt_attention(text)

    def _features(self, branch: _Branch, chunks: list[_Chunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`[N, 77, D]` weighted features of the chunks and the pooled projection (or None)."""
        out = branch.run(chunks)
        if self.penultimate:
            z = out.hidden_states[-(self.clip_skip + 1)]
        else:
            z = branch.final_layer_norm(out.hidden_states[-self.clip_skip])
        weights = torch.tensor(
            [[1.0, *c.weights, *[1.0] * (CHUNK_LENGTH + 1 - len(c.weights))] for c in chunks]
        )
        pooled = getattr(out, "text_embeds", None) if self.penultimate else None
        return apply_emphasis(z, weights, self.emphasis), pooled

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Conditioning:
        """Encode prompt texts (already free of extra-network tags, `AND` and scheduling syntax).

        Identical texts are encoded once; texts with fewer chunks are padded with the encoding of an empty chunk.
        """
        if not texts:
            raise BoothError("encode() needs at least one text")
        unique = list(dict.fromkeys(texts))
        packed = [
            [branch.pack(self.fragments(t), self.comma_padding_backtrack)[0] for t in unique]
            for branch in self.branches
        ]
        n_chunks = max(len(chunks) for per_branch in packed for chunks in per_branch)
        features, pooled = [], None
        for branch, per_text in zip(self.branches, packed):
            flat = [c for chunks in per_text for c in chunks + [_Chunk()] * (n_chunks - len(chunks))]
            z, branch_pooled = self._features(branch, flat)
            features.append(z.reshape(len(unique), n_chunks * (CHUNK_LENGTH + 2), z.shape[-1]))
            if branch_pooled is not None:
                pooled = branch_pooled.reshape(len(unique), n_chunks, -1)[:, 0]
        index = torch.tensor([unique.index(t) for t in texts], device=features[0].device)
        embeds = torch.cat(features, dim=-1)[index]
        used = {name for per_text in packed for chunks in per_text for c in chunks for _, name in c.fixes}
        self.used_embeddings |= used
        return Conditioning(embeds, pooled[index] if pooled is not None else None, used)

    def pad_to_same_length(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad `[B, 77 * n, D]` conditionings to the same n with the encoding of the empty prompt (A1111 pad_cond)."""
        n_a, n_b = a.shape[1], b.shape[1]
        if n_a == n_b:
            return a, b
        empty = self.encode([""]).embeds.to(a.device, a.dtype)

        def pad(x: torch.Tensor, length: int) -> torch.Tensor:
            repeats = (length - x.shape[1]) // empty.shape[1]
            return torch.cat([x, empty.expand(x.shape[0], -1, -1).repeat(1, repeats, 1)], dim=1)

        length = max(n_a, n_b)
        return pad(a, length), pad(b, length)

    def token_count(self, text: str, steps: int = 20, negative: bool = False) -> tuple[int, int]:
        """`(tokens used, chunk capacity)` of the longest scheduled variant, like A1111's token counter.

        Extra-network tags are removed, a positive prompt is split on `AND`, and every scheduled text is counted.
        A1111 modules/ui.py, update_token_counter.
        """
        from booth.prompts.composable import split_and
        from booth.prompts.extra_networks import parse_extra_networks
        from booth.prompts.schedule import get_prompt_schedule

        text, _ = parse_extra_networks(text)
        sub_prompts = [text] if negative else [sub for sub, _ in split_and(text)]
        variants = [variant for sub in sub_prompts for _, variant in get_prompt_schedule(sub, steps)]
        used = max(
            self.branches[0].pack(self.fragments(v), self.comma_padding_backtrack)[1] for v in variants
        )
        return used, math.ceil(max(used, 1) / CHUNK_LENGTH) * CHUNK_LENGTH
