"""Combining and shrinking trained adapters: `booth merge` and `booth compress`.

* `merge_custom_diffusion`: the closed-form constrained merge of several Custom Diffusion models (Kumari et al.
  2023 §3.2 "Opt"; methods.md §6, as custom-diffusion's `gdupdateWexact`). For every cross-attention K/V weight,
  Ŵ = argmin ||W C_regᵀ - W0 C_regᵀ||_F  subject to  W Cᵀ = Vᵀ: stay close to the pretrained layer on generic text
  features (token features of regularisation captions) while reproducing each concept's own fine-tuned outputs
  on its target tokens.
* `compress_custom_diffusion`: low-rank SVD of each delta W - W0 (methods.md §5.8).
* `merge_lora`: weighted sum or concatenation of LoRA adapters (booth, diffusers or kohya files).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from booth.errors import BoothError

REG_CAPTIONS = Path(__file__).parent / "data" / "regularization_captions.txt"
PHOTO_PREFIX = "photo of a "  # target prompts "photo of a <new1> dog", features from after the prefix
MERGE_METHODS = ("custom-diffusion", "lora-sum", "lora-concat")


def regularization_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """The captions of a file, one a line (default: the ~200 generic captions shipped with booth)."""
    path = Path(path) if path else REG_CAPTIONS
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise BoothError(f"cannot read regularization prompts {path}: {exc.strerror or exc}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise BoothError(f"{path} holds no prompts")
    return lines


# ====================================================================================================
# Custom Diffusion: closed-form merge


@dataclass
class LayerMerge:
    """One merged layer: relative constraint error ||Ŵ Cᵀ - Vᵀ|| / ||Vᵀ||, and the relative change of the outputs on
    the regularisation features ||(W - W0) C_regᵀ|| / ||W0 C_regᵀ|| for Ŵ and for the naive average of the
    adapters' weights."""

    constraint_error: float
    reg_change: float
    average_reg_change: float


@dataclass
class MergeResult:
    """What `merge_custom_diffusion` wrote and how well the merge holds.

    Attributes:
        files: the written files by kind (see `write_custom_diffusion`).
        constraint_error: max over layers of the relative constraint error.
        reg_change / average_reg_change: relative change on the regularisation features over all layers, of the
            merged weights and of the naive average (mean of the adapters' W), for comparison.
        layers: per-layer numbers.
        targets: the target prompts used for C.
        target_rows / reg_rows: rows of C (after removing duplicates) and of C_reg.
    """

    files: dict[str, Path]
    constraint_error: float
    reg_change: float
    average_reg_change: float
    layers: dict[str, LayerMerge] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    target_rows: int = 0
    reg_rows: int = 0


class _ExtendedEmbedding(torch.nn.Module):
    """A token-embedding table with extra rows for ids >= its size (without resizing the model)."""

    def __init__(self, base: torch.nn.Embedding, first: int, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.first = first  # ids first, first + 1, ... are the extra rows
        self.register_buffer("rows", rows.to(base.weight.device, base.weight.dtype), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.first - 1))
        extra = ids >= self.first
        if not bool(extra.any()):
            return out
        index = (ids - self.first).clamp(0, self.rows.shape[0] - 1)
        return torch.where(extra.unsqueeze(-1), self.rows[index], out)


@contextmanager
def _with_tokens(pipe, tokens: dict[str, torch.Tensor]):
    """(tokenizer copy with `tokens` added, text encoder that embeds them): nothing of `pipe` changes for good."""
    from booth.train.formats.custom_diffusion import check_new_token

    tokenizer = copy.deepcopy(pipe.tokenizer)
    for token in tokens:
        check_new_token(tokenizer, token)
    encoder = pipe.text_encoder
    base = encoder.get_input_embeddings()
    tokenizer.add_tokens(list(tokens))
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    first = min(ids)
    rows = torch.zeros(max(ids) - first + 1, base.weight.shape[1])
    for i, token in zip(ids, tokens):
        rows[i - first] = tokens[token].reshape(-1).float()
    encoder.set_input_embeddings(_ExtendedEmbedding(base, first, rows))
    try:
        yield tokenizer, encoder
    finally:
        encoder.set_input_embeddings(base)


@torch.no_grad()
def token_features(
    tokenizer, encoder, texts: Sequence[str], skip: Sequence[int], batch: int = 32
) -> torch.Tensor:
    """Token-level text features (the last hidden state, as SD conditions on) of each text, positions 1 + skip
    through EOS (BOS and `skip` leading tokens dropped, no padding), stacked as rows, float64."""
    rows = []
    device = encoder.device
    for start in range(0, len(texts), batch):
        chunk = list(texts[start : start + batch])
        enc = tokenizer(
            chunk,
            padding="longest",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        )
        hidden = encoder(enc.input_ids.to(device))[0].to(
            "cpu", torch.float64
        )  # causal: padding never looks back
        lengths = enc.attention_mask.sum(1).tolist()
        for i, length in enumerate(lengths):
            first = 1 + skip[start + i]
            if first >= length:
                raise BoothError(f"the text {chunk[i]!r} has no tokens left after its prefix")
            rows.append(hidden[i, first:length])
    return torch.cat(rows)


