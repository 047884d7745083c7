"""The run directory's files: written atomically, by any number of writers at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from raysim.io.results import RunWriter, atomic_write


def test_two_writers_of_one_file_at_once_never_share_a_temporary_file(tmp_path):
    """Both are inside their write at the same moment (as two runs filling one cache entry can be): each keeps
    its own temporary file, both renames land, and the file is one writer's whole content."""
    path, both_writing, used = tmp_path / "entry.json", threading.Barrier(2), []

    def write(text: str) -> None:
        def fill(tmp):
            used.append(tmp)
            tmp.write_text(text)
            both_writing.wait(timeout=10)

        atomic_write(path, fill)

    with ThreadPoolExecutor(2) as pool:  # a writer's error is raised here
        list(pool.map(write, ["a" * 1000, "b" * 1000]))
    assert len(set(used)) == 2 and all(tmp.name == path.name and tmp.parent.name.startswith(".") for tmp in used)
    assert path.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]  # no temporary folder is left behind


def test_a_resumed_run_removes_what_writes_cut_short_by_a_kill_left(tmp_path):
    writer = RunWriter(tmp_path, config_yaml="rounds: 3\n")
    for folder in (tmp_path, tmp_path / "devices.parquet"):
        (folder / ".tmp-cut").mkdir()
        (folder / ".tmp-cut" / "half-written").write_text("x")
    writer.resume_after(1)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.yaml", "devices.parquet", "rounds.parquet"]
