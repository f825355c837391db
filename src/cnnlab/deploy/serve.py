"""`cnnlab serve`: a FastAPI app that classifies uploaded images with an ONNX file or a run directory.

    GET  /          a page: drop or choose an image, see it and its top-5 classes (static/index.html)
    POST /predict   multipart images -> per image the top-k classes and probabilities (JSON)
    GET  /model     classes, input size, source run, test accuracy
    GET  /health    liveness
    GET  /docs      OpenAPI documentation (FastAPI's own)

The event loop only moves bytes. Decoding runs in a thread pool, and inference in one background
task that gathers the images of all waiting requests into one batch (`Batcher`): under load one
forward pass serves many clients, and the page stays responsive meanwhile.

What one request may cost is bounded: its body (`max_upload_mb`, 413 while it streams in), its file count,
each image's pixels and all its images' pixels together (from their headers, before decoding: 413), and
its decode and inference time (503). Connections are capped, idle ones closed (uvicorn's settings), and a
request must arrive and be answered within 60 s of its first byte (`DeadlineH11`: slow clients).
The model runs one inference on a blank batch before the server starts (`deploy.self_check`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cnnlab.data.images import MAX_PIXELS, ImageError, TooManyPixels
from cnnlab.deploy.predictors import Predictor, decode_for, load_predictor, self_check, top_k
from cnnlab.errors import CnnlabError
from cnnlab.hardware import usable_cores

try:
    from fastapi import FastAPI, File, HTTPException, Query, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi_offline import FastAPIOffline
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # the CLI turns this into a one-line hint
    FastAPI = None
    H11Protocol = object

PAGE = Path(__file__).with_name("static") / "index.html"
# The page loads nothing from elsewhere; the policy makes the browser enforce that.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob: data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'")


@dataclass
class ServeConfig:
    model: str  # an exported .onnx file or a run directory
    host: str = "127.0.0.1"  # loopback: exposing a model to the network is a decision, not a default
    port: int = 8000
    workers: int = 1  # processes; each holds its own copy of the model
    max_upload_mb: float = 10.0  # per request, all files together
    max_files: int = 64  # images per request
    max_pixels: int = MAX_PIXELS  # per image, checked before decoding (decompression bombs)
    # per request, all images together, from their headers: 64 PNGs of 4096x4096 (3 MB uploaded) cost 30 s of
    # CPU to decode; 64 megapixels (four such images, or 64 phone photos at 1 MP) cost about 2 s
    max_request_pixels: int = 64 * 2**20
    request_seconds: float = 30.0  # decode + inference of one request; past it the client gets 503
    # requests being answered at once (/predict); more get 503 at once. /health, /model and the page never count
    max_requests: int = 64
    # open connections (uvicorn's limit_concurrency), a backstop far above max_requests: a client sending its
    # request a byte at a time holds a socket, not work. At 64 (then also the request limit) 64 such clients
    # made /health answer 503 for 56 s. 0: 1,000, or fewer where the process may open fewer files.
    max_connections: int = 0
    max_batch: int = 256  # images per forward pass when requests are gathered
    # requests whose files are read and decoded at once (0: one per usable core). Each holds its upload and its
    # full-size pixels meanwhile (a 9.9 MB PNG: about 30 MB); the rest wait with their bodies spooled to disk.
    # Unbounded, 16 parallel 9.9 MB uploads took the server from 110 to 562 MB (benchmarks/serve_load.py)
    max_decoding: int = 0
    device: str = "auto"


# ---------------------------------------------------------------------------------------------------
# Batching: many requests, one forward pass


class Batcher:
    """Collects the images of concurrent requests and runs them through the model together."""

    def __init__(self, predict, max_batch: int):
        self.predict, self.max_batch = predict, max_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def _run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            count = len(jobs[0][0])
            while count < self.max_batch and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                count += len(jobs[-1][0])
            try:
                probs = await asyncio.to_thread(self.predict, np.concatenate([images for images, _ in jobs]))
            except Exception as e:  # a failed batch fails its requests, not the server
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for images, future in jobs:
                if not future.done():  # the client may have gone away
                    future.set_result(probs[start:start + len(images)])
                start += len(images)


# ---------------------------------------------------------------------------------------------------
# A deadline on each request's arrival (slow clients)


class DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline from a request's first byte to its response.

    uvicorn has no such timeout (its keep-alive timer restarts on every byte received), so a client that
    sends a header one byte a second holds its connection for ever (measured: 6 of 6 still open after
    30 s). Here a request must be answered within `deadline_seconds` of its first byte, or the connection
    is closed; idle connections between requests are left to uvicorn's keep-alive timeout.
    """

    deadline_seconds = 60.0  # a 10 MB upload on a 2 Mbit/s link, plus the 30 s a request may take
    _deadline = None

    def data_received(self, data: bytes) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.deadline_seconds, self._expire)
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