def _prefix_length(tokenizer, prefix: str) -> int:
    return len(tokenizer(prefix.strip(), add_special_tokens=False).input_ids)


def _unique_rows(rows: torch.Tensor) -> list[int]:
    """Indices of the rows kept when exact duplicates are removed (first occurrence kept, as composenW.py)."""
    keep: list[int] = []
    for i in range(rows.shape[0]):
        if not any(torch.equal(rows[i], rows[j]) for j in keep):
            keep.append(i)
    return keep


def _check_adapters(models, labels: list[str], pipe) -> None:
    from booth.train.formats.custom_diffusion import base_fingerprint, check_base

    fingerprints = {}
    for m, label in zip(models, labels):
        if m.trains_q_out:
            raise BoothError(
                f"{label} also trained query/output projections (--train-q-out); the closed-form merge applies to "
                "key/value-only models"
            )
        if m.fingerprint:
            fingerprints.setdefault(m.fingerprint, []).append((label, m.base_model))
    if len(fingerprints) > 1:
        (a, *_), (b, *_) = list(fingerprints.values())[:2]
        raise BoothError(
            f"adapters {a[0]} and {b[0]} were trained on different base models ({a[1] or '?'} vs {b[1] or '?'}); "
            "merge only adapters of the same base model"
        )
    if fingerprints and next(iter(fingerprints)) != base_fingerprint(pipe.unet):
        (label, name), *_ = next(iter(fingerprints.values()))
        raise BoothError(
            f"{label} was trained on {name or 'another base model'}, not on the loaded model; pass --model"
        )
    for m, label in zip(models, labels):
        check_base(m, pipe.unet, label)
    users: dict[str, list[str]] = {}
    for m, label in zip(models, labels):
        for token in m.tokens:
            users.setdefault(token, []).append(label)
    taken = set(users)
    for token, who in users.items():
        if len(who) > 1:
            n = 1
            while f"<new{n}>" in taken:
                n += 1
            raise BoothError(
                f"both adapters use {token} ({who[0]}, {who[1]}); retrain one with --placeholder-token <new{n}>"
            )


