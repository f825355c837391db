"""Load test of `cnnlab serve` on loopback: N concurrent clients posting CIFAR-10 test images for T seconds.

Prints requests/s, latency percentiles, the error count, how fast /health answers under that load (the
event loop must stay free), and the server's resident memory before and after each round. A second
round on the same server shows whether memory keeps growing.

    python benchmarks/serve_load.py                      # trains `quick`, exports it, serves the ONNX file
    python benchmarks/serve_load.py --model RUN_DIR|MODEL.onnx --clients 16 --seconds 30 --rounds 2
    python benchmarks/serve_load.py --hostile --clients 8 --seconds 75 --rounds 1   # beside hostile clients

`--hostile` adds, beside the normal clients: one client that posts 64 PNGs of 4096x4096 (49 KB each, 3 MB
in all) again and again, one that posts a 1,000,000x1 PNG (3 KB) again and again, 6 slow clients that trickle
a request header one byte a second, and 80 that send the start of a request and then nothing. It reports
the normal clients' latencies, what the large and extreme-aspect requests got and how long each took, whether
the slow connections were still open at the end, /health's latencies and statuses, and the server's peak
resident memory (sampled every 0.2 s). Then
16 clients post one 9.9 MB PNG of random pixels each at the same moment: their statuses and the peak memory.
Writes benchmarks/results/serve_load.json, or serve_load-hostile.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from common import CNNLAB, DATA, HERE, ROOT, cpu_class, machine, run, save


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (uvicorn workers are children)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS"))) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            pass
    return round(total, 1)


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def client(port: int, bodies: list[tuple[bytes, str]], deadline: float, latencies: list, errors: list,
           offset: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = offset
    while time.perf_counter() < deadline:
        body, ctype = bodies[i % len(bodies)]
        i += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/predict?top_k=5", body=body, headers={"Content-Type": ctype})
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200 or len(json.loads(payload)["results"][0]["predictions"]) != 5:
                errors.append(response.status)
            else:
                latencies.append(time.perf_counter() - t0)
        except (OSError, http.client.HTTPException, ValueError) as e:
            errors.append(type(e).__name__)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.close()


def health_probe(port: int, deadline: float, latencies: list, not_ok: list) -> None:
    while time.perf_counter() < deadline:
        conn, t0 = http.client.HTTPConnection("127.0.0.1", port, timeout=30), time.perf_counter()
        try:  # a new connection each time, as a load balancer's probe makes
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                not_ok.append(response.status)
        except (OSError, http.client.HTTPException) as e:
            not_ok.append(type(e).__name__)
        latencies.append(time.perf_counter() - t0)
        conn.close()
        time.sleep(0.1)


def load_round(port: int, bodies, clients: int, seconds: float) -> dict:
    latencies, errors, health, health_not_ok = [], [], [], []
    start = time.perf_counter()
    deadline = start + seconds
    threads = [threading.Thread(target=client, args=(port, bodies, deadline, latencies, errors, k * 7))
               for k in range(clients)]
    threads.append(threading.Thread(target=health_probe, args=(port, deadline, health, health_not_ok)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    pct = (lambda q: round(float(np.percentile(ms, q)), 1)) if len(ms) else (lambda q: None)
    return {"requests": len(latencies), "errors": len(errors), "error_kinds": sorted(set(map(str, errors))),
            "requests_per_s": round(len(latencies) / elapsed, 1), "p50_ms": pct(50), "p95_ms": pct(95),
            "p99_ms": pct(99), "health_p50_ms": round(float(np.median(health)) * 1000, 1) if health else None,
            "health_max_ms": round(float(np.max(health)) * 1000, 1) if health else None,
            "health_checks": len(health), "health_not_200": len(health_not_ok)}


def large_request() -> tuple[bytes, str]:
    """64 PNGs of 4096x4096 in one multipart body: small on the wire, 1.07 billion pixels decoded."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (90, 120, 200)).save(buf, "PNG")
    png, boundary = buf.getvalue(), uuid.uuid4().hex
    parts = [(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big{i}.png"\r\n'
              f"Content-Type: image/png\r\n\r\n").encode() + png + b"\r\n" for i in range(64)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def bomber(port: int, body: tuple[bytes, str], deadline: float, outcomes: list) -> None:
    while time.perf_counter() < deadline:
        conn, t0 = http.client.HTTPConnection("127.0.0.1", port, timeout=120), time.perf_counter()
        try:
            conn.request("POST", "/predict", body=body[0], headers={"Content-Type": body[1]})
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException) as e:
            status = type(e).__name__
        outcomes.append((status, time.perf_counter() - t0))
        conn.close()


