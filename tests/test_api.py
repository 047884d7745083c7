"""The Python API (raysim.run, load_run, load_study) and the identity columns every row of a run carries."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from omegaconf import OmegaConf

import raysim
from raysim.api import experiment_config
from raysim.config import ExperimentConfig
from raysim.errors import ConfigError
from raysim.io.results import IDENTITY_SCHEMA, ROUNDS_SCHEMA

from conftest import TINY, assert_same_columns, assert_same_results

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = ["run_id", "name", "seed", "policy"]
AXES = ["axis.policy", "axis.seed", "axis.cohort.size"]  # the study fixture's axes, as columns
RUNS = ["policy-uniform_seed-0_size-4", "policy-random_seed-0_size-4"]  # its runs, in study order


def _parts(study_dir: Path, table: str) -> list[str]:
    return sorted(map(str, study_dir.glob(f"runs/*/{table}/*.parquet")))


def _unlabel(run_dir: Path) -> None:
    """Make ``run_dir`` look written before rows carried their identity (and before config.yaml had study_axes)."""
    for part in run_dir.glob("*.parquet/round-*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns([c for c in table.column_names if c in IDENTITY or c.startswith("axis.")]),
                       part)
    config = OmegaConf.load(run_dir / "config.yaml")
    del config["study_axes"]
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))


@pytest.fixture(scope="module")
def study(ray_session, tmp_path_factory):
    """A finished two-run study (policy x seed x a dotted key) as raysim compare writes it, in
    <folder>/runs/compare_policies, where the README's example looks for one."""
    from raysim.study.compare import load_study, run_study

    folder = tmp_path_factory.mktemp("notebook")
    experiment = OmegaConf.to_container(OmegaConf.from_dotlist([*TINY, "rounds=2"]))
    spec = {"name": "tiny", "output_dir": str(folder / "runs" / "compare_policies"), "experiment": experiment,
            "axes": {"policy": ["uniform", "random"], "seed": [0], "cohort.size": [4]}}
    (folder / "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return run_study(load_study(folder / "study.yaml")), folder


@pytest.fixture(scope="module")
def notebook(study):
    """The README's Python API section, run as a notebook would: its blocks in turn, in one namespace, in a
    folder holding a study's results; its names afterwards."""
    pytest.importorskip("pandas", reason="the example shows the tables as pandas DataFrames")
    _, folder = study
    blocks = re.findall(r"```python\n(.*?)```", _readme_section("Python API"), flags=re.S)
    assert len(blocks) == 2 and "raysim.run(" in blocks[0] and "raysim.load_study(" in blocks[0]
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def _readme_section(title: str) -> str:
    return (ROOT / "README.md").read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_import_raysim_loads_neither_torch_nor_ray():
    code = ("import sys, raysim\n"
            "assert raysim.load_run.__module__ == 'raysim.api' and raysim.StudyResults.__name__ == 'StudyResults'\n"
            "assert set(raysim.__all__) <= set(dir(raysim))\n"
            "print(sorted({'torch', 'ray'} & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_raysim_run_is_the_api_even_once_the_engine_is_imported():
    """``raysim.run`` is :func:`raysim.api.run` whatever was imported before: the engine's run module lives in
    ``raysim.engine``, so nothing shadows the package's attribute."""
    import raysim.api
    import raysim.engine.run

    assert raysim.run is raysim.api.run and raysim.engine.run.run_experiment
    with pytest.raises(ConfigError, match="rounds: must be >= 1"):
        raysim.run("quickstart", "rounds=0")


def test_a_config_built_in_code_is_validated_as_the_cli_validates():
    with pytest.raises(ConfigError) as err:
        raysim.run(ExperimentConfig(rounds=-3))
    assert (err.value.file, err.value.field, err.value.message) == ("ExperimentConfig", "rounds", "must be >= 1")
    with pytest.raises(ConfigError) as err:
        raysim.run(ExperimentConfig(rounds="many"))
    assert err.value.field == "rounds"
    with pytest.raises(ConfigError) as err:  # the override that set the bad value is named
        raysim.run(ExperimentConfig(), "cohort.size=0")
    assert (err.value.file, err.value.field) == ("override", "cohort.size")
    cfg = experiment_config(ExperimentConfig(name="mine", seed=3), ["rounds=2"])
    assert (cfg.name, cfg.seed, cfg.rounds) == ("mine", 3, 2)


def test_overrides_and_flags_are_checked_as_raysim_run_checks_them(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        raysim.run("quickstart", "cohort.deadline=3")
    with pytest.raises(ConfigError, match="no shipped experiment of that name .*quickstart"):
        raysim.run("no_such_experiment")
    with pytest.raises(ConfigError, match="not both"):
        raysim.run("quickstart", resume=tmp_path)
    with pytest.raises(ConfigError, match="give one"):
        raysim.run(resume=tmp_path, overwrite=True)
    with pytest.raises(ConfigError, match="not a run directory"):
        raysim.run(resume=tmp_path)


def test_a_name_is_a_shipped_experiment_unless_the_path_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("name: mine\nrounds: 2\n")
    shipped = experiment_config("quickstart", ["rounds=3"])
    assert (shipped.name, shipped.rounds, shipped.model.vocab_size) == ("quickstart", 3, 2048)
    assert experiment_config("quickstart.yaml", []).name == "mine"
    only_overrides = experiment_config("rounds=4", ["seed=7"])  # as `raysim run rounds=4`: the quickstart
    assert (only_overrides.name, only_overrides.rounds, only_overrides.seed) == ("quickstart", 4, 7)


def test_the_readme_example_runs_and_load_run_reads_its_run_back(notebook, study):
    _, folder = study
    run_dir = folder / "runs" / "notebook"
    assert notebook["run_dir"] == run_dir
    run = raysim.load_run(run_dir)
    assert run.path == run_dir and run.summary["status"] == "finished" and run.summary["name"] == "quickstart"
    assert run.config["rounds"] == 1 and run.config["model"]["n_embd"] == 32 and run.config["study_axes"] == {}
    assert run.rounds.column("round").to_pylist() == [1] and notebook["rounds"]["round"].tolist() == [1]
    assert run.rounds.column("train_loss").to_pylist() == notebook["rounds"]["train_loss"].tolist()
    assert run.devices.num_rows == run.rounds.column("n_selected")[0].as_py() == 6  # 4 x over-selection 1.5
    assert notebook["study"].comparison.num_rows == 2


def test_every_row_of_a_run_carries_its_id_name_seed_and_policy(notebook, study):
    run = raysim.load_run(study[1] / "runs" / "notebook")
    for table in (run.rounds, run.devices):
        assert table.schema.names[-4:] == IDENTITY
        assert table.select(IDENTITY).schema == IDENTITY_SCHEMA  # strings, and seed as int64
        assert set(zip(*(table[c].to_pylist() for c in IDENTITY))) == {("notebook", "quickstart", 0, "uniform")}
    assert run.summary["policy"]["name"] == "uniform"


def test_a_run_written_before_rows_were_labelled_resumes_labelled_and_identical(notebook, study, tmp_path):
    """A run folder from before identity columns (and the study_axes key), resumed, gets them: its files are then
    byte for byte those of the run written now (the copy is a run of that config stopped after its last round,
    moved: it resumes where it lies, not where its config.yaml's output_dir says)."""
    original = study[1] / "runs" / "notebook"
    run_dir = tmp_path / "notebook"
    shutil.copytree(original, run_dir)
    _unlabel(run_dir)
    (run_dir / "final_state.pt").unlink()
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps(summary | {"status": "interrupted"}))
    assert pq.read_table(run_dir / "rounds.parquet").column_names[-1] == ROUNDS_SCHEMA.names[-1]  # unlabelled

    assert raysim.run(resume=run_dir) == run_dir
    for table in ("rounds.parquet", "devices.parquet"):
        assert pq.read_table(run_dir / table).column_names[-4:] == IDENTITY
    assert_same_results(run_dir, original)


def test_one_dataset_read_over_a_study_folder_gives_a_labelled_table(study):
    study_dir, _ = study
    comparison = pq.read_table(study_dir / "comparison.parquet").to_pylist()
    assert [r["run_id"] for r in comparison] == RUNS
    for table in ("rounds.parquet", "devices.parquet"):
        rows = ds.dataset(_parts(study_dir, table), format="parquet").to_table()
        assert all(rows.schema.field(c).type == pa.string() for c in AXES)
        labels = set(zip(*(rows[c].to_pylist() for c in [*IDENTITY, *AXES])))
        assert labels == {(r["run_id"], f"tiny-{r['run_id']}", 0, r["policy"], r["policy"], "0", "4")
                          for r in comparison}
        for run_id in RUNS:  # each run's rows, all of them
            mine = rows.filter(pc.equal(rows["run_id"], run_id))
            assert mine.num_rows == pq.read_table(study_dir / "runs" / run_id / table).num_rows > 0


def test_load_study_gives_every_run_and_the_comparison(study):
    study_dir, _ = study
    loaded = raysim.load_study(study_dir)
    assert sorted(loaded.runs) == sorted(RUNS) and loaded.comparison.column("run_id").to_pylist() == RUNS
    assert loaded.runs[RUNS[1]].config["study_axes"] == {"policy": "random", "seed": "0", "cohort.size": "4"}
    order = [("run_id", "ascending"), ("round", "ascending")]
    read = ds.dataset(_parts(study_dir, "rounds.parquet"), format="parquet").to_table()
    assert_same_columns(loaded.rounds.sort_by(order), read.sort_by(order), where="rounds")
    assert loaded.devices.num_rows == sum(r.devices.num_rows for r in loaded.runs.values())
    with pytest.raises(ConfigError, match="not a study folder"):
        raysim.load_study(study_dir / "runs")


def test_a_study_started_again_labels_the_finished_runs_it_skips(study, tmp_path):
    """Runs that finished before rows were labelled are not run again, but they are labelled."""
    from raysim.study.compare import load_study, run_study

    study_dir, folder = study
    copy = tmp_path / "compare_policies"
    shutil.copytree(study_dir, copy)
    for run_id in RUNS:
        _unlabel(copy / "runs" / run_id)
    spec = yaml.safe_load((folder / "study.yaml").read_text()) | {"output_dir": str(copy)}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    summaries = {p: p.read_bytes() for p in copy.glob("runs/*/summary.json")}
    run_study(load_study(tmp_path / "study.yaml"))
    assert summaries == {p: p.read_bytes() for p in copy.glob("runs/*/summary.json")}  # nothing ran again
    rows = ds.dataset(_parts(copy, "devices.parquet"), format="parquet").to_table()
    assert set(rows["axis.policy"].to_pylist()) == {"uniform", "random"} and rows["run_id"].null_count == 0
    parts = sorted(study_dir.glob("runs/*/*.parquet/round-*.parquet"))
    assert len(parts) == 8  # 2 runs x 2 tables x 2 rounds, each as raysim writes it now
    for part in parts:
        assert (copy / part.relative_to(study_dir)).read_bytes() == part.read_bytes(), part
