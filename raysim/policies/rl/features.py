"""What the rl policy's network sees: the device, the round and each config as the cost model prices it."""

from __future__ import annotations

import numpy as np
import torch

from raysim import rng
from raysim.methods import base as methods
from raysim.policies.base import PolicyContext, Prices, update_information
from raysim.types import DeviceDraws

DEVICE_FEATURES = 6
ROUND_FEATURES = 2
CONFIG_FEATURES = 11


def device_features(devices: DeviceDraws) -> np.ndarray:
    """Log-scaled compute, memory and links, latency and dropout probability: shape (devices, 6)."""
    return np.stack([
        np.log10(devices.train_flops_per_s) - 9.0,
        np.log10(devices.memory_bytes) - 9.0,
        np.log10(devices.uplink_bps) - 6.0,
        np.log10(devices.downlink_bps) - 6.0,
        devices.rtt_s,
        devices.dropout_prob,
    ], axis=1)


def own_features(context: PolicyContext) -> np.ndarray:
    """Each config's own values, the same for every device: its update information and FLOPs, then the
    per-device methods' features (raysim.methods.base: bits, rank, pruning, dropout, partial embeddings): shape
    (configs, 7)."""
    space = context.space
    info = update_information(context)
    flops = np.array([context.oracle.measure(c).flops_per_step for c in space], dtype=np.float64)
    return np.stack([np.log1p(info) / np.log1p(info.max()), flops / flops.max(), *methods.features(space)], axis=1)


def config_features(own: np.ndarray, prices: Prices, devices: DeviceDraws, *, deadline_s: float | None,
                    target: int) -> np.ndarray:
    """``own`` features and each config's predicted costs for each device: shape (devices, configs, 11).

    Besides time, memory and traffic, the place in the round the config would give the device: how many of
    the cohort's other devices arrive sooner (each at its fastest feasible config), over the round's target.
    """
    horizon = deadline_s or prices.total_s.max(axis=1, keepdims=True)
    traffic = prices.bytes_up + prices.bytes_down
    fastest = np.where(prices.feasible, prices.total_s, np.inf).min(axis=1)
    sooner = (fastest[None, None, :] < prices.total_s[:, :, None]).sum(axis=2)
    sooner -= fastest[:, None] < prices.total_s  # not the device itself
    priced = np.stack([
        np.minimum(prices.total_s / horizon, 4.0),
        np.minimum(prices.peak_memory_bytes / devices.memory_bytes[:, None], 4.0),
        traffic / max(1, traffic.max()),
        sooner / max(1, target),
    ], axis=2)
    return np.concatenate([np.broadcast_to(own, (len(devices), *own.shape)), priced], axis=2)


def inputs(devices: DeviceDraws, own: np.ndarray, prices: Prices, *, round_features: list[float],
           deadline_s: float | None, target: int) -> torch.Tensor:
    """The network's input for every (device, config): device, round and config features, (devices, configs, 19)."""
    per_device = np.concatenate([device_features(devices), np.tile(round_features, (len(devices), 1))], axis=1)
    configs = config_features(own, prices, devices, deadline_s=deadline_s, target=target)
    stacked = np.concatenate([np.repeat(per_device[:, None, :], own.shape[0], axis=1), configs], axis=2)
    return torch.from_numpy(stacked).float()


def gumbel(seed: int, round: int, device_id: np.ndarray, num_configs: int) -> np.ndarray:
    """Gumbel noise per (device, config), keyed by (seed, round, config, device id)."""
    u = np.stack([rng.uniform(seed, "policy-rl", round, j, ids=device_id) for j in range(num_configs)], axis=1)
    return -np.log(-np.log(np.clip(u, 1e-12, 1 - 1e-12)))
