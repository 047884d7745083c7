"""What an honest-but-curious server learns about the labels from what crosses the cut.

The attacks of P³EFT's code (``compute_custom_metrics``, ``src/utils_model.py`` of
github.com/p3eft-iclr-2025/p3eft-iclr-2025), each written here in numpy and torch, on one vector per example:

- **k-means** with k = the number of labels (10 restarts, k-means++ seeding), scored by its best-permutation
  accuracy against the labels;
- **spectral**: the projection of the centred vectors on their top right singular vector as a score,
  max(AUC, 1 - AUC) (binary labels);
- **norm**: the vectors' L2 norms as a score, max(AUC, 1 - AUC) (binary labels);
- **probe**: a multinomial logistic regression (L2, C = 1, as scikit-learn's default) on standardised vectors,
  its 3-fold stratified cross-validated accuracy.

Departures from that code, each for a reason: the vectors are what crossed during training in the round
(the code attacks the validation set at evaluation time), gradients are attacked as well as activations (the
code leaves gradients to a notebook), the probe sees standardised vectors (gradients are small: an unscaled
L2-penalised probe would be regularised to chance and say nothing), and ``label_leakage`` includes the probe
(the code's headline leak leaves it out). Chance is 1/k for the accuracies and 0.5 for the AUCs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from raysim import rng
from raysim.split.protocol import Crossing

ATTACKS = ("kmeans", "spectral", "norm", "probe")
SOURCES = ("activations", "gradients")  # the server's outputs (sent down), their gradients (sent up)
MAX_EXAMPLES = 4096  # a keyed sample of the round's crossings beyond this: the attacks' cost stays bounded
MAX_PERMUTED = 8  # labels up to which k-means is scored over every permutation
FOLDS = 3


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The ROC AUC of ``scores`` for the ``positive`` examples: the Mann–Whitney statistic, ties counted half."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties (1-based)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def two_sided_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """max(AUC, 1 - AUC) of ``scores`` for label 1 against label 0 (NaN unless the labels are binary)."""
    if set(np.unique(labels).tolist()) != {0, 1}:
        return math.nan
    a = auc(scores, labels == 1)
    return max(a, 1.0 - a)


def spectral(x: np.ndarray, labels: np.ndarray) -> float:
    centred = x - x.mean(axis=0)
    _, _, vh = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    return two_sided_auc(centred @ vh[0], labels)


def norm(x: np.ndarray, labels: np.ndarray) -> float:
    return two_sided_auc(np.linalg.norm(x.astype(np.float64), axis=1), labels)


def kmeans(x: np.ndarray, labels: np.ndarray, *, classes: int, generator: np.random.Generator,
           restarts: int = 10, iterations: int = 100) -> float:
    """k-means' best-permutation accuracy (the restart of least inertia); NaN beyond ``MAX_PERMUTED`` labels."""
    if classes > MAX_PERMUTED or len(x) < classes:
        return math.nan
    x = x.astype(np.float64)
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        assign, inertia = _lloyd(x, classes, generator, iterations)
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    hits = np.zeros((classes, classes))
    np.add.at(hits, (best, labels), 1)
    return max(hits[range(classes), list(p)].sum() for p in itertools.permutations(range(classes))) / len(x)


def _lloyd(x: np.ndarray, k: int, generator: np.random.Generator, iterations: int) -> tuple[np.ndarray, float]:
    centres = [x[generator.integers(len(x))]]
    for _ in range(1, k):  # k-means++: each next centre drawn by squared distance to the nearest so far
        d2 = ((x[:, None, :] - np.array(centres)[None]) ** 2).sum(-1).min(1)
        total = d2.sum()
        p = d2 / total if total > 0 else np.full(len(x), 1.0 / len(x))
        centres.append(x[generator.choice(len(x), p=p)])
    centres = np.array(centres)
    assign = np.full(len(x), -1)
    for _ in range(iterations):
        d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
        new = d2.argmin(1)
        if np.array_equal(new, assign):
            break
        assign = new
        for c in range(k):
            if (assign == c).any():
                centres[c] = x[assign == c].mean(0)
    return assign, float(((x - centres[assign]) ** 2).sum())