def merge_custom_diffusion(
    adapters: Sequence[str | os.PathLike],
    reg_prompts: Sequence[str],
    pipe,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    targets: Sequence[str] | None = None,
) -> MergeResult:
    """Merge Custom Diffusion models into one, in closed form (methods.md §6.3, in float64):

        K_reg = C_regᵀ C_reg,  d = C K_reg⁻¹,  e2 = d Cᵀ,  e1 = Vᵀ - W0 Cᵀ,  Δ = e1 e2⁻¹,  Ŵ = W0 + Δ d

    per cross-attention `to_k` / `to_v`, with K_reg⁻¹ and e2⁻¹ applied by `torch.linalg.solve`.

    Args:
        adapters: booth Custom Diffusion files or folders (runs, merges); diffusers folders work too (their base
            model cannot be checked then).
        reg_prompts: regularisation captions (`regularization_prompts()`); C_reg = their token features, positions
            1 through EOS (from after "photo of a" for captions that start with it, as custom-diffusion's code).
        pipe: the base model every adapter was trained on (SD 1.x/2.x). Not modified: the modifier tokens are
            added to a copy of its tokenizer and spliced into its embedding output only while features are taken.
        out: output folder: ``<name>.booth-cd.safetensors`` (deltas of Ŵ, every modifier token, the targets) and
            diffusers' files.
        name: output stem (default: the folder's name).
        targets: one target string per adapter (default: each adapter's own, e.g. "<new1> dog" from its
            instance prompt). C = features of [t, "photo of a " + t] for each target t (the "photo of a" tokens
            skipped), with exact duplicate rows removed; V = each adapter's own Wₙ applied to its rows.

    Raises BoothError for fewer than two adapters, a modifier token used by two adapters, adapters of different
    base models (or not of `pipe`), adapters that trained q/out, or singular systems (too few regularisation
    tokens for the text width).
    """
    from booth.train.formats.custom_diffusion import (
        CustomDiffusionWeights,
        base_fingerprint,
        pretrained_weights,
        read_custom_diffusion,
        write_custom_diffusion,
    )

    if len(adapters) < 2:
        raise BoothError("merging needs at least two adapters")
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise BoothError("Custom Diffusion merging supports SD 1.x/2.x models, not SDXL")
    if not reg_prompts:
        raise BoothError("merging needs regularization prompts")
    models = [read_custom_diffusion(a) for a in adapters]
    labels = [str(a) for a in adapters]
    _check_adapters(models, labels, pipe)
    if targets is None:
        targets = []
        for m, label in zip(models, labels):
            own = m.targets
            if not own:
                raise BoothError(f"{label} records no target string (a diffusers file?); pass targets")
            targets.append(own[0])
    elif len(targets) != len(models):
        raise BoothError(f"{len(targets)} targets for {len(models)} adapters")

    unet = pipe.unet
    names = sorted(set().union(*(m.layers for m in models)))
    base = pretrained_weights(unet)
    tokens = {t: v for m in models for t, v in m.tokens.items()}
    with _with_tokens(pipe, tokens) as (tokenizer, encoder):
        skip_photo = _prefix_length(tokenizer, PHOTO_PREFIX)
        reg_skip = [skip_photo if p.lower().startswith(PHOTO_PREFIX) else 0 for p in reg_prompts]
        c_reg = token_features(tokenizer, encoder, reg_prompts, reg_skip)
        per_concept = [
            token_features(tokenizer, encoder, [t, PHOTO_PREFIX + t], [0, skip_photo]) for t in targets
        ]
    width = c_reg.shape[1]
    if c_reg.shape[0] < width:
        raise BoothError(
            f"{c_reg.shape[0]} regularization token features cannot constrain a {width}-wide text space; "
            "use more regularization prompts"
        )
    owner = torch.cat([torch.full((c.shape[0],), i) for i, c in enumerate(per_concept)])
    c_all = torch.cat(per_concept)
    keep = _unique_rows(c_all)
    c, owner = c_all[keep], owner[keep]

    k_reg = c_reg.T @ c_reg
    # d = C K_reg⁻¹ (K_reg symmetric) by least squares: where K_reg is singular (text features confined to a
    # hyperplane, e.g. after a LayerNorm without bias) this is the pseudo-inverse, which changes W only where
    # text features live; otherwise it equals `solve`.
    d = torch.linalg.lstsq(k_reg, c.T, driver="gelsd").solution.T
    e2 = d @ c.T
    e2_lu, e2_pivots, info = torch.linalg.lu_factor_ex(e2)
    if int(info) != 0 or not bool(torch.isfinite(e2_lu).all()):
        raise BoothError("the merge's target features are linearly dependent; use other target prompts")

    merged: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerMerge] = {}
    totals = {"num": 0.0, "den": 0.0, "avg": 0.0}
    for name_ in names:
        w0 = base[name_].detach().to("cpu", torch.float64)
        own = [m.weight(name_, base).double() if name_ in m.layers else w0 for m in models]
        v = torch.cat([own[int(i)][None] for i in owner])  # [s, d_out, D] -> rows Wₙ cᵀ
        v = torch.einsum("sod,sd->so", v, c)
        e1 = v.T - w0 @ c.T
        delta = torch.linalg.lu_solve(e2_lu, e2_pivots, e1, left=False)  # e1 e2⁻¹
        w_hat = w0 + delta @ d
        err = float((w_hat @ c.T - v.T).norm() / v.norm().clamp_min(1e-300))
        reg0 = w0 @ c_reg.T
        change = (w_hat - w0) @ c_reg.T
        average = (torch.stack(own).mean(0) - w0) @ c_reg.T
        ref = float(reg0.norm()) or 1.0
        layers[name_] = LayerMerge(err, float(change.norm()) / ref, float(average.norm()) / ref)
        totals["num"] += float(change.norm()) ** 2
        totals["avg"] += float(average.norm()) ** 2
        totals["den"] += ref**2
        merged[name_] = (w_hat - w0).float()

    first = models[0]
    meta = {
        "booth.method": "custom-diffusion-merge",
        "booth.base_fingerprint": base_fingerprint(unet),
        "booth.base_model": next((m.base_model for m in models if m.base_model), ""),
        "booth.architecture": first.metadata.get("booth.architecture", ""),
        "booth.targets": json.dumps(list(targets)),
        "booth.merged_from": json.dumps([Path(a).name for a in adapters]),
        "booth.regularization_prompts": str(len(reg_prompts)),
    }
    sources = {
        m.metadata.get("booth.base_model_source") for m in models if "booth.base_model_source" in m.metadata
    }
    if len(sources) == 1:
        meta["booth.base_model_source"] = sources.pop()
    weights = CustomDiffusionWeights(merged, tokens, meta)
    out = Path(out)
    files = write_custom_diffusion(out, name or out.name, weights, unet)
    den = math.sqrt(totals["den"]) or 1.0
    return MergeResult(
        files=files,
        constraint_error=max(lm.constraint_error for lm in layers.values()),
        reg_change=math.sqrt(totals["num"]) / den,
        average_reg_change=math.sqrt(totals["avg"]) / den,
        layers=layers,
        targets=list(targets),
        target_rows=int(c.shape[0]),
        reg_rows=int(c_reg.shape[0]),
    )


# ====================================================================================================
# Custom Diffusion: compression


