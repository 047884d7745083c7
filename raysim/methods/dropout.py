"""Federated dropout per device (Caldas et al. 2018): the share of its (pruned) units a device drops, drawn
afresh for every device and round (:func:`raysim.methods.width.slices`)."""

from __future__ import annotations

from raysim.methods.base import register
from raysim.methods.pruning import WidthRatio


@register
class DropoutRate(WidthRatio):
    """The share of the held units each device drops at random, every round."""

    key = "dropout_rate"
    feature_slot = 3
