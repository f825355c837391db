"""`cnnlab serve`: every endpoint and error status through FastAPI's TestClient, request batching, and the
page in a real browser against a real server process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the deploy extra is not installed: pip install -e '.[deploy]'")

from fastapi.testclient import TestClient  # noqa: E402

from cnnlab import deploy, models
from cnnlab.deploy import limits, predictors, serve  # noqa: E402
from conftest import ARTIFACTS, CLASSES, launch_chromium, needs_chromium  # noqa: E402


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def test_images(real_subset):
    return [sorted((real_subset / "test" / c).iterdir())[0] for c in ("cat", "ship", "frog")]


@pytest.fixture(scope="module")
def client(quick_onnx):
    app = serve.create_app(serve.ServeConfig(model=str(quick_onnx), max_upload_mb=0.25, max_files=4))
    with TestClient(app) as c:  # the context runs the lifespan, which starts the batcher
        yield c


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'type="file"' in r.text and 'id="results"' in r.text and "multiple" in r.text
    assert "http://" not in r.text and "https://" not in r.text and "<link" not in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_health_model_and_docs(client, quick_run):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/model").json()
    assert info["classes"] == CLASSES and info["image_size"] == [32, 32] and info["format"] == "onnx"
    assert info["source_run"] == quick_run.name and "/" not in info["path"]  # no server paths shown
    assert all(client.head(p).status_code == 200 for p in ("/", "/health", "/model"))
    assert info["test_accuracy"] == pytest.approx(json.loads((quick_run / "metrics.json").read_text())["test_accuracy"])
    assert client.get("/docs").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_predict_several_images_matches_the_cli_path(client, quick_onnx, test_images):
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in test_images]
    r = client.post("/predict?top_k=3", files=files)
    assert r.status_code == 200
    body = r.json()
    assert [x["filename"] for x in body["results"]] == [p.name for p in test_images]
    expected = deploy.predict_files(quick_onnx, [str(p) for p in test_images], 3)
    for got, want in zip(body["results"], expected, strict=True):
        probs = [p["probability"] for p in got["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert [p["class"] for p in got["predictions"]] == [p["class"] for p in want["predictions"]]
        assert probs == pytest.approx([p["probability"] for p in want["predictions"]], abs=1e-6)
    default = client.post("/predict", files=files[:1]).json()["results"][0]["predictions"]
    assert len(default) == 5


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(client, test_images):
    good = [("files", ("ok.jpg", test_images[0].read_bytes(), "image/jpeg"))]
    truncated = png_bytes(np.zeros((32, 32, 3), np.uint8))[:60]
    bomb = png_bytes(np.zeros((5000, 5000), np.uint8))  # 25 megapixels in a few KB
    assert len(bomb) < 100_000
    cases = [
        ([("files", ("notes.txt", b"just some text", "text/plain"))], 415, "not an image"),
        ([("files", ("cut.png", truncated, "image/png"))], 400, "cannot decode"),
        ([("files", ("bomb.png", bomb, "image/png"))], 413, "over the limit"),
        (good * 5, 400, "at most 4"),
        ([("files", ("big.bin", b"\0" * 300_000, "application/octet-stream"))], 413, "larger than 0.25 MB"),
    ]
    for files, status, message in cases:
        r = client.post("/predict", files=files)
        assert r.status_code == status, (status, r.text)
        assert message in r.json()["detail"]
    for r in (client.post("/predict"), client.post("/predict?top_k=0", files=good)):  # no files; top_k out of range
        assert r.status_code == 400 and isinstance(r.json()["detail"], str), r.text  # one format, not FastAPI's 422
    assert "files: Field required" in client.post("/predict").json()["detail"]
    assert client.post("/predict", files=good).status_code == 200


def test_oversized_body_without_length_is_cut_off(quick_onnx):
    """A chunked upload (no Content-Length) is counted as it streams in and refused at the limit, unread."""
    app = serve.create_app(serve.ServeConfig(model=str(quick_onnx), max_upload_mb=0.25))
    pulled, sent = [], []

    head = b'--x\r\nContent-Disposition: form-data; name="files"; filename="big.bin"\r\n\r\n'

    async def receive():  # a well-formed start of a multipart upload, then 100 x 64 KB = 6.4 MB of it
        pulled.append(1)
        return {"type": "http.request", "body": (head if len(pulled) == 1 else b"") + b"\0" * 65536,
                "more_body": len(pulled) < 100}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=x")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and b"larger than 0.25 MB" in sent[1]["body"]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]  # one answer only
    assert len(pulled) <= 5  # 0.25 MB is 4 chunks: the rest was never read


def test_serving_a_run_directory_uses_pytorch_and_agrees_with_onnx(quick_run, quick_onnx, test_images):
    with TestClient(serve.create_app(serve.ServeConfig(model=str(quick_run), device="cpu"))) as c:
        assert c.get("/model").json()["format"] == "pytorch"
        files = [("files", (test_images[1].name, test_images[1].read_bytes(), "image/jpeg"))]
        via_run = c.post("/predict", files=files).json()["results"][0]["predictions"]
    via_onnx = deploy.predict_files(quick_onnx, [str(test_images[1])], 5)[0]["predictions"]
    assert [p["class"] for p in via_run] == [p["class"] for p in via_onnx]


def test_batcher_gathers_concurrent_requests():
    calls = []

    def predict(x):
        calls.append(len(x))
        time.sleep(0.05)  # while this batch runs, the other requests queue up
        return x.reshape(len(x), -1).astype(np.float32) * 2

    async def main():
        batcher = serve.Batcher(predict, max_batch=64)
        batcher.start()
        jobs = [np.full((n, 2), n, np.uint8) for n in (1, 2, 3, 4, 5, 6)]
        results = await asyncio.gather(*(batcher(j) for j in jobs))
        await batcher.stop()
        return jobs, results

    jobs, results = asyncio.run(main())
    for job, result in zip(jobs, results, strict=True):
        np.testing.assert_array_equal(result, job * 2)  # each request gets its own rows back
    assert sum(calls) == 21 and len(calls) < len(jobs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model, log_path, *flags):
    """`cnnlab serve` as a real process on a free loopback port; yields its base URL once /health answers."""
    port = free_port()
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", str(model), "--port", str(port), *flags],
                                  stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert server.poll() is None, open(log_path).read()
                assert time.monotonic() < deadline, "the server did not come up within 60 s"
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        assert server.wait(timeout=20) is not None


def test_several_worker_processes_serve(quick_onnx, test_images, tmp_path):
    with running_server(quick_onnx, tmp_path / "server.log", "--workers", "2") as url:
        image = test_images[0]
        body = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'
                + image.read_bytes() + b"\r\n--b--\r\n")
        request = urllib.request.Request(f"{url}/predict?top_k=2", data=body, method="POST",
                                         headers={"Content-Type": "multipart/form-data; boundary=b"})
        answers = [json.loads(urllib.request.urlopen(request, timeout=30).read()) for _ in range(4)]
    assert all(a == answers[0] for a in answers) and len(answers[0]["results"][0]["predictions"]) == 2
    assert (tmp_path / "server.log").read_text().count("Started server process") == 2


@needs_chromium
def test_page_in_a_browser_classifies_several_images_and_docs_work_offline(quick_onnx, quick_run, test_images,
                                                                            tmp_path):
    """Three images and one broken file dropped at once: a card each, in order, the first with the command line's
    answer and the image as the network sees it; the broken one says why and shows no image; /docs renders with
    every request off this server refused (as on a machine without internet)."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    images = list(test_images[:3])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a picture")
    cli_top = json.loads(subprocess.run(
        [sys.executable, "-m", "cnnlab", "predict", str(quick_onnx), str(images[0]), "--json"],
        capture_output=True, text=True, check=True, timeout=120).stdout)[0]["predictions"][0]["class"]
    errors, outside = [], []
    ARTIFACTS.mkdir(exist_ok=True)
    with running_server(quick_onnx, tmp_path / "server.log") as url, playwright.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                   else (outside.append(route.request.url), route.abort()))
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{url}/")
        page.locator("#about", has_text="classes").wait_for()
        name = page.inner_text("#name")
        page.set_input_files("#file", [str(f) for f in [*images, broken]])
        page.wait_for_selector("body[data-state=error]", timeout=30_000)  # done, with one file failed
        cards = page.locator(".card")
        titles = cards.locator("h2").all_inner_texts()
        first = cards.nth(0).locator(".name").all_inner_texts()
        answer = cards.nth(0).locator(".answer").inner_text()
        cards.nth(0).locator("button.why").click()  # an ONNX server has no gradients: it says so in the card
        why = cards.nth(0).locator(".why-error").inner_text()
        net_view = cards.nth(0).locator("figure.net img").evaluate("i => [i.complete, i.naturalWidth]")
        failed = [cards.nth(3).locator("img").count(), cards.nth(3).inner_text()]
        status = page.inner_text("#status")
        page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)
        page.click("text=API documentation")
        page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
        docs_title = page.inner_text(".swagger-ui .info .title")
        page.screenshot(path=str(ARTIFACTS / "serve-docs.png"))
        browser.close()
    assert errors == [] and outside == []
    assert name == quick_onnx.stem  # the model's own name (for the default model.onnx: its run's)
    assert predictors._model_name(Path("exports/model.onnx"), "/srv/runs/20261125-quick") == "20261125-quick"
    assert titles == [f.name for f in [*images, broken]]
    assert len(first) == 5 and first[0] == cli_top and answer.startswith(cli_top)
    assert "ONNX" in why and "cnnlab serve RUN_DIR" in why
    assert net_view == [True, 32]
    assert failed[0] == 0 and "broken.jpg" in failed[1]
    assert status == "3 of 4 classified; 1 could not be read"
    assert docs_title.startswith("cnnlab")


