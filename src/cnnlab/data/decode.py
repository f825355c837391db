"""Decoding image files into a cache entry's mapped file, in a pool of threads (cache.py builds the entries).

Each task decodes a chunk of files (images.decode_image: every format, EXIF turns, resizing) straight into
its rows of the mapped uint8 file, and reports per file either why it is unreadable or its facts (format,
size, turn, transparency), which `survey` sums up for `cnnlab data info`.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cnnlab import files as files_mod
from cnnlab import hardware
from cnnlab.data.images import Resize, decode_image
from cnnlab.errors import CnnlabError

CHUNK = 32  # images per task handed to a decoding thread
POOL_FROM = 256  # fewer images than this decode in this thread: starting the pool would cost more




def _decode_chunk(out: str, shape: tuple, start: int, files: list[str], size: tuple[int, int],
                  resize: Resize) -> tuple[int, list[str | dict]]:
    """Decode `files` into rows `start...` of the mapped file; per file: an error message, or the file's facts
    (images.file_facts) and whether it is grey."""
    mm = np.memmap(out, np.uint8, "r+", shape=shape)
    results: list[str | dict] = []
    for i, f in enumerate(files):
        facts: dict = {}
        try:
            arr = decode_image(f, None, size, resize=resize, facts=facts)
        except CnnlabError as e:
            results.append(str(e))
            continue
        mm[start + i] = arr.transpose(2, 0, 1)  # a grey (1, H, W) image fills all three channels
        results.append({**facts, "gray": arr.shape[2] == 1})
    mm.flush()
    return start, results


def decode_split(files: list[str], out: Path, size: tuple[int, int], resize: Resize,
                  desc: str) -> tuple[dict[int, str], bool, list[dict | None]]:
    """Decode every file into `out` as (N, 3, H, W); returns {row: why unreadable}, whether all were grey, and
    each row's facts (None where the file is unreadable)."""
    shape = (len(files), 3, *size)
    files_mod.allocate(out, int(np.prod(shape)))
    tasks = [(str(out), shape, lo, files[lo:lo + CHUNK], size, resize) for lo in range(0, len(files), CHUNK)]
    errors: dict[int, str] = {}
    facts: list[dict | None] = [None] * len(files)
    with tqdm(total=len(files), desc=desc, unit="img", leave=False, disable=None) as bar:
        for start, results in _run(tasks, len(files)):
            for i, r in enumerate(results):
                if isinstance(r, str):
                    errors[start + i] = r
                else:
                    facts[start + i] = r
            bar.update(len(results))
            DECODED[0] += len(results)
    readable = [f for f in facts if f is not None]
    return errors, all(f["gray"] for f in readable) and len(readable) > 0, facts


DECODED = [0]  # images this process has decoded into the cache: `decoded()`


def decoded() -> int:
    """How many images this process has decoded into cache entries so far: a second load of the same data (or an
    evaluation of a run on its own data) leaves it unchanged, because it maps the finished entry."""
    return DECODED[0]


def survey(facts: list[dict]) -> dict:
    """What `cnnlab data info` says of the files themselves: formats, sizes as shown, EXIF turns, transparency."""
    if not facts:
        return {}
    w, h = (np.array([f["size"][k] for f in facts]) for k in (0, 1))
    return {"formats": dict(Counter(f["format"] for f in facts).most_common()),
            "width": [int(w.min()), int(np.median(w)), int(w.max())],
            "height": [int(h.min()), int(np.median(h)), int(h.max())],
            "exif_rotated": sum(f["exif_rotated"] for f in facts), "transparent": sum(f["transparent"] for f in facts)}


def _run(tasks: list[tuple], n: int):
    """Results of `_decode_chunk` over `tasks`, on every usable core when there are enough images to pay for it.

    Threads, not processes: Pillow releases the GIL while it decodes and resizes, so two threads decoded 2,354
    photos/s against 1,225 for one (96 px, 2 cores), as fast as two processes. Processes were worse: a forked
    worker deadlocked in CI (a lock another thread held at the fork), and forkserver or spawn workers run the
    caller's main script again (breaking scripts read from stdin, and re-running scripts without a main guard).
    """
    workers = min(hardware.usable_cores(), max(1, len(tasks)))
    if n < POOL_FROM or workers == 1:
        yield from (_decode_chunk(*t) for t in tasks)
        return
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_decode_chunk, *t) for t in tasks]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
