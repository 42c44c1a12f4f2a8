"""`booth serve`: the A1111-compatible API server (FastAPI + uvicorn, installed with `pip install "booth[serve]"`)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys

from booth.errors import BoothError

SERVE_EPILOG = """\
examples:
  booth serve                                   # booth-mini on http://127.0.0.1:7860
  booth serve --model sd15.safetensors --model-dir ~/models --lora-dir ~/loras
  booth serve --host 0.0.0.0 --api-auth me:secret   # reachable from the network: always set auth

API: /sdapi/v1/* as AUTOMATIC1111 (txt2img, img2img, options, sd-models, samplers, schedulers, progress,
interrupt, skip, png-info, loras, embeddings ...), OpenAPI docs at /docs, the job queue at /booth/v1/queue.
Jobs are stored in DATA_DIR/queue.sqlite3 and survive a restart.
"""


def add_serve_command(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the A1111-compatible API server with a persistent job queue",
        description="Serve /sdapi/v1 (AUTOMATIC1111 API) with a persistent, visible job queue.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=SERVE_EPILOG,
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--api-auth",
        default=None,
        metavar="USER:PASS[,USER2:PASS2]",
        help="HTTP Basic credentials required on every route (or set BOOTH_API_AUTH)",
    )
    p.add_argument(
        "--model", "-m", default=None, help="default model: diffusers folder, .safetensors/.ckpt or hub id"
    )
    p.add_argument(
        "--model-dir", action="append", default=[], metavar="DIR", help="more models offered in sd-models"
    )
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR", help="folder of LoRAs")
    p.add_argument(
        "--embeddings-dir", action="append", default=[], metavar="DIR", help="folder of embeddings"
    )
    p.add_argument(
        "--upscaler-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of ESRGAN / Real-ESRGAN upscaler models (A1111's models/ESRGAN)",
    )
    p.add_argument(
        "--controlnet-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of ControlNet models (A1111's models/ControlNet)",
    )
    p.add_argument(
        "--vae-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of VAE files for the sd_vae option (A1111's models/VAE)",
    )
    p.add_argument(
        "--styles-file",
        action="append",
        default=[],
        metavar="CSV",
        help="A1111 styles.csv whose styles requests may name in `styles`",
    )
    p.add_argument(
        "--data-dir",
        default="outputs/server",
        help="job queue database, job images and saved outputs (default outputs/server)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="weights dtype")
    p.add_argument(
        "--vae-tiling",
        default="auto",
        choices=["auto", "on", "off"],
        help="VAE in tiles: auto (a picture that runs out of memory is done again in tiles), on, off",
    )
    p.add_argument("--max-size", type=int, default=2048, help="largest width/height a request may ask for")
    p.add_argument("--max-batch-size", type=int, default=8, help="largest batch_size a request may ask for")
    p.add_argument("--max-body-mb", type=float, default=32, help="largest request body in MiB (default 32)")
    p.add_argument(
        "--allowed-host", action="append", default=None, metavar="HOST", help="accepted Host header"
    )
    p.add_argument(
        "--allowed-origin", action="append", default=[], metavar="ORIGIN", help="allowed CORS origin"
    )
    p.add_argument("--paused", action="store_true", help="start with the queue paused")
    p.add_argument("--no-preload", action="store_true", help="load the model on the first job, not at start")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def _require_serve_extra() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise BoothError(f'booth serve needs {" and ".join(missing)}: pip install "booth[serve]"')


def build_config(args):
    from dataclasses import replace

    from booth.server.config import Limits, ServerConfig, auth_from_env, is_loopback, parse_auth

    auth = parse_auth(args.api_auth) if args.api_auth else auth_from_env()
    limits = replace(
        Limits(),
        max_side=args.max_size,
        max_batch_size=args.max_batch_size,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
    )
    config = ServerConfig(
        host=args.host,
        port=args.port,
        auth=auth,
        model=args.model,
        model_dirs=args.model_dir,
        lora_dirs=args.lora_dir,
        embeddings_dirs=args.embeddings_dir,
        upscaler_dirs=args.upscaler_dir,
        vae_dirs=args.vae_dir,
        controlnet_dirs=args.controlnet_dir,
        styles_files=args.styles_file,
        data_dir=args.data_dir,
        device=args.device,
        dtype=args.dtype,
        vae_tiling=args.vae_tiling,
        limits=limits,
        preload=not args.no_preload,
        start_paused=args.paused,
        allowed_hosts=args.allowed_host,
        allowed_origins=args.allowed_origin,
    ).validate()
    if not is_loopback(config.host) and not config.auth:
        print(
            f"booth: warning: listening on {config.host} without --api-auth: anyone who can reach this port "
            "can use the server",
            file=sys.stderr,
        )
    return config


def _check_port(host: str, port: int) -> None:
    """BoothError with the reason when the address cannot be bound (instead of uvicorn's exit)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise BoothError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def cmd_serve(args) -> int:
    _require_serve_extra()
    import uvicorn

    from booth.server.app import create_app

    config = build_config(args)
    if config.model is None:
        from booth.models.loading import default_model_path

        if not default_model_path().exists():
            raise BoothError(
                "the default model booth-mini is not installed yet; pass --model PATH "
                "(a diffusers folder or .safetensors/.ckpt)"
            )
    app = create_app(config)  # BoothError (bad model path, locked data dir ...) before binding
    app.state.booth.queue.check_free()
    _check_port(config.host, config.port)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    display = f"[{config.host}]" if ":" in config.host else config.host
    print(
        f"booth: serving on http://{display}:{config.port} (docs: /docs, queue: /booth/v1/queue)",
        file=sys.stderr,
    )
    uvicorn.run(
        app, host=config.host, port=config.port, log_level=args.log_level, timeout_graceful_shutdown=10
    )
    return 0


__all__ = ["add_serve_command", "build_config", "cmd_serve"]
