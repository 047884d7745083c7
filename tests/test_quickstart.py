"""The shipped quickstart learns: held-out loss falls by a clear margin (slow: ~1-4 min)."""

import json

import pytest

from raysim.config import QUICKSTART, load_experiment
from raysim.run import run_experiment


@pytest.mark.slow
def test_quickstart_held_out_loss_falls_clearly(ray_session, tmp_path):
    cfg = load_experiment(QUICKSTART, [f"output_dir={tmp_path / 'run'}", "progress=false"])
    summary = json.loads((run_experiment(cfg) / "summary.json").read_text())
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"] - 0.2
    assert summary["final"]["eval_top3_accuracy"] > summary["initial"]["eval_top3_accuracy"]
