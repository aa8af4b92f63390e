"""Experiment tracking: the scalars of ``metrics.jsonl`` also go to TensorBoard, wandb or MLflow.

``--log-to tensorboard,wandb,mlflow`` picks any of them; each is an optional dependency (an extra of
the same name) and a missing one is a one-line error before training starts. Everything stays in the
run directory and works without a network:

    tensorboard/   event files from torch's own ``SummaryWriter`` (``tensorboard --logdir RUN_DIR``)
    wandb/         an offline wandb run (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later)
    mlflow.db      an MLflow store in one SQLite file (``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``;
                   MLflow 3 keeps its older ``mlruns/`` folder store in maintenance mode only)

A resumed run continues the same TensorBoard log (events after the checkpoint's step are purged),
the same wandb run and the same MLflow run (their ids are kept in ``RUN_DIR/tracking.json``); a new
run in the directory starts them afresh, so two runs' metrics never mix.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from ..errors import OpenGLMError

TRACKERS = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "tracking.json"
MLFLOW_DB = "mlflow.db"


def mlflow_uri(run_dir: str | Path) -> str:
    """The tracking URI of a run's MLflow store, for ``MlflowClient(tracking_uri=...)`` or ``mlflow ui``."""
    return "sqlite:///" + str((Path(run_dir) / MLFLOW_DB).resolve())


def parse_trackers(text: str | None) -> list[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``, each name checked and importable."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise OpenGLMError(f"unknown tracker {unknown[0]!r} in --log-to; choose from {', '.join(TRACKERS)}")
    for name in names:
        module = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}[name]
        try:
            __import__(module)
        except ImportError:
            raise OpenGLMError(f"--log-to {name} needs the {name} package: pip install 'openglm[{name}]' "
                               f"(or {name})") from None
    return list(dict.fromkeys(names))


class Trackers:
    """The chosen trackers of one run; ``log(record)`` sends a ``metrics.jsonl`` record's numbers at its step."""

    def __init__(self, names: list[str], run_dir: Path, settings: dict, resume_step: int | None):
        self.run_dir = Path(run_dir)
        ids_path = self.run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text(encoding="utf-8")) if resume_step is not None and ids_path.is_file() else {}
        if resume_step is None:  # a new run: nothing of an earlier one may mix in
            for name in ("tensorboard", "wandb"):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            (self.run_dir / MLFLOW_DB).unlink(missing_ok=True)
        self._tb = self._wandb = self._mlflow = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events from this step on (logged after the checkpoint, logged again now) are dropped
            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
            self._tb.add_text("settings", "```\n" + json.dumps(settings, indent=2) + "\n```", 0)
        if "wandb" in names:
            import wandb

            ids.setdefault("wandb", uuid.uuid4().hex[:8])  # wandb's own run id form
            self._wandb = wandb.init(mode="offline", dir=str(self.run_dir), project="openglm",
                                     name=self.run_dir.resolve().name, id=ids["wandb"], resume="allow",
                                     config=settings, settings=wandb.Settings(silent=True, console="off"))
        if "mlflow" in names:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=mlflow_uri(self.run_dir))
            if "mlflow" not in ids:
                experiment = client.get_experiment_by_name("openglm")
                experiment_id = experiment.experiment_id if experiment else client.create_experiment("openglm")
                run = client.create_run(experiment_id, run_name=self.run_dir.resolve().name)
                ids["mlflow"] = run.info.run_id
                for key, value in settings.items():
                    client.log_param(ids["mlflow"], key, value)
            self._mlflow = (client, ids["mlflow"])
        if names:
            from ..utils import atomic_write_text

            atomic_write_text(ids_path, json.dumps(ids) + "\n")

    def log(self, record: dict) -> None:
        step = record["step"]
        scalars = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self._mlflow
            now = _millis()
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, finished: bool = True) -> None:
        """Flush everything; ``finished``: the run reached its last step (MLflow marks it so)."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            wandb.teardown()  # the wandb service writes the offline run file through; this waits for it
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.set_terminated(run_id, "FINISHED" if finished else "KILLED")


def _millis() -> int:
    import time

    return int(time.time() * 1000)
