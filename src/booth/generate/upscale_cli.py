"""`booth upscale`: A1111's Extras tab on the command line (`booth.generate.upscale.postprocess`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from booth.errors import BoothError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
EPILOG = """\
examples:
  booth upscale photo.png --upscaler Lanczos --scale 2
  booth upscale outputs/ --upscaler "R-ESRGAN 4x+" --upscaler-dir ~/sd/models/RealESRGAN --scale 4
  booth upscale art.png --upscaler 4x-UltraSharp --upscaler-dir models/ESRGAN --to 1024x1024 --no-crop
  booth upscale art.png --upscaler Lanczos --upscaler-2 Nearest --upscaler-2-visibility 0.3

Results are written to --out as NNNNN-<name>.png (never overwriting); a picture's `parameters` text is kept
and A1111's `postprocessing` text ("Postprocess upscale by: 2, Postprocess upscaler: ...") added.
"""


def add_upscale_command(sub) -> None:
    p = sub.add_parser(
        "upscale",
        help="upscale pictures like A1111's Extras tab (Lanczos, Nearest, ESRGAN / Real-ESRGAN models)",
        description="Upscale pictures with A1111's built-in upscalers or ESRGAN-type model files.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="pictures, or folders of pictures")
    p.add_argument("--upscaler", default="Lanczos", metavar="NAME", help="upscaler 1 (default Lanczos)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--scale", type=float, default=2.0, metavar="X", help="scale by X (default 2)")
    size.add_argument("--to", metavar="WxH", help="scale to cover W x H pixels (A1111's 'Scale to')")
    p.add_argument("--no-crop", action="store_true", help="with --to: keep the whole upscaled picture")
    p.add_argument("--upscaler-2", default="None", metavar="NAME", help="a second upscaler blended in")
    p.add_argument(
        "--upscaler-2-visibility", type=float, default=0.0, metavar="V", help="its weight 0..1 (default 0)"
    )
    p.add_argument(
        "--upscaler-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of ESRGAN / Real-ESRGAN model files (.pth, .safetensors; A1111's models/ESRGAN)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=192,
        metavar="PX",
        help="model tile size in input pixels (0: whole picture)",
    )
    p.add_argument("--out", "-o", default="outputs/extras", help="output folder (default ./outputs/extras)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if present)")
    p.add_argument("--list", action="store_true", help="list the upscalers found and exit")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_upscale)


class _TileBar:
    """A progress bar with ETA over the tiles of each model pass (a model upscale can take minutes on a CPU)."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if total == 1:  # one tile: nothing to show
            return
        if done == 1 or self.bar is None:
            self.close()
            self.bar = tqdm(total=total, desc="  tiles", unit="tile", leave=False, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _inputs(items: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise BoothError(f"{path} holds no .png / .jpg / .webp pictures")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise BoothError(f"no such picture or folder: {path}")
    return paths


def cmd_upscale(args) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError

    from booth.devices import resolve_device
    from booth.fsutil import check_folders
    from booth.generate.metadata import read_image_metadata, save_png
    from booth.generate.output import ensure_writable_dir, next_numbered_path
    from booth.generate.upscale import ExtrasParams, Upscalers, postprocess, postprocess_infotext

    check_folders("--upscaler-dir", args.upscaler_dir)
    if args.tile < 0:
        raise BoothError(f"--tile must be at least 0, got {args.tile}")
    device = resolve_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    upscalers = Upscalers(args.upscaler_dir, device=device, dtype=dtype, tile=args.tile)
    if args.list:
        for entry in upscalers.entries():
            print(f"{entry.name:<28} {entry.path or 'built in'}")
        return 0
    from booth.cli import parse_wxh

    width, height = parse_wxh(args.to, "--to") if args.to else (512, 512)
    params = ExtrasParams(
        resize_mode=1 if args.to else 0,
        upscaling_resize=args.scale,
        upscaling_resize_w=width,
        upscaling_resize_h=height,
        upscaling_crop=not args.no_crop,
        upscaler_1=args.upscaler,
        upscaler_2=args.upscaler_2,
        extras_upscaler_2_visibility=args.upscaler_2_visibility,
    )
    params.validate(upscalers)  # names and numbers before any picture is read
    paths = _inputs(args.images)
    out = ensure_writable_dir(args.out)
    bar = tiles = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="upscaling", unit="image", dynamic_ncols=True)
        tiles = _TileBar()
    for path in paths:
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise BoothError(f"cannot read picture {path}: {e}") from None
        result, info = postprocess(image, params, upscalers, tiles)
        result.info = {"postprocessing": postprocess_infotext(info)}  # A1111's extras chunk
        parameters = read_image_metadata(path).infotext or ""
        target = next_numbered_path(out, "", ".png", suffix=f"-{path.stem}")
        try:
            save_png(result, target, parameters, {"postprocessing": info})
        except BaseException:
            target.unlink(missing_ok=True)  # the claimed, still empty name
            raise
        if bar:
            bar.update(1)
            bar.write(str(target))
        else:
            print(target)
    if bar:
        bar.close()
    return 0
