"""The HTTP API and web page: a thin FastAPI adapter over the inference core's scorer and Grad-CAM.

One `TorchScorer` is built at start-up, under the device and precision policy of `resmemnet predict`
(resmemnet.runtime), and every micro-batch of /v1/predict and /v1/explain runs through it: a file
gets the same score from the API as from `predict`, `resmemnet predict` and `resmemnet explain`.

Uploads are read into memory under size and count limits, decoded by `load_image` (type sniffed
from the bytes, decompression-bomb guard) in a worker thread, and scored by a micro-batcher, so
concurrent requests share model calls and the event loop never runs the model. Client file
names are only echoed back; nothing the client sends is ever used as a path.

Memory is bounded whatever the uploads hold: each file is decoded straight to the size the model
(or the Grad-CAM overlay) needs, one at a time per request, under a pixel budget shared by all
requests, and freed memory is handed back to the system after large uploads (serve/memory.py).
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, Field
from scipy.stats import rankdata

from resmemnet import __version__
from resmemnet.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, apply_max_pixels, default_max_pixels, load_image
from resmemnet.explain import Explanation, explain_batch
from resmemnet.inference import TorchScorer, model_output_error
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.predict import predict
from resmemnet.pretrained import load_model
from resmemnet.serve.batching import BatcherClosedError, MicroBatcher, QueueFullError
from resmemnet.serve.memory import PixelBudget, release_memory, tune_allocator
from resmemnet.serve.middleware import BodyLimit, BodyTimeout, SecurityHeaders, security_headers

__all__ = ["ENV_CONFIG", "ServeSettings", "app_from_env", "create_app"]

ENV_CONFIG = "RESMEMNET_SERVE_CONFIG"  # JSON {"checkpoint": ..., "settings": {...}} for `--workers N` processes
_MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the files themselves
_STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
_TRIM_AFTER_PIXELS = 16_000_000  # a request that decoded this much (48 MB of RGB) hands freed memory back


@dataclass(frozen=True)
class ServeSettings:
    """Server limits and batching; every field is a `resmemnet serve` flag."""

    max_files: int = 16
    max_file_bytes: int = 10 * 2**20
    max_pixels: int = field(default_factory=default_max_pixels)  # per image: the CLI's limit too
    decode_pixels: int = DEFAULT_MAX_PIXELS  # decoded at once across all requests: bounds memory under load
    max_batch: int = 8  # images per model call: ResNet-152's activations are ~50 MB an image on a CPU
    explain_batch: int = 4
    max_wait_ms: float = 10.0
    max_queue: int = 256
    overlay_max_side: int = 768
    body_timeout_s: float = 60.0  # a request body must arrive within this, else 408
    header_timeout_s: float = 10.0  # a request head must arrive within this, else the connection closes
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    device: str = "auto"  # resolved by resmemnet.runtime, like predict, evaluate and explain
    precision: str = "auto"  # the policy of `resmemnet predict` (resmemnet.runtime); GET /v1/model says which and why

    def __post_init__(self) -> None:
        for name in ("max_files", "max_file_bytes", "max_pixels", "decode_pixels", "max_batch", "explain_batch",
                     "max_queue", "overlay_max_side", "keep_alive_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        for name in ("body_timeout_s", "header_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def max_request_bytes(self) -> int:
        return self.max_files * self.max_file_bytes + _MULTIPART_OVERHEAD


class ImageResult(BaseModel):
    """One uploaded file: its score and rank, or why it could not be scored."""

    index: int = Field(description="position of the file in the upload")
    filename: str = Field(description="the client's file name, echoed (never used as a path)")
    score: float | None = Field(description="predicted memorability in [0, 1]; null if the file was unusable")
    score_std: float | None = Field(default=None, description="the score's standard deviation over an ensemble's "
                                                              "members; null for single models")
    rank: int | None = Field(description="1 = most memorable of the scored files in this request")
    error: str | None = Field(default=None, description="why the file could not be scored")


class ExplainResult(ImageResult):
    overlay_png: str | None = Field(default=None, description="base64 PNG: the image with its Grad-CAM heatmap")
    heatmap_png: str | None = Field(default=None, description="base64 8-bit greyscale PNG: the heatmap, 0-255")


class PredictResponse(BaseModel):
    results: list[ImageResult]


class ExplainResponse(BaseModel):
    results: list[ExplainResult]


class ErrorResponse(BaseModel):
    detail: str | list[dict[str, Any]] = Field(description="what was wrong and what to do; a list for "
                                                            "malformed requests (one entry per bad field)")


_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "a file or the request is over the size limit"},
    422: {"model": ErrorResponse, "description": "no usable image, too many files, or a malformed request"},
    503: {"model": ErrorResponse, "description": "too much work queued; retry later"},
}


_Files = Annotated[list[UploadFile], File(description="one or more images (repeat the field `files`)")]


@dataclass
class _Upload:
    filename: str
    item: Any = None  # what the endpoint needs from the decoded image: a tensor, or a small PIL image
    error: str | None = None


def _static_files() -> dict[str, bytes]:
    folder = resources.files("resmemnet.serve") / "static"
    return {name: (folder / name).read_bytes() for name in ("index.html", *_STATIC)}


def _header_pixels(data: bytes) -> int:
    """width x height from the image header alone (0 if it is no image: load_image then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.width * image.height
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return 0


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _scatter(n: int, indices: list[int], values: list[Any]) -> list[Any]:
    """Results for the usable files put back at their upload positions; None where a file was unusable."""
    out: list[Any] = [None] * n
    for i, value in zip(indices, values, strict=True):
        out[i] = value
    return out


def _finite(uploads: list[_Upload], scores: list[float | None]) -> list[float | None]:
    """`scores` with each NaN or infinite one made its upload's error: never a null score with a rank."""
    for upload, score in zip(uploads, scores, strict=True):
        upload.error = upload.error or model_output_error(score) or None
    return [None if u.error else s for u, s in zip(uploads, scores, strict=True)]


def _ranks(scores: list[float | None]) -> list[int | None]:
    """1 = highest score; ties share the better rank; None where a file had no score."""
    scored = [i for i, s in enumerate(scores) if s is not None]
    ranks = rankdata([-scores[i] for i in scored], method="min").astype(int).tolist() if scored else []
    out: list[int | None] = [None] * len(scores)
    for i, rank in zip(scored, ranks, strict=True):
        out[i] = rank
    return out


class _Server:
    """What the routes share: the settings, the one scorer (built at start-up, reused by every micro-batch), the
    two micro-batchers that feed it and the decoding budget."""

    def __init__(self, model: ResMemNet, settings: ServeSettings, *, inplace: bool):
        self.settings = settings
        self.scorer = TorchScorer(model, device=settings.device, precision=settings.precision, inplace=inplace)
        self.transform = self.scorer.preprocessing.transforms()
        self.budget = PixelBudget(settings.decode_pixels)
        lock = threading.Lock()  # Grad-CAM hooks must never see a predict batch's forward pass
        wait_s = settings.max_wait_ms / 1000
        # A model call's activations (0.4 GB for 8 images through ResNet-152) are mmapped (tune_allocator) and
        # unmapped as they are freed; what small buffers leave in the arenas is trimmed once a burst is over.
        self.batchers: dict[str, MicroBatcher[Any, Any]] = {
            "predict": MicroBatcher(self._score, max_batch=settings.max_batch, max_wait_s=wait_s, lock=lock,
                                    on_idle=release_memory, max_queue=settings.max_queue, name="resmemnet-predict"),
            "explain": MicroBatcher(self._explain, max_batch=settings.explain_batch, max_wait_s=wait_s, lock=lock,
                                    on_idle=release_memory, max_queue=settings.max_queue, name="resmemnet-explain")}

    def _score(self, tensors: list[torch.Tensor]) -> list[tuple[float, float | None]]:
        scores, spread = predict(tensors, self.scorer, batch_size=self.settings.max_batch, return_std=True)
        return [(float(s), None if np.isnan(d) else float(d)) for s, d in zip(scores, spread, strict=True)]

    def _explain(self, items: list[tuple[torch.Tensor, Image.Image]]) -> list[Explanation]:
        size = self.settings.explain_batch
        return [e for start in range(0, len(items), size) for e in explain_batch(
            self.scorer, torch.stack([x for x, _ in items[start:start + size]]),
            [image for _, image in items[start:start + size]])]

    def model_input(self, data: bytes) -> torch.Tensor:
        """The network's input, decoded as `predict` and `resmemnet predict` decode a file (so: the same score)."""
        image = load_image(data, max_pixels=self.settings.max_pixels, min_size=self.scorer.preprocessing.input_size)
        return self.transform(image)

    def explain_input(self, data: bytes) -> tuple[torch.Tensor, Image.Image]:
        """The network's input, and the picture the heatmap is drawn on: decoded a second time, to at most
        `overlay_max_side` a side. A full-size heatmap of a 40-megapixel upload would cost gigabytes."""
        side = self.settings.overlay_max_side
        image = load_image(data, max_pixels=self.settings.max_pixels, min_size=(side, side))
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        return self.model_input(data), image

    async def read_uploads(self, files: list[UploadFile], prepare: Callable[[bytes], Any]) -> list[_Upload]:
        """Bytes in memory under the limits, then `prepare` (decoding) in a thread; bad files become error rows."""
        limits = self.settings
        if len(files) > limits.max_files:
            raise HTTPException(422, f"{len(files)} files uploaded; the limit is {limits.max_files} per request. "
                                     "Send them in several requests.")
        blobs: list[tuple[str, bytes]] = []
        for f in files:
            name = (f.filename or f"file {len(blobs) + 1}")[:255]
            data = await f.read(limits.max_file_bytes + 1)
            if len(data) > limits.max_file_bytes:
                raise HTTPException(413, f"{name}: over the limit of {limits.max_file_bytes:,} bytes per file")
            blobs.append((name, data))
        uploads = await run_in_threadpool(self._decode, blobs, prepare)
        if all(u.item is None for u in uploads):
            reasons = "; ".join(f"{u.filename}: {u.error}" for u in uploads)
            raise HTTPException(422, f"No usable image in the upload ({reasons})")
        return uploads

    def _decode(self, blobs: list[tuple[str, bytes]], prepare: Callable[[bytes], Any]) -> list[_Upload]:
        """One file at a time, under the shared pixel budget, so a request holds at most one full-size decoded
        image at a time; an image over the pixel limit is refused from its header, never decoded."""
        uploads, decoded = [], 0
        for name, data in blobs:
            pixels = _header_pixels(data)
            pixels = pixels if pixels <= self.settings.max_pixels else 0
            try:
                with self.budget.hold(pixels):
                    uploads.append(_Upload(name, prepare(data)))
            except ImageLoadError as exc:
                uploads.append(_Upload(name, error=exc.reason))
            decoded += pixels
        if decoded >= _TRIM_AFTER_PIXELS:
            release_memory()
        return uploads

    async def run(self, name: str, items: list[Any]) -> list[Any]:
        try:
            return await self.batchers[name].run(items)
        except (QueueFullError, BatcherClosedError) as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from exc

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()

    def model_card(self) -> dict[str, Any]:
        """The model, the precision it runs at and why (as `resmemnet info` says), and the limits."""
        model, settings = self.scorer.model, self.settings
        return {**model.describe(), "metadata": model.metadata, "device": str(self.scorer.device),
                "precision": self.scorer.precision.name, "precision_reason": self.scorer.precision.reason,
                "limits": {**asdict(settings), "max_request_bytes": settings.max_request_bytes}}


async def _predict(server: _Server, files: list[UploadFile]) -> PredictResponse:
    uploads = await server.read_uploads(files, server.model_input)
    good = [i for i, u in enumerate(uploads) if u.item is not None]
    scored = _scatter(len(uploads), good, await server.run("predict", [uploads[i].item for i in good]))
    scores = _finite(uploads, [None if x is None else x[0] for x in scored])
    return PredictResponse(results=[
        ImageResult(index=i, filename=u.filename, score=s, score_std=None if s is None else x[1], rank=r,
                    error=u.error)
        for i, (u, s, x, r) in enumerate(zip(uploads, scores, scored, _ranks(scores), strict=True))])


def _encode(e: Explanation | None) -> tuple[bytes | None, bytes | None]:
    if e is None:
        return None, None
    return _png(e.overlay), _png(Image.fromarray(np.round(e.heatmap * 255).astype(np.uint8), mode="L"))


async def _explain(server: _Server, files: list[UploadFile], fmt: str) -> Response | ExplainResponse:
    if fmt == "png" and len(files) != 1:
        raise HTTPException(422, f"format=png returns one image, but {len(files)} files were uploaded; "
                                 "upload one file or use format=json")
    uploads = await server.read_uploads(files, server.explain_input)
    good = [i for i, u in enumerate(uploads) if u.item is not None]
    explained = _scatter(len(uploads), good, await server.run("explain", [uploads[i].item for i in good]))
    scores = _finite(uploads, [e.score if e is not None else None for e in explained])
    explained = [e if s is not None else None for e, s in zip(explained, scores, strict=True)]
    pngs = await run_in_threadpool(lambda: [_encode(e) for e in explained])
    if fmt == "png":  # exactly one file, and read_uploads refused it if unusable
        if explained[0] is None:  # the model's fault, not the upload's
            raise HTTPException(500, f"{uploads[0].filename}: {uploads[0].error}; the server's model is broken")
        return Response(pngs[0][0], media_type="image/png",
                        headers={"X-Memorability-Score": f"{explained[0].score:.6f}"})
    return ExplainResponse(results=[
        ExplainResult(index=i, filename=u.filename, score=s, rank=r, error=u.error,
                      overlay_png=_b64(overlay), heatmap_png=_b64(heat))
        for i, (u, s, r, (overlay, heat)) in enumerate(zip(uploads, scores, _ranks(scores), pngs, strict=True))])


def _api_routes(app: FastAPI, server: _Server) -> None:
    @app.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS, summary="Score images")
    async def predict_images(files: _Files) -> PredictResponse:
        """Memorability scores in upload order, with ranks. A bad file among good ones gets an error row."""
        return await _predict(server, files)

    @app.post("/v1/explain", response_model=ExplainResponse, responses={
        **_ERRORS, 200: {"content": {"image/png": {}}, "description": "JSON, or with format=png the overlay PNG "
                                                                     "(score in the X-Memorability-Score header)"}},
        summary="Score images and show what drives the score (Grad-CAM)")
    async def explain_images(files: _Files,
                             fmt: Annotated[Literal["json", "png"], Query(
                                 alias="format", description="json: base64 PNGs for every file; png: the overlay "
                                                             "of one file")] = "json") -> Response | ExplainResponse:
        """Score and Grad-CAM heatmap overlay per image; regions that raised the score are warm.

        The score is /v1/predict's for the same file; the overlay is drawn at most `overlay_max_side` pixels a side."""
        return await _explain(server, files, fmt)

    @app.get("/v1/model", summary="The model card: architecture, preprocessing, checkpoint metadata, precision, limits")
    async def model_card() -> dict[str, Any]:
        return server.model_card()


