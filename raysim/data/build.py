"""Build the run's federated dataset, once, in the driver; what it returns is shipped to the device actors
through the object store."""

from __future__ import annotations

from collections.abc import Callable

from raysim.config import ExperimentConfig, frozen, split_seed
from raysim.data.base import FederatedDataset
from raysim.data.synthetic import SyntheticTokens
from raysim.data.text import build_text_dataset
from raysim.io.caches import Caches
from raysim.models.build import model_vocab_size
from raysim.registry import Registry

# ``data.source`` names one of these datasets of token ids; any other value is text (raysim.data.text: a named
# corpus, or a file or folder), tokenized and packed
GENERATED: Registry[Callable[[ExperimentConfig], FederatedDataset]] = Registry("generated dataset")


@GENERATED.register("synthetic")
def synthetic(cfg: ExperimentConfig) -> FederatedDataset:
    return SyntheticTokens(cfg.data, vocab_size=model_vocab_size(cfg.model), seed=split_seed(cfg))


def dataset_key(cfg: ExperimentConfig) -> tuple:
    """Everything a built dataset depends on."""
    return frozen((cfg.data, cfg.model.vocab_size, cfg.model.path, cfg.eval.max_examples, cfg.pretrain.cache_dir,
                   split_seed(cfg)))


def build_dataset(cfg: ExperimentConfig, *, caches: Caches | None = None) -> FederatedDataset:
    """The dataset ``data.source`` names: ``synthetic``, ``python-docs`` or a file (once per ``caches``)."""

    def build() -> FederatedDataset:
        return GENERATED.get(cfg.data.source, build_text_dataset)(cfg)

    return build() if caches is None else Caches.get(caches.datasets, dataset_key(cfg), build)
