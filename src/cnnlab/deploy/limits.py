"""What one request to `cnnlab serve` may cost, bounded: ASGI middleware for the number of requests answered at
once and the size of a body, a deadline on each request's arrival (slow clients), the decoding slots, and
uvicorn's connection limits. serve.py builds the app on these; each class says what it measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

try:
    from fastapi.responses import JSONResponse
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # serve.py turns this into a one-line hint
    H11Protocol = object


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


def header_pixels(data: bytes) -> int:
    """Width x height from an image's header, without decoding it (0 when unreadable: decoding says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0] * im.size[1]
    except Exception:
        return 0



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


def uvicorn_limits(max_connections: int) -> dict:
    """uvicorn's connection limits: a cap on open connections, idle keep-alive connections closed after 5 s,
    and each request answered within a deadline of its first byte, or its connection closed (slow clients)."""
    return {"limit_concurrency": max_connections or connection_cap(), "timeout_keep_alive": 5,
            "http": DeadlineH11}


def connection_cap() -> int:
    """1,000 open connections, or fewer when the process may not open that many files (each is one)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1000 if soft == resource.RLIM_INFINITY else max(16, min(1000, soft - 64))
