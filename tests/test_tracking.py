"""Experiment tracking round trips: what `--log tensorboard` and `--log mlflow` wrote, read back with
TensorBoard's own event reader and with the MLflow client, against a local SQLite store and a real
`mlflow server` on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from cnnlab import cli, training
from cnnlab.config import DataConfig, TrainConfig
from cnnlab.errors import CnnlabError, Interrupted
from conftest import CtrlCAt

pytest.importorskip("mlflow", reason="the tracking extra is not installed")
pytest.importorskip("tensorboard", reason="the tracking extra is not installed")
FLAGS = ["--epochs", "2", "--batch-size", "30", "--no-report"]


def test_tensorboard_events_hold_the_epochs_the_steps_the_matrix_and_the_settings(tmp_path, cifar_python_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    assert cli.main(["train", "--data", str(cifar_python_dir), *FLAGS, "--log", "tensorboard", "--out", str(run)]) == 0
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    history = json.loads((run / "history.json").read_text())
    val_acc = events.Scalars("epoch/val_acc")
    assert [(e.step, e.value) for e in val_acc] == [(h["epoch"], pytest.approx(h["val_acc"])) for h in history]
    assert {"epoch/train_loss", "epoch/lr", "step/train_loss", "step/lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("step/train_loss")] == [5, 10]  # each epoch's last host look
    assert events.Tags()["images"] == ["confusion_matrix"]
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["train.lr"].string_value == "0.001" and hparams["train.optimizer"].string_value == "adam"


def _mlflow_runs(uri: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cnnlab")
    return client, client.search_runs([experiment.experiment_id])


def _check_mlflow_run(client, mlrun, run_dir) -> None:
    history = json.loads((run_dir / "history.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert mlrun.info.run_name == run_dir.name and mlrun.info.status == "FINISHED"
    assert mlrun.data.params["train.batch_size"] == "30" and mlrun.data.params["train.model"] == "seed"
    points = client.get_metric_history(mlrun.info.run_id, "val_acc")
    assert sorted((p.step, p.value) for p in points) == [(h["epoch"], pytest.approx(h["val_acc"])) for h in history]
    assert mlrun.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    names = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"model.safetensors", "model.json", "metrics.json", "config.json", "history.json"} <= names
    assert not {"checkpoint.safetensors", "tensorboard"} & names


def test_mlflow_in_a_local_sqlite_store_and_resume_continues_the_same_run(tmp_path, cifar_python_dir):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    cfg, data = TrainConfig(epochs=2, batch_size=30), DataConfig(path=str(cifar_python_dir))
    with pytest.raises(Interrupted):
        training.train(cfg, data, out=tmp_path / "run", with_report=False, tracking=("mlflow",), mlflow_uri=uri,
                       hooks=[CtrlCAt(7)])  # mid-epoch 2
    training.resume(tmp_path / "run")
    client, found = _mlflow_runs(uri)
    assert len(found) == 1  # the resumed run continued the MLflow run it had started
    _check_mlflow_run(client, found[0], tmp_path / "run")


def test_mlflow_against_a_real_server_on_loopback(tmp_path, cifar_python_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=1).status == 200:
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.1)
        run = tmp_path / "run"
        assert cli.main(["train", "--data", str(cifar_python_dir), *FLAGS, "--log", "mlflow", "--log", "tensorboard",
                         "--mlflow-uri", uri, "--out", str(run)]) == 0
        client, found = _mlflow_runs(uri)
        assert len(found) == 1
        _check_mlflow_run(client, found[0], run)
        assert (tmp_path / "artifacts").exists()  # uploaded through the server, not written by the client
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_an_unknown_tracker_or_a_missing_package_is_one_line(monkeypatch):
    from cnnlab.training import tracking

    with pytest.raises(CnnlabError, match="unknown --log 'wandb'"):
        tracking.check(["wandb"])
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    with pytest.raises(CnnlabError, match=r"pip install 'cnnlab\[tracking\]'"):
        tracking.check(["mlflow"])


def test_two_processes_track_once(tmp_path, cifar_python_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--nproc", "2", "--data", str(cifar_python_dir),
                           *FLAGS, "--precision", "fp32", "--log", "tensorboard", "--log", "mlflow", "--out", str(run)],
                          capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                          "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((run / "tensorboard").glob("events.*"))) == 2  # process 0's writer and its hparams summary
    assert [e.step for e in EventAccumulator(str(run / "tensorboard")).Reload().Scalars("epoch/val_acc")] == [1, 2]
    client, found = _mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default: beside the run
    assert len(found) == 1
    _check_mlflow_run(client, found[0], run)
