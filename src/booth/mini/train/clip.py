"""The ``clip`` stage: mini-CLIP with symmetric InfoNCE and the zero-shot terms (steps 1-5 of the loop)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from booth.mini import architecture as arch_mod
from booth.mini.compose import caption
from booth.mini.train.config import TrainConfig
from booth.mini.train.data import (
    MiniData,
    hard_negative,
    part_cross_entropy,
    part_phrases,
    record_caption,
    sample_parts,
)
from booth.mini.train.workdir import autocast

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the temperature at 100 (Radford et al. 2021)


class ClipTask:
    """mini-CLIP: symmetric InfoNCE over a batch of (image, caption) pairs."""

    def __init__(self, config: TrainConfig, data: MiniData, device: torch.device, seed: int):
        self.cfg, self.data, self.device = config.clip, data, device
        self.model = arch_mod.build_clip(config.arch.clip, seed=seed).to(device).train()
        self.tokenizer = arch_mod.build_tokenizer(config.arch.clip)
        self.arch = config.arch.clip
        self.vocab = {key: sorted({r[key] for r in data.records}) for key in ("concept", "style")}
        self.concept_index = {c: i for i, c in enumerate(self.vocab["concept"])}
        self.concept_ids = self._ids([caption(c, None, None, ()) for c in self.vocab["concept"]])
        self.style_index = {s: i for i, s in enumerate(self.vocab["style"])}
        styles = self.vocab["style"]  # the style prompts of every concept: concepts x styles x tokens
        style_ids = self._ids([caption(c, s, None) for c in self.vocab["concept"] for s in styles])
        self.style_ids = style_ids.view(len(self.vocab["concept"]), len(styles), -1)
        self.phrases = part_phrases(self.vocab["style"])
        self.phrase_ids = self._ids([text for values in self.phrases.values() for text in values.values()])

    def compile_targets(self) -> dict[str, torch.nn.Module]:
        """What `--compile` compiles: both towers (on a 2-core CPU 1.04x a step,
        `benchmarks/mini_train_compile.py`)."""
        return {"vision_model": self.model.vision_model, "text_model": self.model.text_model}

    def _ids(self, texts: list[str]) -> torch.Tensor:
        """Token ids padded to the longest text (the causal tower pools at EOS: trailing padding is inert)."""
        ids = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.arch.max_length)
        return torch.tensor(ids["input_ids"], device=self.device)

    def loss(self, index: torch.Tensor, gen: torch.Generator, dtype: torch.dtype | None, step: int = 0):
        # 1. load batch: images, (shortened) captions, hard negatives, the concept prompts
        records = [self.data.records[i] for i in index.tolist()]
        parts = [sample_parts(self.cfg.captions, gen) for _ in records]
        texts = [record_caption(r, p) for r, p in zip(records, parts)]
        negatives = [
            record_caption(hard_negative(r, p or (), self.vocab, gen), p or ())
            for _ in range(self.cfg.hard_negatives)
            for r, p in zip(records, parts)
        ]
        pixels = arch_mod.clip_pixels(self.data.images[index].to(self.device))
        input_ids = self._ids(texts + negatives)
        concepts = torch.tensor([self.concept_index[r["concept"]] for r in records], device=self.device)
        # 2. encode both towers; 3-4. (no noise) predict: cosine similarities scaled by the temperature
        with autocast(self.device, dtype):
            image_emb = self.model.get_image_features(pixel_values=pixels)
            text_emb = self.model.get_text_features(input_ids=input_ids)
            if self.cfg.concept_weight:  # the short concept prompts in their own, shorter batch
                concept_emb = self.model.get_text_features(input_ids=self.concept_ids)
            if self.cfg.phrase_weight:
                phrase_emb = self.model.get_text_features(input_ids=self.phrase_ids)
            if self.cfg.style_weight:  # "a {concept}, {style} style" for every style, per image
                style_emb = self.model.get_text_features(input_ids=self.style_ids[concepts].flatten(0, 1))
        image_emb = F.normalize(arch_mod.pooled(image_emb).float(), dim=-1)
        text_emb = F.normalize(arch_mod.pooled(text_emb).float(), dim=-1)
        scale = self.model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        b = len(texts)
        logits = scale * image_emb @ text_emb.T  # images x (captions + hard negatives)
        # 5. loss: symmetric cross-entropy, identical captions all count as positives (Radford et al. 2021);
        #    image -> text also against the hard negatives; text -> image over the batch's captions
        first = {}
        codes = torch.tensor([first.setdefault(t, len(first)) for t in texts + negatives], device=self.device)
        same = (codes[:b, None] == codes[None, :]).float()
        loss_i2t = F.cross_entropy(logits, same / same.sum(dim=1, keepdim=True))
        same_t = same[:, :b]
        loss_t2i = F.cross_entropy(logits[:, :b].T, same_t / same_t.sum(dim=1, keepdim=True))
        loss = 0.5 * (loss_i2t + loss_t2i)
        accuracy = (logits.argmax(dim=1) == torch.arange(b, device=self.device)).float().mean()
        stats = {"acc": accuracy.item(), "scale": scale.item()}
        if self.cfg.concept_weight:
            concept_logits = scale * image_emb @ F.normalize(arch_mod.pooled(concept_emb).float(), dim=-1).T
            loss = loss + self.cfg.concept_weight * F.cross_entropy(concept_logits, concepts)
            stats["concept_acc"] = (concept_logits.argmax(dim=1) == concepts).float().mean().item()
        if self.cfg.phrase_weight:
            phrase_loss, phrase_acc = self._phrase_loss(records, parts, text_emb[:b], phrase_emb, scale)
            loss = loss + self.cfg.phrase_weight * phrase_loss
            stats["phrase_acc"] = phrase_acc
        if self.cfg.style_weight:
            style_emb = F.normalize(arch_mod.pooled(style_emb).float(), dim=-1).view(
                b, len(self.vocab["style"]), -1
            )
            style_logits = scale * torch.einsum("bd,bsd->bs", image_emb, style_emb)
            labels = torch.tensor([self.style_index[r["style"]] for r in records], device=self.device)
            loss = loss + self.cfg.style_weight * F.cross_entropy(style_logits, labels)
            stats["style_acc"] = (style_logits.argmax(dim=1) == labels).float().mean().item()
        return loss, stats

    def _phrase_loss(self, records, parts, text_emb, phrase_emb, scale):
        """Cross-entropy of each named part of each caption over that part's phrases (text tower only)."""
        phrase_emb = F.normalize(arch_mod.pooled(phrase_emb).float(), dim=-1)
        starts, start = {}, 0
        for part, values in self.phrases.items():
            starts[part], start = start, start + len(values)
        return part_cross_entropy(
            {part: list(values) for part, values in self.phrases.items()},
            records,
            parts,
            lambda part, rows: (
                scale * text_emb[rows] @ phrase_emb[starts[part] : starts[part] + len(self.phrases[part])].T
            ),
            text_emb,
        )

    def save_final(self, folder: Path, data_dir: Path) -> dict:
        from booth.models.tokenizer import write_clip_tokenizer_files

        self.model.eval().save_pretrained(folder)
        write_clip_tokenizer_files(folder, self.arch.num_merges, model_max_length=self.arch.max_length)
        return {"logit_scale": self.model.logit_scale.exp().item()}