def slow_client(port: int, deadline: float, still_open: list) -> None:
    """A request header sent one byte a second (slowloris); records after how many seconds the server closed
    the connection (None: still open at the end)."""
    sock, start = socket.create_connection(("127.0.0.1", port)), time.perf_counter()
    header = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
    closed_after = None
    for i in range(10**6):
        if time.perf_counter() > deadline:
            break
        try:
            sock.send(header[i % len(header):i % len(header) + 1])
        except OSError:  # the send after the server's close fails
            closed_after = round(time.perf_counter() - start)
            break
        time.sleep(1.0)
    still_open.append(closed_after)
    sock.close()


def line_request() -> tuple[bytes, str]:
    """A 1,000,000x1 PNG: 3 KB, within the pixel limit, and an aspect ratio that once cost 25 s and 5 GB."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1_000_000, 1), (200, 10, 10)).save(buf, "PNG")
    return multipart("line.png", buf.getvalue())


def stalled(port: int, deadline: float, sockets: list) -> None:
    """Connections that send the start of a request and then nothing, held until the deadline."""
    for _ in range(80):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.send(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sockets.append(sock)
    while time.perf_counter() < deadline:
        time.sleep(0.2)
    for sock in sockets:
        sock.close()


def hostile_round(port: int, bodies, clients: int, seconds: float, pid: int) -> dict:
    """A normal round with the large-request and extreme-aspect clients, slow and stalled clients and a memory
    sampler beside it."""
    deadline = time.perf_counter() + seconds
    outcomes, lines, still_open, held, peak = [], [], [], [], [rss_mb(pid)]
    big = large_request()
    extra = [threading.Thread(target=bomber, args=(port, big, deadline, outcomes)),
             threading.Thread(target=bomber, args=(port, line_request(), deadline, lines)),
             threading.Thread(target=stalled, args=(port, deadline, held))]
    extra += [threading.Thread(target=slow_client, args=(port, deadline, still_open)) for _ in range(6)]

    def sample() -> None:
        while time.perf_counter() < deadline:
            peak.append(rss_mb(pid))
            time.sleep(0.2)
    extra.append(threading.Thread(target=sample))
    for t in extra:
        t.start()
    result = load_round(port, bodies, clients, seconds)
    for t in extra:
        t.join()
    return {**result, "large_requests": len(outcomes), "large_statuses": sorted({str(s) for s, _ in outcomes}),
            "large_seconds_max": round(max((d for _, d in outcomes), default=0), 2),
            "extreme_aspect_requests": len(lines), "extreme_aspect_statuses": sorted({str(s) for s, _ in lines}),
            "extreme_aspect_seconds_max": round(max((d for _, d in lines), default=0), 3),
            "stalled_connections": len(held),
            "slow_clients_still_open": sum(1 for s in still_open if s is None),
            "slow_clients_closed_after_s": sorted(s for s in still_open if s is not None), "peak_rss_mb": max(peak)}


def noise_upload(megabytes: float = 9.9) -> tuple[bytes, str]:
    """One PNG of random pixels (incompressible) of about `megabytes`, as a multipart body."""
    import io

    from PIL import Image

    side = int((megabytes * 1e6 / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    return multipart("noise.png", buf.getvalue())


def parallel_uploads(port: int, pid: int, n: int = 16) -> dict:
    """`n` clients each posting one ~9.9 MB PNG at the same moment: the server's peak memory while it copes."""
    body, statuses, peak, done = noise_upload(), [], [rss_mb(pid)], threading.Event()

    def post() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("POST", "/predict", body=body[0], headers={"Content-Type": body[1]})
            statuses.append(conn.getresponse().status)
        except (OSError, http.client.HTTPException) as e:
            statuses.append(type(e).__name__)
        conn.close()

    def sample() -> None:
        while not done.is_set():
            peak.append(rss_mb(pid))
            time.sleep(0.05)
    sampler, t0 = threading.Thread(target=sample), time.perf_counter()
    sampler.start()
    clients = [threading.Thread(target=post) for _ in range(n)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    done.set()
    sampler.join()
    return {"uploads": n, "upload_mb": round(len(body[0]) / 1e6, 1), "statuses": sorted(map(str, statuses)),
            "seconds": round(time.perf_counter() - t0, 2), "rss_before_mb": peak[0], "peak_rss_mb": max(peak)}


def default_model() -> Path:
    """A `quick` run exported to ONNX, made once and reused."""
    work = HERE / "work"
    onnx = work / "serve-quick.onnx"
    if not onnx.exists():
        out = work / "serve-quick"
        if not (out / "model.safetensors").exists():
            _, code, _ = run([*CNNLAB, "train", "--preset", "quick", "--data", str(DATA), "--out", str(out),
                              "--no-report"], work / "serve-quick-train.log")
            if code:
                sys.exit(f"training failed; see {work / 'serve-quick-train.log'}")
        _, code, _ = run([*CNNLAB, "export", str(out), "--out", str(onnx)], work / "serve-quick-export.log")
        if code:
            sys.exit(f"export failed; see {work / 'serve-quick-export.log'}")
    return onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="RUN_DIR or MODEL.onnx (default: a `quick` run exported to ONNX)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30, help="length of each round (default 30)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    ap.add_argument("--hostile", action="store_true", help="large and slow clients beside the normal ones")
    ap.add_argument("--runtime", default="auto", help="what runs an .onnx model (serve --runtime)")
    ap.add_argument("--tag", help="write serve_load-TAG.json (fp32 against int8: benchmarks/deploy_speed.py models)")
    args = ap.parse_args()

    model = Path(args.model) if args.model else default_model()
    images = sorted((DATA / "test").glob("*/*.jpg"))[::100]  # 100 test images, all classes
    bodies = [multipart(p.name, p.read_bytes()) for p in images]
    port = free_port()
    log = HERE / "work" / "serve-load-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        server = subprocess.Popen([*CNNLAB, "serve", str(model), "--port", str(port), "--workers", str(args.workers),
                                   "--runtime", args.runtime],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        for _ in range(600):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"the server exited; see {log}")
                time.sleep(0.1)
        load_round(port, bodies[:4], 2, 2)  # warm-up: first inference, thread pools, allocator
        memory = [rss_mb(server.pid)]
        rounds = []
        for r in range(args.rounds):
            result = (hostile_round(port, bodies, args.clients, args.seconds, server.pid) if args.hostile
                      else load_round(port, bodies, args.clients, args.seconds))
            memory.append(rss_mb(server.pid))
            result["rss_after_mb"] = memory[-1]
            rounds.append(result)
            print(f"round {r + 1}: {args.clients} clients x {args.seconds:g} s: {result['requests_per_s']} req/s, "
                  f"p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, p99 {result['p99_ms']} ms, "
                  f"errors {result['errors']}, /health p50 {result['health_p50_ms']} ms, "
                  f"{result['health_not_200']} of {result['health_checks']} not 200 "
                  f"(max {result['health_max_ms']}), server RSS {memory[-2]} -> {memory[-1]} MB")
            if args.hostile:
                print(f"  beside it: {result['large_requests']} large requests got {result['large_statuses']} "
                      f"(slowest {result['large_seconds_max']} s); {result['extreme_aspect_requests']} "
                      f"1,000,000x1 PNGs got {result['extreme_aspect_statuses']} (slowest "
                      f"{result['extreme_aspect_seconds_max']} s); {result['stalled_connections']} stalled "
                      f"connections held; slow clients still open at the end: "
                      f"{result['slow_clients_still_open']} of 6, closed by the server after "
                      f"{result['slow_clients_closed_after_s']} s; server peak RSS {result['peak_rss_mb']} MB")
        uploads = parallel_uploads(port, server.pid) if args.hostile else None
        if uploads:
            print(f"  {uploads['uploads']} parallel uploads of {uploads['upload_mb']} MB: {uploads['statuses']} "
                  f"in {uploads['seconds']} s; server RSS {uploads['rss_before_mb']} -> peak "
                  f"{uploads['peak_rss_mb']} MB")
    finally:
        server.terminate()
        server.wait(timeout=30)
    growth = round(memory[-1] - memory[1], 1) if len(memory) > 2 else None
    print(f"memory: {memory[0]} MB after warm-up; growth across the rounds after the first: {growth} MB")
    name = "serve_load" + ("-hostile" if args.hostile else "") + (f"-{args.tag}" if args.tag else "")
    save(name, {"machine": machine(), "cpu_class": cpu_class(), "hostile": args.hostile, "model": str(model),
                "runtime": args.runtime, "clients": args.clients,
                "seconds": args.seconds, "workers": args.workers, "rss_after_warmup_mb": memory[0],
                "rss_growth_after_first_round_mb": growth, "rounds": rounds, "parallel_uploads": uploads,
                "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
