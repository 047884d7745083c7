"""Experiment tracking: TensorBoard's event files and MLflow's store, read back, hold every finite column of
rounds.parquet once at its round and the resolved config, across a resume; tracking changes no result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from raysim import tracking
from raysim.cli import main
from raysim.config import TrackingConfig, load_experiment
from raysim.engine.callbacks import Callback, Step
from raysim.engine.run import run_experiment
from raysim.errors import ConfigError
from raysim.io.results import IDENTITY_SCHEMA

from conftest import TINY, assert_same_results

# two rounds, evaluated after the second only: round 1's eval columns are NaN, epsilon is inf (no central DP)
TWO_ROUNDS = [*TINY, "rounds=2"]
TRACKED = ["tracking.tensorboard=true", "tracking.mlflow=true"]


class CtrlCIn(Callback):
    """Ctrl-C in round ``k``, once the trackers have logged it and before its checkpoint: a resume redoes it."""

    def __init__(self, k: int):
        self.k = k

    def after_round(self, run, result):
        if result.row.round == self.k:
            raise KeyboardInterrupt
        return Step()


def _mlflow(run_dir) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")


def _mlflow_runs(run_dir) -> list:
    client = _mlflow(run_dir)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _scalars(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _columns(run_dir) -> dict[str, list[float]]:
    """rounds.parquet's numeric data columns (the round is the step; identity columns are the config's)."""
    rounds = pq.read_table(run_dir / "rounds.parquet")
    return {f.name: rounds[f.name].to_pylist() for f in rounds.schema if f.name not in ("round", *IDENTITY_SCHEMA.names)
            and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))}


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """A tracked run stopped by Ctrl-C in its last round (after the trackers logged it, before its checkpoint)
    and resumed, which redoes that round; and the same run untracked."""

    def config(name, *overrides):
        return load_experiment(None, [*TWO_ROUNDS, f"output_dir={tmp_path_factory.mktemp(name) / 'run'}", *overrides])

    cfg = config("tracked", *TRACKED)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, callbacks=[CtrlCIn(2)])
    tracked = Path(cfg.output_dir)
    stopped = {"mlflow": [(r.info.run_id, r.info.status) for r in _mlflow_runs(tracked)],
               "summary": json.loads((tracked / "summary.json").read_text()), "columns": _columns(tracked)}
    return {"tracked": run_experiment(load_experiment(tracked / "config.yaml", []), resume=True),
            "stopped": stopped, "plain": run_experiment(config("plain"))}


def test_tensorboard_holds_every_finite_column_of_rounds_parquet_once_at_its_round(runs):
    events = _scalars(runs["tracked"])
    assert len(list((runs["tracked"] / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per session
    for name, values in _columns(runs["tracked"]).items():
        logged = [(e.step, e.value) for e in events.Scalars(name)] if name in events.Tags()["scalars"] else []
        # TensorBoard keeps a scalar as float32: the value logged is the column's, rounded to float32. The
        # second session's purge_step dropped the first's value of the round it redid (its wall_time_s differs)
        assert logged == [(r, float(np.float32(v))) for r, v in enumerate(values, 1) if math.isfinite(v)], name
    assert "eval_loss" in events.Tags()["scalars"] and "epsilon" not in events.Tags()["scalars"]


def test_mlflow_holds_every_finite_column_of_rounds_parquet_once_at_its_round(runs):
    (run,) = _mlflow_runs(runs["tracked"])
    client, final = _mlflow(runs["tracked"]), _columns(runs["tracked"])
    # the first session logged both rounds; the resumed one redid round 2 and kept MLflow's value of it
    first = runs["stopped"]["columns"]
    for name in final.keys() - {"wall_time_s"}:
        np.testing.assert_array_equal(first[name], final[name], err_msg=name)  # NaN equal to NaN
    for name, values in first.items():
        logged = [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, name),
                                                    key=lambda m: m.step)]
        assert logged == [(r, float(v)) for r, v in enumerate(values, 1) if math.isfinite(v)], name


def test_a_resumed_run_continues_its_mlflow_run(runs):
    (run,) = _mlflow_runs(runs["tracked"])
    assert [run.info.run_id] == [run_id for run_id, _ in runs["stopped"]["mlflow"]]


def test_an_mlflow_run_ends_with_raysims_status(runs):
    assert runs["stopped"]["summary"]["status"] == "interrupted"
    assert [status for _, status in runs["stopped"]["mlflow"]] == ["KILLED"]
    assert [r.info.status for r in _mlflow_runs(runs["tracked"])] == ["FINISHED"]


def test_tensorboard_holds_the_resolved_config_once_as_text_and_hparams(runs):
    events = _scalars(runs["tracked"])
    (text,) = events.Tensors("config/text_summary")
    config = (runs["tracked"] / "config.yaml").read_text()
    assert yaml.safe_load(text.tensor_proto.string_val[0].decode()) == yaml.safe_load(config)
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["model.n_embd"].number_value == 32 and hparams["methods.lora_rank"].string_value == "[4]"
    assert "model.path" not in hparams  # null: TensorBoard has no value for it


def test_mlflow_holds_the_config_as_params_and_config_yaml_as_an_artifact(runs, tmp_path):
    (run,) = _mlflow_runs(runs["tracked"])
    params = run.data.params
    assert params["model.n_embd"] == "32" and params["rounds"] == "2" and params["methods.lora_rank"] == "[4]"
    assert params["output_dir"] == str(runs["tracked"]) and params["model.path"] == "None"
    assert run.info.run_name == runs["tracked"].name
    artifact = _mlflow(runs["tracked"]).download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert Path(artifact).read_text() == (runs["tracked"] / "config.yaml").read_text()


def test_tracking_changes_no_result(runs):
    assert_same_results(runs["tracked"], runs["plain"])


@pytest.mark.parametrize(("key", "missing"), [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_tracker_whose_package_is_missing_is_one_line_naming_its_key(key, missing, monkeypatch, tmp_path,
                                                                        capsys):
    find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == missing else find_spec(name))
    with pytest.raises(ConfigError, match=rf"^tracking\.{key}: needs {missing}: pip install 'raysim\[{key}\]'$"):
        tracking.callbacks(TrackingConfig(**{key: True}), run_dir=tmp_path, name="x")
    assert main(["run", *TWO_ROUNDS, f"tracking.{key}=true", f"output_dir={tmp_path / 'run'}"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"raysim: error: tracking.{key}: needs {missing}: pip install 'raysim[{key}]'"]


def test_the_default_mlflow_store_needs_sqlalchemy_and_alembic_and_a_server_does_not(monkeypatch, tmp_path):
    find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name: None if name in ("sqlalchemy", "alembic") else find_spec(name))
    with pytest.raises(ConfigError, match="needs sqlalchemy, alembic"):
        tracking.callbacks(TrackingConfig(mlflow=True), run_dir=tmp_path, name="x")
    assert tracking.callbacks(TrackingConfig(mlflow=True, mlflow_uri="http://localhost:5000"), run_dir=tmp_path,
                              name="x")