def _page_routes(app: FastAPI) -> None:
    static = _static_files()

    @app.get("/healthz", summary="Liveness check")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(static["index.html"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in _STATIC:  # a fixed set held in memory: the client's path never reaches the disk
            raise HTTPException(404, f"No static file {name!r}; available: {', '.join(_STATIC)}")
        return Response(static[name], media_type=_STATIC[name], headers={"Cache-Control": "no-cache"})


async def _server_error(request: Request, _: Exception) -> JSONResponse:
    # Sent from outside every middleware, so the security headers are added here.
    return JSONResponse({"detail": "Internal server error; the server log has the details"}, status_code=500,
                        headers=security_headers(request.url.path))


def create_app(model: ResMemNet, settings: ServeSettings | None = None, *, inplace: bool = False) -> FastAPI:
    """The app for an already-loaded model (tests build a tiny one; the CLI loads a checkpoint).

    The caller's model is left as it is (a copy is scored when it must move to another device), unless
    `inplace`: the CLI hands over a model it loaded for the server, which may then reorder its weights.
    """
    settings = settings or ServeSettings()
    apply_max_pixels(settings.max_pixels)  # Pillow's own guard too, before any upload's header is read
    tune_allocator()  # before the first large buffer: they then go back to the system when freed
    server = _Server(model, settings, inplace=inplace)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        server.close()

    # FastAPIOffline serves Swagger UI from files shipped in its wheel (MIT; Swagger UI itself is Apache-2.0),
    # so /docs works with no network, where FastAPI's loads it from a CDN. ReDoc is off: it fetches its logo
    # from its vendor's site.
    app = FastAPIOffline(title="resmemnet", version=__version__, lifespan=lifespan, redoc_url=None,
                         description="Predict how memorable an image is, and see which regions drive the score "
                                     "(ResMem-Net, Grad-CAM). Upload images as the repeatable multipart field "
                                     "`files`.")
    app.state.settings = settings
    app.state.scorer = server.scorer
    app.state.batchers = server.batchers
    app.state.pixel_budget = server.budget
    # Last added runs first: the security headers also cover the limits' own refusals.
    app.add_middleware(BodyTimeout, seconds=settings.body_timeout_s)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(Exception, _server_error)
    _api_routes(app, server)
    _page_routes(app)
    return app


def app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes (`resmemnet serve --workers N`), configured by ENV_CONFIG."""
    config = json.loads(os.environ.get(ENV_CONFIG, "{}"))
    return create_app(load_model(config.get("checkpoint")), ServeSettings(**config.get("settings", {})), inplace=True)
