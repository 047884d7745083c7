"""Federated datasets: one interface, several sources.

:func:`build_dataset` runs once in the driver; what it returns is shipped to
the device actors through the object store.
"""

from __future__ import annotations

from raysim.config import ExperimentConfig, frozen, split_seed
from raysim.data.base import FederatedDataset
from raysim.data.synthetic import SyntheticTokens
from raysim.data.text import TextDataset, build_text_dataset
from raysim.io.caches import Caches
from raysim.models.build import model_vocab_size

__all__ = ["FederatedDataset", "SyntheticTokens", "TextDataset", "build_dataset"]


def dataset_key(cfg: ExperimentConfig) -> tuple:
    """Everything a built dataset depends on."""
    return frozen((cfg.data, cfg.model.vocab_size, cfg.model.path, cfg.eval.max_examples, cfg.pretrain.cache_dir,
                   split_seed(cfg)))


def build_dataset(cfg: ExperimentConfig, *, caches: Caches | None = None) -> FederatedDataset:
    """The dataset ``data.source`` names: ``synthetic``, ``python-docs`` or a file (once per ``caches``)."""

    def build() -> FederatedDataset:
        if cfg.data.source == "synthetic":
            return SyntheticTokens(cfg.data, vocab_size=model_vocab_size(cfg.model), seed=split_seed(cfg))
        return build_text_dataset(cfg)

    return build() if caches is None else Caches.get(caches.datasets, dataset_key(cfg), build)
