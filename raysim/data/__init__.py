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


def build_dataset(cfg: ExperimentConfig) -> FederatedDataset:
    """The dataset ``data.source`` names: ``synthetic``, ``python-docs`` or a file."""
    if cfg.data.source == "synthetic":
        return SyntheticTokens(cfg.data, vocab_size=cfg.model.vocab_size, seed=split_seed(cfg))
    return build_text_dataset(cfg)
