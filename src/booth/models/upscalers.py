"""Super-resolution models that A1111 users keep in `models/ESRGAN` and `models/RealESRGAN`, built from
their files alone (no architecture names in the files, so the key layout tells which network it is):

* ESRGAN's generator, RRDBNet (Wang et al. 2018, "ESRGAN", fig. 3-4), in both key layouts: the original
  repository's `model.N...` (ESRGAN_4x, 4x-UltraSharp and most community models) and BasicSR's
  `conv_first / body.N.rdbK / conv_up1` (RealESRGAN_x4plus, _x2plus with its pixel-unshuffled input,
  _x4plus_anime_6B). Two to three nearest-neighbour 2x upsamples, any depth and width.
* Real-ESRGAN's compact VGG-style network, SRVGGNetCompact (Wang et al. 2021, "Real-ESRGAN"):
  realesr-general-x4v3, realesr-general-wdn-x4v3, realesr-animevideov3 (`body.N` convs with PReLU).

`load_upscaler(path)` reads `.pth` / `.pt` (with `weights_only=True`: plain tensors only) or `.safetensors`
(`params_ema` / `params` / `state_dict` wrappers unwrapped) and returns an `UpscalerModel`, whose `upscale`
runs the network over tiles with a margin of context on each side, so memory stays flat at any picture
size and tiles join without seams wherever the margin covers the receptive field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from booth.errors import BoothError

UPSCALER_SUFFIXES = (".pth", ".pt", ".safetensors")


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, 1, 1)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs, residual scaled by 0.2 (ESRGAN fig. 4, "RDB")."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i + 1}", _conv(nf + i * gc, gc))
        self.conv5 = _conv(nf + 4 * gc, nf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for i in range(4):
            conv = getattr(self, f"conv{i + 1}")
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual in residual dense block: three RDBs, residual scaled by 0.2 (ESRGAN fig. 4)."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(nf, gc) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator in BasicSR's key names: conv_first, `nb` RRDBs + conv_body (a long skip),
    `n_up` x (nearest 2x, conv, LeakyReLU), conv_hr, conv_last. `unshuffle` > 1 packs the input's
    pixels into channels first (Real-ESRGAN x2 / x1 models), so the net scale is 2**n_up / unshuffle."""

    def __init__(self, in_ch: int, out_ch: int, nf: int, nb: int, gc: int, n_up: int, unshuffle: int = 1):
        super().__init__()
        self.unshuffle, self.n_up = unshuffle, n_up
        self.conv_first = _conv(in_ch * unshuffle**2, nf)
        self.body = nn.Sequential(*(RRDB(nf, gc) for _ in range(nb)))
        self.conv_body = _conv(nf, nf)
        for i in range(n_up):
            setattr(self, f"conv_up{i + 1}", _conv(nf, nf))
        self.conv_hr = _conv(nf, nf)
        self.conv_last = _conv(nf, out_ch)

    @property
    def scale(self) -> int:
        return 2**self.n_up // self.unshuffle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.n_up):
            conv = getattr(self, f"conv_up{i + 1}")
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network: `num_conv` + 2 convs with PReLU between them, pixel shuffle, plus the
    nearest-upsampled input (a residual), in its own key names (`body.N`)."""

    def __init__(self, in_ch: int, out_ch: int, nf: int, num_conv: int, upscale: int):
        super().__init__()
        self.upscale = upscale
        layers: list[nn.Module] = [_conv(in_ch, nf), nn.PReLU(nf)]
        for _ in range(num_conv):
            layers += [_conv(nf, nf), nn.PReLU(nf)]
        layers.append(_conv(nf, out_ch * upscale**2))
        self.body = nn.ModuleList(layers)

    @property
    def scale(self) -> int:
        return self.upscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return F.pixel_shuffle(out, self.upscale) + F.interpolate(
            x, scale_factor=self.upscale, mode="nearest"
        )


# ------------------------------------------------------------------------------------------------------
# key layouts


def old_esrgan_to_basicsr(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original ESRGAN layout (`model.0`, `model.1.sub.I.RDBk.convc.0`, `model.1.sub.NB`, then the
    upsampling convs every third index, the HR conv and the last conv) in BasicSR's names."""
    tops = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(r"model\.(\d+)\.weight", k))})
    if len(tops) < 3 or tops[0] != 0:
        raise BoothError("not an ESRGAN state dict: its model.N convs are missing")
    ups, hr, last = tops[1:-2], tops[-2], tops[-1]
    names = {0: "conv_first", hr: "conv_hr", last: "conv_last"}
    names.update({index: f"conv_up{i + 1}" for i, index in enumerate(ups)})
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", key):
            out[f"{names[int(m.group(1))]}.{m.group(2)}"] = value
        elif m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
        elif m := re.fullmatch(r"model\.1\.sub\.(\d+)\.(weight|bias)", key):
            if int(m.group(1)) != len(blocks):
                raise BoothError(f"not an ESRGAN state dict: unexpected key {key}")
            out[f"conv_body.{m.group(2)}"] = value
        else:
            raise BoothError(f"not an ESRGAN state dict: unexpected key {key}")
    return out


def _rrdbnet(state: dict[str, torch.Tensor]) -> RRDBNet:
    first, last = state["conv_first.weight"], state["conv_last.weight"]
    out_ch = last.shape[0]
    unshuffle = round((first.shape[1] / out_ch) ** 0.5)
    if unshuffle < 1 or out_ch * unshuffle**2 != first.shape[1]:
        raise BoothError(f"ESRGAN input of {first.shape[1]} channels is not {out_ch} x a square")
    nb = len({k.split(".")[1] for k in state if k.startswith("body.") and ".rdb1.conv1.weight" in k})
    n_up = len([k for k in state if re.fullmatch(r"conv_up\d+\.weight", k)])
    gc = state["body.0.rdb1.conv1.weight"].shape[0] if nb else 32
    return RRDBNet(out_ch, out_ch, first.shape[0], nb, gc, n_up, unshuffle)


