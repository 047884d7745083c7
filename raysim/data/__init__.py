"""Federated datasets: one interface, several sources.

:func:`build_dataset` runs once in the driver; what it returns is shipped to
the device actors through the object store.
"""

from __future__ import annotations

from raysim.config import ExperimentConfig, split_seed
from raysim.data.base import FederatedDataset
from raysim.data.synthetic import SyntheticTokens
from raysim.data.text import TextDataset, build_text_dataset

__all__ = ["FederatedDataset", "SyntheticTokens", "TextDataset", "build_dataset"]


# Runs in one process (a study, train-policy) that split the same data the same way share the built dataset:
# tokenizing and packing the shipped corpus costs about 3 s a run on 2 cores.
_BUILT: dict[str, FederatedDataset] = {}


def dataset_key(cfg: ExperimentConfig) -> str:
    """Everything a built dataset depends on."""
    return repr((cfg.data, cfg.model.vocab_size, cfg.eval.max_examples, cfg.pretrain.cache_dir, split_seed(cfg)))


def build_dataset(cfg: ExperimentConfig) -> FederatedDataset:
    """The dataset ``data.source`` names: ``synthetic``, ``python-docs`` or a file (built once per process)."""
    key = dataset_key(cfg)
    if key not in _BUILT:
        if cfg.data.source == "synthetic":
            _BUILT[key] = SyntheticTokens(cfg.data, vocab_size=cfg.model.vocab_size, seed=split_seed(cfg))
        else:
            _BUILT[key] = build_text_dataset(cfg)
    return _BUILT[key]