@needs_chromium
def test_the_page_shows_where_a_served_run_looked(quick_run, test_images, tmp_path):
    """A run directory served with --min-confidence 1: the card says unknown, and "why?" shows the Grad-CAM
    overlay of the predicted class at the network's input size."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    errors = []
    with running_server(quick_run, tmp_path / "server.log", "--min-confidence", "1") as url, \
            playwright.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{url}/")
        page.set_input_files("#file", [str(test_images[0])])
        page.wait_for_selector("body[data-state=done]", timeout=30_000)
        answer = page.inner_text(".card .answer")
        first = page.locator(".card .name").first.inner_text()
        page.click(".card button.why")
        page.wait_for_selector("figure.heatmap img", timeout=30_000)
        shown = page.locator("figure.heatmap img").evaluate("i => [i.complete, i.naturalWidth]")
        caption = page.inner_text("figure.heatmap figcaption")
        page.screenshot(path=str(ARTIFACTS / "serve-why.png"), full_page=True)
        browser.close()
    assert errors == [] and answer.startswith(f"unknown: {first} is right with a chance of")
    assert shown == [True, 32] and caption == f"where it looked for {first}"


def test_a_model_that_fails_its_self_check_is_refused_at_start(quick_run, quick_onnx, tmp_path):
    import shutil

    import onnx
    import torch

    from cnnlab.errors import CnnlabError
    from cnnlab.run import Run
    from cnnlab.training.keep import cpu_weights

    nan_run = tmp_path / "nan-run"
    shutil.copytree(quick_run, nan_run)
    model, meta = models.load_model(nan_run)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    Run(nan_run).save_model(cpu_weights(model), {k: v for k, v in meta.items() if k != "sha256"})  # NaN, checksummed
    with pytest.raises(CnnlabError, match="non-finite probabilities"):
        serve.create_app(serve.ServeConfig(model=str(nan_run)))
    lying = onnx.load(str(quick_onnx))  # a graph for 32x32 inputs whose metadata claims 64x64
    for prop in lying.metadata_props:
        if prop.key == "cnnlab.image_size":
            prop.value = "[64, 64]"
    onnx.save(lying, str(tmp_path / "lying.onnx"))
    with pytest.raises(CnnlabError, match="fails its self-check"):
        serve.create_app(serve.ServeConfig(model=str(tmp_path / "lying.onnx")))
    proc = subprocess.run([sys.executable, "-m", "cnnlab", "serve", str(tmp_path / "lying.onnx")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_a_request_costs_at_most_its_pixel_budget_and_its_time(quick_onnx):
    predictor = deploy.OnnxPredictor(quick_onnx)
    big = io.BytesIO()
    Image.new("RGB", (1024, 1024), (200, 10, 10)).save(big, "PNG")  # 1 MP, a few KB
    files = [("files", (f"{i}.png", big.getvalue(), "image/png")) for i in range(5)]
    config = serve.ServeConfig(model=str(quick_onnx), max_request_pixels=4 * 2**20)
    with TestClient(serve.create_app(config, predictor)) as c:
        r = c.post("/predict", files=files)  # 5 MP against a 4 MP budget: refused before any decoding
        assert r.status_code == 413 and "add up to 5,242,880 pixels" in r.json()["detail"]
        assert c.post("/predict", files=files[:4]).status_code == 200

    class Slow:
        info = predictor.info

        def probabilities(self, images):
            time.sleep(1.0)
            return predictor.probabilities(images)
    config = serve.ServeConfig(model=str(quick_onnx), request_seconds=0.2)
    with TestClient(serve.create_app(config, Slow())) as c:
        r = c.post("/predict", files=files[:1])
        assert r.status_code == 503 and "longer than 0.2 s" in r.json()["detail"]
        assert c.get("/health").status_code == 200  # the server itself keeps answering


def test_a_burst_of_large_uploads_is_decoded_a_few_at_a_time(quick_onnx, monkeypatch):
    """Sixteen 9.9 MB uploads at once took the server from 110 to 562 MB: every request held its bytes and full-size
    pixels together. Now at most `max_decoding` requests read and decode at once; the others wait (and all get
    their answer)."""
    from concurrent.futures import ThreadPoolExecutor

    active, peak, lock = [0], [0], threading.Lock()
    decode = serve.decode_for

    def counting(*args):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)  # long enough for every request to be waiting at once
        try:
            return decode(*args)
        finally:
            with lock:
                active[0] -= 1
    monkeypatch.setattr(serve, "decode_for", counting)
    body = io.BytesIO()
    Image.new("RGB", (300, 200), (20, 90, 160)).save(body, "PNG")
    config = serve.ServeConfig(model=str(quick_onnx), max_decoding=2)
    with TestClient(serve.create_app(config, deploy.OnnxPredictor(quick_onnx))) as c, ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: c.post("/predict", files=[("files", (f"{i}.png", body.getvalue()))])
                                 .status_code, range(8)))
    assert statuses == [200] * 8 and peak[0] == 2


def test_a_request_that_arrives_one_byte_a_second_is_cut_off(quick_onnx):
    import uvicorn

    class Short(limits.DeadlineH11):
        deadline_seconds = 1.0
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(serve.create_app(serve.ServeConfig(model=str(quick_onnx))), port=port,
                                           http=Short, log_level="warning", timeout_keep_alive=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        slow = socket.create_connection(("127.0.0.1", port))
        slow.settimeout(5)
        slow.send(b"POST /predict HTTP/1.1\r\nHo")  # and then nothing more: a slowloris header
        started = time.perf_counter()
        assert slow.recv(100) == b""  # the server closed it
        assert time.perf_counter() - started < 3
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:  # others are served
            assert r.status == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_busy_port_is_one_line(quick_onnx, capsys):
    """uvicorn's own answer was a logged `[Errno 98]` and exit status 3."""
    from cnnlab import cli

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert cli.main(["serve", str(quick_onnx), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cnnlab: error: cannot listen on 127.0.0.1:{port}: Address already in use; choose another "
                   "--port (or stop what holds it)"]


def test_an_image_of_extreme_aspect_costs_what_its_result_does(tmp_path):
    """A 1,000,000x1 PNG (3 KB) passes the pixel limit; scaled to cover 96x96 before cropping it made a
    96,000,000x96 intermediate (5.3 GB, 25 s). Decoded in a fresh process, its peak memory now stays near the
    interpreter's own."""
    import subprocess
    import sys

    Image.new("RGB", (1_000_000, 1), (200, 10, 10)).save(tmp_path / "line.png")
    code = ("import re, sys; from cnnlab.data.images import decode_image\n"  # VmHWM: ru_maxrss survives exec
            "a = decode_image(sys.argv[1], 3, (96, 96), resize='crop')\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "print(a.shape, a[..., 0].mean(), int(hwm) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "line.png")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shape, red, peak_mb = out.stdout.rsplit(" ", 2)
    assert shape == "(96, 96, 3)" and float(red) == 200.0, out.stderr
    assert int(peak_mb) < 400, peak_mb  # the interpreter with NumPy and Pillow: ~60 MB


def test_a_timed_out_decode_keeps_its_slot_until_it_really_ends(quick_onnx):
    """A request past `request_seconds` gets its 503 at once, but its decoding thread cannot be stopped: the
    decoding slot stays taken until that thread ends (it was given back at the 503, so repeated slow requests
    ran 5-6 decodes at once), and is free again afterwards."""
    predictor = deploy.OnnxPredictor(quick_onnx)
    flat = io.BytesIO()
    Image.new("RGB", (4096, 4096), (20, 200, 30)).save(flat, "PNG")  # 16.7 MP in 50 KB
    files = [("files", (f"{i}.png", flat.getvalue(), "image/png")) for i in range(40)]  # seconds of decoding
    config = serve.ServeConfig(model=str(quick_onnx), request_seconds=0.05, max_decoding=1,
                               max_request_pixels=2**30)
    app = serve.create_app(config, predictor)
    with TestClient(app) as c:
        r = c.post("/predict", files=files)
        assert r.status_code == 503
        slots = app.state.decoding
        assert slots.semaphore.locked()  # the decode goes on, and holds the only slot
        deadline = time.monotonic() + 120
        while slots.semaphore.locked() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not slots.semaphore.locked()
        assert c.get("/health").status_code == 200


def test_slow_clients_do_not_take_the_health_check_down(quick_onnx):
    """80 connections sending the start of a request and then nothing (more than the 64 requests answered at
    once): `cnnlab serve` still answers /health (it answered 503 for 56 s when open connections were capped at
    64), and /predict too."""
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab.cli", "serve", str(quick_onnx), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    slow = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.1)
        for _ in range(80):
            s = socket.create_connection(("127.0.0.1", port))
            s.send(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and then nothing more
            slow.append(s)
        time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
        image = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 10, 10)).save(image, "PNG")
        body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
                b"Content-Type: image/png\r\n\r\n" + image.getvalue() + b"\r\n--b--\r\n")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body,
                                         headers={"Content-Type": "multipart/form-data; boundary=b"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["results"][0]["predictions"]
    finally:
        for s in slow:
            s.close()
        proc.terminate()
        proc.wait(timeout=30)


def test_requests_past_the_limit_get_503_but_the_health_check_does_not(quick_onnx):
    predictor = deploy.OnnxPredictor(quick_onnx)

    class Slow:
        info = predictor.info

        def probabilities(self, images):
            time.sleep(1.5)
            return predictor.probabilities(images)
    image = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image, "PNG")
    files = [("files", ("a.png", image.getvalue(), "image/png"))]
    with TestClient(serve.create_app(serve.ServeConfig(model=str(quick_onnx), max_requests=1), Slow())) as c:
        first = threading.Thread(target=lambda: c.post("/predict", files=files))
        first.start()
        time.sleep(0.5)
        busy = c.post("/predict", files=files)
        assert busy.status_code == 503 and busy.json()["detail"].startswith("busy")
        assert c.get("/health").status_code == 200
        first.join()
        assert c.post("/predict", files=files).status_code == 200
