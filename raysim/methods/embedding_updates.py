"""Partial embedding updates per device (Xu et al., arXiv 2207.08988): a device trains, and sends, rows of the
embedding besides its adapters. Which rows: ``methods.embedding_selection`` (:mod:`raysim.methods.embeddings`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raysim.methods.base import Method, register
from raysim.methods.rank import ADAPTERS_ONLY

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig, MethodsConfig

@register
class PartialEmbeddings(Method):
    """Whether a device trains the embedding rows of the tokens it uses (or the server's rows of the round)."""

    key = "partial_embeddings"
    type = bool
    default = False
    dtype = pa.bool_()
    feature_slot = 4

    def check_all(self, values: list, cfg: ExperimentConfig) -> tuple[str, str] | None:
        if cfg.privacy.clip_norm is not None and any(values) and cfg.methods.embedding_selection is None:
            return ("methods.embedding_selection", "partial embeddings under central DP: choose server_frequent or "
                    "server_random (with methods.embedding_rows), or write device_seen, whose indices give the "
                    "server each user's token set")
        if cfg.privacy.local.enabled and any(values):
            return "privacy.local.enabled", ADAPTERS_ONLY
        return None

    def shape(self, value: bool, structure: dict, space: Any) -> None:
        structure["embeddings"] = value


def any_trained(methods: MethodsConfig) -> bool:
    """Whether some config of the method space trains embedding rows (the state then holds the embedding)."""
    return any(methods.partial_embeddings)