@dataclass
class CompressionResult:
    """`compress_custom_diffusion`'s output file, the ranks kept and the reconstruction errors.

    Attributes:
        path: the written ``.booth-cd.safetensors``.
        energy: the share of the singular-value sum kept.
        layers: {layer: (rank kept, full rank, relative error ||ΔW - ΔW_k||_F / ||ΔW||_F)}.
        error: relative error over all layers, sqrt(Σ ||ΔW - ΔW_k||²) / sqrt(Σ ||ΔW||²).
        size_in / size_out: file sizes in bytes.
    """

    path: Path
    energy: float
    layers: dict[str, tuple[int, int, float]]
    error: float
    size_in: int
    size_out: int


def kept_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest k whose leading singular values hold more than `energy` of their sum (all of them if none).

    custom-diffusion's `compress.py` breaks at that index i and keeps `u[:, :i]`, i.e. one component fewer (the
    largest k whose share does not exceed the ratio, possibly 0); booth keeps k = i + 1 as methods.md §5.8 states.
    """
    s = singular_values.double()
    total = float(s.sum())
    if total <= 0:
        return 0
    share = torch.cumsum(s, 0) / total
    above = torch.nonzero(share > energy)
    return int(above[0]) + 1 if len(above) else len(s)


def compress_custom_diffusion(
    path: str | os.PathLike, out: str | os.PathLike, energy: float = 0.6
) -> CompressionResult:
    """Low-rank compression of a booth Custom Diffusion file (methods.md §5.8).

    Each 2-D delta ΔW = W - W0 becomes U_k diag(s_k) (``delta_up``) and V_kᵀ (``delta_down``) with k =
    `kept_rank(s, energy)`; bias deltas and tokens are kept as they are. `out` is the new file (a folder gets
    ``<stem>-compressed.booth-cd.safetensors``). `load_custom_diffusion`, `merge_custom_diffusion` and a second
    compression read the result.
    """
    from booth.train.formats.custom_diffusion import (
        BOOTH_SUFFIX,
        CustomDiffusionWeights,
        read_custom_diffusion,
        write_booth_file,
    )

    if not 0 < energy <= 1:
        raise BoothError(f"--energy must be in (0, 1], got {energy}")
    weights = read_custom_diffusion(path)
    if weights.full:
        raise BoothError(
            f"{weights.label} holds full weights (a diffusers file); compression needs booth's "
            f"*{BOOTH_SUFFIX} (the deltas W - W0)"
        )
    out = Path(out).expanduser()
    if out.is_dir() or not out.name.endswith(".safetensors"):
        stem = weights.path.name.removesuffix(BOOTH_SUFFIX) if weights.path else "custom-diffusion"
        out = out / f"{stem}-compressed{BOOTH_SUFFIX}"
    if weights.path is not None and out.resolve() == weights.path.resolve():
        raise BoothError(f"--out {out} is the input file; choose another name")
    layers: dict[str, Any] = {}
    report: dict[str, tuple[int, int, float]] = {}
    err2 = total2 = 0.0
    for name, value in weights.layers.items():
        delta = weights.delta(name).double()
        if delta.dim() != 2:
            layers[name] = value
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = kept_rank(s, energy)
        approx = (u[:, :k] * s[:k]) @ vh[:k]
        err = float((delta - approx).norm())
        norm = float(delta.norm())
        report[name] = (k, len(s), err / norm if norm else 0.0)
        err2 += err**2
        total2 += norm**2
        layers[name] = ((u[:, :k] * s[:k]).float().contiguous(), vh[:k].float().contiguous())
    meta = {**weights.metadata, "booth.compression_energy": str(energy)}
    written = write_booth_file(out, CustomDiffusionWeights(layers, weights.tokens, meta))
    return CompressionResult(
        path=written,
        energy=energy,
        layers=report,
        error=math.sqrt(err2 / total2) if total2 else 0.0,
        size_in=weights.path.stat().st_size if weights.path else 0,
        size_out=written.stat().st_size,
    )


@dataclass
class A1111Export:
    """`export_custom_diffusion_a1111`'s files and what the SVD kept."""

    lora: Path
    embeddings: dict[str, Path]  # modifier token -> its embedding file (the file stem is the prompt word)
    words: dict[str, str]  # modifier token -> the word that replaces it in prompts
    max_rank: int
    error: float  # relative Frobenius error of all weight deltas together (0 at full rank)


