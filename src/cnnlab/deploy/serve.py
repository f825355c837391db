"""`cnnlab serve`: a FastAPI app that classifies uploaded images with an ONNX file or a run directory.

    GET  /          a page: drop or choose an image, see it, its answer and top-5 classes, and "why" (static/)
    POST /predict   multipart images -> per image its answer (a class, or "unknown" below min_confidence) and
                    the top-k classes with their calibrated probabilities (JSON)
    POST /explain   one image -> a Grad-CAM overlay of where the network looked (a run directory only)
    GET  /model     classes, input size, source run, test accuracy, calibration, the server's min_confidence
    GET  /health    liveness
    GET  /docs      OpenAPI documentation (FastAPI's own)

The event loop only moves bytes. Decoding runs in a thread pool, and inference in one background
task that gathers the images of all waiting requests into one batch (`Batcher`): under load one
forward pass serves many clients, and the page stays responsive meanwhile.

What one request may cost is bounded (limits.py): its body (`max_upload_mb`, 413 while it streams in), its file count,
each image's pixels and all its images' pixels together (from their headers, before decoding: 413), and
its decode and inference time (503). Connections are capped, idle ones closed (uvicorn's settings), and a
request must arrive and be answered within 60 s of its first byte (`DeadlineH11`: slow clients).
The model runs one inference on a blank batch before the server starts (`deploy.self_check`).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cnnlab.data.images import MAX_PIXELS, ImageError, TooManyPixels
from cnnlab.deploy.limits import DecodingSlots, RequestLimit, UploadLimit, header_pixels, uvicorn_limits
from cnnlab.deploy.predictors import (
    Predictor,
    Runtime,
    answer,
    decode_for,
    load_predictor,
    min_confidence_for,
    predict_of,
    self_check,
    top_k,
)
from cnnlab.errors import CnnlabError
from cnnlab.hardware import usable_cores

try:
    from fastapi import FastAPI, File, HTTPException, Query, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi_offline import FastAPIOffline
except ImportError:  # the CLI turns this into a one-line hint
    FastAPI = None

PAGE = Path(__file__).with_name("static") / "index.html"
# The page loads nothing from elsewhere; the policy makes the browser enforce that.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob: data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'")


@dataclass
class ServeConfig:
    model: str  # an exported model (.onnx, an OpenVINO folder or .xml) or a run directory
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
    # below it the answer is "unknown" (a request may pass its own); "auto": the run's suggestion (the lowest
    # calibrated confidence at which its held-out images reach 95% accuracy); None: always a class
    min_confidence: float | str | None = None
    # what runs an .onnx file; auto: the faster runtime on this CPU class as measured (predictors.pick_runtime)
    runtime: Runtime = "auto"


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
                out = await asyncio.to_thread(self.predict, np.concatenate([images for images, _ in jobs]))
            except Exception as e:  # a failed batch fails its requests, not the server
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for images, future in jobs:
                if not future.done():  # the client may have gone away
                    end = start + len(images)  # (a predictor's outputs: an array, or a tuple of them)
                    future.set_result(tuple(o[start:end] for o in out) if isinstance(out, tuple) else out[start:end])
                start += len(images)


# ---------------------------------------------------------------------------------------------------
# The app


def create_app(config: ServeConfig, predictor: Predictor | None = None) -> FastAPI:
    """The FastAPI app `serve` runs: the page, /predict, /model, /health and the API's documentation."""
    if FastAPI is None:
        raise CnnlabError("serving needs FastAPI and uvicorn: pip install 'cnnlab[deploy]'")
    predictor = predictor or self_check(load_predictor(config.model, config.device, runtime=config.runtime,
                                                       serving=True))
    # what clients may see: names, not the server's file system (paths become their last part)
    info = {k: Path(v).name if k in ("path", "source_run") and v else v for k, v in predictor.info.items()
            if k != "data"}
    info["min_confidence"] = min_confidence_for(predictor, config.min_confidence)  # the server's default

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = Batcher(predict_of(predictor), config.max_batch)
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
                      min_confidence: float | None = Query(None, ge=0, le=1, description="answer `unknown` when the "
                                                           "chance that the top class is right is below this "
                                                           "(default: the server's)"),
                      preview: bool = Query(False, description="add each image as the network sees it (`input`: a "
                                                                "PNG data URI at the network's input size)")):
        if len(files) > config.max_files:
            raise HTTPException(400, f"{len(files)} files in one request; at most {config.max_files}")
        names = [f.filename or f"file {i + 1}" for i, f in enumerate(files)]
        try:
            (probs, conf), images = await asyncio.wait_for(_classify(app, predictor, files, config),
                                                           config.request_seconds)
        except ImageError as e:
            return JSONResponse({"detail": str(e)}, status_code=e.status)
        except TimeoutError:
            return JSONResponse({"detail": f"the request took longer than {config.request_seconds:g} s"},
                                status_code=503)
        threshold = info["min_confidence"] if min_confidence is None else min_confidence
        results = [{"filename": name, **answer(preds, c, threshold), "predictions": preds}
                   for name, preds, c in zip(names, top_k(probs, info["classes"], top_k_), conf, strict=True)]
        if preview:
            for result, image in zip(results, images, strict=True):
                result["input"] = png_data_uri(image)
        return {"model": info["name"], "min_confidence": threshold, "results": results}

    _add_explain_route(app, predictor, info, config)
    return app


