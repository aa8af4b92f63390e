"""--log-to: the metrics.jsonl scalars in TensorBoard event files, an offline wandb run and an MLflow file store."""

import json
import sys

import pytest

from openglm.errors import OpenGLMError
from openglm.train.loop import pretrain


def jsonl(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def scalars(records, key):
    return {r["step"]: r[key] for r in records if key in r}


def test_tensorboard_has_the_metrics_and_a_resume_continues_it(settings, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    pretrain(settings(run, steps=6, eval_every=2, log_to="tensorboard", stop_after=4))
    pretrain(settings(run, steps=6, eval_every=2, log_to="tensorboard", resume=True))
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    records = jsonl(run)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
        got = {e.step: e.value for e in events.Scalars(key)}
        assert got == pytest.approx(scalars(records, key), rel=1e-6), key
    assert sorted({e.step for e in events.Scalars("loss")}) == [1, 2, 3, 4, 5, 6]


def test_mlflow_local_store(settings, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from openglm.train.tracking import mlflow_uri

    run = tmp_path / "run"
    pretrain(settings(run, steps=4, eval_every=2, log_to="mlflow"))
    client = MlflowClient(tracking_uri=mlflow_uri(run))
    run_id = json.loads((run / "tracking.json").read_text())["mlflow"]
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.data.params["lr"] == "0.003"
    records = jsonl(run)
    for key in ("loss", "val_loss", "grad_norm"):
        got = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert got == pytest.approx(scalars(records, key)), key


def wandb_history(path) -> list[dict]:
    """The logged rows of an offline ``.wandb`` file: wandb's records (protobuf) in LevelDB's log
    format (a 7-byte file header, 32 KiB blocks, each chunk with a 7-byte header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, part = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            chunks.append(part)
            part = b""
    rows = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline(settings, tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    pretrain(settings(run, steps=4, eval_every=2, log_to="wandb"))
    (offline,) = (run / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    rows = {row["_step"]: row for row in wandb_history(log) if "_step" in row}
    records = jsonl(run)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
        assert {step: row[key] for step, row in rows.items() if key in row} == pytest.approx(scalars(records, key))


def test_a_missing_tracker_package_is_one_line(settings, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(OpenGLMError, match=r"--log-to mlflow needs the mlflow package: pip install 'openglm\[mlflow\]'"):
        pretrain(settings(tmp_path / "run", log_to="tensorboard,mlflow"))
    assert not (tmp_path / "run").exists()