def export_custom_diffusion_a1111(
    path: str | os.PathLike, out: str | os.PathLike, name: str, energy: float = 1.0
) -> A1111Export:
    """A Custom Diffusion model as files A1111, ComfyUI, kohya and diffusers load: a kohya LoRA plus embeddings.

    Each weight delta ΔW = W - W0 of a cross-attention K/V (and q/out) layer becomes a LoRA module by SVD,
    ΔW = U diag(s) Vᵀ: ``lora_up`` = U_k diag(s_k), ``lora_down`` = V_kᵀ, k = `kept_rank(s, energy)` (energy 1:
    every non-zero singular value, exact up to float32), zero-padded to the largest k so one ``alpha`` = that
    rank fits every module (kohya's scale alpha / rank = 1). Bias deltas
    (q/out training) have no LoRA form and are refused. Each modifier token becomes an A1111 embedding
    ``<name>-<token>.safetensors`` (kohya ``emb_params``), so "<new1> dog" is written "<name>-new1 dog
    <lora:<name>:1>" in an A1111 prompt. Booth files only (the deltas; a diffusers file needs its base model).
    """
    from booth.train.formats.custom_diffusion import read_custom_diffusion
    from booth.train.formats.embeddings import safe_file_stem, save_embedding
    from booth.train.formats.lora import _write_safetensors, lora_state_dict_to_kohya

    if not 0 < energy <= 1:
        raise BoothError(f"--energy must be in (0, 1], got {energy}")
    stem = safe_file_stem(name)
    if not stem or stem != name:
        raise BoothError(f"--name {name!r}: use letters, digits, '.', '_' or '-'")
    weights = read_custom_diffusion(path)
    if weights.full:
        raise BoothError(
            f"{weights.label} holds full weights (a diffusers file); export needs booth's deltas"
        )
    state: dict[str, torch.Tensor] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    err2 = total2 = 0.0
    for layer in sorted(weights.layers):
        delta = weights.delta(layer).double()
        if delta.dim() != 2:
            raise BoothError(
                f"{weights.label} trained biases ({layer}); a LoRA cannot hold them: retrain without q/out"
            )
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = max(1, kept_rank(s, energy)) if energy < 1 else max(1, int((s > s[0] * 1e-7).sum()))
        module = layer.removesuffix(".weight")
        factors[module] = ((u[:, :k] * s[:k]).float(), vh[:k].float())
        approx = (u[:, :k] * s[:k]) @ vh[:k]
        err2 += float((delta - approx).norm()) ** 2
        total2 += float(delta.norm()) ** 2
    # one rank for every module (smaller factors padded with zeros, which add nothing) and alpha = rank, so
    # kohya's scale alpha / rank is 1 everywhere: diffusers 0.42's kohya converter mis-assigns per-module alphas
    # of mid_block modules (its alpha_pattern keys miss them), which a uniform alpha avoids
    rank = max((up.shape[1] for up, _ in factors.values()), default=0)
    for module, (up, down) in factors.items():
        pad = rank - up.shape[1]
        state[f"unet.{module}.lora_A.weight"] = torch.cat([down, down.new_zeros(pad, down.shape[1])])
        state[f"unet.{module}.lora_B.weight"] = torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1)
    architecture = weights.metadata.get("booth.architecture") or "sd1"
    tensors = lora_state_dict_to_kohya(state, float(rank), architecture)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_sd_model_name": weights.base_model,
        "booth.method": "custom-diffusion",
        "booth.exported_from": Path(weights.path).name if weights.path else "",
        "booth.export_energy": str(energy),
        "booth.modifier_tokens": json.dumps(sorted(weights.tokens)),
    }
    lora = _write_safetensors(out / f"{stem}.safetensors", tensors, meta)
    embeddings, words = {}, {}
    for token, vector in sorted(weights.tokens.items()):
        word = f"{stem}-{safe_file_stem(token) or 'token'}"
        embeddings[token] = save_embedding(out / f"{word}.safetensors", vector.reshape(1, -1))
        words[token] = word
    return A1111Export(
        lora=lora,
        embeddings=embeddings,
        words=words,
        max_rank=rank,
        error=math.sqrt(err2 / total2) if total2 else 0.0,
    )


# ====================================================================================================
# LoRA


