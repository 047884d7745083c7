"""What the wheel carries: every package, every shipped file; and how shipped names resolve.

The wheel itself is built, installed alone and run from another directory by ``.ci/wheel_check`` (CI runs it
after the tests); these checks catch a package or a shipped file the build would leave out, before that.
"""

import fnmatch
from pathlib import Path

import pytest

from raysim.errors import ConfigError
from raysim.io import shipped

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_of_the_tree_is_in_the_wheel():
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "raysim").rglob("*.py")}
    listed = set(SETUPTOOLS["packages"])
    assert tree <= listed, sorted(tree - listed)
    for package, folder in SETUPTOOLS["package-dir"].items():
        assert package in listed and (ROOT / folder).is_dir(), package


@pytest.mark.parametrize("kind", shipped.KINDS)
def test_every_shipped_file_matches_a_package_data_pattern(kind):
    package = f"raysim._shipped.{kind}"
    assert SETUPTOOLS["package-dir"][package] == kind
    patterns = SETUPTOOLS["package-data"][package]
    files = [p.relative_to(ROOT / kind).as_posix() for p in (ROOT / kind).rglob("*") if p.is_file()]
    left_out = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert files and not left_out, left_out


def test_shipped_folders_are_found_from_the_package_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for kind in shipped.KINDS:
        assert shipped.folder(kind) == ROOT / kind  # a checkout: its top-level folders
    assert shipped.experiment("quickstart") == ROOT / "experiments" / "quickstart.yaml"
    assert shipped.experiment("quickstart.yaml") == ROOT / "experiments" / "quickstart.yaml"


def test_a_users_file_wins_over_a_shipped_name_and_a_missing_one_lists_the_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("rounds: 1\n")
    assert shipped.experiment("quickstart.yaml") == Path("quickstart.yaml")
    with pytest.raises(ConfigError, match="no shipped experiment of that name .shipped: compare_policies, "):
        shipped.experiment("quikstart")