def _compact(state: dict[str, torch.Tensor]) -> SRVGGNetCompact:
    convs = sorted(int(k.split(".")[1]) for k in state if re.fullmatch(r"body\.\d+\.weight", k))
    convs = [i for i in convs if state[f"body.{i}.weight"].ndim == 4]
    first, last = state[f"body.{convs[0]}.weight"], state[f"body.{convs[-1]}.weight"]
    in_ch, nf = first.shape[1], first.shape[0]
    upscale = round((last.shape[0] / in_ch) ** 0.5)
    if "body.1.weight" not in state or upscale < 1 or in_ch * upscale**2 != last.shape[0]:
        raise BoothError("not a Real-ESRGAN compact state dict (PReLU activations and a pixel-shuffle head)")
    return SRVGGNetCompact(in_ch, in_ch, nf, len(convs) - 2, upscale)


def build_upscaler(state: dict[str, torch.Tensor]) -> tuple[nn.Module, str]:
    """The network a state dict describes, with its weights loaded, and its architecture's name."""
    if "model.0.weight" in state:
        state, arch = old_esrgan_to_basicsr(state), "ESRGAN"
    else:
        arch = "ESRGAN (BasicSR)"
    if "conv_first.weight" in state:
        net: nn.Module = _rrdbnet(state)
    elif "body.0.weight" in state and state["body.0.weight"].ndim == 4:
        net, arch = _compact(state), "Real-ESRGAN compact"
    else:
        raise BoothError(
            "unknown upscaler architecture (booth reads ESRGAN / Real-ESRGAN RRDBNet and Real-ESRGAN "
            "compact models; SwinIR, DAT, HAT and the like are not supported)"
        )
    try:
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[1].strip() if "\n" in str(e).strip() else str(e)
        raise BoothError(f"{arch} weights do not fit the network they describe ({detail})") from None
    return net.eval().requires_grad_(False), arch


# ------------------------------------------------------------------------------------------------------
# running


def upscale_tiled(
    net: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    scale: int,
    tile: int = 192,
    pad: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run `net` (x `scale`) over `x` (B, C, H, W) in tiles of `tile` pixels, each seen with `pad` pixels of
    context on every side that is cut from its output: the result equals one pass over the whole picture
    wherever the receptive field is within `pad`. `tile` <= 0: one pass. `progress(done, total)` per tile."""
    h, w = x.shape[-2:]
    if tile <= 0 or (h <= tile and w <= tile):
        out = net(x)
        if progress:
            progress(1, 1)
        return out
    rows, cols = range(0, h, tile), range(0, w, tile)
    total, done = len(rows) * len(cols), 0
    out = None
    for y0 in rows:
        for x0 in cols:
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            cy0, cx0 = max(y0 - pad, 0), max(x0 - pad, 0)
            cy1, cx1 = min(y1 + pad, h), min(x1 + pad, w)
            part = net(x[..., cy0:cy1, cx0:cx1])
            if out is None:
                out = part.new_zeros(*x.shape[:-3], part.shape[-3], h * scale, w * scale)
            oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
            out[..., y0 * scale : y1 * scale, x0 * scale : x1 * scale] = part[
                ..., oy : oy + (y1 - y0) * scale, ox : ox + (x1 - x0) * scale
            ]
            done += 1
            if progress:
                progress(done, total)
    return out


@dataclass
class UpscalerModel:
    """A loaded super-resolution network."""

    net: nn.Module
    scale: int
    arch: str
    path: Path | None = None

    def to(self, device, dtype=torch.float32) -> UpscalerModel:
        self.net.to(device=device, dtype=dtype)
        return self

    @torch.inference_mode()
    def upscale(
        self,
        x: torch.Tensor,
        tile: int = 192,
        pad: int = 16,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """`x` (B, 3, H, W) in [0, 1] -> (B, 3, H x scale, W x scale) in [0, 1]."""
        param = next(self.net.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        multiple = getattr(self.net, "unshuffle", 1)
        h, w = x.shape[-2:]
        bottom, right = -h % multiple, -w % multiple  # pixel unshuffle needs even sides: reflect, then cut
        if bottom or right:
            x = F.pad(x, (0, right, 0, bottom), mode="reflect" if min(h, w) > 1 else "replicate")
        tile, pad = tile - tile % multiple, -(-pad // multiple) * multiple  # tile edges on the unshuffle grid
        out = upscale_tiled(self.net, x, self.scale, tile, pad, progress)
        return out[..., : h * self.scale, : w * self.scale].clamp(0, 1)


def load_upscaler(path: str | Path) -> UpscalerModel:
    """An ESRGAN / Real-ESRGAN model file (`.pth`, `.pt` or `.safetensors`), on the CPU in float32."""
    from booth.models.single_file import read_checkpoint

    path = Path(path)
    if path.suffix.lower() not in UPSCALER_SUFFIXES:
        raise BoothError(f"{path}: an upscaler model is a {' / '.join(UPSCALER_SUFFIXES)} file")
    if not path.is_file():
        raise BoothError(f"upscaler model {path} does not exist")
    state, _ = read_checkpoint(path, wrappers=("params_ema", "params", "state_dict", "model"))
    if not state:
        raise BoothError(f"{path} holds no tensors")
    try:
        net, arch = build_upscaler(state)
    except BoothError as e:
        raise BoothError(f"{path.name}: {e}") from None
    return UpscalerModel(net, net.scale, arch, path)