@dataclass
class LoraMergeResult:
    """`merge_lora`'s files, the rank written and (sum mode) the relative SVD truncation error per module."""

    files: dict[str, Path]
    rank: int
    mode: str
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def _lora_modules(
    path: Path,
) -> tuple[str | None, dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float]]]:
    """(architecture, {(component, kohya name): (down, up, scale)}) of one LoRA file, scale = alpha / r."""
    from safetensors.torch import load_file

    from booth.train.formats.lora import (
        _canonical_te_module,
        _split_diffusers_key,
        kohya_module_name,
        read_lora_info,
    )

    info = read_lora_info(path)
    arch = info.architecture
    tensors = load_file(str(info.path))
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in tensors):
        raise BoothError(f"{info.path.name}: DoRA adapters cannot be merged as plain LoRA deltas")
    modules: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    if info.format == "kohya":
        for (component, lora_name), entry in info.modules.items():
            down = tensors[f"{lora_name}.lora_down.weight"]
            up = tensors[f"{lora_name}.lora_up.weight"]
            alpha = float(tensors[entry["alpha"]].float().item()) if "alpha" in entry else info.alpha
            modules[(component, lora_name)] = (down, up, alpha / down.shape[0])
        return arch, modules
    config: dict[str, Any] = {}
    if info.metadata.get("lora_adapter_metadata"):
        try:
            config = json.loads(info.metadata["lora_adapter_metadata"])
        except ValueError:
            config = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = _split_diffusers_key(key)
        if parsed is not None:
            component, module, role = parsed
            parts.setdefault((component, module), {})[role] = tensor
    for (component, module), pair in parts.items():
        down, up = pair["down"], pair["up"]
        rank = down.shape[0]
        alpha = config.get(f"{component}.lora_alpha", rank)
        for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
            if module == pattern or module.endswith("." + pattern):
                alpha = value
        root = math.sqrt(rank) if config.get(f"{component}.use_rslora") else rank
        te = _canonical_te_module(module) if component != "unet" else module
        name = kohya_module_name(component, te, arch or "sd1")
        modules[(component, name)] = (down, up, float(alpha) / root)
    return arch, modules


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def merge_lora(
    files: Sequence[str | os.PathLike],
    weights: Sequence[float] | None,
    out: str | os.PathLike,
    mode: str = "sum",
    *,
    name: str | None = None,
    rank: int | None = None,
) -> LoraMergeResult:
    """Merge LoRA adapters into one; ΔW_i = (alpha_i / r_i) B_i A_i per module, weights w_i (default 1 each).

    mode "concat": A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]: exactly Σ w_i ΔW_i, rank Σ r_i.
    mode "sum": ΔW = Σ w_i ΔW_i re-factored by truncated SVD to `rank` (default max r_i): exact when ΔW's rank is
    at most that (e.g. one adapter with itself), otherwise the best rank-`rank` approximation (Eckart-Young); the
    relative error per module is returned. (Adding the up and down matrices themselves would create cross terms
    B_1 A_2 and is not a merge.)

    Modules absent from an adapter count as zero. Every module is written with the same rank (zero-padded where it
    has fewer components, which adds nothing) and alpha = rank (scale 1): ``<name>.safetensors`` in kohya layout
    and ``pytorch_lora_weights.safetensors`` in diffusers layout (module names through diffusers' own kohya
    converter), both loadable by diffusers `load_lora_weights`, A1111 and ComfyUI.
    """
    from booth.train.formats.lora import BASE_MODEL_VERSIONS, _write_safetensors, kohya_hashes

    if mode not in ("sum", "concat"):
        raise BoothError(f"unknown LoRA merge mode {mode!r}; choose sum or concat")
    if len(files) < 2:
        raise BoothError("merging needs at least two LoRA files")
    weights = list(weights) if weights is not None else [1.0] * len(files)
    if len(weights) != len(files):
        raise BoothError(f"{len(weights)} weights for {len(files)} LoRA files")
    parsed = [_lora_modules(Path(f)) for f in files]
    archs = {a for a, _ in parsed if a}
    if len(archs) > 1:
        raise BoothError(
            f"these LoRAs were trained for different model families ({', '.join(sorted(archs))})"
        )
    arch = archs.pop() if archs else "sd1"
    keys = sorted(set().union(*(m for _, m in parsed)))
    ranks = [max(d.shape[0] for d, _, _ in m.values()) for _, m in parsed]
    if mode == "concat":
        target = sum(ranks)
    else:
        target = rank or max(ranks)
        if target < 1:
            raise BoothError(f"--rank must be at least 1, got {target}")
    merged: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    for key in keys:
        entries = [(w, m[key]) for w, (_, m) in zip(weights, parsed) if key in m]
        down0, up0, _ = entries[0][1]
        shape_down, shape_up = tuple(down0.shape[1:]), tuple(up0.shape[2:])
        if mode == "concat":
            downs = [_flat(d).float() for _, (d, _, _) in entries]
            ups = [_flat(u).float() * (w * s) for w, (_, u, s) in entries]
            down, up = torch.cat(downs), torch.cat(ups, dim=1)
        else:
            delta = sum(w * s * (_flat(u).double() @ _flat(d).double()) for w, (d, u, s) in entries)
            u_, s_, vh = torch.linalg.svd(delta, full_matrices=False)
            k = min(target, len(s_))
            up = (u_[:, :k] * s_[:k]).float()
            down = vh[:k].float()
            norm = float(delta.norm())
            errors[key[1]] = float((delta - up.double() @ down.double()).norm()) / norm if norm else 0.0
        pad = target - down.shape[0]
        if pad > 0:
            down = torch.cat([down, torch.zeros(pad, down.shape[1])])
            up = torch.cat([up, torch.zeros(up.shape[0], pad)], dim=1)
        merged[key] = (
            down.reshape(target, *shape_down).contiguous(),
            up.reshape(up.shape[0], target, *shape_up).contiguous(),
        )

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    name = name or out.name
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(target),
        "ss_network_alpha": str(float(target)),
        "ss_base_model_version": BASE_MODEL_VERSIONS.get(arch, "sd_v1"),
        "ss_v2": str(arch == "sd2"),
        "ss_output_name": name,
        "booth.lora_merge": json.dumps(
            {"mode": mode, "files": [Path(f).name for f in files], "weights": weights}
        ),
    }
    kohya = {}
    for (_, lora_name), (down, up) in merged.items():
        kohya[f"{lora_name}.lora_down.weight"] = down
        kohya[f"{lora_name}.lora_up.weight"] = up
        kohya[f"{lora_name}.alpha"] = torch.tensor(float(target))
    model_hash, legacy_hash = kohya_hashes(kohya, meta)
    written = {
        "kohya": _write_safetensors(
            out / f"{name}.safetensors",
            kohya,
            {**meta, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash},
        )
    }
    diffusers_file = _write_diffusers_lora(out, kohya, target, arch, meta)
    if diffusers_file is not None:
        written["diffusers"] = diffusers_file
    return LoraMergeResult(written, target, mode, errors)


