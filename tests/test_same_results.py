""".ci/same_results.py: a run's fingerprint is its values, so two reads of one run agree and a changed value
changes its column's fingerprint alone."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("same_results", ROOT / ".ci" / "same_results.py")
same_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(same_results)


def digest(values: list, kind: pa.DataType) -> str:
    return same_results.column_digest(pa.chunked_array([pa.array(values, kind)]))


@pytest.mark.parametrize(
    ("a", "b", "kind"),
    [
        (["ab", "c"], ["a", "bc"], pa.string()),
        ([None, "x"], ["", "x"], pa.string()),
        ([1.0, None], [1.0, float("nan")], pa.float64()),
        ([0.0], [-0.0], pa.float64()),
        ([1, None], [1, 0], pa.int64()),
        ([True, None], [True, False], pa.bool_()),
    ],
)
def test_column_digests_tell_apart_columns_that_look_alike(a, b, kind):
    assert digest(a, kind) != digest(b, kind)


def test_column_digest_includes_the_type():
    assert digest([1, 2], pa.int32()) != digest([1, 2], pa.int64())


def test_column_digest_reads_text_by_value_whatever_its_objects_and_chunks():
    built = "".join(["run", "-", "1"])  # another str object with the same text
    chunked = pa.chunked_array([pa.array([built]), pa.array(["x"])])
    assert same_results.column_digest(chunked) == digest(["run-1", "x"], pa.string())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, ray_session) -> tuple[Path, Path]:
    """The same tiny experiment run twice, in folders of different names."""
    from raysim.config import load_experiment
    from raysim.engine.run import run_experiment

    out = tmp_path_factory.mktemp("same_results")
    return tuple(run_experiment(load_experiment(None, [*same_results.TINY, "rounds=2", f"output_dir={out / name}"]))
                 for name in ("tiny", "tiny-again"))


def test_fingerprints_of_one_run_read_twice_are_identical(two_runs):
    first, second = same_results.fingerprint(two_runs[0]), same_results.fingerprint(two_runs[0])
    assert {"rounds.run_id", "rounds.policy", "devices.status", "devices.device_class"} <= set(first)
    assert same_results.differences({"tiny": first}, {"tiny": second}) == []


def test_two_runs_of_one_experiment_differ_in_the_folder_named_run_id_alone(two_runs):
    first, second = (same_results.fingerprint(run) for run in two_runs)
    differ = same_results.differences({"tiny": first}, {"tiny": second})
    assert differ == ["tiny: devices.run_id", "tiny: rounds.run_id"]


def test_one_changed_device_status_changes_that_columns_fingerprint_alone(two_runs, tmp_path):
    changed = tmp_path / two_runs[0].name
    shutil.copytree(two_runs[0], changed)
    part = sorted((changed / "devices.parquet").glob("round-*.parquet"))[0]
    table = pq.read_table(part)
    status = table["status"].to_pylist()
    status[0] = "oom" if status[0] != "oom" else "ok"
    pq.write_table(table.set_column(table.schema.get_field_index("status"), "status", pa.array(status)), part)
    before, after = same_results.fingerprint(two_runs[0]), same_results.fingerprint(changed)
    assert same_results.differences({"tiny": before}, {"tiny": after}) == ["tiny: devices.status"]
