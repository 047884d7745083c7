"""Experiment tracking: TensorBoard and MLflow as run callbacks (``tracking.tensorboard``, ``tracking.mlflow``).

Each mirrors ``rounds.parquet``: after every round, every numeric column of
the round's row (the data columns: the run's identity is in the config) is
logged as a scalar at step = the round. Values that are not finite are
skipped: NaN marks what a round did not measure (the eval columns of a round
without evaluation, ``clip_norm`` without central DP) and inf what a run has
no finite value for (``epsilon`` and ``signal_to_noise`` without central DP);
a tracker would draw a false point or none. The resolved config is logged
once: TensorBoard as a text summary (``config``) and hparams, MLflow as
params (dotted keys, ``model.n_layer``) and ``config.yaml`` as an artifact.

Both callbacks come after the files' (:class:`~raysim.engine.callbacks.Files`), so
the row they see is the one written, ``wall_time_s`` included. A resumed run
continues: TensorBoard writes a new event file that purges the steps after
the checkpoint (``purge_step``: readers drop the old values of the rounds
redone); MLflow continues its run (its id is in the checkpoint) and logs only
the rounds it has not seen, since it keeps every value it was sent (the
redone rounds keep their first values, the same but for ``wall_time_s``).
The packages are optional (``pip install 'raysim[tracking]'``) and imported
only when a tracker is on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

from raysim.config import ExperimentConfig, TrackingConfig
from raysim.engine.callbacks import Callback, Step
from raysim.errors import ConfigError
from raysim.io.results import RoundResult, RoundRow

if TYPE_CHECKING:
    from raysim.engine.run import Run

COLUMNS = tuple(f.name for f in dataclasses.fields(RoundRow) if f.name != "round")  # the round is the step
MLFLOW_STATUS = {"failed": "FAILED", "interrupted": "KILLED"}  # the other statuses end a run cleanly: FINISHED


def scalars(row: RoundRow) -> dict[str, float]:
    """The row's finite values by column, less the round."""
    values = {name: float(getattr(row, name)) for name in COLUMNS}
    return {name: value for name, value in values.items() if math.isfinite(value)}


def flat_config(cfg: ExperimentConfig) -> dict[str, bool | int | float | str | None]:
    """The config as dotted keys (``model.n_layer``); lists as their text (``[4, 2]``)."""

    def flatten(section: dict, prefix: str) -> dict:
        flat = {}
        for key, value in section.items():
            if isinstance(value, dict):
                flat |= flatten(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = str(value) if isinstance(value, list) else value
        return flat

    return flatten(dataclasses.asdict(cfg), "")


def callbacks(cfg: TrackingConfig, *, run_dir: Path, name: str) -> list[Callback]:
    """The trackers ``cfg`` turns on, writing under ``run_dir``; a missing package is a ConfigError naming the
    key that asked for it."""
    trackers: list[Callback] = []
    if cfg.tensorboard:
        _require("tensorboard", key="tracking.tensorboard", extra="tensorboard")
        trackers.append(TensorBoard(log_dir=run_dir / "tensorboard"))
    if cfg.mlflow:
        local = cfg.mlflow_uri is None  # the SQLite store in the run folder needs SQLAlchemy and Alembic
        _require("mlflow", *(("sqlalchemy", "alembic") if local else ()), key="tracking.mlflow", extra="mlflow")
        store = run_dir / "mlflow"
        trackers.append(MLflow(uri=f"sqlite:///{store / 'mlflow.db'}" if local else cfg.mlflow_uri,
                               experiment=cfg.mlflow_experiment or name,
                               artifacts=(store / "artifacts").as_uri() if local else None))
    return trackers


def _require(*modules: str, key: str, extra: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"needs {', '.join(missing)}: pip install 'raysim[{extra}]'", field=key)


class TensorBoard(Callback):
    """Event files in ``log_dir`` (``tensorboard --logdir RUN/tensorboard``): the round's columns as scalars,
    the config as text and hparams."""

    def __init__(self, *, log_dir: Path):
        self.log_dir = log_dir
        self.writer = None

    def on_start(self, run: Run) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        fresh = not any(self.log_dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(self.log_dir), purge_step=None if fresh else run.completed + 1)
        if fresh:
            # indented: TensorBoard renders text as Markdown, and this as code
            self.writer.add_text("config", textwrap.indent((run.dir / "config.yaml").read_text(), "    "))
            # the hparams table, beside each column's last value; no session end (torch's says success, always)
            experiment, session, _ = hparams(flat_config(run.cfg), dict.fromkeys(COLUMNS, 0.0))
            self.writer.file_writer.add_summary(experiment)
            self.writer.file_writer.add_summary(session)
        self.writer.flush()

    def after_round(self, run: Run, result: RoundResult) -> Step:
        for name, value in scalars(result.row).items():
            self.writer.add_scalar(name, value, global_step=result.row.round)
        self.writer.flush()  # a round takes seconds: a kill loses nothing, and a live TensorBoard sees it
        return Step()

    def on_end(self, run: Run, summary: dict) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflow(Callback):
    """One MLflow run in ``experiment`` at ``uri`` (named for the run folder): the round's columns as metrics,
    the config as params and ``config.yaml``, ``summary.json`` at the end, and raysim's status as its own."""

    def __init__(self, *, uri: str, experiment: str, artifacts: str | None):
        self.uri, self.experiment, self.artifacts = uri, experiment, artifacts
        self.client = None
        self.run_id: str | None = None  # from the checkpoint on a resume
        self.logged = 0  # the last round this MLflow run has (a resume redoes the rounds after its checkpoint)

    def on_start(self, run: Run) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        if self.run_id is not None:
            try:
                client.update_run(self.run_id, status="RUNNING")
                self.logged = max((m.step for m in client.get_metric_history(self.run_id, "sim_time_s")), default=0)
            except MlflowException:  # not in this store (tracking.mlflow_uri changed): a new MLflow run
                self.run_id = None
        if self.run_id is None:
            self.run_id = self._new_run(client, run)
        self.client = client

    def after_round(self, run: Run, result: RoundResult) -> Step:
        from mlflow.entities import Metric

        row = result.row
        if row.round > self.logged:
            now_ms = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(name, value, now_ms, row.round)
                                                        for name, value in scalars(row).items()])
        return Step()

    def on_end(self, run: Run, summary: dict) -> None:
        if self.client is None:
            return
        self.client.log_artifact(self.run_id, str(run.dir / "summary.json"))  # final: the files' callback is first
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(summary["status"], "FINISHED"))

    def state(self) -> dict:
        return {"run_id": self.run_id}

    def load_state(self, state: dict) -> None:
        self.run_id = state.get("run_id")

    def _new_run(self, client, run: Run) -> str:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(self.experiment, artifact_location=self.artifacts)
            except MlflowException:  # a run of the same study, in parallel, created it first
                experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
        run_id = client.create_run(experiment_id, run_name=run.dir.name,
                                   tags={"raysim.run_dir": str(run.dir)}).info.run_id
        # the whole config is the artifact; a param holds at most MAX_PARAM_VAL_LENGTH characters
        params = [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in flat_config(run.cfg).items()]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=params[start:start + MAX_PARAMS_TAGS_PER_BATCH])
        client.log_artifact(run_id, str(run.dir / "config.yaml"))
        return run_id