def _add_explain_route(app: FastAPI, predictor: Predictor, info: dict, config: ServeConfig) -> None:
    """POST /explain: one image's Grad-CAM overlay (evaluation/explain.py) on a copy of the network, so that its
    hooks never meet the batches /predict runs meanwhile. An exported model has no gradients: 501, saying so."""
    explainer = {}

    def explain(image: np.ndarray, class_name: str | None) -> dict:
        import copy

        import torch

        from cnnlab.evaluation import explain

        model = explainer.setdefault("model", copy.deepcopy(predictor.model))
        found, pictures = explain.explain_images(model, predictor.norm, torch.tensor(image).permute(2, 0, 1)[None],
                                                 info["classes"], predictor.temperature, class_name)
        return {**found[0], "overlay": png_data_uri(pictures[0].permute(1, 2, 0).numpy())}

    @app.post("/explain", responses={400: {}, 413: {}, 501: {}})
    async def explain_route(file: UploadFile = File(..., description="one image"),
                            class_name: str | None = Query(None, alias="class", description="the class to map "
                                                           "(default: the predicted one)")):
        if not hasattr(predictor, "model"):
            kind = "an ONNX file" if info["format"] == "onnx" else "an OpenVINO model"
            return JSONResponse({"detail": f"this server runs {kind}, which has no gradients: serve the run "
                                           "directory (cnnlab serve RUN_DIR) to see where the network looked"},
                                status_code=501)
        if class_name is not None and class_name not in info["classes"]:
            raise HTTPException(400, f"class {class_name!r} is not one of the model's classes")
        name = file.filename or "file"
        try:
            data = await file.read()
            image = await asyncio.to_thread(decode_for, predictor, data, name, config.max_pixels)
            result = await asyncio.wait_for(asyncio.to_thread(explain, image, class_name), config.request_seconds)
        except ImageError as e:
            return JSONResponse({"detail": str(e)}, status_code=e.status)
        except TimeoutError:
            return JSONResponse({"detail": f"the request took longer than {config.request_seconds:g} s"},
                                status_code=503)
        return {"filename": name, **result}


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


async def _classify(app: FastAPI, predictor: Predictor, files: list[UploadFile],
                    config: ServeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Read, check and decode a request's files (one of `max_decoding` at a time), then classify them in the
    next gathered batch: ((probabilities, confidences), the network-sized images). Raises ImageError (with its
    HTTP status) for what the client sent."""
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


def check(config: ServeConfig) -> str:
    """Everything `serve` does before it listens (the port is free, the model loads and answers its self-check),
    then stop: `cnnlab serve --dry-run`. The address it would serve at."""
    _check_port(config.host, config.port)
    create_app(config)
    return f"http://{config.host}:{config.port}/"


def serve(config: ServeConfig) -> None:
    """Run the app under uvicorn until Ctrl-C."""
    import uvicorn

    _check_port(config.host, config.port)
    limits = uvicorn_limits(config.max_connections)
    if config.workers == 1:
        uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info", **limits)
        return
    # fail here, once, rather than in every worker
    self_check(load_predictor(config.model, config.device, runtime=config.runtime, serving=True))
    os.environ["CNNLAB_SERVE"] = json.dumps(asdict(config))
    uvicorn.run("cnnlab.deploy.serve:app_from_env", factory=True, host=config.host, port=config.port,
                workers=config.workers, log_level="info", **limits)
