import pytest

from raysim.config import QUICKSTART, load_experiment
from raysim.errors import ConfigError


def test_quickstart_loads_with_its_values():
    cfg = load_experiment(QUICKSTART)
    assert cfg.name == "quickstart" and cfg.cohort.over_selection == 1.3


def test_overrides_win_over_the_file():
    cfg = load_experiment(QUICKSTART, ["rounds=2", "cohort.size=3"])
    assert cfg.rounds == 2 and cfg.cohort.size == 3


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("rounds: 2\ncohort:\n  sise: 4\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert str(path) in str(err.value) and "cohort.sise" in str(err.value)


def test_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("rounds: many\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert "rounds" in str(err.value) and str(path) in str(err.value)


def test_unknown_override_key_is_rejected():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_experiment(None, ["train.epochs=3"])


def test_missing_experiment_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override, key", [
    ("cohort.sampling=random", "cohort.sampling"),
    ("cohort.over_selection=0.5", "cohort.over_selection"),
    ("methods.lora_rank=[4096]", "methods.lora_rank[0]"),
    ("data.seq_len=1000", "data.seq_len"),
    ("ray.num_actors=0", "ray.num_actors"),
    ("aggregation.beta1=1.0", "aggregation.beta1"),
    ("aggregation.beta2=-0.1", "aggregation.beta2"),
    ("aggregation.tau=0", "aggregation.tau"),
    ("train.weight_decay=-0.01", "train.weight_decay"),
    ("eval.target_accuracy=1.5", "eval.target_accuracy"),
    ("eval.target_accuracy=-0.1", "eval.target_accuracy"),
    ("ray.max_retries=-1", "ray.max_retries"),
])
def test_out_of_range_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, [override])
    assert err.value.field == key and err.value.file == "override"


@pytest.mark.parametrize("extra", [[], ["eval.target_accuracy=0.1", "eval.every=0"]])
def test_stop_at_target_needs_a_target_and_evaluations(extra):
    with pytest.raises(ConfigError, match=r"eval.stop_at_target: needs eval.target_accuracy and eval.every > 0"):
        load_experiment(None, ["eval.stop_at_target=true", *extra])
