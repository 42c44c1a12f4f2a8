"""Custom Diffusion files (Kumari et al. 2023; `formats.md` §7): write them, read them back, apply them to a pipeline.

A trained (or merged, or compressed) Custom Diffusion model is three kinds of file:

* ``pytorch_custom_diffusion_weights.safetensors`` (diffusers' `save_attn_procs` layout): for every UNet
  cross-attention layer ``<block path>.attn2.processor.to_k_custom_diffusion.weight`` and
  ``...to_v_custom_diffusion.weight`` [d_out, d_text] = the fine-tuned weights themselves (plus
  ``to_q_custom_diffusion.weight``, ``to_out_custom_diffusion.0.weight`` / ``.bias`` when q/out trained), metadata
  ``{"format": "pt"}``. Every self-attention layer also gets a zero-length entry ``<block path>.attn1.processor``:
  that is what diffusers' `.bin` files hold for the untrained processors (an empty dict, which safetensors cannot
  store), and its loader counts those entries when it installs the processors (see `DIFFUSERS_LOADER_NOTE`).
* ``<token>.safetensors`` per modifier token (diffusers `load_textual_inversion` format): ``{"<new1>": [D]}``.
* ``<name>.booth-cd.safetensors``: booth's compact file, the one merging and compression read.
  ``unet.<block path>.attn2.<kind>.weight.delta`` = W - W0 (float32), or, once compressed,
  ``....delta_up`` [d_out, k] and ``....delta_down`` [k, d_in] with W - W0 ~ up @ down; bias deltas
  ``unet.<path>.attn2.to_out.0.bias.delta``; modifier tokens ``token.<new1>`` [D]. Metadata ``booth.*``: the
  base-model fingerprint (sha256 of the pretrained cross-attention K/V weights, which every merge needs to be the
  same), the base model's name, source and architecture, the modifier tokens, the concept's target strings (for the
  merge's constraint) and, when compressed, the energy kept; plus the trainer's `ss_*` metadata.

`load_custom_diffusion(pipe, path)` applies any of them to a diffusers pipeline: the fine-tuned weights go into
diffusers' own `CustomDiffusionAttnProcessor2_0` processors on `pipe.unet` (so booth's Engine, which calls
`pipe.unet(...)`, uses them) and each modifier token is added to the tokenizer and embedding matrix, so prompts
can say "<new1>".
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from booth.errors import BoothError

DIFFUSERS_CD_FILE = "pytorch_custom_diffusion_weights.safetensors"
BOOTH_SUFFIX = ".booth-cd.safetensors"
FORMAT_VERSION = "1"
KV_KINDS = ("to_k", "to_v")
QOUT_KINDS = ("to_q", "to_out.0")
DEFAULT_INITIALIZER = "ktn"  # diffusers' --initializer_token default; the CLIP BPE entry "ktn" is id 42170

DIFFUSERS_LOADER_NOTE = (
    "diffusers 0.42's `UNet2DConditionModel.load_attn_procs` installs the processors only when called with "
    "`_pipeline=pipe` (huggingface/diffusers#9320: the `set_attn_processor` call sits inside `if _pipeline is not "
    "None`); without it the call returns silently and nothing changes. Use "
    "`pipe.unet.load_attn_procs(folder, weight_name=DIFFUSERS_CD_FILE, _pipeline=pipe)` or booth's "
    "`load_custom_diffusion(pipe, folder)`."
)


# --------------------------------------------------------------------------------------------------
# the layers


def cross_attention_layers(unet) -> dict[str, torch.nn.Module]:
    """{module path: Attention} for every cross-attention (`attn2`) layer of a UNet, in module order."""
    found = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k") and hasattr(module, "set_processor"):
            found[name] = module
    if not found:
        raise BoothError("this UNet has no cross-attention (attn2) layers for Custom Diffusion")
    return found


def _linear(attn, kind: str) -> torch.nn.Linear:
    return attn.to_out[0] if kind == "to_out.0" else getattr(attn, kind)


def pretrained_weights(unet, kinds: tuple[str, ...] = KV_KINDS) -> dict[str, torch.Tensor]:
    """{"<path>.<kind>.weight" (+ ".bias" for to_out.0): tensor} of the base (pretrained) cross-attention layers.

    These are the Attention modules' own Linear layers, which Custom Diffusion processors never change.
    """
    out = {}
    for path, attn in cross_attention_layers(unet).items():
        for kind in kinds:
            layer = _linear(attn, kind)
            out[f"{path}.{kind}.weight"] = layer.weight.detach()
            if kind == "to_out.0" and layer.bias is not None:
                out[f"{path}.{kind}.bias"] = layer.bias.detach()
    return out


def base_fingerprint(unet) -> str:
    """sha256 (first 16 hex digits) of the pretrained cross-attention K/V weights, as float32, in module order.

    Two adapters can be merged (and an adapter applied) only onto the base model they were trained from: the
    merge reproduces W0 + delta and solves around W0. The fingerprint does not depend on how the model was stored
    (folder, single file, fp16 or fp32 on disk) as long as the values are the same.
    """
    digest = hashlib.sha256()
    for name, tensor in pretrained_weights(unet).items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def diffusers_key(name: str) -> str:
    """booth's "<path>.to_k.weight" -> diffusers' "<path>.processor.to_k_custom_diffusion.weight".

    >>> diffusers_key("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.bias")
    'up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_custom_diffusion.0.bias'
    """
    for kind in (*KV_KINDS, "to_q"):
        for param in ("weight", "bias"):
            suffix = f".{kind}.{param}"
            if name.endswith(suffix):
                return f"{name[: -len(suffix)]}.processor.{kind}_custom_diffusion.{param}"
    for param in ("weight", "bias"):
        suffix = f".to_out.0.{param}"
        if name.endswith(suffix):
            return f"{name[: -len(suffix)]}.processor.to_out_custom_diffusion.0.{param}"
    raise ValueError(f"not a Custom Diffusion layer name: {name!r}")


def booth_name(key: str) -> str | None:
    """diffusers' processor key -> booth's "<path>.<kind>.<param>" (None for keys of untrained processors)."""
    head, sep, tail = key.partition(".processor.")
    if not sep:
        return None
    for kind in (*KV_KINDS, "to_q"):
        for param in ("weight", "bias"):
            if tail == f"{kind}_custom_diffusion.{param}":
                return f"{head}.{kind}.{param}"
    for param in ("weight", "bias"):
        if tail == f"to_out_custom_diffusion.0.{param}":
            return f"{head}.to_out.0.{param}"
    return None


# --------------------------------------------------------------------------------------------------
# the weights in memory


@dataclass
class CustomDiffusionWeights:
    """A Custom Diffusion model in memory.

    Attributes:
        layers: "<path>.<kind>.weight" (or ".bias") -> W - W0 (a tensor), or (up, down) with W - W0 ~ up @ down;
            when `full` the tensors are the fine-tuned weights W themselves (a diffusers file holds those).
        tokens: modifier token -> its embedding [D].
        metadata: the file's string metadata (``booth.*`` and the trainer's ``ss_*``).
        full: `layers` holds W, not W - W0 (no base fingerprint is known then).
        path: the file read, if any.
    """

    layers: dict[str, Any]
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    full: bool = False
    path: Path | None = None

    @property
    def fingerprint(self) -> str | None:
        return self.metadata.get("booth.base_fingerprint") or None

    @property
    def base_model(self) -> str:
        return self.metadata.get("booth.base_model", "")

    @property
    def base_source(self) -> str | None:
        return self.metadata.get("booth.base_model_source") or None

    @property
    def targets(self) -> list[str]:
        try:
            return list(json.loads(self.metadata.get("booth.targets", "[]")))
        except ValueError:
            return []

    @property
    def trains_q_out(self) -> bool:
        return any(".to_q." in n or ".to_out.0." in n for n in self.layers)

    @property
    def label(self) -> str:
        return self.path.name if self.path else "adapter"

    def delta(self, name: str, base: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """W - W0 of one layer, float32 on the CPU (`base` needed when `full`)."""
        value = self.layers[name]
        if isinstance(value, tuple):
            up, down = value
            return up.float() @ down.float()
        if self.full:
            if base is None:
                raise ValueError("a full-weight model needs the base weights for its deltas")
            return value.float() - base[name].detach().to("cpu", torch.float32)
        return value.float()

    def weight(self, name: str, base: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The fine-tuned W of one layer (float32, CPU)."""
        if self.full and not isinstance(self.layers[name], tuple):
            return self.layers[name].float()
        return base[name].detach().to("cpu", torch.float32) + self.delta(name, base)

    def weights(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.weight(name, base) for name in self.layers}


