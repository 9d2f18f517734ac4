"""`resmemnet serve`: the web page and REST API on uvicorn."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

from resmemnet.cli import COMMANDS
from resmemnet.data.images import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV
from resmemnet.runtime import PRECISIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help=COMMANDS["serve"])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 0..65535 (0: any free port)")
    p.add_argument("--checkpoint", help="checkpoint path or bundled model name (default: the bundled default)")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model copy")
    # Unset limits stay None so ServeSettings keeps its defaults (one source of defaults; see GET /v1/model).
    p.add_argument("--max-files", type=int, help="images per request (default 16)")
    p.add_argument("--max-file-mb", type=float, help="megabytes per image (default 10)")
    p.add_argument("--max-pixels", type=int, help=f"decompression-bomb guard, pixels per image (default "
                                                  f"${MAX_PIXELS_ENV} or {DEFAULT_MAX_PIXELS:,}, as for predict)")
    p.add_argument("--decode-pixels", type=int, help="pixels decoded at once across all requests, which bounds "
                                                     f"memory (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--body-timeout", type=float, help="seconds a request body may take to arrive, else 408 "
                                                      "(default 60)")
    p.add_argument("--header-timeout", type=float, help="seconds a request head may take to arrive, else the "
                                                        "connection is closed (default 10)")
    p.add_argument("--max-batch", type=int, help="images per model call when requests are batched (default 8)")
    p.add_argument("--max-wait-ms", type=float, help="how long a batch waits for more requests (default 10)")
    p.add_argument("--device", help="auto (default: CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=[x for x in PRECISIONS if x != "int8"],
                   help="as for predict (default auto: fp16 on a GPU, bf16 on a CPU with native bf16, else fp32; "
                        "GET /v1/model says which and why); int8 has no gradients for /v1/explain")
    p.set_defaults(func=run)


def _port(text: str) -> int:
    """A TCP port, checked while parsing: uvicorn would fail on 99999 only when it binds (OverflowError)."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (a whole number in 0..65535)")
    return int(text)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from resmemnet.serve.app import ENV_CONFIG, ServeSettings, create_app
        from resmemnet.serve.protocol import with_header_timeout
    except ImportError as exc:
        raise RuntimeError(f"{exc.name} is missing; install the server with: pip install 'resmemnet[serve]'") from exc
    from resmemnet.checkpoint import read_metadata
    from resmemnet.pretrained import load_model, resolve_checkpoint

    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    given = {"max_files": args.max_files, "max_pixels": args.max_pixels, "decode_pixels": args.decode_pixels,
             "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "device": args.device,
             "precision": args.precision,
             "body_timeout_s": args.body_timeout, "header_timeout_s": args.header_timeout,
             "max_file_bytes": None if args.max_file_mb is None else int(args.max_file_mb * 2**20)}
    settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    connection = {"host": args.host, "port": args.port, "http": with_header_timeout(settings.header_timeout_s),
                  "timeout_keep_alive": settings.keep_alive_s}
    if args.workers == 1:
        uvicorn.run(create_app(load_model(args.checkpoint), settings, inplace=True), **connection)
        return 0
    # Worker processes import the app by name, so the configuration travels in an environment variable.
    checkpoint = str(resolve_checkpoint(args.checkpoint))
    read_metadata(checkpoint)  # a bad checkpoint fails here, once, rather than in every worker
    os.environ[ENV_CONFIG] = json.dumps({"checkpoint": checkpoint, "settings": asdict(settings)})
    uvicorn.run("resmemnet.serve.app:app_from_env", factory=True, workers=args.workers, **connection)
    return 0
