"""Read a text table and split it into users.

Every text source goes through :func:`read_table` (Parquet, JSON Lines, or a
Hugging Face ``datasets`` folder written by ``save_to_disk``, read with
pyarrow alone) and :func:`partition` (natural by a user column, Dirichlet over
a label column, or IID). Mistakes a user can make — a file that is not
there or does not parse, a missing column, an empty user — raise one
:class:`ConfigError` naming the file and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from raysim import rng
from raysim.errors import ConfigError
from raysim.registry import Registry

if TYPE_CHECKING:
    from raysim.config import DataConfig

FIELD = "data.source"


def read_table(path: str | Path) -> pa.Table:
    """A table from a .parquet or .jsonl file or a ``datasets`` save_to_disk folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError("data file not found", file=str(p), field=FIELD)
    try:
        if p.is_dir():
            return _read_datasets_folder(p)
        if p.suffix == ".parquet":
            return pq.read_table(p)
        if p.suffix in (".jsonl", ".json"):
            return pa_json.read_json(p)
    except ConfigError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ConfigError(f"cannot read: {str(err).splitlines()[0]}", file=str(p), field=FIELD) from None
    raise ConfigError("unsupported format: use .parquet, .jsonl or a datasets folder", file=str(p), field=FIELD)


def _read_datasets_folder(folder: Path) -> pa.Table:
    """Arrow stream files of a ``Dataset.save_to_disk`` folder (the ``train`` split of a DatasetDict)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        return _read_datasets_folder(folder / ("train" if "train" in splits else splits[0]))
    state = folder / "state.json"
    if not state.is_file():
        raise ConfigError("not a datasets folder (no state.json or dataset_dict.json)", file=str(folder), field=FIELD)
    files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    tables = []
    for name in files:
        with pa.memory_map(str(folder / name)) as source:
            tables.append(ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


def column(table: pa.Table, name: str | None, *, key: str, source: str) -> list:
    """A column's values; one ConfigError naming ``key``, and the columns there are, if it is missing."""
    if name not in table.column_names:
        raise ConfigError(f"no column {name!r} (columns: {', '.join(table.column_names)})", file=source, field=key)
    return table.column(name).to_pylist()


# ``data.partition`` names one: (table, its rows' items, the data config, a generator keyed by (seed, "partition"),
# the source for messages) -> items per user (raysim deals out row numbers: :func:`partition_rows`)
PARTITIONS: Registry[Callable[..., dict[str, list[str]]]] = Registry("data partition")


def partition(table: pa.Table, cfg: DataConfig, *, seed: int, source: str) -> dict[str, list[str]]:
    """Texts per user, users in a stable order, by ``data.partition``."""
    texts = text_column(table, cfg, source=source)
    return {user: [texts[row] for row in rows] for user, rows in partition_rows(table, cfg, seed=seed,
                                                                                source=source).items()}


def text_column(table: pa.Table, cfg: DataConfig, *, source: str) -> list[str]:
    """The texts, checked to be strings (one ConfigError naming the first row that is not)."""
    texts = column(table, cfg.text_column, key="data.text_column", source=source)
    bad = next((row for row, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"row {bad} holds {texts[bad]!r}: the text column must hold strings (no nulls; rows "
                          "count from 0)", file=source, field="data.text_column")
    return texts


def partition_rows(table: pa.Table, cfg: DataConfig, *, seed: int, source: str) -> dict[str, list[int]]:
    """The table's row numbers per user, by ``data.partition``.

    A partition deals out items it does not look into: here the row numbers, so that every column of a row
    (its text, its label) follows it to the same user.
    """
    gen = np.random.default_rng(rng.key(seed, "partition"))
    return PARTITIONS[cfg.partition](table, list(range(table.num_rows)), cfg, gen=gen, source=source)


@PARTITIONS.register("natural")
def natural(table: pa.Table, items: list, cfg: DataConfig, *, gen: np.random.Generator,
            source: str) -> dict[str, list]:
    """By the user column: each user's rows, in the data's order."""
    users = column(table, cfg.user_column, key="data.user_column", source=source)
    out: dict[str, list] = {}
    for row, (user, item) in enumerate(zip(users, items)):
        if user is None or str(user).strip() == "":
            raise ConfigError(f"row {row} has an empty user (rows count from 0)", file=source,
                              field="data.user_column")
        out.setdefault(str(user), []).append(item)
    return out


@PARTITIONS.register("dirichlet")
def dirichlet(table: pa.Table, items: list, cfg: DataConfig, *, gen: np.random.Generator,
              source: str) -> dict[str, list]:
    """Every label's rows split over users by a Dirichlet(``data.dirichlet_alpha``) draw (:func:`dirichlet_owners`)."""
    n_users = _n_users(table, cfg, source)
    labels = column(table, cfg.label_column, key="data.label_column", source=source)
    return _by_owner(items, dirichlet_owners(labels, n_users=n_users, alpha=cfg.dirichlet_alpha, gen=gen),
                     n_users=n_users)


@PARTITIONS.register("iid")
def iid(table: pa.Table, items: list, cfg: DataConfig, *, gen: np.random.Generator,
        source: str) -> dict[str, list]:
    """Rows dealt to users in a random order: every user the same mixture."""
    n_users = _n_users(table, cfg, source)
    return _by_owner(items, gen.permutation(len(items)) % n_users, n_users=n_users)


def _n_users(table: pa.Table, cfg: DataConfig, source: str) -> int:
    return cfg.num_users or len(set(column(table, cfg.user_column, key="data.user_column", source=source)))


def _by_owner(items: list, owner: np.ndarray, *, n_users: int) -> dict[str, list]:
    out = {f"user{u:06d}": [] for u in range(n_users)}
    for item, u in zip(items, owner):
        out[f"user{u:06d}"].append(item)
    return {u: t for u, t in out.items() if t}


def dirichlet_owners(labels: list, *, n_users: int, alpha: float, gen: np.random.Generator) -> np.ndarray:
    """Give each row a user: every label's rows are split over users by a Dirichlet(alpha) draw.

    Small alpha: each user sees few labels (strongly non-IID); large alpha: near IID.
    """
    labels_arr = np.asarray([str(x) for x in labels])
    owner = np.empty(len(labels_arr), dtype=np.int64)
    for label in sorted(set(labels_arr)):
        rows = np.flatnonzero(labels_arr == label)
        rows = rows[gen.permutation(len(rows))]
        shares = gen.dirichlet(np.full(n_users, alpha))
        cuts = np.floor(np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for user, part in enumerate(np.split(rows, cuts)):
            owner[part] = user
    return owner