def _write_diffusers_lora(
    out: Path, kohya: dict[str, torch.Tensor], rank: int, arch: str, meta
) -> Path | None:
    """The merged LoRA in diffusers' layout (as booth's trainer writes it), or None if diffusers cannot name its
    modules (e.g. kohya names of an unusual model)."""
    import shutil
    import tempfile

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    from booth.train.formats.lora import DIFFUSERS_LORA_FILE, _split_diffusers_key, _write_safetensors

    try:
        converted, _alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    except (ValueError, KeyError):
        return None
    states: dict[str, dict[str, torch.Tensor]] = {}
    leaves: dict[str, set[str]] = {}
    for key, tensor in converted.items():
        parsed = _split_diffusers_key(key)
        if parsed is None:
            return None
        component, module, role = parsed
        states.setdefault(component, {})[f"{module}.lora_{'A' if role == 'down' else 'B'}.weight"] = tensor
        leaves.setdefault(component, set()).add(module.rsplit(".", 1)[-1] if component != "unet" else module)
    pipeline = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    kwargs = {}
    for component, state in states.items():
        kwargs[f"{component}_lora_layers"] = convert_state_dict_to_diffusers(state)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(leaves[component]))
        kwargs[f"{component}_lora_adapter_metadata"] = config.to_dict()
    tmp = Path(tempfile.mkdtemp(prefix=".lora-merge-", dir=out))
    try:
        pipeline.save_lora_weights(str(tmp), safe_serialization=True, **kwargs)
        tensors = load_file(str(tmp / DIFFUSERS_LORA_FILE))
        with safe_open(str(tmp / DIFFUSERS_LORA_FILE), framework="pt") as f:
            extra = dict(f.metadata() or {})
        return _write_safetensors(out / DIFFUSERS_LORA_FILE, tensors, {**meta, **extra})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ====================================================================================================
# command line

MERGE_EPILOG = """\
examples:
  booth merge runs/dog runs/cat --out merged/dog-cat                 # Custom Diffusion, closed form
  booth merge a.safetensors b.safetensors --method lora-concat --weights 0.7,0.5 --out merged/ab
  booth merge a.safetensors b.safetensors --method lora-sum --rank 8 --out merged/ab
  booth compress runs/dog --out runs/dog/dog-small.booth-cd.safetensors --energy 0.6

Custom Diffusion adapters must use different modifier tokens (train with --placeholder-token <new2>) and the same
base model (--model; default: the one recorded in the adapters). Use the result with
  booth generate "a <new1> dog next to a <new2> cat" --custom-diffusion merged/dog-cat
"""


def add_merge_commands(sub) -> None:
    """`booth merge` and `booth compress` (register from `booth.cli.build_parser`)."""
    p = sub.add_parser(
        "merge",
        help="merge Custom Diffusion models (closed form) or LoRAs (sum / concat)",
        description="Merge several adapters into one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=MERGE_EPILOG,
    )
    p.add_argument("adapters", nargs="+", help="adapter files or run folders (two or more)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument(
        "--method", choices=MERGE_METHODS, default="custom-diffusion", help="default custom-diffusion"
    )
    p.add_argument(
        "--weights", default=None, help="LoRA: comma-separated weights, e.g. 0.5,0.5 (default 1 each)"
    )
    p.add_argument(
        "--rank", type=int, default=None, help="lora-sum: rank of the result (default: the largest)"
    )
    p.add_argument(
        "--reg-prompts",
        default=None,
        help="Custom Diffusion: captions file, one a line (default: booth's 200)",
    )
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="Custom Diffusion: the base model (default: recorded in the adapters)",
    )
    p.add_argument("--name", default=None, help="output file stem (default: --out's name)")
    p.set_defaults(func=cmd_merge)

    c = sub.add_parser(
        "compress",
        help="shrink a Custom Diffusion model by low-rank SVD of its weight deltas",
        description="Keep the leading singular values holding more than --energy of each delta's singular-value sum.",
    )
    c.add_argument("adapter", help="booth Custom Diffusion file or run folder")
    c.add_argument("--out", "-o", required=True, help="output .booth-cd.safetensors file (or a folder)")
    c.add_argument(
        "--energy", type=float, default=0.6, help="share of the singular-value sum kept (default 0.6)"
    )
    c.set_defaults(func=cmd_compress)

    x = sub.add_parser(
        "export-a1111",
        help="write a Custom Diffusion model as a kohya LoRA plus A1111 embeddings (A1111, ComfyUI, diffusers)",
        description="Each weight delta becomes a LoRA module by SVD (exact at --energy 1); each modifier token "
        "an embedding named <name>-<token>.",
    )
    x.add_argument("adapter", help="booth Custom Diffusion file or run folder")
    x.add_argument("--out", "-o", required=True, help="output folder")
    x.add_argument("--name", required=True, help="the LoRA's name (file stem; <lora:NAME:1> in prompts)")
    x.add_argument(
        "--energy",
        type=float,
        default=1.0,
        help="share of each delta's singular-value sum kept (default 1: exact)",
    )
    x.set_defaults(func=cmd_export_a1111)


