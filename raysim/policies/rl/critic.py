"""The rl policy's critic: how much a config's update adds to its round's progress.

g(config) is linear in the config's own features, fitted by ridge regression
to the utilities of the updates the last ``memory`` rounds aggregated (each in
units of a typical round's progress), shrunk towards a prior that values a
config by its update information.
"""

from __future__ import annotations

import numpy as np


def fit(features: np.ndarray, targets: np.ndarray, *, prior: np.ndarray, ridge: float) -> np.ndarray:
    """Weights w and intercept b (as ``[*w, b]``) of ridge regression of ``targets`` on ``features``, shrunk
    towards ``prior``: the posterior mean under a Gaussian prior centred on it (features centred, so the
    intercept is not shrunk)."""
    centre = features.mean(axis=0)
    centred = features - centre
    gram = centred.T @ centred + ridge * np.eye(features.shape[1])
    residual = targets - targets.mean() - centred @ prior
    weights = prior + np.linalg.solve(gram, centred.T @ residual)
    return np.append(weights, targets.mean() - centre @ weights)


class Critic:
    """g over the configs' own features, refitted whenever a round adds utilities to its memory."""

    def __init__(self, *, own: np.ndarray, prior_information: float, ridge: float, memory: int):
        self.own, self.ridge, self.memory_size = own, ridge, memory
        # a config is worth its update information (feature 0: log scale, the largest 1), in units of a
        # typical round's progress; observed utilities correct it
        self.prior = np.zeros(own.shape[1])
        self.prior[0] = prior_information
        self.weights = np.append(self.prior, 0.0)  # g(config) = own features @ weights[:-1] + weights[-1]
        self.memory: list[tuple[np.ndarray, np.ndarray]] = []  # (own features of each config, its utility / scale)

    def values(self) -> np.ndarray:
        """g per config of the space: a device's contribution to its round's progress."""
        return self.own @ self.weights[:-1] + self.weights[-1]

    def learn(self, configs: np.ndarray, utilities: np.ndarray) -> None:
        """Remember one round's aggregated configs (space positions) and their scaled utilities; refit."""
        self.memory = [*self.memory, (self.own[configs], utilities)][-self.memory_size:]
        self.weights = fit(np.concatenate([f for f, _ in self.memory]), np.concatenate([u for _, u in self.memory]),
                           prior=self.prior, ridge=self.ridge)
