"""The shipped quickstarts learn: held-out loss falls by a clear margin (slow: ~1-4 min each)."""

import json

import pytest

from raysim.config import load_experiment
from raysim.engine.run import run_experiment
from raysim.io.shipped import experiment


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", "quickstart_llama"])
def test_quickstart_held_out_loss_falls_clearly(ray_session, tmp_path, name):
    cfg = load_experiment(experiment(name), [f"output_dir={tmp_path / 'run'}", "progress=false"])
    summary = json.loads((run_experiment(cfg) / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"] - 0.2
    assert summary["final"]["eval_top3_accuracy"] > summary["initial"]["eval_top3_accuracy"]