# ---------------------------------------------------------------------------------------------------
# Upload size limit, enforced while the body streams in


class RequestLimit:
    """ASGI middleware: at most `max_requests` requests answered at once, past which 503 at once; the health
    check, /model and the page are always answered (a load balancer must see a busy server as alive)."""

    ALWAYS = ("/health", "/model", "/")

    def __init__(self, app, max_requests: int):
        self.app, self.max_requests, self.active = app, max_requests, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.ALWAYS:
            return await self.app(scope, receive, send)
        if self.active >= self.max_requests:
            response = JSONResponse({"detail": f"busy: {self.active} requests are being answered; try again"},
                                    status_code=503, headers={"Retry-After": "1"})
            return await response(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class UploadLimit:
    """ASGI middleware: answer 413 as soon as a request body passes `max_bytes`, without reading the rest.

    A declared Content-Length is checked before any byte is read; a body without one (chunked) is
    counted as it arrives and cut off at the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(send)
        received, over = 0, False

        async def limited_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            if not over:  # once over the limit, whatever the app answers is replaced by the 413 below
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over:
            await self._too_large(send)

    async def _too_large(self, send) -> None:
        body = json.dumps({"detail": f"upload larger than {self.max_bytes / 2**20:g} MB"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


# ---------------------------------------------------------------------------------------------------
# The app


def create_app(config: ServeConfig, predictor: Predictor | None = None) -> FastAPI:
    if FastAPI is None:
        raise CnnlabError("serving needs FastAPI and uvicorn: pip install 'cnnlab[deploy]'")
    predictor = predictor or self_check(load_predictor(config.model, config.device))
    # what clients may see: names, not the server's file system (paths become their last part)
    info = {k: Path(v).name if k in ("path", "source_run") and v else v for k, v in predictor.info.items()
            if k != "data"}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = Batcher(predictor.probabilities, config.max_batch)
        app.state.batcher.start()
        app.state.decoding = DecodingSlots(config.max_decoding or usable_cores())
        yield
        await app.state.batcher.stop()
        app.state.decoding.close()

    # /docs and /redoc from files in the fastapi-offline package, not a CDN: they work on a machine offline
    app = FastAPIOffline(title="cnnlab", summary=f"Image classifier: {info['name']} ({len(info['classes'])} classes)",
                         lifespan=lifespan)
    app.add_middleware(UploadLimit, max_bytes=int(config.max_upload_mb * 2**20))
    app.add_middleware(RequestLimit, max_requests=config.max_requests)
    app.add_exception_handler(RequestValidationError, _one_line_error)
    _add_info_routes(app, info, config)

    @app.post("/predict", responses={400: {}, 413: {}, 415: {}})
    async def predict(files: list[UploadFile] = File(..., description="one or more images (PNG, JPEG, ...)"),
                      top_k_: int = Query(5, alias="top_k", ge=1, le=1000, description="classes per image"),
                      preview: bool = Query(False, description="add each image as the network sees it (`input`: a "
                                                                "PNG data URI at the network's input size)")):
        if len(files) > config.max_files:
            raise HTTPException(400, f"{len(files)} files in one request; at most {config.max_files}")
        names = [f.filename or f"file {i + 1}" for i, f in enumerate(files)]
        try:
            probs, images = await asyncio.wait_for(_classify(app, predictor, files, config), config.request_seconds)
        except ImageError as e:
            return JSONResponse({"detail": str(e)}, status_code=e.status)
        except TimeoutError:
            return JSONResponse({"detail": f"the request took longer than {config.request_seconds:g} s"},
                                status_code=503)
        results = [{"filename": name, "predictions": preds}
                   for name, preds in zip(names, top_k(probs, info["classes"], top_k_), strict=True)]
        if preview:
            for result, image in zip(results, images, strict=True):
                result["input"] = png_data_uri(image)
        return {"model": info["name"], "results": results}

    return app


def _add_info_routes(app: FastAPI, info: dict, config: ServeConfig) -> None:
    """The page, /health and /model (GET, and HEAD: what load balancers' probes send)."""
    page = PAGE.read_text()

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model() -> dict:
        return {**info, "max_upload_mb": config.max_upload_mb, "max_files": config.max_files}

    for path, endpoint in (("/health", health), ("/model", model)):
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)


async def _one_line_error(request, exc: RequestValidationError) -> JSONResponse:
    """A request FastAPI cannot validate (no files, top_k=0, ...): 400 with cnnlab's one-string `detail`, the
    format of every other error, not 422 with FastAPI's list."""
    def say(e: dict) -> str:
        where = ".".join(str(p) for p in e.get("loc", ())[1:]) or "request"
        return f"{where}: {e.get('msg', 'invalid')}"
    return JSONResponse({"detail": "; ".join(say(e) for e in exc.errors())}, status_code=400)


def header_pixels(data: bytes) -> int:
    """Width x height from an image's header, without decoding it (0 when unreadable: decoding says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0] * im.size[1]
    except Exception:
        return 0


async def _classify(app: FastAPI, predictor: Predictor, files: list[UploadFile],
                    config: ServeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Read, check and decode a request's files (one of `max_decoding` at a time), then classify them in the
    next gathered batch: (probabilities, the network-sized images). Raises ImageError (with its HTTP status)
    for what the client sent."""
    slots: DecodingSlots = app.state.decoding
    await slots.acquire()
    try:
        uploads = [(f.filename or f"file {i + 1}", await f.read()) for i, f in enumerate(files)]
        pixels = sum(header_pixels(data) for _, data in uploads)
        if pixels > config.max_request_pixels:
            raise TooManyPixels(f"the images in this request add up to {pixels:,} pixels; at most "
                                f"{config.max_request_pixels:,} per request")
    except BaseException:
        slots.release()
        raise
    images = await slots.run(  # the slot is released when the decoding thread ends, not when the request does
        lambda: np.stack([decode_for(predictor, data, name, config.max_pixels) for name, data in uploads]))
    return await app.state.batcher(images), images


class DecodingSlots:
    """At most `n` requests read and decode at once, each decode in this pool's threads. A request that times out
    (503) stops waiting, but a thread cannot be stopped: its slot is given back only when its decode really ends,
    so requests that time out again and again cannot pile decodes up beyond `n` (they ran 5-6 at once, 5.1 GB)."""

    def __init__(self, n: int):
        from concurrent.futures import ThreadPoolExecutor

        self.semaphore, self.pool = asyncio.Semaphore(n), ThreadPoolExecutor(n, thread_name_prefix="decode")

    async def acquire(self) -> None:
        await self.semaphore.acquire()

    def release(self) -> None:
        self.semaphore.release()

    async def run(self, work):
        """`work()` in a decoding thread, holding the slot taken by `acquire` until the thread is done."""
        loop = asyncio.get_running_loop()
        try:
            done = self.pool.submit(work)
        except BaseException:
            self.release()
            raise
        def give_back(_) -> None:
            with contextlib.suppress(RuntimeError):  # the server's loop already closed: nothing waits any more
                loop.call_soon_threadsafe(self.release)
        done.add_done_callback(give_back)
        return await asyncio.wrap_future(done)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def png_data_uri(image: np.ndarray) -> str:
    """An (H, W, C) uint8 image as a data: URI of a PNG (a few KB at network sizes)."""
    import base64

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _check_port(host: str, port: int) -> None:
    """One line now for a port that is taken or not allowed, rather than uvicorn's log and exit status 3."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            probe.bind((host, port))
    except OSError as e:
        raise CnnlabError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port "
                          "(or stop what holds it)") from None


def app_from_env() -> FastAPI:
    """The app factory uvicorn's worker processes call (`--workers N`): the config travels in the environment."""
    return create_app(ServeConfig(**json.loads(os.environ["CNNLAB_SERVE"])))


def _uvicorn_limits(config: ServeConfig) -> dict:
    """uvicorn's connection limits: a cap on open connections, idle keep-alive connections closed after 5 s,
    and each request answered within a deadline of its first byte, or its connection closed (slow clients)."""
    return {"limit_concurrency": config.max_connections or connection_cap(), "timeout_keep_alive": 5,
            "http": DeadlineH11}


def connection_cap() -> int:
    """1,000 open connections, or fewer when the process may not open that many files (each is one)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1000 if soft == resource.RLIM_INFINITY else max(16, min(1000, soft - 64))


def serve(config: ServeConfig) -> None:
    """Run the app under uvicorn until Ctrl-C."""
    import uvicorn

    _check_port(config.host, config.port)
    if config.workers == 1:
        uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info", **_uvicorn_limits(config))
        return
    self_check(load_predictor(config.model, config.device))  # fail here, once, rather than in every worker
    os.environ["CNNLAB_SERVE"] = json.dumps(asdict(config))
    uvicorn.run("cnnlab.deploy.serve:app_from_env", factory=True, host=config.host, port=config.port,
                workers=config.workers, log_level="info", **_uvicorn_limits(config))