def _parse_weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BoothError(f"--weights {text!r}: use comma-separated numbers, e.g. 0.5,0.5") from None
    if len(values) != n:
        raise BoothError(f"--weights has {len(values)} values for {n} adapters")
    return values


def _recorded_model(adapters: Sequence[str]) -> str | None:
    from booth.train.formats.custom_diffusion import read_custom_diffusion

    sources = set()
    for a in adapters:
        meta = read_custom_diffusion(a).metadata
        if "booth.base_model_source" not in meta:
            raise BoothError(f"{a} does not record its base model; pass --model")
        sources.add(meta["booth.base_model_source"])
    if len(sources) > 1:
        raise BoothError(
            f"the adapters record different base models ({', '.join(sorted(sources))}); pass --model"
        )
    return sources.pop() or None  # "" = booth's default model


def cmd_merge(args: argparse.Namespace) -> int:
    if len(args.adapters) < 2:
        raise BoothError("booth merge needs at least two adapters")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BoothError(f"--out {out} is a file; pass a folder")
    if args.method == "custom-diffusion":
        if args.weights is not None or args.rank is not None:
            raise BoothError("--weights and --rank apply to LoRA merges (--method lora-sum / lora-concat)")
        from booth.models.loading import load_pipeline

        model = args.model if args.model is not None else _recorded_model(args.adapters)
        prompts = regularization_prompts(args.reg_prompts)
        pipe = load_pipeline(model, device="cpu").pipe
        result = merge_custom_diffusion(args.adapters, prompts, pipe, out, name=args.name)
        for kind, path in result.files.items():
            print(f"{kind}: {path}")
        print(
            f"constraint error {result.constraint_error:.2e} (relative, worst layer); change on "
            f"{result.reg_rows} regularization token features: merged {result.reg_change:.4f}, "
            f"naive average {result.average_reg_change:.4f}"
        )
        return 0
    if args.reg_prompts is not None or args.model is not None:
        raise BoothError("--reg-prompts and --model apply to --method custom-diffusion")
    mode = args.method.removeprefix("lora-")
    if mode == "concat" and args.rank is not None:
        raise BoothError("--rank applies to --method lora-sum (concatenation keeps every component)")
    result = merge_lora(
        args.adapters,
        _parse_weights(args.weights, len(args.adapters)),
        out,
        mode,
        name=args.name,
        rank=args.rank,
    )
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    line = f"rank {result.rank}"
    if mode == "sum":
        line += f", largest relative truncation error {result.max_error:.2e}"
    print(line)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    result = compress_custom_diffusion(args.adapter, args.out, args.energy)
    ranks = [k for k, _, _ in result.layers.values()]
    print(f"custom_diffusion: {result.path}")
    print(
        f"energy {result.energy:g}: ranks {min(ranks, default=0)}-{max(ranks, default=0)} kept, relative error "
        f"{result.error:.4f}; {result.size_in / 1e6:.2f} MB -> {result.size_out / 1e6:.2f} MB"
    )
    return 0


def cmd_export_a1111(args: argparse.Namespace) -> int:
    result = export_custom_diffusion_a1111(args.adapter, args.out, args.name, args.energy)
    print(f"lora: {result.lora} (rank up to {result.max_rank}, relative error {result.error:.2e})")
    for token, path in result.embeddings.items():
        print(f"embedding: {path} (write {result.words[token]} where the prompt said {token})")
    return 0


__all__ = [
    "A1111Export",
    "CompressionResult",
    "LayerMerge",
    "LoraMergeResult",
    "MergeResult",
    "add_merge_commands",
    "compress_custom_diffusion",
    "export_custom_diffusion_a1111",
    "kept_rank",
    "merge_custom_diffusion",
    "merge_lora",
    "regularization_prompts",
    "token_features",
]