def probe(x: np.ndarray, labels: np.ndarray, *, classes: int, generator: np.random.Generator) -> float:
    """A logistic probe's 3-fold stratified cross-validated accuracy (NaN with too few examples of a label)."""
    folds = np.empty(len(x), dtype=np.int64)
    for c in range(classes):
        rows = np.flatnonzero(labels == c)
        folds[rows[generator.permutation(len(rows))]] = np.arange(len(rows)) % FOLDS
    if len(np.unique(labels)) < 2 or any(len(np.unique(labels[folds != f])) < 2 for f in range(FOLDS)):
        return math.nan
    x, correct = x.astype(np.float64), 0
    for f in range(FOLDS):
        train, test = folds != f, folds == f
        mean, std = x[train].mean(0), x[train].std(0) + 1e-12
        w = logistic(torch.from_numpy((x[train] - mean) / std), torch.from_numpy(labels[train]), classes)
        scores = torch.from_numpy((x[test] - mean) / std) @ w[:-1] + w[-1]
        correct += int((scores.argmax(1).numpy() == labels[test]).sum())
    return correct / len(x)


def logistic(x: torch.Tensor, y: torch.Tensor, classes: int, *, c: float = 1.0) -> torch.Tensor:
    """Multinomial logistic regression minimising C · Σ log-loss + ½‖W‖² (intercept unpenalised), by L-BFGS;
    returns the (d + 1, classes) weights, the intercept last. The gradient is written out, not taken by
    autograd: a device fitting it inside a training step saves nothing for backward."""
    x = x.double()
    y = torch.nn.functional.one_hot(y, classes).double()
    ones = torch.ones(len(x), 1, dtype=torch.float64, device=x.device)
    xb = torch.cat([x, ones], dim=1)
    penalty = torch.ones(x.shape[1] + 1, 1, dtype=torch.float64, device=x.device)
    penalty[-1] = 0.0
    w = torch.zeros(x.shape[1] + 1, classes, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=150, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        with torch.no_grad():
            log_p = torch.log_softmax(xb @ w, dim=1)
            loss = -c * (y * log_p).sum() + 0.5 * (penalty * w * w).sum()
            w.grad = c * xb.T @ (log_p.exp() - y) + penalty * w
        return loss

    optimizer.step(objective)
    return w.detach()


def attack(x: np.ndarray, labels: np.ndarray, *, classes: int, seed: int, round: int, source: str) -> dict[str, float]:
    """Every attack on one kind of vector (``source``), each drawing from its own key."""
    def gen(name: str) -> np.random.Generator:
        return np.random.default_rng(rng.key(seed, "leakage", round, source, name))

    return {
        "kmeans": kmeans(x, labels, classes=classes, generator=gen("kmeans")),
        "spectral": spectral(x, labels),
        "norm": norm(x, labels),
        "probe": probe(x, labels, classes=classes, generator=gen("probe")),
    }


def round_columns(crossings: list[Crossing | None], *, classes: int, seed: int, round: int) -> dict[str, float]:
    """The round's leakage columns of ``rounds.parquet`` from its devices' crossings, in device-id order (all
    NaN when no device was split). Each attack is run on each adapter set's vectors, and the best set counts
    (the code's ``*_max``): the server may attack whichever set leaks most."""
    parts = [c for c in crossings if c is not None]
    columns = {"label_leakage": math.nan} | {f"leakage_{a}_{s}": math.nan for s in SOURCES for a in ATTACKS}
    if not parts:
        return columns
    seen = Crossing.concat(parts)
    keep = np.arange(len(seen.labels))
    if len(keep) > MAX_EXAMPLES:
        g = np.random.default_rng(rng.key(seed, "leakage", round, "sample"))
        keep = np.sort(g.choice(len(keep), MAX_EXAMPLES, replace=False))
    labels = seen.labels[keep]
    for source in SOURCES:
        per_set = [attack(vectors[keep], labels, classes=classes, seed=seed, round=round, source=f"{source}{i}")
                   for i, vectors in enumerate(getattr(seen, source))]
        for a in ATTACKS:  # the best set, per attack
            columns[f"leakage_{a}_{source}"] = _max(values[a] for values in per_set)
    columns["label_leakage"] = _max(v for k, v in columns.items() if k != "label_leakage")
    return columns


def _max(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan
