"""Property-based tests: random and mutated bytes into every reader, the image decoders, the layer-spec
parser and the server's upload path. The only acceptable outcomes are a result or a clean CnnlabError
(an HTTP 4xx for the server): never another exception, a crash or a hang."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab import data
from cnnlab.data import cifar, idx, images
from cnnlab.errors import CnnlabError
from cnnlab.models import spec

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def mutations(seed_bytes: bytes) -> st.SearchStrategy[bytes]:
    """The valid file with some bytes overwritten, some cut off, or some inserted."""
    def mutate(args):
        positions, values, cut, insert_at, inserted = args
        buf = bytearray(seed_bytes)
        for p, v in zip(positions, values, strict=False):
            buf[p % len(buf)] = v
        buf = buf[:max(0, len(buf) - cut)]
        at = insert_at % (len(buf) + 1)
        return bytes(buf[:at] + inserted + buf[at:])
    return st.tuples(st.lists(st.integers(0, 10**6), max_size=8), st.lists(st.integers(0, 255), max_size=8),
                     st.integers(0, len(seed_bytes)), st.integers(0, 10**6), st.binary(max_size=16)).map(mutate)


def some_bytes(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=4096), mutations(valid))


def png_bytes(size=(6, 5), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)).save(buf, format="JPEG")
    return buf.getvalue()


BATCH = pickle.dumps({b"batch_label": b"x", b"labels": [1, 2], b"data": np.zeros((2, 3072), np.uint8),
                      b"filenames": [b"a.png", b"b.png"]}, protocol=2)
IDX = struct.pack(">BBBBIII", 0, 0, 8, 3, 2, 4, 4) + bytes(range(32))


@FUZZ
@given(blob=some_bytes(BATCH))
def test_cifar_pickle_reader(blob):
    try:
        batch = cifar._unpickle(blob, "fuzz")
        cifar._batch_arrays(batch, "fuzz")
    except CnnlabError:
        pass


@FUZZ
@given(blob=some_bytes(bytes(3073 * 2)))
def test_cifar_binary_reader(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("bin") / "data_batch_1.bin"
    path.write_bytes(blob)
    try:
        x, y = cifar._read_bin(path)
        assert x.shape[1:] == (3, 32, 32) and len(x) == len(y)
    except CnnlabError:
        pass


@FUZZ
@given(blob=some_bytes(IDX), compress=st.booleans())
def test_idx_reader(tmp_path_factory, blob, compress):
    path = tmp_path_factory.mktemp("idx") / ("f.gz" if compress else "f")
    path.write_bytes(gzip.compress(blob) if compress and len(blob) % 3 else blob)  # sometimes not gzip at all
    try:
        arr = idx.read_idx(path, 3)
        assert arr.ndim == 3
    except CnnlabError:
        pass


@FUZZ
@given(blob=some_bytes(pickle.dumps({b"train": 1}, protocol=2)))
def test_cifar_archive_reader(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("tar") / "cifar-100-python.tar.gz"
    path.write_bytes(blob)
    with pytest.raises(CnnlabError):  # random bytes never make a complete data set
        data.load_dataset(path, use_cache=False)


@FUZZ
@given(blob=st.one_of(some_bytes(png_bytes()), some_bytes(jpeg_bytes()), some_bytes(png_bytes((3, 3), "L"))),
       channels=st.sampled_from([1, 3]))
def test_image_decoder(blob, channels):
    try:
        arr = images.decode_image(blob, channels, (4, 4))
        assert arr.shape == (4, 4, channels) and arr.dtype == np.uint8
    except CnnlabError:
        pass


@FUZZ
@given(blob=some_bytes(png_bytes()), resize=st.sampled_from(["crop", "pad", "squish"]))
def test_image_folder_decoder(tmp_path_factory, blob, resize):
    """What the cache's decoder gets of each file: its pixels and facts (for data info), or one CnnlabError."""
    folder = tmp_path_factory.mktemp("img")
    (folder / "x.png").write_bytes(blob)
    facts: dict = {}
    try:
        arr = images.decode_image(folder / "x.png", None, (4, 4), resize=resize, facts=facts)
    except CnnlabError:
        return
    assert arr.shape[:2] == (4, 4) and facts["format"] == "PNG" and min(facts["size"]) >= 1


LAYER_TEXT = st.text(alphabet="cpagfdrkbs0123456789.-", max_size=24)


@FUZZ
@given(text=st.one_of(LAYER_TEXT, st.text(max_size=24)), channels=st.sampled_from([1, 3]),
       size=st.sampled_from([(8, 8), (32, 32), (28, 28)]))
def test_layer_spec_parser(text, channels, size):
    """Built on PyTorch's meta device: shapes and errors as on the CPU, without allocating the networks of up
    to 500 M parameters the parser accepts (60 examples took 35 s on the CPU)."""
    import torch
    try:
        with torch.device("meta"):
            net = spec.build(text, channels, 10, size)
    except CnnlabError:
        return
    assert net(torch.zeros(1, channels, *size, device="meta")).shape == (1, 10)


@pytest.fixture(scope="module")
def client(quick_onnx):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cnnlab.deploy import serve

    with TestClient(serve.create_app(serve.ServeConfig(model=str(quick_onnx), max_upload_mb=1))) as c:
        yield c


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=st.one_of(some_bytes(png_bytes()), some_bytes(jpeg_bytes())),
       name=st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40))
def test_server_upload_path(client, blob, name):
    r = client.post("/predict", files=[("files", (name or "x", blob, "application/octet-stream"))])
    assert r.status_code in (200, 400, 413, 415), r.text
    body = r.json()
    assert ("results" in body) if r.status_code == 200 else isinstance(body["detail"], str)


def test_server_still_answers_after_the_fuzzing(client):
    image = Path(__file__)  # not an image: the last word is a clean 415
    assert client.post("/predict", files=[("files", ("t.py", image.read_bytes(), "text/plain"))]).status_code == 415
    assert client.get("/health").json() == {"status": "ok"}


# ---------------------------------------------------------------------------------------------------
# Run directories: config.json and model.json with any value in any field

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_subnormal=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory):
    from cnnlab import cli
    from conftest import fake_cifar_arrays, write_cifar_python

    root = tmp_path_factory.mktemp("fuzzrun")
    cifar = write_cifar_python(root / "cifar", fake_cifar_arrays())
    assert cli.main(["train", "--data", str(cifar), "--dry-run", "--out", str(root / "run"), "--no-report"]) == 0
    return root / "run"


def _replace_somewhere(doc, path: list[int], value):
    """`doc` with the value at one place (chosen by `path`, through dicts and lists) replaced by `value`."""
    if not path or not isinstance(doc, dict | list) or not doc:
        return value
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    key = keys[path[0] % len(keys)]
    out = dict(doc) if isinstance(doc, dict) else list(doc)
    out[key] = _replace_somewhere(doc[key], path[1:], value)
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["config.json", "model.json"]), path=st.lists(st.integers(0, 50), max_size=3),
       value=JSON, command=st.sampled_from(["evaluate", "export", "resume"]))
def test_run_directory_files(fuzz_run, tmp_path_factory, name, path, value, command):
    """One field of a finished run's config.json or model.json (or the whole file) replaced by any JSON value:
    evaluate, export and resume give a result or one line with exit 2."""
    import contextlib
    import json
    import shutil

    from cnnlab import cli

    run = tmp_path_factory.mktemp("fuzzed") / "run"
    shutil.copytree(fuzz_run, run)
    doc = json.loads((run / name).read_text())
    (run / name).write_text(json.dumps(_replace_somewhere(doc, path, value)))
    argv = {"evaluate": ["evaluate", str(run)], "export": ["export", str(run), "--out", str(run / "m.onnx")],
            "resume": ["train", "--resume", str(run), "--no-report"]}[command]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = cli.main(argv)
    assert code in (0, 2), err.getvalue()
    assert "internal error" not in err.getvalue()