def kinds_of(names) -> tuple[str, ...]:
    """The layer kinds ("to_k", "to_v", "to_q", "to_out.0") present in a set of layer names."""
    kinds = [k for k in (*KV_KINDS, *QOUT_KINDS) if any(f".{k}." in n for n in names)]
    return tuple(kinds)


# --------------------------------------------------------------------------------------------------
# writing


def _write(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    from safetensors.torch import save

    from booth.generate.metadata import atomic_write

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=dict(metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: f.write(data))


def booth_tensors(weights: CustomDiffusionWeights) -> dict[str, torch.Tensor]:
    """The tensors of a ``.booth-cd.safetensors`` file (deltas, factors, tokens)."""
    if weights.full:
        raise ValueError("booth files store deltas; convert full weights first")
    out: dict[str, torch.Tensor] = {}
    for name, value in weights.layers.items():
        if isinstance(value, tuple):
            out[f"unet.{name}.delta_up"] = value[0].float()
            out[f"unet.{name}.delta_down"] = value[1].float()
        else:
            out[f"unet.{name}.delta"] = value.float()
    for token, vector in weights.tokens.items():
        out[f"token.{token}"] = vector.reshape(-1).float()
    return out


def write_booth_file(path: str | os.PathLike, weights: CustomDiffusionWeights) -> Path:
    """Write booth's compact file (deltas or their low-rank factors, modifier tokens, metadata)."""
    meta = {**weights.metadata, "booth.format": "custom-diffusion", "booth.format_version": FORMAT_VERSION}
    meta["booth.modifier_tokens"] = json.dumps(sorted(weights.tokens))
    return _write(Path(path), booth_tensors(weights), meta)


def write_diffusers_files(
    out_dir: str | os.PathLike,
    full_weights: Mapping[str, torch.Tensor],
    tokens: Mapping[str, torch.Tensor],
    self_attention: list[str],
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """diffusers' files: ``pytorch_custom_diffusion_weights.safetensors`` (full fine-tuned weights, keys as
    `save_attn_procs` writes them, zero-length entries for the untrained `self_attention` processors) and one
    ``<token>.safetensors`` per modifier token (``{token: [D]}``, as diffusers' `save_new_embed`)."""
    out_dir = Path(out_dir)
    tensors = {diffusers_key(name): w.float() for name, w in full_weights.items()}
    for path in self_attention:
        tensors[f"{path}.processor"] = torch.zeros(0)
    identity = ("booth.method", "booth.base_fingerprint", "booth.base_model", "booth.architecture")
    meta = {"format": "pt", **{k: v for k, v in (metadata or {}).items() if k in identity}}
    files = {"diffusers": _write(out_dir / DIFFUSERS_CD_FILE, tensors, meta)}
    for token, vector in tokens.items():
        if Path(token).name != token or token.startswith("."):
            raise BoothError(f"modifier token {token!r} cannot be a file name")
        files[f"token:{token}"] = _write(
            out_dir / f"{token}.safetensors", {token: vector.reshape(-1).float()}, {"format": "pt"}
        )
    return files


def self_attention_paths(unet) -> list[str]:
    """Module paths of every attention layer that is not a cross-attention layer (diffusers' untrained ones)."""
    cross = set(cross_attention_layers(unet))
    return [
        name.removesuffix(".processor")
        for name in unet.attn_processors
        if name.removesuffix(".processor") not in cross
    ]


def write_custom_diffusion(
    out_dir: str | os.PathLike,
    name: str,
    weights: CustomDiffusionWeights,
    unet,
    *,
    diffusers: bool = True,
) -> dict[str, Path]:
    """Write a Custom Diffusion model: booth's ``<name>.booth-cd.safetensors`` and (by default) diffusers' files.

    `unet` is the base model's UNet: it gives W0 for the diffusers file (W = W0 + delta) and the layer names.
    Returns {"custom_diffusion": booth file, "diffusers": weights file, "token:<t>": embedding file, ...}.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise BoothError(f"invalid output name {name!r}: use a plain file stem such as 'my_subject'")
    out_dir = Path(out_dir)
    files = {"custom_diffusion": write_booth_file(out_dir / f"{name}{BOOTH_SUFFIX}", weights)}
    if diffusers:
        base = pretrained_weights(unet, kinds_of(weights.layers))
        files.update(
            write_diffusers_files(
                out_dir, weights.weights(base), weights.tokens, self_attention_paths(unet), weights.metadata
            )
        )
    return files


# --------------------------------------------------------------------------------------------------
# reading


def find_custom_diffusion_file(path: str | os.PathLike) -> Path:
    """The file a path means: a file itself; in a folder its one ``*.booth-cd.safetensors`` (a booth run or
    merge), else diffusers' ``pytorch_custom_diffusion_weights.safetensors``."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.glob(f"*{BOOTH_SUFFIX}"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise BoothError(
                f"{path} holds {len(found)} Custom Diffusion files ({', '.join(f.name for f in found)}); pass one"
            )
        if (path / DIFFUSERS_CD_FILE).is_file():
            return path / DIFFUSERS_CD_FILE
        raise BoothError(f"{path} holds no Custom Diffusion file (*{BOOTH_SUFFIX} or {DIFFUSERS_CD_FILE})")
    raise BoothError(f"Custom Diffusion file not found: {path}")


def read_custom_diffusion(path: str | os.PathLike) -> CustomDiffusionWeights:
    """Read booth's file, or diffusers' weights file with the ``<token>.safetensors`` files beside it."""
    from safetensors import SafetensorError, safe_open

    file = find_custom_diffusion_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise BoothError(f"{file} is not a readable safetensors file: {exc}") from None
    if metadata.get("booth.format") == "custom-diffusion":
        return _from_booth(file, tensors, metadata)
    if any("custom_diffusion" in k for k in tensors):
        return _from_diffusers(file, tensors, metadata)
    raise BoothError(f"{file} is not a Custom Diffusion file (no booth metadata, no *_custom_diffusion keys)")


def _from_booth(
    file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> CustomDiffusionWeights:
    layers: dict[str, Any] = {}
    tokens: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("token."):
            tokens[key[len("token.") :]] = value.reshape(-1)
        elif key.startswith("unet.") and key.endswith(".delta"):
            layers[key[len("unet.") : -len(".delta")]] = value
        elif key.startswith("unet.") and key.endswith((".delta_up", ".delta_down")):
            name, _, part = key[len("unet.") :].rpartition(".")
            factors.setdefault(name, {})[part] = value
        else:
            raise BoothError(f"{file}: unknown key {key!r} in a booth Custom Diffusion file")
    for name, parts in factors.items():
        if set(parts) != {"delta_up", "delta_down"}:
            raise BoothError(f"{file}: layer {name} lacks one of its low-rank factors")
        layers[name] = (parts["delta_up"], parts["delta_down"])
    if not layers:
        raise BoothError(f"{file} holds no Custom Diffusion layers")
    return CustomDiffusionWeights(layers, tokens, metadata, full=False, path=file)


def _from_diffusers(
    file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> CustomDiffusionWeights:
    from safetensors.torch import load_file

    layers = {}
    for key, value in tensors.items():
        name = booth_name(key)
        if name is not None:
            layers[name] = value
        elif value.numel() != 0:
            raise BoothError(f"{file}: unknown key {key!r} in a diffusers Custom Diffusion file")
    tokens = {}
    for token_file in sorted(file.parent.glob("*.safetensors")):
        if token_file == file or token_file.name.endswith(BOOTH_SUFFIX):
            continue
        try:
            state = load_file(str(token_file))
        except Exception:  # noqa: BLE001 - not an embedding file: ignore
            continue
        if list(state) == [token_file.stem]:  # diffusers' `save_new_embed`: {token: [D]}
            tokens[token_file.stem] = state[token_file.stem].reshape(-1)
    return CustomDiffusionWeights(layers, tokens, metadata, full=True, path=file)


# --------------------------------------------------------------------------------------------------
# applying to a pipeline


def check_base(weights: CustomDiffusionWeights, unet, label: str | None = None) -> None:
    """BoothError unless `weights` fits this UNet: the layers exist with the same shapes, and (booth files) the
    base-model fingerprint matches."""
    label = label or weights.label
    layers = cross_attention_layers(unet)
    for name, value in weights.layers.items():
        path, _, rest = name.partition(".attn2.")
        module = layers.get(f"{path}.attn2")
        kind = rest.rsplit(".", 1)[0]
        if module is None or kind not in (*KV_KINDS, *QOUT_KINDS):
            raise BoothError(f"Custom Diffusion {label} does not fit this model: it has no layer {name}")
        param = getattr(_linear(module, kind), rest.rsplit(".", 1)[1], None)
        shape = (
            tuple(value[0].shape[0:1] + value[1].shape[1:])
            if isinstance(value, tuple)
            else tuple(value.shape)
        )
        if param is None or tuple(param.shape) != shape:
            raise BoothError(
                f"Custom Diffusion {label} does not fit this model: layer {name} is "
                f"{tuple(param.shape) if param is not None else None}, the file has {shape}"
            )
    fingerprint = weights.fingerprint
    if fingerprint and fingerprint != base_fingerprint(unet):
        raise BoothError(
            f"Custom Diffusion {label} was trained on another base model ({weights.base_model or 'unknown'}, "
            f"fingerprint {fingerprint}); load the model it was trained on"
        )


def custom_processors(unet, full_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
    """diffusers' `CustomDiffusionAttnProcessor2_0` for each cross-attention layer named in `full_weights`,
    holding those weights; {"<path>.processor": processor}."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    layers = cross_attention_layers(unet)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in full_weights.items():
        key = diffusers_key(name)
        head, _, tail = key.partition(".processor.")
        grouped.setdefault(head, {})[tail] = tensor
    processors = {}
    for path, state in grouped.items():
        attn = layers[path]
        q_out = "to_q_custom_diffusion.weight" in state
        proc = CustomDiffusionAttnProcessor2_0(
            train_kv=True,
            train_q_out=q_out,
            hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features,
            out_bias=attn.to_out[0].bias is not None,
            dropout=float(getattr(attn.to_out[1], "p", 0.0)),
        )
        proc.load_state_dict({k: v.float() for k, v in state.items()})
        processors[f"{path}.processor"] = proc.to(attn.to_k.weight.device, attn.to_k.weight.dtype)
    return processors


def set_processors(unet, processors: Mapping[str, torch.nn.Module]) -> None:
    """Install `processors` on their layers; every other layer keeps the processor it has."""
    current = dict(unet.attn_processors)
    unknown = set(processors) - set(current)
    if unknown:
        raise BoothError(f"no attention layer {sorted(unknown)[0]!r} in this UNet")
    current.update(processors)
    unet.set_attn_processor(current)


def check_new_token(tokenizer, token: str) -> None:
    """BoothError if `token` is already a word of the tokenizer (as a vocabulary entry or an added token)."""
    vocab = tokenizer.get_vocab()
    if token in vocab or f"{token}</w>" in vocab:
        raise BoothError(
            f"{token} is already in the tokenizer's vocabulary; choose a new word such as <new1> "
            "(--placeholder-token)"
        )


def add_tokens(tokenizer, text_encoder, tokens: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Add each token to the tokenizer and a row with its embedding to the text encoder; {token: id}."""
    for token in tokens:
        check_new_token(tokenizer, token)
    if not tokens:
        return {}
    width = text_encoder.get_input_embeddings().weight.shape[1]
    for token, vector in tokens.items():
        if vector.numel() != width:
            raise BoothError(
                f"modifier token {token} has {vector.numel()} values; this text encoder needs {width}"
            )
    tokenizer.add_tokens(list(tokens))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    embedding = text_encoder.get_input_embeddings()
    if len(tokenizer) > embedding.weight.shape[0]:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        for token, vector in tokens.items():
            embedding.weight[ids[token]] = vector.reshape(-1).to(
                embedding.weight.device, embedding.weight.dtype
            )
    return ids


def load_custom_diffusion(pipe, path: str | os.PathLike) -> CustomDiffusionWeights:
    """Apply a Custom Diffusion model (booth file, booth run/merge folder, or diffusers folder) to `pipe`.

    The cross-attention layers get diffusers' Custom Diffusion processors with the fine-tuned weights (booth files:
    W0 + delta, after checking the base-model fingerprint) and the modifier tokens are added to the tokenizer and
    text encoder. Raises BoothError when the file does not fit the model or a token is already present.
    """
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise BoothError("Custom Diffusion is supported for SD 1.x/2.x models (one text encoder), not SDXL")
    weights = read_custom_diffusion(path)
    unet = pipe.unet
    check_base(weights, unet)
    base = pretrained_weights(unet, kinds_of(weights.layers))
    for token in weights.tokens:
        check_new_token(pipe.tokenizer, token)
    set_processors(unet, custom_processors(unet, weights.weights(base)))
    add_tokens(pipe.tokenizer, pipe.text_encoder, weights.tokens)
    return weights


__all__ = [
    "BOOTH_SUFFIX",
    "DEFAULT_INITIALIZER",
    "DIFFUSERS_CD_FILE",
    "DIFFUSERS_LOADER_NOTE",
    "CustomDiffusionWeights",
    "add_tokens",
    "base_fingerprint",
    "booth_name",
    "check_base",
    "check_new_token",
    "cross_attention_layers",
    "custom_processors",
    "diffusers_key",
    "find_custom_diffusion_file",
    "load_custom_diffusion",
    "pretrained_weights",
    "read_custom_diffusion",
    "set_processors",
    "write_booth_file",
    "write_custom_diffusion",
    "write_diffusers_files",
]
